"""YAML configs: ``defaults:`` inheritance, dotted ``key=value`` overrides, typed validation.

A config file is a YAML mapping. Its optional ``defaults:`` key lists the config files it
extends (paths relative to the file itself, else to the repository's ``configs/`` folder);
they are merged in order, then the file's own keys on top, then the command-line overrides.
The merged tree is validated into the dataclass schema (``kdscale.schema.Config``):

* an unknown or misspelled key is an error naming the key, the closest valid key and the file
  that set it;
* a value of the wrong type is an error naming the key, the expected type and the file;
* a required key that nobody set is an error naming the key and the files that were read;
* a field declared with ``path_field()`` must name an existing file or folder.

Only ``yaml.safe_load`` is used: configs cannot construct Python objects.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import yaml

from kdscale.io.atomic import write_text_atomic

CONFIGS_ROOT = Path(__file__).resolve().parent.parent / "configs"
COMMAND_LINE = "<command line>"


class ConfigError(ValueError):
    """A config problem; the message names the key and the file it came from."""


def path_field(default: Any = dataclasses.MISSING, *, must_exist: bool = True, **kwargs):
    """A dataclass field holding a filesystem path; checked to exist at load when non-empty."""
    metadata = {"path": True, "must_exist": must_exist}
    if default is dataclasses.MISSING and "default_factory" not in kwargs:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


# ---------------------------------------------------------------------------------------------
# Loading and merging
# ---------------------------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    return data


def _resolve_default(name: str, including_file: Path) -> Path:
    candidates = [including_file.parent / name, CONFIGS_ROOT / name]
    for candidate in candidates:
        for suffix in ("", ".yaml", ".yml"):
            path = Path(str(candidate) + suffix)
            if path.is_file():
                return path.resolve()
    raise ConfigError(f"{including_file}: 'defaults' names {name!r}, which was found neither next to "
                      f"the file nor under {CONFIGS_ROOT}")


def _merge(base: dict, update: dict, origins: dict, source: str, prefix: str = "") -> dict:
    """Deep-merge ``update`` into ``base`` (in place); record which file set each leaf."""
    for key, value in update.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: keys must be strings, got {key!r} under '{prefix or '<root>'}'")
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, origins, source, dotted + ".")
        else:
            base[key] = copy.deepcopy(value)
            _record_origins(value, origins, source, dotted)
    return base


def _record_origins(value: Any, origins: dict, source: str, dotted: str) -> None:
    origins[dotted] = source
    if isinstance(value, dict):
        for key, sub in value.items():
            _record_origins(sub, origins, source, f"{dotted}.{key}")


def load_tree(path: str | os.PathLike, origins: dict | None = None, _stack: tuple = ()) -> dict:
    """Load a config file with its ``defaults:`` chain merged in; fills ``origins``."""
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise ConfigError(f"circular 'defaults' chain: {chain}")
    origins = {} if origins is None else origins
    data = _read_yaml(path)
    defaults = data.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{path}: 'defaults' must be a list of config file names")
    merged: dict = {}
    for name in defaults:
        _merge(merged, load_tree(_resolve_default(name, path), origins, (*_stack, path)), {}, str(path))
        # origins of the parent's keys were recorded by the recursive call
    _merge(merged, data, origins, str(path))
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b.c=value`` -> ("a.b.c", value parsed as a YAML scalar/flow value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None
    return key, value


def apply_overrides(tree: dict, overrides: Iterable[str], origins: dict) -> dict:
    """Set ``a.b.c=value`` in the tree. A numeric part indexes a list (``students.0.model.kind``),
    so a list entry declared in a file can be changed without restating the list."""
    for text in overrides:
        key, value = parse_override(text)
        node: Any = tree
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {text!r}: '{'.'.join(parts[:i])}' is a list of {len(node)}; "
                                      f"'{part}' is not an index into it")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{'.'.join(parts[:i])}' is a value, not a section")
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        _record_origins(value, origins, COMMAND_LINE, key)
    return tree


# ---------------------------------------------------------------------------------------------
# Validation into dataclasses
# ---------------------------------------------------------------------------------------------

def _origin(origins: dict, dotted: str) -> str:
    """Who set ``dotted``: the file (or ``<command line>``) of the key or its nearest parent.
    Validation names list items ``students[0].x`` while overrides record ``students.0.x``; both
    spellings are looked up the same way. A section that failed its own check also names any of
    its keys that the command line changed, since those are the likely culprits."""
    dotted = re.sub(r"\[(\d+)\]", r".\1", dotted)
    overridden = sorted(key for key, src in origins.items()
                        if src == COMMAND_LINE and key.startswith(dotted + "."))
    suffix = f"; {', '.join(overridden)} from {COMMAND_LINE}" if overridden else ""
    parts = dotted.split(".")
    while parts:
        found = origins.get(".".join(parts))
        if found:
            return found + (suffix if found != COMMAND_LINE else "")
        parts.pop()
    children = sorted({src for key, src in origins.items() if key.startswith(dotted + ".")})
    return ", ".join(children) if children else "<defaults>"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping[{_type_name(k)}, {_type_name(v)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _Validator:
    def __init__(self, origins: dict, base_dir: Path):
        self.origins = origins
        self.base_dir = base_dir

    def fail(self, dotted: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"config key '{dotted}' (from {_origin(self.origins, dotted)}): {message}")

    def build(self, cls: type, data: Any, prefix: str) -> Any:
        where = prefix.rstrip(".") or "<root>"
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail(where, f"expected a mapping (section), got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in data:
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
                hint = f" (did you mean '{prefix}{close[0]}'?)" if close else \
                    f" (valid keys: {', '.join(sorted(fields))})"
                self.fail(f"{prefix}{key}", f"unknown key{hint}")
        kwargs = {}
        for name, field in fields.items():
            dotted = f"{prefix}{name}"
            if name in data:
                value = self.convert(hints[name], data[name], dotted)
                if field.metadata.get("path"):
                    value = self.check_path(value, field, dotted)
                kwargs[name] = value
            elif field.metadata.get("path") and isinstance(field.default, str) and field.default:
                kwargs[name] = self.check_path(field.default, field, dotted)
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                files = sorted({v for v in self.origins.values()}) or ["<no file>"]
                raise ConfigError(f"required config key '{dotted}' is missing (files read: {', '.join(files)})")
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{exc} [section '{where}' from {_origin(self.origins, where)}]") from None
        except (ValueError, TypeError) as exc:
            self.fail(where, str(exc))

    def check_path(self, value: Any, field: dataclasses.Field, dotted: str) -> Any:
        if not value:
            return value
        path = Path(os.path.expandvars(os.path.expanduser(str(value))))
        if not path.is_absolute():
            path = (self.base_dir / path)
        path = Path(os.path.normpath(path))
        repo_relative = CONFIGS_ROOT.parent / str(value)
        if not path.exists() and not Path(str(value)).is_absolute() and repo_relative.exists():
            path = repo_relative  # files shipped with kdscale (configs/ehr/...) from any working dir
        if field.metadata.get("must_exist") and not path.exists():
            self.fail(dotted, f"path does not exist: {value!r} (resolved to {path})")
        return str(path)

    def convert(self, tp: Any, value: Any, dotted: str) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if tp is Any:
            return value
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            non_null = [a for a in args if a is not type(None)]
            if len(non_null) == 1:  # Optional[X]: X's own error is the useful one
                return self.convert(non_null[0], value, dotted)
            errors = []
            for arg in non_null:
                if arg is type(None):
                    continue
                try:
                    return self.convert(arg, value, dotted)
                except ConfigError as exc:
                    errors.append(str(exc))
            self.fail(dotted, f"expected {_type_name(tp)}, got {value!r}")
        if origin is Literal:
            if value not in args:
                close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(dotted, f"must be one of {_type_name(tp)}, got {value!r}{hint}")
            return value
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, dotted + ".")
        if origin in (list, tuple):
            if not isinstance(value, list):
                self.fail(dotted, f"expected a list, got {type(value).__name__} {value!r}")
            item_type = args[0] if args else Any
            items = [self.convert(item_type, v, f"{dotted}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if origin is dict:
            if not isinstance(value, dict):
                self.fail(dotted, f"expected a mapping, got {type(value).__name__} {value!r}")
            key_type, value_type = args or (Any, Any)
            return {self.convert(key_type, k, f"{dotted}.{k}"): self.convert(value_type, v, f"{dotted}.{k}")
                    for k, v in value.items()}
        if tp is bool:
            if not isinstance(value, bool):
                self.fail(dotted, f"expected true/false, got {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(dotted, f"expected an integer, got {value!r}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(dotted, f"expected a number, got {value!r}")
            return float(value)
        if tp is str:
            if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
                self.fail(dotted, f"expected a string, got {value!r}")
            return str(value)
        self.fail(dotted, f"unsupported schema type {tp!r}")


def validate(cls: type, tree: dict, origins: dict | None = None, base_dir: str | os.PathLike | None = None):
    """Validate a merged tree into dataclass ``cls``. Relative paths resolve against ``base_dir``
    (default: the current working directory)."""
    return _Validator(origins or {}, Path(base_dir or os.getcwd())).build(cls, tree, "")


def _unshared(value: Any) -> Any:
    """A copy of a YAML tree in which no two keys share a dict or list (unlike copy.deepcopy,
    which reproduces shared references)."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def load(cls: type, path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
         base_dir: str | os.PathLike | None = None):
    """Load ``path`` (with its defaults) and ``overrides`` into dataclass ``cls``."""
    origins: dict = {}
    # unshared: a YAML anchor/alias (``train: *student_train``) loads as ONE object under two keys,
    # and copy.deepcopy keeps that sharing, so an override of one key would change the other
    tree = _unshared(load_tree(path, origins)) if path else {}
    apply_overrides(tree, overrides, origins)
    return validate(cls, tree, origins, base_dir)


def to_dict(cfg: Any) -> Any:
    """A dataclass config as plain data (for YAML/JSON dumps and hashing)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config (YAML) atomically."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash(cfg: Any) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
