"""Config resolution: defaults <- file <- flags."""

import pytest

from kvkd.config import ConfigError, resolve
from kvkd.train.trainer import TrainConfig


def test_file_then_flags_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\n  lr: 0.01\n  router: similarity\n  router_options: {temperature: 0.5}\n")
    cfg = resolve(TrainConfig, "train", str(f), {"steps": 3, "lr": None})
    assert cfg.steps == 3 and cfg.lr == 0.01 and cfg.router == "similarity"
    assert cfg.router_options == {"temperature": 0.5}
    assert cfg.batch_size == TrainConfig().batch_size


def test_toml_flat_and_unknown_keys(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('steps = 5\nbatch-size = 2\n')
    assert resolve(TrainConfig, "train", str(f), {}).batch_size == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 5\n")
    with pytest.raises(ConfigError, match="stepz"):
        resolve(TrainConfig, "train", str(bad), {})


# ----------------------------------------------------------------------------- options declared once
import dataclasses  # noqa: E402
import re  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from kvkd.cli import app  # noqa: E402
from kvkd.config import cli_options, opt, override  # noqa: E402
from kvkd.demo import DemoConfig  # noqa: E402
from kvkd.eval.evaluate import EvalConfig  # noqa: E402
from kvkd.pipeline.extract import ExtractConfig  # noqa: E402
from kvkd.sweep import SweepConfig  # noqa: E402

from kvkd.generate import GenerateConfig  # noqa: E402
from kvkd.sft import SFTConfig  # noqa: E402
from kvkd.train.export import ExportConfig  # noqa: E402

COMMANDS = {"train": TrainConfig, "extract": ExtractConfig, "eval": EvalConfig, "sweep": SweepConfig, "demo": DemoConfig,
            "generate": GenerateConfig, "sft": SFTConfig, "export": ExportConfig}


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_field_is_a_cli_option_with_help_and_its_default(command):
    cls = COMMANDS[command]
    text = _help(command)
    specs = {s.name: s for s in cli_options(cls)}
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
        assert f.name in specs, f"{cls.__name__}.{f.name} is not on the command line"
        spec = specs[f.name]
        lines = text.splitlines()
        start = next((i for i, ln in enumerate(lines) if ln.strip().startswith(spec.flags[0].split("/")[0] + " ") or ln.strip() == spec.flags[0].replace("/", " / ")), None)
        assert start is not None, f"{spec.flags[0]} missing from `kvkd {command} --help`"
        end = next((j for j in range(start + 1, len(lines)) if lines[j].strip().startswith("--")), len(lines))
        line = " ".join(ln.strip() for ln in lines[start:end])
        shown = re.search(r"\[default: ([^\]]*)\]", line)
        assert shown, f"{spec.flags[0]}: no default in help"
        default = dataclasses.MISSING if f.default is dataclasses.MISSING else f.default
        if default is dataclasses.MISSING:
            default = f.default_factory()
        if f.metadata.get("default_text"):
            assert shown.group(1) == f.metadata["default_text"]
        elif isinstance(default, bool):
            assert shown.group(1) == ("on" if default else "off")
        elif default in (None, "", [], {}):
            assert shown.group(1) == "none"
        elif isinstance(default, list):
            assert shown.group(1) == ",".join(map(str, default))
        else:
            assert shown.group(1) == str(default), (f.name, shown.group(1), default)


def test_nine_file_only_fields_are_now_flags():
    text = _help("train")
    for flag in ("--weight-decay", "--grad-clip", "--lora-dropout", "--lora-targets", "--dtype", "--prefetch-factor",
                 "--log-every", "--keep-checkpoints", "--trust-remote-code"):
        assert flag in text


def test_nested_sections_cli_names_and_unknown_nested_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  optimiser:\n    lr: 1e-3\n    steps: 4\n  lora: false\n  workers: 0\n  losses: {a1: 2}\n  threads: 1\n")
    cfg = resolve(TrainConfig, "train", str(f), {})
    assert (cfg.lr, cfg.steps, cfg.use_lora, cfg.num_workers, cfg.a1, cfg.num_threads) == (1e-3, 4, False, 0, 2.0, 1)
    g = tmp_path / "group.yaml"  # `lora` is both the switch and the group's section
    g.write_text("train:\n  lora: {lora_r: 8, use_lora: true}\n  optimiser: {steps: 200, lr: 2.0e-4}\n")
    cfg = resolve(TrainConfig, "train", str(g), {})
    assert (cfg.lora_r, cfg.use_lora, cfg.steps, cfg.lr) == (8, True, 200, 2e-4)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  optimiser:\n    lrr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"section 'optimiser'.*unknown option 'lrr'.*did you mean 'lr'"):
        resolve(TrainConfig, "train", str(bad), {})
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian:\n  steps: 2\n")
    with pytest.raises(ConfigError, match=r"unknown option 'trian'.*did you mean 'train'"):
        resolve(TrainConfig, "train", str(typo), {})
    other = tmp_path / "other.yaml"  # another command's section is left alone
    other.write_text("extract:\n  slots: 3\ntrain:\n  steps: 2\n")
    assert resolve(TrainConfig, "train", str(other), {}).steps == 2
    assert resolve(ExtractConfig, "extract", str(other), {}).slots == 3


@pytest.mark.parametrize("text, match", [
    ("steps: two\n", r"--steps must be int, got 'two'"),
    ("steps: 2.7\n", r"--steps must be int, got 2.7"),
    ("lora: yes please\n", r"--lora must be bool"),
    ("router: simlarity\n", r"--router 'simlarity' is not one of .*did you mean 'similarity'"),
    ("fusion: both\n", r"--fusion 'both' is not one of \['loss', 'target'\]"),
    ("cache: one.zarr\n", r"--cache must be list"),
    ("steps: 3\nsteps: 4\n", None),  # YAML keeps the last: not our business
])
def test_ill_typed_values_name_the_option(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    if match is None:
        assert resolve(TrainConfig, "train", str(f), {}).steps == 4
        return
    with pytest.raises(ConfigError, match=match):
        resolve(TrainConfig, "train", str(f), {})


def test_invalid_yaml_is_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml is not valid YAML") as err:
        resolve(TrainConfig, "train", str(f), {})
    assert "\n" not in str(err.value)


def test_cli_reports_config_errors_in_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: two\n")
    result = CliRunner().invoke(app, ["train", "--config", str(f), "--cache", "x.zarr", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "--steps must be int, got 'two'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_override_keeps_help_and_cli_name_and_states_why():
    steps = {s.name: s for s in cli_options(SweepConfig)}["steps"]
    assert steps.flags == ("--steps",) and steps.default == 48 and "Optimiser steps (sized" in steps.help
    assert {s.name: s for s in cli_options(TrainConfig)}["steps"].default == 100


def test_a_new_option_is_one_field():
    @dataclasses.dataclass
    class Cfg:
        width: int = opt(3, help="A width")
        flag: bool = opt(False, cli="on/off", help="A switch")

    specs = cli_options(Cfg)
    assert [s.flags for s in specs] == [("--width",), ("--on/--off",)]
    assert resolve(Cfg, "x", None, {"width": 5}).width == 5
    with pytest.raises(ConfigError, match="--width must be int"):
        resolve(Cfg, "x", None, {"width": "5"})
    assert override(Cfg, "width", 4, "why").default == 4
