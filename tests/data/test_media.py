"""Tests for image/audio loading and feature extraction."""

import math
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from vitacore.data.audio import AudioTransform, audio_token_length, fbank, load_wav, resample, write_wav
from vitacore.data.images import ImageTransform, load_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _tone(freq, seconds=1.0, sr=16000, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return amp * np.sin(2 * np.pi * freq * t)


# ----------------------------------------------------------------- images


def test_load_image_missing_names_path(tmp_path):
    missing = tmp_path / "no_such_picture.png"
    with pytest.raises(FileNotFoundError, match="no_such_picture.png"):
        load_image(missing)


def test_load_image_corrupt_names_path(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is definitely not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg.*not a readable image"):
        load_image(bad)


def test_load_image_truncated_names_path(tmp_path):
    good = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(cut)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_load_image_returns_rgb(tmp_path, mode):
    path = tmp_path / f"img_{mode}.png"
    Image.new(mode, (10, 7)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (10, 7)


def test_image_transform_shape_and_dtype():
    tf = ImageTransform(image_size=32, mean=CLIP_MEAN, std=CLIP_STD)
    out = tf(Image.new("RGB", (50, 20), (10, 200, 30)))
    assert out.shape == (3, 32, 32)
    assert out.dtype == torch.float32


def test_image_transform_normalizes_mean_colour_to_zero():
    tf = ImageTransform(image_size=24, mean=CLIP_MEAN, std=CLIP_STD)
    colour = tuple(int(round(m * 255)) for m in CLIP_MEAN)
    out = tf(Image.new("RGB", (40, 30), colour))
    # Only the 8-bit rounding of the mean colour remains (< 0.5/255/std).
    assert out.abs().max().item() < 0.01


def test_image_transform_scales_and_normalizes():
    tf = ImageTransform(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = tf(Image.new("RGB", (8, 8), (255, 0, 255)))
    assert torch.allclose(out[0], torch.ones(8, 8))
    assert torch.allclose(out[1], -torch.ones(8, 8))


def test_image_transform_accepts_path(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (12, 12), (255, 0, 0)).save(path)
    tf = ImageTransform(image_size=12, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert torch.allclose(tf(path)[0], torch.ones(12, 12))


def test_pad_to_square_keeps_aspect():
    size = 32
    mean = (0.5, 0.5, 0.5)
    tf_pad = ImageTransform(size, mean, (0.5, 0.5, 0.5), pad_to_square=True)
    tf_stretch = ImageTransform(size, mean, (0.5, 0.5, 0.5), pad_to_square=False)
    wide = Image.new("RGB", (64, 32), (255, 0, 0))  # 2:1 red bar

    padded = tf_pad(wide)
    # Content occupies the middle half; bands above/below are the mean colour
    # (~0 after normalization, up to the 127.5 -> 128 rounding).
    assert padded[:, :6].abs().max() < 0.01
    assert padded[:, -6:].abs().max() < 0.01
    assert torch.allclose(padded[0, 10:22], torch.ones(12, size), atol=0.02)
    assert torch.allclose(padded[1, 10:22], -torch.ones(12, size), atol=0.02)

    stretched = tf_stretch(wide)
    assert torch.allclose(stretched[0], torch.ones(size, size), atol=1e-5)


def test_pad_to_square_tall_image_pads_sides():
    tf = ImageTransform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), pad_to_square=True)
    out = tf(Image.new("RGB", (8, 32), (0, 0, 255)))  # 1:4 tall blue bar
    assert out[:, :, :4].abs().max() < 0.01  # left padding
    assert torch.allclose(out[2, :, 7:9], torch.ones(16, 2), atol=0.02)


def test_image_transform_deterministic():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (37, 53, 3), np.uint8))
    tf = ImageTransform(20, CLIP_MEAN, CLIP_STD, pad_to_square=True)
    assert torch.equal(tf(img), tf(img))


def test_image_transform_validates():
    with pytest.raises(ValueError):
        ImageTransform(0, CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError):
        ImageTransform(8, (0.5, 0.5), CLIP_STD)


# ------------------------------------------------------------------ audio


def test_wav_round_trip_within_quantization(tmp_path):
    x = _tone(440, 0.25)
    x[:10] = [-1.0, 1.0, 0.0, 0.999, -0.999, 0.5, -0.5, 1e-5, -1e-5, 0.25]
    path = tmp_path / "tone.wav"
    write_wav(path, x, 16000)
    y = load_wav(path, 16000)
    assert y.dtype == torch.float32 and y.shape == (len(x),)
    # One 16-bit step is 1/32768; write rounds, so error is about half a step.
    assert np.max(np.abs(y.numpy() - x)) <= 1.5 / 32768


def test_write_wav_clips(tmp_path):
    path = tmp_path / "loud.wav"
    write_wav(path, np.array([2.0, -3.0, 0.0]), 8000)
    y = load_wav(path, 8000)
    assert y[0] == pytest.approx(32767 / 32768) and y[1] == pytest.approx(-32767 / 32768)


def test_stereo_is_averaged(tmp_path):
    n = 800
    stereo = np.stack([np.full(n, 0.5), np.full(n, -0.25)], axis=1)
    path = tmp_path / "stereo.wav"
    write_wav(path, stereo, 16000)
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 2
    y = load_wav(path, 16000)
    assert y.shape == (n,)
    assert torch.allclose(y, torch.full((n,), 0.125), atol=1e-4)


def _write_raw_wav(path, raw, width, sr=16000, channels=1):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(sr)
        w.writeframes(raw)


def test_reads_8_and_32_bit_pcm(tmp_path):
    p8 = tmp_path / "u8.wav"
    _write_raw_wav(p8, np.array([0, 128, 192, 255], np.uint8).tobytes(), 1)
    assert load_wav(p8).tolist() == pytest.approx([-1.0, 0.0, 0.5, 127 / 128])

    p32 = tmp_path / "i32.wav"
    vals = np.array([-(2**31), 0, 2**30, 2**31 - 1], "<i4")
    _write_raw_wav(p32, vals.tobytes(), 4)
    assert load_wav(p32).tolist() == pytest.approx([-1.0, 0.0, 0.5, 1.0], abs=1e-6)


def test_resampling_changes_length_by_ratio(tmp_path):
    path = tmp_path / "8k.wav"
    write_wav(path, _tone(300, 1.0, sr=8000), 8000)
    assert load_wav(path, 16000).shape == (16000,)
    assert load_wav(path, 8000).shape == (8000,)
    path44 = tmp_path / "44k.wav"
    write_wav(path44, _tone(300, 0.5, sr=44100), 44100)
    assert load_wav(path44, 16000).shape == (8000,)
    assert resample(torch.zeros(1001), 3, 2).shape == (math.ceil(1001 * 2 / 3),)


def test_resampling_preserves_tone_and_filters_alias():
    sr_in, sr_out = 44100, 16000
    x = torch.from_numpy(_tone(440, 0.5, sr=sr_in)).float()
    y = resample(x, sr_in, sr_out)
    ref = torch.from_numpy(_tone(440, 0.5, sr=sr_out)).float()
    assert (y - ref)[200:-200].abs().max() < 5e-3
    # 12 kHz is above the new 8 kHz Nyquist: it must be removed, not aliased.
    hi = torch.from_numpy(_tone(12000, 0.5, sr=sr_in)).float()
    assert resample(hi, sr_in, sr_out)[200:-200].abs().max() < 0.02


def test_corrupt_wav_names_path(tmp_path):
    bad = tmp_path / "garbage.wav"
    bad.write_bytes(b"RIFF....WAVEnot really audio at all")
    with pytest.raises(ValueError, match="garbage.wav.*WAV"):
        load_wav(bad)
    text = tmp_path / "notes.wav"
    text.write_text("just some text")
    with pytest.raises(ValueError, match="notes.wav"):
        load_wav(text)


def test_missing_wav_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.wav"):
        load_wav(tmp_path / "absent.wav")


@pytest.mark.parametrize("num_samples", [400, 401, 559, 560, 16000, 16123])
def test_fbank_shape_and_frame_count(num_samples):
    x = torch.from_numpy(_tone(500, num_samples / 16000)).float()[:num_samples]
    feats = fbank(x)
    assert feats.shape == (1 + (num_samples - 400) // 160, 80)
    assert feats.dtype == torch.float32
    assert torch.isfinite(feats).all()


def test_fbank_too_short_raises():
    with pytest.raises(ValueError, match="shorter than one 25 ms frame"):
        fbank(torch.zeros(399))


def test_fbank_silence_hits_floor():
    feats = fbank(torch.zeros(1600))
    assert torch.allclose(feats, torch.full_like(feats, math.log(torch.finfo(torch.float32).eps)))


def _mel_centres_hz(num_bins=80, sr=16000, low=20.0):
    to_mel = lambda f: 1127.0 * math.log(1 + f / 700.0)  # noqa: E731
    from_mel = lambda m: 700.0 * (math.exp(m / 1127.0) - 1)  # noqa: E731
    lo, hi = to_mel(low), to_mel(sr / 2)
    step = (hi - lo) / (num_bins + 1)
    return [from_mel(lo + (i + 1) * step) for i in range(num_bins)]


def test_fbank_tone_peaks_at_matching_mel_bin():
    centres = _mel_centres_hz()
    peaks = {}
    for freq in (1000, 4000):
        feats = fbank(torch.from_numpy(_tone(freq)).float())
        peaks[freq] = int(feats.mean(dim=0).argmax())
        expected = min(range(80), key=lambda i: abs(centres[i] - freq))
        assert abs(peaks[freq] - expected) <= 1, (freq, peaks[freq], expected)
    assert peaks[4000] > peaks[1000]


def test_fbank_louder_is_larger_and_scaling_matches_int16():
    quiet = fbank(torch.from_numpy(_tone(1000, amp=0.1)).float())
    loud = fbank(torch.from_numpy(_tone(1000, amp=0.4)).float())
    # Power scales with amplitude squared: +log(16) in every active bin.
    peak = int(loud.mean(0).argmax())
    assert (loud[:, peak] - quiet[:, peak]).mean().item() == pytest.approx(math.log(16), abs=1e-3)


def test_fbank_deterministic():
    x = torch.from_numpy(np.random.default_rng(3).uniform(-0.5, 0.5, 8000)).float()
    assert torch.equal(fbank(x), fbank(x.clone()))
    assert torch.equal(fbank(x.unsqueeze(0)), fbank(x))


def test_audio_token_length_matches_slicing():
    for t in range(0, 501):
        assert audio_token_length(t) == len(torch.ones(t)[2::2][2::2][0::2]), t
    with pytest.raises(ValueError):
        audio_token_length(-1)


def test_audio_transform(tmp_path):
    path = tmp_path / "clip.wav"
    write_wav(path, _tone(2000, 1.0, sr=22050), 22050)
    feats, n_tokens = AudioTransform()(path)
    assert feats.shape == (98, 80)
    assert n_tokens == audio_token_length(98) == len(torch.ones(98)[2::2][2::2][0::2])


def test_audio_transform_short_clip_names_path(tmp_path):
    path = tmp_path / "blip.wav"
    write_wav(path, np.zeros(100), 16000)
    with pytest.raises(ValueError, match="blip.wav.*shorter than one 25 ms frame"):
        AudioTransform()(path)
