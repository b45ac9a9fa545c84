"""The record store: records as JSON bytes in one numpy buffer, decoded exactly, shared by forked workers."""

import json
import pickle

import numpy as np
import pytest
from torch.utils.data import DataLoader

from vitacore.data import DataSpec, ModelInputs, build_data
from vitacore.data.conversation import get_template
from vitacore.data.dataset import Collator, VitaJsonDataset
from vitacore.data.record_store import CodedStrings, RecordOrigins, RecordStore, records_fingerprint
from vitacore.demo.tokenizer import build_tokenizer


def _conv(question, answer="ok"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# Every kind of JSON value a record file can hold, with text that JSON escapes or keeps.
AWKWARD = [
    {"id": "plain", "conversations": _conv("What is shown?")},
    {"id": 7, "image": ["a.png", "b.png"], "set": ["x", "y"],
     "conversations": _conv("<image><image>\n两张图片一样吗？", "是的 ☜")},
    {"id": "emoji", "audio": "c.wav", "conversations": _conv("<audio>\n🎵 \"quoted\" \\ back\nslash\ttab", "é")},
    json.loads('{"id": "surrogate", "conversations": [{"from": "human", "value": "lone \\ud800 half"},'
               ' {"from": "gpt", "value": "x"}]}'),
    {"id": "numbers", "weights": [0.1, 1e-300, -2.5e300, 12345678901234567890, True, False, None],
     "nested": {"z": {"a": []}, "b": ""}, "end_tag": False, "conversations": _conv("q")},
    {"id": "video", "video": "v.mp4", "inserted_id": 1, "conversations": _conv("<video>\nq", "a")},
]


def test_records_come_back_exactly():
    """Setup: records with CJK, emoji, escapes, a lone surrogate, big and tiny numbers, nesting, bools and nulls.
    Expect: each decoded record equals the original (values and types); iteration and negative indices agree;
    an index past the end raises IndexError."""
    store = RecordStore.from_records(AWKWARD)
    assert len(store) == len(AWKWARD)
    for index, record in enumerate(AWKWARD):
        back = store[index]
        assert back == record and json.dumps(back, sort_keys=True) == json.dumps(record, sort_keys=True)
    assert type(store[4]["weights"][3]) is int and type(store[4]["weights"][4]) is bool
    assert list(store) == AWKWARD and store[-1] == AWKWARD[-1]
    with pytest.raises(IndexError):
        store[len(AWKWARD)]
    assert store[1] is not store[1]  # each read decodes a fresh dict: a caller's edits never reach the store
    copy = pickle.loads(pickle.dumps(store))  # as a spawned loader worker would receive it
    assert list(copy) == AWKWARD


def test_slices_and_take_are_stores_of_the_picked_records():
    """Setup: slice the store with steps, and take indices out of order.
    Expect: stores holding exactly those records, with their media flags."""
    store = RecordStore.from_records(AWKWARD)
    assert isinstance(store[::2], RecordStore) and list(store[::2]) == AWKWARD[::2]
    assert list(store[4:1:-1]) == AWKWARD[4:1:-1] and len(store[3:3]) == 0
    picked = store.take([5, 0, 5])
    assert list(picked) == [AWKWARD[5], AWKWARD[0], AWKWARD[5]]
    assert picked.with_media("video").tolist() == [True, False, True]


def test_media_flags_follow_the_non_empty_fields():
    """Setup: records with image lists, audio, video, none, and an empty image list.
    Expect: with_media reports exactly the records whose field is present and non-empty."""
    records = AWKWARD + [{"id": "empty", "image": [], "conversations": _conv("q")}]
    store = RecordStore.from_records(records)
    assert store.with_media("image").tolist() == [False, True, False, False, False, False, False]
    assert store.with_media("audio", "video").tolist() == [False, False, True, False, False, True, False]


def test_fingerprint_is_the_lists_and_changes_with_any_record():
    """Setup: the same records as a store and as a list; then one changed value, then two records swapped.
    Expect: store and list fingerprints are equal; each change gives another fingerprint."""
    store = RecordStore.from_records(AWKWARD)
    assert store.fingerprint() == records_fingerprint(AWKWARD) == records_fingerprint(store)
    assert store.fingerprint().startswith(f"{len(AWKWARD)}:")
    changed = [dict(r) for r in AWKWARD]
    changed[2]["id"] = "other"
    swapped = [AWKWARD[1], AWKWARD[0], *AWKWARD[2:]]
    # Moving bytes between two neighbours keeps the concatenation: the record ends still tell them apart.
    split = [{"id": "ab", "conversations": _conv("q")}, {"id": "c", "conversations": _conv("q")}]
    moved = [{"id": "a", "conversations": _conv("q")}, {"id": "bc", "conversations": _conv("q")}]
    fingerprints = {records_fingerprint(x) for x in (AWKWARD, changed, swapped)}
    assert len(fingerprints) == 3 and records_fingerprint(split) != records_fingerprint(moved)


def test_a_value_json_cannot_hold_is_refused_naming_the_record():
    """Setup: a store built from records whose second holds a Python set.
    Expect: ValueError naming record 1 and saying records must be JSON."""
    with pytest.raises(ValueError, match="record 1 holds a value that is not JSON"):
        RecordStore.from_records([AWKWARD[0], {"id": {1, 2}, "conversations": _conv("q")}])


def test_compact_columns_read_as_lists_of_strings():
    """Setup: RecordOrigins over two files and CodedStrings over two dataset names.
    Expect: indexing, slicing and iteration give the strings a list would hold."""
    origins = RecordOrigins(["a.json, record ", "b.jsonl, line "], np.array([0, 1, 1], np.int32),
                            np.array([4, 2, 9], np.int64))
    assert list(origins) == ["a.json, record 4", "b.jsonl, line 2", "b.jsonl, line 9"]
    assert origins[1] == "b.jsonl, line 2" and origins[1:] == ["b.jsonl, line 2", "b.jsonl, line 9"]
    names = CodedStrings(np.array([1, 0, 1], np.int32), ["caption", "speech"])
    assert list(names) == ["speech", "caption", "speech"] and names[-1] == "speech" and len(names) == 3


def test_built_datasets_hold_a_store_and_forked_workers_read_it(tmp_path):
    """Setup: build_data over a JSON file of text records; a 2-worker (fork) DataLoader and a 0-worker one over it,
    and the same records as a list-of-dicts dataset.
    Expect: the run's dataset holds a RecordStore with compact origins and names; every loader gives the same
    batches (ids, tokens and labels) in the same order."""
    records = [{"id": f"r{i}", "conversations": _conv(f"question number {i}", f"answer {i}")} for i in range(40)]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    tok = build_tokenizer()
    train = build_data(DataSpec(data_path=str(path)), tok, ModelInputs()).train
    assert isinstance(train.records, RecordStore)
    assert isinstance(train.origins, RecordOrigins) and train.origins[3] == f"{path}, record 3"
    assert isinstance(train.dataset_names, CodedStrings) and set(train.dataset_names) == {"train"}
    plain = VitaJsonDataset(records, str(tmp_path), tok, get_template(None), None, None)

    def batches(dataset, workers):
        loader = DataLoader(dataset, batch_size=8, collate_fn=Collator(tok.pad_token_id), num_workers=workers,
                            multiprocessing_context="fork" if workers else None)
        return [(b["sample_ids"], b["input_ids"].tolist(), b["labels"].tolist()) for b in loader]

    expected = batches(plain, 0)
    assert batches(train, 0) == expected and batches(train, 2) == expected
