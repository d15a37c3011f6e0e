"""Fused Triton kernels for the hot loops of decoding (one kernel where PyTorch launches dozens).

Written by hand because no maintained library fuses these exact steps: a whole pre-norm decoder step with a beam's
KV cache, and a beam search's bookkeeping. Each kernel has a PyTorch reference beside it (the code it replaces), and
tests compare the two; on a machine without a GPU the tests run the kernels in Triton's interpreter
(``TRITON_INTERPRET=1``, set by ``tests/conftest.py``).
"""

from __future__ import annotations

import os

import torch

__all__ = ["interpreted", "pow2", "triton_usable"]


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
