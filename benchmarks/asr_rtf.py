"""Real-time factor of transcription against a bare torchaudio Conformer of the same size, in the same process.

    python benchmarks/asr_rtf.py --out benchmarks/results/asr_rtf_cpu.json [--ckpt trained.ckpt]

RTF = processing time / audio duration, the model already loaded (start-up excluded), median of ``--repeats``.
The peer is ``torchaudio.models.Conformer`` at Conformer-S size (d 144, 16 layers, 4 heads, FFN 576, kernel 31)
behind torchaudio's log-mel and a x4 convolutional subsampling (8.4 M parameters): its forward pass only. mmgen's
recogniser of the same encoder size is timed from waveform to text: log-mel, encoder, then greedy CTC, CTC prefix beam
search, attention beam search rescored with CTC, or joint CTC/attention beam search. Weights are random for the size
comparison; with random weights the attention decoder never says <eos>, so its output is held to
``--chars-per-second`` characters per second of audio (15: read English speech, e.g. LibriSpeech, averages about
that), the length a real transcript of the clip would have. With ``--ckpt`` the same decoders are also timed on real
recordings with a trained model, whose transcripts end where the model says. On a GPU the recogniser replays its
encoder as a CUDA graph per (batch, length bucket) (``SpeechRecognizer.graph_encoding``): the first call of a new
shape captures it and is reported apart (``ctc_greedy_first_call_rtf``), as is greedy CTC with the eager encoder.
On the CPU the beam searches' steps run as C++ kernels (``mmgen.kernels.native``, built before the timing starts);
the same searches with the PyTorch steps are reported apart (``attention_pytorch_steps_rtf``, ``joint_...``).
``eval_switch_ms`` is one switch of the recogniser between train and eval mode.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchaudio
from torch import nn

from mmgen.kernels.native import native_usable
from mmgen.tasks import SpeechRecognizer
from mmgen_audio import LogMelFrames
from mmgen_text import CharTokenizer


class ReferenceConformer(nn.Module):
    """torchaudio log-mel -> x4 conv subsampling -> torchaudio Conformer (Conformer-S size)."""

    def __init__(self, d: int = 144, layers: int = 16, heads: int = 4, ffn: int = 576, kernel: int = 31) -> None:
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(16000, n_fft=512, win_length=400, hop_length=160, n_mels=80)
        self.sub = nn.Sequential(nn.Conv2d(1, d, 3, 2, 1), nn.ReLU(), nn.Conv2d(d, d, 3, 2, 1), nn.ReLU())
        self.proj = nn.Linear(d * 20, d)
        self.conformer = torchaudio.models.Conformer(d, heads, ffn, layers, kernel)

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.mel(wave).clamp_min(1e-10).log().transpose(1, 2)  # shape: (b, frames, 80)
        x = self.sub(x[:, None])
        x = self.proj(x.permute(0, 2, 1, 3).flatten(2))
        frames = ((lengths // 160 + 2) // 2 + 1) // 2
        out, _ = self.conformer(x, frames.clamp(max=x.shape[1]))
        return out


DECODINGS = ("ctc_greedy", "ctc_beam", "attention", "joint")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(device: str) -> SpeechRecognizer:
    text = CharTokenizer()
    text.fit(["abcdefghijklmnopqrstuvwxyz '"])
    torch.manual_seed(0)
    return SpeechRecognizer({"source": LogMelFrames(16000, 80, conv_channels=144), "target": text}, d_model=144,
                            num_heads=4, encoder_layers=16, decoder_layers=4, encoder="conformer",
                            conv_kernel_size=31, dropout=0.0, beam_size=4, max_target_length=200).to(device).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--batch", type=int, default=8, help="clips per batch for the batched measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ckpt", default=None, help="a trained recogniser, timed on --files")
    p.add_argument("--files", nargs="*", default=[])
    p.add_argument("--chars-per-second", type=float, default=15.0,
                   help="transcript length the random-weight attention decoders run to")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ref = ReferenceConformer().to(device).eval()
    model = ours(device)
    native = device == "cpu" and native_usable()  # builds the C++ kernels (start-up, not timed)
    # What recognize() no longer pays on a model already in eval mode (mmgen.tasks.common.evaluating): a switch to
    # train mode and back, each walking every submodule.
    eval_switch_ms = timed(lambda: (model.train(), model.eval()), 50) / 2 * 1e3
    rows = []
    with torch.inference_mode():
        for seconds in a.seconds:
            for batch in (1, a.batch):
                n = int(seconds * 16000)
                wave = torch.randn(batch, n, device=device) * 0.1
                lengths = torch.full((batch,), n, device=device)
                audio = seconds * batch
                row = {"seconds": seconds, "batch": batch,
                       "reference_rtf": timed(lambda: ref(wave, lengths), a.repeats) / audio}

                def recognise(decoding: str) -> None:
                    feats = model.source.encode_batch(list(wave))  # one log-mel computation, where the model is
                    model.recognize(feats, decoding)

                model.hparams.max_target_length = row["output_chars"] = round(a.chars_per_second * seconds)
                if device == "cuda":  # a new shape: the encoder's CUDA graph is captured in this call
                    start = time.perf_counter()
                    recognise("ctc_greedy")
                    torch.cuda.synchronize()
                    row["ctc_greedy_first_call_rtf"] = (time.perf_counter() - start) / audio
                for decoding in DECODINGS:
                    row[f"{decoding}_rtf"] = timed(lambda: recognise(decoding), a.repeats) / audio
                if device == "cuda":  # the same without the encoder's graphs
                    model.graph_encoding = False
                    row["ctc_greedy_eager_encoder_rtf"] = timed(lambda: recognise("ctc_greedy"), a.repeats) / audio
                    model.graph_encoding = True
                else:  # the beam searches' PyTorch steps, in place of the C++ kernels
                    model.fused_decoding = False
                    for decoding in DECODINGS[2:]:
                        row[f"{decoding}_pytorch_steps_rtf"] = timed(lambda: recognise(decoding), a.repeats) / audio
                    model.fused_decoding = True
                row["greedy_vs_reference"] = row["ctc_greedy_rtf"] / row["reference_rtf"]
                for decoding in DECODINGS[1:]:
                    row[f"{decoding}_vs_reference"] = row[f"{decoding}_rtf"] / row["reference_rtf"]
                print(json.dumps(row), flush=True)
                rows.append(row)
    trained = []
    if a.ckpt and a.files:
        import soundfile as sf

        import mmgen

        m = mmgen.load(a.ckpt, device=device)
        audio = sum(sf.info(f).duration for f in a.files)
        # The peer on the same recordings (at its 16 kHz), batched the same way: sorted by length, padded.
        waves = sorted((torchaudio.functional.resample(m.source.load(f), m.source.spec.sample_rate, 16000)
                        for f in a.files), key=len)
        for batch in (1, a.batch):
            chunks = []
            for i in range(0, len(waves), batch):
                part = waves[i:i + batch]
                chunks.append((nn.utils.rnn.pad_sequence(part, batch_first=True).to(device),
                               torch.tensor([len(w) for w in part], device=device)))
            row = {"files": len(a.files), "audio_s": round(audio, 2), "batch": batch,
                   "reference_rtf": timed(torch.inference_mode()(lambda: [ref(w, n) for w, n in chunks]),
                                          a.repeats) / audio}
            for decoding in DECODINGS:
                row[f"{decoding}_rtf"] = timed(lambda: m.transcribe(a.files, decoding=decoding, batch_size=batch),
                                               a.repeats) / audio
            print(json.dumps(row), flush=True)
            trained.append(row)
    params = {"reference": sum(p.numel() for p in ref.parameters()),
              "ours_encoder": sum(p.numel() for n, p in model.named_parameters()
                                  if n.startswith(("net.frontend", "net.encoder"))),
              "ours_total": sum(p.numel() for p in model.parameters())}
    result = {"benchmark": "asr_rtf", "device": torch.cuda.get_device_name() if device == "cuda"
              else f"cpu ({torch.get_num_threads()} threads)", "host": platform.node(),
              "python": platform.python_version(), "torch": torch.__version__, "params": params,
              "native_kernels": native, "eval_switch_ms": eval_switch_ms, "random_weights": rows, "trained": trained, "ckpt": a.ckpt}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(params))


if __name__ == "__main__":
    main()
