"""The latent student: CODI continuous thoughts with KV capture for KaVa distillation.

CODI (Shen et al., 2025): the student reads ``Q <bot>``, then produces M continuous
thoughts: the last-layer hidden state of the previous position goes through a projection
(Linear -> GELU -> Linear -> LayerNorm) and is fed back as the next input embedding. Then
``<eot>`` and the answer text ``The answer is: A<eos>``.

KaVa (Kuzina et al., 2025) matches the student's KV entries at z_1..z_M with the teachers'
compressed caches; they are read *pre-RoPE* from hooks on each layer's key/value
projections (registered after peft wraps the model so LoRA's delta is included).

Implementation notes (docs/design.md, section 7): latent steps run through the inner decoder,
not the LM head; ``<bot>``/``<eot>`` are learned vectors passed as input embeddings (the
tokens are also added to the tokenizer and the embedding matrix, and the learned vectors
are written into those rows on export); the attention mask of cached steps is the full
``[B, past + new]`` mask; position ids are given explicitly (left-padded questions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvkd.models import decoder_layers, key_module
from kvkd.prompts import PromptTemplate

BOT_TOKEN = "<|bot|>"
EOT_TOKEN = "<|eot|>"


class CODIProjection(nn.Module):
    """CODI's projection of a hidden state into the next input embedding.

    Shapes: (..., d) -> (..., d). Linear -> GELU -> Linear -> LayerNorm (Shen et al., 2025).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
            nn.LayerNorm(hidden_size),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


@dataclass
class StudentOutput:
    """What one latent forward produces.

    Attributes:
        ce: () cross-entropy over the answer text tokens (mean over tokens).
        sample_ce: (B,) the same cross-entropy per sample (mean over its tokens), nats/token.
        answer_nll: (B,) mean NLL of the gold answer tokens, nats/token.
        hidden: (B, L+1, d) hidden states at the answer boundary (CODI's distilled position).
        keys: (B, L, H_kv, M, D) pre-RoPE keys at the latent positions z_1..z_M.
        values: (B, L, H_kv, M, D) values at z_1..z_M.
        features: (B, d) last-layer boundary hidden state, detached (router input).
        latents: (B, M, d) the continuous thoughts z_1..z_M (the projected hidden states fed
            back as input embeddings), with their graph; e.g. decoded by SIM-CoT's term.
    """

    ce: torch.Tensor
    sample_ce: torch.Tensor
    answer_nll: torch.Tensor
    hidden: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    features: torch.Tensor
    latents: torch.Tensor | None = None


class LatentStudent(nn.Module):
    """A causal LM (optionally LoRA-wrapped) run in CODI/KaVa latent mode.

    Args:
        lm: a Hugging Face ``*ForCausalLM`` (plain or peft ``PeftModel``).
        tokenizer: its tokenizer; ``<|bot|>``/``<|eot|>`` are added if missing (call
            :func:`add_latent_tokens` *before* wrapping with peft so the embedding is resized).
        num_latents: M, continuous thoughts per example.
    """

    def __init__(self, lm, tokenizer, num_latents: int, template: PromptTemplate = PromptTemplate()):
        super().__init__()
        if num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {num_latents}")
        self.lm = lm
        self.tokenizer = tokenizer
        self.num_latents = num_latents
        self.template = template
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        self._base = [base]  # not a submodule: already registered through self.lm
        cfg = base.config
        self.hidden_size = cfg.hidden_size
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_layers = cfg.num_hidden_layers
        self.projection = CODIProjection(self.hidden_size)
        emb = base.get_input_embeddings().weight.detach()
        bot_id, eot_id = tokenizer.convert_tokens_to_ids([BOT_TOKEN, EOT_TOKEN])
        self.bot = nn.Parameter(emb[bot_id].clone().float())
        self.eot = nn.Parameter(emb[eot_id].clone().float())
        self._capture = False
        self._k: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self._v: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        for i, layer in enumerate(decoder_layers(lm)):  # after peft wrapping: includes LoRA
            key_module(layer)[0].register_forward_hook(self._hook(self._k, i))
            layer.self_attn.v_proj.register_forward_hook(self._hook(self._v, i))

    # ----------------------------------------------------------------- plumbing
    def _hook(self, bucket, i):
        def hook(_module, _inputs, output):
            if self._capture:
                bucket[i].append(output)

        return hook

    @property
    def base(self):
        return self._base[0]

    @property
    def decoder(self):
        return self.base.get_decoder()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) input embeddings."""
        return self.base.get_input_embeddings()(ids)

    def _run(self, embeds, mask, positions, cache, hidden_states: bool = False):
        return self.decoder(
            inputs_embeds=embeds.to(self.base.dtype),
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            output_hidden_states=hidden_states,
        )

    # ----------------------------------------------------------------- latent mode
    def think(self, q_ids: torch.Tensor, q_mask: torch.Tensor, capture_kv: bool = False, latents_out: list | None = None):
        """Read ``Q <bot>`` and produce M continuous thoughts.

        Args:
            q_ids: (B, Tq) left-padded question ids; q_mask: (B, Tq) 1 on real tokens.
            capture_kv: also return the pre-RoPE keys and values at z_1..z_M.
            latents_out: if given, the M thoughts z_1..z_M ((B, 1, d) each) are appended to it.
        Returns:
            (cache, mask (B, Tq+1+M), next_position (B,), keys, values) where keys/values are
            (B, L, H_kv, M, D) or None.
        """
        from transformers import DynamicCache

        B = q_ids.shape[0]
        embeds = torch.cat([self.embed(q_ids), self.bot.to(self.base.dtype).expand(B, 1, -1)], 1)  # (B, Tq+1, d)
        mask = torch.cat([q_mask, q_mask.new_ones(B, 1)], 1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: count real tokens
        cache = DynamicCache(config=self.base.config)
        out = self._run(embeds, mask, positions, cache)
        h = out.last_hidden_state[:, -1:]  # (B, 1, d)
        pos = positions[:, -1:]
        for bucket in (*self._k, *self._v):
            bucket.clear()
        self._capture = capture_kv
        try:
            for _ in range(self.num_latents):
                z = self.projection(h.float())  # (B, 1, d)
                if latents_out is not None:
                    latents_out.append(z)
                mask = torch.cat([mask, mask.new_ones(B, 1)], 1)  # full 2D mask [B, past + 1]
                pos = pos + 1
                h = self._run(z, mask, pos, cache).last_hidden_state
        finally:
            self._capture = False
        keys = values = None
        if capture_kv:
            H, D = self.num_kv_heads, self.head_dim
            # each captured tensor: (B, 1, H*D) or (B, 1, H, D) -> stack M -> (B, L, H, M, D)
            keys = torch.stack([torch.cat(k, 1).reshape(B, self.num_latents, H, D).transpose(1, 2) for k in self._k], 1)
            values = torch.stack([torch.cat(v, 1).reshape(B, self.num_latents, H, D).transpose(1, 2) for v in self._v], 1)
            for bucket in (*self._k, *self._v):
                bucket.clear()
        return cache, mask, pos[:, 0] + 1, keys, values

    def forward(self, q_ids, q_mask, s_ids, s_mask, answer_start) -> StudentOutput:
        """Teacher-forced latent forward for training.

        Args:
            q_ids, q_mask: (B, Tq) left-padded question tokens.
            s_ids, s_mask: (B, Ts) right-padded answer text ``The answer is: A<eos>``.
            answer_start: (B,) int64 index in ``s_ids`` of the first answer token (>= 1).
        Returns:
            StudentOutput.
        """
        B, Ts = s_ids.shape
        thoughts: list[torch.Tensor] = []
        cache, mask, next_pos, keys, values = self.think(q_ids, q_mask, capture_kv=True, latents_out=thoughts)
        embeds = torch.cat([self.eot.to(self.base.dtype).expand(B, 1, -1), self.embed(s_ids)], 1)  # (B, Ts+1, d)
        full_mask = torch.cat([mask, mask.new_ones(B, 1), s_mask], 1)
        positions = next_pos[:, None] + torch.arange(Ts + 1, device=s_ids.device)[None]
        out = self._run(embeds, full_mask, positions, cache, hidden_states=True)
        logits = self.base.lm_head(out.last_hidden_state[:, :Ts]).float()  # (B, Ts, V): predicts s_0..s_{Ts-1}
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), s_ids, reduction="none")  # (B, Ts)
        tok_mask = s_mask.float()
        ce = (nll * tok_mask).sum() / tok_mask.sum()
        ar = torch.arange(Ts, device=s_ids.device)[None]
        ans_mask = (ar >= answer_start[:, None]) & s_mask.bool()
        # the answer is followed by <eos>; the answer NLL excludes it
        eos_pos = s_mask.sum(1) - 1
        ans_mask &= ar != eos_pos[:, None]
        answer_nll = (nll * ans_mask).sum(1) / ans_mask.sum(1).clamp(min=1)
        # boundary = token before the answer = s_{a0-1}, found at index a0 of [eot, s_0, ...]
        b_idx = torch.arange(B, device=s_ids.device)
        hidden = torch.stack([h[b_idx, answer_start] for h in out.hidden_states], 1).float()  # (B, L+1, d)
        return StudentOutput(
            ce=ce,
            sample_ce=(nll * tok_mask).sum(1) / tok_mask.sum(1).clamp(min=1),
            answer_nll=answer_nll,
            hidden=hidden,
            keys=keys.float(),
            values=values.float(),
            features=hidden[:, -1].detach(),
            latents=torch.cat(thoughts, 1),
        )

    @torch.no_grad()
    def generate(self, q_ids, q_mask, prompt_ids: torch.Tensor, max_new_tokens: int = 16) -> list[list[int]]:
        """Greedy decoding in latent mode: ``Q <bot> z.. <eot> {prompt}`` then new tokens.

        Args:
            q_ids, q_mask: (B, Tq) left-padded questions.
            prompt_ids: (Tp,) ids of the answer prefix (``The answer is:``), shared by the batch.
            max_new_tokens: tokens generated at most; stops at EOS or a newline.
        Returns:
            B lists of generated token ids (EOS excluded).
        """
        B = q_ids.shape[0]
        cache, mask, next_pos, _, _ = self.think(q_ids, q_mask)
        embeds = torch.cat([self.eot.to(self.base.dtype).expand(B, 1, -1), self.embed(prompt_ids[None].expand(B, -1))], 1)
        n = embeds.shape[1]
        mask = torch.cat([mask, mask.new_ones(B, n)], 1)
        positions = next_pos[:, None] + torch.arange(n, device=q_ids.device)[None]
        out = self._run(embeds, mask, positions, cache)
        pos = positions[:, -1:]
        eos = self.tokenizer.eos_token_id
        done = torch.zeros(B, dtype=torch.bool)
        result: list[list[int]] = [[] for _ in range(B)]
        h = out.last_hidden_state[:, -1:]
        for _ in range(max_new_tokens):
            nxt = self.base.lm_head(h).argmax(-1)  # (B, 1)
            for b in range(B):
                if not done[b]:
                    tok = int(nxt[b, 0])
                    # stop at EOS or at any token whose text holds a newline ("\n", ".\n", "\n\n" ...)
                    if tok == eos or "\n" in self.tokenizer.decode([tok]):
                        done[b] = True
                    else:
                        result[b].append(tok)
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            pos = pos + 1
            h = self._run(self.embed(nxt), mask, pos, cache).last_hidden_state
        return result

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Parameters that training changes (LoRA, projection, <bot>/<eot>), by name."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}


def add_latent_tokens(lm, tokenizer) -> None:
    """Add ``<|bot|>``/``<|eot|>`` to the tokenizer and resize the embeddings (mean init).

    Call before wrapping with peft. Idempotent.
    """
    missing = [t for t in (BOT_TOKEN, EOT_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if lm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        # The new rows are frozen and not checkpointed (latent mode feeds learned vectors
        # instead), but a tied LM head scores them: draw them identically at every load, so a
        # rebuilt student (kvkd eval of a run folder) equals the one that trained.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
