"""The real model: SmolLM2-135M-Instruct (packaged GGUF) on a few GSM8K rows through
extract + train + eval. Slow (~1 min on 2 cores); CI runs it."""

import json

import numpy as np
import pytest

from kvkd.cache.reader import CacheReader
from kvkd.eval.evaluate import EvalConfig, evaluate
from kvkd.models import ModelLoadError, load_model, smollm2_gguf_path
from kvkd.pipeline.extract import ExtractConfig, extract
from kvkd.train.trainer import TrainConfig, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    try:
        smollm2_gguf_path()
    except ModelLoadError as err:
        pytest.skip(str(err))
    return load_model("smollm2")


def test_smollm2_extract_train_eval(smol, shared_data, tmp_path):
    assert smol.info["num_layers"] == 30 and smol.info["num_kv_heads"] == 3 and smol.info["head_dim"] == 64
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:4]) + "\n")
    caches = []
    for trace in ("nl", "equations"):
        out = tmp_path / f"{trace}.zarr"
        s = extract(ExtractConfig(model="smollm2", data=str(data), out=str(out), trace=trace, slots=4, batch_size=4), loaded=smol)
        assert s.complete and s.examples == 4
        caches.append(str(out))
    r = CacheReader.open(caches[0])
    rows = r.read(slice(0, 4))
    assert rows["keys"].shape == (4, 30, 3, 4, 64) and rows["hidden"].shape == (4, 31, 576)
    # a real instruct model is far better than chance (ln 49152 = 10.8 nats) at the gold answer after its CoT
    assert float(np.mean(rows["answer_nll"])) < 5.0
    assert r.metadata["teacher"]["source"] == "gguf" and r.metadata["tokenizer"]["vocab_size"] == 49152
    run = tmp_path / "run"
    summary = train(TrainConfig(caches=caches, out=str(run), student="smollm2", steps=2, batch_size=2, num_workers=0, router="similarity"))
    assert summary.steps == 2 and np.isfinite(summary.final_loss)
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(e["kv"]).all() and np.isfinite(e["codi"]).all() for e in log)
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:2]) + "\n")
    res = evaluate(EvalConfig(run=str(run), data=str(test), out=str(tmp_path / "eval")))
    assert res.n == 2 and 0 <= res.accuracy <= 1 and np.isfinite(res.mean_answer_nll)
