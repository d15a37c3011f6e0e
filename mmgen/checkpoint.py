"""mmgen's part of a Lightning checkpoint: each modality's plugin, arguments and JSON state under ``"mmgen"``.

Nothing is pickled: ``torch.load(path, weights_only=True)`` opens every mmgen checkpoint.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from mmgen import plugins
from mmgen.modality import Modality

__all__ = ["FORMAT", "CheckpointError", "modality_record", "read", "restore_modalities", "task_class"]

KEY = "mmgen"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, not mmgen's, or made by a plugin that is not installed."""


def modality_record(modality: Modality) -> dict[str, Any]:
    """What rebuilds a modality elsewhere: its registered name, owning plugin and distribution, args and state."""
    reg = plugins.registration_of(type(modality))
    return {
        "name": type(modality).__name__,
        "class_path": f"{type(modality).__module__}.{type(modality).__qualname__}",
        "plugin": reg.plugin if reg else None,
        "distribution": reg.distribution if reg else None,
        "version": reg.version if reg else None,
        "init_args": modality.init_args(),
        "state": modality.state_dict(),
    }


def record(task: Any, modalities: dict[str, Modality]) -> dict[str, Any]:
    cls = type(task)
    return {"format": FORMAT, "task": f"{cls.__module__}.{cls.__qualname__}",
            "modalities": {role: modality_record(m) for role, m in modalities.items()}}


def read(path: str | Path) -> dict[str, Any]:
    """Open a checkpoint with ``weights_only=True`` and check it carries mmgen's record."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    meta = ckpt.get(KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "modalities" not in meta:
        raise CheckpointError(f"{path} is not an mmgen checkpoint (no {KEY!r} record)")
    if meta.get("format", 0) > FORMAT:
        raise CheckpointError(f"{path} has mmgen checkpoint format {meta['format']}; this mmgen reads up to "
                              f"{FORMAT}: upgrade mmgen")
    return ckpt


def restore_modality(record: dict[str, Any], *, into: Modality | None = None) -> Modality:
    """Rebuild a modality from its record (or load the state into ``into``); a missing plugin names its package."""
    if into is None:
        try:
            cls = plugins.get_modality(record["name"])
        except plugins.PluginError:
            dist = record.get("distribution") or "the plugin that provides it"
            version = f" (the checkpoint was made with version {record['version']})" if record.get("version") else ""
            raise CheckpointError(f"this checkpoint needs modality {record['name']!r} from plugin "
                                  f"{record.get('plugin')!r}: install package {dist!r}{version}") from None
        into = cls(**record["init_args"])
    elif type(into).__name__ != record["name"]:
        raise CheckpointError(f"checkpoint modality is {record['name']}, but this run uses {type(into).__name__}")
    into.load_state_dict(record["state"])
    return into


def restore_modalities(meta: dict[str, Any], into: dict[str, Modality] | None = None) -> dict[str, Modality]:
    into = into or {}
    return {role: restore_modality(rec, into=into.get(role)) for role, rec in meta["modalities"].items()}


def task_class(meta: dict[str, Any]) -> type:
    module, _, name = meta["task"].rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint task {meta['task']} cannot be imported ({exc})") from None
