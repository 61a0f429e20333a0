"""Extraction refuses bad options, bad rows and too-long rows before anything is created, and
recovers from half-created stores, disk-full and interruptions (issue 15)."""

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from kvkd.cache.errors import CacheError, CacheMismatchError
from kvkd.cache.reader import CacheReader
from kvkd.data import DataError
from kvkd.models import load_model
from kvkd.pipeline.extract import ExtractConfig, ExtractInterrupted, extract
from kvkd.train.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def rows(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:6]) + "\n")
    return path


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_model(str(tiny_teacher))


def _cfg(rows, out, model="no-such-model-folder", **kw):
    base = dict(model=str(model), data=str(rows), out=str(out), slots=4, batch_size=4, examples_per_shard=2)
    base.update(kw)
    return ExtractConfig(**base)


@pytest.mark.parametrize("opts, flag", [
    (dict(slots=0), "--slots"), (dict(lam=2.0), "--lambda"), (dict(batch_size=0), "--batch-size"),
    (dict(codec="float8"), "--codec"), (dict(compressor="zstd:x"), "--compressor"), (dict(compressor="lz4"), "--compressor"),
    (dict(examples_per_shard=-1), "--examples-per-shard"), (dict(on_bad_row="maybe"), "--on-bad-row"),
    (dict(too_long="cut"), "--too-long"),
])
def test_invalid_options_refused_before_anything(rows, tmp_path, opts, flag):
    out = tmp_path / "c.zarr"
    with pytest.raises(ValueError, match=flag):  # a model load would raise ModelLoadError instead
        extract(_cfg(rows, out, **opts))
    assert not out.exists()


def test_unwritable_output_refused(rows, tmp_path):
    with pytest.raises(ValueError, match="--out"):
        extract(_cfg(rows, ""))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="a file is in the way"):
        extract(_cfg(rows, tmp_path / "file"))
    with pytest.raises(ValueError, match="is a file, not a folder"):
        extract(_cfg(rows, tmp_path / "file" / "c.zarr"))
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("a read-only folder needs a read-only mount (root) here")
    try:
        with pytest.raises(ValueError, match=rf"folder {ro} is not writable .*choose another --out"):
            extract(_cfg(rows, ro / "sub" / "c.zarr"))
        assert not (ro / "sub").exists()
    finally:
        subprocess.run(["umount", "-l", str(ro)])


def test_incompatible_reextract_refused_before_the_model_loads(rows, tmp_path, teacher):
    out = tmp_path / "c.zarr"
    extract(_cfg(rows, out), loaded=teacher)
    with pytest.raises(CacheMismatchError) as e:
        extract(_cfg(rows, out, offset=1))  # model "no-such-model-folder": never loaded
    msg = str(e.value)
    assert "dataset.offset = 0, this run asks for 1" in msg and "6 rows from offset 0" in msg and "5 rows from offset 1" in msg
    with pytest.raises(CacheMismatchError, match="compression.slots = 4, this run asks for 3"):
        extract(_cfg(rows, out, slots=3))
    changed = tmp_path / "changed.jsonl"
    lines = rows.read_text().splitlines()
    first = json.loads(lines[0])
    first["question"] += " Really?"
    changed.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    with pytest.raises(CacheMismatchError, match="selected_fingerprint.*same selection, different row content"):
        extract(_cfg(changed, out))


def test_provenance_recorded(rows, tmp_path, teacher, tiny_teacher):
    out = tmp_path / "c.zarr"
    extract(_cfg(rows, out), loaded=teacher)
    meta = CacheReader.open(out).metadata
    versions = meta["provenance"]["versions"]
    assert set(versions) >= {"python", "torch", "transformers", "peft", "zarr", "numcodecs", "deepspeed", "kvkd"}
    import torch
    import zarr

    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__
    assert versions["zarr"] == zarr.__version__
    assert meta["provenance"]["device"]["type"] == "cpu"
    from kvkd.models import file_sha256

    weights = sorted(Path(tiny_teacher).glob("*.safetensors"))
    assert weights and len(meta["teacher"]["weights_sha256"]) == 64
    assert meta["teacher"]["weights_sha256"] == load_model(str(tiny_teacher)).info["weights_sha256"]
    assert file_sha256(weights[0])  # the hash covers the weight files' content


def test_bad_row_error_names_flag_and_skip_leaves_it_out(rows, tmp_path, teacher, tiny_student):
    data = tmp_path / "bad.jsonl"
    lines = rows.read_text().splitlines()
    data.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(DataError, match="--on-bad-row skip"):
        extract(_cfg(data, tmp_path / "e.zarr"), loaded=teacher)
    assert not (tmp_path / "e.zarr").exists()
    s = extract(_cfg(data, tmp_path / "s.zarr", on_bad_row="skip"), loaded=teacher)
    assert s.complete and s.examples == 6 and [p["row"] for p in s.problems] == [3]
    meta = CacheReader.open(tmp_path / "s.zarr").metadata["dataset"]
    assert meta["rows"] == 6 and meta["selected_rows"] == 7 and meta["bad_rows"] == [3]
    # training reads the same rows (the skipped one left out again)
    train(TrainConfig(caches=[str(tmp_path / "s.zarr")], out=str(tmp_path / "run"), student=str(tiny_student), steps=1, batch_size=2,
                      lora_r=4, num_workers=0, warmup_steps=0, router="fixed"))


def test_too_long_rows_refused_or_skipped(rows, tmp_path, teacher, tiny_student):
    from dataclasses import replace

    from kvkd.pipeline.extract import resolve_traces, teacher_lengths
    from kvkd.data import load_examples
    from kvkd.prompts import PromptTemplate

    ex = load_examples(str(rows)).examples
    cfg = _cfg(rows, tmp_path / "e.zarr")
    lengths = teacher_lengths(teacher.tokenizer, ex, resolve_traces(ex, cfg)[0], PromptTemplate())
    limit = sorted(lengths)[3]  # rows 4..5 in length order are too long
    long_ids = sorted(e.id for e, n in zip(ex, lengths) if n > limit)
    assert len(long_ids) == 2
    short = replace(teacher, info={**teacher.info, "max_positions": limit})
    with pytest.raises(ValueError, match=rf"2 of 6 rows are longer than the teacher's context of {limit} tokens.*--too-long skip"):
        extract(cfg, loaded=short)
    assert not (tmp_path / "e.zarr").exists()
    s = extract(_cfg(rows, tmp_path / "s.zarr", too_long="skip"), loaded=short)
    assert sorted(s.too_long) == long_ids and s.examples == 4 and s.complete
    r = CacheReader.open(tmp_path / "s.zarr")
    assert sorted(r.metadata["dataset"]["too_long_ids"]) == long_ids and len(r) == 4 and r.verify() == []
    train(TrainConfig(caches=[str(tmp_path / "s.zarr")], out=str(tmp_path / "run"), student=str(tiny_student), steps=1, batch_size=2,
                      lora_r=4, num_workers=0, warmup_steps=0, router="fixed"))


def test_half_created_store_is_resumed(rows, tmp_path, teacher):
    out = tmp_path / "c.zarr"
    out.mkdir()
    leftover = out / "zarr.0123456789abcdef0123456789abcdef.partial"  # killed at the root zarr.json rename
    leftover.write_text("{")
    old = time.time() - 60
    os.utime(leftover, (old, old))
    s = extract(_cfg(rows, out), loaded=teacher)
    assert s.complete and not leftover.exists()
    assert CacheReader.open(out).verify() == []
    assert not list(out.rglob("*.partial"))


def test_foreign_folder_still_refused(rows, tmp_path, teacher):
    out = tmp_path / "c.zarr"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    os.utime(out, (time.time() - 60, time.time() - 60))
    with pytest.raises(CacheError, match="is not a kvkd cache"):
        extract(_cfg(rows, out), loaded=teacher)
    assert (out / "notes.txt").read_text() == "mine"


def _fail_on_shard(monkeypatch, shard_to_fail, exc):
    from kvkd.cache import writer as writer_mod

    real = writer_mod.CacheWriter.write_shard

    def write_shard(self, shard, rows):
        if shard == shard_to_fail:
            raise exc
        return real(self, shard, rows)

    monkeypatch.setattr(writer_mod.CacheWriter, "write_shard", write_shard)


def test_disk_full_is_one_line_and_resumes(rows, tmp_path, teacher, monkeypatch):
    out = tmp_path / "c.zarr"
    _fail_on_shard(monkeypatch, 1, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CacheError, match=rf"no space left on the device writing {out} \(shard 1\): free space, then rerun"):
        extract(_cfg(rows, out), loaded=teacher)
    r = CacheReader.open(out, allow_incomplete=True)
    assert r.metadata["status"] == "incomplete" and list(r._flags) == [1, 1, 0, 0, 0, 0]
    monkeypatch.undo()
    s = extract(_cfg(rows, out), loaded=teacher)
    assert s.complete and s.shards_written == 2 and s.shards_skipped == 1


def test_interrupt_names_the_shard_and_releases_the_claim(rows, tmp_path, teacher, monkeypatch):
    out = tmp_path / "c.zarr"
    _fail_on_shard(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(ExtractInterrupted) as e:
        extract(_cfg(rows, out), loaded=teacher)
    assert e.value.shard == 2 and e.value.out == str(out)
    assert not list((out / ".claims").glob("shard-*"))  # released
    monkeypatch.undo()
    assert extract(_cfg(rows, out), loaded=teacher).complete


def test_tmpfs_disk_full_then_resume(rows, tmp_path, teacher):
    """A real full file system (a 1 MiB tmpfs): one clear error, status incomplete, resume completes."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN)")
    try:
        out = mnt / "c.zarr"
        cfg = _cfg(rows, out, codec="float32", compressor="none", slots=16, examples_per_shard=1)
        with pytest.raises(CacheError, match=f"no space left on the device writing {out}"):
            extract(cfg, loaded=teacher)
        r = CacheReader.open(out, allow_incomplete=True)
        assert r.metadata["status"] == "incomplete" and 0 < int(r._flags.sum()) < 6
        assert r.verify_report().problems[0].endswith("not written: " + ", ".join(str(i) for i in np.flatnonzero(r._flags == 0)[:5]))
        subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
        s = extract(cfg, loaded=teacher)
        assert s.complete and CacheReader.open(out).verify() == []
        assert not list(out.rglob("*.partial"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
