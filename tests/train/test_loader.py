"""DistillDataset: a batched fetch (one cache read per teacher) equals per-row fetches."""

import functools

import numpy as np
import torch
from torch.utils.data import DataLoader

from kvkd.cache import CacheReader, CacheWriter
from kvkd.data import Example
from kvkd.train.loader import TEACHER_FIELDS, DistillDataset, collate

from ..cache.helpers import METADATA, TINY, write_all


def _caches(tmp_path, k: int) -> list[str]:
    urls = []
    for t in range(k):
        url = str(tmp_path / f"t{t}.zarr")
        writer = CacheWriter.open(url, TINY, METADATA, codec="float16")
        write_all(writer, seed=t)
        assert writer.finalize()
        urls.append(url)
    return urls


def _dataset(tmp_path, smol_tokenizer_dir, k=2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    examples = [Example(id=str(i), question=f"What is {i} + {i}?", cot=f"{i} + {i} = {2 * i}", answer=str(2 * i)) for i in range(TINY.num_examples)]
    return DistillDataset(examples, tok, _caches(tmp_path, k)), tok


def test_getitems_matches_rows(tmp_path, smol_tokenizer_dir):
    ds, _ = _dataset(tmp_path, smol_tokenizer_dir)
    indices = [9, 2, 2, 5, 0]  # shuffled, across shards, with a repeat
    items = ds.__getitems__(indices)
    readers = [CacheReader.open(url) for url in ds.cache_urls]
    assert [it["index"] for it in items] == indices
    for it, i in zip(items, indices):
        assert it["q_ids"] == ds.texts[i].q_ids and it["answer_start"] == ds.texts[i].answer_start
        for t, reader in zip(it["teachers"], readers):
            row = reader.read([i])
            for name in TEACHER_FIELDS:
                np.testing.assert_array_equal(t[name].numpy(), row[name][0])
                assert t[name].dtype == torch.from_numpy(row[name][0:1]).dtype
    single = ds[5]
    for name in TEACHER_FIELDS:
        torch.testing.assert_close(single["teachers"][1][name], items[3]["teachers"][1][name], rtol=0, atol=0)


def test_loader_batches_equal_per_row_collate(tmp_path, smol_tokenizer_dir):
    ds, tok = _dataset(tmp_path, smol_tokenizer_dir, k=3)
    batches = [[3, 7, 1], [0, 9], [4, 4, 8]]
    coll = functools.partial(collate, pad_id=tok.pad_token_id)
    loader = DataLoader(ds, batch_sampler=batches, collate_fn=coll, num_workers=0)
    for idx, got in zip(batches, loader):
        want = coll([ds[i] for i in idx])
        assert got["index"].tolist() == idx
        for key in ("q_ids", "q_mask", "s_ids", "s_mask", "answer_start"):
            assert torch.equal(got[key], want[key])
        assert len(got["teachers"]) == 3
        for g, w in zip(got["teachers"], want["teachers"]):
            for name in TEACHER_FIELDS:
                assert g[name].shape[0] == len(idx)
                assert torch.equal(g[name], w[name])
