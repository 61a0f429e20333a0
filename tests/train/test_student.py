"""The latent student on a tiny random Llama: padding invariance, KV capture, gradients."""

import pytest
import torch

from kvkd.data import Example
from kvkd.train.loader import collate, tokenize_student
from kvkd.train.trainer import TrainConfig, build_student

EXAMPLES = [
    Example("a", "Tom has 3 apples and buys 4 more. How many apples does he have now?", "", "7"),
    Example("b", "What is 12 times 12?", "", "-1,144.5"),
]


@pytest.fixture(scope="module")
def student(tiny_student):
    torch.manual_seed(0)
    return build_student(str(tiny_student), 3, TrainConfig(lora_r=4))


def _batch(student, idx):
    items = []
    for i in idx:
        st = tokenize_student(student.tokenizer, EXAMPLES[i], student.template)
        items.append({"index": i, "q_ids": st.q_ids, "s_ids": st.s_ids, "answer_start": st.answer_start, "teachers": []})
    return collate(items, student.tokenizer.pad_token_id)


def _run(student, b):
    return student(b["q_ids"], b["q_mask"], b["s_ids"], b["s_mask"], b["answer_start"])


def test_answer_boundary_and_special_tokens(student):
    tok = student.tokenizer
    assert tok.convert_tokens_to_ids("<|bot|>") != tok.unk_token_id
    assert student.base.get_input_embeddings().weight.shape[0] >= len(tok)
    st = tokenize_student(tok, EXAMPLES[1], student.template)
    assert tok.decode(st.s_ids[st.answer_start : -1]).strip() == "-1,144.5"
    assert tok.decode(st.s_ids[: st.answer_start]).strip() == "The answer is:"
    assert st.s_ids[-1] == tok.eos_token_id


def test_padding_and_batching_invariance(student):
    both = _run(student, _batch(student, [0, 1]))
    for i in range(2):
        alone = _run(student, _batch(student, [i]))
        assert torch.allclose(alone.hidden[0], both.hidden[i], atol=1e-3)
        assert torch.allclose(alone.keys[0], both.keys[i], atol=1e-3)
        assert torch.allclose(alone.values[0], both.values[i], atol=1e-3)
        assert torch.allclose(alone.answer_nll[0], both.answer_nll[i], atol=1e-3)


def test_latent_kv_shapes_and_gradients(student):
    out = _run(student, _batch(student, [0, 1]))
    L, H, D = student.num_layers, student.num_kv_heads, student.head_dim
    assert out.keys.shape == (2, L, H, 3, D)
    assert out.hidden.shape == (2, L + 1, student.hidden_size)
    student.zero_grad()
    (out.ce + out.keys.pow(2).mean() + out.hidden.pow(2).mean()).backward()
    lora_b = [p.grad for n, p in student.named_parameters() if "lora_B" in n]
    assert lora_b and all(g is not None for g in lora_b) and sum(g.abs().sum() for g in lora_b) > 0  # LoRA A gets 0 on step 1
    assert student.projection.net[0].weight.grad.abs().sum() > 0
    assert student.bot.grad.abs().sum() > 0 and student.eot.grad.abs().sum() > 0


def test_keys_at_latents_come_from_projected_thoughts(student):
    """Only M keys per layer are captured (the latent steps), not the question's."""
    b = _batch(student, [0])
    with torch.no_grad():
        _, _, _, keys, values = student.think(b["q_ids"], b["q_mask"], capture_kv=True)
        keys2 = student.think(b["q_ids"], b["q_mask"], capture_kv=True)[3]
    assert keys.shape[3] == student.num_latents
    assert torch.allclose(keys, keys2)  # deterministic, hooks cleared between calls


def test_generate_is_greedy_and_bounded(student):
    b = _batch(student, [0, 1])
    prompt = torch.tensor(student.tokenizer("The answer is:", add_special_tokens=False)["input_ids"])
    gen = student.generate(b["q_ids"], b["q_mask"], prompt, max_new_tokens=4)
    assert len(gen) == 2 and all(len(g) <= 4 for g in gen)
    again = student.generate(b["q_ids"], b["q_mask"], prompt, max_new_tokens=4)
    assert gen == again


def test_latent_token_rows_are_the_same_at_every_load(tiny_student):
    """The resized embedding rows of <|bot|>/<|eot|> are not checkpointed: a rebuilt student
    (kvkd eval of a run folder) must draw them exactly as the training run did."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvkd.train.student import add_latent_tokens

    rows = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # whatever the global RNG holds
        lm = AutoModelForCausalLM.from_pretrained(tiny_student)
        tok = AutoTokenizer.from_pretrained(tiny_student)
        add_latent_tokens(lm, tok)
        rows.append(lm.get_input_embeddings().weight[-2:].detach().clone())
    assert torch.equal(rows[0], rows[1])
