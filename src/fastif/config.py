"""Typed stage configs: every stage has a frozen dataclass; this module turns them into JSON and back.

Unknown keys and wrong types are refused with a :class:`~fastif.errors.ConfigError` that names the key,
so a typo in a config file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .files import atomic_write_json

C = TypeVar("C")

DEFAULT_DAMPING = 0.0
"""The library's one default damping of ``H + damping·I`` (absolute): none. Models whose Hessian is not positive
definite need more; each recipe sets its own (``Recipe.damping``) and says why."""


SHOWN_CHARS = 200
"""How much of a user's value an error message echoes: a 30,000-character label is cut to this."""


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, saying how long it was, for echoing in error messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_number(
    key: str,
    value: Any,
    *,
    integer: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    optional: bool = False,
) -> None:
    """Refuse a numeric option that is of the wrong type, not finite, or out of range, naming its config ``key``.

    ``minimum``/``maximum`` are inclusive, ``above``/``below`` exclusive bounds; ``optional`` lets ``None`` (unset)
    pass. Every typed config checks its numbers through here, so each refusal reads the same.
    """
    if value is None and optional:
        return
    positive = integer and minimum == 1 and maximum is None and below is None
    kind = "a positive integer" if positive else "an integer" if integer else "a finite number"
    bounds = [
        f">= {minimum}" if minimum is not None and not positive else "",
        f"> {above}" if above is not None else "",
    ]
    bounds += [f"<= {maximum}" if maximum is not None else "", f"< {below}" if below is not None else ""]
    requirement = " and ".join(bound for bound in bounds if bound)
    wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else int | float)
    ok = not wrong_type and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    ok = ok and (above is None or value > above) and (below is None or value < below)
    if not ok:
        wanted = " ".join(part for part in (kind, requirement, "(or unset)" if optional else "") if part)
        raise ConfigError(f"{key} must be {wanted}, got {shown(value)}", key)


def _number_kinds(annotation: Any) -> tuple[set[type], bool]:
    """The number types (``int``, ``float``) a field's annotation admits, through unions, and whether it admits None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        kinds = set().union(*(_number_kinds(option)[0] for option in options))
        return kinds, type(None) in options
    return {annotation} & {int, float}, False


def check_numeric_fields(config: Any, prefix: str = "") -> None:
    """Refuse a wrongly typed or non-finite value in any ``int`` / ``float`` field of the dataclass ``config``,
    naming ``prefix + field``; each config still checks its own ranges."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        kinds, optional = _number_kinds(hints[field.name])
        if kinds:
            value = getattr(config, field.name)
            check_number(prefix + field.name, value, integer=float not in kinds, optional=optional)


def check_choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Refuse a value that is not one of ``allowed``, naming its config ``key`` (as :func:`check_number` does)."""
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {shown(value)}", key)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Return a JSON-ready dict of a config dataclass, tagged with its class name."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a config dataclass instance, got {type(config).__name__}")
    data = {"type": type(config).__name__}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        data[field.name] = value
    return data


def _describe(annotation: Any) -> str:
    """What a field's annotation asks for, in words ("an integer or unset")."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_describe(option) for option in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(option) for option in typing.get_args(annotation))
    if origin is tuple:
        return "a list"
    if dataclasses.is_dataclass(annotation):
        return "a table of options"
    names = {type(None): "unset", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _check_type(key: str, annotation: Any, value: Any) -> Any:
    """Coerce ``value`` to the field's annotated type where that is lossless, else raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        for option in typing.get_args(annotation):
            try:
                return _check_type(key, option, value)
            except ConfigError as error:
                if error.key and error.key.startswith(f"{key}."):  # a nested table's own error: keep it
                    raise
        raise _wrong_type(key, annotation, value)
    if annotation is type(None):
        if value is None:
            return None
    elif origin is typing.Literal:
        if value in typing.get_args(annotation):
            return value
    elif origin is tuple:
        if isinstance(value, list | tuple):
            (item_type, *_rest) = typing.get_args(annotation) or (Any,)
            return tuple(_check_type(key, item_type, item) for item in value)
    elif annotation is Any:
        return value
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        return config_from_dict(annotation, value, f"{key}.")
    elif isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise _wrong_type(key, annotation, value)


def _wrong_type(key: str, annotation: Any, value: Any) -> ConfigError:
    """ "solver.depth must be an integer or unset, got str 'ten'": the key, what it takes, and what it got."""
    return ConfigError(f"{key} must be {_describe(annotation)}, got {type(value).__name__} {shown(value)}", key)


def config_from_dict(cls: type[C], data: dict[str, Any], prefix: str | None = None) -> C:
    """Build config ``cls`` from a dict, refusing unknown keys and values of the wrong type.

    Errors name each key as ``prefix`` + field (default prefix: ``ClassName.``; the pipeline passes where the
    table sits, e.g. ``solver.``), so the CLI can name the key's flag too.
    """
    prefix = f"{cls.__name__}." if prefix is None else prefix
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a table of options, got {type(data).__name__}")
    data = dict(data)
    tag = data.pop("type", cls.__name__)
    if tag != cls.__name__:
        raise ConfigError(f"config is for {tag}, not {cls.__name__}")
    hints = typing.get_type_hints(cls)
    fields = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; valid options are {sorted(fields)}")
    kwargs = {key: _check_type(f"{prefix}{key}", hints[key], value) for key, value in data.items()}
    return cls(**kwargs)


def save_config(config: Any, path: str | Path) -> Path:
    """Write a config as JSON beside the artifact it produced (atomically)."""
    return atomic_write_json(path, config_to_dict(config))
