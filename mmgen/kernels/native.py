"""C++ kernels for decoding on the CPU, built on first use with the machine's C++ compiler.

On a GPU a decoding step is replayed as a CUDA graph of a few Triton kernels. On the CPU there is no such replay: a
beam step in PyTorch is a few hundred tiny operators, each costing microseconds of dispatch whatever its size, so a
batch-1 step of a 4-layer decoder took 1.4–2.1 ms of which its matrix products were 0.4 ms, and the joint search's
other work (140 operators) 0.5 ms more (``benchmarks/asr_cpu_step_probe.py``,
``benchmarks/native_beam_probe.py``); ``torch.compile`` of the step gave no gain. The kernels under ``csrc/`` do the
same steps as plain loops over the tensors' memory. Written by hand for the same reason as the Triton ones: no maintained
library runs a whole decoder step with a beam's cache, or a joint CTC/attention beam step. Each has a PyTorch
reference (the code it replaces), and tests compare the two.

The sources are compiled into one library by :func:`torch.utils.cpp_extension.load` (ninja, the C++ compiler torch
was built for, cached under ``TORCH_EXTENSIONS_DIR``, one build per source version and machine), registering the
operators ``torch.ops.mmgen_cpu.*``. Where no compiler is found, :func:`native_usable` says False once with the
reason as a warning, and decoding runs the PyTorch code. ``MMGEN_NATIVE=0`` turns the kernels off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["native_ops", "native_usable"]

SOURCES = Path(__file__).parent / "csrc"
_state: dict[str, object] = {}


def _build() -> None:
    # Importing cpp_extension on a machine with a CUDA toolkit folder but no GPU logs "No CUDA runtime is found",
    # which says nothing about these CPU-only kernels: it is kept out of the user's output.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        quiet.setLevel(level)

    sources = sorted(SOURCES.glob("*.cpp"))
    digest = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    # -march=native: the library is built where it runs; the name keeps builds for other machines apart.
    # -fopenmp-simd: the `omp simd` loops (sums) may be vectorised, which reorders their additions.
    # MMGEN_NATIVE_CFLAGS: more flags, for debugging (e.g. "-march=x86-64-v3 -g", to run under valgrind, which has no
    # AVX-512).
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd"] + os.environ.get("MMGEN_NATIVE_CFLAGS",
                                                                                         "").split()
    digest.update(f"{torch.__version__} {platform.machine()} {torch.backends.cpu.get_cpu_capability()} "
                  f"{flags}".encode())
    name = f"mmgen_cpu_{digest.hexdigest()[:12]}"
    try:  # say so when this machine builds them (seconds of silence otherwise); a private helper of torch's
        from torch.utils.cpp_extension import _get_build_directory

        if not list(Path(_get_build_directory(name, verbose=False)).glob("*.so")):
            print("mmgen: building the C++ decoding kernels for this machine (once, about 30 s)", file=sys.stderr)
    except Exception:  # noqa: BLE001 - only the message depends on it
        pass
    load(name=name, sources=[str(p) for p in sources], extra_cflags=flags,
         extra_ldflags=[f for f in flags if f.startswith("-fsanitize")], is_python_module=False, verbose=False)


def native_usable() -> bool:
    """Whether the C++ kernels are built (building them on the first call, tens of seconds) and not turned off."""
    if os.environ.get("MMGEN_NATIVE", "1") == "0":
        return False
    if "ok" not in _state:
        try:
            _build()
            _state["ok"] = True
        except Exception as exc:  # no compiler, no ninja, a failed build: decode with the PyTorch code
            _state["ok"] = False
            message = str(exc).strip()
            errors = [line for line in message.splitlines() if "error" in line.lower()]
            detail = "\n".join(errors[:5]) if errors else message[-1000:]  # the compiler's errors, not its command
            warnings.warn(f"mmgen's C++ decoding kernels could not be built ({type(exc).__name__}: {detail}); CPU "
                          "decoding runs the slower PyTorch steps. A C++ compiler and ninja (pip install ninja) are "
                          "needed; MMGEN_NATIVE=0 silences this.", stacklevel=2)
    return bool(_state["ok"])


def native_ops():
    """``torch.ops.mmgen_cpu``, building the kernels first if needed; raises where they cannot be built."""
    if not native_usable():
        raise RuntimeError("mmgen's C++ decoding kernels are not available (see the warning above, or MMGEN_NATIVE)")
    return torch.ops.mmgen_cpu
