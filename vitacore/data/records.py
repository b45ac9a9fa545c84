"""Read VITA data files (a JSON list, or JSON Lines) and check every record against VITA's schema.

A record (DESIGN.md §4)::

    {"id": "a1", "set": "sharegpt4", "image": "x.jpg" | ["x.jpg", ...], "video": "v.mp4" | [...],
     "audio": "a.wav" | [...], "inserted_id": 3, "end_tag": true,
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}

A file is either a JSON list of records or JSON Lines (one record per line, ``.jsonl``).
Problems are found when the file is read, naming the file, the record index (for JSON Lines, the
line) and the field, so a bad record in a million-record file is known before training starts
rather than at step 40k: :func:`read_records` returns them beside the good records
(``--on_bad_sample skip`` drops and counts them), :func:`load_records` raises at the first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from vitacore.constants import DEFAULT_AUDIO_TOKEN, DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN
from vitacore.data.turns import turn_order_problem

ROLES = ("human", "gpt")
# Media field -> its placeholder in the text; one placeholder per listed file.
MEDIA_FIELDS = {"image": DEFAULT_IMAGE_TOKEN, "video": DEFAULT_VIDEO_TOKEN, "audio": DEFAULT_AUDIO_TOKEN}


def as_list(value) -> list:
    """A media field as a list (VITA allows one path or a list of paths)."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def record_problem(record) -> Optional[str]:
    """What is wrong with one record, naming the field; None when it follows VITA's schema."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, expected a JSON object with 'conversations'"
    conversations = record.get("conversations")
    if not isinstance(conversations, list):
        return "field 'conversations' is missing or not a list of {from, value} turns"
    for turn_index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            return _turn_problem(turn, turn_index)
    order = turn_order_problem(conversations)
    if order:
        return order
    for name in MEDIA_FIELDS:
        value = record.get(name)
        if value is None:
            continue
        if not all(isinstance(p, str) and p for p in as_list(value)):
            return f"field '{name}' must be a path or a list of paths (non-empty strings), got {value!r}"
    for name in ("set", "id"):
        value = record.get(name)
        # Lists come from VITA's packed records (one name per image / video).
        if value is not None and not all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                         for v in as_list(value)):
            return f"field '{name}' must be a string or a list of strings, got {value!r}"
    inserted = record.get("inserted_id")
    if inserted is not None:
        if isinstance(inserted, bool) or not isinstance(inserted, int):
            return f"field 'inserted_id' must be a turn index (integer), got {inserted!r}"
        if not 0 <= inserted < len(conversations) or conversations[inserted].get("from") != "gpt":
            return (f"field 'inserted_id' is {inserted}, which is not the index of a 'gpt' turn "
                    f"(the record has {len(conversations)} turns)")
    if "end_tag" in record and not isinstance(record["end_tag"], bool):
        return f"field 'end_tag' must be true or false, got {record['end_tag']!r}"
    text = "\0".join(turn["value"] for turn in conversations)  # \0: no placeholder spans two turns
    for name, token in MEDIA_FIELDS.items():
        listed = len(as_list(record.get(name)))
        found = text.count(token)
        if found != listed:
            return (f"field '{name}' lists {listed} file(s) but the conversations hold {found} {token} "
                    f"placeholder(s); they must match (one {token} per file, in order)")
    return None


def _turn_problem(turn, turn_index: int) -> str:
    where = f"field 'conversations[{turn_index}]'"
    if not isinstance(turn, dict):
        return f"{where} is a {type(turn).__name__}, expected {{\"from\": ..., \"value\": ...}}"
    if turn.get("from") not in ROLES:
        return f"{where}.from is {turn.get('from')!r}, expected 'human' or 'gpt'"
    return f"{where}.value is {type(turn.get('value')).__name__}, expected a string"


_JSON_TYPES = {dict: "object", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
#: Extensions read as JSON Lines (one record per line); other files are read by their content.
JSONL_EXTENSIONS = (".jsonl", ".ndjson")


def _not_utf8(named: str, err: UnicodeDecodeError) -> ValueError:
    bad_byte = err.object[err.start:err.start + 1]
    return ValueError(f"{named}: not UTF-8 text ({err.reason}, byte {bad_byte!r}); JSON data files must be "
                      "UTF-8: re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _open_text(path: str):
    # utf-8-sig: a byte-order mark (some editors write one) is not an error. Lines end at "\n" only:
    # a JSON string may hold a raw U+2028, which other line splitting would cut.
    return open(path, encoding="utf-8-sig", newline="\n")


def _numbered_lines(fh, named: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text file, read as it goes (decoded in blocks: a UTF-8 error names the file)."""
    try:
        yield from enumerate(fh, 1)
    except UnicodeDecodeError as err:
        raise _not_utf8(named, err) from None


@dataclass(frozen=True)
class RejectedRecord:
    """A record that breaks VITA's schema, found when its file was read.

    Attributes:
        index: its index in the file (JSON Lines: its index among the file's non-blank lines).
        message: ``"file.json: record 7 (id 'x'): <problem naming the field>"`` (JSON Lines:
            ``"file.jsonl:8: record 7 ..."``, naming the line).
    """

    index: int
    message: str


@dataclass
class FileRecords:
    """What one data file holds.

    Attributes:
        records: the records that follow VITA's schema, in file order.
        rejected: one :class:`RejectedRecord` per other record (JSON Lines: or malformed line).
        indices: per good record, its index in the file.
        lines: JSON Lines: per good record, its line number (None for a JSON list).
    """

    records: list
    rejected: list
    indices: list
    lines: Optional[list] = None


def _schema_check(out: FileRecords, index: int, line: int, record, where: str) -> None:
    problem = record_problem(record)
    if problem is None:
        out.records.append(record)
        out.indices.append(index)
        if out.lines is not None:
            out.lines.append(line)
        return
    record_id = record.get("id") if isinstance(record, dict) else None
    with_id = f" (id {record_id!r})" if record_id is not None else ""
    out.rejected.append(RejectedRecord(index, f"{where}: record {index}{with_id}: {problem}"))


def _read_json_lines(path: str, lines: Iterable[tuple[int, str]]) -> FileRecords:
    """One record per line; a blank line is skipped, a malformed one is a rejected record."""
    out = FileRecords([], [], [], [])
    index = 0
    for line_number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            out.rejected.append(RejectedRecord(index, f"{path}:{line_number}: malformed JSON at column {err.colno}: "
                                                      f"{err.msg} (one JSON object per line)"))
        else:
            _schema_check(out, index, line_number, record, f"{path}:{line_number}")
        index += 1
    return out


def read_file_records(path: str, flag: str = "") -> FileRecords:
    """Read a VITA data file: a JSON list of records, or JSON Lines (one record per line).

    JSON Lines are recognised by the extension (``.jsonl``, ``.ndjson``) or by the content (a file
    of several JSON objects, one per line). Their errors name the file and the line.

    Args:
        path: the file.
        flag: the flag (or registry entry) that named the file, for error messages
            (``"--data_path"``); "" names the file alone.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not UTF-8 text, malformed JSON (with line and column), or not a list of
            records; each naming the file and ``flag``. A malformed line of JSON Lines is a
            rejected record instead.
    """
    named = f"{flag} {path}" if flag else path
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag + ': ' if flag else ''}data file {path!r} does not exist")
    with _open_text(path) as fh:
        if path.lower().endswith(JSONL_EXTENSIONS):  # read line by line: one line's objects at a time
            return _read_json_lines(path, _numbered_lines(fh, named))
        try:
            text = fh.read()
        except UnicodeDecodeError as err:
            raise _not_utf8(named, err) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):  # objects one per line: JSON Lines
            return _read_json_lines(path, enumerate(text.split("\n"), 1))
        raise ValueError(f"{named}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg} "
                         "(a truncated or hand-edited file?)") from None
    if not isinstance(records, list):
        hint = " (for one record per line, name the file .jsonl)" if isinstance(records, dict) else ""
        raise ValueError(f"{named}: expected a JSON list of records ([{{\"conversations\": ...}}, ...]), "
                         f"got a JSON {_JSON_TYPES.get(type(records), type(records).__name__)}{hint}")
    out = FileRecords([], [], [])
    for index, record in enumerate(records):
        _schema_check(out, index, 0, record, path)
    return out


def read_records(path: str, flag: str = "") -> tuple[list[dict], list[RejectedRecord]]:
    """Read a VITA data file (JSON list or JSON Lines): the good records, and what is wrong with the others.

    See :func:`read_file_records` for the formats, arguments and errors.

    Returns:
        ``(records, rejected)``: the records that follow VITA's schema, in file order, and one
        :class:`RejectedRecord` per other record.
    """
    found = read_file_records(path, flag)
    return found.records, found.rejected


def load_records(path: str, flag: str = "") -> list[dict]:
    """Read a VITA data file (JSON list or JSON Lines), every record of which must follow VITA's schema.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not UTF-8, malformed JSON (with line and column), not a list, or a record that
            breaks VITA's schema (with its index and field; a JSON Lines line that is malformed).
    """
    records, rejected = read_records(path, flag)
    if rejected:
        raise ValueError(rejected[0].message)
    return records
