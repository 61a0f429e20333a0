"""What the student makes of each teacher's trace: the traces rebuilt from the caches' recorded
data, and the student's likelihood, token ranks and Rank-Surprisal Ratio of them.

Shared by the routers that prepare on the training rows with the student (``persyn``,
``rsr``). The traces are the texts each teacher read when its cache was extracted (the cache
metadata records the data file, format, rows, trace kind and whether the last step was
dropped), so this needs the data file to still be where the cache says.
"""

from __future__ import annotations

import torch


def teacher_traces(examples: list, meta: dict) -> list[str]:
    """The trace each training row's teacher read, rebuilt from what its cache records.

    Args:
        examples: the N training rows (cache order).
        meta: the teacher cache's metadata (``dataset``: source, format, split, offset,
            rows, trace, drop_last_step, trace_fallback, trace_fallback_ids).
    Returns:
        N trace texts.
    Raises:
        ValueError: the recorded data cannot be read, or holds other rows than the training
            rows (names the cache's source and the fix).
    """
    from kvkd.data import TRACE_KINDS, build_trace, load_examples

    d = meta.get("dataset", {})
    source = d.get("source")
    trace_file = d.get("format") == "trace"  # kvkd extract --trace FILE: the file's row window and the selection it applied
    try:
        loaded = load_examples(str(source), split=d.get("split"), fmt=d.get("format") or "auto", limit=d.get("limit") if trace_file else d.get("rows"),
                               offset=d.get("offset") or 0, **(d.get("trace_selection") or {} if trace_file else {})).examples
    except Exception as err:  # noqa: BLE001 - any unreadable source gets the same one-line reason
        raise ValueError(f"cannot read the traces of the cache built from {source!r}: {err}") from None
    by_id = {ex.id: ex for ex in loaded}
    fallback = set(d.get("trace_fallback_ids") or [])
    traces = []
    for ex in examples:
        src = by_id.get(ex.id)
        if src is None or src.question != ex.question:
            raise ValueError(f"the data {source!r} a teacher cache records has no row {ex.id!r} as trained on; "
                             "the cache must have been extracted from a file with the same rows")
        kind = d.get("trace_fallback") if ex.id in fallback else d.get("trace", "nl")
        kind = "nl" if kind not in TRACE_KINDS else kind  # a trace file's example holds the trace read as its CoT
        traces.append(build_trace(src, kind or "nl", drop_last_step=bool(d.get("drop_last_step")), allow_empty=True))
    return traces


@torch.no_grad()
def trace_stats(student, questions: list[str], traces: list[str], batch_size: int = 8, max_rank: int = 100) -> dict[str, torch.Tensor]:
    """How the student sees each trace given its question, under its plain language model (no
    latent tokens; LoRA adapters as they are), over the trace's tokens t:

    - ``loglik``: mean log p(t) per token (nats/token, <= 0);
    - ``rank``: mean rank of t among the vocabulary by the student's probability (1 = its top
      choice), each rank clipped at ``max_rank``;
    - ``rsr``: the Rank-Surprisal Ratio mean rank / mean surprisal, surprisal = -log p(t)
      (Yang et al., "Which Reasoning Trajectories Teach Students to Reason Better?", arXiv
      2601.14249; lower = more suitable).

    Args:
        student: a ``LatentStudent`` (its ``base`` model, ``tokenizer`` and ``template``).
        questions, traces: N texts each; the student reads ``question_text(q) + trace``.
        batch_size: sequences per forward pass.
        max_rank: clip of the per-token rank (>= 1).
    Returns:
        dict of (N,) float32 tensors; an empty trace scores loglik 0, rank 1, rsr 0.
    """
    from kvkd.prompts import token_span

    tok, template, model = student.tokenizer, student.template, student.base
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loglik, rank, rsr = torch.zeros(len(traces)), torch.ones(len(traces)), torch.zeros(len(traces))
    todo = [i for i, t in enumerate(traces) if t.strip()]
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            ids, spans = [], []
            for i in chunk:
                head = template.question_text(questions[i])
                enc = tok(head + traces[i], add_special_tokens=True, return_offsets_mapping=True)
                ids.append(enc["input_ids"])
                spans.append(token_span(enc["offset_mapping"], (len(head), len(head) + len(traces[i]))))
            T = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), T), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(ids), T), dtype=torch.long)
            for b, x in enumerate(ids):
                input_ids[b, : len(x)] = torch.tensor(x)
                mask[b, : len(x)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
            target = input_ids[:, 1:, None].to(device)
            logp_all = torch.log_softmax(logits[:, :-1], -1)  # (B, T-1, V): position t-1 predicts token t
            logp = logp_all.gather(-1, target)[..., 0]  # (B, T-1)
            ranks = ((logp_all > logp[..., None]).sum(-1) + 1).clamp(max=max_rank).float()  # (B, T-1)
            logp, ranks = logp.cpu(), ranks.cpu()
            for b, (i, (lo, hi)) in enumerate(zip(chunk, spans)):
                lo = max(lo, 1)
                if hi > lo:
                    loglik[i] = logp[b, lo - 1 : hi - 1].mean()
                    rank[i] = ranks[b, lo - 1 : hi - 1].mean()
                    rsr[i] = rank[i] / (-loglik[i]).clamp(min=1e-6)
    finally:
        model.train(was_training)
    return {"loglik": loglik, "rank": rank, "rsr": rsr}
