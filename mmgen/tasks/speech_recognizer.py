"""Speech recognition: an attention encoder over audio frames, a CTC head and an attention decoder, trained jointly.

Roles: ``source`` (an :class:`~mmgen.modality.AudioModality`, e.g. ``LogMelFrames``) and ``target`` (a
:class:`~mmgen.modality.TextModality`, e.g. ``CharTokenizer``). The CTC blank is the target's pad id, which never
occurs inside a transcript.

Notation: ``b`` batch, ``t`` encoder frames, ``s`` target length, ``d`` model width, ``v`` vocabulary, ``k`` beam.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from mmgen import checkpoint as ckpt_io
from mmgen.beam_search import BeamSearch, lexicon_trie
from mmgen.blocks import ConformerStack, DecoderCache, StepCache, TransformerStack, sinusoidal_positions
from mmgen.ctc import CTCPrefixScorer, ctc_greedy, ctc_prefix_beam_search
from mmgen.graphs import PaddedGraphs, capturing
from mmgen.kernels import weights_key
from mmgen.modality import AudioModality, Batch, Modality, TextModality, VocabularyError
from mmgen.tasks.common import adamw_cosine, evaluating, load_weights, log_image, log_text, require_role

if TYPE_CHECKING:
    from mmgen.kernels.decoder_step import FusedStepCache

__all__ = ["ASRNet", "SpeechRecognizer"]

Decoding = Literal["ctc_greedy", "ctc_beam", "attention", "joint"]
SEARCH_CACHE = 4  # captured beam searches kept for reuse on a GPU, by shape (least recently used dropped)
PRE_BEAM_RATIO = 1.5  # joint decoding: CTC scores this many labels per beam slot, the attention's best (ESPnet's 1.5)


class ASRNet(nn.Module):
    """Audio adapter -> encoder (Transformer or Conformer) -> CTC head; text embedding -> decoder with
    cross-attention to the encoder -> (tied) output head."""

    def __init__(self, source: AudioModality, target: TextModality, d_model: int, num_heads: int,
                 encoder_layers: int, decoder_layers: int, d_ff: int | None, encoder: str, conv_kernel_size: int,
                 dropout: float) -> None:
        super().__init__()
        self.d_model = d_model
        self.frontend = source.adapter(d_model)
        self.drop = nn.Dropout(dropout)
        if encoder == "conformer":
            self.encoder = ConformerStack(encoder_layers, d_model, num_heads, d_ff, kernel_size=conv_kernel_size,
                                          dropout=dropout)
        elif encoder == "transformer":
            self.encoder = TransformerStack(encoder_layers, d_model, num_heads, d_ff, bias=True, dropout=dropout)
        else:
            raise ValueError(f"encoder={encoder!r}; accepted: 'transformer' or 'conformer'")
        vocab = target.spec.vocab_size
        self.ctc_head = nn.Linear(d_model, vocab)
        self.embed = target.adapter(d_model)
        self.decoder = TransformerStack(decoder_layers, d_model, num_heads, d_ff, causal=True, cross_attention=True,
                                        bias=True, dropout=dropout)
        self.head = target.head(d_model, self.embed)

    def encode(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """features (b, frames, f), mask (b, frames) -> memory (b, t, d), memory mask (b, t)."""
        x, mask = self.frontend(features, mask)
        x = x * math.sqrt(self.d_model) + sinusoidal_positions(x.shape[1], self.d_model, device=x.device).to(x.dtype)
        padded = capturing(x) or not bool(mask.all())  # without padding, attention takes SDPA's unmasked path
        return self.encoder(self.drop(x), key_padding_mask=mask if padded else None), mask

    def decode(self, ids: Tensor, memory: Tensor | None, memory_mask: Tensor | None,
               cache: DecoderCache | None = None) -> Tensor:
        """ids (b, s) -> logits (b, s, v); with a cache, ``ids`` continue what it holds (memory is in the cache)."""
        offset = 0 if cache is None else cache.length
        x = self.embed(ids) * math.sqrt(self.d_model)
        x = x + sinusoidal_positions(ids.shape[1], self.d_model, offset, device=ids.device).to(x.dtype)
        return self.head(self.decoder(self.drop(x), memory=memory, memory_mask=memory_mask, cache=cache))

    def step_cache(self, rows: int, max_len: int, memory: Tensor, memory_mask: Tensor,
                   fused: bool | None = None, native: bool | None = None) -> StepCache | FusedStepCache:
        """Fixed-shape decoding state for :meth:`decode_step`: ``rows`` hypotheses (a multiple of the memory's
        batch, each utterance's consecutive), ``max_len`` positions; ``fused``, ``native``: see
        :meth:`~mmgen.blocks.TransformerStack.step_cache`."""
        cache = self.decoder.step_cache(rows, max_len, memory=memory, memory_mask=memory_mask, fused=fused,
                                        native=native)
        cache.positions = sinusoidal_positions(max_len, self.d_model, device=memory.device).to(memory.dtype)
        return cache

    def decode_step(self, ids: Tensor, position: Tensor, cache: StepCache | FusedStepCache,
                    length: int | None = None) -> Tensor:
        """One token per row, inference only: ids (rows,) at ``position`` (1-element long tensor) -> logits
        (rows, v); :meth:`decode` with a cache, in fixed shapes (see :meth:`TransformerStack.step`)."""
        x = self.embed(ids[:, None])[:, 0] * math.sqrt(self.d_model) + cache.positions.index_select(0, position)
        return self.head(self.decoder.step(x, position, cache, length))


class SpeechRecognizer(L.LightningModule):
    """Joint CTC / attention speech recogniser.

    Args:
        modalities: by role, linked from the data module: ``source`` (audio) and ``target`` (text).
        d_model: model width.
        num_heads: attention heads.
        encoder_layers: encoder blocks.
        decoder_layers: attention-decoder blocks.
        d_ff: feed-forward width; default ``4 * d_model``.
        encoder: ``transformer`` (pre-norm blocks) or ``conformer`` (adds a convolution module to each block).
        conv_kernel_size: the Conformer's depthwise convolution width (odd).
        dropout: dropout in attention, feed-forward and embeddings.
        ctc_weight: weight of the CTC loss; the attention decoder's cross-entropy gets ``1 - ctc_weight``.
        label_smoothing: label smoothing of the decoder's cross-entropy.
        learning_rate: peak learning rate (AdamW).
        min_learning_rate: learning rate at the end of the cosine decay.
        warmup_steps: linear warmup steps.
        lr_decay_steps: step at which the cosine decay reaches ``min_learning_rate``.
        weight_decay: AdamW weight decay on 2-D weights.
        betas: AdamW betas.
        decoding: how validation, test and :meth:`transcribe` decode: ``ctc_greedy``, ``ctc_beam`` (CTC prefix beam
            search), ``attention`` (attention beam search, the n-best rescored with CTC) or ``joint`` (attention beam
            search scored with CTC prefix probabilities at every step, so a hypothesis that drops or repeats a word
            falls behind as it is made, not only at the end).
        beam_size: beam width of the beam searches.
        ctc_rescore_weight: weight λ of CTC in the attention beam searches, scoring ``(1 - λ) log p_att + λ log p_ctc``:
            of the n-best's full CTC log-likelihood (``attention``) or of every prefix (``joint``).
        max_target_length: longest transcript the attention decoder may produce.
        lexicon: words the attention beam search may spell: ``train`` (every word of the training transcripts,
            collected when the run starts and saved with the checkpoint) or a list of words; none by default
            (free spelling, character by character). With a lexicon every hypothesis is a sequence of known words.
        log_transcripts: transcripts (with their errors) logged at every validation.
        init_from: a checkpoint whose weights and modality state start this run (fine-tuning); the optimiser starts
            fresh. Resuming a run is ``--ckpt_path`` instead.
    """

    def __init__(self, modalities: dict[str, Modality], d_model: int = 144, num_heads: int = 4,
                 encoder_layers: int = 6, decoder_layers: int = 2, d_ff: int | None = None,
                 encoder: Literal["transformer", "conformer"] = "transformer", conv_kernel_size: int = 15,
                 dropout: float = 0.1, ctc_weight: float = 0.3, label_smoothing: float = 0.1,
                 learning_rate: float = 1e-3, min_learning_rate: float = 1e-5, warmup_steps: int = 300,
                 lr_decay_steps: int = 5000, weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.98),
                 decoding: Decoding = "joint", beam_size: int = 4, ctc_rescore_weight: float = 0.3,
                 max_target_length: int = 300, log_transcripts: int = 6,
                 lexicon: Literal["train"] | list[str] | None = None, init_from: str | None = None) -> None:
        super().__init__()
        if not 0.0 <= ctc_weight <= 1.0:
            raise ValueError(f"ctc_weight={ctc_weight}; accepted: a number from 0 (attention only) to 1 (CTC only)")
        if isinstance(lexicon, str) and lexicon != "train":
            raise ValueError(f"lexicon={lexicon!r}; accepted: 'train', a list of words, or null")
        self.save_hyperparameters(ignore=["modalities", "init_from"])
        self._tries: dict[tuple[str, tuple[str, ...]], tuple[Tensor, Tensor]] = {}
        self._decoders: dict[tuple, object] = {}  # built on first use
        self.graph_decoding = True  # attention searches on a GPU replay each step as a CUDA graph
        # and run it as Triton kernels (mmgen.kernels): the decoder step (float32 weights, no autocast), the CTC prefix
        # scores and the search's bookkeeping; on the CPU the same run as C++ kernels (mmgen.kernels.native); False
        # runs the PyTorch reference code
        self.fused_decoding = True
        # recognize() on a GPU replays the encoder and CTC head as CUDA graphs, one per (batch, length bucket)
        self.graph_encoding = True
        self._searches: dict[tuple, tuple[BeamSearch, FusedStepCache]] = {}  # captured searches by shape (_nbest)
        self._encoder_graphs: PaddedGraphs | None = None  # built on first use
        self.source: AudioModality = require_role(self, modalities, "source", AudioModality)
        self.target: TextModality = require_role(self, modalities, "target", TextModality)
        init = None
        if init_from:
            init = ckpt_io.read(init_from)
            self._adopt_modalities(init, init_from)
        self.net = ASRNet(self.source, self.target, d_model, num_heads, encoder_layers, decoder_layers, d_ff,
                          encoder, conv_kernel_size, dropout)
        if init is not None:
            load_weights(self, init["state_dict"], init_from)
        from torchmetrics.text import CharErrorRate, WordErrorRate  # here: torchmetrics.text is slow to import

        self.val_wer, self.val_cer = WordErrorRate(), CharErrorRate()
        self.test_wer, self.test_cer = WordErrorRate(), CharErrorRate()
        self._shown: list[tuple[str, str]] = []

    def _adopt_modalities(self, init: dict, path: str) -> None:
        records = init[ckpt_io.KEY]["modalities"]
        saved = ckpt_io.restore_modality(records["source"])
        if saved.spec != self.source.spec:
            raise ckpt_io.CheckpointError(f"init_from {path}: the checkpoint's audio features are {saved.spec}, this "
                                          f"run's are {self.source.spec}; use the checkpoint's source settings")
        ckpt_io.restore_modality(records["source"], into=self.source)
        ckpt_io.restore_modality(records["target"], into=self.target)

    @property
    def blank_id(self) -> int:
        spec = self.target.spec
        return spec.blank_id if spec.blank_id is not None else spec.pad_id

    # ---- training ----
    def setup(self, stage: str) -> None:
        if self.hparams.lexicon == "train":
            dm = self.trainer.datamodule
            if not hasattr(dm, "training_words"):
                raise ValueError("lexicon 'train' needs the training transcripts (a speech data module); give the "
                                 "words as a list instead")
            # The words become a hyperparameter, so the checkpoint carries them to `mmgen.load(...).transcribe`.
            self.hparams.lexicon = dm.training_words()

    def _lexicon_trie(self, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """The lexicon as a character trie (:func:`~mmgen.beam_search.lexicon_trie`, spelled with the target's ids;
        a space after a whole word starts the next one), or None without a lexicon."""
        words = self.hparams.lexicon
        if not words:
            return None
        if words == "train":
            raise ValueError("lexicon 'train' has not been collected: the model was not set up with its training "
                             "data; give the words as a list instead")
        key = (str(device), tuple(words))  # the words may be changed between calls (benchmarks compare decodings)
        if key not in self._tries:
            spec = self.target.spec
            v = spec.vocab_size

            def spellable(text: str) -> bool:
                try:
                    return self.target.decode(self.target.encode(text)) == text
                except VocabularyError:
                    return False

            for word in words:
                if not word or not spellable(word):
                    raise ValueError(f"lexicon word {word!r} cannot be spelled with the model's vocabulary of "
                                     f"{v} ids; accepted: words made of the transcripts' characters")
            space = self.target.encode(" ").tolist()[0] if spellable(" ") else None
            self._tries[key] = lexicon_trie([self.target.encode(w).tolist() for w in words], v, spec.eos_id, space,
                                            device)
        return self._tries[key]

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls on the GPU

    def _losses(self, batch: dict) -> dict[str, Tensor]:
        src: Batch = batch["source"]
        tgt: Batch = batch["target"]
        memory, mask = self.net.encode(src.values, src.mask)
        spec = self.target.spec
        b = tgt.values.shape[0]
        # CTC over the encoder frames.
        log_probs = self.net.ctc_head(memory).float().log_softmax(dim=-1)  # shape: (b, t, v)
        in_lengths, out_lengths = mask.sum(dim=1), tgt.lengths
        # CTC's length rule (mmgen.ctc.min_ctc_frames) for the whole batch: labels plus equal neighbours.
        repeats = ((tgt.values[:, 1:] == tgt.values[:, :-1]) & tgt.mask[:, 1:]).sum(dim=1)
        feasible = in_lengths >= out_lengths + repeats  # an utterance too short for its transcript has no CTC alignment at all
        keep = feasible.nonzero().squeeze(1)  # only the feasible rows: an infinite loss would poison the gradient
        ctc = F.ctc_loss(log_probs[keep].transpose(0, 1), tgt.values[keep], in_lengths[keep], out_lengths[keep],
                         blank=self.blank_id, reduction="sum") / max(len(keep), 1)
        # Attention decoder, teacher-forced: <bos> y -> y <eos>.
        bos = torch.full((b, 1), spec.bos_id, dtype=tgt.values.dtype, device=tgt.values.device)
        pad = torch.full((b, 1), spec.pad_id, dtype=tgt.values.dtype, device=tgt.values.device)
        inputs = torch.cat([bos, tgt.values], dim=1)
        labels = torch.cat([tgt.values, pad], dim=1)
        labels[torch.arange(b), out_lengths] = spec.eos_id
        logits = self.net.decode(inputs, memory, mask)  # shape: (b, s + 1, v)
        att = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=spec.pad_id,
                              label_smoothing=self.hparams.label_smoothing, reduction="sum") / b
        w = self.hparams.ctc_weight
        return {"loss": w * ctc + (1 - w) * att, "ctc": ctc, "att": att,
                "ctc_infeasible": (~feasible).sum().float(), "memory": memory, "mask": mask, "log_probs": log_probs}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self._losses(batch)
        b = batch["target"].values.shape[0]
        show = self.trainer.progress_bar_callback is not None
        self.log("train_loss", losses["loss"], prog_bar=show, batch_size=b)
        self.log_dict({"train_ctc": losses["ctc"], "train_att": losses["att"]}, batch_size=b)
        self.log("train_ctc_infeasible", losses["ctc_infeasible"], reduce_fx="sum", batch_size=b)
        return losses["loss"]

    def _evaluate(self, batch: dict, prefix: str, wer: Metric, cer: Metric) -> None:
        losses = self._losses(batch)
        b = batch["target"].values.shape[0]
        self.log(f"{prefix}_loss", losses["loss"], batch_size=b, sync_dist=True)
        # The encoder output of the loss serves decoding too (Lightning evaluates in eval mode, as recognize does).
        ids = self._decode(losses["memory"], losses["mask"], losses["log_probs"], self.hparams.decoding,
                           self.hparams.beam_size)
        hyps = [self.target.decode(row) for row in ids]
        refs = batch["text"]
        wer.update(hyps, refs)
        cer.update(hyps, refs)
        self.log(f"{prefix}_wer", wer, batch_size=b)
        self.log(f"{prefix}_cer", cer, batch_size=b)
        want = self.hparams.log_transcripts - len(self._shown)
        self._shown.extend(list(zip(refs, hyps))[:max(want, 0)])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_wer, self.val_cer)
        if batch_idx == 0 and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            src = batch["source"]
            weights = self.attention_map(src.values[0, :int(src.lengths[0])], batch["text"][0])
            log_image(self, "val_attention", render_attention(weights))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_wer, self.test_cer)

    def on_validation_epoch_start(self) -> None:
        self._shown = []

    on_test_epoch_start = on_validation_epoch_start

    def _log_transcripts(self, tag: str) -> None:
        if self.trainer.sanity_checking or not self._shown or not self.trainer.is_global_zero:
            return
        lines = []
        for ref, hyp in self._shown:
            errors = word_errors(ref, hyp)
            lines.append(f"REF: {ref}\nHYP: {hyp}\n     {errors} word error(s) of {len(ref.split())}")
        log_text(self, tag, "\n".join(lines))

    def on_validation_epoch_end(self) -> None:
        self._log_transcripts("val_transcripts")

    def on_test_epoch_end(self) -> None:
        self._log_transcripts("test_transcripts")

    def configure_optimizers(self):
        return adamw_cosine(self)

    # ---- checkpoints ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[ckpt_io.KEY] = ckpt_io.record(self, {"source": self.source, "target": self.target})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(ckpt_io.KEY, {}).get("modalities", {}).get("target", {}).get("state")
        if saved is not None and saved != self.target.state_dict():
            raise ckpt_io.CheckpointError(
                "cannot use this checkpoint with this data: its transcript vocabulary differs from the one built "
                f"from these transcripts ({saved} vs {self.target.state_dict()}); to train on new data start from "
                "its weights with `--model.init_args.init_from` instead")

    # ---- recognition ----
    @torch.inference_mode()
    def recognize(self, features: Batch, decoding: Decoding | None = None, beam_size: int | None = None) -> list[str]:
        """A padded batch of feature frames -> one transcript per utterance."""
        decoding = decoding or self.hparams.decoding
        beam_size = beam_size or self.hparams.beam_size
        with evaluating(self.net):
            memory, mask, log_probs = self._encode_for_decoding(features.values.to(self.device),
                                                                features.mask.to(self.device))
            ids = self._decode(memory, mask, log_probs, decoding, beam_size)
        return [self.target.decode(row) for row in ids]

    def _encode_for_decoding(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Feature frames (b, frames, f) and their mask -> memory (b, t, d), its mask and CTC log-probabilities
        (b, t, v) in float32, in eval mode. On a GPU with ``graph_encoding`` a CUDA graph replay
        (:class:`~mmgen.graphs.PaddedGraphs`; the outputs are then overwritten by the next call)."""
        if not (self.graph_encoding and features.is_cuda):
            return self._encode_eager(features, mask)
        if self._encoder_graphs is None:
            self._encoder_graphs = PaddedGraphs(self.net, self._encode_eager)
        memory, mask, log_probs = self._encoder_graphs(features, mask)
        t = int(self.source.output_lengths(torch.tensor([features.shape[1]]))[0])  # the frames without the graph
        return memory[:, :t], mask[:, :t], log_probs[:, :t]

    def _encode_eager(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        memory, mask = self.net.encode(features, mask)
        return memory, mask, self.net.ctc_head(memory).float().log_softmax(dim=-1)

    def _decode(self, memory: Tensor, mask: Tensor, log_probs: Tensor, decoding: Decoding,
                beam_size: int) -> list[list[int]]:
        """Encoder output (b, t, d), its mask and CTC log-probabilities -> label ids per utterance."""
        lengths = mask.sum(dim=1)
        if decoding == "ctc_greedy":
            return ctc_greedy(log_probs, lengths, self.blank_id)
        if decoding == "ctc_beam":
            if log_probs.is_cuda and self.blank_id == 0:
                return self._cuda_ctc_beam(log_probs, lengths, beam_size)
            return [ctc_prefix_beam_search(lp[:n], self.blank_id, beam_size)[0][0]
                    for lp, n in zip(log_probs, lengths.tolist())]
        if decoding in ("attention", "joint"):
            return self._attention_beam_search(memory, mask, log_probs, beam_size, joint=decoding == "joint")
        raise ValueError(f"decoding={decoding!r}; accepted: 'ctc_greedy', 'ctc_beam', 'attention', 'joint'")

    def _cuda_ctc_beam(self, log_probs: Tensor, lengths: Tensor, beam_size: int) -> list[list[int]]:
        """CTC prefix beam search on the GPU, batched: torchaudio's CUDA decoder (it needs blank id 0). Frames whose
        blank probability exceeds 0.999 are skipped, which changes no result this side of rounding."""
        from torchaudio.models.decoder import cuda_ctc_decoder

        key = ("cuda_ctc", beam_size)
        if key not in self._decoders:
            self._decoders[key] = cuda_ctc_decoder([str(i) for i in range(log_probs.shape[-1])], nbest=1,
                                                   beam_size=beam_size, blank_skip_threshold=0.999)
        hyps = self._decoders[key](log_probs.float().contiguous(), lengths.to(torch.int32))
        return [list(h[0].tokens) if h else [] for h in hyps]

    @torch.inference_mode()
    def attention_map(self, features: Tensor, text: str) -> Tensor:
        """Cross-attention weights (s + 1, t) of the decoder's last block, averaged over heads, for one utterance
        (features (frames, f)) teacher-forced with its transcript ``text``: rows are ``<bos>`` and its characters,
        columns encoder frames."""
        with evaluating(self.net):
            src = self.source.collate([features])
            memory, mask = self.net.encode(src.values.to(self.device), src.mask.to(self.device))
            ids = torch.cat([torch.tensor([self.target.spec.bos_id]), self.target.encode(text)])[None].to(self.device)
            attn = self.net.decoder.blocks[-1].cross_attn
            seen: dict = {}
            handle = attn.register_forward_pre_hook(
                lambda module, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
            try:
                self.net.decode(ids, memory, mask)
            finally:
                handle.remove()
            _, weights = attn(*seen["args"], **{**seen["kwargs"], "need_weights": True})
        return weights[0].mean(dim=0).float().cpu()

    def _attention_beam_search(self, memory: Tensor, mask: Tensor, ctc_log_probs: Tensor, k: int,
                               joint: bool = False) -> list[list[int]]:
        """Beam search over the attention decoder. ``joint``: every step is scored ``(1 - λ) log p_att +
        λ log p_ctc(prefix)`` (:class:`~mmgen.ctc.CTCPrefixScorer`), so a finished hypothesis carries
        ``(1 - λ) log p_att + λ log p_ctc``; otherwise the search scores the attention alone and the n-best of each
        utterance are rescored with ``(1 - λ) log p_att + λ log p_ctc``."""
        nbest = self._nbest(memory, mask, ctc_log_probs, k, joint)
        if joint:
            return [max(hyps, key=lambda h: h[1])[0] for hyps in nbest]
        return self._ctc_rescore(nbest, ctc_log_probs, mask.sum(dim=1))

    def _nbest(self, memory: Tensor, mask: Tensor, ctc_log_probs: Tensor, k: int,
               joint: bool) -> list[list[tuple[list[int], float]]]:
        """Up to ``k`` finished hypotheses per utterance with their search scores (see
        :meth:`_attention_beam_search` and :class:`~mmgen.beam_search.BeamSearch`)."""
        graph = self.graph_decoding and memory.is_cuda
        if not graph:
            return self._beam_search(memory, mask, ctc_log_probs, k, joint).run(graph=False)
        # On a GPU, a search of a shape seen before is reused: its decoder cache and CTC scorer are refilled in place
        # and its captured step replayed from the first, which saves building the search, an eager step and the
        # capture (~5 ms of a 45 ms batch-8 transcription of 10 s clips on the H100). Keyed on everything that fixes
        # the captured work, the weights' versions included (a training step or a move makes a new one).
        lengths = mask.sum(dim=1)
        max_len = min(self.hparams.max_target_length, int(lengths.max()) + 1)
        params = [*self.net.decoder.parameters(), *self.net.embed.parameters(), *self.net.head.parameters()]
        key = (tuple(memory.shape), str(memory.device), memory.dtype, k, joint, max_len, bool(mask.all()),
               self.fused_decoding, self.hparams.ctc_rescore_weight, id(self._lexicon_trie(memory.device)),
               weights_key(params))
        entry = self._searches.pop(key, None)  # popped: put back last, the most recently used
        if entry is None:
            search, cache = self._beam_search(memory, mask, ctc_log_probs, k, joint, with_cache=True)
        else:
            search, cache = entry
            search.reset()
            cache.refill(memory, mask)
            if search.ctc is not None:
                search.ctc.refill(ctc_log_probs.repeat_interleave(k, dim=0), lengths.repeat_interleave(k))
        out = search.run(graph=True)
        if search._graph is not None and hasattr(cache, "refill"):  # a FusedStepCache (the PyTorch one is not kept)
            self._searches[key] = (search, cache)
            while len(self._searches) > SEARCH_CACHE:
                self._searches.pop(next(iter(self._searches)))
        return out

    def _beam_search(self, memory: Tensor, mask: Tensor, ctc_log_probs: Tensor, k: int, joint: bool,
                     with_cache: bool = False):
        """A new search (and with ``with_cache`` its decoder state too, as ``(search, cache)``)."""
        spec = self.target.spec
        b = memory.shape[0]
        lengths = mask.sum(dim=1)
        max_len = min(self.hparams.max_target_length, int(lengths.max()) + 1)
        native = None if self.fused_decoding else False
        cache = self.net.step_cache(b * k, max_len, memory, mask, fused=native, native=native)
        lam = self.hparams.ctc_rescore_weight
        ctc = None
        if joint and lam > 0:
            ctc = CTCPrefixScorer(ctc_log_probs.repeat_interleave(k, dim=0), lengths.repeat_interleave(k),
                                  self.blank_id, spec.eos_id, group=k, fused=native, native=native)
        search = BeamSearch(
            lambda ids, position, length: self.net.decode_step(ids, position, cache, length), cache.reorder,
            batch=b, beam=k, vocab=spec.vocab_size, bos=spec.bos_id, eos=spec.eos_id,
            banned=[i for i in (spec.pad_id, spec.bos_id, self.blank_id) if i is not None], max_len=max_len,
            device=memory.device, ctc=ctc, ctc_weight=lam, pre_beam=int(PRE_BEAM_RATIO * k),
            trie=self._lexicon_trie(memory.device), fused=native, native=native)
        return (search, cache) if with_cache else search

    def _ctc_rescore(self, nbest: list[list[tuple[list[int], float]]], log_probs: Tensor,
                     lengths: Tensor) -> list[list[int]]:
        lam = self.hparams.ctc_rescore_weight
        if lam == 0.0:
            return [max(hyps, key=lambda h: h[1])[0] for hyps in nbest]
        owner = [i for i, hyps in enumerate(nbest) for _ in hyps]
        flat = [h for hyps in nbest for h in hyps]
        device = log_probs.device
        targets = [torch.tensor(h[0] or [0], dtype=torch.long) for h in flat]  # an empty one is never read
        target_lengths = torch.tensor([len(h[0]) for h in flat], device=device)
        padded = nn.utils.rnn.pad_sequence(targets, batch_first=True).to(device)
        idx = torch.tensor(owner, device=device)
        nll = F.ctc_loss(log_probs.index_select(0, idx).transpose(0, 1), padded, lengths.index_select(0, idx),
                         target_lengths, blank=self.blank_id, reduction="none")
        best: list[tuple[float, list[int]] | None] = [None] * len(nbest)
        for (hyp, att), i, ctc in zip(flat, owner, (-nll).tolist()):
            score = (1 - lam) * att + lam * ctc
            if best[i] is None or score > best[i][0]:
                best[i] = (score, hyp)
        return [h for _, h in best]

    def transcribe(self, paths: Sequence[str | Path], *, decoding: Decoding | None = None,
                   beam_size: int | None = None, batch_size: int = 16) -> list[str]:
        """Sound files -> one transcript each, in order (files are batched by length). Every file is read and
        checked before any is decoded."""
        waves: list[Tensor | None] = [self.source.load(path) for path in paths]  # read on the CPU
        order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
        chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        batches = []
        for chunk in chunks:  # features where the model is; each waveform let go once its chunk has them
            batches.append(self.source.encode_batch([waves[i].to(self.device) for i in chunk],
                                                    [str(paths[i]) for i in chunk]))
            for i in chunk:
                waves[i] = None
        out: list[str] = [""] * len(paths)
        for chunk, feats in zip(chunks, batches):
            for i, text in zip(chunk, self.recognize(feats, decoding, beam_size)):
                out[i] = text
        return out


def render_attention(weights: Tensor, scale: int | None = None) -> Tensor:
    """Attention weights (s, t) -> a uint8 image, each row scaled to its maximum, ``scale`` pixels per cell
    (default: enough for an image about 512 pixels wide)."""
    scale = scale or max(4, 512 // max(weights.shape[1], 1))
    img = weights / weights.amax(dim=1, keepdim=True).clamp_min(1e-8)
    img = img.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)
    return (img * 255).round().to(torch.uint8)


def word_errors(ref: str, hyp: str) -> int:
    """Word-level edit distance (substitutions + deletions + insertions), from torchmetrics' WER."""
    from torchmetrics.functional.text import word_error_rate

    return round(float(word_error_rate([hyp], [ref])) * max(len(ref.split()), 1))
