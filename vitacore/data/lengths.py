"""Per-record lengths in LLM tokens, media tokens included, without decoding any media.

The grouped sampler (``--group_by_modality_length``) needs one signed length per record before
training starts. Decoding every image, video and audio file for that would cost as much as an
epoch of data loading, so this module reads only what fixes the token count:

* an image is ``tokens_per_image`` tokens per tile: one tile, or with dynamic tiling a count that
  follows from the image size, read from the file header (PIL decodes pixels lazily);
* a video is as many images as :func:`vitacore.data.video.load_video` samples; the frame count and
  rate come from the container's metadata (PyAV) or PIL's ``n_frames`` for GIF/WebP, no pixels
  decoded;
* an audio clip's tokens follow from its sample count, read from the WAV header or, for
  FLAC/MP3, ``soundfile.info`` (see
  :meth:`vitacore.data.audio.AudioTransform.num_tokens_from_header`).

The text is tokenized exactly as :func:`vitacore.data.conversation.tokenize_conversation` does for
the sample, so for a readable record the length equals the model input length exactly.

:func:`compute_lengths` counts many records at once in a pool of forked processes (each inherits
the records and the tokenizer, nothing is pickled but the results); :mod:`vitacore.data.length_cache`
keeps the result beside the data.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from vitacore.constants import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX
from vitacore.data.conversation import ChatTemplate, tokenize_conversation
from vitacore.data.records import as_list
from vitacore.data.turns import prepare_turns
from vitacore.data.video import VIDEO_MAX_FRAMES, count_sampled_frames

__all__ = ["LengthCounter", "compute_lengths", "count_video_frames", "record_length"]


def count_video_frames(path: str, max_frames: int) -> int:
    """Frames the dataset keeps of the video at ``path``, from container metadata only.

    Same rule as :func:`vitacore.data.video.load_video` (VITA's 3 fps, 4..16 frames for container
    video; ``min(n_frames, max_frames)`` for GIF/WebP). An unreadable or missing file counts one
    frame: the bad-sample handling in ``__getitem__`` deals with the file; here it only has to
    yield a plausible length.
    """
    return count_sampled_frames(path, max_frames) or 1


def record_length(record: dict, resolve: Callable[[str], str], tokenizer, template: ChatTemplate,
                  tokens_per_image: int, audio_tokens: Optional[Callable[[str], int]],
                  max_video_frames: int, image_tiles: Optional[Callable[[str], int]] = None) -> int:
    """One record's signed length: tokens of the model input, positive with media, negative without.

    Args:
        record: a VITA record.
        resolve: media path as written in the record -> path on disk.
        tokenizer: the LLM's tokenizer.
        template: the chat template.
        tokens_per_image: LLM tokens one image (or video frame) becomes.
        audio_tokens: audio path -> LLM tokens, from the file's header (None: no audio encoder).
        max_video_frames: the dataset's cap on frames per video.
        image_tiles: image path -> tiles (from the header); None: one per image.

    Returns:
        The length, never 0 (the sampler reads the sign as the modality).
    """
    images, videos = as_list(record.get("image")), as_list(record.get("video"))
    audios = as_list(record.get("audio"))
    tile_counts = [image_tiles(resolve(rel)) for rel in images] if image_tiles else [1] * len(images)
    frame_counts = [count_video_frames(resolve(rel), max_video_frames) for rel in videos]
    conversations, inserted_id = prepare_turns(record["conversations"], record.get("inserted_id"),
                                               tile_counts, frame_counts)
    modality = "video" if videos else "image" if images else "lang"
    try:
        ids, _ = tokenize_conversation(conversations, tokenizer, template, modality, inserted_id,
                                       end_tag=record.get("end_tag", True))
        text = sum(1 for i in ids if i not in (IMAGE_TOKEN_INDEX, AUDIO_TOKEN_INDEX))
    except ValueError:
        # A malformed record (turn order) fails in __getitem__ with its own message; a rough
        # length keeps the sampler going until then.
        text = sum(len(turn.get("value", "")) for turn in conversations) // 4 + 1
    media = (sum(tile_counts) + sum(frame_counts)) * tokens_per_image
    if audios and audio_tokens is not None:
        media += sum(audio_tokens(resolve(rel)) for rel in audios)
    length = max(1, text + media)
    # LLaVA's convention: positive with media, negative for text-only records.
    return length if (images or videos or audios) else -length


@dataclass
class LengthCounter:
    """Everything that fixes a record's length, bound together: ``counter(record)`` is its
    :func:`record_length`.

    Attributes:
        media_root: folder relative media paths start from.
        tokenizer: the LLM's tokenizer.
        template: the chat template.
        tokens_per_image: LLM tokens per image tile or video frame.
        audio_transform: the audio transform (its ``num_tokens_from_header``); None: no audio encoder.
        image_tiler: the run's tiling (its ``count_from_header``); None: one tile per image.
        max_video_frames: the cap on frames per video.
    """

    media_root: str
    tokenizer: object
    template: ChatTemplate
    tokens_per_image: int
    audio_transform: Optional[object] = None
    image_tiler: Optional[object] = None
    max_video_frames: int = VIDEO_MAX_FRAMES

    def _resolve(self, rel: str) -> str:
        return rel if os.path.isabs(rel) else os.path.join(self.media_root, rel)

    def __call__(self, record: dict) -> int:
        audio_tokens = getattr(self.audio_transform, "num_tokens_from_header", None)
        image_tiles = self.image_tiler.count_from_header if self.image_tiler is not None else None
        return record_length(record, self._resolve, self.tokenizer, self.template, self.tokens_per_image,
                             audio_tokens, self.max_video_frames, image_tiles=image_tiles)

    def settings(self) -> dict:
        """The settings other than the tokenizer, as JSON values (for the cache's fingerprint)."""
        return {"media_root": os.path.abspath(self.media_root), "template": dataclasses.asdict(self.template),
                "tokens_per_image": self.tokens_per_image, "max_video_frames": self.max_video_frames,
                "image_tiler": describe(self.image_tiler), "audio_transform": describe(self.audio_transform)}


def describe(obj, depth: int = 0) -> object:
    """A JSON description of a settings object: its type and fields (dataclasses, ``to_dict()``, or
    its attributes), recursively (a few levels; arrays and other opaque values left out)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if depth > 4:
        return repr(obj)[:200]
    if isinstance(obj, (list, tuple)):
        return [describe(item, depth + 1) for item in obj]
    if isinstance(obj, dict):
        return {str(key): describe(value, depth + 1) for key, value in obj.items()}
    if dataclasses.is_dataclass(obj):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    elif callable(getattr(obj, "to_dict", None)):
        fields = obj.to_dict()
    else:
        fields = {key: value for key, value in vars(obj).items() if not key.startswith("_")}
    kept = {key: describe(value, depth + 1) for key, value in fields.items()
            if value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))
            or dataclasses.is_dataclass(value) or hasattr(value, "__dict__")}
    return {"type": f"{type(obj).__module__}.{type(obj).__qualname__}", **kept}


# A forked pool worker finds its records and counter here (set by the parent just before the fork).
_JOB: Optional[tuple[Sequence, LengthCounter]] = None
_MIN_RECORDS_PER_PROCESS = 2000  # below this a process costs more to start than it saves


def _count_span(span: tuple[int, int]) -> np.ndarray:
    records, counter = _JOB
    start, stop = span
    return np.fromiter((counter(records[i]) for i in range(start, stop)), dtype=np.int64, count=stop - start)


def _worker_start() -> None:
    # The parent's handlers (a run's stop-on-SIGTERM) must not keep a pool worker alive when the
    # pool ends it; Ctrl-C goes to the parent, which ends the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_num_processes(num_records: int) -> int:
    """Processes worth starting for ``num_records``: this rank's share of the CPUs (torchrun's
    ``LOCAL_WORLD_SIZE`` ranks share a machine), at least ~2,000 records each; 1 where processes
    cannot be forked (not Linux, or inside a loader worker)."""
    if not sys.platform.startswith("linux") or multiprocessing.current_process().daemon:
        return 1
    cpus = len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(cpus, num_records // _MIN_RECORDS_PER_PROCESS, 32))


def compute_lengths(records: Sequence, counter: LengthCounter, start: int = 0, stop: Optional[int] = None,
                    num_processes: Optional[int] = None) -> np.ndarray:
    """``counter(records[i])`` for ``i`` in ``[start, stop)``, as ``int64``, counted in parallel.

    Args:
        records: the records (a list or a :class:`~vitacore.data.record_store.RecordStore`).
        counter: what fixes the lengths.
        start / stop: the range of records (default: all).
        num_processes: forked processes (default: :func:`default_num_processes`); 1 counts here.
    """
    global _JOB
    stop = len(records) if stop is None else stop
    count = stop - start
    processes = default_num_processes(count) if num_processes is None else num_processes
    if processes <= 1 or count < 2:
        _JOB = (records, counter)
        try:
            return _count_span((start, stop))
        finally:
            _JOB = None
    size = max(256, math.ceil(count / (processes * 8)))  # several spans each: a slow span does not idle the rest
    spans = [(lo, min(lo + size, stop)) for lo in range(start, stop, size)]
    _JOB = (records, counter)
    try:
        with multiprocessing.get_context("fork").Pool(processes, initializer=_worker_start) as pool:
            parts = pool.map(_count_span, spans, chunksize=1)
    finally:
        _JOB = None
    return np.concatenate(parts)
