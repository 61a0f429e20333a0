"""``extract --out NAME|auto`` through the cache store: the key covers every setting that changes
the bytes and no other, a complete cache is reused without loading the teacher, an incomplete one
is resumed, a name pointing at other settings is refused."""

import dataclasses
import json
import os

import pytest

from kvkd.cache.errors import CacheError
from kvkd.cache.reader import CacheReader
from kvkd.cache.store import cache_key, list_caches
from kvkd.pipeline import extract as ex
from kvkd.pipeline.extract import KEY_IGNORED, ExtractConfig, extract
from kvkd.prompts import PromptTemplate


@pytest.fixture(scope="module")
def rows(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("data")
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:6]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[1:]) + "\n")
    copy = tmp_path_factory.mktemp("elsewhere") / "train.jsonl"  # the same rows at another path
    copy.write_text("\n".join(lines) + "\n")
    recot = [json.loads(x) for x in lines]
    recot[0]["cot"] = "First, read the question. " + recot[0]["cot"]  # same questions and answers, another CoT
    other_cot = tmp_path_factory.mktemp("recot") / "train.jsonl"
    other_cot.write_text("\n".join(json.dumps(r) for r in recot) + "\n")
    return {"file": folder / "train.jsonl", "folder": folder, "copy": copy, "other_cot": other_cot}


def _cfg(rows, tiny_teacher, root, **kw):
    base = dict(model=str(tiny_teacher), data=str(rows["file"]), out="auto", cache_root=str(root), slots=3, batch_size=4, examples_per_shard=2)
    base.update(kw)
    return ExtractConfig(**base)


def _key(cfg):
    data, trace_meta = ex.load_rows(cfg)
    traces, _ = ex.resolve_traces(data.examples, cfg)
    return cache_key(ex.store_key_material(cfg, data, traces, PromptTemplate(), trace_meta))


# every ExtractConfig field that may change the bytes, with a value that does
CHANGES_BYTES = {
    "slots": 4, "lam": 0.5, "codec": "fp16", "compressor": "zstd:5", "examples_per_shard": 3, "dtype": "bfloat16",
    "limit": 4, "offset": 1, "drop_last_step": False, "trace": "equations", "trace_fallback": "nl", "on_bad_row": "skip", "too_long": "skip",
}
# fields that select rows: they reach the key through the rows they select (tested with data below)
SELECTS_ROWS = {"data", "split", "data_format", "model", "keep", "fallback"}


def test_every_option_is_classified():
    names = {f.name for f in dataclasses.fields(ExtractConfig)}
    assert names == set(CHANGES_BYTES) | SELECTS_ROWS | set(KEY_IGNORED), names ^ (set(CHANGES_BYTES) | SELECTS_ROWS | set(KEY_IGNORED))


@pytest.mark.parametrize("field", sorted(CHANGES_BYTES))
def test_a_setting_that_changes_the_bytes_changes_the_key(rows, tiny_teacher, tmp_path, field):
    base = _cfg(rows, tiny_teacher, tmp_path, trace_fallback="nl" if field == "trace" else None)
    changed = dataclasses.replace(base, **{field: CHANGES_BYTES[field]})
    assert _key(changed) != _key(base)


@pytest.mark.parametrize("field,value", [("batch_size", 1), ("device", "cpu"), ("num_threads", 1), ("trust_remote_code", True),
                                         ("num_shards", 2), ("overwrite", True), ("out", "mine"), ("cache_root", "/elsewhere")])
def test_a_setting_that_does_not_change_the_bytes_keeps_the_key(rows, tiny_teacher, tmp_path, field, value):
    base = _cfg(rows, tiny_teacher, tmp_path)
    extra = {"shard_index": 1} if field == "num_shards" else {}
    assert _key(dataclasses.replace(base, **{field: value}, **extra)) == _key(base)


def test_the_key_follows_row_content_not_paths(rows, tiny_teacher, tmp_path, smol_tokenizer_dir):
    from tests.conftest import make_tiny_model

    base = _cfg(rows, tiny_teacher, tmp_path)
    assert _key(dataclasses.replace(base, data=str(rows["copy"]))) == _key(base)  # same rows elsewhere
    assert _key(dataclasses.replace(base, data=str(rows["folder"]), split="train")) == _key(dataclasses.replace(base, data=str(rows["folder"]), split="train"))
    assert _key(dataclasses.replace(base, data=str(rows["folder"]), split="test")) != _key(dataclasses.replace(base, data=str(rows["folder"]), split="train"))
    assert _key(dataclasses.replace(base, data=str(rows["other_cot"]))) != _key(base)  # another CoT: other bytes, one fingerprint
    other = make_tiny_model(tmp_path / "other_teacher", smol_tokenizer_dir, seed=7)
    assert _key(dataclasses.replace(base, model=str(other))) != _key(base)


def _mtimes(folder):
    return {p: os.stat(p).st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_auto_reuses_a_complete_cache_without_loading_the_teacher(rows, tiny_teacher, tmp_path, monkeypatch):
    first = extract(_cfg(rows, tiny_teacher, tmp_path))
    assert first.complete and first.reused is None and first.name.startswith("tiny_teacher") and first.name.endswith(first.key[:8])
    assert first.path == str(tmp_path / "caches" / first.key)
    before = _mtimes(tmp_path)

    def no_load(*a, **k):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(ex, "load_model", no_load)
    again = extract(_cfg(rows, tiny_teacher, tmp_path, batch_size=1))  # batch size does not change the key
    assert again.reused is not None and again.key == first.key and again.name == first.name
    assert again.examples == 6 and again.examples_written == 0 and again.tokens == 0
    assert "@" in again.reused["made_by"] and again.reused["kvkd_version"]
    assert _mtimes(tmp_path) == before  # nothing written
    named = extract(_cfg(rows, tiny_teacher, tmp_path, out="team-cache"))  # another name for the same key
    assert named.reused is not None and named.key == first.key
    assert {r["name"] for r in list_caches(str(tmp_path))} == {first.name, "team-cache"}


def test_a_name_is_never_pointed_at_other_settings(rows, tiny_teacher, tmp_path):
    extract(_cfg(rows, tiny_teacher, tmp_path, out="mine"))
    with pytest.raises(CacheError, match=r"--out mine: that name points at cache \w+ made with compression.slots = 3 where this run has 4"):
        extract(_cfg(rows, tiny_teacher, tmp_path, out="mine", slots=4))
    (only,) = list_caches(str(tmp_path))  # the refused run left no key record behind
    assert CacheReader.open(only["url"]).metadata["compression"]["slots"] == 3


def test_an_incomplete_cache_is_resumed(rows, tiny_teacher, tmp_path):
    calls = []

    def stop_after_first_shard(p):  # batches of 1: done == 3 is inside shard 1, shard 0 is written
        calls.append(p.done)
        if p.done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(ex.ExtractInterrupted):
        extract(_cfg(rows, tiny_teacher, tmp_path, out="half", batch_size=1), on_progress=stop_after_first_shard)
    assert list_caches(str(tmp_path))[0]["status"] == "incomplete"
    done = extract(_cfg(rows, tiny_teacher, tmp_path, out="half"))
    assert done.reused is None and done.complete and done.shards_skipped == 1 and done.shards_written == 2


def test_train_resolves_names_and_keys_through_the_root(rows, tiny_teacher, tmp_path):
    from kvkd.train.options import TrainConfig
    from kvkd.train.trainer import absolute_paths

    s = extract(_cfg(rows, tiny_teacher, tmp_path, out="teacher-a"))
    for spec in ("teacher-a", s.key):
        cfg = absolute_paths(TrainConfig(caches=[spec], cache_root=str(tmp_path), out=str(tmp_path / "run")))
        assert cfg.caches == [str(tmp_path / "caches" / s.key)]
    with pytest.raises(CacheError, match="no cache named 'teacher-b'.*closest: teacher-a"):
        absolute_paths(TrainConfig(caches=["teacher-b"], cache_root=str(tmp_path), out=str(tmp_path / "run")))
