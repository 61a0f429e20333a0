"""Reading caches from S3 (moto's server) and read-only HTTP: ``kvkd cache info/verify``,
``kvkd train`` (DataLoader workers too), the local read-through copy (a second pass and a
second run download nothing), and one flipped byte in one chunk reported exactly, on S3 and
on a local folder."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from kvkd.cache import CacheError
from kvkd.cache import zarr_adapter as za
from kvkd.cli import app
from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.train.trainer import TrainConfig, train
from tests.conftest import S3_BUCKET

runner = CliRunner()
DATA_ARRAY = r"/(keys|values|hidden|keys_scale|values_scale|hidden_scale|slot_\w+|cot_len|answer_\w+)/c/"


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, shared_data, tiny_teacher) -> Path:
    root = tmp_path_factory.mktemp("remote_read")
    data = root / "train.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    out = root / "site" / "t.zarr"
    extract(ExtractConfig(model=str(tiny_teacher), data=str(data), out=str(out), slots=4, batch_size=4, examples_per_shard=4, trace_fallback="nl"))
    return out


@pytest.fixture
def s3_cache(local_cache, s3_url) -> str:
    """The same cache copied object by object to a fresh S3 prefix."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    url = f"{s3_url}/t.zarr"
    for f in local_cache.rglob("*"):
        if f.is_file():
            fs.pipe_file(f"{url.removeprefix('s3://')}/{f.relative_to(local_cache).as_posix()}", f.read_bytes())
    return url


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVKD_HOME", str(tmp_path / "home"))  # the read-through copies of this test only


def _train(url, out, tiny_student, workers=0, steps=2):
    return train(TrainConfig(caches=[str(url)], out=str(out), student=str(tiny_student), steps=steps, batch_size=4, lora_r=4,
                             num_workers=workers, warmup_steps=1, router="fixed"))


def _ok(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r.output


def test_info_and_verify_from_s3_and_http(local_cache, s3_cache, http_server):
    server = http_server(local_cache.parent)
    for url in (s3_cache, f"{server.url}/t.zarr"):
        info = json.loads(_ok(["cache", "info", url, "--json"]))
        assert info["num_written"] == 8 and info["url"] == url and info["metadata"]["status"] == "complete"
        assert "cache OK" in _ok(["cache", "verify", url])


def test_train_from_s3_reads_through_local_copy(s3_server, s3_cache, tmp_path, tiny_student):
    mark = s3_server.log.mark()
    _train(s3_cache, tmp_path / "run1", tiny_student, steps=4)  # 8 rows, batches of 4: two passes
    gets = s3_server.log.since(mark, "GET", DATA_ARRAY)
    whole = Counter(path for _, path, _, _, rng in gets if not rng)
    assert whole and max(whole.values()) == 1, whole  # every object downloaded whole once, over both passes
    mark = s3_server.log.mark()
    _train(s3_cache, tmp_path / "run2", tiny_student, steps=2)
    assert s3_server.log.since(mark, "GET", DATA_ARRAY) == []  # a second run reads the local copy only
    assert s3_server.log.since(mark, "GET", r"/t\.zarr/zarr\.json$")  # ... but the group metadata (status) from S3


def test_train_from_s3_with_dataloader_workers(s3_cache, tmp_path, tiny_student):
    summary = _train(s3_cache, tmp_path / "run", tiny_student, workers=2, steps=2)  # forked workers, one s3fs each
    assert (tmp_path / "run" / "log.jsonl").read_text().count("\n") == 2, summary


def test_train_from_http(local_cache, http_server, tmp_path, tiny_student):
    server = http_server(local_cache.parent)
    _train(f"{server.url}/t.zarr", tmp_path / "run", tiny_student, workers=1, steps=2)
    assert (tmp_path / "run" / "log.jsonl").read_text().count("\n") == 2
    assert any(path.startswith("/t.zarr/keys/c/") for _, path, *_ in server.log.since(0, "GET"))


def _chunk_span(shard_bytes: bytes, chunks_per_shard: int, i: int) -> tuple[int, int]:
    index = za.parse_index(shard_bytes[-za.index_nbytes(chunks_per_shard):], chunks_per_shard)
    return int(index[i, 0]), int(index[i, 1])


def _flip(data: bytes, example_in_shard: int) -> bytes:
    offset, n = _chunk_span(data, 4, example_in_shard)
    out = bytearray(data)
    out[offset + n // 2] ^= 0x10  # inside that one chunk's data
    return bytes(out)


@pytest.mark.parametrize("backend", ["s3", "local"])
def test_flipped_byte_in_one_chunk_reported_exactly(backend, local_cache, s3_cache, tmp_path, tiny_student):
    import s3fs

    key = za.shard_key(zarr.open_group(str(local_cache), mode="r")["hidden"], 1)
    if backend == "s3":
        url, fs = s3_cache, s3fs.S3FileSystem(skip_instance_cache=True)
        obj = f"{s3_cache.removeprefix('s3://')}/hidden/{key}"
        fs.pipe_file(obj, _flip(fs.cat_file(obj), 2))  # example 6 = 3rd chunk of shard 1
    else:
        url = str(tmp_path / "c.zarr")
        shutil.copytree(local_cache, url)
        path = Path(url) / "hidden" / key
        path.write_bytes(_flip(path.read_bytes(), 2))
    r = runner.invoke(app, ["cache", "verify", url])
    assert r.exit_code == 1 and "Traceback" not in r.output
    problems = [line for line in r.output.splitlines() if line.startswith("- ")]
    chunk = [p for p in problems if "example" in p and "unreadable chunk" in p]
    assert len(chunk) == 1 and chunk[0].startswith("- array 'hidden', example 6 (shard 1): unreadable chunk"), r.output
    assert all("(shard 1)" in p and "'hidden'" in p for p in problems), r.output
    with pytest.raises(CacheError) as e:
        _train(url, tmp_path / "run", tiny_student, steps=2)
    msg = str(e.value)
    assert "\n" not in msg and msg.count("array 'hidden', example 6 (shard 1): unreadable chunk") == 1, msg
    assert not (tmp_path / "run").exists(), sorted(p.name for p in (tmp_path / "run").iterdir())


def test_an_unreachable_s3_endpoint_is_one_line_not_a_traceback(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**__import__("os").environ, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_MAX_ATTEMPTS": "1", "KVKD_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", "from kvkd.cli import main; main()", "cache", "info", "s3://no-bucket/t.zarr"],
                       capture_output=True, text=True, env=env, timeout=120)
    out = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert len(out) == 1 and out[0].startswith("error: cannot reach the storage endpoint") and f"127.0.0.1:{port}" in out[0], out
