"""One teacher forward pass that captures what a KaVa/CODI cache needs.

Per example and per layer: the pre-RoPE keys and the values over the CoT span, the
answer -> CoT attention importance per KV head, the hidden states (embeddings + every
layer) at the answer boundary, and the teacher's NLL of the gold answer.

Design choices (see docs/design.md, sections 1 and 7):

- Keys are read *before* RoPE from hooks on ``k_proj`` (or ``k_norm`` where the
  architecture normalises keys before RoPE), so they are comparable across positions.
- Importance needs only the answer rows of attention: the hooks also read the pre-RoPE
  queries, RoPE is applied with the model's own rotary embedding, and
  ``softmax(q_answer k^T / sqrt(D))`` is computed for the answer rows only; no eager
  ``[B, H, T, T]`` attention maps are materialised. Full-row softmax (over every visible
  key), then the CoT columns are averaged over answer tokens and over the query heads of
  each KV group, and renormalised to sum to 1 over the CoT.
- Batches are right-padded: with causal attention the real tokens of an example never see
  the padding, so an example's tensors do not depend on its batch mates.
- The LM head runs only on the answer-predicting positions (49k-vocab logits over every
  token would dominate the cost of a small teacher).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from kvkd.models import decoder_layers, key_module, query_module


@dataclass
class TeacherBatch:
    """A right-padded teacher batch with token spans.

    Attributes:
        input_ids: (B, T) int64.
        attention_mask: (B, T) int64, 1 on real tokens.
        cot: (B, 2) int64 token span [start, stop) of the CoT.
        answer: (B, 2) int64 token span [start, stop) of the gold answer.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cot: torch.Tensor
    answer: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class Capture:
    """Captured teacher tensors for a batch (all fp32, CoT padded to the batch maximum Tc).

    Attributes:
        keys: (B, L, H_kv, Tc, D) pre-RoPE keys over the CoT.
        values: (B, L, H_kv, Tc, D) values over the CoT.
        cot_mask: (B, Tc) bool.
        importance: (B, L, H_kv, Tc) answer->CoT attention, sums to 1 over valid tokens.
        hidden: (B, L+1, d) hidden states at the answer boundary (token before the answer).
        answer_nll: (B,) mean NLL of the gold answer tokens, nats/token.
        cot_len: (B,) int64 CoT tokens; answer_len: (B,) int64 answer tokens.
    """

    keys: torch.Tensor
    values: torch.Tensor
    cot_mask: torch.Tensor
    importance: torch.Tensor
    hidden: torch.Tensor
    answer_nll: torch.Tensor
    cot_len: torch.Tensor
    answer_len: torch.Tensor


class _Hooks:
    """Forward hooks storing the q/k/v projections' outputs of every layer."""

    def __init__(self, layers: list, queries: bool):
        self.q: list[torch.Tensor | None] = [None] * len(layers)
        self.k: list[torch.Tensor | None] = [None] * len(layers)
        self.v: list[torch.Tensor | None] = [None] * len(layers)
        self.frame = ""
        self._handles = []
        for i, layer in enumerate(layers):
            kmod, self.frame = key_module(layer)
            self._handles.append(kmod.register_forward_hook(self._store(self.k, i)))
            self._handles.append(layer.self_attn.v_proj.register_forward_hook(self._store(self.v, i)))
            if queries:
                self._handles.append(query_module(layer).register_forward_hook(self._store(self.q, i)))

    @staticmethod
    def _store(bucket, i):
        def hook(_module, _inputs, output):
            bucket[i] = output

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H*D) or (B, T, H, D) -> (B, H, T, D)."""
    B, T = x.shape[:2]
    return x.reshape(B, T, -1, head_dim).transpose(1, 2)


def _span_gather(x: torch.Tensor, start: torch.Tensor, length: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather a per-example token span along dim 2 of (B, H, T, D) into (B, H, width, D)."""
    B = x.shape[0]
    ar = torch.arange(width, device=x.device)
    mask = ar[None, :] < length[:, None]  # (B, width)
    idx = (start[:, None] + ar[None, :]).clamp(max=x.shape[2] - 1)  # (B, width)
    idx = idx.where(mask, torch.zeros_like(idx))
    out = torch.gather(x, 2, idx[:, None, :, None].expand(B, x.shape[1], width, x.shape[3]))
    return out * mask[:, None, :, None].to(out.dtype), mask


@torch.no_grad()
def capture_batch(model, batch: TeacherBatch) -> Capture:
    """Run the teacher once over a batch and capture KV, importance, hidden states and NLL.

    Args:
        model: a Hugging Face causal LM with Llama-style attention (``self_attn.{q,k,v}_proj``,
            rotary embedding on the decoder).
        batch: right-padded TeacherBatch; every example needs >= 1 CoT and >= 1 answer token
            and a token before its answer.
    Returns:
        Capture (see its docstring for shapes).
    Raises:
        ValueError: if a span is empty or the answer starts at token 0.
    """
    cot_len = batch.cot[:, 1] - batch.cot[:, 0]
    ans_len = batch.answer[:, 1] - batch.answer[:, 0]
    if bool((cot_len < 1).any()) or bool((ans_len < 1).any()) or bool((batch.answer[:, 0] < 1).any()):
        raise ValueError("every example needs a non-empty CoT, a non-empty answer and a token before the answer")
    layers = decoder_layers(model)
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    H_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    B, T = batch.input_ids.shape
    position_ids = torch.arange(T, device=batch.input_ids.device)[None].expand(B, T)
    hooks = _Hooks(layers, queries=True)
    try:
        out = decoder(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
        )
    finally:
        hooks.remove()
    hidden_states = out.hidden_states  # L+1 x (B, T, d)
    Tc = int(cot_len.max())
    A = int(ans_len.max())
    dev = batch.input_ids.device
    ar_b = torch.arange(B, device=dev)

    # Hidden states at the answer boundary and answer NLL (LM head on answer rows only).
    boundary = batch.answer[:, 0] - 1  # (B,)
    hidden = torch.stack([h[ar_b, boundary] for h in hidden_states], dim=1).float()  # (B, L+1, d)
    pred_pos = (boundary[:, None] + torch.arange(A, device=dev)[None]).clamp(max=T - 1)  # (B, A): predicts answer token j
    ans_mask = torch.arange(A, device=dev)[None] < ans_len[:, None]  # (B, A)
    last = hidden_states[-1]
    logits = base.lm_head(last[ar_b[:, None], pred_pos]).float()  # (B, A, V)
    targets = batch.input_ids[ar_b[:, None], (pred_pos + 1).clamp(max=T - 1)]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, A)
    answer_nll = (nll * ans_mask).sum(1) / ans_len

    # RoPE tables for every position; queries/keys are rotated only for the rows we need.
    attn0 = layers[0].self_attn
    rope_fn = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
    cos, sin = decoder.rotary_emb(hidden_states[0], position_ids)  # (B, T, D)
    scaling = getattr(attn0, "scaling", D**-0.5)
    key_pos = torch.arange(T, device=dev)
    ans_rows = (boundary[:, None] + 1 + torch.arange(A, device=dev)[None]).clamp(max=T - 1)  # (B, A) answer token positions (masked past each answer)
    keys, values, importance = [], [], []
    for i in range(len(layers)):
        k = _heads(hooks.k[i], D).float()  # (B, H_kv, T, D) pre-RoPE
        v = _heads(hooks.v[i], D).float()
        q = _heads(hooks.q[i], D).float()  # (B, H_q, T, D) pre-RoPE
        q_rot, k_rot = rope_fn(q, k, cos.float(), sin.float())
        q_ans = torch.gather(q_rot, 2, ans_rows[:, None, :, None].expand(B, q.shape[1], A, D))  # (B, H_q, A, D)
        k_rep = k_rot.repeat_interleave(q.shape[1] // H_kv, dim=1)  # (B, H_q, T, D)
        scores = (q_ans @ k_rep.transpose(-1, -2)) * scaling  # (B, H_q, A, T)
        visible = (key_pos[None, None, :] <= ans_rows[:, :, None]) & batch.attention_mask[:, None, :].bool()  # (B, A, T)
        attn = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        attn = (attn * ans_mask[:, None, :, None]).sum(2) / ans_len[:, None, None]  # (B, H_q, T) mean over answer rows
        attn = attn.reshape(B, H_kv, -1, T).mean(2)  # (B, H_kv, T) mean over each KV group's query heads
        imp, cot_mask = _span_gather(attn[..., None], batch.cot[:, 0], cot_len, Tc)  # (B, H_kv, Tc, 1)
        imp = imp[..., 0]
        imp = imp / imp.sum(-1, keepdim=True).clamp(min=1e-30)
        importance.append(imp)
        keys.append(_span_gather(k, batch.cot[:, 0], cot_len, Tc)[0])
        values.append(_span_gather(v, batch.cot[:, 0], cot_len, Tc)[0])
    return Capture(
        keys=torch.stack(keys, 1),  # (B, L, H_kv, Tc, D)
        values=torch.stack(values, 1),
        cot_mask=cot_mask,
        importance=torch.stack(importance, 1),  # (B, L, H_kv, Tc)
        hidden=hidden,
        answer_nll=answer_nll.float(),
        cot_len=cot_len,
        answer_len=ans_len,
    )
