"""How every component declares its settings: a frozen dataclass, validated by pydantic when it is built.

Each setting is defined once, in its component's config dataclass, with its default, its allowed values (a
`Literal`, or bounds such as `Field(10, ge=1)`) and a one-line `description`. Everything else reads it from there:
the run config is composed of these dataclasses (`pipelines/run/config.py`), and the command line builds its
options from their fields (`pipelines/cli/options.py`), so no default is written twice.

    @config_class
    class PretrainConfig:
        epochs: int = Field(10, ge=1, description="Passes over the pretraining window.")

A wrong type, an unknown key or an out-of-range value is a `pydantic.ValidationError` (a `ValueError`) that
names the field.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import ConfigDict, Field, TypeAdapter
from pydantic.dataclasses import dataclass as _pydantic_dataclass

__all__ = ["Field", "STRICT", "config_class", "from_saved"]

T = TypeVar("T")

# unknown keys are errors (a typo must not silently fall back to a default)
STRICT = ConfigDict(extra="forbid")


def config_class(cls: type[T] | None = None, *, frozen: bool = True) -> Any:
    """A settings dataclass: frozen (configs are values), validated on construction and on `dataclasses.replace`."""

    def wrap(klass: type[T]) -> type[T]:
        return _pydantic_dataclass(klass, frozen=frozen, config=STRICT)  # type: ignore[return-value]

    return wrap(cls) if cls is not None else wrap


def from_saved(cls: type[T], data: dict[str, Any]) -> T:
    """A settings dataclass from its saved `asdict()` form (a model folder's JSON), validated like a new one.

    Keys the class no longer has are left out, so a folder written before a setting was removed still loads; a
    missing key takes today's default.
    """
    return TypeAdapter(cls).validate_python(_known_keys(cls, data))


def _known_keys(cls: Any, data: Any) -> Any:
    """`data` without the keys the settings dataclass `cls` does not have, nested sections included."""
    known = getattr(cls, "__pydantic_fields__", None)
    if known is None or not isinstance(data, dict):
        return data
    return {name: _known_keys(known[name].annotation, value) for name, value in data.items() if name in known}
