"""Training-time waveform augmentation for speech: synthetic reverberation, band-limiting, additive noise and gain.

The signal processing is torchaudio's (``fftconvolve``, ``lowpass_biquad``, ``lfilter``, ``add_noise``); every random
draw comes from a numpy generator the caller owns (the training data set's, seeded from the data module's ``seed``), so
a run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchaudio.functional as AF
from torch import Tensor

__all__ = ["WaveAugment", "add_noise", "band_limit", "reverberate"]

COLOURED_POLES = (0.3, 0.95)  # one-pole low-pass of coloured noise: corner ~1.5 kHz down to ~65 Hz at 8 kHz


def add_noise(wave: Tensor, snr_db: float, rng: np.random.Generator, pole: float = 0.0) -> Tensor:
    """``wave`` plus Gaussian noise at ``snr_db`` (signal energy over noise energy, whole clip). The noise is white,
    or, with ``0 < pole < 1``, coloured by the one-pole low-pass ``y[n] = (1 - pole) x[n] + pole y[n-1]``."""
    noise = torch.from_numpy(rng.standard_normal(wave.shape[-1])).to(wave)
    if pole > 0:
        noise = AF.lfilter(noise, noise.new_tensor([1.0, -pole]), noise.new_tensor([1.0 - pole, 0.0]), clamp=False)
    return AF.add_noise(wave, noise, wave.new_tensor(snr_db))


def reverberate(wave: Tensor, sample_rate: int, rt60: float, drr_db: float, rng: np.random.Generator) -> Tensor:
    """``wave`` convolved with a synthetic room impulse response: a direct-path impulse at 0 and a tail of Gaussian
    noise whose level falls 60 dB in ``rt60`` seconds, ``drr_db`` (direct over tail energy) below the direct path,
    the whole normalised to unit energy. Trimmed to the input's length (the direct path adds no delay)."""
    n = max(2, round(rt60 * sample_rate))
    t = torch.arange(1, n, dtype=torch.float64) / sample_rate
    tail = torch.from_numpy(rng.standard_normal(n - 1)) * torch.exp(-3 * math.log(10) * t / rt60)
    tail = tail * (10 ** (-drr_db / 20) / tail.norm())
    rir = torch.cat([torch.ones(1, dtype=torch.float64), tail])
    rir = (rir / rir.norm()).to(wave)
    return AF.fftconvolve(wave, rir)[..., : wave.shape[-1]]


def band_limit(wave: Tensor, sample_rate: int, cutoff_hz: float) -> Tensor:
    """``wave`` through two cascaded Butterworth low-pass biquads at ``cutoff_hz`` (-6 dB there, -24 dB/octave
    above), as a narrow-band microphone would record it."""
    peak = float(wave.abs().max())
    if peak == 0:
        return wave
    scale = 2 * peak  # lfilter clamps its output to [-1, 1]: filter with headroom, then undo the (linear) scaling
    out = wave / scale
    for _ in range(2):
        out = AF.lowpass_biquad(out, sample_rate, cutoff_hz)
    return out * scale


def _probability(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r}; accepted: a probability in [0, 1]")
    return float(value)


def _pair(name: str, value: Sequence[float], unit: str, positive: bool = False) -> tuple[float, float]:
    accepted = f"[lo, hi] in {unit} with {'0 < ' if positive else ''}lo <= hi"
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}; accepted: {accepted}") from None
    if not (lo <= hi < math.inf and lo > (0.0 if positive else -math.inf)):  # also false for NaN
        raise ValueError(f"{name}={[lo, hi]}; accepted: {accepted}")
    return lo, hi


class WaveAugment:
    """Random waveform augmentation of training utterances, applied in this order, each with its own probability:
    reverberation (a synthetic room), band-limiting (a narrow-band microphone), additive noise, gain. Everything
    is off by default.

    Args:
        noise_prob: probability of adding noise to an utterance.
        noise_snr: signal-to-noise ratio of the noise, in dB, drawn uniformly from ``[lo, hi]``.
        noise_coloured: probability that the noise is coloured (white noise through a one-pole low-pass whose pole is
            drawn from ``[0.3, 0.95]``: more energy at low frequencies, like hum and room noise) instead of white.
        reverb_prob: probability of reverberation.
        rt60: reverberation time (60 dB decay) of the synthetic room, in seconds, drawn from ``[lo, hi]``.
        drr_db: direct-to-reverberant energy ratio of the room impulse response, in dB, drawn from ``[lo, hi]``.
        lowpass_prob: probability of band-limiting.
        lowpass_hz: cutoff of the low-pass (two Butterworth biquads: -6 dB at the cutoff, -24 dB/octave above), in
            Hz, drawn from ``[lo, hi]``; below half the sample rate.
        gain_db: gain in dB, drawn from ``[lo, hi]`` for every utterance (``[0, 0]``: none). Per-utterance feature
            normalisation removes most of its effect.
    """

    def __init__(self, noise_prob: float = 0.0, noise_snr: tuple[float, float] = (5.0, 30.0),
                 noise_coloured: float = 0.5, reverb_prob: float = 0.0, rt60: tuple[float, float] = (0.1, 0.6),
                 drr_db: tuple[float, float] = (0.0, 10.0), lowpass_prob: float = 0.0,
                 lowpass_hz: tuple[float, float] = (1000.0, 3000.0),
                 gain_db: tuple[float, float] = (0.0, 0.0)) -> None:
        self.noise_prob = _probability("noise_prob", noise_prob)
        self.noise_snr = _pair("noise_snr", noise_snr, "dB")
        self.noise_coloured = _probability("noise_coloured", noise_coloured)
        self.reverb_prob = _probability("reverb_prob", reverb_prob)
        self.rt60 = _pair("rt60", rt60, "seconds", positive=True)
        self.drr_db = _pair("drr_db", drr_db, "dB")
        self.lowpass_prob = _probability("lowpass_prob", lowpass_prob)
        self.lowpass_hz = _pair("lowpass_hz", lowpass_hz, "Hz", positive=True)
        self.gain_db = _pair("gain_db", gain_db, "dB")

    def __repr__(self) -> str:
        return f"WaveAugment({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def check(self, sample_rate: int) -> None:
        """Options that depend on the model's sample rate: the low-pass cutoffs must lie below half of it."""
        if self.lowpass_prob > 0 and self.lowpass_hz[1] >= sample_rate / 2:
            raise ValueError(f"augment: lowpass_hz={list(self.lowpass_hz)}; accepted: [lo, hi] in Hz with "
                             f"0 < lo <= hi < {sample_rate / 2:g} (half the sample rate, {sample_rate} Hz)")

    def __call__(self, wave: Tensor, sample_rate: int, rng: np.random.Generator) -> Tensor:
        """Mono waveform (n,) -> augmented waveform (n,), every random choice drawn from ``rng``."""
        if self.reverb_prob and rng.random() < self.reverb_prob:
            wave = reverberate(wave, sample_rate, rng.uniform(*self.rt60), rng.uniform(*self.drr_db), rng)
        if self.lowpass_prob and rng.random() < self.lowpass_prob:
            wave = band_limit(wave, sample_rate, rng.uniform(*self.lowpass_hz))
        if self.noise_prob and rng.random() < self.noise_prob:
            pole = rng.uniform(*COLOURED_POLES) if rng.random() < self.noise_coloured else 0.0
            wave = add_noise(wave, rng.uniform(*self.noise_snr), rng, pole)
        if self.gain_db != (0.0, 0.0):
            wave = wave * 10 ** (rng.uniform(*self.gain_db) / 20)
        return wave
