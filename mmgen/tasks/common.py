"""Small helpers every task uses: checking roles and logging what users look at."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from torch import nn

from mmgen.modality import Modality

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

__all__ = ["adamw_cosine", "evaluating", "load_weights", "log_image", "log_text", "require_role"]


def require_role(task: L.LightningModule, modalities: dict[str, Modality], role: str, kind: type) -> Any:
    """The modality given for ``role``; a clear error if it is missing or of the wrong kind."""
    if role not in modalities:
        raise ValueError(f"{type(task).__name__} needs a modality for role {role!r} ({kind.__name__}); "
                         f"the data module gave roles: {', '.join(sorted(modalities)) or 'none'}")
    m = modalities[role]
    if not isinstance(m, kind):
        raise TypeError(f"{type(task).__name__} role {role!r} needs a {kind.__name__}, got {type(m).__name__}")
    return m


def log_text(task: L.LightningModule, tag: str, text: str) -> None:
    """Send text to every logger that takes text (TensorBoard, W&B), a file beside the logs, and the console."""
    step = task.global_step
    for logger in task.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(logger, "log_text"):
            logger.log_text(key=tag, columns=["step", "text"], data=[[step, text]])
        elif hasattr(experiment, "add_text"):
            experiment.add_text(tag, "    " + text.replace("\n", "\n    "), global_step=step)  # markdown code block
        if getattr(logger, "log_dir", None):
            path = Path(logger.log_dir) / f"{tag}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(f"=== step {step} ===\n{text}\n")
    task.print(f"[{tag} @ step {step}]\n{text}")


def log_image(task: L.LightningModule, tag: str, image: "np.ndarray | Tensor") -> None:
    """Send a uint8 image (h, w) or (h, w, 3) to every logger that takes images (TensorBoard, W&B) and save it as a
    PNG beside the logs (``<log_dir>/<tag>/step_<step>.png``)."""
    import torch
    from torchvision.io import write_png

    img = torch.as_tensor(image)
    chw = img[None] if img.dim() == 2 else img.permute(2, 0, 1)  # shape: (c, h, w)
    step = task.global_step
    for logger in task.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(logger, "log_image"):
            logger.log_image(key=tag, images=[img.numpy()], step=step)
        elif hasattr(experiment, "add_image"):
            experiment.add_image(tag, chw, global_step=step)
        if getattr(logger, "log_dir", None):
            path = Path(logger.log_dir) / tag / f"step_{step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_png(chw.contiguous(), str(path))


def adamw_cosine(task: L.LightningModule, *, fused: bool = False) -> dict:
    """AdamW with weight decay on matrices and embeddings only (not norms or biases), and nanoGPT's warmup-then-cosine
    schedule stepped every batch, from the task's hyperparameters (``learning_rate``, ``min_learning_rate``,
    ``warmup_steps``, ``lr_decay_steps``, ``weight_decay``, ``betas``)."""
    import torch

    from mmgen.tasks.language_model import cosine_schedule

    hp = task.hparams
    params = [p for p in task.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=hp.learning_rate, betas=tuple(hp.betas), fused=fused)
    ratio = hp.min_learning_rate / hp.learning_rate
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_schedule(
        step, warmup_steps=hp.warmup_steps, decay_steps=hp.lr_decay_steps, min_ratio=ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def load_weights(task: L.LightningModule, state_dict: dict, path: str | Path) -> None:
    """``init_from``: a checkpoint's weights into ``task``; weights of another architecture are a CheckpointError."""
    from mmgen.checkpoint import CheckpointError

    try:
        task.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"init_from {path}: its weights do not fit this model; use the checkpoint's "
                              f"architecture settings ({exc})".replace("\n", " ")) from None


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block, then as it was. A module already in eval mode (a loaded model) is left
    alone: switching walks every submodule, 1.3 ms each way for a Conformer-S-size recogniser on a 2-core CPU
    (``eval_switch_ms`` of ``benchmarks/asr_rtf.py``), a noticeable part of greedy decoding of a 1 s clip."""
    training = module.training
    if training:
        module.eval()
    try:
        yield
    finally:
        if training:
            module.train()
