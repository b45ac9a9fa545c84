"""Audio input processing in plain numpy / torch (no torchaudio).

VITA's recipe: 16 kHz mono, waveform scaled to the int16 range, Kaldi-style 80-bin log mel
filterbank with a 25 ms / 10 ms frame; or, for a Whisper encoder, Whisper's own feature extractor
(:mod:`vitacore.data.whisper_audio`).
"""

from __future__ import annotations

import math
import os
import struct
import wave
from dataclasses import dataclass
from typing import Tuple, Union

import numpy as np
import torch

from vitacore.data.audio_files import audio_header, is_compressed_audio, read_compressed_channels

__all__ = [
    "AudioTransform", "audio_token_length", "fbank", "load_audio_channels", "load_wav", "resample",
    "wav_num_samples", "write_wav",
]

PathLike = Union[str, "os.PathLike[str]"]


# ---- WAV input / output ---------------------------------------------------
def write_wav(path: PathLike, samples: np.ndarray, sample_rate: int) -> None:
    """Writes float samples as a 16-bit PCM WAV file.

    Args:
        path: Output file path.
        samples: Float array in [-1, 1]; shape ``(num_samples,)`` for mono or
            ``(num_samples, num_channels)`` for multi-channel. Values outside
            the range are clipped.
        sample_rate: Sample rate in Hz.
    """
    data = np.asarray(samples, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2:
        raise ValueError(f"samples must be 1-D or (num_samples, channels), got {data.shape}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    # 32767 (not 32768) keeps +1.0 representable; rounding halves the error.
    pcm = np.round(np.clip(data, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(os.fspath(path), "wb") as out:
        out.setnchannels(pcm.shape[1])
        out.setsampwidth(2)
        out.setframerate(int(sample_rate))
        out.writeframes(pcm.tobytes())


def _pcm_to_float(raw: bytes, sample_width: int) -> np.ndarray:
    """Decodes interleaved little-endian PCM bytes to floats in [-1, 1)."""
    if sample_width == 1:
        # 8-bit WAV is unsigned with a 128 offset.
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if sample_width == 2:
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if sample_width == 3:
        # No numpy 24-bit dtype: place the 3 bytes in the top of an int32 so
        # the sign bit lands correctly, then scale as 32-bit.
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        val = (b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)
        return val.astype(np.float32) / 2147483648.0
    if sample_width == 4:
        # Through float64: float32 cannot hold 31-bit integers exactly.
        return (np.frombuffer(raw, dtype="<i4") / 2147483648.0).astype(np.float32)
    raise ValueError(f"unsupported sample width {sample_width} bytes")


def load_audio_channels(path: PathLike) -> Tuple[np.ndarray, int]:
    """Reads every channel of an audio file at its own sample rate, without mixing or resampling.

    WAV is read here; FLAC / MP3 / OGG (by extension) through ``soundfile``
    (:mod:`vitacore.data.audio_files`). Scaling is torchaudio's: 16-bit PCM is
    ``int16 / 32768``, 24/32-bit ``int32 / 2**31``, 8-bit ``(uint8 - 128) / 128``.

    Args:
        path: WAV file path (8, 16, 24 or 32-bit integer PCM), or FLAC/MP3/OGG.

    Returns:
        ``(samples, rate)``: float32 samples of shape ``(channels, num_samples)``
        and the file's sample rate in Hz.

    Raises:
        FileNotFoundError: If no file exists at ``path``.
        ValueError: If the file cannot be decoded (the message names it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path}")
    if is_compressed_audio(path):
        return read_compressed_channels(path)
    try:
        with wave.open(path, "rb") as src:
            channels = src.getnchannels()
            width = src.getsampwidth()
            rate = src.getframerate()
            raw = src.readframes(src.getnframes())
        if channels < 1 or rate <= 0:
            raise ValueError(f"bad header (channels={channels}, rate={rate})")
        samples = _pcm_to_float(raw, width)
        # A truncated data chunk can end mid-frame; drop the partial frame.
        samples = samples[: (samples.size // channels) * channels]
    # The stdlib reader signals malformed files in several ways (wave.Error,
    # EOFError, struct.error, even a bare RuntimeError from chunk seeking).
    except (wave.Error, EOFError, ValueError, RuntimeError, struct.error) as exc:
        raise ValueError(f"{path} is not a readable WAV file (expected RIFF/WAVE with "
                         f"8/16/24/32-bit integer PCM): {exc}") from exc
    return np.ascontiguousarray(samples.reshape(-1, channels).T), rate


def load_wav(path: PathLike, target_sample_rate: int = 16000) -> torch.Tensor:
    """Reads an audio file as a mono float waveform at ``target_sample_rate``.

    WAV is read here; FLAC / MP3 / OGG (by extension) through ``soundfile``
    (:mod:`vitacore.data.audio_files`). Multi-channel audio is averaged to
    mono; other sample rates are resampled with :func:`resample`.

    Args:
        path: WAV file path (8, 16, 24 or 32-bit integer PCM), or FLAC/MP3/OGG.
        target_sample_rate: Output sample rate in Hz.

    Returns:
        A float32 tensor of shape ``(num_samples,)`` with values in [-1, 1].

    Raises:
        FileNotFoundError: If no file exists at ``path``.
        ValueError: If the file cannot be decoded (the message names it).
    """
    samples, rate = load_audio_channels(path)
    mono = samples.mean(axis=0, dtype=np.float64).astype(np.float32)
    waveform = torch.from_numpy(mono)
    if rate != target_sample_rate:
        waveform = resample(waveform, rate, target_sample_rate)
    return waveform


def resample(
    waveform: torch.Tensor, orig_sample_rate: int, new_sample_rate: int, zeros: int = 6
) -> torch.Tensor:
    """Band-limited resampling with a Hann-windowed sinc kernel.

    Each output sample is a windowed-sinc weighted sum of the nearby input
    samples. When downsampling, the sinc cutoff is lowered to the new Nyquist
    rate so high frequencies are removed instead of aliasing.

    Args:
        waveform: 1-D float tensor.
        orig_sample_rate: Input rate in Hz.
        new_sample_rate: Output rate in Hz.
        zeros: Sinc zero crossings kept on each side of the kernel centre;
            more means a sharper (and slower) low-pass.

    Returns:
        A float32 tensor of length ``ceil(len(waveform) * new / orig)``.
    """
    if orig_sample_rate <= 0 or new_sample_rate <= 0:
        raise ValueError("sample rates must be positive")
    x = waveform.to(torch.float32).reshape(-1)
    if orig_sample_rate == new_sample_rate or x.numel() == 0:
        return x.clone()
    g = math.gcd(orig_sample_rate, new_sample_rate)
    orig, new = orig_sample_rate // g, new_sample_rate // g
    out_len = -(-x.numel() * new // orig)  # ceil without float error
    # 0.99 leaves a small transition band below Nyquist for the window.
    cutoff = 0.99 * min(1.0, new / orig)  # as a fraction of the input Nyquist
    half = int(math.ceil(zeros / cutoff))
    offsets = torch.arange(-half, half + 1, dtype=torch.int64)
    # Output j sits at input time j * orig / new = base + phase / new. Only
    # `new` distinct fractional phases exist, so their kernels are tabulated
    # once instead of re-evaluating sinc/cos for every output sample.
    phases = torch.arange(new, dtype=torch.float64)[:, None] / new
    dist = offsets[None, :].to(torch.float64) - phases  # (new, taps), in input samples
    kernel = cutoff * torch.special.sinc(cutoff * dist)
    window = torch.cos(dist * (math.pi / (2 * (half + 1)))).pow(2)  # Hann, zero at +-(half+1)
    table = (kernel * window).to(torch.float32)  # (new, 2 * half + 1)
    padded = torch.nn.functional.pad(x, (half, half + 1))

    out = torch.empty(out_len, dtype=torch.float32)
    chunk = 1 << 16  # bounds memory at chunk * (2 * half + 1) gathered samples
    for start in range(0, out_len, chunk):
        stop = min(start + chunk, out_len)
        pos = torch.arange(start, stop, dtype=torch.int64) * orig  # exact integers
        base, phase = pos // new, pos % new
        idx = base[:, None] + (offsets + half)[None, :]
        out[start:stop] = (padded[idx] * table[phase]).sum(dim=1)
    return out


# ---- filterbank features --------------------------------------------------
def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """HTK mel scale, as used by Kaldi."""
    return 1127.0 * torch.log1p(hz / 700.0)


def _mel_filterbank(
    num_bins: int, n_fft: int, sample_rate: int, low_hz: float, high_hz: float
) -> torch.Tensor:
    """Triangular filters evenly spaced on the mel scale.

    Returns:
        A ``(n_fft // 2 + 1, num_bins)`` weight matrix for a power spectrum.
    """
    mel_low = _hz_to_mel(torch.tensor(low_hz, dtype=torch.float64))
    mel_high = _hz_to_mel(torch.tensor(high_hz, dtype=torch.float64))
    step = (mel_high - mel_low) / (num_bins + 1)
    m = torch.arange(num_bins, dtype=torch.float64)
    left = (mel_low + m * step)[None, :]
    centre = left + step
    right = centre + step
    fft_mel = _hz_to_mel(torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft)
    fft_mel = fft_mel[:, None]
    # Triangles are linear in mel (not Hz), exactly like Kaldi's MelBanks.
    up = (fft_mel - left) / (centre - left)
    down = (right - fft_mel) / (right - centre)
    return torch.clamp(torch.minimum(up, down), min=0.0).to(torch.float32)


def fbank(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    num_mel_bins: int = 80,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> torch.Tensor:
    """Kaldi-style log mel filterbank features (no dither, deterministic).

    Follows Kaldi's fbank defaults as VITA uses them: scale by 32768 (the
    int16 range Kaldi expects), frame with snipped edges, remove each frame's
    DC offset, pre-emphasize (0.97), apply a Povey window, zero-pad to a power
    of two, pool the power spectrum with triangular HTK-mel filters from 20 Hz
    to Nyquist, and take the log (floored at float32 eps).

    Args:
        waveform: 1-D float tensor in [-1, 1] (a ``(1, N)`` tensor is accepted).
        sample_rate: Waveform sample rate in Hz.
        num_mel_bins: Number of mel filters.
        frame_length_ms: Frame (window) length in milliseconds.
        frame_shift_ms: Hop between frames in milliseconds.

    Returns:
        A float32 tensor of shape ``(num_frames, num_mel_bins)`` where
        ``num_frames = 1 + (num_samples - window) // shift``.

    Raises:
        ValueError: If the clip is shorter than one frame, or the waveform is
            not 1-D / single-channel.
    """
    x = waveform.to(torch.float32)
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1:
        raise ValueError(f"fbank expects a mono 1-D waveform, got shape {tuple(waveform.shape)}")
    window = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    if window <= 1 or shift <= 0:
        raise ValueError("frame length/shift too small for this sample rate")
    if x.numel() < window:
        raise ValueError(f"audio clip shorter than one {frame_length_ms:g} ms frame "
                         f"({x.numel()} samples < {window})")

    # float64 through the spectrum: int16-scaled powers reach ~1e13, where
    # float32 rounding would be visible in quiet bins next to loud ones.
    x = x.to(torch.float64) * 32768.0
    frames = x.unfold(0, window, shift)  # (T, window), snip_edges=True
    frames = frames - frames.mean(dim=1, keepdim=True)
    # Kaldi pre-emphasis: x[i] -= 0.97 * x[i-1], with x[-1] taken as x[0].
    prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - 0.97 * prev
    povey = torch.hann_window(window, periodic=False, dtype=torch.float64).pow(0.85)
    frames = frames * povey
    n_fft = 1 << (window - 1).bit_length()
    power = torch.fft.rfft(frames, n=n_fft, dim=1).abs().pow(2)

    banks = _mel_filterbank(num_mel_bins, n_fft, sample_rate, 20.0, sample_rate / 2.0)
    mel = power @ banks.to(torch.float64)
    eps = torch.finfo(torch.float32).eps
    return torch.log(torch.clamp(mel, min=eps)).to(torch.float32)


def audio_token_length(num_frames: int) -> int:
    """Number of LLM tokens VITA's audio adapter emits for ``num_frames`` frames.

    VITA sizes the audio span as ``len(x[2::2][2::2][0::2])`` for a
    length-``num_frames`` sequence ``x`` (two stride-2 subsampling steps in
    the encoder, then one more in the adapter). This evaluates the same
    length arithmetically, without building a tensor.

    Args:
        num_frames: Number of fbank frames (``T``).

    Returns:
        The number of audio embedding positions in the LLM input.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be non-negative, got {num_frames}")
    # len(x[s::2]) for len(x) == n is max(0, ceil((n - s) / 2)).
    n = max(0, (num_frames - 1) // 2)  # [2::2]
    n = max(0, (n - 1) // 2)  # [2::2]
    return (n + 1) // 2  # [0::2]


@dataclass
class AudioTransform:
    """Loads an audio file (WAV/FLAC/MP3) and returns fbank features plus the LLM token count.

    Attributes:
        sample_rate: Rate the audio is resampled to before feature extraction.
        num_mel_bins: Number of mel filterbank bins.
    """

    sample_rate: int = 16000
    num_mel_bins: int = 80

    def __call__(self, path: PathLike) -> Tuple[torch.Tensor, int]:
        """Processes one audio file.

        Args:
            path: audio file path (WAV, FLAC, MP3 or OGG).

        Returns:
            ``(features, num_llm_tokens)``: a float32 ``(T, num_mel_bins)``
            tensor and ``audio_token_length(T)``.

        Raises:
            FileNotFoundError: If the file is missing.
            ValueError: If the file is unreadable or shorter than one frame.
        """
        waveform = load_wav(path, target_sample_rate=self.sample_rate)
        try:
            feats = fbank(waveform, sample_rate=self.sample_rate, num_mel_bins=self.num_mel_bins)
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)}: {exc}") from exc
        return feats, audio_token_length(feats.shape[0])

    def num_tokens_from_header(self, path: PathLike) -> int:
        """LLM tokens of the clip at ``path``, from its WAV header alone (no samples decoded).

        Exact for a well-formed WAV: the sample count after resampling and the frame count are the
        same integer arithmetic :meth:`__call__` goes through. A truncated data chunk (the header
        claims more frames than the file holds) overestimates; an unreadable file counts 0.
        """
        samples = wav_num_samples(path, self.sample_rate)
        window, shift = int(self.sample_rate * 0.025), int(self.sample_rate * 0.010)  # fbank's defaults
        frames = 0 if samples < window else 1 + (samples - window) // shift
        return audio_token_length(frames)


def wav_num_samples(path: PathLike, target_sample_rate: int) -> int:
    """Samples per channel of an audio file once resampled to ``target_sample_rate``, from its header.

    WAV headers are read here; FLAC / MP3 / OGG through ``soundfile.info``. Returns 0 for a
    missing or unreadable file (the loader reports those).
    """
    header = audio_header(path)
    if header is None or header[1] <= 0:
        return 0
    frames, rate = header
    if rate == target_sample_rate:
        return frames
    g = math.gcd(rate, target_sample_rate)
    return -(-frames * (target_sample_rate // g) // (rate // g))  # resample()'s ceil
