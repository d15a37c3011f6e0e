"""CUDA graphs for inference over padded batches whose lengths vary from call to call.

A small batch through a deep network is many small kernels, and on a GPU their launches rather than their arithmetic
take the time: the Conformer-S encoder over one 10 s clip is ~20 ms of launches on an H100 for a few ms of work. A
CUDA graph replays them all at once. Graphs need fixed shapes, so :class:`PaddedGraphs` pads the time axis up to a
multiple of ``bucket`` and keeps one graph per (batch size, padded length); a network that masks its padding gives
the same result either way.
"""

from __future__ import annotations

import gc
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PaddedGraphs", "capture", "capturing"]


@contextmanager
def capture(graph: torch.cuda.CUDAGraph, pool: Any = None) -> Iterator[None]:
    """``torch.cuda.graph(graph, pool)`` as every capture in mmgen takes it, safe from two things that invalidate a
    capture (cudaErrorStreamCaptureInvalidated; validation searches in connected-digit training runs stopped so):

    - PyTorch's default error mode, "global", forbids unsafe CUDA calls in every thread while a capture runs, and a
      thread allocating pinned memory (a DataLoader's pin-memory thread does) breaks it (a GPU test shows it);
      "thread_local" restricts only this thread.
    - Python's cyclic garbage collector, run when the capture's own code allocates objects, may free an old search
      kept in a reference cycle, and its CUDA graph with it, which a capture forbids
      (``benchmarks/capture_debug/gc_probe.py`` shows it). The collector waits until the capture ends. (The kernel
      wrappers now hold their search weakly, so a dropped search is freed at once, outside any capture; the pause
      covers whatever else a cycle may hold.)
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            yield
    finally:
        if collecting:
            gc.enable()


def capturing(t: Tensor) -> bool:
    """Whether ``t``'s device is being captured into a CUDA graph: code that asks the host about a tensor's values
    (``bool(mask.all())``) must not, and takes the path that works for every value instead."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class PaddedGraphs:
    """Runs ``fn(x, mask)`` as CUDA graph replays, ``x`` (b, t, ...) and ``mask`` (b, t) True on real frames.

    The inputs are copied into static buffers padded to a multiple of ``bucket`` frames (padding zero, mask False);
    the first call of each (b, padded length, feature shape, dtype, autocast) runs ``fn`` once eagerly and captures
    it, later calls replay the capture. At most ``max_graphs`` graphs are kept (least recently used dropped); all
    share one memory pool, which is safe because each call's outputs are read before the next replay.

    ``fn`` must give the same result on an input padded further, must not synchronise with the host while being
    captured (see :func:`capturing`), and must read its weights from ``module``: the graphs are dropped when a
    parameter or buffer of ``module`` moves (``.cpu()``/``.cuda()``, a dtype change); values changed in place
    (an optimiser step, ``load_state_dict``) are read by the replays.

    Returns ``fn``'s outputs, views of the graph's buffers over the padded length, overwritten by the next call.
    """

    def __init__(self, module: nn.Module, fn: Callable[[Tensor, Tensor], tuple[Tensor, ...]], bucket: int = 64,
                 max_graphs: int = 16) -> None:
        self.module, self.fn, self.bucket, self.max_graphs = module, fn, bucket, max_graphs
        self.graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, tuple[Tensor, ...]]] = OrderedDict()
        self.captures = 0  # graphs captured so far (a new shape costs one eager call and a capture)
        self._pool = None
        self._weights: tuple[int, ...] = ()

    def __call__(self, x: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        weights = tuple(t.data_ptr() for t in itertools.chain(self.module.parameters(), self.module.buffers()))
        if weights != self._weights:  # moved: the captured kernels would read freed memory
            self.graphs.clear()
            self._pool = None  # released with the last graph that used it: a new capture needs a new one
            self._weights = weights
        b, t = mask.shape
        padded = -(-t // self.bucket) * self.bucket
        autocast = torch.is_autocast_enabled("cuda")
        key = (b, padded, tuple(x.shape[2:]), x.dtype, autocast,
               torch.get_autocast_dtype("cuda") if autocast else None)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(x, mask, padded)
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph, static_x, static_mask, outputs = entry
        static_x[:, :t].copy_(x)
        static_x[:, t:].zero_()
        static_mask[:, :t].copy_(mask)
        static_mask[:, t:].fill_(False)
        graph.replay()
        return outputs

    def _capture(self, x: Tensor, mask: Tensor, padded: int) -> tuple:
        b, t = mask.shape
        static_x = x.new_zeros(b, padded, *x.shape[2:])
        static_mask = mask.new_zeros(b, padded)
        static_x[:, :t] = x
        static_mask[:, :t] = mask
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):  # one eager call on a side stream first, as capture asks
            self.fn(static_x, static_mask)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with capture(graph, self._pool):
            outputs = tuple(self.fn(static_x, static_mask))
        self.captures += 1
        return graph, static_x, static_mask, outputs
