"""Settings declared once, as dataclass fields: a field's type and metadata are its check and its flag.

    lr: float = option(1e-3, positive=True, help="learning rate")

Every settings class (a rule's `Options`, `RunConfig`, `OptimConfig`) is checked the same way by
`check_fields`: the value must have the field's annotated type (bool; int; float, which takes an
int; str; list / tuple of those; dict; Optional and Union of these), then the metadata holds:
`choices`, `min` / `max` (inclusive), `below` (exclusive upper bound), `positive` (> 0); bounds
apply to each number of a list. `help`, `metavar` and `flag` (when not --field-name) describe the
command-line flag; `parse_text` turns a flag's text into the field's type. Errors are one line
naming the flag.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Union

from .errors import BpfreeError

_NONE = type(None)


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           **metadata) -> Any:
    """A dataclass field carrying its checks and help: `option(4, positive=True, help="...")`."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def same_as(cls: type, name: str) -> Any:
    """A field declared like `cls`'s field `name` (default, checks, help), for a settings class that
    carries another's settings (RunConfig's `lr` is OptimConfig's)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)


def flag(f: dataclasses.Field) -> str:
    """The command-line flag of a field, the name errors use: metadata `flag`, else --field-name."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of a settings dataclass."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError:     # an annotation naming something local to a function: go by the defaults
        hints = {f.name: type(f.default) for f in dataclasses.fields(cls)
                 if f.default not in (dataclasses.MISSING, None)}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def without_none(kind: Any) -> Any:
    """Optional[X] -> X; other types unchanged."""
    args = [a for a in typing.get_args(kind) if a is not _NONE]
    if _is_union(kind) and len(args) == 1:
        return args[0]
    return kind


def check_options(options):
    """Check every field (`check_fields`), then the class's own `validate()` for constraints that
    involve several fields, if it has one. Returns `options`."""
    check_fields(options)
    if hasattr(options, "validate"):
        options.validate()
    return options


def check_fields(obj) -> None:
    """Each field's value has the field's type and obeys its metadata; else BpfreeError, one line."""
    kinds = field_types(type(obj))
    for f in dataclasses.fields(obj):
        check_value(f, kinds[f.name], getattr(obj, f.name))


def check_value(f: dataclasses.Field, kind: Any, value) -> None:
    name, meta = flag(f), f.metadata
    if not _matches(kind, value):
        raise BpfreeError(f"{name} must be {_describe(kind, meta.get('choices'))}, got {value!r}")
    if "choices" in meta and isinstance(value, (str, int, float)) and value not in meta["choices"]:
        others = [k for k in typing.get_args(kind) if k not in (str, _NONE)] if _is_union(kind) else []
        alternatives = "".join(f" or {_describe(k)}" for k in others)    # split: "... or a list of integers"
        raise BpfreeError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, meta['choices']))}"
                          f"{alternatives}")
    if isinstance(value, (list, tuple)):
        name += " values"
    for number in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            _check_bounds(name, meta, number, value)


def parse_text(f: dataclasses.Field, kind: Any, text: str):
    """A flag's text as a value of the field's type: "5" -> 5, "5,5,2" -> [5, 5, 2], "yes" -> True.

    Union members are tried in order, str last (split: "balanced" or "1,3"). Only the type is
    checked here; `check_value` checks the rest.
    """
    value = _parse(without_none(kind), text)
    if value is _FAILED:
        raise BpfreeError(f"{flag(f)} must be {_describe(kind, f.metadata.get('choices'))}, got {text!r}")
    return value


# --- helpers ---------------------------------------------------------------------------------------
_FAILED = object()
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _is_union(kind) -> bool:
    return typing.get_origin(kind) in (Union, types.UnionType)


def _sequence_item(kind):
    # list[int] -> int; tuple[int, ...] -> int; bare list -> Any
    args = [a for a in typing.get_args(kind) if a is not Ellipsis]
    return args[0] if args else Any


def _is_sequence(kind) -> bool:
    return (typing.get_origin(kind) or kind) in (list, tuple)


def _matches(kind, value) -> bool:
    if kind is Any:
        return True
    if _is_union(kind):
        return any(_matches(k, value) for k in typing.get_args(kind))
    if kind is _NONE:
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if _is_sequence(kind):
        item = _sequence_item(kind)
        return isinstance(value, (list, tuple)) and all(_matches(item, v) for v in value)
    origin = typing.get_origin(kind) or kind
    return isinstance(value, origin) if isinstance(origin, type) else True


def _describe(kind, choices=None, plural: bool = False) -> str:
    if _is_union(kind):
        return " or ".join(_describe(k, choices, plural) for k in typing.get_args(kind) if k is not _NONE)
    if kind is str and choices:
        return "one of " + ", ".join(map(str, choices))
    if _is_sequence(kind):
        return "a list of " + _describe(_sequence_item(kind), plural=True)
    words = {bool: ("true or false", "true or false values"), int: ("an integer", "integers"),
             float: ("a number", "numbers"), str: ("a string", "strings"),
             dict: ("a mapping of names to values", "mappings")}
    origin = typing.get_origin(kind) or kind
    if origin in words:
        return words[origin][plural]
    return ("values of " if plural else "a value of ") + getattr(origin, "__name__", str(origin))


def _parse(kind, text: str):
    if _is_union(kind):
        members = [k for k in typing.get_args(kind) if k is not _NONE]
        for k in sorted(members, key=lambda k: k is str):      # str last: it takes any text
            value = _parse(k, text)
            if value is not _FAILED:
                return value
        return _FAILED
    if kind is bool:
        return _BOOLS.get(text.strip().lower(), _FAILED)
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            return _FAILED
    if _is_sequence(kind):
        item = _sequence_item(kind)
        values = [_parse(item, v.strip()) for v in text.strip().strip("[]()").split(",") if v.strip()]
        if any(v is _FAILED for v in values):
            return _FAILED
        return tuple(values) if (typing.get_origin(kind) or kind) is tuple else values
    return text


def _check_bounds(name: str, meta, number, value) -> None:
    low, high, below = meta.get("min"), meta.get("max"), meta.get("below")
    if meta.get("positive") and not number > 0:
        raise BpfreeError(f"{name} must be > 0, got {value}")
    ok = ((low is None or number >= low) and (high is None or number <= high)
          and (below is None or number < below))
    if ok:
        return
    low, high, below = (f"{b:g}" if b is not None else None for b in (low, high, below))
    if low is not None and (high is not None or below is not None):
        span = f"[{low}, {high}]" if high is not None else f"[{low}, {below})"
        raise BpfreeError(f"{name} must be in {span}, got {value}")
    if low is not None:
        raise BpfreeError(f"{name} must be >= {low}, got {value}")
    raise BpfreeError(f"{name} must be {'<=' if high is not None else '<'} "
                      f"{high if high is not None else below}, got {value}")
