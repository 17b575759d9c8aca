"""Typed settings: one frozen dataclass per component, documented per field.

A component's settings (the run config's :class:`~afl_flwr.config.AppConfig`,
each aggregation rule's ``Settings``) are frozen dataclasses whose fields carry
their own one-line documentation (:func:`setting`), so the reference tables in
``docs/`` are generated from the code. Values from a TOML run config or the
command line are converted by :func:`coerce`, which refuses lossy conversions.
A bad value raises :class:`SettingError`, which knows the field, so each entry
point can name the key as its user wrote it (``fadas_tau_c`` as a keyword,
``fadas-tau-c`` in a run config).
"""

import types
import typing
from dataclasses import Field, field
from typing import Any


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


class SettingError(ValueError):
    """A setting's value is invalid; ``field`` names the setting.

    Parameters
    ----------
    field : str
        The dataclass field (snake_case).
    value : Any
        The value given.
    requirement : str
        What is allowed, e.g. ``"must be in [0, 1)"``.
    """

    def __init__(self, field: str, value: Any, requirement: str) -> None:
        self.field = field
        self.value = value
        self.requirement = requirement
        super().__init__(self.message(field))

    def message(self, key: str) -> str:
        """The error, naming the setting as ``key``."""
        return f"{key}={self.value!r} {self.requirement}"


def setting(default: Any, doc: str) -> Any:
    """A dataclass field with a default and its one-line documentation."""
    return field(default=default, metadata={"doc": doc})


def doc_of(item: Field) -> str:
    """The documentation of a field declared with :func:`setting`."""
    return str(item.metadata.get("doc", ""))


def kebab(name: str) -> str:
    """``fadas_tau_c`` -> ``fadas-tau-c`` (run-config key of a field)."""
    return name.replace("_", "-")


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a TOML/CLI value to a field's type, refusing lossy conversions.

    ``bool``, ``int``, ``float``, ``str`` and ``X | None`` (where the run config
    cannot say ``None``, callers map a sentinel first) are understood.

    Raises
    ------
    ConfigError
        Naming ``key`` and the expected type.
    """
    annotation = _resolve(annotation)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if annotation is float and isinstance(value, int | float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r} must be an integer")
        if float(value) != int(value):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return int(value)
    if annotation is str and isinstance(value, str):
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {name}")


def _resolve(annotation: Any) -> Any:
    """The concrete type of an annotation (``"float"``, ``float | None`` -> float)."""
    if isinstance(annotation, str):
        annotation = {"bool": bool, "int": int, "float": float, "str": str}.get(
            annotation.split("|")[0].strip(), annotation
        )
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (
        typing.Union,
    ):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation
