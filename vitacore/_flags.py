"""Parsing machinery behind :mod:`vitacore.config`.

Kept separate from the dataclasses so that ``config.py`` stays a readable list
of fields and rules. Nothing here knows about VITA's fields: it works on
:class:`FlagSpec` records built from any dataclass.
"""

import dataclasses
import difflib
import re
import typing
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml


class ConfigError(ValueError):
    """A flag, YAML key or value that vitacore cannot accept."""


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """What the parser needs to know about one configuration field."""

    name: str
    section: str  # "model" | "data" | "training" | "run"
    kind: type  # bool, int, float or str
    optional: bool  # annotated Optional[...]: "None"/"none" means None
    literal: bool  # keep strings verbatim even for Optional fields
    default: Any
    help: str


_KINDS = (bool, int, float, str)
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def specs_for(cls: type, section: str, exclude: Iterable[str] = ()) -> List[FlagSpec]:
    """Builds one :class:`FlagSpec` per field of a dataclass.

    Args:
        cls: The dataclass.
        section: Section label stored in each spec.
        exclude: Field names to skip (nested sections, bookkeeping).

    Returns:
        The specs in declaration order.
    """
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind, optional = hints[f.name], False
        args = typing.get_args(kind)
        if typing.get_origin(kind) is typing.Union and type(None) in args:
            (kind,) = [a for a in args if a is not type(None)]
            optional = True
        if kind not in _KINDS:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported field type {kind!r}")
        out.append(FlagSpec(f.name, section, kind, optional, bool(f.metadata.get("literal")),
                            f.default, f.metadata.get("help", "")))
    return out


def convert(spec: FlagSpec, raw: Any, where: str) -> Any:
    """Converts a flag string or a YAML scalar to the field's type.

    Args:
        spec: The field being set.
        raw: A string from the command line, or whatever YAML produced.
        where: How to name the source in errors, e.g. ``--learning_rate``.

    Returns:
        The typed value.

    Raises:
        ConfigError: The value does not fit the field's type.
    """
    if raw is None:
        if spec.optional:
            return None
        raise ConfigError(f"{where} needs a value (it cannot be null)")
    if isinstance(raw, str) and spec.optional and not spec.literal and raw in ("None", "none"):
        return None
    kind = spec.kind
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        word = str(raw).strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ConfigError(f"{where} expects a boolean (True/False, 1/0, yes/no), got {raw!r}")
    if kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where} expects an integer, got {raw!r}")
    if kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            # PyYAML hands "5e-4" over as a string (its float regex needs a dot).
            try:
                return float(raw.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where} expects a number, got {raw!r}")
    if isinstance(raw, (list, dict)):
        raise ConfigError(f"{where} expects a string, got {type(raw).__name__} {raw!r}")
    # YAML scalars such as `stage: 2` arrive as numbers; a str field keeps their text.
    return str(raw)


def type_error(spec: FlagSpec, value: Any) -> Optional[str]:
    """Describes why ``value`` is not an instance of the field's type, or returns None."""
    if value is None:
        return None if spec.optional else f"--{spec.name} must not be None"
    if spec.kind is bool:
        ok = isinstance(value, bool)
    elif spec.kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, spec.kind) and not (spec.kind is int and isinstance(value, bool))
    if ok:
        return None
    return (f"--{spec.name} must be {spec.kind.__name__}, got {type(value).__name__} {value!r}; "
            "build configs with parse_args() or convert the value first")


def suggestion(word: str, candidates: Iterable[str], prefix: str = "--") -> str:
    """Returns ``"; did you mean --x?"`` for close matches, else an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(prefix + c for c in close) + "?"


def split_argv(argv: Sequence[str], lookup: Mapping[str, Tuple[str, bool]]
               ) -> List[Tuple[str, str, str]]:
    """Splits argv into ``(canonical_name, raw_value, flag_as_typed)`` triples.

    Args:
        argv: Command-line tokens, without the program name.
        lookup: Normalised flag name (underscores) -> (canonical name, is_bool).

    Returns:
        One triple per flag occurrence, in order; repeats are kept.

    Raises:
        ConfigError: Unknown flag, missing value or positional argument.
    """
    out = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("-") or tok in ("-", "--") or _is_number(tok):
            raise ConfigError(f"unexpected positional argument {tok!r}; every setting is given "
                              "as --flag value (run with --help to list the flags)")
        name, eq, value = tok.lstrip("-").partition("=")
        key = name.replace("-", "_")
        flag = "--" + name
        if key not in lookup or not tok.startswith("--"):
            hint = suggestion(key, lookup) or "; run with --help to list the flags"
            raise ConfigError(f"unknown flag {tok.partition('=')[0]}{hint}")
        canonical, is_bool = lookup[key]
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            # A token that looks like a flag is never swallowed as a value.
            has_value = nxt is not None and not nxt.startswith("--")
            if is_bool:
                value = nxt if has_value else "True"
            elif has_value:
                value = nxt
            else:
                raise ConfigError(f"{flag} needs a value")
            i += has_value
        out.append((canonical, value, flag))
        i += 1
    return out


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false, so `save_strategy: no` stays "no"."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def read_yaml_mapping(path: str) -> Dict[Any, Any]:
    """Reads a YAML file that must hold a mapping (an empty file counts as ``{}``).

    Args:
        path: File to read.

    Returns:
        The top-level mapping.

    Raises:
        ConfigError: Missing file, invalid YAML (with the line YAML reports) or not a mapping.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of `field: value` at the top level, "
                          f"got {type(data).__name__}")
    return data


def yaml_entries(path: str, specs: Mapping[str, FlagSpec], aliases: Mapping[str, str],
                 sections: Iterable[str]) -> List[Tuple[str, Any, str, str]]:
    """Reads a flat or sectioned YAML config into ``(field, raw, where, spelling)`` entries.

    Args:
        path: YAML file.
        specs: Field name -> spec; ``spec.section`` says which section key may hold it.
        aliases: Old key spelling -> field name.
        sections: Top-level keys that hold a nested mapping of one section's fields.

    Returns:
        Entries in file order, values unconverted.

    Raises:
        ConfigError: Unknown key (with a suggestion) or a key under the wrong section.
    """
    entries = []

    def add(key: Any, value: Any, section: Optional[str]) -> None:
        spelling = str(key).replace("-", "_")
        name = aliases.get(spelling, spelling)
        where = f"'{spelling}' in {path}"
        if name not in specs:
            hint = suggestion(spelling, [*specs, *aliases], "") or "; see --help for the known keys"
            raise ConfigError(f"unknown key {where}{hint}")
        owner = specs[name].section
        if section is not None and owner != section:
            place = "the top level" if owner == "run" else f"'{owner}:'"
            raise ConfigError(f"{where} is under '{section}:' but belongs to {place}; move it")
        entries.append((name, value, where, spelling))

    sections = set(sections)
    for key, value in read_yaml_mapping(path).items():
        if key not in sections:
            add(key, value, None)
        elif value is None:  # `training:` with nothing under it
            continue
        elif isinstance(value, dict):
            for sub_key, sub_value in value.items():
                add(sub_key, sub_value, key)
        else:
            raise ConfigError(f"'{key}' in {path} must be a mapping of `field: value`")
    return entries


def dump_yaml(data: Mapping[str, Any], path: str, header: str = "") -> None:
    """Writes a mapping as block-style YAML, keeping key order."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(header)
        yaml.safe_dump(dict(data), fh, sort_keys=False, default_flow_style=False)


def format_help(groups: Sequence[Tuple[str, Sequence[FlagSpec]]],
                aliases: Mapping[str, str], intro: str = "") -> str:
    """Renders the ``--help`` text: every flag grouped by section, with default and help."""
    back = {new: old for old, new in aliases.items()}
    lines = [intro] if intro else []
    for title, specs in groups:
        lines += ["", f"{title}:"]
        for s in specs:
            kind = s.kind.__name__ + ("|None" if s.optional else "")
            text = s.help + (f" (alias: --{back[s.name]})" if s.name in back else "")
            lines.append(f"  --{s.name:<30} {kind:<10} default={s.default!r:<14} {text}")
    return "\n".join(lines) + "\n"


def rule(errors: List[str]) -> Callable[[bool, str], None]:
    """Returns ``check(ok, message)`` that appends ``message`` to ``errors`` when not ok."""

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    return check
