"""Every zarr-python API below the public ``zarr.open_group``/``Array`` surface that kvkd uses.

kvkd needs a few things zarr-python keeps internal: running coroutines on zarr's event loop
(``zarr.core.sync.sync``), the store key of a shard (``metadata.encode_chunk_key``), reading and
deleting one stored object whatever the store (``Array.store_path``), and the layout of a shard's
index. They live here, one function each, so a zarr upgrade that moves them breaks one module;
``tests/cache/test_zarr_adapter.py`` exercises each against the installed zarr and fails with a
message naming the function.

The shard index is read from the stored bytes as the Zarr v3 sharding specification lays it out
(``sharding_indexed`` codec, index at the end, ``bytes`` little-endian + ``crc32c`` index codecs,
which is what kvkd creates): ``chunks_per_shard`` pairs of uint64 ``(offset, nbytes)``, the pair
``(2**64-1, 2**64-1)`` marking an absent chunk, followed by the index's crc32c.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import SuffixByteRequest
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

T = TypeVar("T")
ABSENT = 2**64 - 1
"""Offset and length the sharding spec records for a chunk that is not stored."""


def run_sync(coro: Awaitable[T]) -> T:
    """Run a coroutine on zarr's own event loop (the one its stores are bound to)."""
    return sync(coro)


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """CRC-32C (Castagnoli) of ``data``, as Zarr's ``crc32c`` codec computes it (uint32 as int)."""
    return int(google_crc32c.value(bytes(memoryview(data).cast("B")) if not isinstance(data, bytes) else data))


def checksum_codec() -> Crc32cCodec:
    """The Zarr v3 ``crc32c`` bytes->bytes codec (appends 4 checksum bytes to every chunk)."""
    return Crc32cCodec()


def with_empty_chunks(arr: zarr.Array) -> zarr.Array:
    """``arr`` set to store chunks equal to the fill value too (absent then always means missing)."""
    return arr.with_config({"write_empty_chunks": True})


def shard_key(arr: zarr.Array, shard: int) -> str:
    """Store key (relative to the array) of shard ``shard`` along the first axis of ``arr``."""
    return arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))


def _store_path(arr: zarr.Array, key: str):
    return arr.store_path / key


def read_object(arr: zarr.Array, key: str, suffix: int | None = None) -> bytes | None:
    """Bytes of object ``key`` of ``arr`` (its last ``suffix`` bytes if given); None if absent."""
    byte_range = SuffixByteRequest(suffix) if suffix is not None else None
    buf = run_sync(_store_path(arr, key).get(prototype=default_buffer_prototype(), byte_range=byte_range))
    return None if buf is None else buf.to_bytes()


async def read_objects_async(arr: zarr.Array, keys: list[str], suffix: int | None = None) -> list[bytes | None]:
    """``read_object`` of several keys, concurrently (awaitable on zarr's loop)."""
    import asyncio

    byte_range = SuffixByteRequest(suffix) if suffix is not None else None
    bufs = await asyncio.gather(*(_store_path(arr, k).get(prototype=default_buffer_prototype(), byte_range=byte_range) for k in keys))
    return [None if b is None else b.to_bytes() for b in bufs]


def delete_object(arr: zarr.Array, key: str) -> None:
    """Delete object ``key`` of ``arr`` (no error if absent)."""
    run_sync(_store_path(arr, key).delete())


def getitem_async(arr: zarr.Array, selection: Any) -> Awaitable[Any]:
    """The awaitable of ``arr[selection]`` (to gather many reads on zarr's loop)."""
    return arr.async_array.getitem(selection)


def sharding_config(arr: zarr.Array) -> dict[str, Any] | None:
    """The ``sharding_indexed`` codec configuration of ``arr`` as JSON, or None if unsharded."""
    codecs = arr.metadata.to_dict()["codecs"]
    for c in codecs:
        c = c if isinstance(c, dict) else c.to_dict()
        if c.get("name") == "sharding_indexed":
            return c["configuration"]
    return None


def index_nbytes(chunks_per_shard: int) -> int:
    """Bytes of a shard index of ``chunks_per_shard`` chunks (uint64 pairs + crc32c)."""
    return 16 * chunks_per_shard + 4


def parse_index(tail: bytes, chunks_per_shard: int) -> np.ndarray | None:
    """Chunk ``(offset, nbytes)`` pairs ``(chunks_per_shard, 2)`` uint64 from a shard's last bytes.

    Returns None when ``tail`` is too short or its crc32c does not match (a damaged index).
    """
    n = index_nbytes(chunks_per_shard)
    if tail is None or len(tail) < n:
        return None
    tail = tail[-n:]
    body, stored = tail[:-4], int.from_bytes(tail[-4:], "little")
    if crc32c(body) != stored:
        return None
    return np.frombuffer(body, dtype="<u8").reshape(chunks_per_shard, 2)


def check_layout_supported(arr: zarr.Array) -> str | None:
    """Why kvkd cannot read the shard index of ``arr`` itself, or None if it can."""
    cfg = sharding_config(arr)
    if cfg is None:
        return "not sharded"
    if cfg.get("index_location", "end") != "end":
        return f"shard index at the {cfg['index_location']}"
    names = [c["name"] if isinstance(c, dict) else c.to_dict()["name"] for c in cfg.get("index_codecs", [])]
    if names != ["bytes", "crc32c"]:
        return f"index codecs {names}"
    return None
