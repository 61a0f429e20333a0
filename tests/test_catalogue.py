"""The catalogue of malformed inputs (issue 15): every fault the issue lists, run through the real
CLI (``kvkd.cli.app`` in a ``CliRunner``), each asserting a non-zero exit code, ONE line naming the
culprit and the fix, no traceback (no exception escaped the CLI), and that nothing readable as
valid was left behind (no run folder, checkpoint or summary; no cache reading as complete; no
metrics.json).

One row per case: ``Case(id, build, expect, left)``. ``build(ctx)`` prepares the input (damaging a
copy of a cache, writing a config file, planting NaN weights, ...) and returns the argv; ``expect``
are substrings that must all be on one output line; ``left(ctx)`` checks what is left on disk
(default: nothing at ``ctx.out``). Cases that load a model or train a step use the tiny random
models of ``tests/conftest.py``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import zarr
from typer.testing import CliRunner

from kvkd.cache import zarr_adapter as za
from kvkd.cache.reader import CacheReader
from kvkd.cli import app
from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.train.trainer import TrainConfig, latest_checkpoint, train

from .conftest import REPO, SHARED_DATA

runner = CliRunner()


@dataclass
class Ctx:
    """What a case builds on: shared inputs (read-only) and a fresh folder ``tmp`` of its own."""

    tmp: Path
    rows: Path  # 8 GSM8K train rows
    test_rows: Path  # 4 GSM8K test rows
    cache: Path  # complete cache of ``rows`` (tiny teacher, M=4, shards of 4 examples)
    cache6: Path  # the same teacher over the first 6 rows only
    run: Path  # a run trained 1 step on ``cache``
    teacher: Path
    student: Path
    short_teacher: Path  # the tiny teacher with a 64-token context
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def copy_cache(self, name="c.zarr") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.cache, dst)
        return dst

    def copy_run(self) -> Path:
        dst = self.tmp / "run"
        shutil.copytree(self.run, dst)
        return dst

    def file(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def extract_args(self, *extra, data=None, model=None) -> list[str]:
        return ["extract", "--model", str(model or self.teacher), "--data", str(data or self.rows), "--out", str(self.out),
                "--slots", "4", "--batch-size", "4", "--examples-per-shard", "4", "--trace-fallback", "nl", *extra]

    def train_args(self, *extra, caches=None, out=None, steps="1") -> list[str]:
        cs = [a for c in (caches or [self.cache]) for a in ("--cache", str(c))]
        return ["train", *cs, "--student", str(self.student), "--out", str(out or self.out), *(["--steps", steps] if steps else []), "--batch-size", "4",
                "--lora-r", "4", "--workers", "0", "--warmup-steps", "0", "--router", "fixed", *extra]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, shared_data, tiny_teacher, tiny_student):
    root = tmp_path_factory.mktemp("catalogue")
    rows = root / "train.jsonl"
    rows.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    test_rows = root / "test.jsonl"
    test_rows.write_text("\n".join((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:4]) + "\n")
    base = dict(model=str(tiny_teacher), data=str(rows), slots=4, batch_size=4, examples_per_shard=4, trace_fallback="nl")
    extract(ExtractConfig(out=str(root / "c.zarr"), **base))
    extract(ExtractConfig(out=str(root / "c6.zarr"), limit=6, **base))
    train(TrainConfig(caches=[str(root / "c.zarr")], out=str(root / "run"), student=str(tiny_student), steps=1, batch_size=4,
                      lora_r=4, num_workers=0, warmup_steps=0, router="fixed"))
    short = root / "short_teacher"
    shutil.copytree(tiny_teacher, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (short / "config.json").write_text(json.dumps(cfg))
    return dict(rows=rows, test_rows=test_rows, cache=root / "c.zarr", cache6=root / "c6.zarr", run=root / "run",
                teacher=Path(tiny_teacher), student=Path(tiny_student), short_teacher=short)


# ----------------------------------------------------------------------------- damage helpers
def shard_file(cache: Path, array: str, shard: int) -> Path:
    arr = zarr.open_group(str(cache), mode="r")[array]
    return cache / array / za.shard_key(arr, shard)


def flip_byte(path: Path, at: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def swap(a: Path, b: Path) -> None:
    ta, tb = a.read_bytes(), b.read_bytes()
    a.write_bytes(tb)
    b.write_bytes(ta)


def mark_incomplete(cache: Path) -> None:
    meta = json.loads((cache / "zarr.json").read_text())
    meta["attributes"]["status"] = "incomplete"
    (cache / "zarr.json").write_text(json.dumps(meta))


def plant_nan(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = latest_checkpoint(run) / "trainable.safetensors"
    state = load_file(str(f))
    name = next(k for k in state if k.startswith("student.projection"))
    state[name][0] = float("nan")
    save_file(state, str(f))


def gold_rows(ctx: Ctx) -> Path:
    """Eval rows (format jsonl) whose gold answers are not all numbers: a ratio, an expression, a number."""
    rows = [{"id": f"r{i}", "question": f"What is item {i}?", "cot": "", "answer": a} for i, a in enumerate(["3:4", "x^2 + 1", "12"])]
    return ctx.file("golds.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s run lock (prints 'locked' once it holds it)."""
    code = ("import sys, time; from kvkd.train.rundir import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def fail_on_shard(ctx: Ctx, exc_or_signal) -> None:
    """Make extraction fail when it writes shard 1: raise an exception, or send this process a signal."""
    from kvkd.cache import writer as writer_mod

    real = writer_mod.CacheWriter.write_shard

    def write_shard(self, shard, rows):
        if shard == 1:
            if isinstance(exc_or_signal, BaseException):
                raise exc_or_signal
            os.kill(os.getpid(), exc_or_signal)  # delivered at once (main thread): SIGINT/SIGTERM as from a terminal or a scheduler
        return real(self, shard, rows)

    ctx.monkeypatch.setattr(writer_mod.CacheWriter, "write_shard", write_shard)


def signal_at_step(ctx: Ctx, sig, step: int) -> None:
    """Send this process ``sig`` during training step ``step`` (before that step is logged)."""
    import kvkd.train.trainer as trainer

    real, calls = trainer._global_logs, []

    def logs(engine, part, rows):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), sig)
        return real(engine, part, rows)

    ctx.monkeypatch.setattr(trainer, "_global_logs", logs)


def resumable_run(ctx: Ctx) -> None:
    """An interrupted run: checkpoint of step 2, no summary, the lock released (a rerun resumes and finishes)."""
    from kvkd.train.rundir import RunDir, folder_lock

    run = RunDir(ctx.out)
    assert not run.summary_path.exists() and RunDir.checkpoint_step(run.latest_checkpoint()) == 2
    with folder_lock(ctx.out):
        pass
    result = runner.invoke(app, ctx.train_args("--save-every", "2", steps="4"))
    assert result.exit_code == 0 and len(run.read_log()) == 4, result.output


def disk_full_at_checkpoint(ctx: Ctx) -> None:
    import kvkd.train.engines as engines

    def full(state, path):
        raise RuntimeError("[enforce fail at inline_container.cc:815] . unexpected pos 66432 vs 66320")

    ctx.monkeypatch.setattr(engines, "save_file", full)


# ----------------------------------------------------------------------------- what may be left
def nothing(ctx: Ctx) -> None:
    assert not ctx.out.exists(), sorted(p.name for p in ctx.out.rglob("*"))


def incomplete_cache(ctx: Ctx) -> None:
    """The cache at --out exists, reads as incomplete (refused without allow_incomplete), claims released."""
    from kvkd.cache.errors import CacheError

    with pytest.raises(CacheError, match="incomplete"):
        CacheReader.open(ctx.out)
    assert CacheReader.open(ctx.out, allow_incomplete=True).metadata["status"] == "incomplete"
    assert not list((ctx.out / ".claims").glob("shard-*"))
    assert not list(ctx.out.rglob("*.partial"))


def unchanged_run(ctx: Ctx) -> None:
    """The copied run folder is as it was: same config, log and summary, no evals, no export."""
    run = ctx.tmp / "run"
    for name in ("config.json", "log.jsonl", "summary.json"):
        assert (run / name).read_bytes() == (ctx.run / name).read_bytes(), name
    assert not list(run.glob("evals/*/metrics.json"))
    assert not ctx.out.exists()


def no_trained_state(ctx: Ctx) -> None:
    """A run folder may exist (it was created before the fault) but holds no checkpoint, no summary."""
    assert not (ctx.out / "summary.json").exists()
    assert not list(ctx.out.glob("checkpoints/step-*")) and not list(ctx.out.glob("checkpoints/.tmp-*"))


def cache_untouched(name: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        r = CacheReader.open(ctx.tmp / name)
        assert r.metadata["status"] == "complete" and r.verify() == []
        assert not ctx.out.exists() or ctx.out == ctx.tmp / name

    return check


def left_alone(name: str, content: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        assert (ctx.tmp / name).read_text() == content
        assert not (ctx.tmp / name).is_dir() or not (ctx.tmp / name / "zarr.json").exists()

    return check


def no_sweep_cells(ctx: Ctx) -> None:
    """Refused before the sweep folder (and any cell) was created."""
    assert not ctx.out.exists()


# ----------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list[str]]
    expect: tuple[str, ...]
    left: Callable[[Ctx], None] = nothing
    slow: bool = False


def _foreign(ctx: Ctx) -> list[str]:
    ctx.out.mkdir()
    (ctx.out / "notes.txt").write_text("mine")
    old = time.time() - 60
    os.utime(ctx.out, (old, old))
    return ctx.extract_args()


def _reextract(ctx: Ctx) -> list[str]:
    c = ctx.copy_cache()
    return [*ctx.extract_args("--offset", "1")[:6], str(c), *ctx.extract_args("--offset", "1")[7:]]


def _config(text: str, *extra) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ctx.train_args("--config", str(ctx.file("cfg.yaml", text)), *extra, steps=None)


def _damaged(array: str, how: Callable[[Path], None], shard: int = 1) -> Callable[[Ctx], Path]:
    def make(ctx: Ctx) -> Path:
        c = ctx.copy_cache()
        how(shard_file(c, array, shard))
        return c

    return make


def _verify(damage: Callable[[Ctx], Path]) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ["cache", "verify", str(damage(ctx))]


def _train_on(damage: Callable[[Ctx], Path]) -> Callable[[Ctx], list[str]]:
    return lambda ctx: ctx.train_args(caches=[damage(ctx)])


def _locked(ctx: Ctx) -> list[str]:
    run = ctx.copy_run()
    proc = hold_lock(run)
    ctx.monkeypatch.setattr(ctx, "holder", proc, raising=False)
    return ctx.train_args("--steps", "2", out=run)


def _readonly_out(ctx: Ctx) -> list[str]:
    ro = ctx.tmp / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("a read-only folder needs a read-only mount (root) here")
    ctx.monkeypatch.setattr(ctx, "mount", ro, raising=False)
    return [*ctx.extract_args()[:6], str(ro / "sub" / "c.zarr"), *ctx.extract_args()[7:]]


def _sweep(ctx: Ctx, *caches: Path, extra=()) -> list[str]:
    cs = [a for c in caches for a in ("--cache", str(c))]
    return ["sweep", *cs, "--student", str(ctx.student), "--out", str(ctx.out), "--eval", f"t={ctx.test_rows}", "--rows", "3-fixed",
            "--seeds", "0", "--steps", "1", "--eval-limit", "1", *extra]


def _sweep_other_teacher(ctx: Ctx) -> list[str]:
    other = ctx.tmp / "other.zarr"  # a second teacher over another data set: its fingerprint differs
    data = ctx.file("other.jsonl", "".join(ln.replace("Natalia", "Natasha") + "\n" for ln in ctx.rows.read_text().splitlines()))
    extract(ExtractConfig(model=str(ctx.teacher), data=str(data), out=str(other), slots=4, batch_size=4, examples_per_shard=4, trace_fallback="nl"))
    return _sweep(ctx, ctx.cache, other)


CASES = [
    # --- extract: options validated before anything is created (and before the model loads)
    Case("extract --slots 0", lambda c: c.extract_args("--slots", "0"), ("--slots",)),
    Case("extract --lambda 2", lambda c: c.extract_args("--lambda", "2"), ("--lambda",)),
    Case("extract --batch-size 0", lambda c: c.extract_args("--batch-size", "0"), ("--batch-size",)),
    Case("extract --codec float8", lambda c: c.extract_args("--codec", "float8"), ("--codec", "float8")),
    Case("extract --compressor lz4", lambda c: c.extract_args("--compressor", "lz4"), ("--compressor",)),
    Case("extract --examples-per-shard -1", lambda c: c.extract_args("--examples-per-shard", "-1"), ("--examples-per-shard",)),
    Case("extract --on-bad-row maybe", lambda c: c.extract_args("--on-bad-row", "maybe"), ("--on-bad-row",)),
    Case("extract --too-long cut", lambda c: c.extract_args("--too-long", "cut"), ("--too-long",)),
    Case("extract --model missing folder", lambda c: c.extract_args(model=c.tmp / "no-such-model"), ("no-such-model",)),
    Case("extract --data missing file", lambda c: c.extract_args(data=c.tmp / "none.jsonl"), ("none.jsonl",)),
    Case("extract: a row that is not JSON", lambda c: c.extract_args(data=c.file("bad.jsonl", c.rows.read_text() + "{not json\n")),
         ("bad.jsonl", "row 9", "Fix the row", "--on-bad-row skip")),
    Case("eval: a row that is not JSON", lambda c: ["eval", "--run", str(c.copy_run()), "--data", str(c.file("bad.jsonl", c.test_rows.read_text() + "{not json\n"))],
         ("bad.jsonl", "row 5", "Fix the row"), unchanged_run),
    Case("extract --split typo", lambda c: c.extract_args("--split", "tset", data=SHARED_DATA / "gsm8k"), ("--split tset", "pass --split test or train")),
    Case("extract: rows longer than the teacher's context", lambda c: c.extract_args(model=c.short_teacher),
         ("longer than the teacher's context of 64 tokens", "--too-long skip")),
    Case("extract --out is a file", lambda c: [*c.extract_args()[:6], str(c.file("f", "x")), *c.extract_args()[7:]], ("a file is in the way",),
         left_alone("f", "x")),
    Case("extract --out is a foreign folder", _foreign, ("is not a kvkd cache",), left_alone("out/notes.txt", "mine")),
    Case("extract: incompatible re-extract (--offset 1)", _reextract, ("dataset.offset = 0, this run asks for 1",), cache_untouched("c.zarr")),
    Case("extract --out on a read-only file system", _readonly_out, ("not writable", "--out")),
    Case("extract: disk full", lambda c: fail_on_shard(c, OSError(errno.ENOSPC, "No space left on device")) or c.extract_args(),
         ("no space left on the device", "shard 1", "free space, then rerun"), incomplete_cache),
    Case("extract: SIGTERM", lambda c: fail_on_shard(c, signal.SIGTERM) or c.extract_args(),
         ("interrupted at shard 1", "rerun the same command to resume"), incomplete_cache),
    Case("extract: Ctrl-C", lambda c: fail_on_shard(c, signal.SIGINT) or c.extract_args(),
         ("interrupted at shard 1", "rerun the same command to resume"), incomplete_cache, slow=True),
    # --- config files
    Case("config: invalid YAML", _config("train: [steps: 2\n"), ("cfg.yaml",)),
    Case("config: typo'd section trian:", _config("trian:\n  steps: 2\n"), ("trian", "train")),
    Case("config: unknown key stpes", _config("train:\n  stpes: 2\n"), ("stpes", "steps")),
    Case("config: steps: two", _config("train:\n  steps: two\n"), ("steps", "two")),
    Case("config: steps: 2.7", _config("train:\n  steps: 2.7\n"), ("steps", "2.7")),
    Case("config: lr: fast under a --lr flag", lambda c: c.train_args("--config", str(c.file("cfg.yaml", "lr: fast\n")), "--lr", "1e-3"),
         ("cfg.yaml", "lr", "fast")),
    Case("config: missing file", lambda c: c.train_args("--config", str(c.tmp / "nope.yaml")), ("nope.yaml",)),
    # --- train: options and caches
    Case("train without --cache", lambda c: ["train", "--out", str(c.out)], ("--cache",)),
    Case("train --router simlarity", lambda c: c.train_args("--router", "simlarity"), ("--router", "did you mean", "similarity")),
    Case("train --cache missing", lambda c: c.train_args(caches=[c.tmp / "gone.zarr"]), ("gone.zarr",)),
    Case("train on a deleted keys shard", _train_on(_damaged("keys", Path.unlink)), ("array 'keys'", "shard 1", "shard file missing")),
    Case("train on a deleted slot_valid shard", _train_on(_damaged("slot_valid", Path.unlink)), ("array 'slot_valid'", "shard 1")),
    Case("train on an emptied values shard", _train_on(_damaged("values", lambda p: p.write_bytes(b""))), ("array 'values'", "shard 1")),
    Case("train on a flipped byte in hidden", _train_on(_damaged("hidden", flip_byte, 0)), ("array 'hidden'", "shard 0"), no_trained_state),
    Case("train on an incomplete cache", lambda c: c.train_args(caches=[(mark_incomplete(c.copy_cache()), c.tmp / "c.zarr")[1]]),
         ("incomplete",)),
    Case("train on caches of other rows", lambda c: c.train_args(caches=[c.cache, c.cache6]), ("dataset.fingerprint", "rows held:", " 8, ", " 6")),
    Case("train --eval-data overlapping the training rows", lambda c: c.train_args("--eval-data", str(c.rows)), ("--eval-data",)),
    Case("train diverged (--lr 1e10)", lambda c: c.train_args("--lr", "1e10", "--steps", "3", "--max-nonfinite-steps", "0"),
         ("non-finite", "--max-nonfinite-steps"), no_trained_state),
    Case("train: rerun with other options", lambda c: c.train_args("--steps", "2", "--lr", "1e-3", out=c.copy_run()),
         ("--lr", "(recorded)", "--fresh"), unchanged_run),
    Case("train: run folder locked by another trainer", _locked, ("is in use by process", "wait for it to finish"), unchanged_run),
    Case("train: SIGTERM at step 3", lambda c: signal_at_step(c, signal.SIGTERM, 3) or c.train_args("--save-every", "2", steps="4"),
         ("interrupted at step 2 of", "rerun the same command: it resumes from the checkpoint of step 2"), resumable_run),
    Case("train: Ctrl-C at step 3", lambda c: signal_at_step(c, signal.SIGINT, 3) or c.train_args("--save-every", "2", steps="4"),
         ("interrupted at step 2 of", "resumes from the checkpoint of step 2"), resumable_run, slow=True),
    Case("train: disk full at a checkpoint", lambda c: disk_full_at_checkpoint(c) or c.train_args(), ("no space left on the device",), no_trained_state, slow=True),
    # --- eval / export
    Case("eval without --data", lambda c: ["eval", "--run", str(c.copy_run())], ("--data",), unchanged_run),
    Case("eval --run missing", lambda c: ["eval", "--run", str(c.tmp / "norun"), "--data", str(c.test_rows)], ("norun",)),
    Case("eval --mode typo", lambda c: ["eval", "--run", str(c.copy_run()), "--data", str(c.test_rows), "--mode", "latnet"],
         ("--mode", "latent"), unchanged_run),
    Case("eval --answer-check numeric on non-numeric golds", lambda c: ["eval", "--run", str(c.copy_run()), "--data", str(gold_rows(c)),
                                                                        "--answer-check", "numeric"], ("numeric", "r1"), unchanged_run),
    Case("eval of NaN weights", lambda c: (plant_nan(c.copy_run()), ["eval", "--run", str(c.tmp / "run"), "--data", str(c.test_rows)])[1],
         ("non-finite",), lambda c: not list((c.tmp / "run").glob("evals/*/metrics.json")) or None),
    Case("export of NaN weights", lambda c: (plant_nan(c.copy_run()), ["export", "--run", str(c.tmp / "run"), "--out", str(c.out)])[1],
         ("non-finite",)),
    Case("export without --out", lambda c: ["export", "--run", str(c.copy_run())], ("--out",), unchanged_run),
    # --- cache verify: every damaged byte is found and named
    Case("verify a deleted keys shard", _verify(_damaged("keys", Path.unlink)), ("array 'keys'", "shard 1")),
    Case("verify an emptied values shard", _verify(_damaged("values", lambda p: p.write_bytes(b""))), ("array 'values'", "shard 1")),
    Case("verify a flipped byte in hidden", _verify(_damaged("hidden", flip_byte, 0)), ("array 'hidden'", "shard 0")),
    Case("verify a truncated keys shard", _verify(_damaged("keys", truncate)), ("array 'keys'", "shard 1")),
    Case("verify swapped keys shards", _verify(lambda c: (lambda cc: (swap(shard_file(cc, "keys", 0), shard_file(cc, "keys", 1)), cc)[1])(c.copy_cache())),
         ("array 'keys'",)),
    Case("verify a flipped byte in cot_len", _verify(_damaged("cot_len", flip_byte, 0)), ("array 'cot_len'", "shard 0")),
    Case("verify a missing cache", lambda c: ["cache", "verify", str(c.tmp / "gone.zarr")], ("gone.zarr",)),
    # --- sweep
    Case("sweep without --eval", lambda c: ["sweep", "--cache", str(c.cache), "--out", str(c.out)], ("--eval",)),
    Case("sweep on a damaged cache", lambda c: _sweep(c, _damaged("keys", Path.unlink)(c)), ("array 'keys'", "shard 1"), no_sweep_cells),
    Case("sweep on caches of other teachers' data", _sweep_other_teacher, ("fingerprint",), no_sweep_cells, slow=True),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES])
def test_catalogue(case: Case, shared, tmp_path, monkeypatch):
    ctx = Ctx(tmp=tmp_path, monkeypatch=monkeypatch, **shared)
    try:
        argv = case.build(ctx)
        result = runner.invoke(app, argv)
    finally:
        if getattr(ctx, "holder", None) is not None:
            ctx.holder.kill()
            ctx.holder.wait()
        if getattr(ctx, "mount", None) is not None:
            subprocess.run(["umount", "-l", str(ctx.mount)])
    text = result.output
    assert result.exit_code not in (0, None), text
    assert result.exception is None or isinstance(result.exception, SystemExit), (type(result.exception), text)  # nothing escaped
    assert "Traceback" not in text, text
    hits = [ln for ln in text.splitlines() if all(s in ln for s in case.expect)]
    assert hits, f"no one line holds {case.expect}:\n{text}"
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) <= 1, text  # one message, not a wrapped paragraph
    case.left(ctx)


def test_catalogue_is_big_enough():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
