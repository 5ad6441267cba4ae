"""The Llama family: Llama 2/3 (llama3 rope scaling), SmolLM2, Mistral, Qwen2 (q/k/v bias)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ember.engine.attention import AttentionMetadata, AttentionPlan, PagedKV, paged_attention
from ember.engine.model.causal_lm import CausalLM
from ember.engine.model.layers import (
    SMALL_BATCH_ROWS,
    Linear,
    RotaryTable,
    activation,
    adjacent,
    apply_rotary,
    columns,
    rms_norm,
)
from ember.engine.model.spec import ModelSpec
from ember.engine.model.weights import Weights


class LlamaLayer(nn.Module):
    """Pre-norm attention + gated MLP, with residual adds."""

    def __init__(self, spec: ModelSpec, w: Weights, i: int) -> None:
        super().__init__()
        p = f"layers.{i}."
        self.input_layernorm = w.param(p + "input_layernorm.weight")
        self.post_attention_layernorm = w.param(p + "post_attention_layernorm.weight")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            w.param(f"{p}self_attn.{n}_proj.weight") for n in "qkvo"
        )
        self.q_bias, self.k_bias, self.v_bias, self.o_bias = (
            w.optional(f"{p}self_attn.{n}_proj.bias") for n in "qkvo"
        )
        self.gate_proj, self.up_proj, self.down_proj = (
            w.param(f"{p}mlp.{n}_proj.weight") for n in ("gate", "up", "down")
        )
        self.gate_bias, self.up_bias, self.down_bias = (
            w.optional(f"{p}mlp.{n}_proj.bias") for n in ("gate", "up", "down")
        )
        self.q, self.k, self.v, self.o = (
            Linear(w_, b_)
            for w_, b_ in (
                (self.q_proj, self.q_bias),
                (self.k_proj, self.k_bias),
                (self.v_proj, self.v_bias),
                (self.o_proj, self.o_bias),
            )
        )
        self.gate = Linear(self.gate_proj, self.gate_bias)
        self.up = Linear(self.up_proj, self.up_bias)
        self.down = Linear(self.down_proj, self.down_bias)
        # One product for q, k, v (and one for gate, up) when the weights lie back to
        # back: fewer, larger matrix-vector products in the memory-bound decode step.
        self.qkv = _fused((self.q_proj, self.k_proj, self.v_proj), (self.q_bias, self.k_bias, self.v_bias))
        self.gate_up = _fused((self.gate_proj, self.up_proj), (self.gate_bias, self.up_bias))
        self.eps = spec.norm_eps
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.window = spec.sliding_windows[i]
        self.act = activation(spec.hidden_act)

    def forward(  # type: ignore[override]
        self, x: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, cache: Tensor
    ) -> Tensor:
        """x: [T, hidden] residual stream -> [T, hidden]."""
        t = x.shape[0]
        small = t <= SMALL_BATCH_ROWS
        h = rms_norm(x, self.input_layernorm, self.eps)
        cols = columns(h) if small else None
        nq, nkv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.qkv is not None:
            qkv = self.qkv(h, cols)  # [T, nq + 2 nkv]
            # q and k side by side: one rotation for both, [T, heads + kv_heads, d]
            qk = apply_rotary(qkv[:, : nq + nkv].view(t, -1, self.head_dim), cos, sin)
            q, k, v = qk[:, : self.heads], qk[:, self.heads :], qkv[:, nq + nkv :]
        else:
            q = apply_rotary(self.q(h, cols).view(t, self.heads, self.head_dim), cos, sin)
            k = apply_rotary(self.k(h, cols).view(t, self.kv_heads, self.head_dim), cos, sin)
            v = self.v(h, cols)
        a = paged_attention(q, k, v.reshape(t, self.kv_heads, self.head_dim), cache, plan, self.window)
        x = x + self.o(a)
        h = rms_norm(x, self.post_attention_layernorm, self.eps)
        cols = columns(h) if small else None
        if self.gate_up is not None:
            gu = self.gate_up(h, cols)  # [T, 2 * intermediate]
            half = gu.shape[1] // 2
            return x + self.down(self.act(gu[:, :half]) * gu[:, half:])
        return x + self.down(self.act(self.gate(h, cols)) * self.up(h, cols))


def _fused(weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...]) -> Linear | None:
    """A Linear over adjacent weights (and adjacent biases, or none), else None."""
    weight = adjacent(*weights)
    if weight is None:
        return None
    if all(b is None for b in biases):
        return Linear(weight)
    if any(b is None for b in biases):
        return None
    bias = adjacent(*(b.view(-1, 1) for b in biases if b is not None))
    return None if bias is None else Linear(weight, bias.view(-1))


class LlamaForCausalLM(CausalLM):
    def __init__(self, spec: ModelSpec, w: Weights) -> None:
        super().__init__(spec, w.device)
        self.embed_tokens = w.param("embed_tokens.weight")
        self.layers = nn.ModuleList(LlamaLayer(spec, w, i) for i in range(spec.num_layers))
        self.norm = w.param("norm.weight")
        head = w.optional("lm_head.weight")
        self.lm_head = head if head is not None else self.embed_tokens  # tied
        self.rotary = RotaryTable(
            spec.rope, spec.head_dim, spec.max_position_embeddings, self.embed_tokens.dtype
        )

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata, kv: PagedKV) -> Tensor:
        plan = self.plan(meta, kv)
        cos, sin = self.rotary.lookup(positions)
        self.arrive(self.embed_tokens)
        x = torch.nn.functional.embedding(input_ids, self.embed_tokens)
        for layer, cache in zip(self.layers, kv.layers, strict=True):
            if self.loading is not None:
                self.arrive(layer)
            x = layer.forward(x, cos, sin, plan, cache)
        self.arrive(self.norm)
        return rms_norm(x, self.norm, self.spec.norm_eps)
