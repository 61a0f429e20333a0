"""Shard claims: at most one live writer per shard, on local file systems and on S3.

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

On S3 (``s3://``, ``s3a://``) the claim is an object created by S3's conditional write
(``PUT`` with ``If-None-Match: *``, s3fs's ``pipe_file(..., mode="create")``): the second
creator gets HTTP 412, which s3fs raises as ``FileExistsError``. The same rules apply: a live
holder, or one on another host, refuses (the message gives the object's URL and how to remove
it); a claim of a dead pid on this host is taken over. Without a lock file, the take-over is
itself an exclusive create: ``shard-{i}.takeover-{token}`` names the stale claim's token, so
exactly one process takes over a given stale claim (the markers stay until the cache
completes, so a late process cannot take over the new claim by the old token).

Other fsspec URLs (``gs://``, ``az://`` ...) are untested for exclusive create: claims are
skipped there (``location`` returns None) and parallel writers must keep to disjoint shards,
which ``CacheWriter.pending_shards(part=(index, count))`` hands out. ``http(s)://`` is read-only
(``CacheWriter.open`` refuses it).
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
EXCLUSIVE_CREATE_PROTOCOLS = ("s3", "s3a")
"""fsspec protocols whose ``pipe_file(..., mode="create")`` is a real exclusive create (tested)."""
_UNREADABLE_GRACE_S = 10.0  # a claim file still being written by its creator is briefly empty


def claims_dir(url: str) -> Path | None:
    """``{url}/.claims`` if ``url`` is a local path (plain, ``file://`` or ``local://``), else None."""
    for prefix in ("file://", "local://"):
        if url.startswith(prefix):
            return Path(url[len(prefix):]) / CLAIMS_DIR
    if "://" in url or "::" in url:
        return None
    return Path(url) / CLAIMS_DIR


@dataclass(frozen=True)
class RemoteClaims:
    """``{url}/.claims`` on an object store with exclusive create.

    Attributes:
        fs: the fsspec file system (synchronous instance).
        root: the claims prefix inside ``fs`` (no protocol), e.g. ``bucket/c.zarr/.claims``.
        url: the same prefix as a URL, for messages.
    """

    fs: object
    root: str
    url: str

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"


def location(url: str) -> Path | RemoteClaims | None:
    """Where the claims of the cache at ``url`` live: a local folder, an S3 prefix, or None
    (a backend without a tested exclusive create: claims skipped)."""
    local = claims_dir(url)
    if local is not None:
        return local
    if "::" in url or "://" not in url:
        return None
    protocol = url.split("://", 1)[0]
    if protocol not in EXCLUSIVE_CREATE_PROTOCOLS:
        return None
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    root = f"{path.rstrip('/')}/{CLAIMS_DIR}"
    return RemoteClaims(fs, root, f"{protocol}://{root}")


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
    """A held claim on one shard (``path`` is None where claims are not supported; a str
    inside ``remote.fs`` on an object store)."""

    shard: int
    path: Path | str | None
    token: str
    remote: RemoteClaims | None = None

    def release(self) -> None:
        """Remove the claim file if it is still ours (never someone else's)."""
        if self.path is None:
            return
        if self.remote is not None:
            holder = _remote_holder(self.remote, self.path)
            if holder and holder.get("token") == self.token:
                with contextlib.suppress(FileNotFoundError):
                    self.remote.fs.rm_file(self.path)
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


def acquire(directory: Path | RemoteClaims | None, shard: int) -> Claim:
    """Claim ``shard`` in ``directory`` (from ``location``; None: claims unsupported, returns
    an inert claim).

    Raises:
        CacheError: if a live writer (this process included) or a writer on another host
            holds the shard.
    """
    token = secrets.token_hex(8)
    if directory is None:
        return Claim(shard, None, token)
    if isinstance(directory, RemoteClaims):
        return _acquire_remote(directory, shard, token)
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


def _held_message(shard: int, path: Path | str, holder: dict, host: str, remote: bool = False) -> str:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if remote and not holder:
        return (f"shard {shard} has an unreadable claim {path} (not JSON); delete it (e.g. `aws s3 rm {path}`) "
                "if no writer is working on that shard")
    if remote and holder.get("host", host) != host:
        return (
            f"another writer holds shard {shard} ({who}, claim {path}); its liveness cannot be checked from "
            f"{host}: once that writer is known to be dead, delete the claim (e.g. `aws s3 rm {path}`) and retry"
        )
    if holder.get("host", host) != host:
        return (
            f"another writer holds shard {shard} ({who}, claim {path}); its liveness cannot be "
            f"checked from {host}: delete the claim file if that writer is dead"
        )
    return f"another writer holds shard {shard} ({who}, claim {path}); give each writer its own shards"


def _remote_holder(where: RemoteClaims, path: str) -> dict | None:
    """A remote claim's content; None if absent; {} if not JSON (a PUT is atomic: damaged)."""
    try:
        return json.loads(where.fs.cat_file(path))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}


def _create_remote(where: RemoteClaims, path: str, payload: dict) -> bool:
    """Exclusive create of ``path`` (S3 ``If-None-Match: *``); False if it exists."""
    try:
        where.fs.pipe_file(path, json.dumps(payload).encode(), mode="create")
    except FileExistsError:
        return False
    return True


_EXCLUSIVE_CHECKED: set[tuple[int, str]] = set()


def check_exclusive_create(where: RemoteClaims) -> None:
    """Make sure the store refuses a second exclusive create (once per process and prefix).

    Some S3-compatible servers ignore ``If-None-Match: *`` and accept both writes; claims would
    then keep no writer out, silently. A probe object is created twice and removed.

    Raises:
        CacheError: the second create was accepted (names the URL and the workaround).
    """
    key = (os.getpid(), where.root)
    if key in _EXCLUSIVE_CHECKED:
        return
    probe = where.path(f"probe-{secrets.token_hex(8)}")
    try:
        first = _create_remote(where, probe, {"probe": True})
        second = _create_remote(where, probe, {"probe": True})
    finally:
        with contextlib.suppress(FileNotFoundError):
            where.fs.rm_file(probe)
    if first and second:
        raise CacheError(f"{where.url}: this S3 endpoint accepted a second conditional create (If-None-Match: *), so shard "
                         "claims cannot keep two writers apart; use an endpoint with conditional writes (AWS S3, recent MinIO) "
                         "or write locally and copy the finished cache")
    _EXCLUSIVE_CHECKED.add(key)


def _acquire_remote(where: RemoteClaims, shard: int, token: str) -> Claim:
    check_exclusive_create(where)
    path = where.path(f"shard-{shard}")
    host = socket.gethostname()
    payload = {"pid": os.getpid(), "host": host, "token": token, "created": time.time()}
    for _ in range(3):  # a claim released between our create and our read: try again
        if _create_remote(where, path, payload):
            return Claim(shard, path, token, where)
        holder = _remote_holder(where, path)
        if holder is None:
            continue
        stale = bool(holder) and holder.get("host") == host and not _pid_alive(int(holder.get("pid", -1)))
        if not stale:
            raise CacheError(_held_message(shard, f"{where.url}/shard-{shard}", holder, host, remote=True))
        # Stale: exactly one process wins the take-over marker of this claim's token.
        marker = where.path(f"shard-{shard}.takeover-{holder.get('token', 'none')}")
        if not _create_remote(where, marker, payload):
            raise CacheError(f"another writer is taking over the stale claim {where.url}/shard-{shard} "
                             f"(of dead pid {holder.get('pid')} on {host}); give each writer its own shards")
        if (_remote_holder(where, path) or {}).get("token") == holder.get("token"):
            with contextlib.suppress(FileNotFoundError):
                where.fs.rm_file(path)
    raise CacheError(_held_message(shard, f"{where.url}/shard-{shard}", _remote_holder(where, path) or {}, host, remote=True))


def remove_claims_dir(directory: Path | RemoteClaims | None) -> None:
    """Remove the claims directory once no claim is left (called when a cache completes)."""
    if isinstance(directory, RemoteClaims):
        try:
            names = [p.rsplit("/", 1)[-1] for p in directory.fs.ls(directory.root, detail=False, refresh=True)]
        except FileNotFoundError:
            return
        if any(n.startswith("shard-") and ".takeover-" not in n for n in names):
            return  # a claim is held: leave the prefix
        for n in names:
            with contextlib.suppress(FileNotFoundError):
                directory.fs.rm_file(directory.path(n))
        return
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
