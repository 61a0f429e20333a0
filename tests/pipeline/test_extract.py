"""Extraction into a Zarr cache: contents, batch-size invariance, resume after a crash,
refusal to mix options in one store."""

import json

import numpy as np
import pytest

from kvkd.cache.errors import CacheMismatchError
from kvkd.cache.reader import CacheReader
from kvkd.cache.writer import CacheWriter
from kvkd.data import load_examples
from kvkd.pipeline.extract import ExtractConfig, extract


@pytest.fixture(scope="module")
def rows(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:10]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(rows, out, tiny_teacher, **kw):
    base = dict(model=str(tiny_teacher), data=str(rows), out=str(out), slots=4, batch_size=4, examples_per_shard=4)
    base.update(kw)
    return ExtractConfig(**base)


def test_extract_writes_complete_cache_with_metadata(rows, tmp_path, tiny_teacher):
    summary = extract(_cfg(rows, tmp_path / "c.zarr", tiny_teacher))
    assert summary.complete and summary.examples == 10 and summary.shards_written == 3
    assert summary.bytes_stored > 0 and summary.tokens > 0
    r = CacheReader.open(str(tmp_path / "c.zarr"))
    meta = r.metadata
    json.dumps(meta)  # plain JSON
    assert meta["status"] == "complete"
    assert meta["compression"] == {"method": "kava", "slots": 4, "lambda": 0.1, "key_frame": "pre_rope_k_proj"}
    assert meta["dataset"]["fingerprint"] == __import__("kvkd.data", fromlist=["x"]).dataset_fingerprint(load_examples(str(rows)).examples)
    assert meta["dataset"]["trace"] == "nl" and meta["dataset"]["drop_last_step"] is True
    assert meta["teacher"]["num_layers"] == 2 and meta["tokenizer"]["vocab_size"] > 0
    data = r.read(slice(0, 10))
    assert data["keys"].shape == (10, 2, 2, 4, 16)
    assert data["hidden"].shape == (10, 3, 64)
    assert np.all(data["cot_len"] > 0) and np.all(data["answer_len"] > 0)
    # a valid slot points inside the CoT; positions strictly increase
    pos, valid = data["slot_pos"], data["slot_valid"]
    assert np.all(pos[valid] < np.repeat(data["cot_len"], 2 * 2 * 4).reshape(valid.shape)[valid])
    assert np.all(np.diff(pos, axis=-1)[valid[..., 1:]] > 0)
    assert r.verify() == []


def test_batch_size_does_not_change_the_cache(rows, tmp_path, tiny_teacher):
    extract(_cfg(rows, tmp_path / "b1.zarr", tiny_teacher, batch_size=1))
    extract(_cfg(rows, tmp_path / "b4.zarr", tiny_teacher, batch_size=4))
    a = CacheReader.open(str(tmp_path / "b1.zarr")).read(slice(0, 10))
    b = CacheReader.open(str(tmp_path / "b4.zarr")).read(slice(0, 10))
    np.testing.assert_array_equal(a["slot_pos"], b["slot_pos"])
    for name in ("keys", "values", "hidden", "answer_nll", "slot_importance"):
        np.testing.assert_allclose(a[name], b[name], atol=2e-3, rtol=1e-3)


def test_interrupted_extraction_resumes(rows, tmp_path, tiny_teacher, monkeypatch):
    out = tmp_path / "r.zarr"
    real = CacheWriter.write_shard
    calls = []

    def crash_on_second(self, shard, data):
        calls.append(shard)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real(self, shard, data)

    monkeypatch.setattr(CacheWriter, "write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        extract(_cfg(rows, out, tiny_teacher))
    monkeypatch.setattr(CacheWriter, "write_shard", real)
    with pytest.raises(Exception, match="incomplete|resume"):
        CacheReader.open(str(out))  # never reads as valid
    summary = extract(_cfg(rows, out, tiny_teacher))
    assert summary.shards_skipped == 1 and summary.shards_written == 2 and summary.complete
    extract(_cfg(rows, tmp_path / "full.zarr", tiny_teacher))
    a = CacheReader.open(str(out)).read(slice(0, 10))
    b = CacheReader.open(str(tmp_path / "full.zarr")).read(slice(0, 10))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6)


def test_other_options_into_the_same_store_are_refused(rows, tmp_path, tiny_teacher):
    out = tmp_path / "m.zarr"
    extract(_cfg(rows, out, tiny_teacher))
    with pytest.raises(CacheMismatchError, match="lambda"):
        extract(_cfg(rows, out, tiny_teacher, lam=0.5))
    with pytest.raises(CacheMismatchError, match="trace"):
        extract(_cfg(rows, out, tiny_teacher, trace="equations"))
    again = extract(_cfg(rows, out, tiny_teacher))  # same options: nothing to do
    assert again.shards_written == 0 and again.complete
