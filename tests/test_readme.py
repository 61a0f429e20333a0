"""The README's commands work as written: every `kvkd` command line in its code blocks parses
(flag names and types, so the README cannot drift from the CLI), and the step-by-step block runs
end to end on the real SmolLM2 with smaller row and step counts (slow)."""

import re
import shlex
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from kvkd.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _code_lines(text: str | None = None) -> list[str]:
    """Indented code lines of the README (or of ``text``) with backslash continuations joined;
    `a && b` gives both."""
    lines, cur = [], ""
    for raw in (README.read_text() if text is None else text).splitlines():
        if not raw.startswith("    "):
            cur = ""
            continue
        text = raw.strip()
        cur = f"{cur} {text}".strip() if cur else text
        if cur.endswith("\\"):
            cur = cur[:-1].strip()
            continue
        lines += [part.strip() for part in cur.split("&&")]
        cur = ""
    return lines


def _kvkd_args(line: str) -> list[str] | None:
    """The arguments after `kvkd` / `-m kvkd.cli` / `--module kvkd.cli`, or None."""
    line = line.split("  #")[0].strip()
    if " -> " in line:  # a diagram, not a command
        return None
    for marker in ("kvkd.cli ", "kvkd "):
        i = line.find(marker)
        if i == 0 or (marker == "kvkd.cli " and i > 0):
            words = shlex.split(line[i + len(marker):].replace("$SLURM_ARRAY_TASK_ID", "3"))
            if words and re.fullmatch(r"[a-z]+", words[0]):
                return words
    return None


def _commands() -> list[list[str]]:
    found = [a for a in map(_kvkd_args, _code_lines()) if a is not None]
    return [a for a in found if "..." not in a and a[0] in {"extract", "train", "eval", "cache", "demo", "sweep", "report", "export", "generate", "sft"}]


def test_readme_has_the_commands_it_should():
    cmds = _commands()
    assert len(cmds) >= 10
    assert {c[0] for c in cmds} >= {"extract", "train", "eval", "cache", "sweep", "report", "demo"}


@pytest.mark.parametrize("args", _commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(args):
    cmd = typer.main.get_command(app)
    parent, rest = None, list(args)
    while hasattr(cmd, "get_command") and rest:  # groups: kvkd, kvkd cache
        parent = click.Context(cmd, info_name=rest[0], parent=parent)
        cmd = cmd.get_command(parent, rest.pop(0))
        assert cmd is not None, f"unknown command in README: kvkd {' '.join(args)}"
    cmd.make_context(cmd.name, rest, parent=parent)  # parses and type-checks every flag, runs nothing


STEP_BY_STEP_SCALE = {"--limit 256": "--limit 32", "--steps 200": "--steps 2", "--batch-size 8": "--batch-size 4", "--limit 200": "--limit 4"}


@pytest.mark.slow
def test_step_by_step_block_runs(tmp_path, monkeypatch, shared_data):
    text = README.read_text()
    block = text[text.index("## Step by step"):]
    block = block[: block.index("\n- Models:")]
    cmds = [line for line in _code_lines(block) if line.startswith("kvkd ")]
    assert len(cmds) == 7, cmds
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(shared_data.parent)  # ../shared/data as in the README
    monkeypatch.chdir(work)
    runner = CliRunner()
    for line in cmds:
        for big, small in STEP_BY_STEP_SCALE.items():
            line = line.replace(big, small)
        args = _kvkd_args(line) + (["--workers", "0"] if line.startswith("kvkd train") else [])
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{line}\n{result.output}"
    assert (work / "runs" / "sim" / "summary.json").is_file()
