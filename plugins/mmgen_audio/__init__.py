"""mmgen's built-in audio plugin: sound files -> per-utterance normalised log-mel frames -> subsampled tokens.

The processor (:class:`LogMelFrames`) reads WAV/FLAC with soundfile, mixes to mono, resamples with
``torchaudio.functional.resample`` and computes log-mel features with ``torchaudio.transforms.MelSpectrogram``; the
adapter (:class:`ConvSubsampling`) applies SpecAugment (torchaudio's frequency and time masking, in training only) and
two stride-2 convolutions (x4 in time) into tokens of width d, with padding masks.

Registered through the entry-point group ``mmgen`` in mmgen's own ``pyproject.toml``, as any third-party plugin is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import Tensor, nn

from mmgen.graphs import capturing
from mmgen.hookspecs import hookimpl
from mmgen.modality import AudioFileError, AudioModality, AudioSpec, Batch

__all__ = ["ConvSubsampling", "LogMelFrames", "read_audio"]

LOG_FLOOR = 1e-10  # power floor before the log: silence maps to a finite value


def _wav_shortfall(path: Path) -> tuple[int, int] | None:
    """For a RIFF/WAVE file whose data chunk is cut short: (bytes its header promises, bytes present); else None.

    libsndfile quietly reads what is there, so a truncated download would train on half a clip unnoticed.
    """
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        size = path.stat().st_size
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk = f.read(8)
            declared = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                present = size - pos - 8
                unknown = declared in (0, 0xFFFFFFFF)  # streaming writers leave the size open
                return (declared, present) if not unknown and present < declared else None
            pos += 8 + declared + (declared & 1)
    return None


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Samples (n, channels) float32 and the sample rate of a sound file soundfile can read (WAV, FLAC, OGG...)."""
    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"audio file not found: {path}")
    if path.stat().st_size == 0:
        raise AudioFileError(f"audio file {path} is empty (0 bytes); accepted: WAV or FLAC audio")
    try:
        with sf.SoundFile(path) as f:
            expected = f.frames
            samples = f.read(dtype="float32", always_2d=True)
            rate = f.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioFileError(f"cannot read audio file {path}: {exc}; accepted: WAV or FLAC audio") from None
    short = _wav_shortfall(path)
    if short is not None or len(samples) < expected:
        promised, present = short or (expected, len(samples))
        unit = "bytes of audio" if short else "samples"
        raise AudioFileError(f"audio file {path} is truncated: its header promises {promised} {unit}, the file "
                             f"holds {present}")
    if len(samples) == 0:
        raise AudioFileError(f"audio file {path} has no samples; accepted: a clip with sound")
    return samples, rate


class LogMelFrames(AudioModality):
    """Log-mel feature frames of mono audio at a fixed sample rate, normalised per utterance.

    Args:
        sample_rate: the model's rate; files at other rates are resampled, stereo is mixed down.
        n_mels: mel bands per frame.
        win_ms: analysis window in milliseconds.
        hop_ms: frame hop in milliseconds (the frame rate is ``1000 / hop_ms``).
        n_fft: FFT size; default the next power of two at or above the window.
        f_min: lowest frequency of the mel filterbank, in Hz.
        f_max: highest frequency of the mel filterbank, in Hz; default half the sample rate.
        top_db: floor of the log-mel at this many dB below the utterance's loudest bin (none: no floor beyond
            numerical safety). Recordings whose silence or empty bands sit at very different levels (a noise gate,
            a low-pass microphone) then look alike there.
        normalize: ``band``: each mel band to zero mean and unit variance over the utterance's frames; ``utterance``:
            each band to zero mean, all scaled by one standard deviation, so a band with no speech in it stays
            flat instead of having its noise blown up to unit variance.
        spec_augment: SpecAugment in training (frequency and time masking; off in evaluation).
        freq_warp: largest relative frequency warp of the training augmentation (VTLP-like vocal-tract-length
            perturbation: each utterance's spectrum is read at frequencies scaled by a factor drawn from
            ``[1 - freq_warp, 1 + freq_warp]``); 0 turns it off.
        freq_masks: frequency masks per utterance.
        freq_mask_width: largest frequency mask, in mel bands.
        time_masks: time masks per utterance.
        time_mask_width: largest time mask, in frames.
        time_mask_ratio: largest fraction of a batch's frames one time mask may cover.
        conv_channels: channels of the two subsampling convolutions.
    """

    def __init__(self, sample_rate: int = 16000, n_mels: int = 80, win_ms: float = 25.0, hop_ms: float = 10.0,
                 n_fft: int | None = None, f_min: float = 0.0, f_max: float | None = None,
                 top_db: float | None = None, normalize: Literal["band", "utterance"] = "band",
                 spec_augment: bool = True, freq_warp: float = 0.0, freq_masks: int = 2,
                 freq_mask_width: int = 15, time_masks: int = 2, time_mask_width: int = 20,
                 time_mask_ratio: float = 0.1, conv_channels: int = 144) -> None:
        if sample_rate <= 0 or n_mels <= 0 or win_ms <= 0 or hop_ms <= 0:
            raise ValueError("sample_rate, n_mels, win_ms and hop_ms must be positive")
        f_top = f_max if f_max is not None else sample_rate / 2
        if not 0 <= f_min < f_top <= sample_rate / 2:
            raise ValueError(f"f_min={f_min}, f_max={f_max}; accepted: 0 <= f_min < f_max <= sample_rate / 2 "
                             f"({sample_rate / 2:g})")
        if top_db is not None and top_db <= 0:
            raise ValueError(f"top_db={top_db}; accepted: a positive number of decibels, or null")
        if normalize not in ("band", "utterance"):
            raise ValueError(f"normalize={normalize!r}; accepted: 'band', 'utterance'")
        if not 0 <= freq_warp < 0.5:
            raise ValueError(f"freq_warp={freq_warp}; accepted: 0 <= freq_warp < 0.5")
        self.f_min, self.f_max, self.top_db, self.normalize = f_min, f_max, top_db, normalize
        self.freq_warp = freq_warp
        self.sample_rate, self.n_mels, self.win_ms, self.hop_ms = sample_rate, n_mels, win_ms, hop_ms
        self.win_length = round(sample_rate * win_ms / 1000)
        self.hop_length = round(sample_rate * hop_ms / 1000)
        self.n_fft = n_fft if n_fft is not None else 2 ** math.ceil(math.log2(self.win_length))
        if self.n_fft < self.win_length:
            raise ValueError(f"n_fft={self.n_fft} is shorter than the window of {self.win_length} samples")
        self.spec_augment, self.freq_masks, self.freq_mask_width = spec_augment, freq_masks, freq_mask_width
        self.time_masks, self.time_mask_width, self.time_mask_ratio = time_masks, time_mask_width, time_mask_ratio
        self.conv_channels = conv_channels
        self._mels: dict[str, nn.Module] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mels": {}}  # rebuilt on first use in a worker

    @property
    def spec(self) -> AudioSpec:
        return AudioSpec(sample_rate=self.sample_rate, num_features=self.n_mels,
                         frame_rate=self.sample_rate / self.hop_length, subsampling=4)

    # ---- processing ----
    def load(self, path: str | Path) -> Tensor:
        samples, rate = read_audio(path)
        wave = torch.from_numpy(samples.mean(axis=1))  # mix down to mono
        if rate != self.sample_rate:
            wave = torchaudio.functional.resample(wave, rate, self.sample_rate)
        return wave

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length + 1  # MelSpectrogram's centred frames

    def output_lengths(self, frames: Tensor) -> Tensor:
        return ConvSubsampling.output_lengths(frames)

    def _check_length(self, num_samples: int, name: str | None = None) -> None:
        if num_samples <= self.n_fft // 2:  # centred frames reflect n_fft // 2 samples at each end
            raise AudioFileError(f"{f'audio file {name}: ' if name else ''}clip of {num_samples} samples is shorter "
                                 f"than half an FFT window (at least {self.n_fft // 2 + 1} samples at "
                                 f"{self.sample_rate} Hz, {self.win_ms} ms windows)")

    def _mel(self, device: torch.device) -> nn.Module:
        mel_fn = self._mels.get(str(device))
        if mel_fn is None:  # one transform per device: a waveform on the GPU gets its features there
            mel_fn = self._mels[str(device)] = torchaudio.transforms.MelSpectrogram(
                sample_rate=self.sample_rate, n_fft=self.n_fft, win_length=self.win_length,
                hop_length=self.hop_length, n_mels=self.n_mels, f_min=self.f_min, f_max=self.f_max,
                power=2.0).to(device)
        return mel_fn

    def _normalise(self, logmel: Tensor, mask: Tensor | None) -> Tensor:
        """Log-mel (b, frames, n_mels) -> floored and normalised over each utterance's real frames (``mask`` (b,
        frames), None when all are real); padded frames come out 0."""
        floor = None if self.top_db is None else self.top_db * math.log(10) / 10
        bands = 1 if self.normalize == "band" else (1, 2)
        if mask is None:  # every frame real: plain reductions, fewer kernels
            if floor is not None:
                logmel = logmel.clamp_min(logmel.amax(dim=(1, 2), keepdim=True) - floor)
            centred = logmel - logmel.mean(dim=1, keepdim=True)
            return centred / (centred.square().mean(dim=bands, keepdim=True).sqrt() + 1e-5)
        real = mask[..., None]
        count = real.sum(dim=1, keepdim=True).to(logmel.dtype)  # shape: (b, 1, 1)
        if floor is not None:
            logmel = logmel.clamp_min(logmel.masked_fill(~real, -math.inf).amax(dim=(1, 2), keepdim=True) - floor)
        centred = (logmel - (logmel * real).sum(dim=1, keepdim=True) / count) * real
        var = centred.square().sum(dim=bands, keepdim=True) / (count * (1 if bands == 1 else logmel.shape[2]))
        return centred / (var.sqrt() + 1e-5)

    def features(self, wave: Tensor) -> Tensor:
        """Mono waveform (n,) at the model's rate -> normalised log-mel frames (frames, n_mels)."""
        self._check_length(wave.numel())
        mel = self._mel(wave.device)(wave.float())  # shape: (n_mels, frames)
        return self._normalise(mel.clamp_min(LOG_FLOOR).log().T[None], None)[0]

    def encode_batch(self, waves: Sequence[Tensor], names: Sequence[str] | None = None, *,
                     one_pass: bool | None = None) -> Batch:
        """With ``one_pass`` (the default on a GPU), one log-mel computation for the whole batch, where one clip at a
        time costs a dozen kernel launches per clip: each clip gets its own reflection at its end, as it would alone,
        before the batch is zero-padded, so its real frames read only its own samples. On the CPU one clip at a time
        is as fast for short clips and faster for long ones (``benchmarks/features_probe.py``)."""
        if one_pass is None:
            one_pass = bool(waves) and waves[0].is_cuda
        if not one_pass:
            return super().encode_batch(waves, names)
        for i, wave in enumerate(waves):
            self._check_length(wave.numel(), names[i] if names else None)
        pad = self.n_fft // 2
        x = nn.utils.rnn.pad_sequence([torch.cat([w.float(), w.float().flip(0)[1:pad + 1]]) for w in waves],
                                      batch_first=True)
        lengths = [self.num_frames(w.numel()) for w in waves]
        frames = max(lengths)
        mel = self._mel(x.device)(x)[..., :frames]  # shape: (b, n_mels, frames)
        mask = (torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]).to(x.device)
        logmel = mel.clamp_min(LOG_FLOOR).log().transpose(1, 2)
        return Batch(self._normalise(logmel, None if min(lengths) == frames else mask), mask)

    def encode(self, item: str | Path | tuple[Tensor, int]) -> Tensor:
        """A file path, or ``(waveform, sample_rate)`` with waveform (n,) or (channels, n) -> (frames, n_mels) on the
        waveform's device."""
        if isinstance(item, tuple):
            wave, rate = item
            wave = torch.as_tensor(wave, dtype=torch.float32)
            if wave.dim() == 2:
                wave = wave.mean(dim=0)
            if rate != self.sample_rate:
                wave = torchaudio.functional.resample(wave, rate, self.sample_rate)
            return self.features(wave)
        wave = self.load(item)
        try:
            return self.features(wave)
        except AudioFileError as exc:
            raise AudioFileError(f"audio file {item}: {exc}") from None

    def render(self, output: Tensor) -> np.ndarray:
        """Feature frames (frames, n_mels) -> a grey image (n_mels, frames) uint8, low frequencies at the bottom."""
        x = output.detach().float().cpu().T.flip(0)
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
        return (x * 255).round().to(torch.uint8).numpy()

    # ---- model side ----
    def adapter(self, d_model: int) -> nn.Module:
        augment = None
        if self.spec_augment:
            warp = None
            if self.freq_warp > 0:
                warp = FrequencyWarp(self.n_mels, self.f_min, self.f_max or self.sample_rate / 2, self.freq_warp)
            augment = SpecAugment(self.freq_masks, self.freq_mask_width, self.time_masks, self.time_mask_width,
                                  self.time_mask_ratio, warp)
        return ConvSubsampling(self.n_mels, d_model, self.conv_channels, augment)

    def head(self, d_model: int, adapter: nn.Module | None = None) -> nn.Module:
        raise NotImplementedError("LogMelFrames is an input modality (speech recognition's source); it has no "
                                  "output head")


class FrequencyWarp(nn.Module):
    """VTLP-like frequency warping of log-mel frames, a fresh factor for every utterance (training augmentation).

    Band ``i`` of the output takes the input's value at ``alpha`` times the band's centre frequency, interpolated
    linearly between band centres on the mel scale (edges repeat), with ``alpha`` uniform in ``[1 - w, 1 + w]``:
    a longer or shorter vocal tract moves every formant by about one factor. Written here because torchaudio has
    no vocal-tract-length perturbation; warping the mel frames, instead of the spectrum before the filterbank,
    keeps it on the model's device and costs one gather.
    """

    def __init__(self, n_mels: int, f_min: float, f_max: float, max_warp: float) -> None:
        super().__init__()
        self.max_warp = max_warp
        mel_lo, mel_hi = (2595.0 * math.log10(1.0 + f / 700.0) for f in (f_min, f_max))  # torchaudio's HTK scale
        step = (mel_hi - mel_lo) / (n_mels + 1)
        centres_mel = mel_lo + step * torch.arange(1, n_mels + 1, dtype=torch.float64)
        self.register_buffer("centres_hz", 700.0 * (10 ** (centres_mel / 2595.0) - 1.0), persistent=False)
        self.mel_lo, self.step = mel_lo, step

    def forward(self, x: Tensor, alpha: float | Tensor | None = None) -> Tensor:
        """x (b, frames, n_mels) -> the same, each utterance warped by its own random factor, or by ``alpha`` (a
        number, or one per utterance) where given."""
        b, _, f = x.shape
        if alpha is None:
            alpha = 1.0 + (torch.rand(b, 1, device=x.device, dtype=torch.float64) * 2 - 1) * self.max_warp
        else:
            alpha = torch.as_tensor(alpha, device=x.device, dtype=torch.float64).reshape(-1, 1).expand(b, 1)
        source_mel = 2595.0 * torch.log10(1.0 + self.centres_hz[None] * alpha / 700.0)  # shape: (b, f)
        pos = ((source_mel - self.mel_lo) / self.step - 1).clamp(0, f - 1).to(x.dtype)  # fractional band index
        lo = pos.floor().long().clamp(max=f - 2) if f > 1 else pos.long()
        frac = (pos - lo)[:, None, :]
        hi = (lo + 1).clamp(max=f - 1)
        take = lambda idx: x.gather(2, idx[:, None, :].expand_as(x))  # noqa: E731
        return take(lo) * (1 - frac) + take(hi) * frac


class SpecAugment(nn.Module):
    """SpecAugment's frequency and time masking (torchaudio's transforms), a fresh mask for every utterance, after an
    optional frequency warp."""

    def __init__(self, freq_masks: int, freq_mask_width: int, time_masks: int, time_mask_width: int,
                 time_mask_ratio: float, warp: nn.Module | None = None) -> None:
        super().__init__()
        self.warp = warp
        self.freq = nn.ModuleList(torchaudio.transforms.FrequencyMasking(freq_mask_width, iid_masks=True)
                                  for _ in range(freq_masks))
        self.time = nn.ModuleList(torchaudio.transforms.TimeMasking(time_mask_width, iid_masks=True,
                                                                    p=time_mask_ratio) for _ in range(time_masks))

    def forward(self, x: Tensor) -> Tensor:
        """x (b, frames, n_mels) -> the same with masked bands and spans set to 0 (the normalised mean)."""
        if self.warp is not None:
            x = self.warp(x)
        y = x.transpose(1, 2)[:, None]  # shape: (b, 1, n_mels, frames), torchaudio's layout
        for mask in (*self.freq, *self.time):
            y = mask(y)
        return y[:, 0].transpose(1, 2)


class ConvSubsampling(nn.Module):
    """Feature frames (b, t, f) -> tokens (b, ceil(ceil(t/2)/2), d): optional SpecAugment, two 3x3 stride-2
    convolutions with ReLU, and a linear projection. Padded frames are zeroed before each convolution, so an
    utterance gives the same tokens alone and inside a padded batch."""

    def __init__(self, num_features: int, d_model: int, channels: int, augment: nn.Module | None = None) -> None:
        super().__init__()
        self.augment = augment
        self.conv1 = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        f = (num_features + 1) // 2
        self.proj = nn.Linear(channels * ((f + 1) // 2), d_model)

    @staticmethod
    def output_lengths(frames: Tensor) -> Tensor:
        return ((frames + 1) // 2 + 1) // 2

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """x (b, t, f), mask (b, t) True on real frames -> tokens (b, t', d), mask (b, t')."""
        if self.augment is not None and self.training:
            x = self.augment(x)
        lengths = mask.sum(dim=1)
        padded = capturing(x) or not bool(mask.all())  # without padding there is nothing to zero
        if padded:
            x = x * mask[..., None]
        x = torch.relu(self.conv1(x[:, None]))  # shape: (b, c, t/2, f/2)
        if padded:
            half = (lengths + 1) // 2
            keep = (torch.arange(x.shape[2], device=x.device)[None, :] < half[:, None])[:, None, :, None]
            x = x * keep if torch.is_grad_enabled() else x.mul_(keep)  # in place where autograd does not need x
        x = torch.relu(self.conv2(x))  # shape: (b, c, t', f')
        out = self.output_lengths(lengths)
        x = self.proj(x.permute(0, 2, 1, 3).flatten(2))  # shape: (b, t', d)
        out_mask = torch.arange(x.shape[1], device=x.device)[None, :] < out[:, None]
        return (x * out_mask[..., None] if padded else x), out_mask


@hookimpl
def mmgen_register_modalities(register: Callable[[type], None]) -> None:
    register(LogMelFrames)
