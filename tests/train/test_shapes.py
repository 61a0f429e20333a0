"""Teachers of three shapes and two tokenizers, one student of a fourth shape: extract, plan,
train with two routers, evaluate; projections get gradients and change without shrinking the
targets; a checkpoint reload gives the same loss on the same batch; the answer boundary is
right under both tokenizers; modes that need one tokenizer refuse a mismatch by name."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kvkd.cache.errors import CacheMismatchError
from kvkd.cache.reader import CacheReader
from kvkd.cli import app
from kvkd.data import build_trace, load_examples
from kvkd.eval.evaluate import EvalConfig, evaluate
from kvkd.pipeline.extract import ExtractConfig, extract, tokenize_teacher
from kvkd.plan import plan_extraction
from kvkd.prompts import PromptTemplate
from kvkd.train.loader import DistillDataset, collate, tokenize_student
from kvkd.train.trainer import TrainConfig, build_trainee, distill_step, open_teachers, train

from ..conftest import make_tiny_model

SHAPES = {  # teachers a, b (the student's tokenizer), c (its own tokenizer); the student
    "a": dict(layers=2, heads=2, kv_heads=2, head_dim=16, hidden=64),
    "b": dict(layers=6, heads=4, kv_heads=4, head_dim=32, hidden=96),
    "c": dict(layers=4, heads=2, kv_heads=1, head_dim=64, hidden=48, vocab_size=448),  # embedding padded past len(tokenizer)=400
    "student": dict(layers=3, heads=4, kv_heads=2, head_dim=24, hidden=80),
}
LAYER_MAPS = ["proportional", "last", [0, 1, 3]]  # one per teacher a, b, c


@pytest.fixture(scope="module")
def other_tokenizer_dir(tmp_path_factory, shared_data):
    """A byte-level BPE of 400 tokens trained here on GSM8K text: nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rows = [json.loads(x) for x in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:200]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["question"] + "\n" + r["answer"] for r in rows], trainer)
    out = tmp_path_factory.mktemp("other_tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_data, smol_tokenizer_dir, other_tokenizer_dir):
    root = tmp_path_factory.mktemp("shapes")
    data, test = root / "train.jsonl", root / "test.jsonl"
    data.write_text("\n".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:8]) + "\n")
    test.write_text("\n".join((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:4]) + "\n")
    models, caches = {}, {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        tok = other_tokenizer_dir if name == "c" else smol_tokenizer_dir
        models[name] = str(make_tiny_model(root / name, tok, seed=10 + i, **shape))
        if name != "student":
            caches[name] = str(root / f"{name}.zarr")
            extract(ExtractConfig(model=models[name], data=str(data), out=caches[name], slots=3, batch_size=4))
    return {"root": root, "data": str(data), "test": str(test), "models": models, "caches": caches}


def _cfg(world, out, **kw):
    base = dict(caches=[world["caches"][k] for k in "abc"], out=str(out), student=world["models"]["student"], steps=3, batch_size=4,
                lora_r=4, num_workers=0, save_every=0, warmup_steps=1, layer_map=LAYER_MAPS)
    base.update(kw)
    return TrainConfig(**base)


def test_caches_record_the_tokenizer_as_it_reports_itself(world):
    meta = {k: CacheReader.open(p).metadata for k, p in world["caches"].items()}
    assert meta["c"]["tokenizer"]["vocab_size"] == 400  # len(tokenizer), not the padded embedding (448)
    assert meta["c"]["tokenizer"]["base_vocab_size"] == 400
    assert meta["a"]["tokenizer"]["hash"] == meta["b"]["tokenizer"]["hash"] != meta["c"]["tokenizer"]["hash"]
    assert meta["a"]["tokenizer"]["vocab_size"] == 49152
    out = CliRunner().invoke(app, ["cache", "info", world["caches"]["c"]]).output
    assert "tokenizer vocab_size │ 400 (len(tokenizer)" in out and meta["c"]["tokenizer"]["hash"][:40] in out


def test_answer_boundary_is_right_under_both_tokenizers(world):
    """Each side finds the token before the answer from character offsets of its own tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples = load_examples(world["data"]).examples
    traces = [build_trace(ex, "nl", drop_last_step=True) for ex in examples]
    for name in ("a", "c"):
        tok = AutoTokenizer.from_pretrained(world["models"][name])
        batch = tokenize_teacher(tok, examples, traces, PromptTemplate())
        for i, ex in enumerate(examples):
            ids = batch.input_ids[i].tolist()
            a0, a1 = batch.answer[i].tolist()
            assert tok.decode(ids[:a0]).rstrip().endswith(traces[i] + "\nThe answer is:"), name
            assert tok.decode(ids[a0:a1]).strip() == ex.answer
            s = tokenize_student(tok, ex, PromptTemplate())
            assert tok.decode(s.s_ids[: s.answer_start]).rstrip() == "The answer is:"
            assert tok.decode(s.s_ids[s.answer_start : -1]).strip() == ex.answer
    # the cached CODI target of teacher c is its hidden state at that boundary token
    tok = AutoTokenizer.from_pretrained(world["models"]["c"])
    model = AutoModelForCausalLM.from_pretrained(world["models"]["c"]).eval()
    batch = tokenize_teacher(tok, examples[:1], traces[:1], PromptTemplate())
    n = int(batch.attention_mask[0].sum())
    with torch.no_grad():
        hs = model(batch.input_ids[:, :n], output_hidden_states=True).hidden_states
    boundary = int(batch.answer[0, 0]) - 1
    cached = torch.from_numpy(CacheReader.open(world["caches"]["c"]).read([0])["hidden"][0])  # (L+1, d)
    torch.testing.assert_close(cached, torch.stack([h[0, boundary] for h in hs]), atol=2e-2, rtol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("router,options", [("fixed", {}), ("similarity", {"fusion": "target", "a3": 1.0, "kv_weighting": "importance"})])
def test_train_mixed_teachers_with_two_routers_then_eval(world, tmp_path, router, options):
    run = tmp_path / router
    summary = train(_cfg(world, run, router=router, **options))
    cfg = json.loads((run / "config.json").read_text())
    teachers = cfg["teachers"]
    assert [t["tokenizer_shared_with_student"] for t in teachers] == [True, True, False]
    assert any("vocab_size 400 != 49152" in d for d in teachers[2]["tokenizer_differences"])
    assert [t["alignment"]["layer_map"] for t in teachers] == [[0, 0, 1], [3, 4, 5], [0, 1, 3]]
    assert [t["alignment"]["kv"].split(" ")[0] for t in teachers] == ["learned"] * 3
    assert teachers[1]["alignment"]["hidden"] == "learned 96 -> 80 per layer"
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(len(e["weights"]) == 3 and abs(sum(e["weights"]) - 1) < 1e-5 for e in log)
    assert all(torch.isfinite(torch.tensor(e["kv"] + e["codi"])).all() for e in log)
    if router == "fixed":
        assert log[0]["weights"] == pytest.approx([1 / 3] * 3)
    state = load_file(str(run / "checkpoints" / "step-0000003" / "trainable.safetensors"))
    rotations = [k for k in state if k.startswith("aligners.") and k.endswith(".original")]
    assert rotations and all(state[k].abs().max() > 0 for k in rotations)  # start at 0: trained
    result = evaluate(EvalConfig(run=str(run), data=world["test"], max_new_tokens=4, batch_size=4))
    assert result.n == 4 and summary.steps == 3


def test_projections_train_and_a_checkpoint_reload_reproduces_the_loss(world, tmp_path):
    cfg = _cfg(world, tmp_path / "run", router="similarity")
    _, metas = open_teachers(cfg)
    trainee = build_trainee(cfg, metas).eval()  # eval: no dropout, the same numbers twice
    tok = trainee.student.tokenizer
    ds = DistillDataset(load_examples(world["data"]).examples, tok, cfg.caches)
    batch = collate([ds[i] for i in range(4)], pad_id=tok.pad_token_id)
    hidden_b = batch["teachers"][1]["hidden"]
    spread = torch.cdist(trainee.aligners[1].hidden(hidden_b)[:, -1], trainee.aligners[1].hidden(hidden_b)[:, -1]).detach()
    before = {k: v.clone() for k, v in trainee.aligners.state_dict().items()}
    params = [p for p in trainee.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(2):
        loss, _ = distill_step(trainee, batch, cfg, step)
        opt.zero_grad()
        loss.backward()
        aligner_grads = [p.grad for p in trainee.aligners.parameters()]
        assert aligner_grads and all(g is not None and g.abs().sum() > 0 for g in aligner_grads)
        opt.step()
    after = trainee.aligners.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith(".original") for k in changed)  # rotations train; bases stay fixed
    moved = trainee.aligners[1].hidden(hidden_b)[:, -1]
    assert not torch.allclose(moved, hidden_b[:, -1] @ trainee.aligners[1].hidden_proj[-1].basis.T)  # rotated away from B t
    torch.testing.assert_close(torch.cdist(moved, moved).detach(), spread, atol=1e-4, rtol=1e-4)  # not shrunk

    with torch.no_grad():
        loss_a, logs_a = distill_step(trainee, batch, cfg, 2)
    save_file(trainee.checkpoint_state(), str(tmp_path / "ckpt.safetensors"))
    fresh = build_trainee(cfg, metas).eval()
    fresh.load_checkpoint_state(load_file(str(tmp_path / "ckpt.safetensors")))
    with torch.no_grad():
        loss_b, logs_b = distill_step(fresh, batch, cfg, 2)
    assert float(loss_b) == pytest.approx(float(loss_a), abs=1e-5)
    assert logs_b["kv"] == pytest.approx(logs_a["kv"], abs=1e-5) and logs_b["codi"] == pytest.approx(logs_a["codi"], abs=1e-5)


def test_modes_needing_one_tokenizer_refuse_and_name_the_teacher(world, tmp_path):
    a, c = world["caches"]["a"], world["caches"]["c"]
    with pytest.raises(CacheMismatchError, match=r"teacher .*c\.zarr has another tokenizer: vocab_size 400 != 49152"):
        open_teachers(TrainConfig(caches=[a, c], require_same_tokenizer=True))
    with pytest.raises(CacheMismatchError, match=r"student .*c\.zarr.*vocab_size 400 != 49152"):
        build_trainee(_cfg(world, tmp_path, caches=[c], layer_map="proportional", require_same_tokenizer=True), open_teachers(TrainConfig(caches=[c]))[1])
    with pytest.raises(ValueError, match=r"a\.zarr: layer map 'last' needs a teacher with at least as many layers"):
        build_trainee(_cfg(world, tmp_path, layer_map="last"), open_teachers(TrainConfig(caches=[a, c]))[1])


def test_dry_run_plans_shapes_sizes_and_layer_map_without_running(world, tmp_path):
    cfg = ExtractConfig(model=world["models"]["b"], data=world["data"], slots=3)
    plan = plan_extraction(cfg, student=world["models"]["student"])
    assert (plan.teacher_info["num_layers"], plan.teacher_info["num_kv_heads"], plan.teacher_info["head_dim"], plan.teacher_info["hidden_size"]) == (6, 4, 32, 96)
    # by hand, the default int8 preset: keys int8 6*4*3*32 + one fp16 scale per (layer, head, channel) 6*4*32*2;
    # values int8 6*4*3*32 + one fp16 scale per (layer, head, slot) 6*4*3*2; hidden int8 7*96 + fp16 scale
    # per layer 7*2 + 8 outliers per layer as uint16 index and fp16 value 2*7*8*2; then the uncoded rows:
    # slot_pos/importance/score 3*(6*4*3*4), slot_valid 6*4*3, cot_len/answer_len/answer_nll 3*4, written 1
    rest = 3 * 288 + 72 + 12 + 1
    assert plan.bytes_per_example == (2304 + 1536) + (2304 + 144) + (672 + 14 + 224) + rest == 8147
    assert plan.bytes_per_example == CacheReader.open(world["caches"]["b"]).info()["uncompressed_bytes_per_example"]
    assert plan.total_bytes == 8 * 8147 and plan.rows == 8
    # the fp16 preset: keys+values 2*6*4*3*32*2, hidden 7*96*2
    fp16 = plan_extraction(ExtractConfig(model=world["models"]["b"], data=world["data"], slots=3, codec="fp16"))
    assert fp16.bytes_per_example == 2 * 6 * 4 * 3 * 32 * 2 + 7 * 96 * 2 + rest == 11509
    assert plan.student["layer_map"] == [1, 3, 5] and plan.student["tokenizer_shared"]
    assert plan.student["kv_projection"].startswith("learned 128 -> 48")
    tok = __import__("transformers").AutoTokenizer.from_pretrained(world["models"]["b"])
    examples = load_examples(world["data"]).examples
    batch = tokenize_teacher(tok, examples, [build_trace(ex, "nl", drop_last_step=True) for ex in examples], PromptTemplate())
    assert plan.teacher_tokens == batch.num_tokens
    out = tmp_path / "never.zarr"
    text = CliRunner().invoke(app, ["extract", "--dry-run", "--model", world["models"]["c"], "--data", world["data"], "--out", str(out),
                                    "--slots", "3", "--student", world["models"]["student"], "--layer-map", "0,1,3"]).output
    assert "[0, 1, 3]" in text and "no (fine in latent mode)" in text and not out.exists()
