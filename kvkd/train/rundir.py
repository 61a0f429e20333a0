"""The run folder of ``kvkd train``: one object owns its files.

::

    RUN/config.json            resolved options + provenance; a resume compares its options with these
    RUN/log.jsonl              one JSON line per optimiser step (rewritten by write-new-then-rename)
    RUN/summary.json           computed from the whole log
    RUN/checkpoints/step-N/    trainable.safetensors + engine state + state.json (written last)
    RUN/.lock                  held (``fcntl.flock``) by the one process training in the folder; holds its pid

Every file is written beside its final name and renamed into place, so a kill or a full disk
never leaves a half-written file that later reads as valid; files get the process's normal
mode (``0666 & ~umask``), safetensors included (safetensors creates them ``0600``).
Checkpoints are complete only once ``state.json`` exists; half-written (``.tmp-step-*``) and
half-deleted (``.del-step-*``) folders are removed when the run is next opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch

CONFIG = "config.json"
LOG = "log.jsonl"
SUMMARY = "summary.json"
LOCK = ".lock"
WEIGHTS = "trainable.safetensors"

# Options a resume may change (everything else defines the run and must equal config.json):
# how long to train, how often to save/report, where and with how many workers/threads it computes,
# permissions (trust_remote_code comes from the flag only) and how the run reports.
RESUMABLE_OPTIONS = (
    "steps", "save_every", "keep_checkpoints", "log_every", "num_workers", "prefetch_factor", "num_threads", "device",
    "deepspeed", "out", "trust_remote_code", "fresh", "max_nonfinite_steps", "report_to", "cache_root",
)  # cache_root: the caches are recorded resolved


class RunFolderError(RuntimeError):
    """A run folder cannot be used as asked (locked, other options, unreadable file); the message
    names the folder or file and the fix."""


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight is NaN/inf (training stops; export/eval refuse the weights)."""


# ----------------------------------------------------------------------------- files
def _umask() -> int:
    """This process's umask, read without changing it (Linux ``/proc``; else the brief set/reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path: str | Path) -> None:
    """Give a file the mode a normal ``open`` would (``0666 & ~umask``), e.g. after safetensors
    created it ``0600``; folders are walked."""
    p = Path(path)
    mode = 0o666 & ~_umask()
    for f in [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]:
        os.chmod(f, mode)


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` by writing ``.path.tmp`` then renaming it over ``path``: a kill or
    a full disk leaves the old file or the new one, never a part."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise disk_error(p, err) from None


def disk_error(path: Path, err: BaseException) -> RunFolderError:
    """One-line error for a failed write, saying "no space left" when the disk is full (torch.save
    reports a full disk as ``unexpected pos ...``)."""
    full = getattr(err, "errno", None) == errno.ENOSPC or "unexpected pos" in str(err)
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(path.parent if not path.is_dir() else path).free < (1 << 20)
    why = "no space left on the device" if full else str(err)
    return RunFolderError(f"could not write {path}: {why}; free space (or fix the cause) and rerun the same command to resume")


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise if any tensor holds NaN/inf.

    Raises:
        NonFiniteError: names ``where`` and up to three bad tensors.
    """
    bad = nonfinite_tensors(tensors)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteError(f"{where} holds non-finite (NaN/inf) weights in {', '.join(bad[:3])}{more}: the run diverged; "
                             "retrain from an earlier checkpoint or with a lower --lr")


# ----------------------------------------------------------------------------- locking
_HELD: dict[str, tuple[int, int]] = {}  # realpath of a lock file -> (fd, depth) held by this process


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "run folder") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``folder/.lock``, ``fcntl.flock``) for the duration.

    The lock dies with its process, so a lock file left by a killed process is simply taken
    over (stale locks need no cleanup). Re-entrant within one process (a sweep cell holds its
    run folder's lock and calls ``train``, which takes it again).

    Raises:
        RunFolderError: another live process holds it (names its pid).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    key = os.path.realpath(path)
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderError(f"{what} {folder} is in use by process {holder} (another `kvkd train` or sweep cell); "
                             "wait for it to finish or stop it, then rerun") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = (fd, 1)
    try:
        yield
    finally:
        _HELD.pop(key, None)
        os.close(fd)  # releases the flock


# ----------------------------------------------------------------------------- the run folder
class RunDir:
    """A ``kvkd train`` run folder (see the module doc for its files).

    Args:
        path: the folder (need not exist yet).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def log_path(self) -> Path:
        return self.path / LOG

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def checkpoints_path(self) -> Path:
        return self.path / "checkpoints"

    def lock(self):
        """Context manager: this process trains in the folder (see :func:`folder_lock`)."""
        return folder_lock(self.path)

    # --- config
    def read_config(self) -> dict | None:
        """The recorded ``config.json``, or None if there is none.

        Raises:
            RunFolderError: the file is not valid JSON (names it).
        """
        if not self.config_path.is_file():
            return None
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as err:
            raise RunFolderError(f"{self.config_path} is not valid JSON ({err}); restore it, or pass --fresh to start the run over") from None

    def write_config(self, resolved: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config_path, json.dumps(resolved, indent=2))

    # --- log
    def read_log(self) -> list[dict]:
        """Every step entry of ``log.jsonl`` (empty if there is none).

        A torn last line (a kill or a full disk mid-write) is dropped with a ``RuntimeWarning``;
        a bad line before the last one is corruption.

        Raises:
            RunFolderError: a line other than the last is not JSON (names the file and line).
        """
        if not self.log_path.is_file():
            return []
        lines = self.log_path.read_text(errors="replace").splitlines()
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        entries = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                if i == last:
                    warnings.warn(f"{self.log_path}: dropped a torn last line ({len(line)} characters; a kill or full disk while it was written)", RuntimeWarning, stacklevel=2)
                    break
                raise RunFolderError(f"{self.log_path} line {i + 1} is not JSON: the log is corrupt; restore it, or pass --fresh to start the run over") from None
        return entries

    def rewrite_log(self, entries: list[dict]) -> None:
        """Replace ``log.jsonl`` by ``entries`` (write-new-then-rename: a kill keeps the old log)."""
        write_atomic(self.log_path, "".join(json.dumps(e) + "\n" for e in entries))

    def truncate_log(self, step: int) -> list[dict]:
        """Keep the entries of steps ``<= step`` (those the checkpoint covers); returns them."""
        kept = [e for e in self.read_log() if e["step"] <= step]
        text = "".join(json.dumps(e) + "\n" for e in kept)
        if not self.log_path.is_file() or self.log_path.read_text(errors="replace") != text:
            self.rewrite_log(kept)
        return kept

    @contextlib.contextmanager
    def log_writer(self):
        """Append step entries: yields ``write(entry: dict)`` (one flushed line each)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as fh:

            def write(entry: dict) -> None:
                try:
                    fh.write(json.dumps(entry) + "\n")
                    fh.flush()
                except OSError as err:
                    raise disk_error(self.log_path, err) from None

            yield write

    # --- summary
    def write_summary(self, summary) -> None:
        data = dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else dict(summary)
        write_atomic(self.summary_path, json.dumps(data, indent=2))

    def read_summary(self) -> dict | None:
        return json.loads(self.summary_path.read_text()) if self.summary_path.is_file() else None

    # --- checkpoints
    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders (``state.json`` present), oldest first."""
        root = self.checkpoints_path
        return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    @staticmethod
    def checkpoint_step(ckpt: Path) -> int:
        return int(json.loads((ckpt / "state.json").read_text())["step"])

    def steps_done(self) -> int:
        """Step of the newest complete checkpoint (0 if none)."""
        ckpt = self.latest_checkpoint()
        return self.checkpoint_step(ckpt) if ckpt else 0

    def remove_partial(self) -> list[Path]:
        """Remove checkpoint folders a kill left half-written or half-deleted; returns them."""
        root = self.checkpoints_path
        if not root.is_dir():
            return []
        gone = [p for p in root.iterdir() if p.is_dir() and (p.name.startswith((".tmp-step-", ".del-step-")) or (p.name.startswith("step-") and not (p / "state.json").is_file()))]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        return gone

    def clear(self) -> None:
        """``--fresh``: remove checkpoints, log, summary and config (the lock file stays)."""
        shutil.rmtree(self.checkpoints_path, ignore_errors=True)
        for p in (self.log_path, self.summary_path, self.config_path):
            p.unlink(missing_ok=True)

    def load_student_state(self, ckpt: Path | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """The student's trained tensors of a checkpoint (default the newest), names without the
        ``student.`` prefix, checked finite.

        Returns:
            ({name: tensor}, checkpoint step).
        Raises:
            FileNotFoundError: no checkpoint.
            NonFiniteError: a tensor holds NaN/inf.
        """
        from safetensors.torch import load_file

        ckpt = ckpt or self.latest_checkpoint()
        if ckpt is None:
            raise FileNotFoundError(f"{self.path} has no checkpoint yet (checkpoints/step-*): train first")
        state = {k[len("student."):]: v for k, v in load_file(str(ckpt / WEIGHTS)).items() if k.startswith("student.")}
        check_finite(state, f"checkpoint {ckpt}")
        return state, self.checkpoint_step(ckpt)


def copy_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], whose: str) -> None:
    """Copy a checkpoint's tensors into a model's parameters (``own``: name -> parameter).

    Raises:
        KeyError: tensors of ``state`` that ``own`` lacks (names three and ``whose`` they are not).
    """
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"checkpoint tensors {unknown[:3]} do not belong to {whose}")
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)


# ----------------------------------------------------------------------------- resume
def _canonical(value):
    return json.loads(json.dumps(value, default=str))


def changed_options(recorded: dict, current: dict, flags: dict[str, str] | None = None) -> list[str]:
    """Options that define a run and differ between ``config.json`` and a resume's config.

    Args:
        recorded: the run's ``config.json``.
        current: the new resolved options (``asdict(TrainConfig)``, paths made absolute).
        flags: field name -> CLI flag, for the message.
    Returns:
        one ``"--flag recorded -> now"`` string per differing option (options in
        :data:`RESUMABLE_OPTIONS` and options a run recorded before they existed are skipped).
    """
    out = []
    for name, value in current.items():
        if name in RESUMABLE_OPTIONS or name not in recorded:
            continue
        old, new = _canonical(recorded[name]), _canonical(value)
        if isinstance(old, float) and isinstance(new, float) and (old == new or (math.isnan(old) and math.isnan(new))):
            continue
        if old != new:
            flag = (flags or {}).get(name, name)
            out.append(f"{flag} {json.dumps(old)} (recorded) -> {json.dumps(new)} (now)")
    return out


def check_resume(recorded: dict, cfg, current: dict | None = None) -> None:
    """Refuse to resume a run with options that define another run.

    Args:
        recorded: the run folder's ``config.json``.
        cfg: the command's config dataclass (``TrainConfig``, ``SFTConfig``); its CLI flags name
            the options in the message.
        current: the options to compare (default ``asdict(cfg)``).
    Raises:
        RunFolderError: names each differing option with both values, the options that may
            change, and ``--fresh``.
    """
    from kvkd.config import cli_options

    flags = {s.name: "--" + s.cli_name for s in cli_options(type(cfg))}
    diff = changed_options(recorded, dataclasses.asdict(cfg) if current is None else current, flags)
    if diff:
        may = ", ".join(flags[n] for n in RESUMABLE_OPTIONS if n in flags and n != "fresh")
        raise RunFolderError(
            f"run folder {cfg.out} holds a run with other options: {'; '.join(diff)}. Resume with the recorded options "
            f"(only {may} may change), use another --out, or pass --fresh to start this folder over"
        )


def resume_point(rundir: RunDir, cfg, lead: bool, check=check_resume) -> tuple[dict | None, int]:
    """Open a locked run folder for a (re)run: ``--fresh`` clears it, a kill's half-written
    checkpoints are removed (both by the lead rank only), and a folder with checkpoints is
    checked against its ``config.json`` (``check(recorded, cfg)``).

    Returns:
        (the recorded config or None, steps done = the newest checkpoint's step, 0 if none or fresh).
    Raises:
        RunFolderError: from ``check`` (other options) or an unreadable ``config.json``.
    """
    if lead:
        if cfg.fresh:
            rundir.clear()
        rundir.remove_partial()
    recorded = rundir.read_config()
    done = 0 if cfg.fresh else rundir.steps_done()
    if recorded is not None and done:
        check(recorded, cfg)
    return recorded, done


# ----------------------------------------------------------------------------- provenance
PROVENANCE_PACKAGES = ("kvkd", "torch", "transformers", "peft", "zarr", "numcodecs", "deepspeed", "safetensors")


def provenance(device: torch.device | str) -> dict:
    """What a run was computed with: library versions (None = not installed), Python, the
    device (CUDA name, or the CPU and torch's thread count), host and UTC start time."""
    import importlib.metadata
    import platform
    import time

    versions = {"python": platform.python_version()}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    device = torch.device(device)
    if device.type == "cuda":
        dev = {"type": "cuda", "name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    else:
        dev = {"type": device.type, "name": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    return {"versions": versions, "device": dev, "host": platform.node(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def record_provenance(resolved: dict, recorded: dict | None, done: int, steps: int, device: torch.device | str) -> dict:
    """Add a run's provenance to its ``config.json`` dict ``resolved`` (in place; returned).

    A new run (no ``recorded`` config or ``done == 0``) records :func:`provenance` as
    ``provenance``; a resume keeps the recorded ``provenance`` and appends ``{"from_step": done,
    "steps": steps, **provenance}`` to ``resumes`` (so each resume's step, ``--steps``, versions
    and device stay on record).
    """
    here = provenance(device)
    if recorded is not None and done:
        resolved["provenance"] = recorded.get("provenance", {})
        resolved["resumes"] = recorded.get("resumes", []) + [{"from_step": done, "steps": steps, **here}]
    else:
        resolved["provenance"] = here
    return resolved
