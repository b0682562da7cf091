"""TrainConfig from a preset, a TOML/JSON file and --key=value strings (types checked), and the
`gpt2-fast train` options: one per TrainConfig field, with its help text (--out is out_dir)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any, Optional

from .config import TrainConfig


def _field_types() -> dict:
    return typing.get_type_hints(TrainConfig)


def _check_type(name: str, value: Any, tp) -> Any:
    """value for TrainConfig.<name> of annotation tp; ints are accepted for floats."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    ok = (isinstance(value, bool) if tp is bool else
          isinstance(value, int) and not isinstance(value, bool) if tp is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
          isinstance(value, tp))
    if not ok:
        raise TypeError(f"TrainConfig.{name} expects {tp.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def _parse_str(name: str, text: str, tp) -> Any:
    """A --key=value string converted to the field's type."""
    args = typing.get_args(tp)
    if type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        tp = next(a for a in args if a is not type(None))
    try:
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
    except ValueError:
        raise ValueError(f"--{name} expects {tp.__name__}, got {text!r}") from None
    return text


def read_config_file(path: str) -> dict:
    """A TOML or JSON file of TrainConfig fields (a [train] table in TOML is also accepted)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib
        with open(path, "rb") as f:
            d = tomllib.load(f)
        d = d.get("train", d)
    elif path.endswith(".json"):
        with open(path) as f:
            d = json.load(f)
    else:
        raise ValueError(f"config file {path} must end in .toml or .json")
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a table of TrainConfig fields")
    return d


def build_config(base: Optional[str] = None, overrides: Optional[dict] = None, **kw) -> TrainConfig:
    """TrainConfig from a preset name or a .toml/.json file, then `overrides` ({field: str}
    from the command line, parsed by type) and `kw` (typed values)."""
    types = _field_types()
    values: dict = {}
    if base:
        if base.endswith((".toml", ".json")):
            values.update(read_config_file(base))
        else:
            values["model"] = base
    for k, v in (overrides or {}).items():
        if k not in types:
            raise ValueError(f"unknown TrainConfig field {k!r}")
        values[k] = _parse_str(k, v, types[k])
    values.update(kw)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {unknown}; expected some of {sorted(types)}")
    return TrainConfig(**{k: _check_type(k, v, types[k]) for k, v in values.items()})


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    return text if "default" in text else f"{text} (default {f.default!r})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", nargs="?", default=None,
                   help="a preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a .toml/.json file of "
                        "TrainConfig fields")
    for f in dataclasses.fields(TrainConfig):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        if f.name == "out_dir":
            names.insert(0, "--out")  # the run folder, named like every other command's output
        bool_flag = f.type in (bool, "bool")
        tp = typing.get_type_hints(TrainConfig)[f.name]
        kind = next((a for a in typing.get_args(tp) if a is not type(None)), tp).__name__
        p.add_argument(*names, dest=f.name, default=None, metavar="BOOL" if bool_flag else kind.upper(),
                       nargs="?" if bool_flag else None, const="true" if bool_flag else None,
                       help=_help(f))


def config_from_args(args) -> TrainConfig:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return build_config(args.base, {k: getattr(args, k) for k in names if getattr(args, k, None) is not None})
