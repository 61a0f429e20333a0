"""Shared fixtures: tiny random Llama-style models built from configs, the SmolLM2 tokenizer,
and the shared data folder (``../shared/data`` beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not found (expected ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def kvkd_home(tmp_path_factory) -> Path:
    """Keep the converted-GGUF cache in one place for the session (reused across runs if set)."""
    home = os.environ.get("KVKD_HOME") or str(Path.home() / ".cache" / "kvkd")
    return Path(home)


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer saved as a plain folder (from the packaged GGUF)."""
    from transformers import AutoTokenizer

    from kvkd.models import ModelLoadError, smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except ModelLoadError as err:
        pytest.skip(str(err))
    out = tmp_path_factory.mktemp("smol_tok")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(out)
    return out


def make_tiny_model(folder: Path, tokenizer_dir: Path, *, layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, seed=0, vocab_size=None) -> Path:
    """Save a tiny random LlamaForCausalLM (+ the given tokenizer) into ``folder``; ``vocab_size``
    pads the embedding beyond ``len(tokenizer)`` (as many real models do)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, smol_tokenizer_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_teacher"), smol_tokenizer_dir, seed=1)


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, smol_tokenizer_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_student"), smol_tokenizer_dir, seed=2)


# ---- real servers for remote caches (tests/servers.py), 127.0.0.1 only, stopped at the end ----

S3_BUCKET = "kvkd-test"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server for the session, with bucket ``kvkd-test``; ``os.environ`` points s3fs
    at it (``AWS_ENDPOINT_URL_S3`` + dummy credentials, restored at the end). Skips without
    ``moto[server]``/``s3fs`` (the ``test`` extra installs them)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from tests.servers import S3Server

    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    server.create_bucket(S3_BUCKET)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_url(s3_server, request) -> str:
    """A fresh ``s3://kvkd-test/<test>-<random>`` prefix on the session's moto server."""
    import re
    import secrets

    name = re.sub(r"[^A-Za-z0-9-]+", "-", request.node.name)[:60]
    return f"s3://{S3_BUCKET}/{name}-{secrets.token_hex(4)}"


@pytest.fixture
def http_server():
    """Factory: ``http_server(folder)`` serves ``folder`` read-only on 127.0.0.1 (stopped after the test)."""
    from tests.servers import HttpServer

    started = []

    def start(root: Path) -> HttpServer:
        started.append(HttpServer(root).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()
