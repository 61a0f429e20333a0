"""Fixtures of the eval tests: a small teacher cache of 4 GSM8K-train rows, an eval set that
leaks one of them (same question, other id and case) and a clean one."""

from __future__ import annotations

import json

import pytest

from kvkd.data import load_examples


@pytest.fixture(scope="module")
def cached(tmp_path_factory, shared_data, tiny_teacher):
    from kvkd.pipeline.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("overlap")
    data = root / "train.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:4]) + "\n")
    extract(ExtractConfig(model=str(tiny_teacher), data=str(data), out=str(root / "c.zarr"), slots=2, batch_size=4))
    rows = load_examples(str(data)).examples
    leaked = root / "leaked.jsonl"  # an eval set holding training row 2's question under another id
    leaked.write_text(json.dumps({"id": "test-7", "question": rows[2].question.upper(), "cot": "", "answer": rows[2].answer}) + "\n"
                      + (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[0] + "\n")
    clean = root / "clean.jsonl"
    clean.write_text("\n".join((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]) + "\n")
    return {"cache": str(root / "c.zarr"), "rows": rows, "leaked": str(leaked), "clean": str(clean)}
