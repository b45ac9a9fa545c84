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
"""

from __future__ import annotations

from typing import Callable, Optional

from vitacore.constants import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX
from vitacore.data.conversation import ChatTemplate, tokenize_conversation
from vitacore.data.records import as_list
from vitacore.data.turns import prepare_turns
from vitacore.data.video import count_sampled_frames

__all__ = ["count_video_frames", "record_length"]


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

