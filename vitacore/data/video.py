"""Video decoding and VITA's frame sampling.

Container formats (.mp4, .avi, .mov, .webm, .mkv) are decoded with PyAV, whose wheels bundle
FFmpeg, so the same ``pip install`` works on CPU and GPU machines with no system libraries.
Animated GIF/WebP go through PIL, their frame rate taken from the frames' durations.

A container video is decoded only around the sampled frames: from the key frame at or before each
one (see :mod:`vitacore.data.video_seek`), falling back to decoding from the start when the
stream's timestamps cannot number its frames. Both give the same frames.

VITA's rule for every clip (``_get_rawvideo_dec``, which reads GIFs too): take every
``round(fps / 3)``-th frame of the whole clip; more than 16 positions are thinned to 16 and fewer
than 4 are stretched to 4 (with repeats), both with ``np.linspace(..., dtype=int)`` over the positions.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from vitacore.data.images import open_image
from vitacore.data.media_limits import MediaLimitError, MediaLimits
from vitacore.data.video_seek import SeekUnreliable, decode_runs, plan_runs, planned_frames, read_timeline

__all__ = [
    "CONTAINER_EXTENSIONS", "VIDEO_FPS", "VIDEO_MAX_FRAMES", "VIDEO_MIN_FRAMES", "ContainerDecode",
    "count_sampled_frames", "decode_container", "load_video", "sample_frame_indices",
]

VIDEO_FPS = 3  # VITA's video_framerate
VIDEO_MIN_FRAMES = 4  # VITA's MIN_IMAGE_LENGTH
VIDEO_MAX_FRAMES = 16  # VITA's MAX_IMAGE_LENGTH
CONTAINER_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".webm", ".mkv", ".m4v"})
# Packets indexed for seeking per frame the limits allow decoding: demuxing a packet costs about
# a hundredth of decoding it, so indexing stays cheaper than the decode the limit allows.
_PACKETS_PER_DECODED_FRAME = 50


@dataclass
class ContainerDecode:
    """The sampled frames of a container video, and what decoding them cost.

    Attributes:
        frames: the sampled frames, RGB, one per entry of ``indices``.
        fps: the stream's average frame rate (0.0 when unknown).
        indices: each frame's position in the stream (the n-th frame decoded from the start is n).
        num_frames_decoded: frames the decoder output to get them, those thrown away included.
        num_seeks: seeks made; 0 when the frames came from decoding from the start.
    """

    frames: List[Image.Image]
    fps: float
    indices: List[int]
    num_frames_decoded: int
    num_seeks: int


def sample_frame_indices(num_frames: int, fps: float, target_fps: float = VIDEO_FPS,
                         min_frames: int = VIDEO_MIN_FRAMES, max_frames: int = VIDEO_MAX_FRAMES) -> List[int]:
    """Indices of the frames VITA keeps from a clip of ``num_frames`` frames at ``fps``.

    Args:
        num_frames: frames in the clip.
        fps: the clip's average frame rate.
        target_fps: rate to sample at (VITA: 3).
        min_frames: fewer positions than this are stretched to it, repeating frames.
        max_frames: more positions than this are thinned to it.

    Returns:
        Frame indices in ascending order (repeats possible for short clips); empty for an empty clip.
    """
    if num_frames <= 0:
        return []
    # VITA's stride is 0 (and crashes) below 1.5 fps; every frame is the closest to its intent.
    stride = max(1, int(round(fps / target_fps))) if fps > 0 else 1
    positions = list(range(0, num_frames, stride))
    if len(positions) > max_frames:
        picks = np.linspace(0, len(positions) - 1, num=max_frames, dtype=int)
    elif len(positions) < min_frames:
        picks = np.linspace(0, len(positions) - 1, num=min_frames, dtype=int)
    else:
        return positions
    return [positions[int(i)] for i in picks]


def _is_container(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in CONTAINER_EXTENSIONS


def _container_meta(container) -> Tuple[int, float]:
    """(frame count, average fps) of the first video stream, from metadata; count 0 if unknown."""
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or 0
    fps = float(rate)
    frames = int(stream.frames or 0)
    if frames <= 0 and fps > 0:
        # Some containers (webm, mkv) carry no frame count; estimate it from the duration.
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / 1_000_000  # av.time_base is microseconds
        else:
            seconds = 0.0
        frames = int(round(seconds * fps))
    return frames, fps


def _decode_at(path: str, indices: List[int]) -> Tuple[List[Image.Image], int]:
    """Decodes ``path`` from the start, keeping the frames at ``indices``; also returns the frames decoded."""
    import av

    wanted = set(indices)
    kept = {}
    seen = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if seen in wanted:
                kept[seen] = frame.to_image().convert("RGB")
            seen += 1
            if seen > max(wanted, default=-1) and len(kept) == len(wanted):
                break
    return [kept[i] for i in indices if i in kept], seen


def _count_decoded(path: str, limit: int) -> int:
    """Frames actually decodable in ``path`` (used when the metadata count was wrong), up to ``limit + 1``."""
    import av

    seen = 0
    with av.open(path) as container:
        for _ in container.decode(container.streams.video[0]):
            seen += 1
            if seen > limit:  # enough to refuse the file; decoding on would be unbounded
                break
    return seen


def _decode_sequential(path: str, num_frames: int, fps: float, limits: MediaLimits) -> ContainerDecode:
    """The sampled frames, decoded from the start of the file up to the last one."""
    # Sampling spans the whole clip, so decoding reaches (nearly) its last frame.
    limits.check("max_video_frames_decoded", num_frames, "frames to decode (the container's count)", path)
    indices = sample_frame_indices(num_frames, fps)
    frames, num_decoded = _decode_at(path, indices)
    if not indices or len(frames) != len(indices):
        # The metadata over-counted (or had no count): sample from what really decodes.
        decodable = _count_decoded(path, limits.max_video_frames_decoded)
        num_decoded += decodable
        limits.check("max_video_frames_decoded", decodable, "frames to decode (at least)", path)
        indices = sample_frame_indices(decodable, fps)
        frames, num_retried = _decode_at(path, indices)
        num_decoded += num_retried
        if len(frames) != len(indices):
            raise ValueError("decoding did not return the expected frames")
    if not frames:
        raise ValueError("no decodable frames")
    return ContainerDecode(frames, fps, indices, num_decoded, num_seeks=0)


def _decode_seeking(container, num_frames: int, fps: float, limits: MediaLimits, path: str) -> ContainerDecode:
    """The frames :func:`_decode_sequential` gives, decoded from the key frames before them.

    Raises:
        SeekUnreliable: the stream's packets cannot number its frames, or seeking went wrong.
    """
    stream = container.streams.video[0]
    timeline = read_timeline(container, stream, _PACKETS_PER_DECODED_FRAME * limits.max_video_frames_decoded)
    num_packets = len(timeline.pts)
    indices = sample_frame_indices(num_frames, fps)
    if not indices or indices[-1] >= num_packets:
        indices = sample_frame_indices(num_packets, fps)  # as the sequential decode's recount does
    runs = plan_runs(sorted(set(indices)), timeline.key_positions)
    limits.check("max_video_frames_decoded", planned_frames(runs),
                 "frames to decode (from the key frames before the sampled ones)", path)
    kept, num_decoded, num_seeks = decode_runs(container, stream, timeline, runs,
                                               limits.max_video_frames_decoded)
    return ContainerDecode([kept[i] for i in indices], fps, indices, num_decoded, num_seeks)


def _decode_container(path: str, limits: MediaLimits, seek: bool) -> ContainerDecode:
    import av

    num_failed = 0  # frames a seeking attempt decoded before giving up
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        num_frames, fps = _container_meta(container)
        stream = container.streams.video[0]
        limits.check("max_image_pixels", stream.codec_context.width * stream.codec_context.height,
                     "pixels per frame", path)
        if seek:
            stream.thread_type = "AUTO"
            try:
                return _decode_seeking(container, num_frames, fps, limits, path)
            except SeekUnreliable as failed:
                num_failed = failed.num_frames_decoded
            except av.FFmpegError:
                pass  # a damaged stream: the sequential decode reports it as it always has
    decoded = _decode_sequential(path, num_frames, fps, limits)
    decoded.num_frames_decoded += num_failed
    return decoded


def decode_container(path: str, limits: Optional[MediaLimits] = None, seek: bool = True) -> ContainerDecode:
    """Sampled RGB frames of a container video (VITA's 3 fps / 4..16 rule), with decoding stats.

    Args:
        path: the video file (one of :data:`CONTAINER_EXTENSIONS`).
        limits: the run's media limits (None: the defaults). ``max_video_frames_decoded`` bounds the
            frames decoded: from the key frames when seeking, else the container's frame count.
        seek: decode only from the key frame before each sampled frame. False decodes from the
            start of the file; both give the same frames. A stream whose timestamps cannot number
            its frames is decoded from the start either way.

    Returns:
        The frames, their positions, the frame rate and the frames decoded to get them.

    Raises:
        FileNotFoundError: no file at ``path``.
        MediaLimitError: too many frames to decode, or too many pixels per frame.
        ValueError: the file cannot be decoded; the message names the file.
    """
    import av

    path, limits = _existing_video(path), limits or MediaLimits()
    try:
        return _decode_container(path, limits, seek)
    except MediaLimitError:
        raise
    except (av.FFmpegError, ValueError, IndexError, OSError) as err:
        raise ValueError(f"{path} is not a readable video: {err}") from None


def _existing_video(path) -> str:
    """``path`` as a string; FileNotFoundError when no file is there."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path!r} does not exist")
    return path


def _animated_fps(durations_ms: List[float]) -> float:
    total_ms = sum(durations_ms)
    return 1000.0 * len(durations_ms) / total_ms if total_ms > 0 else 0.0


def _load_animated_image(path: str, max_frames: int, limits: MediaLimits) -> Tuple[List[Image.Image], float]:
    """The sampled frames of a GIF / WebP; never more than its frame count (checked first) is decoded,
    and only the sampled frames are kept."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # open_image checked the canvas
        with open_image(path, limits) as clip:
            durations = _gif_durations(path)
            if durations is None:  # WebP and others: a frame's duration is known once it is decoded
                durations = []
                for frame in ImageSequence.Iterator(clip):
                    frame.load()
                    durations.append(frame.info.get("duration") or 0)
            fps = _animated_fps(durations)
            indices = sample_frame_indices(len(durations), fps, max_frames=max_frames)
            wanted, kept = set(indices), {}
            for position, frame in enumerate(ImageSequence.Iterator(clip)):
                if position in wanted:
                    kept[position] = frame.convert("RGB")
                if len(kept) == len(wanted):
                    break
    return [kept[i] for i in indices if i in kept], fps


def load_video(path: str, max_frames: int = VIDEO_MAX_FRAMES,
               limits: Optional[MediaLimits] = None) -> Tuple[List[Image.Image], float]:
    """Sampled RGB frames of the video at ``path`` and its source frame rate.

    Every clip follows VITA's 3 fps / 4..16 frames rule (the rate of an animated GIF/WebP comes
    from its frame durations; without any, every frame counts).

    Args:
        path: the video file.
        max_frames: cap for animated images (container video uses VITA's fixed 16).
        limits: the run's media limits, checked before decoding (None: the defaults).

    Returns:
        ``(frames, fps)``; ``fps`` is 0.0 when the file states no timing.

    Raises:
        FileNotFoundError: no file at ``path``.
        MediaLimitError: too many frames to decode, or too many pixels per frame.
        ValueError: the file cannot be decoded; the message names the file.
    """
    path, limits = _existing_video(path), limits or MediaLimits()
    if _is_container(path):
        decoded = decode_container(path, limits)
        return decoded.frames, decoded.fps
    try:
        return _load_animated_image(path, max_frames, limits)
    except MediaLimitError:
        raise
    except Image.DecompressionBombError as err:  # a frame larger than the canvas
        raise MediaLimitError(f"media file {path}: {err} (--max_image_pixels {limits.max_image_pixels:,})",
                              path) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable video (expected an animated GIF/WebP "
                         f"or one of {sorted(CONTAINER_EXTENSIONS)}): {err}") from None


def count_sampled_frames(path: str, max_frames: int = VIDEO_MAX_FRAMES) -> Optional[int]:
    """Frames :func:`load_video` keeps of ``path``, from metadata alone; None if unreadable."""
    path = os.fspath(path)
    if _is_container(path):
        try:
            import av

            with av.open(path) as container:
                num_frames, fps = _container_meta(container)
        except Exception:  # noqa: BLE001 - any failure means "unknown"; the loader reports it
            return None
        return len(sample_frame_indices(num_frames, fps)) or None
    try:
        durations = _gif_durations(path)
        if durations is None:  # WebP: PIL walks the frames
            with Image.open(path) as clip:
                durations = [frame.info.get("duration") or 0 for frame in ImageSequence.Iterator(clip)]
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return len(sample_frame_indices(len(durations), _animated_fps(durations), max_frames=max_frames)) or None


def _gif_durations(path: str) -> Optional[List[int]]:
    """Each frame's duration in ms, as PIL reports it (its Graphic Control Extension delay x 10, else 0),
    read from the GIF's blocks alone: PIL's frame iterator decodes every frame to get there.

    Returns:
        None when ``path`` is not a GIF.

    Raises:
        ValueError: a GIF whose blocks are cut short or unknown.
    """
    with open(path, "rb") as fh:
        header = fh.read(13)
        if not header.startswith(b"GIF"):
            return None
        if len(header) < 13:
            raise ValueError("GIF header cut short")
        _skip_colour_table(fh, header[10])
        durations, delay = [], 0
        while True:
            kind = fh.read(1)
            if kind in (b"", b";"):
                return durations
            if kind == b"!":  # an extension: label, then data sub-blocks
                label = fh.read(1)
                blocks = _sub_blocks(fh)
                if label == b"\xf9" and len(blocks) and len(blocks[0]) >= 3:
                    delay = int.from_bytes(blocks[0][1:3], "little") * 10
            elif kind == b",":  # an image: descriptor, colour table, LZW size, data sub-blocks
                descriptor = fh.read(9)
                if len(descriptor) < 9:
                    raise ValueError("GIF image descriptor cut short")
                _skip_colour_table(fh, descriptor[8])
                fh.read(1)
                _sub_blocks(fh)
                durations.append(delay)
                delay = 0  # a control extension applies to the next image only
            else:
                raise ValueError(f"unknown GIF block {kind!r}")


def _skip_colour_table(fh, flags: int) -> None:
    if flags & 0x80:
        fh.seek(3 * (2 << (flags & 7)), os.SEEK_CUR)


def _sub_blocks(fh) -> list:
    """Read data sub-blocks up to their terminator; the first one is returned whole, the rest skipped."""
    first = []
    while True:
        size = fh.read(1)
        if not size or size[0] == 0:
            return first
        if first:
            fh.seek(size[0], os.SEEK_CUR)
        else:
            first = [fh.read(size[0])]
