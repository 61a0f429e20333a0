"""Options declared once: dataclass fields carry their default, help text and CLI name;
config resolution is dataclass defaults <- YAML/TOML/JSON file <- command-line flags.

A command's config is a dataclass whose fields are declared with :func:`opt`. Ideas shared
between commands live in small group dataclasses (:class:`DataSelection`, :class:`LoraArgs`,
:class:`OptimArgs`, :class:`LoaderArgs`, :class:`RuntimeArgs`, ...) that the command configs
inherit from, so ``--format`` or ``--device`` is declared (default, help, choices) in exactly one
place while ``cfg.lr`` stays a plain attribute and ``config.json`` stays flat. The CLI layer
(``kvkd.cli``) generates every Typer option from these fields (:func:`cli_options`), so a new
option is one edit: a field.

A config file may be flat (the options of one command, by field name or CLI name, ``-`` or
``_``), hold one section per command (``extract:``, ``train:``, ...), and inside it one
section per group (``optimiser: {lr: 1e-3}``). Any key that is neither an option nor a group,
at any depth, is an error naming it (with a "did you mean"); values are type-checked against
the field's type before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or option is invalid; the message names the key and the fix."""


# ----------------------------------------------------------------------------- declaring options
def opt(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Callable[[], Any] | None = None,
    cli: str | None = None,
    choices: tuple | Callable[[], list[str]] | None = None,
    parse: Callable[[Any], Any] | None = None,
    cli_type: Any = None,
    default_text: str | None = None,
    hidden: bool = False,
) -> Any:
    """A dataclass field that is also a CLI option.

    Args:
        default / factory: the field's default (the only default of the option).
        help: one sentence for ``--help`` (the default is appended automatically).
        cli: the flag name without dashes when it differs from the field name with ``_`` ->
            ``-`` (``threads`` for ``num_threads``); ``"on/off"`` pairs give a boolean switch
            (``"lora/no-lora"``); ``""`` = not on the command line (a dict with its own flags).
        choices: allowed values (a tuple, or a function returning them, e.g. a registry's
            names), checked at resolution with a "did you mean".
        parse: turns the command-line value (``cli_type``) into the field's value.
        cli_type: the command-line type when it differs from the field's (e.g. ``str`` for a
            comma-separated list); ``list[str]`` makes a repeatable option.
        default_text: how the default reads in ``--help`` when the value itself does not say
            it (e.g. "the caches' rows" for None).
        hidden: leave the option out of ``--help``.
    Returns:
        a ``dataclasses.Field`` with the metadata the CLI generator reads.
    """
    meta = {"help": help, "cli": cli, "choices": choices, "parse": parse, "cli_type": cli_type, "default_text": default_text, "hidden": hidden}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def group(title: str):
    """Class decorator: a dataclass of related options shown under ``title`` in ``--help``
    and accepted as a nested section of a config file (by ``title`` or the class's
    ``section`` attribute)."""

    def wrap(cls):
        cls = dataclass(cls)
        cls.__group_title__ = title
        return cls

    return wrap


def override(base: type, name: str, default, why: str, default_text: str | None = None):
    """Re-declare ``base``'s option ``name`` with another default, keeping its help and CLI
    name and appending why the default differs (for command-specific defaults, e.g. the
    demo's shorter run)."""
    f = base.__dataclass_fields__[name]
    meta = dict(f.metadata)
    meta["help"] = f"{meta['help']} ({why})" if why else meta["help"]
    meta["default_text"] = default_text
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One option of a command, derived from a config dataclass field."""

    name: str  # field name (python identifier)
    flags: tuple[str, ...]  # e.g. ("--threads",) or ("--lora/--no-lora",)
    type: Any  # field type (resolved)
    cli_type: Any  # command-line type
    help: str  # with the default appended
    default: Any
    group: str
    choices: tuple | Callable | None
    parse: Callable | None
    hidden: bool

    @property
    def cli_name(self) -> str:
        return self.flags[0].split("/")[0].lstrip("-")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def default_of(cls, name: str) -> Any:
    """The default of a dataclass field."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return _default(f)
    raise KeyError(name)


def _owner_group(cls, name: str) -> str:
    """Title of the group dataclass (in ``cls``'s MRO) that declares field ``name``."""
    for klass in reversed(cls.__mro__):
        if name in klass.__dict__.get("__annotations__", {}) and hasattr(klass, "__group_title__") and "__group_title__" in klass.__dict__:
            return klass.__group_title__
    return "options"


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


def _fmt_default(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == "" or value == [] or value == {}:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def choices_of(spec: OptionSpec) -> list | None:
    c = spec.choices
    return list(c()) if callable(c) else (list(c) if c is not None else None)


def cli_options(cls) -> list[OptionSpec]:
    """Every command-line option of a config dataclass, in declaration order.

    Raises:
        ConfigError: a field without help, or two fields with one flag name (a bug, caught by
            the tests).
    """
    hints = typing.get_type_hints(cls)
    specs, seen = [], {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            raise ConfigError(f"{cls.__name__}.{f.name} is not declared with kvkd.config.opt (no help text)")
        if meta.get("cli") == "":
            continue
        cli = meta.get("cli") or f.name.replace("_", "-")
        tp = hints[f.name]
        base, _ = _strip_optional(tp)
        cli_type = meta.get("cli_type") or base
        if "/" in cli:
            flags = ("/".join("--" + part for part in cli.split("/")),)
            cli_type = bool
        elif cli_type is bool:
            flags = (f"--{cli}/--no-{cli}",)
        else:
            flags = (f"--{cli}",)
        for flag in flags[0].split("/"):
            if flag in seen:
                raise ConfigError(f"{cls.__name__}: {flag} is declared by both {seen[flag]} and {f.name}")
            seen[flag] = f.name
        default = _default(f)
        shown = meta.get("default_text") or _fmt_default(default)
        help_text = f"{meta['help']} [default: {shown}]"
        specs.append(OptionSpec(f.name, flags, tp, cli_type, help_text, default, _owner_group(cls, f.name), meta.get("choices"), meta.get("parse"), bool(meta.get("hidden"))))
    # the command's own options first, then its groups in the order of its bases
    order = ["options"] + [getattr(b, "__group_title__", "") for b in cls.__mro__[1:]]
    return sorted(specs, key=lambda s: order.index(s.group) if s.group in order else len(order))


# ----------------------------------------------------------------------------- shared groups
DATA_FORMATS_HELP = "auto (detect), or a format of kvkd.data.FORMATS"


def _data_formats() -> list[str]:
    from kvkd.data import FORMATS

    return ["auto", *FORMATS]


@group("data")
class DataSelection:
    """Which rows of which data set (extract, train, eval, generate).

    Attributes:
        data: a JSONL/TXT/JSON file, a folder (with ``split``), or a Hugging Face data set name.
        split: split (file stem in a folder, or hub split); None = the folder's only split.
        data_format: ``auto`` (detect) or one of :data:`kvkd.data.FORMATS`.
        offset: first row used (rows); None = 0 (train: the caches' offset).
        limit: number of rows used; None = all (train: the caches' rows).
    """

    data: str = opt("", help="Data: a JSONL/TXT/JSON file, a folder (with --split), or a Hugging Face data set name", default_text="none (train: the data set recorded in the caches)")
    split: str | None = opt(None, help="Split: file stem in a folder, or hub split")
    data_format: str = opt("auto", cli="format", help="Data format (auto detects it from the file)", choices=_data_formats)
    offset: int | None = opt(None, help="First row used (rows)", default_text="0 (train: the caches')")
    limit: int | None = opt(None, help="Number of rows used", default_text="all (train: the caches')")


@group("runtime")
class RuntimeArgs:
    """Where and how a command computes.

    Attributes:
        device: ``auto`` (this rank's CUDA device if visible, else cpu), ``cpu`` or ``cuda[:N]``.
        num_threads: torch CPU threads; 0 = the cores free when the command starts (cores minus
            the 1-minute load average, at least 1: ``kvkd.threads``); set by the CLI, not the library.
        trust_remote_code: let a checkpoint run its own Python code (off unless the person
            running the command passes ``--trust-remote-code``).
    """

    device: str = opt("auto", help="auto (this rank's CUDA device if visible, else cpu), cpu or cuda[:N]")
    num_threads: int = opt(0, cli="threads", help="torch CPU threads (0 = the cores free at start: cores minus load average, at least 1)")
    trust_remote_code: bool = opt(False, cli="trust-remote-code/no-trust-remote-code", help="Let the checkpoint run its own Python code")


# ----------------------------------------------------------------------------- files
def read_config_file(path: str | Path) -> dict:
    """Read a ``.yaml``/``.yml``, ``.toml`` or ``.json`` config file into a dict.

    Raises:
        ConfigError: missing file, unknown suffix, a syntax error (with its line) or not a
            mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    try:
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
    except ConfigError:
        raise
    except Exception as err:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError
        first = str(err).strip().splitlines()
        raise ConfigError(f"config file {p} is not valid {p.suffix[1:].upper()}: {' '.join(x.strip() for x in first[:4])}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option names to values")
    return data


COMMAND_SECTIONS = ("extract", "generate", "train", "sft", "eval", "export", "sweep", "demo")


def _did_you_mean(word: str, known) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _flatten_file(cls, data: dict, where: str, section: str) -> dict[str, Any]:
    """File mapping -> {field name: value}; nested group sections are flattened; unknown keys refused."""
    specs = {s.name: s for s in cli_options(cls)}
    by_name = {f.name: f.name for f in dataclasses.fields(cls)}
    by_name.update({s.cli_name.replace("-", "_"): s.name for s in specs.values()})
    for s in specs.values():  # switches: --lora/--no-lora -> key "lora"
        if "/" in s.flags[0]:
            by_name[s.flags[0].split("/")[0].lstrip("-").replace("-", "_")] = s.name
    groups = {s.group for s in specs.values()} | {"options"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k in groups and isinstance(value, dict):  # a group section (``lora: {lora_r: 8}``), even where a switch shares the name
            for name, v in _flatten_file(cls, value, f"{where}, section {key!r}", section).items():
                if name in out:
                    raise ConfigError(f"{where}: option {name!r} is given twice")
                out[name] = v
        elif k in by_name:
            if by_name[k] in out:
                raise ConfigError(f"{where}: option {key!r} is given twice (as {by_name[k]} too)")
            out[by_name[k]] = value
        elif k in COMMAND_SECTIONS and isinstance(value, dict):
            continue  # another command's section
        else:
            raise ConfigError(f"{where}: unknown option {key!r} for `{section}`{_did_you_mean(k, list(by_name) + sorted(groups) + list(COMMAND_SECTIONS))}; see `kvkd {section} --help`")
    return out


def _type_ok(value: Any, tp: Any) -> bool:
    base, optional = _strip_optional(tp)
    if value is None:
        return optional
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(base))
    if base is Any or base is object:
        return True
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    if origin is list or base is list:
        args = typing.get_args(base)
        return isinstance(value, (list, tuple)) and (not args or all(_type_ok(v, args[0]) for v in value))
    if origin is dict or base is dict:
        return isinstance(value, dict)
    return True


def _type_name(tp: Any) -> str:
    base, optional = _strip_optional(tp)
    name = getattr(base, "__name__", None) or str(base).replace("typing.", "")
    return f"{name} or null" if optional else name


def check_value(cls, name: str, value: Any, where: str) -> Any:
    """Type- and choice-check one option value (ints given as floats like 2.0 are refused).

    Returns:
        the value (an int for a float field becomes a float).
    Raises:
        ConfigError: names the option, the value, the expected type or choices.
    """
    tp = typing.get_type_hints(cls)[name]
    spec = next((s for s in cli_options(cls) if s.name == name), None)
    flag = f"--{spec.cli_name}" if spec else name
    if not _type_ok(value, tp):
        raise ConfigError(f"{where}: {flag} must be {_type_name(tp)}, got {value!r}")
    if spec is not None:
        allowed = choices_of(spec)
        if allowed is not None and value is not None and value not in allowed:
            raise ConfigError(f"{where}: {flag} {value!r} is not one of {allowed}{_did_you_mean(str(value), allowed)}")
    base, _ = _strip_optional(tp)
    if base is float and isinstance(value, int):
        return float(value)
    return value


def _yaml_float(value: Any, tp: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: accept it for a float option."""
    base, _ = _strip_optional(tp)
    if base is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def resolve(cls: type[T], section: str, config_file: str | None, flags: dict[str, Any]) -> T:
    """Build ``cls`` from its defaults, then the config file, then the given flags.

    Args:
        cls: a config dataclass declared with :func:`opt` (its field defaults are the only
            defaults).
        section: the command name (selects a section of the file when present).
        config_file: optional path.
        flags: option values from the command line by field name; ``None`` means "not given".
    Raises:
        ConfigError: unknown keys (at any depth) or ill-typed values, naming each; a flag that
            is not a field of ``cls``.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file:
        data = read_config_file(config_file)
        if isinstance(data.get(section), dict):
            data = data[section]
        hints = typing.get_type_hints(cls)
        values.update({k: _yaml_float(v, hints[k]) for k, v in _flatten_file(cls, data, f"config file {config_file}", section).items()})
        for k, v in values.items():  # a wrong value in the file is refused even where a flag overrides it
            check_value(cls, k, v, f"config file {config_file}")
    bad = sorted(set(k for k, v in flags.items() if v is not None) - known)
    if bad:
        raise ConfigError(f"unknown option(s) {bad} for `{section}`")
    values.update({k: v for k, v in flags.items() if v is not None})
    where = f"config file {config_file}" if config_file else "command line"
    checked = {k: check_value(cls, k, v, where if k not in flags or flags[k] is None else "command line") for k, v in values.items()}
    return cls(**checked)
