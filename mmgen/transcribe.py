"""``mmgen transcribe --ckpt PATH a.wav b.flac ...``: one line per file (``path<TAB>transcript``) on stdout, and the
real-time factor (transcription time over audio duration, the model already loaded) on stderr."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["transcribe_command"]


def transcribe_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmgen transcribe", description="Transcribe sound files with a speech "
                                "recognition checkpoint.", allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="checkpoint path")
    p.add_argument("files", nargs="+", help="WAV or FLAC files (any sample rate; stereo is mixed down)")
    p.add_argument("--decoding", choices=["ctc_greedy", "ctc_beam", "attention", "joint"], default=None,
                   help="default: the checkpoint's")
    p.add_argument("--beam-size", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--batch-size", type=int, default=16, help="files decoded together (batched by length)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    a = p.parse_args(argv)
    import soundfile as sf
    import torch

    from mmgen.api import load

    model = load(a.ckpt, device=a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not hasattr(model, "transcribe"):
        raise ValueError(f"{a.ckpt} is a {type(model).__name__} checkpoint; transcribe needs a speech recogniser")
    if model.device.type == "cpu" and model.fused_decoding:
        from mmgen.kernels.native import native_usable

        native_usable()  # start-up, not timed: the C++ kernels' first build on a machine takes tens of seconds
    start = time.perf_counter()
    texts = model.transcribe(a.files, decoding=a.decoding, beam_size=a.beam_size, batch_size=a.batch_size)
    elapsed = time.perf_counter() - start
    for path, text in zip(a.files, texts):
        print(f"{path}\t{text}")
    seconds = sum(sf.info(f).duration for f in a.files)
    print(f"[{len(a.files)} file(s), {seconds:.2f} s of audio in {elapsed:.2f} s: real-time factor "
          f"{elapsed / max(seconds, 1e-9):.4f}]", file=sys.stderr)
    return 0
