"""VITA-1.5's turn rules (``preprocess_multimodal`` and ``preprocess_qwen2p5_instruct`` in VITA's
``vita/util/data_utils_video_audio_neg_patch.py``), each expected string written out from those rules."""

import pytest

from vitacore.data.turns import drop_leading_answer, finish_turn, move_media_first, prepare_turns, turn_order_problem


@pytest.mark.parametrize("value, expected", [
    # The newline after <image> goes, then the one before; the turn is stripped.
    ("<image>\nWhat is it?", "<image>What is it?"),
    ("What is it?\n<image>", "<image>What is it?"),  # a trailing run moves to the front
    ("Compare\n<image><image>", "<image><image>Compare"),
    ("  <image>\n\nHi  ", "<image>\nHi"),  # only one newline goes; the rest is left for finish_turn
    ("A <image> B", "A <image> B"),  # a placeholder inside the text stays where it is
    ("Describe it.\n<video>", "<video>Describe it."),
    ("<video>\nWhat happens?", "<video>\nWhat happens?"),  # VITA removes newlines around <image> only
    ("Plain text\n", "Plain text\n"),  # no image / video: untouched, not even stripped
])
def test_move_media_first(value, expected):
    assert move_media_first(value) == expected


def test_a_trailing_run_moves_without_duplicating_other_placeholders():
    # VITA would prepend both placeholders again (4 in all for 2 images); vitacore moves the run only.
    assert move_media_first("A <image> then B <image>") == "<image>A <image> then B"


@pytest.mark.parametrize("value, expected", [
    ("<audio>\nWhat did I say?", "<audio>What did I say?"),
    ("First.\n\nSecond.", "First.\nSecond."),
    ("a\n\n\nb", "a\n\nb"),  # one pass of str.replace, as VITA does
    ("a\n\n\n\nb", "a\n\nb"),
])
def test_finish_turn(value, expected):
    assert finish_turn(value) == expected


def test_an_opening_answer_is_dropped_and_inserted_id_follows():
    turns = [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "<audio>"},
             {"from": "gpt", "value": "noise"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    kept, inserted = drop_leading_answer(turns, 2)
    assert [t["value"] for t in kept] == ["<audio>", "noise", "q", "a"] and inserted == 1
    assert drop_leading_answer(turns, 0)[1] is None  # it pointed at the dropped turn
    assert drop_leading_answer(turns[1:], 1) == (turns[1:], 1)  # nothing to drop


@pytest.mark.parametrize("roles, problem", [
    (["human", "gpt"], None),
    (["gpt", "human", "gpt"], None),  # the opening answer is dropped
    (["human", "gpt", "human"], None),  # a trailing question is allowed (masked)
    (["human", "human", "gpt"], "conversations[1]"),
    (["gpt", "gpt", "human"], "conversations[1]"),
    (["human", "gpt", "gpt"], "conversations[2]"),
    (["human"], "empty conversation"),
    (["gpt"], "empty conversation"),
])
def test_turn_order(roles, problem):
    found = turn_order_problem([{"from": role, "value": "x"} for role in roles])
    assert found is None if problem is None else problem in found


def test_prepare_turns_expands_with_one_newline_and_applies_every_rule():
    conversations = [
        {"from": "gpt", "value": "dropped"},
        {"from": "human", "value": "Which is bigger?\n<image>\n<image>"},
        {"from": "gpt", "value": "The first.\n\nIt is wider."},
        {"from": "human", "value": "<video>\n<audio>\n"},
        {"from": "gpt", "value": "A dog."},
    ]
    turns, inserted = prepare_turns(conversations, 4, tile_counts=[2, 1], frame_counts=[3])
    assert [t["value"] for t in turns] == [
        "<image><image>\n<image>\nWhich is bigger?",
        "The first.\nIt is wider.",
        "<image><image><image>\n<audio>",
        "A dog.",
    ]
    assert inserted == 3 and conversations[1]["value"] == "Which is bigger?\n<image>\n<image>"  # input untouched
