"""SIM-CoT's step-level supervision of the latent thoughts, weight ``--a4``.

SIM-CoT ("SIM-CoT: Supervised Implicit Chain-of-Thought", Wei et al., ICLR 2026,
arXiv:2509.20317, github.com/InternLM/SIM-CoT) fights latent collapse in implicit CoT
(Coconut, CODI) with an auxiliary decoder used only in training: it reads one latent thought
z_k as its input and is trained by cross-entropy to generate the k-th explicit reasoning step
s_k of the CoT, ``L_step = -sum_k log p(s_k | z_k)``; the decoder is discarded at inference.

In kvkd:

- **the steps are each teacher's own**: the steps of the trace that teacher's cache was
  extracted from (the cache's ``dataset`` metadata: trace kind ``nl`` or ``equations``,
  ``drop_last_step``, the rows that fell back to ``trace_fallback``), split by
  :func:`kvkd.data.trace_steps` (``nl``: one step per CoT line; ``equations``: one per
  ``<<...>>``). So the term is per teacher and router-weighted like the KV and CODI terms;
- **alignment**: step k -> latent z_k for k < min(M, S); with more latents than steps the
  extra latents are unsupervised, with more steps than latents the extra steps are dropped;
- **decoder**: the student's own LM (its LoRA adapters included) with z_k as the first input
  embedding, then the step's tokens and ``<eos>`` teacher-forced; the CE of the step tokens
  and ``<eos>`` is the loss. SIM-CoT's released CODI code trains a separate copy of the
  backbone as the decoder; sharing the student's weights (as CODI shares one model between
  its teacher and student tasks) needs no second model in memory or in checkpoints, and
  nothing is left to discard at inference;
- per sample, the loss is the mean token CE over all its supervised steps (0 for a sample
  with no step). Under ``--fusion target`` the token targets of different teachers cannot be
  averaged, so the term is fused by its router-weighted per-teacher losses.

Off (no tokenisation, no decoder pass) while ``--a4`` is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvkd.config import opt
from kvkd.data import Example, trace_steps
from kvkd.train.losses.base import AlignedTeacher, LossTerm, TermInputs, register_loss

if TYPE_CHECKING:  # torch is imported where a loss is computed: the options import without it
    import torch


def teacher_steps(example: Example, dataset_meta: dict) -> list[str]:
    """The reasoning steps of the trace a teacher read for ``example``.

    Args:
        example: the training row.
        dataset_meta: the cache's ``dataset`` metadata (``trace``, ``drop_last_step``,
            ``trace_fallback``, ``trace_fallback_ids``).
    Returns:
        the steps in order.
    Raises:
        ValueError: the metadata records no trace kind (a cache from before kvkd recorded it).
    """
    kind = dataset_meta.get("trace")
    if kind is None:
        raise ValueError("the cache records no trace kind (dataset.trace): re-extract it with this kvkd to train with --a4")
    if example.id in set(dataset_meta.get("trace_fallback_ids") or ()):
        kind = dataset_meta["trace_fallback"]
    return trace_steps(example, kind, bool(dataset_meta.get("drop_last_step", False)))


def tokenize_steps(tokenizer, steps_per_example: list[list[str]], num_latents: int, max_tokens: int) -> dict[str, torch.Tensor]:
    """Tokenise each example's first M steps (step k for latent k), each as ``step <eos>``.

    Args:
        tokenizer: the student's tokenizer (the decoder is the student).
        steps_per_example: N lists of step texts.
        num_latents: M; steps beyond the M-th are dropped.
        max_tokens: tokens kept per step before ``<eos>`` (longer steps are truncated).
    Returns:
        ``step_ids`` (N, M, T) int32 (0 where padded) and ``step_mask`` (N, M, T) bool, T the
        longest kept step + 1; a latent without a step has an all-False mask row.
    """
    import torch

    eos = tokenizer.eos_token_id
    rows = []
    for steps in steps_per_example:
        kept = steps[:num_latents]
        ids = tokenizer(kept, add_special_tokens=False)["input_ids"] if kept else []
        rows.append([x[:max_tokens] + [eos] for x in ids])
    T = max([len(x) for r in rows for x in r] or [1])
    step_ids = torch.zeros((len(rows), num_latents, T), dtype=torch.int32)
    step_mask = torch.zeros((len(rows), num_latents, T), dtype=torch.bool)
    for n, r in enumerate(rows):
        for k, x in enumerate(r):
            step_ids[n, k, : len(x)] = torch.tensor(x, dtype=torch.int32)
            step_mask[n, k, : len(x)] = True
    return {"step_ids": step_ids, "step_mask": step_mask}


def simcot_loss(student, latents: torch.Tensor, step_ids: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Step-level CE of decoding each latent thought into its step, per sample (SIM-CoT).

    The decoder input of latent k of sample b is ``[z_bk, e(s_1), ..., e(s_T)]`` (e = the
    student's token embedding); position 0 predicts s_1, position j predicts s_{j+1}.

    Args:
        student: a :class:`kvkd.train.student.LatentStudent` (its LM decodes).
        latents: (B, M, d) the student's continuous thoughts, with their graph.
        step_ids: (B, M, T) int token ids of step k (then ``<eos>``), padded.
        step_mask: (B, M, T) bool, True on real tokens.
    Returns:
        (B,) float32: sum of the step tokens' NLL (nats) / number of step tokens, per sample;
        0 for a sample without steps.
    """
    import torch
    from torch.nn import functional as F

    B = latents.shape[0]
    T = int(step_mask.sum(-1).max()) if step_mask.numel() else 0
    if T == 0:
        return latents.new_zeros(B, dtype=torch.float32)
    ids, mask = step_ids[..., :T].long(), step_mask[..., :T]
    rows = mask.any(-1)  # (B, M) latents with a step
    sample = torch.arange(B, device=latents.device)[:, None].expand_as(rows)[rows]  # (N,)
    tok, m = ids[rows], mask[rows]  # (N, T)
    dtype = student.base.dtype
    embeds = torch.cat([latents[rows][:, None].to(dtype), student.embed(tok).to(dtype)], 1)  # (N, 1+T, d)
    attn = torch.cat([m.new_ones(m.shape[0], 1), m], 1).long()
    h = student.decoder(inputs_embeds=embeds, attention_mask=attn, use_cache=False).last_hidden_state[:, :T]
    logits = student.base.lm_head(h).float()  # (N, T, V)
    nll = F.cross_entropy(logits.transpose(1, 2), tok, reduction="none") * m  # (N, T)
    total = torch.zeros(B, device=latents.device, dtype=torch.float32).index_add(0, sample, nll.sum(1))
    return total / mask.sum(dim=(1, 2)).clamp(min=1).float()


@register_loss
class SimCoTTerm(LossTerm):
    """``L_SIM-CoT`` per sample and teacher (:func:`simcot_loss` on that teacher's steps)."""

    name = "simcot"
    weight = "a4"
    fuses_targets = False

    @dataclass
    class Options:
        a4: float = opt(0.0, help="Weight of SIM-CoT's step-level supervision: the student's LM decodes latent k into step k of each teacher's trace (0 = off)")
        simcot_step_tokens: int = opt(32, help="Tokens kept per reasoning step decoded by SIM-CoT (longer steps are truncated)")

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.simcot_step_tokens < 1:
            raise ValueError(f"--simcot-step-tokens must be >= 1, got {cfg.simcot_step_tokens}")

    def teacher_data(self, cfg, examples: list, meta: dict, tokenizer, num_latents: int) -> dict[str, torch.Tensor]:
        steps = [teacher_steps(ex, meta["dataset"]) for ex in examples]
        return tokenize_steps(tokenizer, steps, num_latents, cfg.simcot_step_tokens)

    def __call__(self, inputs: TermInputs, teacher: AlignedTeacher) -> torch.Tensor:
        return simcot_loss(inputs.student, inputs.out.latents, teacher.data["step_ids"], teacher.data["step_mask"])
