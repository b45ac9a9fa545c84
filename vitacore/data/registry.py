"""Where the training data lives: a YAML dataset registry, or data files named on the command line.

VITA keeps its registry in Python source (``dataset_config.py``); vitacore reads the same layout
from ``--data_registry datasets.yaml``::

    pretrain_mix:                      # a --dataset_use name (comma-separate several)
      - chat_path: json/caption.json   # VITA JSON records (or JSON Lines: .jsonl)
        data_ratio: 0.5                # optional: keep this fraction (seeded by --seed)
        audio_folder: audio            # optional: folder of the records' audio files
        video_folder: videos           # optional: folder of the records' videos
        image_folder: images/misc      # optional: images of records without a 'set'
        sharegpt4: images/sharegpt4    # any other key: a 'set' name -> that set's image folder

Relative paths resolve against the YAML file's folder. Simple mode takes
``--data_path a.json,b.json`` with ``--image_folder`` / ``--audio_folder`` / ``--video_folder``
(relative to the working directory); those flags also fill the folders a registry entry leaves out,
and without either, media paths are relative to the JSON file's folder.

Media paths are resolved here, once, into absolute paths on each record, so the dataset opens
files without knowing the registry.
"""

from __future__ import annotations

import difflib
import math
import os
import random
from array import array
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import numpy as np
import yaml

from vitacore.data.record_store import CodedStrings, RecordOrigins, RecordStore, RecordStoreBuilder
from vitacore.data.records import RejectedRecord, as_list, read_file_records

_FOLDER_KEYS = ("image_folder", "audio_folder", "video_folder")
_RESERVED = ("chat_path", "data_ratio", *_FOLDER_KEYS)


@dataclass(frozen=True)
class DataSource:
    """One JSON file and the folders its media live in (all paths absolute).

    Attributes:
        chat_path: the VITA JSON file.
        label: where the source was declared, for error messages (``"datasets.yaml: mix[0]"``).
        data_ratio: fraction of the records kept.
        image_folder: images of records without ``set`` (None: the JSON file's folder).
        set_folders: ``set`` name -> image folder.
        audio_folder: audio files (None: the JSON file's folder).
        video_folder: videos (None: the JSON file's folder).
    """

    chat_path: str
    label: str
    data_ratio: float = 1.0
    image_folder: Optional[str] = None
    set_folders: Mapping[str, str] = field(default_factory=dict)
    audio_folder: Optional[str] = None
    video_folder: Optional[str] = None
    name: str = ""  # the registry's dataset name ("" for --data_path files: the file's name stands in)

    @property
    def declared_by(self) -> str:
        """The flag (or registry entry) that named this source, for error messages."""
        return self.label if self.label.startswith("--") else f"--data_registry {self.label}.chat_path"

    @property
    def dataset_name(self) -> str:
        """How metrics name this source's records: the registry name, else the JSON file's stem."""
        return self.name or os.path.splitext(os.path.basename(self.chat_path))[0]


def _abs(path: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _read_yaml(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data_registry {path!r} does not exist")
    with open(path, encoding="utf-8-sig") as fh:
        try:
            return yaml.safe_load(fh)
        except UnicodeDecodeError as err:
            raise ValueError(f"--data_registry {path}: not UTF-8 text ({err.reason}); re-save the file as "
                             "UTF-8") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ValueError(f"--data_registry {path}: not valid YAML{at}: {problem}") from None


def _entry(raw, where: str, base: str, defaults: Mapping[str, Optional[str]], name: str = "") -> DataSource:
    """One registry entry -> a :class:`DataSource`, checking every key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping with 'chat_path' (and optional data_ratio, audio_folder, "
                         f"video_folder, <set>: <image folder>), got {raw!r}")
    for key, value in raw.items():
        if key != "data_ratio" and not (isinstance(value, str) and value):
            raise ValueError(f"{where}.{key} must be a path (non-empty string), got {value!r}")
    if "chat_path" not in raw:
        raise ValueError(f"{where} has no 'chat_path' (the VITA JSON file of this entry)")
    chat_path = _abs(raw["chat_path"], base)
    if not os.path.isfile(chat_path):
        raise FileNotFoundError(f"{where}.chat_path: data file {chat_path!r} does not exist")
    ratio = raw.get("data_ratio", 1.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"{where}.data_ratio is {ratio!r}; it must be a number in (0, 1]")
    folders = {key: _abs(raw[key], base) if key in raw else defaults.get(key) for key in _FOLDER_KEYS}
    sets = {str(key): _abs(value, base) for key, value in raw.items() if key not in _RESERVED}
    named = {f"{where}.{key}": path for key, path in {**folders, **sets}.items() if key in raw}
    for name, path in named.items():
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{name}: folder {path!r} does not exist")
    return DataSource(chat_path, where, float(ratio), folders["image_folder"], sets,
                      folders["audio_folder"], folders["video_folder"], name)


def load_registry(path: str, defaults: Optional[Mapping[str, Optional[str]]] = None,
                  names: Optional[Iterable[str]] = None) -> dict[str, list[DataSource]]:
    """Read a registry YAML: ``{dataset name: [DataSource, ...]}``.

    Args:
        path: the YAML file.
        defaults: absolute ``image_folder`` / ``audio_folder`` / ``video_folder`` for entries that
            leave them out (the command-line flags).
        names: read only these datasets (as VITA reads only the ``--dataset_use`` ones, so a stale
            entry of another dataset stops nothing); the others map to an empty list. None: all.

    Raises:
        FileNotFoundError: the YAML, a ``chat_path`` or a folder does not exist.
        ValueError: invalid YAML or an entry that breaks the layout (named ``file: name[i].key``).
    """
    registry = _read_yaml(path)
    if not isinstance(registry, dict) or not registry:
        raise ValueError(f"--data_registry {path}: expected a mapping of dataset names to lists of entries "
                         f"(name: [{{chat_path: file.json, ...}}]), got {type(registry).__name__}")
    base = os.path.dirname(os.path.abspath(path))
    out = {}
    for name, entries in registry.items():
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"--data_registry {path}: dataset {name!r} must be a non-empty list of entries "
                             "(each '- chat_path: file.json ...')")
        if names is not None and str(name) not in names:
            out[str(name)] = []
            continue
        out[str(name)] = [_entry(raw, f"{path}: {name}[{i}]", base, defaults or {}, str(name))
                          for i, raw in enumerate(entries)]
    return out


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def sources_from_config(data) -> Optional[list[DataSource]]:
    """The training sources the data flags name; None when they name none (the embedded demo data).

    Args:
        data: a :class:`vitacore.data.DataSpec` (or the run's ``DataArguments``): ``data_path``,
            ``dataset_use``, ``data_registry`` and the media folders.

    Raises:
        ValueError: flags combined wrongly, or an unknown dataset name (listing the known ones).
        FileNotFoundError: a file or folder that does not exist.
    """
    defaults = {key: os.path.abspath(getattr(data, key)) if getattr(data, key) else None for key in _FOLDER_KEYS}
    if data.data_path and (data.dataset_use or data.data_registry):
        raise ValueError("--data_path conflicts with --dataset_use / --data_registry; give one way of naming the data")
    if data.data_path:
        sources = []
        for path in _names(data.data_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--data_path: data file {path!r} does not exist")
            sources.append(DataSource(os.path.abspath(path), "--data_path", 1.0, defaults["image_folder"], {},
                                      defaults["audio_folder"], defaults["video_folder"]))
        return sources
    if data.data_registry and not data.dataset_use:
        raise ValueError(f"--data_registry {data.data_registry} is given without --dataset_use; "
                         "name the dataset(s) to train on, e.g. --dataset_use name1,name2")
    if not data.dataset_use:
        return None
    if not data.data_registry:
        raise ValueError(f"--dataset_use {data.dataset_use!r} needs --data_registry datasets.yaml (the YAML that "
                         "maps dataset names to JSON files), or use --data_path file.json instead")
    wanted = _names(data.dataset_use)
    registry = load_registry(data.data_registry, defaults, names=wanted)
    sources = []
    for name in wanted:
        if name not in registry:
            close = difflib.get_close_matches(name, list(registry), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--dataset_use {name!r} is not in --data_registry {data.data_registry}{hint}; "
                             f"known: {', '.join(sorted(registry))}")
        sources.extend(registry[name])
    return sources


def _resolve(record: dict, source: DataSource, where: str, restrict: bool = False) -> dict:
    """A copy of ``record`` with absolute media paths (images by ``set``, audio, video).

    With ``restrict`` (``--restrict_media_paths``), a path that resolves (symbolic links followed)
    outside its folder is a ValueError naming the field and the path.
    """
    json_dir = os.path.dirname(source.chat_path)
    out = dict(record)
    if record.get("image") is not None:
        images = as_list(record["image"])
        folders = [_set_folder(name, source, where) or json_dir for name in _image_sets(record, len(images), where)]
        out["image"] = _join(record["image"], folders, where, "image", restrict)
    for name, folder in (("audio", source.audio_folder), ("video", source.video_folder)):
        if record.get(name) is not None:
            paths = as_list(record[name])
            out[name] = _join(record[name], [folder or json_dir] * len(paths), where, name, restrict)
    return out


def _image_sets(record: dict, num_images: int, where: str) -> list:
    """The ``set`` of each image: one name for all, or VITA's packed lists (one per image, then videos)."""
    sets = record.get("set")
    if not isinstance(sets, list):
        return [sets] * num_images
    if len(sets) in (num_images, num_images + len(as_list(record.get("video")))):
        return sets[:num_images]
    if len({str(name) for name in sets}) == 1:
        return [sets[0]] * num_images
    raise ValueError(f"{where}: field 'set' lists {len(sets)} names for {num_images} image(s); give one per image "
                     "(then one per video), or a single name")


def _set_folder(set_name, source: DataSource, where: str) -> Optional[str]:
    """The image folder of ``set_name`` (records without ``set``, or sources without a set map: image_folder)."""
    if set_name is None or not source.set_folders:
        return source.image_folder
    if str(set_name) not in source.set_folders:
        raise ValueError(f"{where}: field 'set' is {str(set_name)!r}, which {source.label} maps to no image "
                         f"folder; known sets: {', '.join(sorted(source.set_folders))}")
    return source.set_folders[str(set_name)]


def _join(value, folders: list[str], where: str, field_name: str, restrict: bool):
    """``value`` (a path or a list) joined onto one folder per path; absolute paths stay as they are."""
    joined = [os.path.join(folder, path) for folder, path in zip(folders, as_list(value))]
    if restrict:
        for folder, path in zip(folders, joined):
            _check_inside(path, folder, where, field_name)
    return joined if isinstance(value, list) else joined[0]


def _check_inside(path: str, folder: str, where: str, field_name: str) -> None:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([real, root]) != root:
        raise ValueError(f"{where}: field '{field_name}' path {path!r} resolves to {real!r}, outside its folder "
                         f"{root!r} (--restrict_media_paths True keeps media inside the declared folders)")


def _kept_indices(source: DataSource, seed: int, num_records: int) -> range | list[int]:
    """The indices of the good records ``data_ratio`` keeps, in file order."""
    if source.data_ratio >= 1 or not num_records:
        return range(num_records)
    # Seeded per file, so the kept subset does not change when other entries are added.
    rng = random.Random(f"{seed}/{os.path.basename(source.chat_path)}")
    keep = max(1, math.floor(num_records * source.data_ratio))
    return sorted(rng.sample(range(num_records), keep))


def load_source(source: DataSource, seed: int, restrict_media_paths: bool = False
                ) -> tuple[RecordStore, RecordOrigins, list[RejectedRecord]]:
    """Read a source's records, keep ``data_ratio`` of the good ones, resolve their media.

    A record whose media cannot be resolved (a ``set`` that names no folder; with
    ``restrict_media_paths``, a path outside its folder) is rejected like a record that breaks the schema.

    Returns:
        ``(records, origins, rejected)``: the records with absolute media paths, in a
        :class:`~vitacore.data.record_store.RecordStore`; per record ``"file.json, record i"`` (its
        index in the file; JSON Lines: ``"file.jsonl, line n"``) for error messages; and the records
        that break VITA's schema (see :func:`vitacore.data.records.read_records`).
    """
    return load_sources([source], seed, restrict_media_paths)


def load_sources(sources: list[DataSource], seed: int, restrict_media_paths: bool = False
                 ) -> tuple[RecordStore, RecordOrigins, list[RejectedRecord]]:
    """:func:`load_source` over several sources, concatenated in order.

    Each file's records are read, resolved and stored compactly before the next file is read, so
    the Python objects of one file at a time exist. The origins' :attr:`RecordOrigins.codes` are
    each record's index in ``sources`` (see :func:`dataset_names_of`).
    """
    builder, codes, numbers = RecordStoreBuilder(), array("i"), array("q")
    prefixes, rejected = [], []
    for code, source in enumerate(sources):
        found = read_file_records(source.chat_path, source.declared_by)
        rejected += found.rejected
        prefix = f"{source.chat_path}, {'line' if found.lines is not None else 'record'} "
        prefixes.append(prefix)
        for i in _kept_indices(source, seed, len(found.records)):
            number = found.lines[i] if found.lines is not None else found.indices[i]
            try:
                resolved = _resolve(found.records[i], source, f"{prefix}{number}", restrict_media_paths)
            except ValueError as err:  # this record's problem (its 'set', its paths), not the run's
                rejected.append(RejectedRecord(found.indices[i], str(err)))
                continue
            builder.append(resolved)
            codes.append(code)
            numbers.append(number)
        del found  # this file's dicts go before the next file is read
    origins = RecordOrigins(prefixes, np.asarray(codes, dtype=np.int32), np.asarray(numbers, dtype=np.int64))
    return builder.finish(), origins, rejected


def dataset_names_of(sources: list[DataSource], origins: RecordOrigins) -> CodedStrings:
    """Per record of :func:`load_sources`, its source's :attr:`DataSource.dataset_name`."""
    return CodedStrings(origins.codes, [source.dataset_name for source in sources])
