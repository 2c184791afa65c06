"""Declarative validation of nested dicts into dataclasses.

Every config dataclass in lorabench declares its fields once, with a type
annotation, a default and optional checks in the field metadata; `build`
walks the dict, rejects unknown keys, checks types and constraints, and
reports the first problem as one `ConfigError` naming the source file and the
key path (``matrix.lora_rank[2]``). No validation is scattered elsewhere.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml


MAX_MESSAGE_CHARS = 400


class ConfigError(Exception):
    """A user input problem: one line, naming the source and the key path (never over
    MAX_MESSAGE_CHARS, whatever value it quotes)."""

    def __init__(self, source: str, path: str, message: str):
        def line(src: str) -> str:
            return one_line(f"{src}: {path}: {message}" if path else f"{src}: {message}")
        text = line(source)
        over = len(text) - MAX_MESSAGE_CHARS
        if over > 0 and len(str(source)) > 120:  # a very long file path gives way first (its middle), so that the
            keep = max(len(str(source)) - over - 1, 120)  # key and the reason stay on the line
            text = line(f"{str(source)[:keep // 2]}…{str(source)[len(str(source)) - (keep - keep // 2):]}")
        super().__init__(text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…")
        self.source, self.path, self.message = source, path, message


def one_line(text: str) -> str:
    """`text` as one line a terminal shows as it is: whitespace runs one space, and any other control
    character (an escape sequence in a key, a file name or an option's value) written as its escape."""
    return "".join(ascii(c)[1:-1] if ord(c) < 32 or 0x7F <= ord(c) < 0xA0 else c for c in " ".join(str(text).split()))


class FieldError(ValueError):
    """Raised from `__post_init__` for a cross-field problem; `build` adds the path."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


Check = Callable[[Any], Optional[str]]
MAX_VALUE_CHARS = 60
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, MAX_VALUE_CHARS, MAX_VALUE_CHARS
INT_LIMIT = 2**63  # integers must fit int64 (torch's seeds, tensor sizes)


def short(value: Any) -> str:
    """repr(value) cut to MAX_VALUE_CHARS, however large or deep the value is."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def ge(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}, got {short(v)}"


def gt(lo: float) -> Check:
    return lambda v: None if v > lo else f"must be > {lo}, got {short(v)}"


def lt(hi: float) -> Check:
    return lambda v: None if v < hi else f"must be < {hi}, got {short(v)}"


def le(hi: float) -> Check:
    return lambda v: None if v <= hi else f"must be <= {hi}, got {short(v)}"


def one_of(*allowed: Any) -> Check:
    return lambda v: None if v in allowed else f"must be one of {', '.join(map(str, allowed))}, got {short(v)}"


def nonempty(v: Any) -> Optional[str]:
    return None if len(v) > 0 else "must not be empty"


def fld(default: Any = dataclasses.MISSING, doc: str = "", checks: tuple = (), row: bool = False) -> Any:
    """A dataclass field with a docstring and checks kept in its metadata; `row`: every result
    row stores it (row/codec.py derives the row's keys from these flags)."""
    meta = {"doc": doc, "checks": checks, "row": row}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


PLURALS = {"an integer": "integers", "a number": "numbers", "a string": "strings", "true or false": "true or false values"}


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple):
        one = type_name(typing.get_args(tp)[0])
        return "a list of " + PLURALS.get(one, one.replace("a list of", "lists of", 1) if one.startswith("a list of")
                                          else f"items each {one}")
    if origin is dict or tp is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
            tuple: "a list of strings"}.get(tp, getattr(tp, "__name__", str(tp)))


def _yaml_hint(value: Any, tp: Any) -> str:
    """YAML 1.1 reads 1e-3 (no dot) as text: say so where a number was wanted."""
    if not isinstance(value, str) or float not in (tp, *typing.get_args(tp)):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return f" (YAML reads {value} as text: write it with a dot, e.g. {float(value)!r})"


def coerce(value: Any, tp: Any, path: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it in canonical form."""
    origin = typing.get_origin(tp)
    bad = ConfigError(source, path, f"must be {type_name(tp)}, got {short(value)}{_yaml_hint(value, tp)}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, path, source)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else bad  # Optional[X]: X's own words (an integer past 2^63 says so)
    if origin is Literal:
        if any(value == c and type(value) is type(c) for c in typing.get_args(tp)):
            return value
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        (elem,) = typing.get_args(tp)[:1]
        return [coerce(v, elem, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if -INT_LIMIT <= value < INT_LIMIT:
                return value
            raise ConfigError(source, path, f"must be an integer in [-2^63, 2^63), got {short(value)}")
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if abs(value) >= INT_LIMIT or not math.isfinite(value):  # a result row holds numbers below 2^63
                raise ConfigError(source, path, f"must be a finite number below 2^63, got {short(value)}")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, source)
    raise TypeError(f"unsupported annotation {tp}")


def run_checks(value: Any, checks: tuple, path: str, source: str) -> None:
    if value is None:
        return
    for check in checks:
        msg = check(value)
        if msg:
            raise ConfigError(source, path, msg)


def build(cls: type, data: Any, path: str, source: str) -> Any:
    """Validate the mapping `data` against dataclass `cls` and construct it."""
    if not isinstance(data, dict):
        raise ConfigError(source, path or "(top level)", f"must be a mapping, got {short(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            allowed = ", ".join(fields)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            shown = str(key) if str(key).strip() == str(key) and str(key) else repr(str(key))  # 'd_ff ' shows its space
            raise ConfigError(source, join(path, shown), f"unknown key ({hint}allowed: {allowed})")
    kwargs = {}
    for name, f in fields.items():
        sub = join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(source, sub, "missing required key")
            continue
        value = coerce(data[name], hints[name], sub, source)
        run_checks(value, f.metadata.get("checks", ()), sub, source)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(source, join(path, e.key), e.message) from None


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class DuplicateKey(ValueError):
    """A JSON object gives `key` twice (unique_keys)."""

    def __init__(self, key):
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook: DuplicateKey for a key given twice (json would keep the last
    silently), as StrictLoader refuses one in YAML."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k)
        out[k] = v
    return out


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases (a few hundred bytes of nested aliases expand
    without bound), nesting deeper than `max_depth` and duplicate keys (YAML silently keeps
    the last)."""

    max_depth = 50

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not allowed in lorabench files",
                                       problem_mark=event.start_mark)
        self.depth = getattr(self, "depth", 0) + 1
        try:
            if self.depth > self.max_depth:
                raise yaml.MarkedYAMLError(problem=f"nested deeper than {self.max_depth} levels",
                                           problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a non-scalar key fails later, as not a string
            if key_node.value in seen:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {short(key_node.value)}",
                                           problem_mark=key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def missing_file(p: Path) -> str:
    """Why `p`, which is not a regular file, cannot be read: it does not exist, or it is something
    else (a device such as /dev/null, a pipe, a socket)."""
    return "not a regular file (a device, a pipe or a socket)" if p.exists() else "no such file"


def read_yaml(path: str) -> Any:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(path, "", "is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(path, "", missing_file(p))
    try:
        return yaml.load(p.read_text(), Loader=StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(path, "", f"malformed YAML: {where}{problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not a text file") from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    except ValueError:  # yaml's int() of a literal past sys.get_int_max_str_digits()
        raise ConfigError(path, "", "a number too long to read (Python reads integers of at most 4300 digits)") from None


def row_fields(cls: type) -> list[str]:
    """The fields of dataclass `cls` that a result row stores (declared with fld(..., row=True))."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("row")]
