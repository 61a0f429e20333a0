"""``kvkd sft`` end to end on a tiny model: CoT-SFT lowers the CoT loss, the loss covers the
target tokens only, No-CoT targets are the answer alone, the exported folder loads with plain
transformers and extracts."""

import json

import pytest
import torch

from kvkd.data import load_examples
from kvkd.sft import SFTConfig, sft, sft_texts, target_loss, tokenize_sft


@pytest.fixture(scope="module")
def rows(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    path.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().split("\n")[:8]) + "\n")
    return path


def test_targets_and_masks(rows, tiny_teacher):
    from transformers import AutoTokenizer

    ex = load_examples(str(rows)).examples[0]
    prompt, target = sft_texts(ex, "cot")
    assert prompt == ex.question + "\n" and target.endswith("\nThe answer is: 72") and "48/2 = 24" in target
    assert sft_texts(ex, "nocot") == (ex.question + "\nThe answer is:", " 72")
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    b = tokenize_sft(tok, [sft_texts(ex, "nocot"), sft_texts(ex, "cot")], 1024)
    n_prompt = len(tok(ex.question + "\nThe answer is:")["input_ids"])
    kept = b["labels"][0][b["labels"][0] != -100].tolist()
    assert kept == tok(" 72", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # the answer and EOS only
    assert (b["labels"][0, :n_prompt] == -100).all() and b["attention_mask"][0].sum() < b["attention_mask"][1].sum()


@pytest.mark.slow  # a few dozen tiny steps plus an extraction
def test_cot_sft_lowers_the_cot_loss_and_exports_a_folder(rows, tmp_path, tiny_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvkd.cache.reader import CacheReader
    from kvkd.pipeline.extract import ExtractConfig, extract

    examples = load_examples(str(rows)).examples
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    before = target_loss(base, tok, examples, "cot")
    s = sft(SFTConfig(model=str(tiny_teacher), data=str(rows), out=str(tmp_path / "run"), mode="cot", steps=12, batch_size=4, lr=3e-3,
                      warmup_steps=0, lora_r=8))
    tuned = AutoModelForCausalLM.from_pretrained(s.model_dir)  # plain transformers, LoRA merged
    after = target_loss(tuned, AutoTokenizer.from_pretrained(s.model_dir), examples, "cot")
    assert after < before - 0.1, (before, after)  # a random tiny model starts near ln(49k) = 10.8 nats; 12 LoRA steps cut it by ~0.25
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and log[-1]["loss"] < log[0]["loss"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["effective_batch"] == 4
    assert not any("lora" in k for k in tuned.state_dict())
    extract(ExtractConfig(model=s.model_dir, data=str(rows), out=str(tmp_path / "c.zarr"), slots=3, batch_size=4))
    assert CacheReader.open(str(tmp_path / "c.zarr")).metadata["status"] == "complete"
    with pytest.raises(ValueError, match="--overwrite"):
        sft(SFTConfig(model=str(tiny_teacher), data=str(rows), out=str(tmp_path / "run"), steps=1))
