"""The audio-frame plugin: reading, mixing, resampling, log-mel features, SpecAugment and x4 subsampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from mmgen import plugins
from mmgen.modality import AudioFileError, AudioSpec
from mmgen_audio import ConvSubsampling, LogMelFrames

from tests.speech.conftest import audio, tone, write_wav


def test_registered_through_entry_point() -> None:
    assert plugins.get_modality("LogMelFrames") is LogMelFrames
    reg = plugins.registration_of(LogMelFrames)
    assert reg.plugin == "audio" and reg.distribution == "mmgen"


def test_features_are_torchaudio_log_mel_normalised_per_utterance(tmp_path: Path) -> None:
    wave = tone(0.5, 8000)
    path = write_wav(tmp_path / "a.wav", wave, 8000, subtype="FLOAT")
    m = audio()
    feats = m.encode(path)
    mel = torchaudio.transforms.MelSpectrogram(8000, n_fft=256, win_length=200, hop_length=80, n_mels=40)
    ref = mel(torch.from_numpy(wave)).clamp_min(1e-10).log().T
    ref = (ref - ref.mean(0)) / (ref.std(0, unbiased=False) + 1e-5)
    assert feats.shape == (4000 // 80 + 1, 40) == (m.num_frames(4000), 40)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.mean(0), torch.zeros(40), atol=1e-5, rtol=0)
    assert m.spec == AudioSpec(sample_rate=8000, num_features=40, frame_rate=100.0, subsampling=4)


def test_top_db_floor_band_limits_and_utterance_normalisation(tmp_path: Path) -> None:
    rate = 8000
    wave = tone(0.5, rate)
    wave[: rate // 4] = np.random.default_rng(1).normal(0, 1e-5, rate // 4)  # a quiet first half: a noise floor
    path = write_wav(tmp_path / "a.wav", wave, rate, subtype="FLOAT")
    m = audio(top_db=40.0, normalize="utterance", f_min=100.0, f_max=3400.0)
    feats = m.encode(path)
    mel = torchaudio.transforms.MelSpectrogram(rate, n_fft=256, win_length=200, hop_length=80, n_mels=40,
                                               f_min=100.0, f_max=3400.0)
    ref = mel(torch.from_numpy(wave)).clamp_min(1e-10).log().T
    ref = ref.clamp_min(ref.max() - 4 * np.log(10))  # 40 dB below the loudest bin, in natural-log units
    ref = ref - ref.mean(0)
    ref = ref / (ref.square().mean().sqrt() + 1e-5)  # one scale for the whole utterance
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.mean(0), torch.zeros(40), atol=1e-5, rtol=0)  # every band centred
    assert abs(float(feats.square().mean()) - 1.0) < 1e-4  # unit variance over all bands together
    quiet = feats[5:20]  # frames of the noise floor: all at the floor, so one value per band
    assert torch.allclose(quiet, quiet[:1].expand_as(quiet), atol=1e-5)
    plain = audio().encode(path)[5:20]
    assert not torch.allclose(plain, plain[:1].expand_as(plain), atol=1e-2)  # without the floor the noise shows


@pytest.mark.parametrize("bad", [dict(top_db=0.0), dict(normalize="global"), dict(f_max=5000.0),
                                 dict(f_min=3000.0, f_max=2000.0), dict(freq_warp=0.6)])
def test_bad_feature_options_say_what_is_accepted(bad: dict) -> None:
    with pytest.raises(ValueError, match="accepted"):
        audio(**bad)


def test_frequency_warp_moves_spectral_peaks_and_is_identity_at_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmgen_audio import FrequencyWarp

    warp = FrequencyWarp(40, 0.0, 4000.0, 0.2)
    x = torch.zeros(3, 5, 40)
    x[:, :, 20] = 1.0  # a peak at band 20
    factors = torch.tensor([[0.5], [1.0], [0.0]], dtype=torch.float64)  # rand -> alpha 1.0, 1.2, 0.8
    monkeypatch.setattr(torch, "rand", lambda *a, **k: factors)  # fixes each utterance's warp factor
    y = warp(x)
    monkeypatch.undo()
    torch.testing.assert_close(y[0], x[0])  # alpha 1: unchanged
    peak = y.argmax(dim=2)[:, 0]
    assert peak[1] < 20 < peak[2]  # read at 1.2x the frequency, the peak comes lower; at 0.8x, higher
    assert torch.allclose(y.sum(dim=2)[0], torch.ones(5))


def test_frequency_warp_only_in_training_with_spec_augment() -> None:
    torch.manual_seed(0)
    adapter = audio(freq_warp=0.1, freq_masks=0, time_masks=0).adapter(16)
    assert adapter.augment.warp is not None
    x = torch.randn(2, 30, 40)
    mask = torch.ones(2, 30, dtype=torch.bool)
    adapter.eval()
    torch.testing.assert_close(adapter(x, mask)[0], adapter(x, mask)[0])
    warped = adapter.augment(x)
    assert warped.shape == x.shape and not torch.allclose(warped, x)
    assert audio().adapter(16).augment.warp is None  # off by default


def test_other_rate_is_resampled_and_stereo_mixed_down(tmp_path: Path) -> None:
    wave = tone(0.4, 16000, freq=300)
    mono16 = write_wav(tmp_path / "m16.wav", wave, 16000, subtype="FLOAT")
    mono_flac = write_wav(tmp_path / "m16.flac", wave, 16000)
    stereo = write_wav(tmp_path / "s16.flac", np.stack([wave, wave], axis=1), 16000)
    m = audio()
    expected = m.features(torchaudio.functional.resample(torch.from_numpy(wave), 16000, 8000))
    torch.testing.assert_close(m.encode(mono16), expected)
    torch.testing.assert_close(m.encode(stereo), m.encode(mono_flac))  # (x + x) / 2 == x
    assert m.load(stereo).shape == (3200,)
    # A waveform in memory goes the same way.
    torch.testing.assert_close(m.encode((torch.from_numpy(wave), 16000)), expected)


@pytest.mark.parametrize("case", ["corrupt", "truncated", "empty", "no_samples", "missing"])
def test_bad_files_name_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.wav"
    if case == "corrupt":
        path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" + bytes(100))
    elif case == "truncated":
        write_wav(path, tone(1.0, 8000), 8000)
        path.write_bytes(path.read_bytes()[:4000])  # header promises 8000 samples, the file holds ~1978
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "no_samples":
        write_wav(path, np.zeros(0, dtype=np.float32), 8000)
    with pytest.raises(AudioFileError) as err:
        audio().encode(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert {"corrupt": "cannot read", "truncated": "truncated", "empty": "empty", "no_samples": "no samples",
            "missing": "not found"}[case] in msg


def test_clip_shorter_than_half_a_window_is_an_error(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "click.wav", tone(0.005, 8000), 8000)
    with pytest.raises(AudioFileError, match="click.wav.*shorter than half"):
        audio().encode(path)


def test_shortest_clip_is_half_an_fft_window_plus_one_sample() -> None:
    m = audio()  # 25 ms windows at 8 kHz: 200 samples in a 256-point FFT, so the centred frames reflect 128 samples
    assert m.features(torch.randn(129)).shape == (m.num_frames(129), 40)
    with pytest.raises(AudioFileError, match="128 samples is shorter than half an FFT window .at least 129"):
        m.features(torch.randn(128))


@pytest.mark.parametrize("kwargs", [{}, dict(top_db=60.0, normalize="utterance", hop_ms=8.0)])
def test_a_batch_of_clips_gets_each_clips_own_features(kwargs: dict) -> None:
    m = audio(**kwargs)
    g = torch.Generator().manual_seed(0)
    lengths = [129, 130, 3000, m.hop_length * 40, m.hop_length * 40 + 1, 12345]  # shortest, frame edges, longest
    waves = [torch.randn(n, generator=g) * 0.1 * (i + 1) for i, n in enumerate(lengths)]
    batch = m.encode_batch(waves, one_pass=True)  # the GPU's path, here on the CPU
    assert batch.values.shape == (6, m.num_frames(12345), 40)
    assert batch.mask.sum(dim=1).tolist() == [m.num_frames(n) for n in lengths]
    for row, (wave, mask) in enumerate(zip(waves, batch.mask)):
        alone = m.features(wave)
        torch.testing.assert_close(batch.values[row, mask], alone, atol=2e-5, rtol=1e-5)
        assert not batch.values[row, ~mask].any()  # padding is 0, as collate pads
    with pytest.raises(AudioFileError, match="audio file b.wav: clip of 100 samples"):
        m.encode_batch([waves[0], torch.randn(100)], ["a.wav", "b.wav"], one_pass=True)
    same = m.encode_batch([waves[3], waves[3]], one_pass=True)  # equal lengths: the unmasked normalisation
    assert same.mask.all()
    torch.testing.assert_close(same.values, m.features(waves[3])[None].expand(2, -1, -1), atol=2e-5, rtol=1e-5)
    default = m.encode_batch(waves)  # on the CPU: the modality base class's one clip at a time
    assert default.values.shape == batch.values.shape
    assert torch.equal(default.mask, batch.mask)
    torch.testing.assert_close(default.values, batch.values, atol=2e-5, rtol=1e-5)
    with pytest.raises(AudioFileError, match="audio file b.wav: clip of 100 samples"):
        m.encode_batch([waves[0], torch.randn(100)], ["a.wav", "b.wav"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-pass default is the GPU's: run on the GPU machine "
                    "(docs/benchmarks.md)")
def test_a_batch_on_the_gpu_takes_one_pass_and_matches_the_cpu() -> None:
    m = audio(top_db=60.0, normalize="utterance")
    g = torch.Generator().manual_seed(1)
    waves = [torch.randn(n, generator=g) * 0.1 for n in (129, 4000, 8000, 8001)]
    gpu = m.encode_batch([w.cuda() for w in waves])
    assert gpu.values.is_cuda and gpu.mask.is_cuda
    cpu = m.encode_batch(waves)
    assert torch.equal(gpu.mask.cpu(), cpu.mask)
    torch.testing.assert_close(gpu.values.cpu(), cpu.values, atol=1e-4, rtol=1e-4)


def test_subsampling_lengths_and_batch_independence() -> None:
    torch.manual_seed(0)
    adapter = ConvSubsampling(40, 24, 8).eval()
    feats = [torch.randn(n, 40) for n in (37, 5, 16)]
    batch = audio().collate(feats)
    tokens, mask = adapter(batch.values, batch.mask)
    assert mask.sum(1).tolist() == [10, 2, 4] == ConvSubsampling.output_lengths(torch.tensor([37, 5, 16])).tolist()
    for i, f in enumerate(feats):
        alone, m = adapter(f[None], torch.ones(1, len(f), dtype=torch.bool))
        n = int(m.sum())
        torch.testing.assert_close(tokens[i, :n], alone[0], atol=1e-6, rtol=1e-5)
        assert tokens[i, n:].abs().max() == 0 if n < tokens.shape[1] else True


def test_spec_augment_only_in_training() -> None:
    torch.manual_seed(0)
    m = audio(freq_mask_width=10, time_mask_width=10, time_mask_ratio=0.5)
    adapter = m.adapter(16)
    x = torch.randn(4, 60, 40)
    mask = torch.ones(4, 60, dtype=torch.bool)
    adapter.eval()
    a, _ = adapter(x, mask)
    b, _ = adapter(x, mask)
    assert torch.equal(a, b)
    masked = adapter.augment(x)
    assert (masked == 0).any(dim=1).any() and not torch.equal(masked, x)  # whole bands or spans set to the mean
    adapter.train()
    c, _ = adapter(x, mask)
    assert not torch.allclose(a, c)
    assert audio(spec_augment=False).adapter(16).augment is None


def test_render_is_an_image() -> None:
    img = audio().render(torch.randn(50, 40))
    assert img.shape == (40, 50) and img.dtype == np.uint8 and img.max() == 255 and img.min() == 0


def test_audio_has_no_head() -> None:
    with pytest.raises(NotImplementedError, match="input modality"):
        audio().head(16)
