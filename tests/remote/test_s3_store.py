"""The cache store on an S3 root (moto's server): extract into it, reuse without recomputing,
list it, copy S3 -> local -> S3 verified, resolve a name for training."""

from __future__ import annotations

import numpy as np
import pytest

from kvkd.cache.reader import CacheReader
from kvkd.cache.store import copy_cache, list_caches, resolve_cache
from kvkd.pipeline import extract as ex
from kvkd.pipeline.extract import ExtractConfig, extract


@pytest.fixture(scope="module")
def rows(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("data")
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:6]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def _arrays(url):
    r = CacheReader.open(url, local_root=None)
    return r.read(slice(0, len(r)))


def test_s3_root_extract_reuse_ls_cp_and_resolve(rows, tiny_teacher, s3_url, tmp_path, monkeypatch):
    root = f"{s3_url}/root"
    cfg = dict(model=str(tiny_teacher), data=str(rows), cache_root=root, slots=3, batch_size=4, examples_per_shard=2)
    first = extract(ExtractConfig(out="team-tiny", **cfg))
    assert first.reused is None and first.complete and first.examples_written == 6

    def no_load(*a, **k):
        raise AssertionError("a complete cache on S3 must be reused without loading the teacher")

    monkeypatch.setattr(ex, "load_model", no_load)
    again = extract(ExtractConfig(out="team-tiny", **{**cfg, "batch_size": 1}))
    assert again.reused is not None and again.key == first.key and again.examples_written == 0

    (listed,) = list_caches(root)
    assert listed["name"] == "team-tiny" and listed["key"] == first.key and listed["status"] == "complete"
    assert listed["rows"] == 6 and listed["slots"] == 3 and listed["url"].startswith("s3://")
    url = resolve_cache("team-tiny", root)  # what `kvkd train --cache team-tiny --cache-root s3://...` reads
    assert url == listed["url"] and resolve_cache(first.key, root) == url

    local = tmp_path / "copy.zarr"
    down = copy_cache(url, str(local))  # S3 -> local, verified
    assert down.files_copied > 0 and CacheReader.open(str(local)).metadata["status"] == "complete"
    back = f"{s3_url}/back.zarr"
    copy_cache(str(local), back)  # local -> S3, verified
    want = _arrays(url)
    for got in (_arrays(str(local)), _arrays(back)):
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    resumed = copy_cache(str(local), back)  # a rerun skips what is there
    assert resumed.files_skipped > 0


def test_cp_never_creates_a_bucket_nor_copies_into_its_own_source(s3_server, tmp_path):
    import s3fs

    from kvkd.cache.errors import CacheError
    from tests.cache.helpers import METADATA, TINY, write_all
    from kvkd.cache import CacheWriter

    src = str(tmp_path / "src.zarr")
    w = CacheWriter.open(src, TINY, METADATA)
    write_all(w)
    assert w.finalize()
    with pytest.raises(CacheError, match=r"bucket 'no-such-bucket' of s3://no-such-bucket/x.zarr does not exist \(kvkd never creates buckets\)"):
        copy_cache(src, "s3://no-such-bucket/x.zarr")
    assert "no-such-bucket" not in [b.rstrip("/") for b in s3fs.S3FileSystem(skip_instance_cache=True).ls("")]
    with pytest.raises(CacheError, match="is inside the source"):
        copy_cache(src, src + "/sub")
