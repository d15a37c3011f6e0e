"""Decoder-only language model (GPT) on the shared blocks, with nanoGPT's training recipe and KV-cache generation.

Notation: ``b`` batch, ``s`` sequence, ``d`` model width, ``v`` vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmgen import checkpoint as ckpt_io
from mmgen.blocks import DecoderCache, TransformerStack
from mmgen.modality import Modality, TextModality
from mmgen.sampling import sample_next
from mmgen.tasks.common import adamw_cosine, evaluating, load_weights, log_text, require_role

__all__ = ["GPT", "LanguageModel", "cosine_schedule"]


class GPT(nn.Module):
    """Token embedding + learned positions -> causal Transformer stack -> (tied) LM head."""

    def __init__(self, text: TextModality, num_layers: int, num_heads: int, d_model: int, block_size: int,
                 dropout: float, bias: bool, tie_embeddings: bool) -> None:
        super().__init__()
        self.block_size = block_size
        self.embed = text.adapter(d_model)
        self.pos = nn.Embedding(block_size, d_model)
        nn.init.normal_(self.pos.weight, mean=0.0, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.stack = TransformerStack(num_layers, d_model, num_heads, causal=True, bias=bias, dropout=dropout)
        self.head = text.head(d_model, self.embed if tie_embeddings else None)

    def forward(self, ids: Tensor, cache: DecoderCache | None = None) -> Tensor:
        """ids (b, s) -> logits (b, s, v); with a cache, ``ids`` continue what it holds."""
        offset = 0 if cache is None else cache.length
        s = ids.shape[1]
        if offset + s > self.block_size:
            raise ValueError(f"sequence of {offset + s} tokens exceeds the context length {self.block_size}")
        positions = torch.arange(offset, offset + s, device=ids.device)
        x = self.drop(self.embed(ids) + self.pos(positions))  # shape: (b, s, d)
        return self.head(self.stack(x, cache=cache))


def cosine_schedule(step: int, *, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """nanoGPT's learning-rate factor: linear warmup, cosine decay to ``min_ratio`` at ``decay_steps``, then flat."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step > decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


class LanguageModel(L.LightningModule):
    """A decoder-only (GPT) language model on one role, ``text``.

    Args:
        modalities: modalities by role, linked from the data module (``text``: a text modality).
        num_layers: Transformer blocks.
        num_heads: attention heads.
        d_model: model width.
        block_size: context length (learned position table size).
        dropout: dropout in attention and residual branches.
        bias: biases in linear layers and LayerNorms.
        tie_embeddings: share the input embedding and output projection.
        learning_rate: peak learning rate.
        min_learning_rate: learning rate at the end of the cosine decay.
        warmup_steps: linear warmup steps.
        lr_decay_steps: step at which the cosine decay reaches ``min_learning_rate``.
        weight_decay: AdamW weight decay, applied to 2-D weights only.
        betas: AdamW betas.
        compile: ``torch.compile`` the network for training on a GPU (ignored on the CPU, where compiling costs more
            than it saves for runs this size).
        compile_mode: ``torch.compile`` mode; ``reduce-overhead`` replays CUDA graphs, cutting kernel-launch time.
        compile_regions: compile each Transformer block instead of the whole network (regional compilation): the
            blocks share one compiled graph, so a cold start compiles one block instead of the whole model.
        compile_eval: run validation through the compiled network too; off by default, since validation's
            eval-mode, gradient-free graph is a second compilation that costs more time on a cold start than its
            batches save.
        init_from: a checkpoint whose weights and modality state start this run (fine-tuning); the optimiser
            starts fresh. Resuming a run is ``--ckpt_path`` instead.
        sample_prompt: prompt of the text generated at every validation.
        sample_tokens: tokens generated at every validation (0: none).
        sample_temperature: temperature of that generation.
        sample_top_k: top-k of that generation.
    """

    def __init__(self, modalities: dict[str, Modality], num_layers: int = 6, num_heads: int = 6, d_model: int = 384,
                 block_size: int = 256, dropout: float = 0.2, bias: bool = False, tie_embeddings: bool = True,
                 learning_rate: float = 1e-3, min_learning_rate: float = 1e-4, warmup_steps: int = 100,
                 lr_decay_steps: int = 5000, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.99),
                 compile: bool = False,
                 compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                                       "max-autotune-no-cudagraphs"] = "default", compile_regions: bool = False, compile_eval: bool = False,
                 init_from: str | None = None, sample_prompt: str = "\n",
                 sample_tokens: int = 200, sample_temperature: float = 0.8, sample_top_k: int | None = 200) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["modalities", "init_from"])
        self.text: TextModality = require_role(self, modalities, "text", TextModality)
        self.block_size = block_size
        init = None
        if init_from:
            init = ckpt_io.read(init_from)
            ckpt_io.restore_modalities({"modalities": {"text": init["mmgen"]["modalities"]["text"]}},
                                       {"text": self.text})
        self.net = GPT(self.text, num_layers, num_heads, d_model, block_size, dropout, bias, tie_embeddings)
        if init is not None:
            load_weights(self, init["state_dict"], init_from)

    # ---- training ----
    def on_fit_start(self) -> None:
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for what runs outside bf16 autocast
            if self.hparams.compile and self.hparams.compile_regions:
                self.net.stack.compile_blocks(mode=self.hparams.compile_mode)
            elif self.hparams.compile:
                self.net.compile(mode=self.hparams.compile_mode)  # in place: parameter names (and checkpoints) stay those of the plain module

    def _loss(self, batch: tuple[Tensor, Tensor], eager: bool = False) -> Tensor:
        x, y = batch
        logits = self.net.forward(x) if eager else self.net(x)  # shape: (b, s, v); .forward skips the compiled graph
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), y.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        # A progress-bar metric is read back (.item()) every step, stalling the GPU queue: only ask for it when a
        # progress bar shows it.
        self.log("train_loss", loss, prog_bar=self.trainer.progress_bar_callback is not None)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch, eager=not self.hparams.compile_eval), sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # `mmgen test`: the data module's test windows are its fixed validation windows, so test_loss == val_loss.
        self.log("test_loss", self._loss(batch, eager=not self.hparams.compile_eval), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self.hparams.sample_tokens or not self.trainer.is_global_zero:
            return
        text = self.generate(self.hparams.sample_prompt, self.hparams.sample_tokens,
                             temperature=self.hparams.sample_temperature, top_k=self.hparams.sample_top_k, seed=0)
        log_text(self, "samples", text)

    def configure_optimizers(self):
        # Fused AdamW on the GPU, except with fp16's gradient scaler, which must unscale before the step.
        return adamw_cosine(self, fused=self.device.type == "cuda" and str(self.trainer.precision) != "16-mixed")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and optimizer.defaults.get("fused"):
            # Lightning refuses to clip for fused optimisers under AMP because of fp16's scaler; bf16 and fp32 have
            # no scaler, so the plain norm clip is exact here.
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val, foreach=True)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- checkpoints ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[ckpt_io.KEY] = ckpt_io.record(self, {"text": self.text})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # `--ckpt_path` (resuming, or evaluating with validate/test): the vocabulary built from today's data must be
        # the one the weights were trained with.
        saved = checkpoint.get(ckpt_io.KEY, {}).get("modalities", {}).get("text", {}).get("state")
        if saved is None or saved == self.text.state_dict():
            return
        sizes = f"({len(saved.get('chars', ''))} vs {len(self.text.state_dict().get('chars', ''))} characters)"
        fn = self._trainer.state.fn if self._trainer is not None else None
        stage = str(getattr(fn, "value", fn))  # "fit", "validate", "test" or "predict"
        if stage in ("validate", "test", "predict"):
            raise ckpt_io.CheckpointError(
                f"cannot evaluate the checkpoint on this data: the checkpoint's vocabulary differs from the one built "
                f"from this data {sizes}; to {stage} it on other text load its weights and vocabulary with "
                f"`--model.init_from CKPT` instead of `--ckpt_path`")
        raise ckpt_io.CheckpointError(
            f"cannot resume: the checkpoint's text vocabulary differs from the one built from this data {sizes}; "
            "to train on new data start from its weights with `--model.init_from` instead")

    # ---- generation ----
    @torch.inference_mode()
    def generate(self, prompt: str = "\n", max_new_tokens: int = 200, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 use_cache: bool = True, stream: Callable[[str], None] | None = None) -> str:
        """Continue ``prompt`` by ``max_new_tokens`` tokens; ``stream`` receives each new piece of text as it comes.

        With ``use_cache``, keys and values are kept in a preallocated cache; when the context is full it is
        refilled from the last half of the context (the window slides by half a block at a time).
        """
        ids = self.text.encode(prompt)
        if len(ids) == 0:
            ids = torch.tensor([self.text.spec.bos_id])
        out = self.generate_ids(ids[None].to(self.device), max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, use_cache=use_cache,
                                on_token=None if stream is None else lambda t: stream(self.text.decode(t.tolist())))
        return self.text.decode(out[0, ids.numel():].tolist())

    @torch.inference_mode()
    def generate_ids(self, ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int | None = None, use_cache: bool = True,
                     on_token: Callable[[Tensor], None] | None = None) -> Tensor:
        """ids (b, s) -> (b, s + max_new_tokens)."""
        with evaluating(self.net):
            generator = None
            if seed is not None:
                generator = torch.Generator(device=ids.device).manual_seed(seed)
            net, block = self.net, self.block_size
            forward = net.forward  # the eager module: a compiled training graph does not fit growing decode shapes
            cache = net.stack.make_cache(ids.shape[0], block) if use_cache else None
            pending = ids[:, -block:]  # tokens not yet in the cache
            for _ in range(max_new_tokens):
                if cache is None:
                    logits = forward(ids[:, -block:])
                else:
                    if cache.length + pending.shape[1] > block:
                        cache.reset()
                        pending = ids[:, -(block // 2):]
                    logits = forward(pending, cache)
                nxt = sample_next(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                                  generator=generator)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                pending = nxt[:, None]
                if on_token is not None:
                    on_token(nxt)
        return ids
