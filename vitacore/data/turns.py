"""VITA-1.5's turn rules: how a record's conversation is normalised before it meets the chat template.

VITA's data code rewrites every turn the same way whatever the template; reproducing it is what
makes the same record give the same tokens here and there:

1. A conversation that opens with a ``gpt`` turn loses that turn (there is no question to answer);
   ``inserted_id`` keeps pointing at the same turn.
2. In a turn with an ``<image>`` or ``<video>`` placeholder, the newline right after (then right
   before) each ``<image>`` is removed, the turn is stripped, and a run of placeholders that ends
   the turn is moved to its front ("What is this?\\n<image>" asks about the image first).
3. Each placeholder, once expanded to one ``<image>`` per tile or frame, is followed by exactly
   the one ``\\n`` the expansion adds (:func:`vitacore.data.tiling.expand_placeholders`).
4. ``<audio>\\n`` becomes ``<audio>`` and ``\\n\\n`` becomes ``\\n`` (one pass, as ``str.replace`` does)
   in every turn, answers included.

Problems with the turn order are found when records load (:func:`turn_order_problem`), so a bad
record is a counted bad sample, not a failure in the middle of a run.
"""

from __future__ import annotations

from typing import Optional

from vitacore.constants import DEFAULT_AUDIO_TOKEN, DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN
from vitacore.data.tiling import expand_placeholders

__all__ = ["drop_leading_answer", "finish_turn", "move_media_first", "prepare_turns", "turn_order_problem"]


def prepare_turns(conversations: list[dict], inserted_id: Optional[int], tile_counts: list[int],
                  frame_counts: list[int]) -> tuple[list[dict], Optional[int]]:
    """A record's turns as VITA templates them: rules 1-4, with the k-th ``<image>`` expanded to
    ``tile_counts[k]`` placeholders and the k-th ``<video>`` to ``frame_counts[k]``.

    Unlike VITA, which gives every ``<image>`` of one turn the count of the turn's first image,
    each placeholder gets its own image's count.

    Returns:
        ``(turns, inserted_id)``: new turn dicts (the record is not modified), and the index of the
        inserted ("neg") turn among them.
    """
    turns, inserted_id = drop_leading_answer(conversations, inserted_id)
    turns = [{**turn, "value": move_media_first(turn["value"])} for turn in turns]
    # Images first: video frames also become <image>, which must not be expanded again.
    turns = expand_placeholders(turns, DEFAULT_IMAGE_TOKEN, tile_counts, missing=1, suffix="\n")
    turns = expand_placeholders(turns, DEFAULT_VIDEO_TOKEN, frame_counts, missing=0, suffix="\n")
    return [{**turn, "value": finish_turn(turn["value"])} for turn in turns], inserted_id


def drop_leading_answer(conversations: list[dict], inserted_id: Optional[int]) -> tuple[list[dict], Optional[int]]:
    """The conversation without an opening ``gpt`` turn, and ``inserted_id`` re-indexed to match.

    An ``inserted_id`` that pointed at the dropped turn becomes None.
    """
    if not conversations or conversations[0].get("from") != "gpt":
        return conversations, inserted_id
    if inserted_id is not None:
        inserted_id = inserted_id - 1 if inserted_id > 0 else None
    return conversations[1:], inserted_id


def move_media_first(value: str) -> str:
    """Rule 2: a turn's image / video placeholders without their neighbouring newlines, a trailing run first.

    Turns without ``<image>`` or ``<video>`` are returned unchanged.
    """
    if DEFAULT_IMAGE_TOKEN not in value and DEFAULT_VIDEO_TOKEN not in value:
        return value
    value = value.replace(DEFAULT_IMAGE_TOKEN + "\n", DEFAULT_IMAGE_TOKEN).strip()
    value = value.replace("\n" + DEFAULT_IMAGE_TOKEN, DEFAULT_IMAGE_TOKEN).strip()
    for token in (DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN):
        if value.endswith(token):
            run = _trailing_run(value, token)
            value = (run + value[: len(value) - len(run)].strip()).strip()
    return value


def _trailing_run(value: str, token: str) -> str:
    # VITA moves every placeholder of the turn, which duplicates non-adjacent ones (their count no
    # longer matches the media); moving only the trailing run keeps the count.
    count = 0
    while value.endswith(token * (count + 1)):
        count += 1
    return token * count


def finish_turn(value: str) -> str:
    """Rule 4, applied after the placeholders are expanded."""
    return value.replace(DEFAULT_AUDIO_TOKEN + "\n", DEFAULT_AUDIO_TOKEN).replace("\n\n", "\n")


def turn_order_problem(conversations: list[dict]) -> Optional[str]:
    """What is wrong with the order of a record's turns (after an opening ``gpt`` turn is dropped), naming
    the field; None when they alternate human, gpt and at least one answer is left to train on."""
    offset = 1 if conversations and conversations[0].get("from") == "gpt" else 0
    turns = conversations[offset:]
    for index, turn in enumerate(turns):
        expected = "human" if index % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            return (f"field 'conversations[{index + offset}]'.from is {turn.get('from')!r} where {expected!r} is "
                    "expected: turns must alternate human, gpt (an opening gpt turn is dropped, as VITA does)")
    if not any(turn.get("from") == "gpt" for turn in turns):
        return (f"empty conversation: field 'conversations' has no 'gpt' answer to train on after its first "
                f"human turn ({len(conversations)} turn(s))")
    return None
