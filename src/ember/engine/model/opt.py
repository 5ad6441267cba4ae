"""OPT: learned positions (offset 2), layer norm before or after each block, biases,
ReLU, and project_in/out when word_embed_proj_dim differs from hidden_size."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ember.engine.attention import AttentionMetadata, AttentionPlan, PagedKV, paged_attention
from ember.engine.model.causal_lm import CausalLM
from ember.engine.model.layers import activation, layer_norm, linear
from ember.engine.model.spec import ModelSpec
from ember.engine.model.weights import Weights

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2


class OPTLayer(nn.Module):
    def __init__(self, spec: ModelSpec, w: Weights, i: int) -> None:
        super().__init__()
        p = f"layers.{i}."
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            w.param(f"{p}self_attn.{n}.weight") for n in ("q_proj", "k_proj", "v_proj", "out_proj")
        )
        self.q_bias, self.k_bias, self.v_bias, self.out_bias = (
            w.optional(f"{p}self_attn.{n}.bias") for n in ("q_proj", "k_proj", "v_proj", "out_proj")
        )
        self.fc1, self.fc2 = w.param(p + "fc1.weight"), w.param(p + "fc2.weight")
        self.fc1_bias, self.fc2_bias = w.optional(p + "fc1.bias"), w.optional(p + "fc2.bias")
        self.attn_ln_w = w.optional(p + "self_attn_layer_norm.weight")
        self.attn_ln_b = w.optional(p + "self_attn_layer_norm.bias")
        self.ffn_ln_w = w.optional(p + "final_layer_norm.weight")
        self.ffn_ln_b = w.optional(p + "final_layer_norm.bias")
        self.before = spec.do_layer_norm_before
        self.eps = spec.norm_eps
        self.heads, self.head_dim = spec.num_heads, spec.head_dim
        self.act = activation(spec.hidden_act)

    def forward(  # type: ignore[override]
        self, x: Tensor, plan: AttentionPlan, cache: Tensor
    ) -> Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        t = x.shape[0]
        h = layer_norm(x, self.attn_ln_w, self.attn_ln_b, self.eps) if self.before else x
        q = linear(h, self.q_proj, self.q_bias).view(t, self.heads, self.head_dim)
        k = linear(h, self.k_proj, self.k_bias).view(t, self.heads, self.head_dim)
        v = linear(h, self.v_proj, self.v_bias).view(t, self.heads, self.head_dim)
        a = paged_attention(q, k, v, cache, plan)
        x = x + linear(a, self.out_proj, self.out_bias)
        if not self.before:
            x = layer_norm(x, self.attn_ln_w, self.attn_ln_b, self.eps)
        h = layer_norm(x, self.ffn_ln_w, self.ffn_ln_b, self.eps) if self.before else x
        x = x + linear(self.act(linear(h, self.fc1, self.fc1_bias)), self.fc2, self.fc2_bias)
        if not self.before:
            x = layer_norm(x, self.ffn_ln_w, self.ffn_ln_b, self.eps)
        return x


class OPTForCausalLM(CausalLM):
    def __init__(self, spec: ModelSpec, w: Weights) -> None:
        super().__init__(spec, w.device)
        self.embed_tokens = w.param("embed_tokens.weight")
        self.embed_positions = w.param("embed_positions.weight")
        self.project_in = w.optional("project_in.weight")
        self.project_out = w.optional("project_out.weight")
        self.layers = nn.ModuleList(OPTLayer(spec, w, i) for i in range(spec.num_layers))
        self.final_ln_w = w.optional("final_layer_norm.weight") if spec.final_layer_norm else None
        self.final_ln_b = w.optional("final_layer_norm.bias") if spec.final_layer_norm else None
        head = Weights(w.tensors, w.device, ("",)).optional("lm_head.weight")
        self.lm_head = head if head is not None else self.embed_tokens  # tied

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata, kv: PagedKV) -> Tensor:
        plan = self.plan(meta, kv)
        self.arrive(self.embed_tokens, self.project_in, self.embed_positions)
        x = torch.nn.functional.embedding(input_ids, self.embed_tokens)
        if self.project_in is not None:
            x = linear(x, self.project_in)
        x = x + torch.nn.functional.embedding(positions + POSITION_OFFSET, self.embed_positions)
        for layer, cache in zip(self.layers, kv.layers, strict=True):
            if self.loading is not None:
                self.arrive(layer)
            x = layer.forward(x, plan, cache)
        self.arrive(self.final_ln_w, self.final_ln_b)
        if self.spec.final_layer_norm:
            x = layer_norm(x, self.final_ln_w, self.final_ln_b, self.eps)
        return x

    @property
    def eps(self) -> float:
        return self.spec.norm_eps
