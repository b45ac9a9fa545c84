"""Records that break VITA's schema are found when their files are read: under ``--on_bad_sample skip``
they are dropped, named (the first few) and counted; under ``error`` the run stops naming file, record
and field; past ``--max_bad_sample_ratio`` of a dataset the run stops either way."""

import json

import pytest

from vitacore.data import DataSpec, ModelInputs, build_data
from vitacore.data.registry import sources_from_config
from vitacore.demo.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _good(i):
    return {"id": f"good-{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                                  {"from": "gpt", "value": f"answer {i}"}]}


# Each record-level problem, and a phrase of the message that names its field.
BAD = {
    "two human turns": ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                           {"from": "gpt", "value": "c"}]}, "field 'conversations[1]'.from"),
    "only an answer": ({"conversations": [{"from": "gpt", "value": "c"}]}, "empty conversation"),
    "no conversations": ({"id": "x"}, "field 'conversations'"),
    "placeholder count": ({"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image>"},
                                                                          {"from": "gpt", "value": "c"}]},
                          "field 'image' lists 2 file(s)"),
    "audio without file": ({"conversations": [{"from": "human", "value": "<audio>"},
                                              {"from": "gpt", "value": "c"}]}, "field 'audio' lists 0 file(s)"),
    "inserted_id on a question": ({"inserted_id": 0, "conversations": [{"from": "human", "value": "a"},
                                                                       {"from": "gpt", "value": "c"}]},
                                  "field 'inserted_id'"),
    "non-string value": ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "c"}]},
                         "conversations[0]'.value"),
    "unknown role": ({"conversations": [{"from": "user", "value": "a"}, {"from": "gpt", "value": "c"}]},
                     "expected 'human' or 'gpt'"),
}


def _spec(tmp_path, records, **kwargs):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return DataSpec(data_path=str(path), **kwargs), path


@pytest.mark.parametrize("name", sorted(BAD))
def test_error_stops_naming_file_record_and_field(tmp_path, tok, name):
    record, field = BAD[name]
    spec, path = _spec(tmp_path, [_good(0), record, _good(2)], on_bad_sample="error")
    with pytest.raises(ValueError) as err:
        build_data(spec, tok, ModelInputs())
    message = str(err.value)
    assert f"{path}: record 1" in message and field in message, message


@pytest.mark.parametrize("name", sorted(BAD))
def test_skip_drops_names_and_counts(tmp_path, tok, vitacore_log, name):
    record, field = BAD[name]
    records = [_good(i) for i in range(200)]
    records.insert(7, record)
    spec, path = _spec(tmp_path, records, on_bad_sample="skip")
    train = build_data(spec, tok, ModelInputs()).train
    assert len(train) == 200 and [r["id"] for r in train.records] == [f"good-{i}" for i in range(200)]
    assert [bad.index for bad in train.rejected] == [7]
    warnings = [line for line in vitacore_log.lines if "malformed record" in line]
    assert len(warnings) == 1 and f"{path}: record 7" in warnings[0] and field in warnings[0]


def test_one_bad_record_in_a_thousand_passes_the_default_ratio(tmp_path, tok):
    records = [_good(i) for i in range(999)] + [BAD["two human turns"][0]]
    spec, _ = _spec(tmp_path, records)  # defaults: skip, ratio 0.01
    assert len(build_data(spec, tok, ModelInputs()).train.rejected) == 1


def test_past_the_ratio_the_run_stops_and_names_the_first_few(tmp_path, tok, vitacore_log):
    records = [_good(i) for i in range(10)] + [BAD["only an answer"][0]] * 8
    spec, path = _spec(tmp_path, records, max_bad_sample_ratio=0.4, min_samples_for_bad_ratio=0)
    with pytest.raises(ValueError, match=r"8 of 18 records break VITA's record schema .* --max_bad_sample_ratio 0.4"):
        build_data(spec, tok, ModelInputs())
    named = [line for line in vitacore_log.lines if "malformed record" in line]
    assert len(named) == 6 and f"{path}: record 10" in named[0] and "and 3 more malformed record(s)" in named[-1]


def test_a_registry_entry_not_selected_is_not_opened(tmp_path, tok):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([_good(0)]))
    registry = tmp_path / "datasets.yaml"
    # VITA reads only the --dataset_use sets; a stale entry of another set must not stop the run.
    registry.write_text("mine:\n  - chat_path: good.json\nstale:\n  - chat_path: gone.json\n"
                        "    some_set: missing_folder\n")
    spec = DataSpec(dataset_use="mine", data_registry=str(registry))
    assert [s.chat_path for s in sources_from_config(spec)] == [str(good)]
    assert len(build_data(spec, tok, ModelInputs()).train) == 1
    with pytest.raises(FileNotFoundError, match="gone.json"):
        sources_from_config(DataSpec(dataset_use="stale", data_registry=str(registry)))
