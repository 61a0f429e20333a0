"""Shard claims: at most one live writer per shard, enforced on local file systems.

Zarr-python gives no protection against two processes writing one shard (the second silently
overwrites or interleaves with the first). While a ``CacheWriter`` works on shard ``i`` it holds
``{cache}/.claims/shard-{i}``, created with ``O_CREAT | O_EXCL`` and holding JSON
``{"pid", "host", "token", "created"}``:

- If the file exists and its pid is alive on this host (this process included), the shard is
  taken: ``CacheError("another writer holds shard i ...")``.
- If its pid is dead on this host, the claim is stale (a killed writer) and is taken over. The
  take-over re-reads the claim under an ``fcntl.flock`` on ``.claims/.lock`` so that two
  processes cannot both take over one stale claim.
- A claim from another host cannot be checked: it is refused with a message naming the file,
  to delete by hand once that writer is known to be dead.
- The holder removes its claim once the shard's ``written`` flags are set (or the write failed).

Object stores and other non-local fsspec URLs have no exclusive create: there claims are
skipped (``claims_dir`` returns None) and parallel writers must keep to disjoint shards, which
``CacheWriter.pending_shards(part=(index, count))`` hands out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from kvkd.cache.errors import CacheError

CLAIMS_DIR = ".claims"
_UNREADABLE_GRACE_S = 10.0  # a claim file still being written by its creator is briefly empty


def claims_dir(url: str) -> Path | None:
    """``{url}/.claims`` if ``url`` is a local path (plain, ``file://`` or ``local://``), else None."""
    for prefix in ("file://", "local://"):
        if url.startswith(prefix):
            return Path(url[len(prefix):]) / CLAIMS_DIR
    if "://" in url or "::" in url:
        return None
    return Path(url) / CLAIMS_DIR


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class Claim:
    """A held claim on one shard (``path`` is None where claims are not supported)."""

    shard: int
    path: Path | None
    token: str

    def release(self) -> None:
        """Remove the claim file if it is still ours (never someone else's)."""
        if self.path is None:
            return
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (FileNotFoundError, ValueError):
            pass


def _try_create(path: Path, payload: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    return True


def _holder(path: Path) -> dict | None:
    """The claim's content; None if it vanished; {} if unreadable (being written or corrupt)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}


def _is_stale(path: Path, holder: dict, host: str) -> bool:
    if not holder:  # unreadable: stale only once its creator had ample time to write it
        with contextlib.suppress(FileNotFoundError):
            return time.time() - path.stat().st_mtime > _UNREADABLE_GRACE_S
        return False
    return holder.get("host") == host and not _pid_alive(int(holder.get("pid", -1)))


def acquire(directory: Path | None, shard: int) -> Claim:
    """Claim ``shard`` in ``directory`` (None: claims unsupported, returns an inert claim).

    Raises:
        CacheError: if a live writer (this process included) or a writer on another host
            holds the shard.
    """
    token = secrets.token_hex(8)
    if directory is None:
        return Claim(shard, None, token)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"shard-{shard}"
    host = socket.gethostname()
    payload = {"pid": os.getpid(), "host": host, "token": token, "created": time.time()}
    if _try_create(path, payload):
        return Claim(shard, path, token)
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # serialises take-overs; released when the file closes
        holder = _holder(path)
        if holder is not None and not _is_stale(path, holder, host):
            raise CacheError(_held_message(shard, path, holder, host))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale: its writer is dead
        if _try_create(path, payload):
            return Claim(shard, path, token)
    raise CacheError(_held_message(shard, path, _holder(path) or {}, host))


def _held_message(shard: int, path: Path, holder: dict, host: str) -> str:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if holder.get("host", host) != host:
        return (
            f"another writer holds shard {shard} ({who}, claim {path}); its liveness cannot be "
            f"checked from {host}: delete the claim file if that writer is dead"
        )
    return f"another writer holds shard {shard} ({who}, claim {path}); give each writer its own shards"


def remove_claims_dir(directory: Path | None) -> None:
    """Remove the claims directory once no claim is left (called when a cache completes)."""
    if directory is None or not directory.is_dir():
        return
    if any(p.name.startswith("shard-") for p in directory.iterdir()):
        return
    with contextlib.suppress(FileNotFoundError):
        (directory / ".lock").unlink()
    try:
        directory.rmdir()
    except OSError as e:  # a writer raced us and created a claim: leave it
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise
