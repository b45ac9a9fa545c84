"""Records held as JSON bytes in one numpy buffer, so forked loader workers share them.

A ``list[dict]`` of a million records is tens of millions of small Python objects. A forked
DataLoader worker that reads one writes its reference counts, and each garbage collection in the
worker writes the header of every container it scans, so page by page every worker ends up with
its own copy of the whole list (copy-on-write; the growth PyTorch's issue #5902 describes).

:class:`RecordStore` keeps each record as its JSON text in one ``uint8`` array with an ``int64``
array of offsets: a handful of Python objects whatever the record count. Workers only read the
arrays, so their pages stay shared; a record is decoded when it is read (a few microseconds).
:class:`RecordOrigins` and :class:`CodedStrings` do the same for the per-record strings the dataset
keeps (where each record came from, which dataset it belongs to).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

__all__ = ["CodedStrings", "MEDIA_FLAGS", "RecordOrigins", "RecordStore", "RecordStoreBuilder",
           "encode_record", "records_fingerprint"]

#: Bit per media field: set when the record's field is present and non-empty.
MEDIA_FLAGS = {"image": 1, "video": 2, "audio": 4}


# Made once: json.dumps with options builds an encoder per call, which costs as much as the encoding.
_CANONICAL = {"sort_keys": True, "ensure_ascii": False, "separators": (",", ":")}
_ENCODER = json.JSONEncoder(**_CANONICAL)
_LENIENT_ENCODER = json.JSONEncoder(**_CANONICAL, default=str)


def encode_record(record, lenient: bool = False) -> bytes:
    """One record's canonical JSON bytes (sorted keys, compact, UTF-8; lone surrogates kept).

    Args:
        record: a JSON value.
        lenient: encode values JSON cannot hold as their ``str`` instead of refusing them.

    Raises:
        TypeError: a value JSON cannot hold, unless ``lenient``.
    """
    return (_LENIENT_ENCODER if lenient else _ENCODER).encode(record).encode("utf-8", "surrogatepass")


def _media_flags(record) -> int:
    if not isinstance(record, dict):
        return 0
    return sum(bit for name, bit in MEDIA_FLAGS.items() if record.get(name))


class _Digest:
    """The fingerprint of a sequence of encoded records: their bytes, then where each ends."""

    def __init__(self):
        self.hash, self.ends, self.size = hashlib.sha256(), array("q"), 0

    def add(self, raw: bytes) -> None:
        self.hash.update(raw)
        self.size += len(raw)
        self.ends.append(self.size)

    def value(self) -> str:
        self.hash.update(np.asarray(self.ends, dtype="<i8").tobytes())
        return f"{len(self.ends)}:{self.hash.hexdigest()[:16]}"


def records_fingerprint(records: Sequence) -> str:
    """``"<record count>:<hash>"`` of records in order: equal exactly when the records are.

    A :class:`RecordStore` hashes its buffers; a list is encoded record by record (values JSON
    cannot hold as their ``str``), giving the same value for the same records.
    """
    if isinstance(records, RecordStore):
        return records.fingerprint()
    digest = _Digest()
    for record in records:
        digest.add(encode_record(record, lenient=True))
    return digest.value()


class RecordStoreBuilder:
    """Appends records one at a time; :meth:`finish` makes the :class:`RecordStore`."""

    def __init__(self):
        self._data = bytearray()
        self._ends = array("q")
        self._flags = array("B")

    def __len__(self) -> int:
        return len(self._ends)

    def append(self, record: dict) -> None:
        """Add one record (a JSON object).

        Raises:
            ValueError: the record holds a value JSON cannot (records come from JSON files).
        """
        try:
            raw = encode_record(record)
        except (TypeError, ValueError) as err:
            raise ValueError(f"record {len(self._ends)} holds a value that is not JSON ({err}); records must be "
                             "JSON objects (as read from a VITA JSON file)") from None
        self._data += raw
        self._ends.append(len(self._data))
        self._flags.append(_media_flags(record))

    def finish(self) -> "RecordStore":
        """The records appended so far, as a store (the builder is spent)."""
        offsets = np.zeros(len(self._ends) + 1, dtype=np.int64)
        offsets[1:] = np.frombuffer(self._ends, dtype=np.int64) if len(self._ends) else []
        store = RecordStore(np.frombuffer(bytes(self._data), dtype=np.uint8), offsets,
                            np.frombuffer(self._flags, dtype=np.uint8).copy())
        self._data, self._ends, self._flags = bytearray(), array("q"), array("B")
        return store


class RecordStore(Sequence):
    """Records as canonical JSON bytes in one buffer; indexing decodes a fresh ``dict``.

    Decoded records equal the records stored (keys come back sorted). Slicing or :meth:`take`
    gives another store; iteration decodes every record in order.

    Args:
        data: the records' JSON bytes, back to back.
        offsets: ``len + 1`` positions in ``data``: record ``i`` is ``data[offsets[i]:offsets[i + 1]]``.
        flags: per record, the :data:`MEDIA_FLAGS` bits of its non-empty media fields.
    """

    def __init__(self, data: np.ndarray, offsets: np.ndarray, flags: np.ndarray):
        assert offsets.ndim == 1 and len(offsets) == len(flags) + 1 and data.dtype == np.uint8
        self.data, self.offsets, self.flags = data, offsets, flags
        self._fingerprint: Optional[str] = None

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> "RecordStore":
        """A store of ``records`` (JSON objects).

        Raises:
            ValueError: a record holds a value JSON cannot.
        """
        builder = RecordStoreBuilder()
        for record in records:
            builder.append(record)
        return builder.finish()

    def __len__(self) -> int:
        return len(self.flags)

    def raw(self, index: int) -> bytes:
        """Record ``index``'s JSON bytes."""
        return self.data[self.offsets[index]:self.offsets[index + 1]].tobytes()

    def __getitem__(self, index: Union[int, slice]):
        if isinstance(index, slice):
            return self.take(range(*index.indices(len(self))))
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of a store of {len(self)}")
        return json.loads(self.raw(index % len(self)).decode("utf-8", "surrogatepass"))

    def __iter__(self) -> Iterator[dict]:
        for index in range(len(self)):
            yield self[index]

    def take(self, indices: Iterable[int]) -> "RecordStore":
        """A store of the records at ``indices``, in that order."""
        picked = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        starts, ends = self.offsets[picked], self.offsets[picked + 1]
        offsets = np.zeros(len(picked) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        pieces = [self.data[s:e] for s, e in zip(starts.tolist(), ends.tolist())]
        data = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
        return RecordStore(data, offsets, self.flags[picked])

    def with_media(self, *fields: str) -> np.ndarray:
        """Per record, whether any of the media ``fields`` (``image``, ``video``, ``audio``) is non-empty."""
        mask = sum(MEDIA_FLAGS[name] for name in fields)
        return (self.flags & mask) != 0

    def fingerprint(self) -> str:
        """``"<record count>:<hash>"``, as :func:`records_fingerprint` gives for the same records as a list."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            step = 1 << 24  # hash in slices: no second copy of a large buffer
            for start in range(0, len(self.data), step):
                digest.update(self.data[start:start + step].tobytes())
            digest.update((self.offsets[1:] - self.offsets[0]).astype("<i8").tobytes())
            self._fingerprint = f"{len(self)}:{digest.hexdigest()[:16]}"
        return self._fingerprint

    def __repr__(self) -> str:
        return f"RecordStore({len(self)} records, {len(self.data)} bytes)"


class CodedStrings(Sequence):
    """One string per record from a short list of values: a small integer code per record.

    Args:
        codes: per record, an index into ``values``.
        values: the distinct strings.
    """

    def __init__(self, codes: np.ndarray, values: Sequence[str]):
        self.codes, self.values = codes, list(values)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.values[c] for c in self.codes[index].tolist()]
        return self.values[self.codes[index]]

    def __iter__(self) -> Iterator[str]:
        values = self.values
        return (values[c] for c in self.codes.tolist())


class RecordOrigins(Sequence):
    """Per record where it came from, ``"<prefix><number>"`` (``"a.json, record 7"``), built on read.

    Args:
        prefixes: one per source file (``"a.json, record "``, or ``"a.jsonl, line "``).
        codes: per record, its source's index in ``prefixes``.
        numbers: per record, its number in its file (record index, or line for JSON Lines).
    """

    def __init__(self, prefixes: Sequence[str], codes: np.ndarray, numbers: np.ndarray):
        assert len(codes) == len(numbers)
        self.prefixes, self.codes, self.numbers = list(prefixes), codes, numbers

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return f"{self.prefixes[self.codes[index]]}{int(self.numbers[index])}"

    def __iter__(self) -> Iterator[str]:
        for code, number in zip(self.codes.tolist(), self.numbers.tolist()):
            yield f"{self.prefixes[code]}{number}"
