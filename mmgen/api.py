"""The Python face of mmgen: ``mmgen.load(checkpoint)`` returns a ready task with ``generate()`` and friends."""

from __future__ import annotations

from pathlib import Path

import torch

from mmgen import checkpoint as ckpt_io

__all__ = ["load"]


def load(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a trained task from an mmgen checkpoint, in eval mode on ``device``.

    The checkpoint opens with ``weights_only=True``; each modality is rebuilt from its registered plugin (a missing
    plugin is reported as the package to install) and its JSON state.
    """
    ckpt = ckpt_io.read(path)
    meta = ckpt[ckpt_io.KEY]
    modalities = ckpt_io.restore_modalities(meta)
    cls = ckpt_io.task_class(meta)
    hparams = ckpt.get("hyper_parameters", {})
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}  # LightningCLI's own bookkeeping
    model = cls(modalities=modalities, **hparams)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()
