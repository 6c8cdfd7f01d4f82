"""Settings in TOML files (scenarios, ``--config``) and ``--set section.key=value``:
each key sorted to the settings class that declares it, unknown ones refused by name."""

from __future__ import annotations

import difflib
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmed.config.fields import allowed_values, key, options

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error


def suggestion(name: str, known) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else ""


def route(
    document: Mapping,
    parts: Mapping[str, type],
    origin: str,
    *,
    top_level: tuple[str, ...] = (),
    only: Mapping[str, tuple[str, ...]] | None = None,
    scenario: bool = False,
) -> dict[str, dict]:
    """Sort a TOML document's ``[section] key = value`` pairs to the settings classes in
    ``parts`` that declare them: ``{part: {field: value}}``. ``only`` limits a part to
    some fields; ``scenario`` leaves out what a simulation sets itself. An unknown
    section or key is an error naming ``origin``, the key and the closest valid key."""
    where: dict[tuple[str, str], tuple[str, Any]] = {}
    simulated: set[tuple[str, str]] = set()  # keys a simulation sets itself
    for part, cls in parts.items():
        for f in options(cls):
            if only and part in only and f.name not in only[part]:
                continue
            if scenario and not f.metadata.get("in_scenario", True):
                simulated.add((f.metadata["section"], f.name))
                continue
            where[(f.metadata["section"], f.name)] = (part, f)
    valid = sorted(f"{s}.{n}" for s, n in where) + list(top_level)
    sections = sorted({s for s, _ in where})
    routed: dict[str, dict] = {part: {} for part in parts}
    routed[""] = {}
    for name, value in document.items():
        name = name.replace("-", "_")
        if not isinstance(value, dict):
            if name in top_level:
                routed[""][name] = value
                continue
            hint = next((f"; it belongs in [{s}]" for s, n in where if n == name), suggestion(name, valid))
            raise ValueError(f"{origin}: unknown setting {name!r}{hint}")
        for item in value:
            if (name, item.replace("-", "_")) in simulated:
                raise ValueError(f"{origin}: {name}.{item} is not a scenario setting: a simulation sets it itself")
        if name not in sections:
            raise ValueError(
                f"{origin}: unknown section [{name}]; sections: {', '.join(sections)}{suggestion(name, sections)}"
            )
        for item, item_value in value.items():
            item = item.replace("-", "_")
            if (name, item) not in where:
                raise ValueError(
                    f"{origin}: unknown setting {name}.{item} = {item_value!r}{suggestion(f'{name}.{item}', valid)}"
                )
            part, declared = where[(name, item)]
            if declared.metadata.get("items") and isinstance(item_value, str) and "," in item_value:
                warnings.warn(
                    f"{origin}: {name}.{item} = {item_value!r} is the old comma-separated form; write a "
                    f"TOML array, {name}.{item} = {_as_array(item_value, declared.metadata['items'])}",
                    FutureWarning,
                    stacklevel=2,
                )
            routed[part][item] = item_value
    return routed


def parse_override(text: str) -> dict:
    """``section.key=value`` (a TOML value, or a bare word as text) as a one-key document."""
    dotted, sep, raw = text.partition("=")
    section, _, name = dotted.strip().partition(".")
    if not sep or not section:
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word is text
    return {section: {name: value}} if name else {section: value}


def settings_table(parts: Mapping[str, type], top_level: tuple[str, ...] = (), scenario: bool = False) -> str:
    """Every key ``route`` accepts for ``parts``, with its default and help, for people."""
    lines = [f"  {name}" for name in top_level]
    for cls in parts.values():
        for f in options(cls):
            if scenario and not f.metadata.get("in_scenario", True):
                continue
            meta = f.metadata
            extra = ", one value or one per site" if meta.get("per_site") else ""
            rule = allowed_values(meta)
            lines.append(f"  {key(f):<30} {f.default!r:<18} {meta['help']}{f'; {rule}' if rule else ''}{extra}")
    return "\n".join(lines)


def _as_array(text: str, items: type) -> str:
    """A comma-separated value written as the TOML array that replaces it."""
    parts = [part.strip() for part in text.split(",")]
    return "[" + ", ".join(parts if items is float else [f'"{part}"' for part in parts]) + "]"
