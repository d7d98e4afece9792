"""Each job's command line: flags generated from the Config fields that job exposes, over a YAML file."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from raysst.config import Config, check_job


def load_config(path: Optional[str] = None, **overrides: Any) -> Config:
    """Defaults, then the YAML file at `path`, then `overrides` (None means 'not given')."""
    values: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        values = yaml.safe_load(p.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config file {path}: expected a mapping of field: value, found {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config file {path}: unknown keys {unknown}; known keys are {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config(**values)


def build_parser(job: str, description: str = "") -> argparse.ArgumentParser:
    """Flags for one job, generated from the fields that job exposes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file of config values; flags override it")
    for f in dataclasses.fields(Config):
        if job not in f.metadata["jobs"] and job not in f.metadata["flag"]:
            continue
        flag = flag_name(job, f.name)
        kind = _field_type(f)
        kwargs: dict = {"dest": f.name, "default": None, "help": f"{f.metadata['help']} (default: {f.default!r})"
                        if f.default is not dataclasses.MISSING else f.metadata["help"]}
        if kind is not bool:
            kwargs["metavar"] = flag[2:].upper().replace("-", "_")  # `--data DATA`, not the field's `--data INPUT`
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif kind is list and f.metadata["repeat"]:
            parser.add_argument(flag, action="append", type=str, **kwargs)
        elif kind is list:
            parser.add_argument(flag, type=str, **kwargs)  # comma-separated, parsed by Config
        else:
            parser.add_argument(flag, type=kind, **kwargs)
    return parser


def flag_name(job: str, name: str) -> str:
    """The flag through which `job` sets the field `name`, e.g. `--workers-per-trial` for tune's num_workers."""
    f = next(f for f in dataclasses.fields(Config) if f.name == name)
    return "--" + f.metadata["flag"].get(job, name.replace("_", "-"))


def parse_config(job: str, argv: Optional[Sequence[str]] = None, description: str = "") -> Config:
    """Parse a job's command line into a validated Config; bad values exit with the reason."""
    parser = build_parser(job, description)
    args = vars(parser.parse_args(argv))
    try:
        return check_job(load_config(args.pop("config"), **args), job)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


def _field_type(f: dataclasses.Field) -> type:
    t = str(f.type)
    if "Union[int, str]" in t:
        return str  # a number or a range (num_workers: 4 or 2-8), parsed by Config
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("list", list)):
        if name in t:
            return kind
    return str
