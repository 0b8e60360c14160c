"""Typed run configuration: dataclass schemas filled from layered YAML and `--set` overrides.

The dataclass field defaults are the only defaults. Layers (a family's recipe YAML, a user's
`--config`, command-line flags, `--set dotted.key=value`) are merged in order, later wins, and
the merged tree is checked against the schema: unknown keys, wrong types and unresolved
`${paths.NAME}` references are reported with the key, the value and where it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from fmb.errors import ConfigError

T = TypeVar("T")

_PATH_REF = re.compile(r"\$\{paths\.([A-Za-z0-9_]+)\}")


class RawValue(str):
    """A command-line value not yet parsed: it is parsed according to the target field's type."""


@dataclasses.dataclass
class ConfigLayers:
    """Merged configuration tree plus the source of every leaf, for error messages."""

    tree: dict[str, Any] = dataclasses.field(default_factory=dict)
    origins: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, data: dict[str, Any] | None, source: str) -> None:
        if data is None:
            return
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys, not {type(data).__name__}")
        _merge(self.tree, data, source, self.origins, prefix="")

    def add_file(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        self.add(read_yaml(path), str(path))

    def set(self, dotted: str, value: Any, source: str) -> None:
        """Set one dotted key (`train.optim.lr`) to a value (a RawValue for command-line text)."""
        keys = dotted.split(".")
        if not all(keys):
            raise ConfigError(f"{source}: '{dotted}' is not a dotted key like train.optim.lr")
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        self.add(nested, source)


def read_yaml(path: Path) -> Any:
    try:
        with open(path) as handle:
            return yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def parse_set_option(option: str) -> tuple[str, RawValue]:
    """Split a `--set key=value` option."""
    if "=" not in option:
        raise ConfigError(f"--set '{option}': expected dotted.key=value, e.g. --set train.optim.lr=1e-4")
    key, value = option.split("=", 1)
    return key.strip(), RawValue(value.strip())


def _merge(dst: dict, src: dict, source: str, origins: dict[str, str], prefix: str) -> None:
    for key, value in src.items():
        key = str(key)
        dotted = f"{prefix}{key}"
        if value is None and isinstance(dst.get(key), dict):
            continue  # an empty `section:` (all keys commented out) changes nothing
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, source, origins, dotted + ".")
        else:
            dst[key] = _copy_tree(value)
            for leaf in _leaves(value, dotted):
                origins[leaf] = source
            origins.setdefault(dotted, source)


def _copy_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _copy_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_tree(v) for v in value]
    return value


def _leaves(value: Any, dotted: str) -> list[str]:
    if isinstance(value, dict):
        out = [dotted]
        for key, sub in value.items():
            out += _leaves(sub, f"{dotted}.{key}")
        return out
    return [dotted]


# ----------------------------------------------------------------------------- schema checking


def build(cls: type[T], layers: ConfigLayers, paths: dict[str, Any] | None = None,
          paths_file: str | None = None, path_hint: str = "") -> T:
    """Check the merged tree against the dataclass `cls` and return a filled instance.

    `paths` maps names for `${paths.NAME}` references; a reference to a missing or empty name is
    an error naming the key to set in `paths_file` (followed by `path_hint`).
    """
    context = _Context(layers.origins, paths or {}, paths_file, path_hint)
    return _build_dataclass(cls, layers.tree, "", context)


@dataclasses.dataclass
class _Context:
    origins: dict[str, str]
    paths: dict[str, Any]
    paths_file: str | None
    path_hint: str = ""

    def where(self, dotted: str) -> str:
        source = self.origins.get(dotted)
        return f" (from {source})" if source else ""


def _build_dataclass(cls: type[T], data: Any, prefix: str, ctx: _Context) -> T:
    name = prefix.rstrip(".") or "the configuration"
    if isinstance(data, RawValue):
        raise ConfigError(f"{name} is a section; set one of its keys instead{ctx.where(prefix.rstrip('.'))}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must be a mapping, got {data!r}{ctx.where(prefix.rstrip('.'))}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{dotted}'{ctx.where(dotted)}{hint} Valid keys here: {valid}.")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", ctx)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, dotted: str, ctx: _Context) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, dotted + ".", ctx)

    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, RawValue) and value.lower() in ("null", "none", "~")):
            if len(non_none) < len(args):
                return None
        if len(non_none) == 1:  # Optional[X]: X's own error is the informative one
            return _coerce(value, non_none[0], dotted, ctx)
        for option in non_none:
            try:
                return _coerce(value, option, dotted, ctx)
            except ConfigError:
                continue
        raise _type_error(dotted, value, tp, ctx)

    if tp is Any:
        return _parse_raw(value) if isinstance(value, RawValue) else value

    if origin is Literal:
        parsed = str(value) if isinstance(value, RawValue) else value
        if parsed not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"config key '{dotted}' = {value!r}{ctx.where(dotted)}: expected one of {choices}")
        return parsed

    if origin in (list, tuple):
        items = _parse_raw(value) if isinstance(value, RawValue) else value
        if isinstance(items, tuple):
            items = list(items)
        if not isinstance(items, list):
            raise _type_error(dotted, value, tp, ctx)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{dotted}[{i}]", ctx) for i, v in enumerate(items))
            if args and len(items) != len(args):
                raise ConfigError(f"config key '{dotted}' = {value!r}{ctx.where(dotted)}: expected {len(args)} values")
            return tuple(_coerce(v, a, f"{dotted}[{i}]", ctx) for i, (v, a) in enumerate(zip(items, args, strict=False)))
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{dotted}[{i}]", ctx) for i, v in enumerate(items)]

    if origin is dict:
        mapping = _parse_raw(value) if isinstance(value, RawValue) else value
        if not isinstance(mapping, dict):
            raise _type_error(dotted, value, tp, ctx)
        value_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_tp, f"{dotted}.{k}", ctx) for k, v in mapping.items()}

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        raise _type_error(dotted, value, tp, ctx)

    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(dotted, value, tp, ctx)

    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(dotted, value, tp, ctx)

    if tp is str:
        if isinstance(value, str):
            return _resolve_paths(str(value), dotted, ctx)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _type_error(dotted, value, tp, ctx)

    raise ConfigError(f"config key '{dotted}': unsupported schema type {_type_name(tp)}")


def _parse_raw(value: RawValue) -> Any:
    try:
        return yaml.safe_load(str(value))
    except yaml.YAMLError:
        return str(value)


def _type_error(dotted: str, value: Any, tp: Any, ctx: _Context) -> ConfigError:
    return ConfigError(
        f"config key '{dotted}' = {str(value) if isinstance(value, RawValue) else repr(value)}"
        f"{ctx.where(dotted)}: expected {_type_name(tp)}"
    )


def _resolve_paths(text: str, dotted: str, ctx: _Context) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1)
        value = ctx.paths.get(name)
        if value in (None, ""):
            where = ctx.paths_file or "paths_local.yaml"
            state = "is empty" if name in ctx.paths else "is not defined"
            raise ConfigError(
                f"config key '{dotted}' refers to ${{paths.{name}}}, which {state} in {where}. "
                f"Set '{name}: /path/on/this/machine' there (or pass --paths FILE).{ctx.path_hint}"
            )
        return str(value)

    return _PATH_REF.sub(replace, text)


# ----------------------------------------------------------------------------- output


def to_dict(obj: Any) -> Any:
    """A plain tree (dicts, lists, scalars) of a config dataclass, suitable for YAML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None, width=100)
