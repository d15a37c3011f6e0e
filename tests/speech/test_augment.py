"""Training waveform augmentation: noise at the drawn SNR, band-limiting, synthetic reverberation, reproducibility,
argument errors, training split only, and the recipe/CLI path."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmgen.config import ConfigError, cli_main
from mmgen.data import FSDDDataModule, WaveAugment
from mmgen.data.augment import add_noise, band_limit, reverberate
from mmgen_text import CharTokenizer

from tests.speech.conftest import audio, tone

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "speech" / "fsdd_ctc_attention.yaml")
RATE = 8000


def snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    return 10 * math.log10(float(clean.square().sum() / (noisy - clean).square().sum()))


def band_energy(x: torch.Tensor, lo: float, hi: float) -> float:
    power = torch.fft.rfft(x.double()).abs().square()
    freqs = torch.fft.rfftfreq(x.numel(), 1 / RATE)
    return float(power[(freqs >= lo) & (freqs < hi)].sum())


@pytest.fixture
def wave() -> torch.Tensor:
    return torch.from_numpy(tone(1.0, RATE))


@pytest.fixture
def white() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).standard_normal(2 * RATE)).float() * 0.3


def test_everything_off_by_default_is_the_identity(wave) -> None:
    assert torch.equal(WaveAugment()(wave, RATE, np.random.default_rng(0)), wave)
    assert torch.equal(WaveAugment(noise_snr=(0, 1), rt60=(1, 2), lowpass_hz=(100, 200))(
        wave, RATE, np.random.default_rng(0)), wave)  # ranges without probabilities do nothing


@pytest.mark.parametrize("coloured", [0.0, 1.0])
def test_noise_is_added_at_the_drawn_snr(wave, coloured: float) -> None:
    rng = np.random.default_rng(0)
    fixed = WaveAugment(noise_prob=1.0, noise_snr=(12.0, 12.0), noise_coloured=coloured)
    assert snr_db(wave, fixed(wave, RATE, rng)) == pytest.approx(12.0, abs=0.5)
    ranged = WaveAugment(noise_prob=1.0, noise_snr=(5.0, 20.0), noise_coloured=coloured)
    measured = [snr_db(wave, ranged(wave, RATE, rng)) for _ in range(30)]
    assert 4.5 <= min(measured) and max(measured) <= 20.5 and max(measured) - min(measured) > 7  # uniform draws
    half = WaveAugment(noise_prob=0.5)
    changed = sum(not torch.equal(half(wave, RATE, rng), wave) for _ in range(200))
    assert 70 < changed < 130


def test_coloured_noise_leans_to_low_frequencies(white) -> None:
    silence_plus = lambda pole: add_noise(white, 0.0, np.random.default_rng(1), pole) - white  # noqa: E731
    low_share = [band_energy(n, 0, 1000) / band_energy(n, 0, 4000) for n in (silence_plus(0.0), silence_plus(0.9))]
    assert low_share[0] == pytest.approx(0.25, abs=0.03) and low_share[1] > 0.7  # white: flat; coloured: low


def test_band_limit_removes_energy_above_the_cutoff(white) -> None:
    out = band_limit(white, RATE, 1500.0)
    assert band_energy(out, 2500, 4000) < 1e-3 * band_energy(white, 2500, 4000)
    assert band_energy(out, 0, 500) == pytest.approx(band_energy(white, 0, 500), rel=0.05)
    torch.testing.assert_close(band_limit(5 * white, RATE, 1500.0), 5 * out, atol=1e-4, rtol=1e-4)  # no clamping
    aug = WaveAugment(lowpass_prob=1.0, lowpass_hz=(1000.0, 1500.0))
    out = aug(white, RATE, np.random.default_rng(0))
    assert out.shape == white.shape and band_energy(out, 2500, 4000) < 1e-3 * band_energy(white, 2500, 4000)


def test_reverb_keeps_the_length_and_decays_at_rt60() -> None:
    impulse = torch.zeros(RATE)
    impulse[0] = 1.0
    out = reverberate(impulse, RATE, 0.4, 5.0, np.random.default_rng(0))  # the room impulse response itself
    assert out.shape == impulse.shape and float(out.square().sum()) == pytest.approx(1.0, rel=1e-4)
    assert 10 * math.log10(float(out[0] ** 2 / out[1:].square().sum())) == pytest.approx(5.0, abs=0.01)  # DRR
    db = 10 * np.log10(out[1:7801].reshape(-1, 200).square().sum(1).numpy())  # 25 ms windows of the tail
    t = (np.arange(len(db)) + 0.5) * 0.025
    slope = np.polyfit(t[t < 0.35], db[t < 0.35], 1)[0]
    assert slope == pytest.approx(-60 / 0.4, rel=0.15)  # 60 dB in rt60 seconds
    wave = torch.from_numpy(tone(0.5, RATE))
    aug = WaveAugment(reverb_prob=1.0, rt60=(0.2, 0.8))
    out = aug(wave, RATE, np.random.default_rng(0))
    assert out.shape == wave.shape and not torch.allclose(out, wave, atol=1e-3)
    assert torch.equal(WaveAugment(reverb_prob=0.0, rt60=(0.2, 0.8))(wave, RATE, np.random.default_rng(0)), wave)


def test_reproducible_for_a_seed(wave) -> None:
    aug = WaveAugment(noise_prob=0.7, reverb_prob=0.5, lowpass_prob=0.5, gain_db=(-6.0, 6.0))
    runs = [[aug(wave, RATE, rng) for _ in range(5)] for rng in (np.random.default_rng(s) for s in (3, 3, 4))]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_prob=1.5), r"noise_prob=1.5; accepted: a probability in \[0, 1\]"),
    (dict(reverb_prob=-0.1), r"reverb_prob=-0.1; accepted: a probability"),
    (dict(noise_coloured=2), r"noise_coloured=2; accepted: a probability"),
    (dict(noise_snr=(30, 5)), r"noise_snr=\[30.0, 5.0\]; accepted: \[lo, hi\] in dB with lo <= hi"),
    (dict(rt60=(0.0, 0.5)), r"rt60=\[0.0, 0.5\]; accepted: \[lo, hi\] in seconds with 0 < lo <= hi"),
    (dict(lowpass_hz=(1000.0,)), r"lowpass_hz=\(1000.0,\); accepted: \[lo, hi\] in Hz"),
    (dict(gain_db=(0, float("nan"))), r"gain_db=\[0.0, nan\]; accepted"),
    (dict(drr_db="loud"), r"drr_db='loud'; accepted"),
])
def test_argument_errors_name_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WaveAugment(**kwargs)


def test_cutoff_must_lie_below_nyquist(fsdd) -> None:
    aug = WaveAugment(lowpass_prob=0.5, lowpass_hz=(1000.0, 4000.0))
    with pytest.raises(ValueError, match=r"lowpass_hz=\[1000.0, 4000.0\]; accepted: .* hi < 4000 \(half the sample"):
        FSDDDataModule(audio(), CharTokenizer(), augment=aug)
    FSDDDataModule(audio(sample_rate=16000), CharTokenizer(), augment=aug)  # fine at 16 kHz
    FSDDDataModule(audio(), CharTokenizer(), augment=WaveAugment(lowpass_hz=(1000.0, 4000.0)))  # off: not checked


def test_only_the_training_split_is_augmented_and_its_features_are_not_cached(fsdd) -> None:
    aug = WaveAugment(noise_prob=1.0, noise_snr=(0.0, 10.0), lowpass_prob=0.5, lowpass_hz=(1000.0, 3000.0))
    dm = FSDDDataModule(audio(), CharTokenizer(), speakers=["theo"], augment=aug)
    dm.setup("fit")
    dm.setup("test")
    train, val, test = (dm._datasets[k] for k in ("train", "val", "test"))
    plain = audio().features(train.waveform(0))
    first, second = train.features(0), train.features(0)
    assert first.shape == second.shape == plain.shape  # same length: noise and filters keep it
    assert not torch.allclose(first, second) and not torch.allclose(first, plain)  # fresh draws every fetch
    assert train._features == {} and train._waves  # waveforms cached, features not
    for ds in (val, test):
        assert ds.augment is None and ds.speeds is None
        torch.testing.assert_close(ds.features(0), audio().features(ds.waveform(0)))
        assert 0 in ds._features  # evaluation features are cached as before
    again = FSDDDataModule(audio(), CharTokenizer(), speakers=["theo"], augment=aug)
    again.setup("fit")
    torch.testing.assert_close(again._datasets["train"].features(0), first)  # the data module's seed fixes it


def test_augment_after_speed_perturbation(fsdd) -> None:
    dm = FSDDDataModule(audio(), CharTokenizer(), speakers=["theo"], speed_perturb=[0.9, 1.1],
                        augment=WaveAugment(noise_prob=1.0))
    dm.setup("fit")
    train = dm._datasets["train"]
    plain = audio().num_frames(len(train.waveform(0)))
    assert plain not in {train.features(0).shape[0] for _ in range(8)}


def test_loader_workers_draw_differently(fsdd, monkeypatch) -> None:
    dm = FSDDDataModule(audio(), CharTokenizer(), speakers=["theo"], augment=WaveAugment(noise_prob=1.0))
    dm.setup("fit")
    draws = {}
    for worker in (0, 1):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda w=worker: SimpleNamespace(id=w))
        draws[worker] = dm._datasets["train"].features(0)  # each worker's copy reseeds from (seed, worker id)
    assert not torch.allclose(draws[0], draws[1])


def test_a_loader_fetch_draws_from_seed_epoch_and_index(fsdd, monkeypatch) -> None:
    """The training loader fetches ``(epoch, index)``: its draws are the same in any worker and after a resume."""
    dm = FSDDDataModule(audio(), CharTokenizer(), speakers=["theo"], speed_perturb=[0.9, 1.1],
                        augment=WaveAugment(noise_prob=1.0))
    dm.setup("fit")
    train = dm._datasets["train"]
    first = train[(2, 0)][0]
    for worker in (0, 1):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda w=worker: SimpleNamespace(id=w))
        torch.testing.assert_close(train[(2, 0)][0], first, rtol=0, atol=0)
    assert not any(train[(e, 0)][0].shape == first.shape and torch.allclose(train[(e, 0)][0], first)
                   for e in (0, 1, 3))  # another epoch, other draws


def test_recipe_takes_augment_from_yaml_and_command_line(fsdd, tmp_path: Path) -> None:
    extra = tmp_path / "augment.yaml"
    extra.write_text("data:\n  init_args:\n    augment:\n      class_path: mmgen.data.augment.WaveAugment\n"
                     "      init_args: {noise_prob: 0.5, noise_snr: [5, 25], lowpass_prob: 0.3,"
                     " lowpass_hz: [1200, 3400]}\n")
    cli = cli_main(["--config", RECIPE, "--config", str(extra), "--data.augment.reverb_prob", "0.2",
                    "--data.augment.rt60", "[0.2, 0.5]", "--model.d_model", "32", "--model.encoder_layers", "1",
                    "--model.decoder_layers", "1"], run=False)
    aug = cli.datamodule.augment
    assert isinstance(aug, WaveAugment)
    assert (aug.noise_prob, aug.noise_snr, aug.lowpass_prob, aug.lowpass_hz) == (0.5, (5, 25), 0.3, (1200, 3400))
    assert (aug.reverb_prob, aug.rt60) == (0.2, (0.2, 0.5))
    with pytest.raises(ConfigError, match=r"WaveAugment: noise_prob=2.0; accepted: a probability"):
        cli_main(["--config", RECIPE, "--data.augment.noise_prob", "2"], run=False)
    with pytest.raises(ConfigError, match=r"FSDDDataModule: augment: lowpass_hz=\[1000.0, 5000.0\]"):
        cli_main(["--config", RECIPE, "--data.augment.lowpass_prob", "1", "--data.augment.lowpass_hz",
                  "[1000, 5000]"], run=False)
