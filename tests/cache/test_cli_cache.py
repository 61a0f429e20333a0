"""`kvkd cache info` / `kvkd cache verify` output: provenance, checksums, each bad chunk listed."""

import json
import shutil
from pathlib import Path

import zarr
from typer.testing import CliRunner

from kvkd.cache import CacheWriter
from kvkd.cache import zarr_adapter as za
from kvkd.cli import app
from tests.cache.helpers import METADATA, TINY, write_all

runner = CliRunner()
PROVENANCE = {"versions": {"torch": "2.13.0", "zarr": "3.1.6"}, "device": {"type": "cpu", "name": "x86_64"}, "host": "h"}


def _cache(url):
    writer = CacheWriter.open(url, TINY, {**METADATA, "provenance": PROVENANCE}, codec="float32")
    write_all(writer)
    writer.finalize()


def test_info_shows_provenance_and_checksums(url):
    _cache(url)
    r = runner.invoke(app, ["cache", "info", url])
    assert r.exit_code == 0, r.output
    assert "torch 2.13.0, zarr 3.1.6" in r.output and "x86_64" in r.output
    assert "crc32c per chunk" in r.output
    info = json.loads(runner.invoke(app, ["cache", "info", url, "--json"]).output)
    assert info["metadata"]["provenance"] == PROVENANCE


def test_verify_lists_each_bad_chunk_and_exits_1(url, tmp_path):
    _cache(url)
    r = runner.invoke(app, ["cache", "verify", url])
    assert r.exit_code == 0 and "cache OK" in r.output and "verify 3/3" in r.output
    arr = zarr.open_group(url, mode="r")["keys"]
    (Path(url) / "keys" / za.shard_key(arr, 2)).unlink()
    path = Path(url) / "values" / za.shard_key(arr, 0)
    data = bytearray(path.read_bytes())
    data[3] ^= 1
    path.write_bytes(bytes(data))
    r = runner.invoke(app, ["cache", "verify", url])
    assert r.exit_code == 1 and "cache OK" not in r.output
    assert "- array 'keys', examples 8-9 (shard 2): shard file missing" in r.output
    assert "- array 'values', example 0 (shard 0): unreadable chunk" in r.output
    assert "Traceback" not in r.output


def test_verify_notes_schema_1(url, tmp_path):
    _cache(url)
    old = str(tmp_path / "old.zarr")
    shutil.copytree(url, old)
    shutil.rmtree(Path(old) / "shard_checksums")
    meta = json.loads((Path(old) / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 1
    del meta["attributes"]["checksums"]
    (Path(old) / "zarr.json").write_text(json.dumps(meta))
    r = runner.invoke(app, ["cache", "verify", old])
    assert r.exit_code == 0 and "no checksums" in r.output and "cache OK (no checksums to check)" in r.output
