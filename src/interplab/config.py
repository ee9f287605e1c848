"""Typed dataclass configs <-> command-line flags and JSON.

Every interplab config is a dataclass with a docstring under each field. This module
turns such a class into CLI flags (`--d-sae 4096`, `--lr=3e-4`, `--normalize`,
`--no-normalize`), coerces the strings by each field's annotation, writes help text
from the field docstrings, and converts configs to JSON-able dicts. Nested dataclass
fields are addressed with dots (`--sae.k 32`).

Supported annotations: `int`, `float`, `str`, `bool`, `Path`, `Literal[...]`,
`X | None` (the string "none" gives None), `list[X]` and `tuple[X, ...]` /
`tuple[X, Y]` from comma-separated values, unions (tried in declared order) and
nested dataclasses. Works with `from __future__ import annotations`.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime
import enum
import functools
import inspect
import math
import sys
import textwrap
import types
import typing
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, Literal

from interplab.errors import InterplabError, unknown

__all__ = [
    "config_from_args",
    "config_help",
    "config_to_dict",
    "field_docs",
    "to_jsonable",
]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}


# ----------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any) -> Any:
    """`obj` as plain JSON types (dict, list, str, int, float, bool, None), recursively.

    Handles dataclasses, mappings, sequences and sets, `Path`, enums, datetimes,
    numpy scalars and arrays, torch tensors (0-d -> number, else nested lists), torch
    dtypes (`"float32"`) and devices, and objects with a `to_dict()` method. numpy and
    torch are never imported here: an object can only be one of theirs if its library
    is already loaded. Non-finite floats stay NaN/Infinity (Python's json reads them).
    """
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return float(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, set | frozenset):
        items = [to_jsonable(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:  # mixed types cannot be ordered; keep iteration order
            return items
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, datetime.datetime | datetime.date):
        return obj.isoformat()
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.generic):
            return to_jsonable(obj.item())
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, torch.Tensor):
            obj = obj.detach().cpu()
            return obj.item() if obj.dim() == 0 else obj.tolist()
        if isinstance(obj, torch.dtype):
            return str(obj).removeprefix("torch.")
        if isinstance(obj, torch.device):
            return str(obj)
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return to_jsonable(to_dict())
    raise TypeError(f"cannot convert {type(obj).__qualname__} object {obj!r:.80} to JSON")


def _json_key(key: Any) -> str:
    key = to_jsonable(key)
    return key if isinstance(key, str) else str(key)


def config_to_dict(obj: Any) -> dict[str, Any]:
    """A config (dataclass instance, or mapping) as a JSON-able dict, nested configs included."""
    if isinstance(obj, type) or not (dataclasses.is_dataclass(obj) or isinstance(obj, Mapping)):
        raise InterplabError(
            f"expected a dataclass instance or a dict as config, got {type(obj).__qualname__}"
        )
    return to_jsonable(obj)


# ----------------------------------------------------------------------------- docs


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls`, inherited fields included.

    Read from the class source with `ast`; a field without a docstring (or a class whose
    source is unavailable, e.g. defined in a REPL) maps to "".
    """
    _require_dataclass(cls)
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


@functools.cache
def _own_field_docs(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return {}
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return {}
    docs = {}
    for stmt, following in zip(node.body, node.body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(following.value.value)
    return docs


# ----------------------------------------------------------------------------- flags


@dataclasses.dataclass(frozen=True)
class _Flag:
    """One settable leaf field: `path` from the root config, its type, default and doc."""

    path: tuple[str, ...]
    type: Any
    default: Any
    doc: str

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def display(self) -> str:
        return ".".join(p.replace("_", "-") for p in self.path)

    @property
    def is_bool(self) -> bool:
        return _strip_none(self.type) is bool


_MISSING = dataclasses.MISSING


def _require_dataclass(cls: Any) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise InterplabError(f"expected a dataclass type, got {cls!r}")


def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations; string annotations that cannot be resolved stay strings."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # e.g. a class defined in a function with postponed annotations
        hints = {}
        for klass in reversed(cls.__mro__):
            module = sys.modules.get(klass.__module__)
            namespace = {**vars(typing), **(vars(module) if module else {}), **vars(klass)}
            for name, annotation in klass.__dict__.get("__annotations__", {}).items():
                if isinstance(annotation, str):
                    with contextlib.suppress(Exception):  # unresolvable: stays a string
                        annotation = eval(annotation, namespace)
                hints[name] = annotation
        return hints


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def _flags(cls: type, prefix: tuple[str, ...] = (), base: Any = None) -> list[_Flag]:
    """Every settable leaf field of `cls`, nested dataclass fields flattened with dots."""
    hints = _type_hints(cls)
    docs = field_docs(cls)
    flags = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints.get(f.name, f.type)
        default = getattr(base, f.name) if base is not None else _field_default(f)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            nested_base = default if dataclasses.is_dataclass(default) else None
            flags.extend(_flags(tp, (*prefix, f.name), nested_base))
        else:
            flags.append(_Flag((*prefix, f.name), tp, default, docs.get(f.name, "")))
    return flags


def _normalize(name: str) -> str:
    return name.removeprefix("--").replace("-", "_")


def config_from_args(
    cls: type, args: list[str] | Mapping[str, Any] | None = None, base: Any = None
) -> Any:
    """Build an instance of dataclass `cls` from command-line style arguments.

    `args` is a list (`["--d-sae", "4096", "--lr=3e-4", "--no-normalize"]`) or a mapping
    of field name to value (`{"d_sae": "4096"}`; strings are parsed, other values are
    type-checked; nested dicts fill nested configs, so `config_to_dict` output reads back). Dashes and underscores are interchangeable; nested dataclass fields
    are named with dots (`--sae.k 32`). Fields not given keep their default, or their
    value in `base` (an instance of `cls`) when one is passed. The class's own
    `__post_init__` validation runs as usual.

    Raises InterplabError for an unknown flag (suggesting the closest names), a value
    that does not parse as the field's type, or a required field left unset.
    """
    _require_dataclass(cls)
    if base is not None and not isinstance(base, cls):
        raise InterplabError(
            f"base config must be a {cls.__qualname__}, got {type(base).__qualname__}"
        )
    flags = {f.key: f for f in _flags(cls, base=base)}
    if args is None:
        pairs: list[tuple[str, Any]] = []
    elif isinstance(args, Mapping):
        pairs = _flatten_mapping(args, flags)
    elif isinstance(args, list | tuple):
        pairs = _split_args(list(args), flags)
    else:
        raise InterplabError(
            f"expected a list of arguments or a dict, got {type(args).__qualname__}"
        )
    values: dict[str, Any] = {}
    for name, raw in pairs:
        flag, negated = _lookup(name, flags)
        if negated:
            if raw is not True:
                raise InterplabError(f"flag --no-{flag.display} takes no value, got {raw!r}")
            values[flag.key] = False
        elif raw is True and not flag.is_bool and not isinstance(args, Mapping):
            raise InterplabError(f"flag --{flag.display} needs a value ({_type_name(flag.type)})")
        else:
            values[flag.key] = _coerce(raw, flag.type, flag)
    return _build(cls, values, base, ())


def _flatten_mapping(
    args: Mapping[str, Any], flags: dict[str, _Flag], prefix: str = ""
) -> list[tuple[str, Any]]:
    """(dotted name, value) pairs; a dict given for a nested dataclass field is opened up,
    so a saved config.json reads back in."""
    pairs = []
    for name, value in args.items():
        key = prefix + _normalize(str(name))
        if isinstance(value, Mapping) and any(k.startswith(key + ".") for k in flags):
            pairs.extend(_flatten_mapping(value, flags, key + "."))
        else:
            pairs.append((key, value))
    return pairs


def _split_args(args: list[str], flags: dict[str, _Flag]) -> list[tuple[str, Any]]:
    """`--name value` / `--name=value` / bare `--flag` tokens as (name, value) pairs.

    A bare flag has value True. A bool flag consumes the next token only when it reads
    as a bool ("--normalize false"), so `--normalize --lr 1` works.
    """
    pairs = []
    i = 0
    while i < len(args):
        token = str(args[i])
        if not token.startswith("--") or token == "--":
            raise InterplabError(
                f"unexpected argument {token!r}: expected --name value or --name=value"
            )
        if "=" in token:
            name, value = token.split("=", 1)
            pairs.append((name, value))
            i += 1
            continue
        flag = flags.get(_normalize(token))
        nxt = str(args[i + 1]) if i + 1 < len(args) else None
        if flag is not None and flag.is_bool:
            # a bool flag takes the next token only when it reads as a bool (or none)
            words = _TRUE | _FALSE | (_NONE if _strip_none(flag.type) is not flag.type else set())
            takes_value = nxt is not None and nxt.lower() in words
        else:  # unknown names also take their value, so the error is "unknown flag"
            takes_value = True
        if takes_value and nxt is not None and not nxt.startswith("--"):
            pairs.append((token, nxt))
            i += 2
        else:
            pairs.append((token, True))
            i += 1
    return pairs


def _lookup(name: str, flags: dict[str, _Flag]) -> tuple[_Flag, bool]:
    """The flag called `name` and whether it was given in its `--no-` form."""
    key = _normalize(name)
    if key in flags:
        return flags[key], False
    head, _, last = key.rpartition(".")
    if last.startswith("no_"):
        positive = f"{head}.{last[3:]}" if head else last[3:]
        if positive in flags and flags[positive].is_bool:
            return flags[positive], True
    names = [f"--{f.display}" for f in flags.values()]
    raise unknown("flag", "--" + key.replace("_", "-"), names)


def _build(cls: type, values: dict[str, Any], base: Any, prefix: tuple[str, ...]) -> Any:
    hints = _type_hints(cls)
    kwargs: dict[str, Any] = {}
    missing: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = (*prefix, f.name)
        key = ".".join(path)
        tp = hints.get(f.name, f.type)
        current = getattr(base, f.name) if base is not None else _MISSING
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            touched = any(k.startswith(key + ".") for k in values)
            if current is _MISSING:
                current = _field_default(f)
            if touched or current is _MISSING:
                nested_base = current if isinstance(current, tp) else None
                try:
                    kwargs[f.name] = _build(tp, values, nested_base, path)
                except _Missing as e:
                    missing.extend(e.names)
            else:
                kwargs[f.name] = current
        elif key in values:
            kwargs[f.name] = values[key]
        elif current is not _MISSING:
            kwargs[f.name] = current
        elif f.default is _MISSING and f.default_factory is _MISSING:
            missing.append(f"--{'.'.join(p.replace('_', '-') for p in path)} ({_type_name(tp)})")
    if missing:
        if prefix:
            raise _Missing(missing)
        raise InterplabError(
            f"missing required flag(s) for {cls.__qualname__}: {', '.join(missing)}"
        )
    return cls(**kwargs)


class _Missing(Exception):
    def __init__(self, names: list[str]):
        super().__init__(names)
        self.names = names


# ----------------------------------------------------------------------------- coercion


def _strip_none(tp: Any) -> Any:
    """`X` for `X | None`; `tp` otherwise."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


class _BadValue(Exception):
    """Internal: `value` does not fit the type; the caller turns it into an InterplabError."""


def _coerce(value: Any, tp: Any, flag: _Flag) -> Any:
    try:
        return _convert(value, tp)
    except _Unsupported as e:
        raise InterplabError(
            f"--{flag.display} has type {e.args[0]}, which cannot be set from the command line"
        ) from None
    except _BadValue:
        origin = typing.get_origin(_strip_none(tp))
        if origin is Literal:
            expected = "one of: " + ", ".join(
                _format_value(c) for c in typing.get_args(_strip_none(tp))
            )
            if _strip_none(tp) is not tp:
                expected += ", none"
        else:
            expected = _type_name(tp)
        raise InterplabError(
            f"invalid value {value!r} for --{flag.display}: expected {expected}"
        ) from None


class _Unsupported(Exception):
    pass


def _convert(value: Any, tp: Any) -> Any:
    """`value` (a CLI string, or an already-typed Python value) converted to type `tp`."""
    if tp is Any or tp is dataclasses.MISSING:
        return value
    if isinstance(tp, str):  # annotation we could not resolve
        raise _Unsupported(f"{tp!r} (unresolved annotation)")
    if _is_union(tp):
        options = typing.get_args(tp)
        if type(None) in options and (value is None or _is_none_text(value)):
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option)
            except _BadValue:
                continue
        raise _BadValue
    if tp is type(None):
        if value is None or _is_none_text(value):
            return None
        raise _BadValue
    origin = typing.get_origin(tp)
    if origin is Literal:
        for choice in typing.get_args(tp):
            if value == choice and type(value) is type(choice):
                return choice
            if isinstance(value, str) and value == _format_value(choice):
                return choice
        raise _BadValue
    if origin in (list, tuple) or tp in (list, tuple):
        return _convert_sequence(value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise _BadValue
    if tp is int:
        return _convert_int(value)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _BadValue from None
        raise _BadValue
    if tp is str:
        if isinstance(value, str):
            return value
        raise _BadValue
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, str | PurePath) and str(value):
            return tp(value)
        raise _BadValue
    raise _Unsupported(_type_name(tp))


def _convert_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:  # "2e6" is a convenient way to write token counts
            number = float(value)
        except ValueError:
            raise _BadValue from None
        if math.isfinite(number) and number.is_integer():
            return int(number)
    raise _BadValue


def _convert_sequence(value: Any, tp: Any) -> list | tuple:
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[(" and text[-1:] in "])":
            text = text[1:-1]
        items: list[Any] = [s.strip() for s in text.split(",")] if text.strip() else []
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise _BadValue
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(items) != len(args):
            raise _BadValue
        return tuple(_convert(v, t) for v, t in zip(items, args, strict=True))
    element = args[0] if args else str
    converted = [_convert(v, element) for v in items]
    return tuple(converted) if origin is tuple else converted


def _is_none_text(value: Any) -> bool:
    return isinstance(value, str) and value.lower() in _NONE


def _type_name(tp: Any) -> str:
    """How a type reads in help and errors: int, float, path, {a,b}, int|none, int,int,..."""
    if _is_union(tp):
        return "|".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(_format_value(c) for c in typing.get_args(tp)) + "}"
    if origin in (list, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return ",".join(_type_name(a) for a in args)
        element = _type_name(args[0]) if args else "str"
        return f"{element},{element},..."
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return "path"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _format_value(value: Any) -> str:
    """A value written the way it would be typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(_format_value(v) for v in value)
    return str(value)


# ----------------------------------------------------------------------------- help


def config_help(cls: type, width: int = 88) -> str:
    """A readable list of the flags of dataclass `cls`: name, type, default and docstring.

    Used for `interplab run NAME --help`. Bool flags read `--[no-]name`; required flags
    say so.
    """
    flags = _flags(cls)
    heads = []
    for flag in flags:
        if flag.is_bool:
            nullable = " (or =none)" if _strip_none(flag.type) is not flag.type else ""
            heads.append(f"  --[no-]{flag.display}{nullable}")
        else:
            heads.append(f"  --{flag.display} {_type_name(flag.type)}")
    column = min(max((len(h) for h in heads), default=0) + 2, 44)
    lines = []
    for head, flag in zip(heads, flags, strict=True):
        if flag.default is _MISSING:
            default = "required"
        elif dataclasses.is_dataclass(flag.default) or callable(flag.default):
            default = "default: (set in code)"
        else:
            default = f"default: {_format_value(flag.default)}"
        if len(head) < column:
            lines.append(head.ljust(column) + default)
        else:
            lines.extend([head, " " * column + default])
        if flag.doc:
            doc = " ".join(flag.doc.split())
            lines.extend(
                textwrap.wrap(doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
            )
    return "\n".join(lines)
