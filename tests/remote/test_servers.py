"""The test servers themselves: moto's S3 refuses a second conditional create (HTTP 412, what
kvkd's claims rely on) and the HTTP server answers range requests (what zarr's shard reads use)."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
import zarr


def test_s3_conditional_create_refused_and_zarr_round_trip(s3_server, s3_url):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    path = s3_url.removeprefix("s3://") + "/claim"
    fs.pipe_file(path, b"first", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"second", mode="create")
    assert fs.cat_file(path) == b"first"
    assert any(e[0] == "PUT" and e[2] == 412 for e in s3_server.log.since(0)), "moto answered the refusal with 412"

    g = zarr.open_group(s3_url + "/g", mode="w", zarr_format=3)
    a = g.create_array("a", shape=(8, 4), dtype="f4", chunks=(1, 4), shards=(4, 4))
    a[:] = np.arange(32, dtype="f4").reshape(8, 4)
    back = zarr.open_group(s3_url + "/g", mode="r", zarr_format=3)["a"][:]
    np.testing.assert_array_equal(back, np.arange(32, dtype="f4").reshape(8, 4))


def test_http_server_serves_ranges_read_only(tmp_path, http_server):
    (tmp_path / "obj").write_bytes(bytes(range(100)))
    server = http_server(tmp_path)
    req = urllib.request.Request(server.url + "/obj", headers={"Range": "bytes=-4"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 206 and r.read() == bytes([96, 97, 98, 99])
    req = urllib.request.Request(server.url + "/obj", headers={"Range": "bytes=10-12"})
    with urllib.request.urlopen(req) as r:
        assert r.read() == bytes([10, 11, 12])
    with urllib.request.urlopen(server.url + "/obj") as r:
        assert r.read() == bytes(range(100))
    req = urllib.request.Request(server.url + "/obj", data=b"x", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 501  # http.server has no PUT: read-only
    assert [m for m, *_ in server.log.since(0)] == ["GET", "GET", "GET"]
