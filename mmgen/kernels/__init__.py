"""Fused Triton kernels for the hot loops of decoding (one kernel where PyTorch launches dozens).

Written by hand because no maintained library fuses these exact steps: a whole pre-norm decoder step with a beam's
KV cache, and a beam search's bookkeeping. Each kernel has a PyTorch reference beside it (the code it replaces), and
tests compare the two; on a machine without a GPU the tests run the kernels in Triton's interpreter
(``TRITON_INTERPRET=1``, set by ``tests/conftest.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")

__all__ = ["interpreted", "per_weights", "pow2", "triton_usable", "weights_key"]


def triton_usable(device: torch.device | str) -> bool:
    """Whether the kernels run by default for tensors on ``device``: a CUDA device with Triton installed. Elsewhere
    they run only when asked for explicitly, under Triton's interpreter (``TRITON_INTERPRET=1``), as tests do."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (on the CPU, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pow2(n: int, least: int = 1) -> int:
    """The smallest power of two at least ``n`` and ``least``: a Triton block size (tiles are powers of 2)."""
    return max(least, 1 << max(n - 1, 0).bit_length())


def weights_key(params: Iterable[torch.Tensor]) -> tuple:
    """What changes when a parameter does: each one's identity, address and version counter (an optimiser step moves
    the counter, ``.to()`` the address). Inference tensors (a model built under ``inference_mode``) keep no counter;
    they change in place only under ``inference_mode``, which training does not use."""
    return tuple((id(p), p.data_ptr(), -1 if p.is_inference() else p._version) for p in params)


def per_weights(module: nn.Module, name: str, build: Callable[[nn.Module], T]) -> T:
    """``build(module)``, kept on the module as ``name`` until one of its parameters changes (:func:`weights_key`):
    what a kernel derives from the weights (stacked, packed, transposed) is built once, not per search."""
    key = weights_key(module.parameters())
    cached = module.__dict__.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, build(module))
        module.__dict__[name] = cached
    return cached[1]
