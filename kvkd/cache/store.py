"""The cache store: a cache root (any fsspec URL) where caches are addressed by content.

Layout under a root (a local folder, a shared file system, ``file://``, or an fsspec URL)::

    ROOT/caches/KEY/        one cache (the Zarr v3 group CacheWriter writes)
    ROOT/keys/KEY.json      the key record: the key material, who made it (user@host), when, kvkd version
    ROOT/names/NAME.json    a human name pointing at a key ({"name", "key", "created", "created_by"})

The **key** is the first 16 hex digits of the SHA-256 of the canonical JSON of the *key
material*: everything that changes the bytes an extraction writes (teacher identity, data
fingerprint, traces, prompt, compression settings, codecs, compressor, shard size; see
``kvkd.pipeline.extract.store_key_material``), and nothing that does not (batch size, device,
threads, parallel parts). Two extractions with one key write the same cache, so a complete cache
under a key is reused instead of recomputed. The full material is kept in the key record, so a
(2^-64-unlikely) key collision is refused, not reused.

Records are small JSON objects written atomically (a temporary file renamed, locally; one PUT on
object stores). A name never moves to another key: pointing it elsewhere is refused, naming the
first setting that differs (``kvkd cache rm NAME`` frees it).

This module knows nothing of extraction or training, never prints, and imports no torch.
"""

from __future__ import annotations

import difflib
import getpass
import hashlib
import json
import os
import re
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import fsspec
import numpy as np

from kvkd.cache.errors import CacheError
from kvkd.cache.writer import first_difference
from kvkd.config import group, opt

KEY_SCHEME = 1
"""Version of what the key hashes (bumped when the key material changes meaning)."""
KEY_HEX = 16
CACHES_DIR, KEYS_DIR, NAMES_DIR = "caches", "keys", "names"
AUTO = "auto"
ROOT_ENV = "KVKD_CACHE_ROOT"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_KEY = re.compile(rf"[0-9a-f]{{{KEY_HEX}}}")


@group("cache store")
class StoreArgs:
    """Where named caches live (extract ``--out NAME|auto``, train ``--cache NAME|KEY``).

    Attributes:
        cache_root: a folder or fsspec URL; "" = ``$KVKD_CACHE_ROOT``, else ``$KVKD_HOME/caches``.
    """

    cache_root: str = opt("", help="Cache root (a folder or fsspec URL) holding the caches named by --out NAME|auto and --cache NAME|KEY",
                          default_text="$KVKD_CACHE_ROOT, else $KVKD_HOME/caches")


def default_root(env: dict | None = None) -> str:
    """``$KVKD_CACHE_ROOT`` if set, else ``$KVKD_HOME/caches`` (``~/.cache/kvkd/caches``)."""
    env = os.environ if env is None else env
    if env.get(ROOT_ENV):
        return env[ROOT_ENV]
    home = env.get("KVKD_HOME") or str(Path.home() / ".cache" / "kvkd")
    return str(Path(home) / CACHES_DIR)


def is_name(spec: str) -> bool:
    """True if ``spec`` is a store name (or ``auto``): no slash, no URL scheme, letters, digits, ``._+-``,
    and not ending in ``.zarr`` (``teacher.zarr`` is a folder here, as kvkd's commands always wrote it)."""
    return bool(_NAME.fullmatch(spec)) and spec not in (".", "..") and not spec.endswith(".zarr")


def cache_key(material: dict[str, Any]) -> str:
    """The content key of a cache: 16 hex digits of SHA-256 over the canonical JSON of ``material``.

    Args:
        material: plain JSON (sorted keys, no NaN); ``KEY_SCHEME`` is hashed with it.
    Raises:
        ValueError: ``material`` is not plain JSON.
    """
    try:
        blob = json.dumps({"kvkd_store_key": KEY_SCHEME, "material": material}, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cache key material must be plain JSON: {e}") from None
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_HEX]


def who() -> str:
    """``user@host`` of this process."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class StoreEntry:
    """A cache of a store: where it is and what its records say.

    Attributes:
        key: its content key.
        url: the cache (Zarr group) URL, ``ROOT/caches/KEY``.
        names: the names pointing at it.
        record: its key record (``material``, ``created_by``, ``created``, ``kvkd_version``), {} if none.
    """

    key: str
    url: str
    names: list[str]
    record: dict[str, Any]


class CacheStore:
    """A cache root (see the module docstring).

    Attributes:
        root: the root URL or path as given.
        fs: its fsspec file system; ``path`` the root's path inside it.
    """

    def __init__(self, root: str = ""):
        self.root = (root or default_root()).rstrip("/") or "/"
        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        self.local = "file" in _protocols(self.fs)

    # ---- paths ----------------------------------------------------------------------------------
    def url_of(self, key: str) -> str:
        """The URL of the cache with ``key`` (a plain path for a local root, so claims work)."""
        return f"{self.root}/{CACHES_DIR}/{key}"

    def _p(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    # ---- records --------------------------------------------------------------------------------
    def _read_json(self, path: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise CacheError(f"{self.root}: record {path} is not valid JSON ({e}); remove it or restore it") from None

    def _write_json(self, path: str, record: dict) -> None:
        """Write ``record`` at ``path`` atomically: never half a record."""
        data = json.dumps(record, indent=1, sort_keys=True).encode()
        if self.local:
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def name_record(self, name: str) -> dict | None:
        return self._read_json(self._p(NAMES_DIR, f"{name}.json"))

    def key_record(self, key: str) -> dict | None:
        return self._read_json(self._p(KEYS_DIR, f"{key}.json"))

    def names(self) -> dict[str, str]:
        """Every name of the root -> its key."""
        out = {}
        for p in self._ls(self._p(NAMES_DIR)):
            if p.endswith(".json"):
                rec = self._read_json(p) or {}
                out[Path(p).stem] = rec.get("key", "")
        return dict(sorted(out.items()))

    def keys(self) -> list[str]:
        """Keys with a cache folder or a key record."""
        found = {Path(p).name for p in self._ls(self._p(CACHES_DIR))} | {Path(p).stem for p in self._ls(self._p(KEYS_DIR)) if p.endswith(".json")}
        return sorted(k for k in found if _KEY.fullmatch(k))

    def _ls(self, path: str) -> list[str]:
        try:
            return [e if isinstance(e, str) else e["name"] for e in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def entry(self, key: str) -> StoreEntry:
        return StoreEntry(key, self.url_of(key), [n for n, k in self.names().items() if k == key], self.key_record(key) or {})

    # ---- extraction -----------------------------------------------------------------------------
    def prepare(self, name: str, material: dict[str, Any], auto_name: Callable[[str], str]) -> StoreEntry:
        """The entry an extraction with ``material`` writes (or reuses) under ``name``.

        Writes the key record (if new) and the name record, so the cache is listed while it is
        being written.

        Args:
            name: a store name, or ``auto`` (then ``auto_name(key)`` is used).
            material: the key material (plain JSON).
            auto_name: the name for ``auto`` from the key (e.g. teacher + data + key prefix).
        Raises:
            CacheMismatchError-like CacheError: the name points at a key made with other settings
                (names the first differing setting and the fix), or the key's record holds other
                material (a key collision).
        """
        key = cache_key(material)
        if name == AUTO:
            name = auto_name(key)
        if not is_name(name):
            raise CacheError(f"--out {name!r} is not a store name (letters, digits, ._+-; no slash); give a path with a slash (./{name}) for a folder")
        existing = self.name_record(name)  # refuse before anything is written
        if existing is not None and existing.get("key") != key:
            old = (self.key_record(existing.get("key", "")) or {}).get("material")
            raise CacheError(
                f"--out {name}: that name points at cache {existing.get('key')} made with {_diff_text(old, material)}; "
                f"choose another name (or --out auto), or free it with `kvkd cache rm {name} --yes`")
        record = self.key_record(key)
        if record is None:
            record = {"key": key, "material": material, "created_by": who(), "created": _now(), "kvkd_version": _kvkd_version()}
            self._write_json(self._p(KEYS_DIR, f"{key}.json"), record)
        elif record.get("material") != json.loads(json.dumps(material)):
            raise CacheError(f"{self.root}: key {key} is recorded for other settings ({_diff_text(record.get('material'), material)}); "
                             f"a key collision or a damaged record: remove it with `kvkd cache rm {key} --yes`")
        if existing is None:
            self._write_json(self._p(NAMES_DIR, f"{name}.json"), {"name": name, "key": key, "created": _now(), "created_by": who()})
        return StoreEntry(key, self.url_of(key), [name], record)

    # ---- resolving ------------------------------------------------------------------------------
    def resolve(self, spec: str) -> StoreEntry:
        """A name or key of this root -> its entry.

        Raises:
            CacheError: unknown name/key: one line with the closest names and ``kvkd cache ls``.
        """
        rec = self.name_record(spec)
        if rec is not None:
            return self.entry(rec["key"])
        if _KEY.fullmatch(spec) and (self.fs.exists(self._p(CACHES_DIR, spec)) or self.key_record(spec) is not None):
            return self.entry(spec)
        known = list(self.names()) + self.keys()
        close = difflib.get_close_matches(spec, known, n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else (f"; it has {len(known)} name(s)/key(s)" if known else "; it holds no caches")
        raise CacheError(f"no cache named {spec!r} under cache root {self.root}{hint} (see `kvkd cache ls {self.root}`)")


def resolve_cache(spec: str, root: str = "") -> str:
    """A ``--cache`` value -> the cache URL: an existing local path or any URL/path with a slash
    stays as given; a bare name or key is looked up under the cache root.

    Raises:
        CacheError: an unknown name (naming the closest ones).
    """
    return locate(spec, root)[0]


def live_claims(url: str) -> list[str]:
    """Claims of live writers of the cache at ``url``: ``shard-*`` in its ``.claims/``, in a local
    folder or on an object store with claims (S3). Stale ones (a dead pid on this host) are left
    out; a claim from another host counts as live (it cannot be checked from here)."""
    from kvkd.cache import claims

    where = claims.location(url)
    host = socket.gethostname()
    out = []
    if isinstance(where, claims.RemoteClaims):
        try:
            names = sorted(where.fs.ls(where.root, detail=False))
        except FileNotFoundError:
            return []
        for path in names:
            if not path.rsplit("/", 1)[-1].startswith("shard-"):
                continue
            holder = claims._remote_holder(where, path)
            if holder is None:
                continue
            same_host_dead = bool(holder) and holder.get("host") == host and not claims._pid_alive(int(holder.get("pid", -1)))
            if not same_host_dead:
                out.append(f"{where.url.rsplit('/.claims', 1)[0]}/.claims/{path.rsplit('/', 1)[-1]}")
        return out
    if where is None or not where.is_dir():
        return []
    for p in sorted(where.glob("shard-*")):
        holder = claims._holder(p)
        if holder is not None and not claims._is_stale(p, holder, host):
            out.append(str(p))
    return out


def _protocols(fs) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _kvkd_version() -> str:
    import kvkd

    return kvkd.__version__


def _diff_text(old: Any, new: Any) -> str:
    if old is None:
        return "unknown settings (no key record)"
    diff = first_difference(old, json.loads(json.dumps(new)), keys="both")
    if diff is None:
        return "the same settings"
    path, a, b = diff
    return f"{path} = {_short(a)} where this run has {_short(b)}"


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


# ---- listing, copying, removing ----------------------------------------------------------------
def describe(url: str) -> dict[str, Any]:
    """One cache as ``kvkd cache ls`` shows it, from its metadata and flags (nothing verified).

    Returns:
        dict with ``teacher``, ``data``, ``rows``, ``written``, ``slots``, ``codec``, ``bytes``,
        ``status`` (``complete``, ``incomplete``, ``being written`` (a live claim), ``missing``
        or ``unreadable: ...``), ``created``, ``kvkd_version``.
    """
    from kvkd.cache.reader import CacheReader

    out: dict[str, Any] = {k: None for k in ("teacher", "data", "rows", "written", "slots", "codec", "bytes", "created", "kvkd_version")}
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(f"{path}/zarr.json"):
        return {**out, "status": "missing"}
    try:
        info = CacheReader.open(url, allow_incomplete=True, local_root=None).info()
    except Exception as e:  # noqa: BLE001 - a listing shows a broken cache, it does not stop at it
        return {**out, "status": f"unreadable: {str(e).splitlines()[0][:120]}"}
    meta = info["metadata"]
    teacher, ds = meta.get("teacher") or {}, meta.get("dataset") or {}
    source = str(ds.get("source") or "")
    codec = meta.get("codec") or {}
    status = meta.get("status")
    if live_claims(url):
        status = "being written"
    try:
        nbytes = int(fs.du(path, total=True))
    except (FileNotFoundError, OSError):
        nbytes = info["stored_bytes"]
    return {
        **out,
        "teacher": teacher.get("file_name") or Path(str(teacher.get("spec") or "?")).name,
        "data": "/".join(Path(source).parts[-2:]) + (f":{ds.get('split')}" if ds.get("split") else "") if source else None,
        "rows": info["num_examples"],
        "written": info["num_written"],
        "slots": (meta.get("compression") or {}).get("slots"),
        "codec": codec.get("preset") or codec.get("name"),
        "bytes": nbytes,
        "status": status,
        "created": meta.get("created"),
        "kvkd_version": meta.get("kvkd_version"),
    }


def list_caches(root: str = "") -> list[dict[str, Any]]:
    """Every cache of a root: one dict per (name, key) (a key without a name once, name ``None``).

    Each dict is :func:`describe`'s plus ``name``, ``key``, ``url``, ``created_by`` (from the key
    record) and ``created`` (the key record's when the cache has none).
    """
    store = CacheStore(root)
    by_key: dict[str, list[str]] = {}
    for name, key in store.names().items():
        by_key.setdefault(key, []).append(name)
    rows = []
    for key in sorted(set(store.keys()) | set(by_key)):
        url = store.url_of(key)
        d = describe(url)
        rec = store.key_record(key) or {}
        for name in by_key.get(key) or [None]:
            rows.append({"name": name, "key": key, "url": url, **d, "created_by": rec.get("created_by"),
                         "created": d["created"] or rec.get("created"), "kvkd_version": d["kvkd_version"] or rec.get("kvkd_version")})
    return rows


def locate(spec: str, root: str = "") -> tuple[str, StoreEntry | None]:
    """``NAME|KEY|URL`` -> (cache URL, its store entry or None for a plain path/URL).

    Raises:
        CacheError: an unknown name (naming the closest ones), or a bare name that is both a
            folder here and a name in the root (ambiguous: which one is meant is not guessed).
    """
    if "://" in spec or "::" in spec or not is_name(spec):
        return spec, None
    if os.path.exists(spec):
        store = CacheStore(root)
        if store.fs.exists(store.path) and store.name_record(spec) is not None:
            raise CacheError(f"{spec!r} is both a folder here and a cache name under {store.root}: "
                             f"pass ./{spec} for the folder, or run from another directory for the named cache")
        return spec, None
    entry = CacheStore(root).resolve(spec)
    return entry.url, entry


class CopyVerifyError(CacheError):
    """``copy_cache`` copied every object but the copy fails verification (``problems``, one line each)."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


@dataclass
class CopyResult:
    """What ``copy_cache`` did: ``files_copied``/``files_skipped`` (already there, same size), ``bytes_copied``."""

    src: str
    dst: str
    files_copied: int
    files_skipped: int
    bytes_copied: int
    status: str


_ROOT_META = "zarr.json"


def copy_cache(src: str, dst: str, on_progress: Callable[[int, int], None] | None = None) -> CopyResult:
    """Copy a cache between any two fsspec locations, verified, resumable.

    Order: every data object first, then the ``written`` flags, then the group's ``zarr.json``
    (with status ``incomplete`` while the copy is verified), so a half-copied cache never reads
    as complete. The copy is then verified with the cache's own checksums
    (``CacheReader.verify_report``: every chunk's crc32c, every shard object's size and hash);
    only a sound copy gets the source's status. A rerun skips data shard objects already at ``dst`` with
    the source's size (metadata, flags and checksums are always copied), and recopies any the
    verification found damaged.

    Args:
        src, dst: cache paths or fsspec URLs (``dst`` is created; a previous partial copy there is resumed).
        on_progress: ``on_progress(objects_done, objects_total)``.
    Raises:
        CacheError: ``src`` is not a cache or is being written (a live claim), ``dst`` holds
            another cache, or ``src`` and ``dst`` are the same place.
        CopyVerifyError: the copy fails verification (its ``problems`` name each bad chunk); ``dst``
            is left without its ``zarr.json``, so it does not read as a cache.
    """
    from kvkd.cache.integrity import CHECKSUM_ARRAY
    from kvkd.cache.reader import CacheReader
    from kvkd.cache.schema import FLAG_ARRAY

    source = CacheReader.open(src, allow_incomplete=True, local_root=None)
    if live_claims(src):
        raise CacheError(f"{src} is being written (live claims in its .claims/); copy it once its extraction has finished")
    sfs, spath = fsspec.core.url_to_fs(src)
    dfs, dpath = fsspec.core.url_to_fs(dst)
    spath, dpath = spath.rstrip("/"), dpath.rstrip("/")
    if _protocols(sfs) == _protocols(dfs) and spath == dpath:
        raise CacheError(f"cache cp: source and destination are the same place ({src})")
    if _protocols(sfs) == _protocols(dfs) and (dpath + "/").startswith(spath + "/"):
        raise CacheError(f"cache cp: the destination {dst} is inside the source {src}; choose a destination outside it")
    if {"s3", "s3a"} & set(_protocols(dfs)) and not dfs.exists(dpath.split("/", 1)[0]):
        raise CacheError(f"cache cp: bucket {dpath.split('/', 1)[0]!r} of {dst} does not exist (kvkd never creates buckets); create it or fix the URL")
    src_meta = json.loads(sfs.cat_file(f"{spath}/{_ROOT_META}"))
    if dfs.exists(f"{dpath}/{_ROOT_META}"):
        dst_meta = json.loads(dfs.cat_file(f"{dpath}/{_ROOT_META}"))
        diff = first_difference(_sans_status(dst_meta), _sans_status(src_meta), keys="both")
        if diff:
            raise CacheError(f"{dst} holds another cache ({diff[0]} differs); choose another destination, or remove it with `kvkd cache rm {dst} --yes`")
        dfs.rm_file(f"{dpath}/{_ROOT_META}")  # it reads as no cache until the copy is verified
    rel = sorted(p[len(spath) + 1:] for p in sfs.find(spath) if not _transient(p[len(spath) + 1:]))
    flags = [r for r in rel if r.startswith(f"{FLAG_ARRAY}/")]
    order = [r for r in rel if r != _ROOT_META and r not in flags] + flags
    small = {r for r in order if r.endswith(_ROOT_META) or r.startswith((f"{FLAG_ARRAY}/", f"{CHECKSUM_ARRAY}/"))}  # always copied
    copied, skipped, nbytes = [], [], 0
    for i, r in enumerate(order):
        s, d = f"{spath}/{r}", f"{dpath}/{r}"
        if r not in small and dfs.exists(d) and dfs.size(d) == sfs.size(s):  # a data shard object: verified below
            skipped.append(r)
        else:
            nbytes += _copy_object(sfs, s, dfs, d)
            copied.append(r)
        if on_progress:
            on_progress(i + 1, len(order) + 1)
    status = src_meta.get("attributes", {}).get("status")
    staged = json.loads(json.dumps(src_meta))
    staged.setdefault("attributes", {})["status"] = "incomplete"
    dfs.pipe_file(f"{dpath}/{_ROOT_META}", json.dumps(staged, indent=2).encode())
    problems, bad = _verify_copy(dst)
    again = [r for r in bad if r in skipped]  # an object left from an earlier copy is damaged: copy it once more
    if again:
        for r in again:
            nbytes += _copy_object(sfs, f"{spath}/{r}", dfs, f"{dpath}/{r}")
            skipped.remove(r)
            copied.append(r)
        problems, bad = _verify_copy(dst)
    if problems:
        dfs.rm_file(f"{dpath}/{_ROOT_META}")
        for r in bad:  # so that a rerun copies them again
            if dfs.exists(f"{dpath}/{r}"):
                dfs.rm_file(f"{dpath}/{r}")
        raise CopyVerifyError(f"the copy at {dst} fails verification ({len(problems)} problem(s)); it was not finished: "
                              f"{problems[0]}", problems)
    dfs.pipe_file(f"{dpath}/{_ROOT_META}", sfs.cat_file(f"{spath}/{_ROOT_META}"))
    if on_progress:
        on_progress(len(order) + 1, len(order) + 1)
    return CopyResult(src, dst, len(copied) + 1, len(skipped), nbytes, str(status))


def _copy_object(sfs, s: str, dfs, d: str) -> int:
    """Copy one object between file systems (whole: shard objects are tens of MB); return its bytes."""
    data = sfs.cat_file(s)
    dfs.makedirs(os.path.dirname(d), exist_ok=True)
    dfs.pipe_file(d, data)
    return len(data)


def _verify_copy(dst: str) -> tuple[list[str], list[str]]:
    """``(problems, damaged)`` of a copy: ``verify_report``'s lines (bar the staged status) and the
    shard objects (paths relative to the cache) whose size or hash differs from the recorded digests."""
    from kvkd.cache import zarr_adapter as za
    from kvkd.cache.reader import CacheReader

    reader = CacheReader.open(dst, allow_incomplete=True, local_root=None)
    report = reader.verify_report()
    try:
        flags = reader._read_flags()  # (N,) uint8, as copied
    except CacheError:  # a damaged flags chunk: already among the report's problems
        flags = np.zeros(len(reader), np.uint8)
    damaged = []
    for shard in range(reader.layout.num_shards):
        lo, hi = reader.layout.shard_range(shard)
        if (flags[lo:hi] == 1).all():
            damaged += [f"{p.array}/{za.shard_key(reader.group[p.array], shard)}" for p in reader.shard_problems(shard, full=True)]
    return [p for p in report.problems if not p.startswith("all shards are written but status is")], sorted(set(damaged))


def _sans_status(meta: dict) -> dict:
    attrs = {k: v for k, v in (meta.get("attributes") or {}).items() if k not in ("status", "completed", "updated")}
    return {**meta, "attributes": attrs}


def _transient(rel: str) -> bool:
    """Claims and temporary files are never copied."""
    return rel.startswith(".claims/") or rel.endswith((".partial", ".tmp"))


def remove_cache(spec: str, root: str = "", force: bool = False) -> list[str]:
    """Remove a cache (``NAME|KEY|URL``) with its key record and every name pointing at it.

    Its ``zarr.json`` goes first, so an interrupted removal never leaves something that reads as a cache.

    Args:
        spec: a name or key of the root, or a cache path/URL.
        force: remove an incomplete cache too (a cache with a live claim is never removed).
    Returns:
        what was removed (URLs and record paths).
    Raises:
        CacheError: unknown name (closest ones named), a live claim (being written), status
            not complete without ``force``, or a path that is not a kvkd cache.
    """
    url, entry = locate(spec, root)
    claims_held = live_claims(url)
    if claims_held:
        raise CacheError(f"{spec} is being written (live claim {claims_held[0]}); wait for its extraction to finish or stop it first")
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    removed = []
    if fs.exists(f"{path}/{_ROOT_META}"):
        attrs = json.loads(fs.cat_file(f"{path}/{_ROOT_META}")).get("attributes") or {}
        if "schema_version" not in attrs and not force:
            raise CacheError(f"{url} is a Zarr group but not a kvkd cache; not removed (pass --force to remove it anyway)")
        if attrs.get("status") != "complete" and not force:
            raise CacheError(f"{spec} is {attrs.get('status')!r}, not complete (an extraction may resume it); pass --force to remove it anyway")
        fs.rm_file(f"{path}/{_ROOT_META}")
    elif entry is None:
        raise CacheError(f"no cache at {url}")
    if fs.exists(path):
        fs.rm(path, recursive=True)
        removed.append(url)
    if entry is not None:
        store = CacheStore(root)
        for p in [store._p(KEYS_DIR, f"{entry.key}.json")] + [store._p(NAMES_DIR, f"{n}.json") for n in entry.names]:
            if store.fs.exists(p):
                store.fs.rm_file(p)
                removed.append(p)
    return removed
