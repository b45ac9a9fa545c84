"""VITA's whale-encoder features (vitacore.data.kaldi_fbank) against Kaldi's fbank definition.

The references below are written from Kaldi's and torchaudio's documented definitions in numpy
float64, independent of vitacore's code: the WAV is read with the stdlib, the fbank follows Kaldi's
``compute-fbank-feats`` steps, and resampling is torchaudio's ``sinc_interp_hann`` formula evaluated
directly (one output sample at a time, not as a polyphase convolution).
"""

import math
import wave

import numpy as np
import pytest
import torch

from vitacore.data import FbankSettings, KaldiFbankTransform
from vitacore.data.audio import write_wav
from vitacore.data.kaldi_fbank import MIN_ENCODER_FRAMES, sinc_resample, whale_token_count

TOL = 1e-4
# Kaldi, torchaudio and kaldi-native-fbank all compute in float32: rounding noise of about 1e-7 of a
# frame's amplitude, which a mel bin k nats below the frame's loudest sees magnified ~e^(k/2) in the
# log. Measured against the float64 reference: <= 5e-5 within 14 nats of the peak, 5e-4 at 19 nats
# (pre-emphasis leaves the 20-60 Hz bins that low), 3e-3 in the nearly empty 4-8 kHz image band of
# a clip upsampled from 8 kHz. Signals below keep every bin within ~15 nats where the whole array is
# compared; resampled clips (float32 resampling, as torchaudio's, adds its own rounding) are compared
# at TOL on the bins within LOUD_NATS of their frame's peak and at QUIET_TOL everywhere.
LOUD_NATS = 10.0
QUIET_TOL = 5e-3
FLOAT32_EPS = float(np.finfo(np.float32).eps)


# ---- references ------------------------------------------------------------------------------
def read_wav_reference(path):
    """(channels, samples) float64 = int16 / 32768, and the rate, with the stdlib reader."""
    with wave.open(str(path), "rb") as src:
        assert src.getsampwidth() == 2
        channels, rate = src.getnchannels(), src.getframerate()
        pcm = np.frombuffer(src.readframes(src.getnframes()), dtype="<i2")
    return (pcm.reshape(-1, channels).T / 32768.0), rate


def kaldi_mel_banks(num_bins, padded, rate, low=20.0):
    """Kaldi's MelBanks: triangles linear in mel = 1127 ln(1 + f / 700), low..Nyquist, over FFT bins 0..padded/2-1."""
    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    mel_low, mel_high = mel(low), mel(rate / 2.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    fft_mel = mel(np.arange(padded // 2) * (rate / padded))
    banks = np.zeros((num_bins, padded // 2 + 1))  # the Nyquist bin gets no weight
    for b in range(num_bins):
        left, centre, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
        for k, m in enumerate(fft_mel):
            if left < m < right:
                banks[b, k] = (m - left) / (centre - left) if m <= centre else (right - m) / (right - centre)
    return banks


def kaldi_fbank_reference(signal, rate, num_bins=80, length_ms=25.0, shift_ms=10.0):
    """Kaldi fbank of a float signal in [-1, 1] (scaled to int16), no dither, no energy, snip_edges."""
    x = np.asarray(signal, dtype=np.float64) * 32768.0
    window, shift = int(rate * length_ms * 0.001), int(rate * shift_ms * 0.001)
    num_frames = 1 + (x.size - window) // shift
    frames = x[np.arange(num_frames)[:, None] * shift + np.arange(window)[None, :]]
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)  # x[-1] taken as x[0]
    frames = frames - 0.97 * previous
    n = np.arange(window)
    povey = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / (window - 1))) ** 0.85
    frames = frames * povey
    padded = 1 << (window - 1).bit_length()
    power = np.abs(np.fft.rfft(frames, n=padded, axis=1)) ** 2
    energies = power @ kaldi_mel_banks(num_bins, padded, rate).T
    return np.log(np.maximum(energies, FLOAT32_EPS))


def sinc_hann_resample_reference(x, orig, new, width=6, rolloff=0.99):
    """torchaudio's sinc_interp_hann, evaluated directly per output sample.

    y[n] = sum_i x[i] * c * sinc(c * d) * cos^2(pi * c * d / (2 * width)) over |c * d| <= width, where
    d = i - n * orig / new is the distance in input samples and c = rolloff * min(orig, new) / orig.
    """
    x = np.asarray(x, dtype=np.float64)
    c = rolloff * min(orig, new) / orig
    reach = int(math.ceil(width / c)) + 1
    out_len = -(-x.size * new // orig)
    position = np.arange(out_len) * orig / new
    taps = np.floor(position).astype(np.int64)[:, None] + np.arange(-reach, reach + 1)[None, :]
    u = c * (taps - position[:, None])
    weights = c * np.sinc(u) * np.cos(np.pi * u / (2 * width)) ** 2 * (np.abs(u) <= width)
    inside = (taps >= 0) & (taps < x.size)
    return (np.where(inside, x[np.clip(taps, 0, x.size - 1)], 0.0) * weights).sum(axis=1)


# ---- fixtures --------------------------------------------------------------------------------
def tones(rate, seconds, freqs, seed, noise=0.03):
    t = np.arange(int(rate * seconds)) / rate
    mix = sum(a * np.sin(2 * np.pi * f * t + p) for f, a, p in freqs)
    return mix + noise * np.random.default_rng(seed).standard_normal(t.size)


# The 45 Hz tone and the noise keep the lowest mel bins (cut ~30 dB by pre-emphasis) well above rounding.
MONO_16K = [(45.0, 0.2, 0.0), (220.0, 0.2, 0.0), (1000.0, 0.1, 0.3), (3150.0, 0.05, 1.0), (6000.0, 0.02, 2.0)]


def max_diff(features, reference, loud_nats=None):
    """Max |features - reference|; with ``loud_nats``, over bins within that many nats of their frame's peak."""
    assert tuple(features.shape) == reference.shape
    diff = np.abs(features.numpy().astype(np.float64) - reference)
    if loud_nats is not None:
        diff = diff[reference >= reference.max(axis=1, keepdims=True) - loud_nats]
    return float(diff.max())


# ---- features vs reference -------------------------------------------------------------------
@pytest.mark.parametrize("num_mel_bins", [80, 23])
def test_mono_16k_matches_kaldi_reference(tmp_path, num_mel_bins):
    path = tmp_path / "mono.wav"
    write_wav(path, tones(16000, 1.3, MONO_16K, seed=1), 16000)
    transform = KaldiFbankTransform(FbankSettings(num_mel_bins=num_mel_bins))
    features, tokens = transform(path)
    samples, rate = read_wav_reference(path)
    reference = kaldi_fbank_reference(samples[0], rate, num_bins=num_mel_bins)
    assert features.dtype == torch.float32 and features.shape == (1 + (20800 - 400) // 160, num_mel_bins)
    assert max_diff(features, reference) < TOL
    assert tokens == len(torch.ones(features.shape[0])[2::2][2::2][0::2])


@pytest.mark.parametrize("rate,freqs", [
    (8000, [(45.0, 0.2, 0.0), (300.0, 0.2, 0.0), (1200.0, 0.1, 0.5), (3500.0, 0.05, 1.5)]),
    (44100, [(45.0, 0.2, 0.0), (440.0, 0.2, 0.0), (2500.0, 0.1, 0.5), (7000.0, 0.05, 1.0), (12000.0, 0.05, 2.0)]),
])
def test_resampled_clip_matches_reference(tmp_path, rate, freqs):
    path = tmp_path / f"r{rate}.wav"
    write_wav(path, tones(rate, 1.3, freqs, seed=2), rate)
    features, _ = KaldiFbankTransform()(path)
    samples, file_rate = read_wav_reference(path)
    resampled = sinc_hann_resample_reference(samples[0], file_rate, 16000)
    assert resampled.size == math.ceil(samples.shape[1] * 16000 / file_rate)
    reference = kaldi_fbank_reference(resampled, 16000)
    assert max_diff(features, reference, loud_nats=LOUD_NATS) < TOL
    assert max_diff(features, reference) < QUIET_TOL


@pytest.mark.parametrize("orig,new", [(8000, 16000), (44100, 16000), (22050, 16000), (16000, 8000)])
def test_sinc_resample_matches_formula(orig, new):
    x = tones(orig, 0.2, [(330.0, 0.5, 0.0), (2900.0, 0.2, 1.0)], seed=3, noise=0.01).astype(np.float32)
    y = sinc_resample(torch.from_numpy(x), orig, new)
    reference = sinc_hann_resample_reference(x, orig, new)
    assert y.dtype == torch.float32 and y.shape == reference.shape
    assert np.abs(y.numpy() - reference).max() < 2e-6
    stereo = sinc_resample(torch.from_numpy(np.stack([x, -x])), orig, new)
    assert torch.allclose(stereo[0], y, rtol=0, atol=1e-6) and torch.allclose(stereo[1], -y, rtol=0, atol=1e-6)


def test_stereo_uses_channel_zero_only(tmp_path):
    left = tones(16000, 1.0, MONO_16K, seed=4)
    right = tones(16000, 1.0, [(500.0, 0.3, 0.0), (5000.0, 0.2, 0.0)], seed=5)
    path = tmp_path / "stereo.wav"
    write_wav(path, np.stack([left, right], axis=1), 16000)
    features, _ = KaldiFbankTransform()(path)
    samples, rate = read_wav_reference(path)
    assert samples.shape[0] == 2
    assert max_diff(features, kaldi_fbank_reference(samples[0], rate)) < TOL
    assert max_diff(features, kaldi_fbank_reference(samples[1], rate)) > 1.0
    assert max_diff(features, kaldi_fbank_reference(samples.mean(axis=0), rate)) > 0.1


def test_flac_gives_the_wav_features(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    pcm = np.round(np.clip(tones(16000, 0.8, MONO_16K, seed=6), -1, 1) * 32767).astype(np.int16)
    stereo = np.stack([pcm, pcm[::-1]], axis=1)
    soundfile.write(tmp_path / "a.flac", stereo, 16000, subtype="PCM_16")
    soundfile.write(tmp_path / "a.wav", stereo, 16000, subtype="PCM_16")
    transform = KaldiFbankTransform()
    flac, wav = transform(tmp_path / "a.flac"), transform(tmp_path / "a.wav")
    assert torch.equal(flac[0], wav[0]) and flac[1] == wav[1]
    assert max_diff(wav[0], kaldi_fbank_reference(pcm / 32768.0, 16000)) < TOL


def test_silence_is_floored_at_float_epsilon(tmp_path):
    path = tmp_path / "zeros.wav"
    write_wav(path, np.zeros(4000), 16000)
    features, _ = KaldiFbankTransform()(path)
    assert torch.all(features == torch.log(torch.tensor(FLOAT32_EPS)))


# ---- dither ----------------------------------------------------------------------------------
def test_dither_zero_is_deterministic_and_dither_adds_noise(tmp_path):
    path = tmp_path / "d.wav"
    write_wav(path, tones(16000, 1.0, MONO_16K, seed=7), 16000)
    plain = KaldiFbankTransform(FbankSettings(dither=0.0))
    dithered = KaldiFbankTransform(FbankSettings(dither=1.0))
    a, b = plain(path)[0], plain(path)[0]
    assert torch.equal(a, b)
    c, d = dithered(path)[0], dithered(path)[0]
    assert c.shape == a.shape and not torch.equal(c, d) and not torch.equal(c, a)
    # Noise of std 1 on the int16 scale is small beside this clip's noise floor (std ~330).
    assert 0 < float((c - a).abs().mean()) < 0.05
    silent = tmp_path / "z.wav"
    write_wav(silent, np.zeros(4000), 16000)
    assert float(dithered(silent)[0].min()) > math.log(FLOAT32_EPS) + 5


# ---- token counts ----------------------------------------------------------------------------
def test_token_counts_follow_vita_slicing():
    for frames in range(200):
        ones = torch.ones(frames)
        assert whale_token_count(frames, 2) == len(ones[2::2][2::2][0::2]), frames
        assert whale_token_count(frames, 1) == len(ones[2::2][2::2]), frames
    assert whale_token_count(MIN_ENCODER_FRAMES - 1, 1) == 0 < whale_token_count(MIN_ENCODER_FRAMES, 1)
    with pytest.raises(ValueError, match="kaldi_fbank.py"):
        whale_token_count(10, 3)


@pytest.mark.parametrize("adapter_stride", [2, 1])
@pytest.mark.parametrize("rate,lengths", [
    (16000, [1360, 1519, 1520, 1679, 16000, 23456]),
    (8000, [680, 760, 8001, 11111]),
    (44100, [3749, 3750, 44100, 65537]),
    (22050, [1874, 22051, 30000]),
])
def test_header_count_equals_call(tmp_path, rate, lengths, adapter_stride):
    transform = KaldiFbankTransform(adapter_stride=adapter_stride)
    for i, n in enumerate(lengths):
        path = tmp_path / f"c{i}.wav"
        write_wav(path, np.random.default_rng(n).uniform(-0.5, 0.5, size=(n, 1 + i % 2)), rate)
        features, tokens = transform(path)
        assert transform.num_tokens_from_header(path) == tokens > 0, (rate, n)
        assert tokens == whale_token_count(features.shape[0], adapter_stride)


# ---- errors ----------------------------------------------------------------------------------
def test_missing_corrupt_and_short_files_name_the_path(tmp_path):
    transform = KaldiFbankTransform()
    missing = tmp_path / "gone.wav"
    with pytest.raises(FileNotFoundError, match="gone.wav"):
        transform(missing)
    assert transform.num_tokens_from_header(missing) == 0
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(ValueError, match="corrupt.wav"):
        transform(corrupt)
    tiny = tmp_path / "tiny.wav"
    write_wav(tiny, np.zeros(399), 16000)
    with pytest.raises(ValueError, match=r"tiny\.wav.*shorter than one 25 ms frame"):
        transform(tiny)
    short = tmp_path / "short.wav"
    write_wav(short, np.zeros(1359), 16000)  # 6 frames
    with pytest.raises(ValueError, match=r"short\.wav.*6 fbank frames.*at least 7"):
        transform(short)
    enough = tmp_path / "enough.wav"
    write_wav(enough, np.zeros(1360), 16000)  # 7 frames
    features, tokens = transform(enough)
    assert features.shape == (7, 80) and tokens == 1


def test_settings_are_checked_and_shown():
    transform = KaldiFbankTransform(FbankSettings(num_mel_bins=40, dither=1.0), adapter_stride=1)
    assert (transform.sample_rate, transform.num_mel_bins) == (16000, 40)
    assert repr(transform) == ("KaldiFbankTransform(sample_rate=16000, num_mel_bins=40, frame_length_ms=25, "
                               "frame_shift_ms=10, dither=1, adapter_stride=1)")
    for bad in (FbankSettings(num_mel_bins=3), FbankSettings(dither=-1.0), FbankSettings(sample_rate=0)):
        with pytest.raises(ValueError, match="kaldi_fbank.py"):
            KaldiFbankTransform(bad)
    with pytest.raises(ValueError, match="adapter_stride"):
        KaldiFbankTransform(adapter_stride=4)
