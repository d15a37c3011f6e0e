"""Shared fixtures: a small corpus, tiny models and a one-call trainer for end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without a GPU, the Triton kernels (mmgen.kernels) run in Triton's interpreter. Set before Triton is imported
# (Lightning imports it), as its own functions are defined at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lightning as L  # noqa: E402
import pytest  # noqa: E402

from mmgen.data import TextDataModule, data_dir  # noqa: E402
from mmgen.tasks import LanguageModel  # noqa: E402
from mmgen_text import CharTokenizer  # noqa: E402

VERSE = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
         "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;\n")
TINY = dict(num_layers=2, num_heads=2, d_model=32, block_size=16, dropout=0.0, warmup_steps=2, lr_decay_steps=20,
            sample_tokens=0)


@pytest.fixture(autouse=True)
def float32_matmul_precision():
    """A fit on the GPU sets TF32 for the whole process (the tasks' on_fit_start); every test starts from and leaves
    the precision it found, so a later GPU-against-CPU comparison is not run in TF32."""
    precision = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(precision)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(VERSE * 20, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    path = data_dir() / "tinyshakespeare" / "input.txt"
    assert path.is_file(), f"Tiny Shakespeare not found at {path}: set MMGEN_DATA_DIR"
    return path


def tiny_model(text: CharTokenizer, **overrides) -> LanguageModel:
    return LanguageModel({"text": text}, **{**TINY, **overrides})


def fit(root: Path, path: Path, steps: int, *, ckpt_path: str | None = None, unknown: str = "error",
        **model_args) -> tuple[L.Trainer, LanguageModel, TextDataModule]:
    """Train a tiny GPT for ``steps`` steps on ``path``; the last checkpoint is ``root/last.ckpt``."""
    torch.manual_seed(0)
    dm = TextDataModule(CharTokenizer(unknown=unknown), path=str(path), batch_size=4, val_batches=2, seed=7)
    model = tiny_model(dm.modalities["text"], **model_args)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=max(steps, 1), check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, gradient_clip_val=1.0,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True)],
                        default_root_dir=root)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model, dm


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one intra-op thread for the rest of the module: tiny models gain nothing from a second one, and two threads on two
    busy cores spin for seconds at every operation (runs that take a second alone took up to ten)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_weights_and_optimizer(straight: L.Trainer, resumed: L.Trainer) -> None:
    """Every weight and every optimiser-state tensor of two runs equal, bit for bit (resume tests)."""
    for (name, a), b in zip(straight.lightning_module.state_dict().items(),
                            resumed.lightning_module.state_dict().values()):
        assert torch.equal(a, b), name
    a, b = straight.optimizers[0].state_dict(), resumed.optimizers[0].state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for k, values in a["state"].items():
        for key, value in values.items():
            assert torch.equal(value, b["state"][k][key]), (k, key)
