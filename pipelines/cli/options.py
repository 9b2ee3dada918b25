"""Command-line options made from a component's config dataclass, so a setting's default is defined only there.

    @config_options(PretrainConfig)
    @config_options(TokenizerConfig, rename={"seed": "tokenizer-seed", "condition_columns": "condition"})
    def pretrain_command(**kwargs): ...
        pretrain = build_config(PretrainConfig, kwargs)

Each field becomes `--field-name` (`--flag/--no-flag` for a bool, a choice for a `Literal`, repeatable for a
`tuple[str, ...]`, `nargs=N` for a fixed tuple); a nested config dataclass becomes options with its field name as
prefix (`--vllm-block-size`). Help and default come from the field. `build_config` builds the dataclass back from
the parsed keywords and turns a validation error into a usage error naming the option.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Literal

import click
from pydantic import ValidationError
from pydantic_core import PydanticUndefined


def _fields(cls: type) -> dict[str, Any]:
    return cls.__pydantic_fields__  # pydantic's FieldInfo per field: annotation, default, description


def _default(info: Any) -> Any:
    if info.default_factory is not None:
        return info.default_factory()
    return None if info.default is PydanticUndefined else info.default


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else kind), True
    return kind, False


def _is_config(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind) and hasattr(kind, "__pydantic_fields__")


def _option_names(cls: type, prefix: str, rename: dict[str, str], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str, str, Any]]:
    """(field path, python keyword, option name, FieldInfo) of every leaf field, nested configs flattened."""
    out = []
    for name, info in _fields(cls).items():
        option = rename.get(name, prefix + name.replace("_", "-"))
        if _is_config(info.annotation):
            out += _option_names(info.annotation, option + "-", {}, (*path, name))
        else:
            out.append(((*path, name), option.replace("-", "_"), option, info))
    return out


def config_options(cls: type, *, prefix: str = "", rename: dict[str, str] | None = None, exclude: tuple[str, ...] = ()) -> Callable:
    """A decorator adding one click option per field of the config dataclass `cls` (see the module docstring)."""
    rename = rename or {}
    decorators = []
    for _, keyword, option, info in _option_names(cls, prefix, rename):
        if keyword in exclude or option in exclude:
            continue
        kind, optional = _unwrap_optional(info.annotation)
        default = _default(info)
        help_text = info.description or ""
        attrs: dict[str, Any] = {"default": default, "show_default": True, "help": help_text}
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if kind is bool:
            decorators.append(click.option(f"--{option}/--no-{option}", keyword, **attrs))
            continue
        if origin is Literal:
            attrs["type"] = click.Choice([str(a) for a in args])
        elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            attrs.update(type=args[0], multiple=True)
        elif origin is tuple:
            attrs.update(type=args[0], nargs=len(args))
        elif kind in (int, float, str):
            attrs["type"] = kind
        else:
            raise TypeError(f"{cls.__name__}.{keyword}: no command-line form for {kind!r}")
        if optional and default is None:
            attrs["show_default"] = False
        decorators.append(click.option(f"--{option}", keyword, **attrs))

    def apply(fn: Callable) -> Callable:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


def config_values(cls: type, kwargs: dict[str, Any], *, prefix: str = "", rename: dict[str, str] | None = None) -> dict[str, Any]:
    """The nested mapping of `cls`'s fields from parsed keywords (the options `config_options` made); pops them."""
    values: dict[str, Any] = {}
    for path, keyword, _, info in _option_names(cls, prefix, rename or {}):
        if keyword not in kwargs:
            continue
        value = kwargs.pop(keyword)
        # click gives () for an unused nargs option without a default; a fixed tuple that is optional means None
        if typing.get_origin(_unwrap_optional(info.annotation)[0]) is tuple and value == () and _default(info) is None:
            value = None
        node = values
        for section in path[:-1]:
            node = node.setdefault(section, {})
        node[path[-1]] = value
    return values


def build_config(cls: type, kwargs: dict[str, Any], *, prefix: str = "", rename: dict[str, str] | None = None, **fixed: Any) -> Any:
    """`cls` from parsed keywords (popping them) plus `fixed` field values; a bad value is a click usage error that
    names the option."""
    options = {path: option for path, _, option, _ in _option_names(cls, prefix, rename or {})}
    values = {**config_values(cls, kwargs, prefix=prefix, rename=rename), **fixed}
    try:
        return cls(**values)
    except ValidationError as exc:
        def shown(e: dict[str, Any]) -> str:
            # an error of the whole config (its __post_init__) has no field and its input is every value: not shown
            whole = not e["loc"]
            got = "" if whole or isinstance(e.get("input"), (dict, list, tuple)) else f" (got {e.get('input')!r})"
            msg = e["msg"].removeprefix("Value error, ")
            return f"--{options[tuple(e['loc'])]}: {msg}{got}" if tuple(e["loc"]) in options else msg + got

        problems = "; ".join(shown(e) for e in exc.errors())
        raise click.UsageError(problems) from exc
