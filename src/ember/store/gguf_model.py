"""A GGUF file as a Hugging Face model, for the architectures Ember's engine runs
(llama.cpp's "llama": Llama 2/3, SmolLM2, Mistral; and "qwen2"): Hugging Face tensor
names, config fields and tokenizer, from one parse of the file.

What comes out is what transformers' GGUF loader gives (`from_pretrained(...,
gguf_file=...)`, tested against it): the same config fields, the same float32 values,
q/k rows put back in Hugging Face's order. It is built here directly, without a
transformers model in between and without re-reading the file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ember.errors import UnsupportedFeatureError
from ember.store.gguf_file import GgufFile

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DIRECT_ARCHITECTURES = ("llama", "qwen2")

# "<arch>.<key>" in the GGUF metadata -> the transformers config field
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_TOKEN_IDS = {  # "tokenizer.ggml.<key>" -> (config field, tokenizer attribute)
    "bos_token_id": ("bos_token_id", "bos_token"),
    "eos_token_id": ("eos_token_id", "eos_token"),
    "unknown_token_id": ("unk_token_id", "unk_token"),
    "padding_token_id": ("pad_token_id", "pad_token"),
}
# "tokenizer.ggml.<key>" -> the key transformers' tokenizer builder reads it under
_TOKENIZER_KEYS = {
    "model": "tokenizer_type",
    "pre": "pre_tokenizer_type",
    "tokens": "tokens",
    "scores": "scores",
    "token_type": "token_type",
    "merges": "merges",
    "precompiled_charsmap": "precompiled_charsmap",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id",
    "padding_token_id": "pad_token_id",
    "add_space_prefix": "add_prefix_space",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SKIPPED = {"rope_freqs.weight"}  # llama 3's rope factors: transformers drops them too
# Where each tensor goes in the checkpoint (GGUF files list a layer's tensors in another
# order): q, k, v back to back and gate, up back to back let the engine run each group
# as one product over the stored bytes, as with a checkpoint saved from transformers.
_GLOBAL_ORDER = {"model.embed_tokens.weight": 0, "model.norm.weight": 2, "lm_head.weight": 3}
_LAYER_MODULES = (
    *("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    *("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"),
)
_LAYER_ORDER = [f"{module}.{kind}" for kind in ("weight", "bias") for module in _LAYER_MODULES]


def config_fields(gguf: GgufFile) -> dict[str, Any]:
    """The transformers config fields the file's metadata states, with `model_type`."""
    md = gguf.metadata
    arch = gguf.architecture
    # transformers calls a "llama" file Mistral only when it is named exactly "mistral"
    model_type = "mistral" if arch == "llama" and md.get("general.name") == "mistral" else arch
    fields: dict[str, Any] = {"model_type": model_type}
    if "general.name" in md:
        fields["_model_name_or_path"] = md["general.name"]
    # llama.cpp writes the output projection only when it is not the embedding matrix
    fields["tie_word_embeddings"] = all(t.name != "output.weight" for t in gguf.tensors)
    for key, field in _CONFIG_KEYS.items():
        if f"{arch}.{key}" in md:
            fields[field] = md[f"{arch}.{key}"]
    if arch == "llama" and f"{arch}.rope.dimension_count" in md:
        fields["head_dim"] = md[f"{arch}.rope.dimension_count"]  # the head size, for llama files
    for key, (field, _) in _TOKEN_IDS.items():
        if f"tokenizer.ggml.{key}" in md:
            fields[field] = md[f"tokenizer.ggml.{key}"]
    if "vocab_size" not in fields and "tokenizer.ggml.tokens" in md:
        fields["vocab_size"] = len(md["tokenizer.ggml.tokens"])
    return fields


def hf_name(gguf_name: str) -> str | None:
    """llama.cpp's tensor name -> Hugging Face's (None for one transformers drops too)."""
    if gguf_name in _SKIPPED:
        return None
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 1 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    raise UnsupportedFeatureError(f"GGUF tensor {gguf_name} has no Hugging Face counterpart Ember knows")


def checkpoint_position(name: str) -> tuple[int, int, int]:
    """Sort key putting Hugging Face names in the order the checkpoint stores them."""
    if name.startswith("model.layers."):
        _, _, layer, rest = name.split(".", 3)
        where = _LAYER_ORDER.index(rest) if rest in _LAYER_ORDER else len(_LAYER_ORDER)
        return 1, int(layer), where
    return _GLOBAL_ORDER.get(name, 4), 0, 0


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. For each head, Hugging Face keeps the rotary
    halves as two blocks of rows [x0..x{h-1}, y0..y{h-1}]; llama.cpp interleaves them
    [x0, y0, x1, y1, ...]. w: [heads * 2h, ...] -> the same shape, rows reordered."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_tensors(
    gguf: GgufFile, fields: dict[str, Any], progress: Callable[[int, int], None]
) -> dict[str, torch.Tensor]:
    """Every tensor dequantised to float32 under its Hugging Face name, in checkpoint
    order. `progress(done, total)` counts float32 bytes produced."""
    heads = int(fields.get("num_attention_heads", 0))
    kv_heads = int(fields.get("num_key_value_heads", heads))
    permuted = gguf.architecture == "llama"  # llama.cpp permutes q/k only for rotary "llama" files
    plan = [(t, name) for t in gguf.tensors if (name := hf_name(t.name)) is not None]
    plan.sort(key=lambda item: checkpoint_position(item[1]))
    total = sum(t.numel * 4 for t, _ in plan)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    progress(0, total)
    out: dict[str, torch.Tensor] = {}
    for tensor, name in plan:
        w = gguf.dequantize(tensor, advance)
        if permuted and heads and ".self_attn.q_proj." in name:
            w = unpermute_rows(w, heads)
        elif permuted and kv_heads and ".self_attn.k_proj." in name:
            w = unpermute_rows(w, kv_heads)
        out[name] = torch.from_numpy(np.ascontiguousarray(w))
    return out


def output_bytes(gguf: GgufFile) -> int:
    """Bytes of float32 the converted tensors take."""
    return sum(t.numel * 4 for t in gguf.tensors if t.name not in _SKIPPED)


def build_config(fields: dict[str, Any]) -> PretrainedConfig:
    """The transformers config for these fields (as its GGUF loader builds it)."""
    from ember.store.model_files import make_config

    return make_config(fields)


def generation_config_json(config: PretrainedConfig) -> bytes:
    """generation_config.json as transformers derives it from the model config."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_model_config(config)
    return gen.to_json_string(use_diff=True).encode()


def build_tokenizer(gguf: GgufFile, config: PretrainedConfig) -> PreTrainedTokenizerBase | None:
    """The tokenizer the metadata describes, built by transformers' GGUF tokenizer
    builder from the already parsed vocabulary, in the class AutoTokenizer picks for
    `config`; None if the file has no tokenizer. Raises ImportError on a transformers
    without that builder (the caller then falls back to transformers' own loading)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    md = gguf.metadata
    if "tokenizer.ggml.tokens" not in md:
        return None
    present = [(key, name) for key, name in _TOKENIZER_KEYS.items() if f"tokenizer.ggml.{key}" in md]
    spec = {name: md[f"tokenizer.ggml.{key}"] for key, name in present}
    init: dict[str, Any] = {}
    if "tokenizer.chat_template" in md:
        init["chat_template"] = md["tokenizer.chat_template"]
    for flag in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{flag}" in md:
            init[flag] = md[f"tokenizer.ggml.{flag}"]
    if spec.get("tokenizer_type") == "llama":
        init.setdefault("add_bos_token", True)  # llama.cpp adds BOS to sentencepiece vocabularies
    tokens = spec["tokens"]
    for key, (_, attr) in _TOKEN_IDS.items():
        token_id = md.get(f"tokenizer.ggml.{key}")
        init[attr] = tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None
    backend, extra = convert_gguf_tokenizer(gguf.architecture, spec)
    cls: Any = TOKENIZER_MAPPING.get(type(config), PreTrainedTokenizerFast)
    if isinstance(cls, tuple):  # older transformers: (slow, fast)
        cls = cls[1] or cls[0]
    if cls is None or cls.__name__ == "MistralCommonBackend":  # for Mistral's own files, not GGUF
        cls = PreTrainedTokenizerFast
    tokenizer: PreTrainedTokenizerBase = cls(tokenizer_object=backend, **{**init, **extra})
    return tokenizer
