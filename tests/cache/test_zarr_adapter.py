"""The zarr internals kvkd relies on (``kvkd.cache.zarr_adapter``) still behave as assumed.

A failure here after a zarr upgrade names the adapter function to fix; nothing else in kvkd
touches these APIs.
"""

import numpy as np
import zarr

from kvkd.cache import zarr_adapter as za


def _array(tmp_path, empty_chunks=True):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    return g.create_array("x", shape=(6, 3), dtype="i4", chunks=(1, 3), shards=(3, 3), compressors=[za.checksum_codec()],
                          fill_value=0, config={"write_empty_chunks": empty_chunks})


def test_shard_key_and_objects(tmp_path):
    arr = _array(tmp_path)
    arr[:] = np.arange(18, dtype="i4").reshape(6, 3)
    assert za.shard_key(arr, 1) == "c/1/0", "shard_key: zarr's chunk key encoding changed"
    assert (tmp_path / "g.zarr" / "x" / "c" / "1" / "0").is_file()
    data = za.read_object(arr, za.shard_key(arr, 1))
    assert data == (tmp_path / "g.zarr" / "x" / "c" / "1" / "0").read_bytes(), "read_object"
    assert za.read_object(arr, za.shard_key(arr, 1), suffix=10) == data[-10:], "read_object(suffix=)"
    assert za.run_sync(za.read_objects_async(arr, ["c/0/0", "c/9/0"])) == [za.read_object(arr, "c/0/0"), None], "read_objects_async"
    za.delete_object(arr, za.shard_key(arr, 1))
    assert za.read_object(arr, za.shard_key(arr, 1)) is None, "delete_object"
    za.delete_object(arr, za.shard_key(arr, 1))  # absent: no error
    np.testing.assert_array_equal(za.run_sync(za.getitem_async(arr, slice(0, 2))), [[0, 1, 2], [3, 4, 5]])


def test_shard_index_layout(tmp_path):
    """Index at the end, uint64 (offset, nbytes) per chunk, absent = 2**64-1, then its crc32c."""
    arr = _array(tmp_path, empty_chunks=False)
    assert za.check_layout_supported(arr) is None
    arr[0:3] = np.array([[1, 1, 1], [0, 0, 0], [2, 2, 2]], "i4")  # the zero row is not stored (write_empty_chunks off)
    data = za.read_object(arr, za.shard_key(arr, 0))
    index = za.parse_index(data, 3)
    assert index is not None, "parse_index: index crc32c or size does not match the sharding spec"
    assert (index[1] == za.ABSENT).all() and (index[[0, 2], 1] == 12 + 4).all()  # 3 int32 + crc32c per chunk
    assert za.parse_index(data[:-1], 3) is None and za.parse_index(b"", 3) is None
    full = za.with_empty_chunks(arr)
    full[0:3] = np.array([[1, 1, 1], [0, 0, 0], [2, 2, 2]], "i4")
    assert (za.parse_index(za.read_object(full, za.shard_key(full, 0)), 3)[:, 1] == 16).all(), "with_empty_chunks"


def test_crc32c_matches_zarr_codec(tmp_path):
    arr = _array(tmp_path)
    arr[0:3] = np.array([[7, 8, 9]] * 3, "i4")
    data = za.read_object(arr, za.shard_key(arr, 0))
    chunk = data[:16]  # first chunk: 12 bytes of data + its crc32c
    assert za.crc32c(chunk[:12]) == int.from_bytes(chunk[12:], "little")
    assert za.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
