"""CacheReader: selection order, refusals, torch rows, info, verify, fsspec URLs."""

import numpy as np
import pytest
import torch

from kvkd.cache import CacheError, CacheReader, CacheWriter, get_codec

from .helpers import METADATA, TINY, make_rows, write_all


@pytest.fixture
def complete(url):
    writer = CacheWriter.open(url, TINY, METADATA, codec="float32")
    rows = write_all(writer)
    assert writer.finalize()
    return url, rows


@pytest.mark.parametrize(
    "indices",
    [[9, 1, 1, 5], [2, 3, 4, 5], [-1, 0], slice(3, 9, 2), slice(None), [], np.array([7, 6])],
    ids=["shuffled-repeats", "contiguous-across-shards", "negative", "slice-step", "all", "empty", "numpy"],
)
def test_read_selections(complete, indices):
    url, rows = complete
    out = CacheReader.open(url).read(indices)
    want = np.arange(10)[indices]
    for k in rows:
        np.testing.assert_array_equal(out[k], rows[k][want])
        assert out[k].dtype == rows[k].dtype


def test_read_out_of_range(complete):
    with pytest.raises(IndexError, match="out of range"):
        CacheReader.open(complete[0]).read([10])


def test_row_is_torch(complete):
    url, rows = complete
    row = CacheReader.open(url).row(6)
    assert row["keys"].shape == (2, 3, 4, 8) and row["keys"].dtype == torch.float32
    assert row["hidden"].shape == (3, 16)
    assert row["slot_valid"].dtype == torch.bool and row["slot_pos"].dtype == torch.int32
    assert row["cot_len"].shape == () and int(row["cot_len"]) == rows["cot_len"][6]
    torch.testing.assert_close(row["values"], torch.from_numpy(rows["values"][6]))


def test_file_url_reads_the_same(complete):
    url, rows = complete
    plain, remote = CacheReader.open(url), CacheReader.open(f"file://{url}")
    assert type(remote.group.store).__name__ == "FsspecStore"
    a, b = plain.read([8, 0, 5]), remote.read([8, 0, 5])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert remote.metadata == plain.metadata
    assert remote.info()["stored_bytes"] == plain.info()["stored_bytes"]


def test_refuses_incomplete_and_unwritten(url):
    writer = CacheWriter.open(url, TINY, METADATA)
    writer.write_shard(2, make_rows(TINY, 8, 10))
    with pytest.raises(CacheError, match="'incomplete', not complete: run `kvkd extract` again"):
        CacheReader.open(url)
    reader = CacheReader.open(url, allow_incomplete=True)
    assert reader.read([9])["cot_len"].shape == (1,)
    with pytest.raises(CacheError, match=r"example 4 \(shard 1\).*2 of the requested"):
        reader.read([9, 4, 0])
    with pytest.raises(CacheError, match="no cache at"):
        CacheReader.open(url + "-nope")


def test_info(complete):
    url, _ = complete
    info = CacheReader.open(url).info()
    keys = info["arrays"]["keys"]
    assert keys["shape"] == [10, 2, 3, 4, 8] and keys["dtype"] == "float32"
    assert keys["chunks"] == [1, 2, 3, 4, 8] and keys["shards"] == [4, 2, 3, 4, 8]
    assert keys["codecs"][0]["name"] == "sharding_indexed"
    assert info["arrays"]["written"]["chunks"] == [4] and info["arrays"]["written"]["shards"] is None
    assert info["num_examples"] == info["num_written"] == 10 and info["num_shards"] == 3
    assert info["stored_bytes"] == sum(a["stored_bytes"] for a in info["arrays"].values()) > 0
    assert all(a["stored_bytes"] > 0 for a in info["arrays"].values())
    assert info["bytes_per_example"] == info["stored_bytes"] / 10
    # float32: keys+values 2*2*3*4*8*4 = 1536, hidden 3*16*4 = 192, slots 3*24*4 + 24 = 312, scalars 12 + flag 1
    assert info["uncompressed_bytes_per_example"] == TINY.bytes_per_example(get_codec("float32")) == 2053
    assert info["metadata"]["tokenizer"]["hash"] == "tok-hash-1"


def test_verify_clean_and_broken(url):
    writer = CacheWriter.open(url, TINY, METADATA)
    write_all(writer)
    writer.finalize()
    assert CacheReader.open(url).verify() == []

    broken_url = url + "-broken"
    writer = CacheWriter.open(broken_url, TINY, METADATA)
    writer.write_shard(0, make_rows(TINY, 0, 4))
    rows = make_rows(TINY, 4, 8)
    rows["cot_len"][1:3] = [2, 8]
    rows["slot_valid"][1:3] = True
    rows["slot_pos"][1:3] = np.arange(4, dtype=np.int32)  # (2, L, H_kv, M) all slots kept in order
    # example 5: CoT of 2 tokens but 4 valid slots, at positions up to 3
    rows["slot_pos"][2, 1, 2] = [0, 2, 1, 3]  # example 6: kept slots out of CoT order
    writer.write_shard(1, rows)
    problems = CacheReader.open(broken_url, allow_incomplete=True).verify()
    assert problems[0] == "1 shard(s) not written: 2"
    assert any(p.startswith("slot_valid count != min(cot_len, M): 1 example(s), e.g. 5") for p in problems)
    assert any(p.startswith("slot_pos not increasing on valid slots: 1 example(s), e.g. 6") for p in problems)
    assert any("slot_pos inconsistent with slot_valid/cot_len" in p and "e.g. 5" in p for p in problems)


def _first_cot_len(reader, i):
    return int(reader.row(i)["cot_len"])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_reader_in_worker_processes(complete, context):
    import multiprocessing

    url, rows = complete
    reader = CacheReader.open(url)
    reader.read([0])  # start zarr's event loop in the parent before forking
    with multiprocessing.get_context(context).Pool(2) as pool:
        got = pool.starmap(_first_cot_len, [(reader, i) for i in (1, 9)])
    assert got == [int(rows["cot_len"][1]), int(rows["cot_len"][9])]


def test_runs_split_sorted_indices():
    from kvkd.cache.reader import _runs

    assert _runs(np.array([0, 1, 2, 7, 9, 10])) == [(0, 3), (7, 8), (9, 11)]
    assert _runs(np.array([4])) == [(4, 5)]
    assert _runs(np.arange(3, 9)) == [(3, 9)]


def test_read_scattered_int8_matches_slices(url):
    """Scattered rows of a codec with a companion array (keys_scale) equal the one-row reads."""
    writer = CacheWriter.open(url, TINY, METADATA, codec="int8")
    write_all(writer)
    assert writer.finalize()
    reader = CacheReader.open(url)
    got = reader.read([8, 0, 5, 6, 0])
    for j, i in enumerate([8, 0, 5, 6, 0]):
        one = reader.read(slice(i, i + 1))
        for k in got:
            np.testing.assert_array_equal(got[k][j], one[k][0])


def test_a_shard_removed_while_the_cache_is_being_read_is_an_error_not_zeros(complete):
    url, rows = complete
    r = CacheReader.open(url)
    np.testing.assert_array_equal(r.read([0, 1])["keys"], rows["keys"][:2])  # shard 0 checked and read
    shard_file = __import__("pathlib").Path(url, "keys", "c", "0", "0", "0", "0", "0")  # keys (n, L, H, M, D): shard 0
    assert shard_file.is_file()
    shard_file.unlink()  # `kvkd cache rm` (or anything) under a running reader
    with pytest.raises(CacheError, match=r"array 'keys', examples 0-3 \(shard 0\): its shard file was removed while this process was reading"):
        r.read([1])
    assert r.read([5])["keys"].shape[0] == 1  # the other shards still read
