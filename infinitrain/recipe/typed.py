"""Plain YAML values ⇄ typed dataclasses; errors name the dotted field path.

One generic converter instead of hand-written parsing per section: every recipe section (and the
data pipeline's own config dataclasses) is validated by its type hints. A class may take over its
own conversion with ``from_plain(value, path)`` / ``to_plain()``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Union

from ..model.config import ConfigError, without_retired

NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
"""A float spelled as text: PyYAML reads ``1e-4`` (no dot) as a string."""


class RecipeError(ValueError):
    """An invalid recipe value; the message is one line naming the field, the value and the fix."""


def field_error(path: str, value: Any, allowed: str) -> RecipeError:
    return RecipeError(f"{path} = {value!r}: {allowed}")


class UnknownFieldError(RecipeError):
    """A key written where its section has no such field. The message suggests the field it
    most likely means: one of the section's own of a similar spelling, or, through
    :meth:`suggesting`, a field of that name in another section (``train.lr`` for ``optim.lr``)."""

    def __init__(self, where: str, known: Sequence[str], suggestions: Sequence[str] = ()) -> None:
        self.where, self.known = where, list(known)
        section, _, key = where.rpartition(".")
        if not suggestions:
            suggestions = [f"{section}.{name}" if section else name
                           for name in difflib.get_close_matches(key, self.known, n=2)]
        hint = f" (did you mean {' or '.join(suggestions)}?)" if suggestions else ""
        super().__init__(f"{where}: unknown field{hint}; allowed: {', '.join(self.known)}")

    def suggesting(self, schema_paths: Iterable[str]) -> UnknownFieldError:
        """This error, suggesting the fields of ``schema_paths`` (every dotted path of the whole
        schema) that have this key's name, where there are any."""
        key = self.where.rpartition(".")[2]
        elsewhere = [path for path in schema_paths if path.rpartition(".")[2] == key]
        return UnknownFieldError(self.where, self.known, elsewhere) if elsewhere else self


def schema_paths(cls: type, prefix: str = "") -> list[str]:
    """The dotted path of every field of dataclass ``cls`` and of the dataclasses it nests (a
    list's items as ``<i>``). A class that converts itself names its YAML fields with
    ``plain_fields()``."""
    if hasattr(cls, "plain_fields"):
        return [prefix + name for name in cls.plain_fields()]
    paths = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        path = prefix + field.name
        types_in_hint = _flattened(hints[field.name])
        nested = [tp for tp in types_in_hint if dataclasses.is_dataclass(tp)]
        if not nested:
            paths.append(path)
        item = ".<i>" if any(typing.get_origin(tp) is list for tp in types_in_hint) else ""
        for inner in nested:
            paths += schema_paths(inner, f"{path}{item}.")
    return paths


def _flattened(tp: Any) -> list[Any]:
    """``tp`` and its type arguments, recursively (``list[A] | None`` -> list[A], A, None)."""
    return [tp, *(inner for arg in typing.get_args(tp) for inner in _flattened(arg))]


def from_plain(tp: Any, value: Any, path: str) -> Any:
    """``value`` (as parsed from YAML) converted to type ``tp``; RecipeError names ``path``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        concrete = [option for option in options if option is not type(None)]
        if len(concrete) == 1:
            return from_plain(concrete[0], value, path)
        for option in concrete:
            try:
                return from_plain(option, value, path)
            except RecipeError:
                continue
        raise field_error(path, value, f"expected {describe(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise field_error(path, value, f"must be one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise field_error(path, value, f"expected {describe(tp)}")
        (item,) = typing.get_args(tp)
        return [from_plain(item, v, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise field_error(path, value, f"expected {describe(tp)}")
        _, item = typing.get_args(tp)
        return {str(k): from_plain(item, v, f"{path}.{k}") for k, v in value.items()}
    if hasattr(tp, "from_plain"):
        return tp.from_plain(value, path)
    if dataclasses.is_dataclass(tp):
        return dataclass_from_plain(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise field_error(path, value, "expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise field_error(path, value, "expected an integer")
        return value
    if tp is float:
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise field_error(path, value, "expected a number")
        if not math.isfinite(value):  # .inf and .nan mean no usable setting anywhere
            raise field_error(path, value, "expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise field_error(path, value, "expected a string")
        return value
    raise TypeError(f"{path}: no conversion for type {tp!r}")  # a schema bug, not a user error


def dataclass_from_plain(cls: type, value: Any, path: str) -> Any:
    """An instance of dataclass ``cls`` from a mapping; unknown keys and missing fields fail."""
    if not isinstance(value, dict):
        raise field_error(path, value,
                          f"expected a mapping with fields {', '.join(field_names(cls))}")
    try:
        value = without_retired(value, getattr(cls, "RETIRED_FIELDS", {}), path)
    except ConfigError as error:
        raise RecipeError(str(error)) from None
    hints = typing.get_type_hints(cls)
    known = field_names(cls)
    for key in value:
        if key not in known:
            raise UnknownFieldError(f"{path}.{key}" if path else str(key), known)
    kwargs = {}
    for field in dataclasses.fields(cls):
        where = f"{path}.{field.name}" if path else field.name
        if field.name in value:
            kwargs[field.name] = from_plain(hints[field.name], value[field.name], where)
        elif (field.default is dataclasses.MISSING
              and field.default_factory is dataclasses.MISSING):
            raise RecipeError(f"{where}: missing; expected {describe(hints[field.name])}")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except ValueError as error:  # a dataclass's own __post_init__ check
        message = str(error)
        raise RecipeError(message if message.startswith(path) else f"{path}: {message}") from None


def field_names(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls)]


def to_plain(value: Any) -> Any:
    """The YAML-ready form of a typed value (inverse of :func:`from_plain`)."""
    if hasattr(value, "to_plain"):
        return value.to_plain()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: to_plain(getattr(value, field.name))
                for field in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def describe(tp: Any) -> str:
    """A type as a user reads it in an error message."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if t is type(None) else describe(t) for t in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin is list:
        return f"a list of {describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with fields {', '.join(field_names(tp))}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))
