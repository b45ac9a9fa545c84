"""Audio file headers (rate and length, read before decoding), and compressed audio (FLAC, MP3, OGG)
through ``soundfile``.

WAV keeps the pure-Python reader in :mod:`vitacore.data.audio`; other formats are decoded by
libsndfile, which the ``soundfile`` wheels bundle (FLAC always, MP3 from libsndfile 1.1), so no
system library or torchaudio build has to match the installed torch.
"""

from __future__ import annotations

import os
import struct
import wave
from typing import Optional, Tuple

import numpy as np

from vitacore.data.media_limits import MediaLimits

__all__ = [
    "COMPRESSED_AUDIO_EXTENSIONS", "audio_header", "check_audio_limits", "compressed_num_frames",
    "is_compressed_audio", "read_compressed", "read_compressed_channels",
]

COMPRESSED_AUDIO_EXTENSIONS = frozenset({".flac", ".mp3", ".ogg", ".oga"})


def is_compressed_audio(path: str) -> bool:
    """Whether ``path`` is decoded here rather than by the WAV reader (by extension)."""
    return os.path.splitext(os.fspath(path))[1].lower() in COMPRESSED_AUDIO_EXTENSIONS


def read_compressed_channels(path: str) -> tuple[np.ndarray, int]:
    """Every channel as float32 samples in [-1, 1] (16-bit sources: int16 / 32768), and the sample rate.

    Returns:
        ``(samples, rate)`` with ``samples`` of shape ``(channels, num_samples)``.

    Raises:
        ValueError: libsndfile cannot decode the file; the message names it.
    """
    import soundfile

    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise ValueError(f"{path} is not a readable audio file: {err}") from None
    if data.shape[0] == 0 or rate <= 0:
        raise ValueError(f"{path} is not a readable audio file: no samples (rate={rate})")
    return np.ascontiguousarray(data.T), int(rate)


def read_compressed(path: str) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the file's sample rate.

    Raises:
        ValueError: libsndfile cannot decode the file; the message names it.
    """
    data, rate = read_compressed_channels(path)
    # Average channels in float64 like the WAV reader, so both paths give the same mono mix.
    return data.mean(axis=0, dtype=np.float64).astype(np.float32), rate


def compressed_num_frames(path: str) -> tuple[int, int]:
    """(frames per channel, sample rate) from the file's metadata; (0, 0) if unreadable."""
    import soundfile

    try:
        info = soundfile.info(path)
    except Exception:  # noqa: BLE001 - any failure means "unknown"; the loader reports it
        return 0, 0
    return int(info.frames), int(info.samplerate)


def audio_header(path: str) -> Optional[Tuple[int, int]]:
    """``(frames per channel, sample rate)`` from the file's header, no samples decoded; None if unreadable.

    WAV headers are read here; FLAC / MP3 / OGG through ``soundfile.info``.
    """
    if is_compressed_audio(path):
        frames, rate = compressed_num_frames(os.fspath(path))
        return (frames, rate) if rate > 0 else None
    try:
        with wave.open(os.fspath(path), "rb") as src:
            return src.getnframes(), src.getframerate()
    except (OSError, wave.Error, EOFError, RuntimeError, struct.error):
        return None


def check_audio_limits(path: str, limits: MediaLimits) -> None:
    """Refuse an audio file whose header claims a rate or length over ``limits``, before it is decoded
    (a header claiming 4,294,967,295 Hz would make resampling allocate tens of GB).

    An unreadable header passes: the loader reports the file.

    Raises:
        MediaLimitError: over ``max_audio_sample_rate`` or ``max_audio_seconds``.
    """
    header = audio_header(path)
    if header is None or header[1] <= 0:
        return
    frames, rate = header
    limits.check("max_audio_sample_rate", rate, "Hz as its sample rate", os.fspath(path))
    limits.check("max_audio_seconds", frames / rate, "seconds of audio", os.fspath(path))
