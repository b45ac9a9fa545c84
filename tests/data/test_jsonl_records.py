"""JSON Lines data files: read like JSON lists, recognised by extension or content, errors naming file:line."""

import json

import pytest

from vitacore.data import DataSpec, ModelInputs, build_data
from vitacore.data.records import load_records, read_records
from vitacore.data.registry import DataSource, load_sources
from vitacore.demo.tokenizer import build_tokenizer


def _record(i, **extra):
    return {"id": f"r{i}", **extra, "conversations": [{"from": "human", "value": f"question {i}"},
                                                       {"from": "gpt", "value": f"answer {i}"}]}


RECORDS = [_record(0), _record(1, end_tag=False), _record(2)]


def _lines(*lines) -> str:
    return "\n".join(lines) + "\n"


def test_jsonl_reads_as_the_json_list_does(tmp_path):
    """Setup: the same records as a JSON list, as .jsonl with blank lines and CRLF endings, and as JSON Lines
    in a .json file.
    Expect: the same records in the same order from each."""
    (tmp_path / "list.json").write_text(json.dumps(RECORDS))
    body = "\n\n".join(json.dumps(r) for r in RECORDS).replace("\n\n", "\r\n\n   \n")
    (tmp_path / "lines.jsonl").write_text(body + "\n\n")
    (tmp_path / "by_content.json").write_text(_lines(*(json.dumps(r) for r in RECORDS)))
    for name in ("list.json", "lines.jsonl", "by_content.json"):
        assert load_records(str(tmp_path / name)) == RECORDS, name


def test_a_malformed_line_names_the_file_and_line(tmp_path):
    """Setup: a .jsonl whose third line (after a blank line) is cut short, and one whose line is a list.
    Expect: load_records raises naming file:line and the column; read_records keeps the good records and
    returns the bad line as a rejected record with the same message."""
    path = tmp_path / "broken.jsonl"
    path.write_text(_lines(json.dumps(RECORDS[0]), "", '{"id": "r1", "conversations": [', json.dumps(RECORDS[2])))
    with pytest.raises(ValueError, match=r"broken\.jsonl:3: malformed JSON at column \d+"):
        load_records(str(path))
    good, rejected = read_records(str(path))
    assert good == [RECORDS[0], RECORDS[2]]
    assert len(rejected) == 1 and rejected[0].index == 1 and f"{path}:3: malformed JSON" in rejected[0].message
    path.write_text(_lines(json.dumps(RECORDS[0]), json.dumps([RECORDS[1]])))
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: record 1: is a list, expected a JSON object"):
        load_records(str(path))


def test_a_schema_problem_names_the_line(tmp_path):
    """Setup: a .jsonl whose second record has two human turns in a row.
    Expect: the error names file:line, the record index, its id and the field."""
    bad = {"id": "twice", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                                            {"from": "gpt", "value": "c"}]}
    path = tmp_path / "data.jsonl"
    path.write_text(_lines(json.dumps(RECORDS[0]), "", json.dumps(bad)))
    with pytest.raises(ValueError, match=r"data\.jsonl:3: record 1 \(id 'twice'\): field 'conversations\[1\]'"):
        load_records(str(path))


def test_not_utf8_and_a_single_object_are_still_errors(tmp_path):
    """Setup: a Latin-1 .jsonl; a .json holding one JSON object (not a list, not several lines).
    Expect: 'not UTF-8 text' naming the file; 'expected a JSON list' with a hint about .jsonl."""
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"id": "é", "conversations": []}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match="latin.jsonl: not UTF-8 text"):
        load_records(str(latin))
    single = tmp_path / "one.json"
    single.write_text(json.dumps(RECORDS[0], indent=1))
    with pytest.raises(ValueError, match=r"one.json: expected a JSON list of records .* name the file \.jsonl"):
        load_records(str(single))


def test_bad_lines_under_skip_are_dropped_and_under_error_stop_the_run(tmp_path):
    """Setup: --data_path to a .jsonl of 3 good records, one malformed line and one record without conversations.
    Expect: under skip the dataset holds the 3 good ones and counts 2 rejected (the malformed one by its line);
    under error the build stops with the malformed line's file:line."""
    path = tmp_path / "train.jsonl"
    path.write_text(_lines(json.dumps(RECORDS[0]), "{not json", json.dumps(RECORDS[1]), '{"id": "empty"}',
                           json.dumps(RECORDS[2])))
    tok = build_tokenizer()
    train = build_data(DataSpec(data_path=str(path), on_bad_sample="skip", min_samples_for_bad_ratio=10**6),
                       tok, ModelInputs()).train
    assert [r["id"] for r in train.records] == ["r0", "r1", "r2"] and len(train.rejected) == 2
    assert f"{path}:2: malformed JSON" in train.rejected[0].message
    assert f"{path}:4: record 3 (id 'empty')" in train.rejected[1].message
    assert train.origins[1] == f"{path}, line 3"  # samples' errors name the line too
    with pytest.raises(ValueError, match=rf"{path}:2: malformed JSON"):
        build_data(DataSpec(data_path=str(path), on_bad_sample="error"), tok, ModelInputs())


def test_registry_sources_mix_json_and_jsonl(tmp_path):
    """Setup: load_sources over a JSON list and a .jsonl (with a blank first line).
    Expect: records in source order; origins name 'record i' for the list and 'line n' for JSON Lines."""
    (tmp_path / "a.json").write_text(json.dumps(RECORDS[:2]))
    (tmp_path / "b.jsonl").write_text(_lines("", json.dumps(RECORDS[2])))
    sources = [DataSource(str(tmp_path / name), "--data_path") for name in ("a.json", "b.jsonl")]
    records, origins, rejected = load_sources(sources, seed=0)
    assert list(records) == RECORDS and not rejected
    assert list(origins) == [f"{tmp_path / 'a.json'}, record 0", f"{tmp_path / 'a.json'}, record 1",
                             f"{tmp_path / 'b.jsonl'}, line 2"]
