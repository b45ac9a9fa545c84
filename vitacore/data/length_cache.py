"""Modality lengths counted once, in parallel, and kept beside the data for the next start.

``--group_by_modality_length`` needs every record's length in tokens before the first step. Counting
them tokenizes every record and opens every media header; on a million records that is minutes, on
every rank, on every start and resume. :func:`cached_lengths` does it once:

* **Where:** a ``.vitacore_lengths`` folder beside the first data file; ``--length_cache_dir``
  instead when given. When the data's folder is not writable, the run's output folder
  (``<output_dir>/length_cache``); when no folder is writable, the lengths are counted and not
  kept (one note says so).
* **Which file:** its name is a hash of everything the lengths depend on: the records (their
  :func:`~vitacore.data.record_store.records_fingerprint`), the tokenizer (its vocabulary, merges
  and special tokens), the chat template (name, pieces, system prompts), tiling, tokens per image,
  the audio transform's settings, the frame cap, ``model_max_length``, the vitacore version and
  this file format. Changing any of them names another file, so a stale file is never read; the
  old one stays (delete the folder to reclaim it). Media files are taken as unchanged: replacing
  an image in place under the same name keeps the old length (delete the folder after such edits).
* **Trust:** a file is used only when its header names the same hash and record count and its
  payload has the recorded size and SHA-256; otherwise (truncated, corrupt, hand-edited) the
  lengths are counted again and the file replaced, with a note.
* **Writing:** to a temporary file in the same folder, flushed and synced, then renamed over the
  final name, so a reader sees the old file or the whole new one.
* **Ranks:** under ``torch.distributed`` the call is collective (every rank must make it): rank 0
  reads the file and hands the lengths to every rank; without a file, each rank counts its share
  of the records (in a pool of processes, see :func:`vitacore.data.lengths.compute_lengths`), the
  shares are gathered on every rank, and rank 0 writes the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from vitacore import ranks
from vitacore._version import __version__
from vitacore.console import logger
from vitacore.data.lengths import LengthCounter, compute_lengths, default_num_processes
from vitacore.durable import atomic_write_bytes

__all__ = ["CACHE_FOLDER", "FORMAT_VERSION", "LengthCacheLocation", "cache_key", "cached_lengths",
           "tokenizer_digest"]

#: Bump when the counting rules change in a way the fingerprinted settings do not show.
FORMAT_VERSION = 1
#: The folder beside the data file.
CACHE_FOLDER = ".vitacore_lengths"
#: The folder in the output directory, used when the data's folder is not writable.
OUTPUT_CACHE_FOLDER = "length_cache"
_MAGIC = b"vitacore-lengths\n"


@dataclass(frozen=True)
class LengthCacheLocation:
    """Where a dataset's length cache lives.

    Attributes:
        folder: ``--length_cache_dir`` (None: beside ``data_file``, else in ``output_dir``).
        data_file: the first data file; the default folder is ``.vitacore_lengths`` beside it.
        output_dir: the run's output folder; ``<output_dir>/length_cache`` when the default
            folder is not writable.
    """

    folder: Optional[str] = None
    data_file: Optional[str] = None
    output_dir: Optional[str] = None

    def folders(self) -> list[str]:
        """The folders to look in and write to, in order."""
        if self.folder:
            return [os.path.abspath(self.folder)]
        found = []
        if self.data_file:
            found.append(os.path.join(os.path.dirname(os.path.abspath(self.data_file)), CACHE_FOLDER))
        if self.output_dir:
            found.append(os.path.join(os.path.abspath(self.output_dir), OUTPUT_CACHE_FOLDER))
        return found


def tokenizer_digest(tokenizer) -> str:
    """A hash that changes when the tokenizer's vocabulary, merges, added or special tokens change.

    A fast tokenizer is hashed through its backend's full JSON (vocabulary, merges, normalizer,
    pre-tokenizer, added tokens); another through its vocabulary and vocabulary files. Its special
    tokens and their ids are hashed in both cases.
    """
    digest = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and callable(getattr(backend, "to_str", None)):
        digest.update(backend.to_str().encode())
    else:
        for name in sorted(getattr(tokenizer, "vocab_files_names", {}) or {}):
            path = getattr(tokenizer, name, None)
            if isinstance(path, str) and os.path.isfile(path):
                with open(path, "rb") as fh:
                    digest.update(fh.read())
        if callable(getattr(tokenizer, "get_vocab", None)):
            digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {name: str(getattr(tokenizer, name, None)) for name in
                ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id", "pad_token_id")}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    specials["added"] = {str(i): str(token) for i, token in sorted(added.items())}
    digest.update(json.dumps(specials, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def cache_key(records_fingerprint: str, counter: LengthCounter, model_max_length: Optional[int]) -> tuple[str, dict]:
    """``(hash, what it hashes)``: the cache file's identity for these records and settings."""
    parts = {"format": FORMAT_VERSION, "vitacore": __version__, "records": records_fingerprint,
             "tokenizer": tokenizer_digest(counter.tokenizer), "model_max_length": model_max_length,
             **counter.settings()}
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32], parts


def _file_name(key: str) -> str:
    return f"lengths-{key}.bin"


def _read(path: str, key: str, num_records: int) -> np.ndarray:
    """The lengths in ``path``; ValueError (saying what is wrong) unless it is whole and for ``key``."""
    with open(path, "rb") as fh:
        if fh.readline() != _MAGIC:
            raise ValueError("not a vitacore length cache")
        try:
            header = json.loads(fh.readline())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("its header is not readable") from None
        payload = fh.read()
    if not isinstance(header, dict) or header.get("key") != key:
        raise ValueError("its header names other settings")
    if header.get("num_records") != num_records:
        raise ValueError(f"it holds {header.get('num_records')} records, not {num_records}")
    dtype = np.dtype(header.get("dtype", "<i4"))
    if len(payload) != num_records * dtype.itemsize:
        raise ValueError(f"{len(payload)} bytes of lengths where {num_records * dtype.itemsize} were written")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise ValueError("its lengths do not match their checksum")
    return np.frombuffer(payload, dtype=dtype).astype(np.int64)


def _find(folders: Sequence[str], key: str, num_records: int) -> Optional[np.ndarray]:
    for folder in folders:
        path = os.path.join(folder, _file_name(key))
        if not os.path.isfile(path):
            continue
        try:
            lengths = _read(path, key, num_records)
        except (OSError, ValueError, TypeError) as err:
            logger.warning(f"note: length cache {path} is not usable ({err}); counting the lengths again")
            continue
        logger.info(f"modality lengths of {num_records} records: read from {path}")
        return lengths
    return None


def _store(folders: Sequence[str], key: str, parts: dict, lengths: np.ndarray) -> Optional[str]:
    """Write the cache file in the first folder that takes it; the path, or None (with a note)."""
    wide = lengths.size and max(-int(lengths.min()), int(lengths.max())) >= 2**31
    payload = lengths.astype("<i8" if wide else "<i4").tobytes()
    header = {"key": key, "num_records": int(lengths.size), "dtype": "<i8" if wide else "<i4",
              "sha256": hashlib.sha256(payload).hexdigest(), "written": time.strftime("%Y-%m-%d %H:%M:%S"), **parts}
    data = _MAGIC + json.dumps(header, sort_keys=True, default=str).encode() + b"\n" + payload
    problems = []
    for folder in folders:
        path = os.path.join(folder, _file_name(key))
        try:
            os.makedirs(folder, exist_ok=True)
            atomic_write_bytes(path, data)
            return path
        except OSError as err:
            problems.append(f"{folder}: {err.strerror or err}")
    if problems:
        logger.warning(f"note: modality lengths not cached (no writable folder: {'; '.join(problems)}); "
                       "give --length_cache_dir a writable folder to skip the count at the next start")
    return None


def cached_lengths(records: Sequence, counter: LengthCounter, records_fingerprint: str,
                   location: Optional[LengthCacheLocation], model_max_length: Optional[int] = None) -> np.ndarray:
    """Every record's signed length (``int64``), from the cache when it holds them, else counted and kept.

    Collective under ``torch.distributed``: every rank calls it at the same point.

    Args:
        records: the dataset's records.
        counter: what fixes the lengths.
        records_fingerprint: the records' fingerprint (the dataset's ``fingerprint``).
        location: where the cache lives; None: count, keep nothing.
        model_max_length: the run's ``--model_max_length`` (part of the cache's identity).

    Raises:
        ValueError / OSError: counting failed (on the rank where it did; peers raise
            :class:`vitacore.ranks.PeerRankError`).
    """
    num_records = len(records)
    size, rank = ranks.world_size(), ranks.this_rank()
    folders = location.folders() if location is not None else []
    found = None
    with ranks.together("reading the modality-length cache"):  # rank 0 reads; a failure there stops all
        key, parts = cache_key(records_fingerprint, counter, model_max_length) if folders else ("", {})
        if folders and rank == 0:
            found = _find(folders, key, num_records)
    found = ranks.broadcast_from_main(found)
    if found is not None:
        return found
    start, stop = num_records * rank // size, num_records * (rank + 1) // size
    started = time.time()
    with ranks.together("counting the records' modality lengths"):
        mine = compute_lengths(records, counter, start, stop)
    lengths = np.concatenate(ranks.gather_all(mine)) if size > 1 else mine
    assert len(lengths) == num_records
    if rank == 0 and folders:
        path = _store(folders, key, parts, lengths)
        workers = default_num_processes(stop - start)
        where = f"cached in {path}" if path else "not cached"
        logger.info(f"modality lengths of {num_records} records: counted in {time.time() - started:.1f}s "
                    f"({workers} process(es) on each of {size} rank(s)), {where}")
    return lengths
