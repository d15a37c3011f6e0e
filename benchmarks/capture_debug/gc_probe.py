"""Does freeing CUDA objects (a graph, an event, a pinned tensor) inside another capture invalidate it?"""
import gc
import sys

import torch


class Holder:
    pass


def garbage(kind: str) -> None:
    h = Holder()
    h.me = h  # a reference cycle: only the collector frees it
    if kind == "graph":
        x = torch.zeros(10, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            x + 1
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            h.y = x + 1
        g.replay()
        h.g = g
    elif kind == "event":
        h.ev = torch.cuda.Event()
        h.ev.record()
    elif kind == "pinned":
        h.t = torch.zeros(1 << 20, pin_memory=True)
        h.d = h.t.to("cuda", non_blocking=True)
    elif kind == "stream":
        h.s = torch.cuda.Stream()
    torch.cuda.synchronize()


kind = sys.argv[1]
garbage(kind)
x = torch.zeros(10, device="cuda")
x * 2
g2 = torch.cuda.CUDAGraph()
try:
    with torch.cuda.graph(g2, capture_error_mode="thread_local"):
        y = x * 2
        n = gc.collect()
    g2.replay()
    torch.cuda.synchronize()
    print(kind, "collected", n, "capture OK")
except Exception as e:  # noqa: BLE001
    print(kind, "capture FAILED:", str(e).splitlines()[0])
