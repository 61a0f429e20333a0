"""Teacher capture on a tiny random Llama: pre-RoPE keys, importance vs eager attention,
batching/padding invariance."""

import sys

import pytest
import torch

from kvkd.data import Example
from kvkd.models import load_model
from kvkd.pipeline.capture import capture_batch
from kvkd.pipeline.extract import tokenize_teacher
from kvkd.prompts import PromptTemplate

EXAMPLES = [
    Example("a", "Tom has 3 apples and buys 4 more. How many apples?", "", "7"),
    Example("b", "What is 12 times 12?", "", "-1,144.5"),
    Example("c", "Sum 1 and 2.", "", "3"),
]
TRACES = ["3 + 4 = 7 apples.", "12*12=144. So it is 144.", "1+2=3, and the longest trace of the batch, so that its short answer ends the longest row"]


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_model(str(tiny_teacher))


def _batch(teacher, idx):
    return tokenize_teacher(teacher.tokenizer, [EXAMPLES[i] for i in idx], [TRACES[i] for i in idx], PromptTemplate())


def test_spans_decode_to_the_right_text(teacher):
    b = _batch(teacher, [0, 1])
    tok = teacher.tokenizer
    for i, trace in enumerate(TRACES[:2]):
        c0, c1 = b.cot[i].tolist()
        a0, a1 = b.answer[i].tolist()
        assert tok.decode(b.input_ids[i, c0:c1]).strip() == trace
        assert tok.decode(b.input_ids[i, a0:a1]).strip() == EXAMPLES[i].answer
        assert tok.decode(b.input_ids[i, a0 - 3 : a0]).endswith("is: ") or tok.decode(b.input_ids[i, a0 - 3 : a0]).endswith("is:")


def test_pre_rope_keys_are_k_proj_outputs_and_rotate_to_cache_keys(teacher):
    model = teacher.model
    b = _batch(teacher, [0])
    cap = capture_batch(model, b)
    cfg = model.config
    with torch.no_grad():
        out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=True)
        h = model.model.embed_tokens(b.input_ids)
        layer0 = model.model.layers[0]
        k_proj = layer0.self_attn.k_proj(layer0.input_layernorm(h))  # (1, T, H*D)
    D = cfg.head_dim
    k = k_proj.view(1, -1, cfg.num_key_value_heads, D).transpose(1, 2)  # (1, H, T, D)
    c0, c1 = b.cot[0].tolist()
    assert torch.allclose(cap.keys[0, 0, :, : c1 - c0], k[0, :, c0:c1], atol=1e-5)
    # rotating the pre-RoPE keys with the model's RoPE gives the cache's post-RoPE keys
    rope = sys.modules[type(layer0.self_attn).__module__].apply_rotary_pos_emb
    pos = torch.arange(b.input_ids.shape[1])[None]
    cos, sin = model.model.rotary_emb(h, pos)
    _, k_rot = rope(k, k, cos, sin)
    cached = out.past_key_values.layers[0].keys
    assert torch.allclose(k_rot, cached, atol=1e-5)


def test_importance_matches_eager_attention(teacher, tiny_teacher):
    b = _batch(teacher, [0, 1, 2])
    cap = capture_batch(teacher.model, b)
    eager = load_model(str(tiny_teacher)).model
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        att = eager(input_ids=b.input_ids, attention_mask=b.attention_mask, output_attentions=True).attentions
    H_kv = eager.config.num_key_value_heads
    for layer, a in enumerate(att):  # (B, H_q, T, T)
        for i in range(3):
            a0, a1 = b.answer[i].tolist()
            c0, c1 = b.cot[i].tolist()
            ref = a[i, :, a0:a1, c0:c1].mean(1)  # (H_q, Tc)
            ref = ref.reshape(H_kv, -1, c1 - c0).mean(1)
            ref = ref / ref.sum(-1, keepdim=True)
            assert torch.allclose(cap.importance[i, layer, :, : c1 - c0], ref, atol=1e-5)


def test_answer_nll_matches_full_forward(teacher):
    b = _batch(teacher, [1])
    cap = capture_batch(teacher.model, b)
    with torch.no_grad():
        logits = teacher.model(input_ids=b.input_ids).logits[0]
    a0, a1 = b.answer[0].tolist()
    ref = torch.nn.functional.cross_entropy(logits[a0 - 1 : a1 - 1], b.input_ids[0, a0:a1])
    assert torch.allclose(cap.answer_nll[0], ref, atol=1e-4)


def test_batching_and_padding_invariance(teacher):
    together = capture_batch(teacher.model, _batch(teacher, [0, 1, 2]))
    for i in range(3):
        alone = capture_batch(teacher.model, _batch(teacher, [i]))
        n = int(alone.cot_len[0])
        assert int(together.cot_len[i]) == n
        assert torch.allclose(alone.keys[0], together.keys[i, :, :, :n], atol=1e-3)
        assert torch.allclose(alone.values[0], together.values[i, :, :, :n], atol=1e-3)
        assert torch.allclose(alone.importance[0], together.importance[i, :, :, :n], atol=1e-3)
        assert torch.allclose(alone.hidden[0], together.hidden[i], atol=1e-3)
        assert torch.allclose(alone.answer_nll[0], together.answer_nll[i], atol=1e-3)
        assert torch.all(together.keys[i, :, :, n:] == 0)  # CoT padding is zero
