"""Remote caches: which URLs are remote, and a local read-through copy of their chunk objects.

A cache on ``s3://`` or ``http(s)://`` is read through zarr's ``FsspecStore`` (s3fs, fsspec's
HTTP file system). Training reads every row several times (epochs, several runs), so
``ReadThroughStore`` keeps each chunk/shard object it downloads in a local folder (by default
under ``$KVKD_HOME/remote``): the first read of an object downloads it whole, once; every later
read, in this process, in another DataLoader worker or in a later run, is served from the
local copy. The group's ``zarr.json`` (status and stamps) is always read from the remote store.

Only caches whose status is ``complete`` are read through (their objects no longer change):
the folder of one cache is keyed by its URL and its ``created``/``completed`` stamps, so a cache
re-extracted at the same URL (``--overwrite``) gets a new folder. A local copy is still never
trusted blindly: ``CacheReader`` checks every shard object against the digests recorded when it
was written on its first read, and on a mismatch drops the local copies of that shard and
downloads them again before reporting damage (``evict``).

Storage options (endpoint, credentials) come from the environment variables the backends
read themselves (for S3: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``; or fsspec's
``FSSPEC_S3_*`` variables), so kvkd passes none.

Fork safety: each process opens its own store (``CacheReader`` reopens by URL when sent to a
DataLoader worker; fsspec drops its cached file-system instances and zarr its event loop in a
forked child), so no s3fs instance is shared between processes. Concurrent downloads of one
object by several processes are safe: each local copy is written to a temporary file and
renamed (zarr's ``LocalStore``).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore, WrapperStore

LOCAL_PROTOCOLS = ("file", "local")


def is_remote(url: str) -> bool:
    """True for an fsspec URL other than a local path (``s3://``, ``http://``, chained ``a::b``)."""
    url = str(url)
    if "::" in url:
        return True
    return "://" in url and url.split("://", 1)[0] not in LOCAL_PROTOCOLS


def default_local_root() -> Path:
    """``$KVKD_HOME/remote`` (default ``~/.cache/kvkd/remote``): local copies of remote caches."""
    from kvkd.models import kvkd_home

    return kvkd_home() / "remote"


def local_folder(root: Path, url: str, attrs: dict[str, Any]) -> Path:
    """The folder of one complete remote cache's local copies under ``root``.

    Keyed by the URL and the cache's ``created`` and ``completed`` stamps (a cache written
    again at the same URL gets a new folder).
    """
    ident = "\n".join([str(url).rstrip("/"), str(attrs.get("created")), str(attrs.get("completed"))])
    return Path(root) / hashlib.sha256(ident.encode()).hexdigest()[:24]


def _slice(buf: Buffer, byte_range: ByteRequest | None) -> Buffer:
    if byte_range is None:
        return buf
    n = len(buf)
    if isinstance(byte_range, RangeByteRequest):
        return buf[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return buf[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return buf[max(n - byte_range.suffix, 0) :]
    raise TypeError(f"unexpected byte range {byte_range!r}")


class ReadThroughStore(WrapperStore):
    """Read-only zarr store: chunk objects from ``store``, copied whole into ``folder`` on first read.

    Args:
        store: the remote store (e.g. zarr's ``FsspecStore`` over s3fs or HTTP), opened read-only.
        folder: local folder of the copies (created on first write).

    The group's ``zarr.json`` (status, stamps) always comes from ``store``; every other key
    (array metadata, chunk and shard objects) is downloaded whole on its first read
    (but for a suffix alone, e.g. a shard index, which is read from ``store`` until a copy exists),
    once per process (concurrent reads of one key wait for the same download), and served from
    the local copy afterwards, with any byte range.
    """

    def __init__(self, store: Any, folder: Path) -> None:
        super().__init__(store)
        self.folder = Path(folder)
        self.local = LocalStore(self.folder)
        self._inflight: dict[str, asyncio.Future] = {}

    def _with_store(self, store: Any) -> ReadThroughStore:
        return type(self)(store, self.folder)

    @property
    def read_only(self) -> bool:
        return True

    @staticmethod
    def _cached(key: str) -> bool:
        return key != "zarr.json"  # the group's own: its status and stamps name this folder

    async def get(self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None) -> Buffer | None:
        prototype = prototype or default_buffer_prototype()
        if not self._cached(key):
            return await self._store.get(key, prototype, byte_range)
        local = await self.local.get(key, prototype, byte_range)
        if local is not None:
            return local
        if isinstance(byte_range, SuffixByteRequest):  # a shard index alone (e.g. check_shards): not worth a whole download
            return await self._store.get(key, prototype, byte_range)
        whole = await self._download(key, prototype)
        return None if whole is None else _slice(whole, byte_range)

    async def _download(self, key: str, prototype: BufferPrototype) -> Buffer | None:
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            whole = await self._store.get(key, prototype)
            if whole is not None:
                await self.local.set(key, whole)
            future.set_result(whole)
            return whole
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._inflight.pop(key, None)

    async def get_partial_values(self, prototype: BufferPrototype, key_ranges) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    def evict(self, prefix: str) -> int:
        """Delete the local copies of keys under ``prefix`` (e.g. one shard); return how many."""
        removed = 0
        target = self.folder / prefix
        paths = [target] if target.is_file() else (list(target.rglob("*")) if target.is_dir() else [])
        for p in paths:
            if p.is_file():
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    async def set(self, key: str, value: Buffer) -> None:
        raise PermissionError(f"{self} is read-only")

    async def delete(self, key: str) -> None:
        raise PermissionError(f"{self} is read-only")

    def __repr__(self) -> str:
        return f"ReadThroughStore({self._store!r}, {str(self.folder)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReadThroughStore) and self._store == other._store and self.folder == other.folder
