"""Config resolution: dataclass defaults <- YAML/TOML file <- command-line flags.

A config file may be flat (the options of one command) or hold one section per command
(``extract:``, ``train:``, ``eval:``, ``demo:``); the section named after the running
command is used when present. Unknown keys are refused with the list of known ones.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or option is invalid; the message names the key and the fix."""


def read_config_file(path: str | Path) -> dict:
    """Read a ``.yaml``/``.yml``, ``.toml`` or ``.json`` config file into a dict.

    Raises:
        ConfigError: missing file, unknown suffix or not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif p.suffix == ".json":
        data = json.loads(text)
    else:
        raise ConfigError(f"config file {p}: use .yaml, .toml or .json")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option names to values")
    return data


def resolve(cls: type[T], section: str, config_file: str | None, flags: dict[str, Any]) -> T:
    """Build ``cls`` from its defaults, then the config file, then the given flags.

    Args:
        cls: a config dataclass (its field defaults are the only defaults).
        section: the command name (selects a section of the file when present).
        config_file: optional path.
        flags: option values from the command line; ``None`` means "not given".
    Raises:
        ConfigError: unknown keys in the file.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file:
        data = read_config_file(config_file)
        if isinstance(data.get(section), dict):
            data = data[section]
        data = {k.replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict) or k.replace("-", "_") in known}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"config file {config_file}: unknown option(s) {unknown} for `{section}`; known: {sorted(known)}")
        values.update(data)
    values.update({k: v for k, v in flags.items() if v is not None})
    return cls(**values)


def default_of(cls, name: str) -> Any:
    """The default of a dataclass field (for CLI help texts)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    raise KeyError(name)
