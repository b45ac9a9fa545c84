"""Read VITA JSON files and check every record against VITA's schema when it is loaded.

A record (DESIGN.md §4)::

    {"id": "a1", "set": "sharegpt4", "image": "x.jpg" | ["x.jpg", ...], "video": "v.mp4" | [...],
     "audio": "a.wav" | [...], "inserted_id": 3, "end_tag": true,
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}

Problems are found when the file is read, naming the file, the record index and the field, so a
bad record in a million-record file is known before training starts rather than at step 40k:
:func:`read_records` returns them beside the good records (``--on_bad_sample skip`` drops and counts
them), :func:`load_records` raises at the first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

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
        where = f"field 'conversations[{turn_index}]'"
        if not isinstance(turn, dict):
            return f"{where} is a {type(turn).__name__}, expected {{\"from\": ..., \"value\": ...}}"
        if turn.get("from") not in ROLES:
            return f"{where}.from is {turn.get('from')!r}, expected 'human' or 'gpt'"
        if not isinstance(turn.get("value"), str):
            return f"{where}.value is {type(turn.get('value')).__name__}, expected a string"
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
    for name, token in MEDIA_FIELDS.items():
        listed = len(as_list(record.get(name)))
        found = sum(turn["value"].count(token) for turn in conversations)
        if found != listed:
            return (f"field '{name}' lists {listed} file(s) but the conversations hold {found} {token} "
                    f"placeholder(s); they must match (one {token} per file, in order)")
    return None


_JSON_TYPES = {dict: "object", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _read_json(path: str, named: str):
    """The file's JSON value; ``named`` (the file and the flag that named it) opens every error."""
    # utf-8-sig: a byte-order mark (some editors write one) is not an error.
    with open(path, encoding="utf-8-sig") as fh:
        try:
            return json.load(fh)
        except UnicodeDecodeError as err:
            bad_byte = err.object[err.start:err.start + 1]
            raise ValueError(f"{named}: not UTF-8 text ({err.reason}, byte {bad_byte!r}); JSON data files must be "
                             "UTF-8: re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{named}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg} "
                             "(a truncated or hand-edited file?)") from None


@dataclass(frozen=True)
class RejectedRecord:
    """A record that breaks VITA's schema, found when its file was read.

    Attributes:
        index: its index in the file.
        message: ``"file.json: record 7 (id 'x'): <problem naming the field>"``.
    """

    index: int
    message: str


def read_records(path: str, flag: str = "") -> tuple[list[dict], list[RejectedRecord]]:
    """Read a VITA JSON list of records: the good ones, and what is wrong with the others.

    Args:
        path: the JSON file.
        flag: the flag (or registry entry) that named the file, for error messages
            (``"--data_path"``); "" names the file alone.

    Returns:
        ``(records, rejected)``: the records that follow VITA's schema, in file order, and one
        :class:`RejectedRecord` per other record.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not UTF-8 text, malformed JSON (with line and column), or not a list; each
            naming the file and ``flag``.
    """
    named = f"{flag} {path}" if flag else path
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag + ': ' if flag else ''}data file {path!r} does not exist")
    records = _read_json(path, named)
    if not isinstance(records, list):
        raise ValueError(f"{named}: expected a JSON list of records ([{{\"conversations\": ...}}, ...]), "
                         f"got a JSON {_JSON_TYPES.get(type(records), type(records).__name__)}")
    good, rejected = [], []
    for index, record in enumerate(records):
        problem = record_problem(record)
        if problem is None:
            good.append(record)
            continue
        record_id = record.get("id") if isinstance(record, dict) else None
        with_id = f" (id {record_id!r})" if record_id is not None else ""
        rejected.append(RejectedRecord(index, f"{path}: record {index}{with_id}: {problem}"))
    return good, rejected


def load_records(path: str, flag: str = "") -> list[dict]:
    """Read a VITA JSON list of records, every one of which must follow VITA's schema.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not UTF-8, malformed JSON (with line and column), not a list, or a record that
            breaks VITA's schema (with its index and field).
    """
    records, rejected = read_records(path, flag)
    if rejected:
        raise ValueError(rejected[0].message)
    return records
