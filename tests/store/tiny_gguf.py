"""Tiny GGUF files written with the gguf package the way llama.cpp's converter lays
them out (q/k rows permuted for "llama", mixed quantisation types, a byte-level BPE
vocabulary with a chat template), for import tests that run in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

Q = GGMLQuantizationType
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 96, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w", "o r"]
# one of each storage type the importer meets, per tensor role
TYPES = {
    "token_embd": Q.Q8_0,
    "attn_q": Q.Q4_1,
    "attn_k": Q.F32,  # exact: the un-permuted rows must be the original ones
    "attn_v": Q.F16,
    "attn_output": Q.Q4_0,
    "ffn_gate": Q.Q4_1,
    "ffn_up": Q.BF16,
    "ffn_down": Q.Q8_0,
    "output": Q.Q5_1,
}
_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def byte_tokens() -> list[str]:
    """GPT-2's byte alphabet: each byte spelt as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    spelt, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelt[b] = chr(b)
        else:
            spelt[b] = chr(256 + extra)
            extra += 1
    return [spelt[b] for b in range(256)]


def vocabulary() -> tuple[list[str], list[int]]:
    tokens = [*SPECIAL, *byte_tokens(), "he", "ll", "hell", "Ġw", "or"]
    types = [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))  # 3: control, 1: normal
    return tokens, types


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's converter: per head, rows [x..., y...] -> [x0, y0, x1, y1, ...]
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: Path, arch: str = "llama", *, tied: bool = True, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Write a 2-layer model of `arch` ("llama" or "qwen2") to `path`; returns its
    weights before quantisation, under Hugging Face names (q/k in Hugging Face order)."""
    rng = np.random.default_rng(seed)
    tokens, token_types = vocabulary()
    vocab = len(tokens)
    hf: dict[str, np.ndarray] = {}
    writer = GGUFWriter(str(path), arch)
    _metadata(writer, arch, tokens, token_types)

    def add(gguf_name: str, hf_name: str, w: np.ndarray, qtype: GGMLQuantizationType) -> None:
        hf[hf_name] = w
        stored = w
        if arch == "llama" and ".attn_q." in gguf_name:
            stored = _permute(w, HEADS)
        elif arch == "llama" and ".attn_k." in gguf_name:
            stored = _permute(w, KV_HEADS)
        if qtype == Q.F32:
            writer.add_tensor(gguf_name, stored.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name, stored.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, quants.quantize(stored, qtype), raw_dtype=qtype)

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    add("token_embd.weight", "model.embed_tokens.weight", rand(vocab, HIDDEN), TYPES["token_embd"])
    for i in range(LAYERS):
        # in the order llama.cpp writes a layer (SmolLM2's file): not q, k, v together
        attn_norm = 1 + rand(HIDDEN)
        add(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.{_HF['attn_norm']}.weight", attn_norm, Q.F32)
        shapes = {
            "ffn_down": (HIDDEN, FFN),
            "ffn_gate": (FFN, HIDDEN),
            "ffn_up": (FFN, HIDDEN),
            "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
            "attn_output": (HIDDEN, HIDDEN),
            "attn_q": (HIDDEN, HIDDEN),
            "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
        }
        for part, shape in shapes.items():
            add(f"blk.{i}.{part}.weight", f"model.layers.{i}.{_HF[part]}.weight", rand(*shape), TYPES[part])
            if part == "ffn_up":
                ffn_norm = 1 + rand(HIDDEN)
                add(f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.{_HF['ffn_norm']}.weight", ffn_norm, Q.F32)
        if arch == "qwen2":
            for part, rows in (
                ("attn_q", HIDDEN),
                ("attn_k", KV_HEADS * HEAD_DIM),
                ("attn_v", KV_HEADS * HEAD_DIM),
            ):
                add(f"blk.{i}.{part}.bias", f"model.layers.{i}.{_HF[part]}.bias", rand(rows), Q.F32)
    add("output_norm.weight", "model.norm.weight", 1 + rand(HIDDEN), Q.F32)
    if not tied:
        add("output.weight", "lm_head.weight", rand(vocab, HIDDEN), TYPES["output"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf.items()}


def _metadata(writer: GGUFWriter, arch: str, tokens: list[str], token_types: list[int]) -> None:
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
