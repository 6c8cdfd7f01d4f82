"""Command-line options derived from the settings' declarations, and the settings of one
command: defaults, then a ``--config`` file, then the command line."""

from __future__ import annotations

import argparse
import typing
from collections.abc import Mapping
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from fedmed.config.fields import allowed_values, build, flag, key, options, types
from fedmed.config.files import read_toml, route


def add_scenario_overrides(parser: argparse.ArgumentParser) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable): a scenario's settings overridden one by one,
    into ``args.overrides`` (``fedmed.simulate.scenario.load_scenario`` reads them)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a scenario value, e.g. --set training.rounds=3 (repeatable)",
    )


def add_options(parser: argparse.ArgumentParser, cls: type, title: str, only: tuple[str, ...] | None = None) -> None:
    """One option per setting of ``cls`` (or of ``only``), grouped under ``title``.
    Options given nowhere stay unset, so a --config file's values are not overridden by
    defaults; ``given`` returns what the command line set."""
    group = parser.add_argument_group(title)
    for f in options(cls):
        if only is not None and f.name not in only:
            continue
        meta, kind = f.metadata, types(cls)[f.name]
        text = meta["help"]
        if meta["unit"]:
            text += f" [{meta['unit']}]"
        rule = allowed_values(meta)
        if rule and not meta["choices"]:
            text += f"; {rule}"
        default = f.default if f.default is not MISSING else None
        if not meta.get("required") and default not in ("", ()):
            text += f" (default {default})"
        text += f" [{key(f)}]"
        common = {"dest": f.name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if kind is bool:
            group.add_argument(flag(f), action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is tuple:
            group.add_argument(flag(f), nargs="+", metavar="VALUE", **common)
        else:
            group.add_argument(flag(f), type=_option_type(kind), metavar=_metavar(f, kind), **common)


def _option_type(kind: Any):
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    if base is int:
        return int
    if base is float:
        return lambda text: None if text.strip().lower() == "none" else float(text)
    return str


def _metavar(f, kind: Any) -> str:
    if f.metadata["choices"]:
        return "{" + ",".join(str(c) for c in f.metadata["choices"]) + "}"
    return {int: "N", float: "X"}.get(kind, f.name.upper())


def given(args: argparse.Namespace, cls: type) -> dict:
    """The settings of ``cls`` that the command line set."""
    return {f.name: getattr(args, f.name) for f in options(cls) if hasattr(args, f.name)}


def load_settings(
    args: argparse.Namespace,
    parts: Mapping[str, type],
    config_file: Path | None,
    only: Mapping[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """Each part's settings: its defaults, then the --config file, then the command line."""
    document = read_toml(config_file) if config_file is not None else {}
    routed = route(document, parts, str(config_file), only=only)
    return {
        part: build(
            cls, {**routed[part], **given(args, cls)}, "command line" + (f" and {config_file}" if config_file else "")
        )
        for part, cls in parts.items()
    }
