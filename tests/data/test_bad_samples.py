"""Bad samples (vitacore.data.bad_samples): each class with ``error`` and ``skip``, and the accounting.

Malformed JSON, wrong placeholder counts and an unknown ``--version`` are load-time errors tested in
test_registry.py, test_dataset.py and test_conversation.py.
"""

import numpy as np
import pytest

from vitacore.config import ConfigError, RunConfig, parse_args
from vitacore.constants import IGNORE_INDEX
from vitacore.data.audio import AudioTransform, write_wav
from vitacore.data.bad_samples import BadSample, BadSampleLog
from vitacore.data.conversation import QWEN2P5_INSTRUCT
from vitacore.data.dataset import Collator, VitaJsonDataset
from vitacore.data.images import ImageTransform
from vitacore.demo.tokenizer import build_tokenizer

SIZE, MEAN, STD = 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _conv(question="hi", answer="ok"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _media(root):
    """Good and broken media files in ``root``."""
    from PIL import Image

    Image.new("RGB", (20, 12), (200, 10, 10)).save(root / "good.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    write_wav(root / "good.wav", 0.3 * np.sin(np.arange(3200) / 10.0), 16000)
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    (root / "broken.gif").write_bytes(b"GIF89a junk")


def _dataset(records, root, tok, **kwargs):
    return VitaJsonDataset(records, str(root), tok, QWEN2P5_INSTRUCT, ImageTransform(SIZE, MEAN, STD),
                           AudioTransform(), source="train.json", **kwargs)


def _text(i):
    return {"id": f"good-{i}", "conversations": _conv(f"question {i}", f"answer {i}")}


# Each bad class: the record and what the message must say.
BAD = {
    "missing image": ({"image": "gone.png", "conversations": _conv("<image>")}, "missing image file", "gone.png"),
    "corrupt image": ({"image": "broken.png", "conversations": _conv("<image>")}, "corrupt image file", "broken.png"),
    "missing audio": ({"audio": "gone.wav", "conversations": _conv("<audio>")}, "missing audio file", "gone.wav"),
    "corrupt audio": ({"audio": "broken.wav", "conversations": _conv("<audio>")}, "corrupt audio file", "broken.wav"),
    "missing video": ({"video": "gone.gif", "conversations": _conv("<video>")}, "missing video file", "gone.gif"),
    "corrupt video": ({"video": "broken.gif", "conversations": _conv("<video>")}, "corrupt video file", "broken.gif"),
    "no turns": ({"conversations": []}, "empty conversation", None),
    "no answer": ({"conversations": _conv()[:1]}, "empty conversation", None),
    "too long": ({"conversations": _conv("word " * 400)}, "too long", "--model_max_length 256"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_error_names_file_record_and_problem(tmp_path, tok, name):
    _media(tmp_path)
    record, problem, detail = BAD[name]
    dataset = _dataset([_text(0), {"id": "bad", **record}], tmp_path, tok, on_bad_sample="error",
                       model_max_length=256)
    with pytest.raises(ValueError) as err:
        dataset[1]
    message = str(err.value)
    assert "train.json, record 1 (id 'bad')" in message and problem in message, message
    if detail:
        assert detail in message, message


@pytest.mark.parametrize("name", sorted(BAD))
def test_skip_uses_the_next_good_record_and_marks_it(tmp_path, tok, name):
    _media(tmp_path)
    record, problem, _ = BAD[name]
    records = [_text(0), {"id": "bad", **record}, dict(BAD["missing image"][0], id="bad2"), _text(3)]
    dataset = _dataset(records, tmp_path, tok, on_bad_sample="skip", model_max_length=256)
    sample = dataset[1]
    assert sample.sample_id == "good-3"  # records 2 (bad too) and 1 skipped, in index order
    assert sample.replaced_from.index == 1 and sample.replaced_from.replaced_by == 3
    assert problem in sample.replaced_from.message and "record 1" in sample.replaced_from.message
    again = dataset[1]  # deterministic: a resumed run gets the same stand-in
    assert again.input_ids == sample.input_ids and again.replaced_from == sample.replaced_from
    assert dataset[0].replaced_from is None and dataset[3].replaced_from is None


def test_skip_wraps_around_and_all_bad_is_an_error(tmp_path, tok):
    _media(tmp_path)
    bad = dict(BAD["corrupt audio"][0], id="bad")
    dataset = _dataset([_text(0), bad], tmp_path, tok, on_bad_sample="skip")
    assert dataset[1].sample_id == "good-0" and dataset[1].replaced_from.key == str(tmp_path / "broken.wav")
    with pytest.raises(ValueError, match=r"train.json: all 2 records are bad samples.*corrupt audio file"):
        _dataset([bad, dict(bad)], tmp_path, tok, on_bad_sample="skip")[0]


def test_too_long_is_exactly_no_answer_token_left(tmp_path, tok):
    """Bad iff the first supervised token sits at text position >= model_max_length."""
    record = {"id": "q", "conversations": _conv("a long question " * 5, "an answer")}
    sample = _dataset([record], tmp_path, tok)[0]
    first = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    assert len(sample.input_ids) > first + 1
    assert _dataset([record], tmp_path, tok, model_max_length=first + 1)[0].labels == sample.labels
    with pytest.raises(ValueError, match=f"first answer token is at position {first}"):
        _dataset([record], tmp_path, tok, model_max_length=first)[0]


def test_collator_carries_markers_and_log_counts_and_warns_once(tmp_path, tok):
    _media(tmp_path)
    records = [_text(0), dict(BAD["missing image"][0], id="b1"), dict(BAD["missing image"][0], id="b2"), _text(3)]
    dataset = _dataset(records, tmp_path, tok, on_bad_sample="skip")
    batch = Collator(tok.pad_token_id)([dataset[i] for i in range(4)])
    assert [m.index for m in batch["bad_samples"]] == [1, 2]
    assert "bad_samples" not in Collator(tok.pad_token_id)([dataset[0]])
    lines = []
    log = BadSampleLog(0.5, is_main=True, write=lines.append)
    assert log.observe(batch) == 2 and "bad_samples" not in batch
    assert len(lines) == 1 and "gone.png" in lines[0] and "record 1" in lines[0]  # the file, once
    quiet = BadSampleLog(0.5, is_main=False, write=lines.append)
    assert quiet.observe({"bad_samples": [BadSample("m", "k", 0, 1)]}) == 1 and len(lines) == 1


def test_ratio_stops_the_run_and_survives_a_resume():
    log = BadSampleLog(0.25, min_samples=0)
    log.add(1, 4)  # exactly the ratio: allowed
    restored = BadSampleLog(0.25, min_samples=0)
    restored.load_state_dict(log.state_dict())
    with pytest.raises(ValueError, match=r"2 of the 5 training samples.*--max_bad_sample_ratio 0.25"):
        restored.add(1, 1)
    fresh = BadSampleLog(0.25)
    fresh.load_state_dict(None)  # a checkpoint written before the counter existed
    assert fresh.state_dict() == {"bad": 0, "seen": 0}


def test_flags_defaults_and_validation():
    data = RunConfig().data
    assert data.on_bad_sample == "skip" and data.max_bad_sample_ratio == 0.01
    assert parse_args(["--on_bad_sample", "error", "--max_bad_sample_ratio", "0.2"]).data.max_bad_sample_ratio == 0.2
    with pytest.raises(ConfigError, match="--on_bad_sample 'ignore' is not one of: error, skip"):
        parse_args(["--on_bad_sample", "ignore"])
    with pytest.raises(ConfigError, match=r"--max_bad_sample_ratio 1.5 must be in \[0, 1\]"):
        parse_args(["--max_bad_sample_ratio", "1.5"])
