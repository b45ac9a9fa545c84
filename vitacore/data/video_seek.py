"""Decoding chosen frames of a container video by seeking to key frames, not from the start.

A frame's *position* is its number in the sequential decode: the n-th frame the decoder outputs
from the start of the stream is position n. Positions are read from the packets' presentation
timestamps, in one pass over the packets that decodes nothing (a small share of the cost of
decoding them), sorted. That equals the decoder's numbering when every packet becomes one frame,
output in timestamp order. The pass refuses streams where this is in doubt (a packet without a
timestamp, two packets with the same one, a packet marked to discard or corrupt, an empty packet
before the end, a first frame that is not a key frame), and the decode checks it again on every
frame it outputs (each must carry the next position after the key frame it started from). A
stream that breaks it raises :class:`SeekUnreliable`, and the caller decodes sequentially instead
of returning other frames.

Decoding from a key frame gives the same pixels as reaching it from the start: nothing shown at
or after a key frame refers to a frame before it. Frames shown *before* the key frame but decoded
after it (the leading B-frames of an open GOP) may refer to earlier ones, so they are never taken
from a decode that started at that key frame.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from PIL import Image

__all__ = [
    "DecodeRun", "FrameTimeline", "SeekUnreliable", "decode_runs", "plan_runs", "planned_frames", "read_timeline",
]

# Frames decoded on rather than seeking: a seek flushes the decoder and refills its pipeline
# (its reorder delay and, with frame threads, one frame per thread), worth a few frames.
SEEK_MIN_SKIP = 8


class SeekUnreliable(Exception):
    """Seeking cannot be trusted to give the sequential decode's frames for this stream.

    Args:
        reason: what was found.
        num_frames_decoded: frames decoded before it was found (they still cost).
    """

    def __init__(self, reason: str, num_frames_decoded: int = 0):
        super().__init__(reason)
        self.num_frames_decoded = num_frames_decoded


@dataclass
class FrameTimeline:
    """Every frame's presentation timestamp and which frames are key frames, by position.

    Attributes:
        pts: presentation timestamps in display order; ``pts[n]`` is position n's.
        positions: timestamp -> position.
        key_positions: positions of the key frames, ascending (the first is 0).
    """

    pts: List[int]
    positions: Dict[int, int]
    key_positions: List[int]


@dataclass
class DecodeRun:
    """One seek and the decode forward from it.

    Attributes:
        start: position of the key frame the decode starts from.
        targets: positions to keep, ascending, all at or after ``start``.
    """

    start: int
    targets: List[int] = field(default_factory=list)


def read_timeline(container, stream, max_packets: int) -> FrameTimeline:
    """Reads every packet of ``stream`` (demuxing only) and numbers the frames they become.

    Args:
        container: an open PyAV input container; it is left at its end.
        stream: its video stream.
        max_packets: more packets than this are not indexed (reading them would cost more than
            the decode it saves).

    Raises:
        SeekUnreliable: a stream whose packets do not number its frames (see the module notes).
    """
    timestamps, key_timestamps, ended = [], [], False
    for packet in container.demux(stream):
        if packet.size == 0:  # the flush packet at the end; anywhere else it would drain the decoder
            ended = True
            continue
        if ended:
            raise SeekUnreliable("an empty packet before the end of the stream")
        if packet.pts is None or packet.is_discard or packet.is_corrupt:
            raise SeekUnreliable("a packet without a timestamp, or marked to discard or corrupt")
        timestamps.append(packet.pts)
        if packet.is_keyframe:
            key_timestamps.append(packet.pts)
        if len(timestamps) > max_packets:
            raise SeekUnreliable(f"more than {max_packets:,} packets")
    ordered = sorted(timestamps)
    positions = {pts: position for position, pts in enumerate(ordered)}
    if len(positions) != len(ordered):
        raise SeekUnreliable("two packets with the same timestamp")
    key_positions = sorted(positions[pts] for pts in key_timestamps)
    if not key_positions or key_positions[0] != 0:
        raise SeekUnreliable("the first frame is not a key frame")
    return FrameTimeline(ordered, positions, key_positions)


def plan_runs(targets: List[int], key_positions: List[int], min_skip: int = SEEK_MIN_SKIP) -> List[DecodeRun]:
    """Groups ``targets`` into decodes that each start from the key frame at or before their first.

    A target whose key frame is at most ``min_skip`` frames past the previous target joins that
    decode (decoding on is cheaper than seeking); any other starts a new one.

    Args:
        targets: positions to decode, ascending, without repeats.
        key_positions: the key frames' positions, ascending, starting with 0.
        min_skip: frames a seek must skip to be worth it.
    """
    runs: List[DecodeRun] = []
    for target in targets:
        key = key_positions[bisect.bisect_right(key_positions, target) - 1]
        if runs and key <= runs[-1].targets[-1] + min_skip:
            runs[-1].targets.append(target)
        else:
            runs.append(DecodeRun(key, [target]))
    return runs


def planned_frames(runs: List[DecodeRun]) -> int:
    """Frames the runs decode: from each start to its last target (frames decoded to display
    the last one, the reorder delay, aside)."""
    return sum(run.targets[-1] - run.start + 1 for run in runs)


def decode_runs(container, stream, timeline: FrameTimeline, runs: List[DecodeRun],
                max_decoded: int) -> Tuple[Dict[int, Image.Image], int, int]:
    """Seeks to each run's key frame and decodes forward to its last target.

    Args:
        container: the open PyAV input container of ``stream``.
        stream: the video stream, as read by :func:`read_timeline`.
        timeline: its frame numbering.
        runs: from :func:`plan_runs`.
        max_decoded: more frames than this decoded in all is given up (the demuxer landed far
            before the planned key frames).

    Returns:
        ``(frames, num_frames_decoded, num_seeks)``: each target position's frame as RGB.

    Raises:
        SeekUnreliable: a frame out of the numbering, a seek that landed past its target or off a
            key frame, the stream ending before a target, or a decoder error.
    """
    import av

    kept: Dict[int, Image.Image] = {}
    num_decoded = 0
    for run in runs:
        packets = None
        try:
            container.seek(timeline.pts[run.start], stream=stream, backward=True)  # also flushes the decoder
            packets = container.demux(stream)
            num_decoded = _decode_run(packets, timeline, run, kept, num_decoded, max_decoded)
        except av.FFmpegError as err:
            raise SeekUnreliable(f"decoder error while seeking: {err}", num_decoded) from None
        finally:
            if packets is not None:
                packets.close()
    return kept, num_decoded, len(runs)


def _decode_run(packets, timeline: FrameTimeline, run: DecodeRun, kept: Dict[int, Image.Image],
                num_decoded: int, max_decoded: int) -> int:
    """Decodes ``packets`` (the demux right after the run's seek) into ``kept``; the updated count."""
    wanted, last = set(run.targets), run.targets[-1]
    landed = None  # the position of the key frame decoding started from
    for packet in packets:
        if landed is None:
            if packet.size == 0 or not packet.is_keyframe or packet.pts not in timeline.positions:
                raise SeekUnreliable("the seek did not land on a key frame", num_decoded)
            landed = timeline.positions[packet.pts]
            if landed > run.targets[0]:
                raise SeekUnreliable("the seek landed past its target", num_decoded)
            expected = landed
        for frame in packet.decode():
            num_decoded += 1
            if num_decoded > max_decoded:
                raise SeekUnreliable(f"more than {max_decoded:,} frames decoded", num_decoded)
            position = timeline.positions.get(frame.pts)
            if position is None:
                raise SeekUnreliable("a decoded frame with an unknown timestamp", num_decoded)
            if position < landed:
                continue  # shown before the key frame: it may refer to frames not decoded here
            if position != expected:
                raise SeekUnreliable("decoded frames skip a position", num_decoded)
            expected += 1
            if position in wanted:
                kept[position] = frame.to_image().convert("RGB")
            if position == last:
                return num_decoded
    raise SeekUnreliable("the stream ended before a sampled frame", num_decoded)
