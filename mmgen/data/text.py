"""Text corpora for language modelling: one file or a folder of ``.txt`` files, sampled as random windows.

Training windows come from a seeded stream that shards across ranks and data-loader workers and resumes at the step
where a checkpoint stopped; the last ``val_fraction`` of the corpus is the validation split (as in nanoGPT). The
data module's checkpoint state also holds the global random state (:mod:`mmgen.data.rng`), so a resumed run's dropout
continues where the checkpoint was written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmgen.data.paths import DataFileError, resolve
from mmgen.data.rng import rng_state, set_rng_state
from mmgen.modality import Modality, TextModality, VocabularyError

__all__ = ["RandomWindows", "TextDataModule", "read_corpus"]

VAL_STREAM = 2**31 - 1  # the validation windows draw from a stream no training rank uses


def read_corpus(path: Path) -> str:
    """The UTF-8 text of a file, or of every ``*.txt`` under a folder (sorted, concatenated)."""
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise DataFileError(f"corpus folder {path} holds no .txt files; accepted: a UTF-8 text file or a folder of "
                            f".txt files")
    parts = []
    for f in files:
        raw = f.read_bytes()
        try:
            parts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataFileError(f"corpus file {f} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset "
                                f"{exc.start} ({exc.reason}); accepted: UTF-8 encoded text") from None
    text = "".join(parts)
    if not text:
        raise DataFileError(f"corpus {path} is empty; accepted: a non-empty UTF-8 text file or folder of .txt files")
    return text


class RandomWindows(IterableDataset):
    """Batches of random windows ``(x, y)`` (b, block), ``y`` shifted by one, drawn like nanoGPT's ``get_batch``.

    Batch ``i`` (of ``num_batches``) is number ``start + i * stride`` of stream ``stream``, drawn from a generator
    seeded by ``(seed, stream, number)``: the sequence is the same however it is split across data-loader workers,
    each rank draws its own stream, and iteration begins at batch ``skip`` so a resumed run continues exactly
    (Lightning restarts a mid-epoch loader and counts the batches already done, so ``len`` stays the whole epoch).
    """

    def __init__(self, ids: Tensor, block_size: int, batch_size: int, num_batches: int, seed: int,
                 stream: int = 0, start: int = 0, stride: int = 1, skip: int = 0) -> None:
        if len(ids) <= block_size:
            raise ValueError(f"a split of {len(ids)} tokens is too short for windows of {block_size + 1}; use a "
                             f"larger corpus or a smaller block_size")
        self.ids, self.block_size, self.batch_size = ids, block_size, batch_size
        self.num_batches, self.seed, self.stream = num_batches, seed, stream
        self.start, self.stride, self.skip = start, stride, skip

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, number: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, self.stream, number])
        offsets = torch.from_numpy(rng.integers(0, len(self.ids) - self.block_size, size=self.batch_size))
        window = self.ids[offsets[:, None] + torch.arange(self.block_size + 1)]  # shape: (b, block + 1)
        return window[:, :-1].long(), window[:, 1:].long()

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(self.skip + worker, self.num_batches, workers):
            yield self.batch(self.start + i * self.stride)


class TextDataModule(L.LightningDataModule):
    """A text corpus for a language model, tokenised by a text modality plugin.

    Args:
        tokenizer: the text modality (e.g. ``CharTokenizer``); its vocabulary is built from the whole corpus unless
            it was loaded from a checkpoint (``init_from``).
        path: a UTF-8 text file or a folder of ``.txt`` files; relative to ``data_dir``.
        data_dir: root for relative paths; default ``$MMGEN_DATA_DIR``, else ``../shared/data`` beside the repository.
        block_size: window length; default the model's context length.
        batch_size: windows per batch (per device).
        val_fraction: the last fraction of the corpus used for validation.
        val_batches: batches per validation (a fixed, seeded set of windows).
        val_batch_size: windows per validation batch; default ``batch_size``. Validation without gradients is
            bound by kernel launches at small widths, so fewer, larger batches of the same windows finish sooner:
            nanoGPT's 200 batches of 64 are 50 of 256.
        seed: seed of the window sampler.
        num_workers: data-loader worker processes.
    """

    def __init__(self, tokenizer: TextModality, path: str = "tinyshakespeare/input.txt", data_dir: str | None = None,
                 block_size: int | None = None, batch_size: int = 64, val_fraction: float = 0.1,
                 val_batches: int = 200, val_batch_size: int | None = None, seed: int = 1337,
                 num_workers: int = 0) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction}; accepted: a number between 0 and 1")
        self.tokenizer = tokenizer
        self.path, self.data_dir = path, data_dir
        self.block_size, self.batch_size = block_size, batch_size
        self.val_fraction, self.val_batches, self.val_batch_size = val_fraction, val_batches, val_batch_size
        self.seed, self.num_workers = seed, num_workers
        self._text: str | None = None
        self._train_ids: Tensor | None = None
        self._val_ids: Tensor | None = None
        self._resume_step = 0

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = read_corpus(resolve(self.path, self.data_dir))
        return self._text

    @property
    def modalities(self) -> dict[str, Modality]:
        """The modalities by role, the tokenizer fitted on the corpus (the model reads its spec)."""
        if not self.tokenizer.fitted:
            self.tokenizer.fit([self.text])
        return {"text": self.tokenizer}

    def setup(self, stage: str) -> None:
        if self._train_ids is not None:
            return
        tok = self.modalities["text"]
        try:
            ids = tok.encode(self.text)
        except VocabularyError as exc:
            distinct = len(set(self.text))
            raise VocabularyError(f"corpus {self.path} ({distinct} distinct characters) does not fit the model's "
                                  f"vocabulary ({tok.spec.vocab_size} ids): {exc}") from None
        dtype = torch.int16 if tok.spec.vocab_size < 2**15 else torch.int32
        ids = ids.to(dtype)
        n = int(len(ids) * (1 - self.val_fraction))
        self._train_ids, self._val_ids = ids[:n], ids[n:]

    def _block(self) -> int:
        model_block = getattr(self.trainer.lightning_module, "block_size", None) if self.trainer else None
        block = self.block_size or model_block
        if block is None:
            raise ValueError("set data.block_size (the model has no block_size to take it from)")
        if model_block is not None and block > model_block:
            raise ValueError(f"data.block_size={block} exceeds the model's context length {model_block}")
        return block

    def _rank(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        # One epoch is the whole run: windows are random, so epochs mean nothing here.
        num = max_steps * accumulate if max_steps and max_steps > 0 else 10**12
        ds = RandomWindows(self._train_ids, self._block(), self.batch_size, num, self.seed, stream=rank,
                           skip=self._resume_step)
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0, generator=self._generator())

    def _generator(self) -> torch.Generator:
        # Every iterator a DataLoader builds (each epoch, each validation) draws its workers' base seed from its
        # `generator`, by default the global one, which the model's dropout draws from: that extra draw would shift
        # the dropout masks, and differently in a resumed run. RandomWindows draws nothing from the workers' seeds.
        return torch.Generator().manual_seed(self.seed)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        # A fixed set of windows, split across ranks: every validation compares like with like.
        ds = RandomWindows(self._val_ids, self._block(), self.val_batch_size or self.batch_size,
                           len(range(rank, self.val_batches, world)),
                           self.seed, stream=VAL_STREAM, start=rank, stride=world)
        return DataLoader(ds, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available(),
                          generator=self._generator())

    def test_dataloader(self) -> DataLoader:
        """The validation windows (the same fixed, seeded set): ``mmgen test`` reports on the held-out split."""
        return self.val_dataloader()

    # Lightning saves a data module's state_dict in every checkpoint and restores it before training resumes. Besides
    # the windows consumed, it keeps the global random state, which the model's dropout draws from and which Lightning
    # does not checkpoint: a resumed run then continues those draws where the checkpoint was written.
    def state_dict(self) -> dict[str, Any]:
        # Windows consumed so far, read from the loop rather than the (prefetching) loader.
        consumed = 0
        if self.trainer is not None:
            consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches
        return {"train_batches_consumed": consumed, "seed": self.seed, "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_step = int(state.get("train_batches_consumed", 0))
        fitting = self.trainer is None or self.trainer.state.fn == TrainerFn.FITTING
        if "rng" in state and fitting:  # (evaluating a checkpoint leaves the random state alone; older ones have none)
            set_rng_state(state["rng"])
