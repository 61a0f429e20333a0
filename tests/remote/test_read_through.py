"""The local read-through copy of a remote cache: downloaded once, re-downloaded when damaged,
kept apart per cache version, never used for incomplete caches or by verify."""

from __future__ import annotations

import numpy as np

from kvkd.cache import CacheReader, CacheWriter
from kvkd.cache import remote
from tests.cache.helpers import METADATA, TINY, make_rows


def _write(url: str, seed: int = 0, finalize: bool = True) -> None:
    writer = CacheWriter.open(url, TINY, METADATA, overwrite=True)
    for shard in writer.pending_shards():
        writer.write_shard(shard, make_rows(TINY, *TINY.shard_range(shard), seed=seed))
    if finalize:
        assert writer.finalize()


def test_damaged_local_copy_is_downloaded_again(s3_server, s3_url, tmp_path):
    _write(s3_url)
    first = CacheReader.open(s3_url, local_root=tmp_path)
    want = first.read(slice(None))
    copies = [p for p in tmp_path.rglob("*") if p.is_file() and "/hidden/c/" in p.as_posix()]
    assert len(copies) == TINY.num_shards  # one local copy per shard object read
    data = bytearray(copies[0].read_bytes())
    data[len(data) // 3] ^= 0xFF
    copies[0].write_bytes(bytes(data))  # the local disk flipped a bit
    mark = s3_server.log.mark()
    again = CacheReader.open(s3_url, local_root=tmp_path).read(slice(None))
    for name in want:
        np.testing.assert_array_equal(again[name], want[name], err_msg=name)
    refetched = {p for _, p, _, _, rng in s3_server.log.since(mark, "GET", r"/c/") if not rng}
    assert refetched == {f"/{s3_url.removeprefix('s3://')}/hidden/{copies[0].relative_to(tmp_path).as_posix().split('/hidden/', 1)[1]}"}


def test_rewritten_cache_gets_its_own_copies_and_incomplete_ones_none(s3_url, tmp_path):
    _write(s3_url, seed=0)
    old = CacheReader.open(s3_url, local_root=tmp_path).read([0])["keys"]
    _write(s3_url, seed=1)  # --overwrite at the same URL: new created/completed stamps
    new = CacheReader.open(s3_url, local_root=tmp_path)
    assert not np.array_equal(new.read([0])["keys"], old)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    _write(s3_url + "-partial", finalize=False)
    partial = CacheReader.open(s3_url + "-partial", allow_incomplete=True, local_root=tmp_path)
    assert not isinstance(partial.group.store, remote.ReadThroughStore)


def test_is_remote():
    assert remote.is_remote("s3://b/c") and remote.is_remote("http://h/c") and remote.is_remote("simplecache::s3://b/c")
    assert not remote.is_remote("/tmp/c") and not remote.is_remote("file:///tmp/c") and not remote.is_remote("c.zarr")
