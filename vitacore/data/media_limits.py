"""What one record's media may cost: pixels, frames, audio rate and length, images and tiles per record.

Every limit is read from the file's header or the record's text before anything is decoded, so a
hostile file (a decompression bomb, a WAV claiming 4 GHz, a 3,000-frame GIF) costs a header read, not
gigabytes. Over a limit is a bad sample (:class:`~vitacore.data.bad_samples.BadSampleError`): with
``--on_bad_sample skip`` it is replaced and counted, with ``error`` the run stops naming the file,
the measured value and the flag that raises the limit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

from vitacore.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN
from vitacore.data.bad_samples import BadSampleError

__all__ = ["MediaLimitError", "MediaLimits", "check_record_media"]


class MediaLimitError(BadSampleError):
    """A media file or record over one of the :class:`MediaLimits`."""


@dataclass(frozen=True)
class MediaLimits:
    """Per-record media limits; each attribute is the data flag of the same name.

    Attributes:
        max_image_pixels: pixels of one image (or animation frame), from its header.
        max_images_per_record: images and videos of one record, or their placeholders in the text.
        max_tiles_per_record: tiles the record's images make once tiling is planned.
        max_video_frames_decoded: frames decoded from one container video.
        max_animation_frames: frames of one animated image (GIF, WebP), as an image or a video.
        max_audio_sample_rate: an audio file's sample rate in Hz, from its header.
        max_audio_seconds: an audio file's length in seconds, from its header.
    """

    max_image_pixels: int = 89_478_485  # Pillow's own warning threshold
    max_images_per_record: int = 64
    max_tiles_per_record: int = 256
    max_video_frames_decoded: int = 20_000
    max_animation_frames: int = 1_000
    max_audio_sample_rate: int = 192_000
    max_audio_seconds: float = 600.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not value > 0 or value == float("inf"):  # also refuses NaN
                raise ValueError(f"--{field.name} must be a positive, finite number, got {value!r}")

    @classmethod
    def from_args(cls, args) -> "MediaLimits":
        """The limits from an object with one attribute per flag (the run's ``DataArguments``)."""
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})

    def check(self, flag: str, measured: float, what: str, path: Optional[str] = None) -> None:
        """Refuse ``measured`` when it is over the limit named ``flag``.

        Args:
            flag: the attribute (and flag) name, e.g. ``"max_image_pixels"``.
            measured: the value read from the header or the record.
            what: what was measured, for the message (``"pixels"``, ``"frames"``).
            path: the media file (None: the record itself is over the limit).

        Raises:
            MediaLimitError: over the limit; the message names the file, value, limit and flag.
        """
        limit = getattr(self, flag)
        if measured > limit:
            subject = f"media file {path}" if path else "the record"
            raise MediaLimitError(
                f"{subject} has {_number(measured)} {what}, over the limit --{flag} {_number(limit)} "
                f"(refused before decoding); raise --{flag} to accept it, or drop the record", path)


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def check_record_media(conversations: Sequence[dict], image_paths: Sequence[str], video_paths: Sequence[str],
                       limits: MediaLimits, tiles_of=None) -> None:
    """Refuse a record with too many images, videos or tiles, before any of them is decoded.

    Args:
        conversations: the record's turns; their ``<image>`` / ``<video>`` placeholders are counted.
        image_paths: the record's image files (resolved paths).
        video_paths: the record's video files.
        limits: the run's limits.
        tiles_of: image path -> planned tile count, from the header (None: one tile per image).

    Raises:
        MediaLimitError: over ``max_images_per_record`` or ``max_tiles_per_record``.
    """
    placeholders = sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) + turn["value"].count(DEFAULT_VIDEO_TOKEN)
                       for turn in conversations if isinstance(turn, dict) and isinstance(turn.get("value"), str))
    items = max(placeholders, len(image_paths) + len(video_paths))
    limits.check("max_images_per_record", items, "images/videos (or <image>/<video> placeholders)")
    if tiles_of is not None:  # at most max_images_per_record headers to read
        tiles = sum(tiles_of(path) for path in image_paths)
        limits.check("max_tiles_per_record", tiles, "image tiles once tiled")
