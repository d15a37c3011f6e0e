# Debugging aid (not part of mmgen): report Triton compiles and module loads that happen during a CUDA graph capture,
# and the shapes of a beam search whose capture fails.
import os
import sys
import traceback

if os.environ.get("MMGEN_CAPTURE_DEBUG"):
    import builtins

    _real_import = builtins.__import__
    _done = {"triton": False, "beam": False}

    def _capturing():
        import torch
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

    def _install_triton():
        import triton
        from triton import knobs

        def on_compile(*args, **kwargs):
            if _capturing():
                print("CAPDEBUG triton compile during capture:", kwargs.get("repr") or kwargs.get("key"),
                      file=sys.stderr, flush=True)
                traceback.print_stack(limit=12, file=sys.stderr)
            return False

        def on_load(*args, **kwargs):
            if _capturing():
                print("CAPDEBUG triton kernel load during capture:", args, kwargs, file=sys.stderr, flush=True)
                traceback.print_stack(limit=12, file=sys.stderr)

        knobs.runtime.jit_cache_hook = on_compile
        knobs.runtime.kernel_load_start_hook = on_load

    def _install_beam():
        import mmgen.beam_search as bs
        run = bs.BeamSearch.run

        def wrapped(self, *a, **kw):
            try:
                return run(self, *a, **kw)
            except Exception:
                print("CAPDEBUG search failed: b", self.b, "k", self.k, "max_len", self.max_len,
                      {n: (tuple(t.shape), str(t.dtype)) for n, t in vars(self).items() if hasattr(t, "shape")},
                      {n: v for n, v in vars(self).items() if isinstance(v, (int, float, bool, str))},
                      file=sys.stderr, flush=True)
                raise
        bs.BeamSearch.run = wrapped

    def _import(name, *a, **kw):
        mod = _real_import(name, *a, **kw)
        try:
            if not _done["triton"] and "triton" in sys.modules and hasattr(sys.modules["triton"], "knobs"):
                _done["triton"] = True
                _install_triton()
            if not _done["beam"] and "mmgen.beam_search" in sys.modules and \
                    hasattr(sys.modules["mmgen.beam_search"], "BeamSearch"):
                _done["beam"] = True
                _install_beam()
        except Exception as exc:  # noqa: BLE001
            print("CAPDEBUG hook failed", exc, file=sys.stderr)
        return mod

    builtins.__import__ = _import
