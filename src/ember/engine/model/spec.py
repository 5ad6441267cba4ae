"""ModelSpec: what the engine needs to know about a model, read from a Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ember.errors import UnsupportedModelError

# model_type -> the family of code that runs it
_LLAMA_TYPES = {"llama", "mistral", "qwen2"}
_ACTIVATIONS = {"silu", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh"}


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters. `kind` is "default", "linear" or "llama3"."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    """The shape and options of a decoder-only model, independent of its weights."""

    arch: Literal["llama", "opt"]
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    rope: RopeSpec = RopeSpec()
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    o_bias: bool = False
    mlp_bias: bool = False
    # per layer: attention window in tokens (Mistral, Qwen2 with use_sliding_window), None = full
    sliding_windows: tuple[int | None, ...] = ()
    # OPT only
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int = 0
    layer_norm_affine: bool = True
    final_layer_norm: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None

    @property
    def gqa_group(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelSpec:
        """Read a config.json dict. Raises UnsupportedModelError for an architecture or
        option this engine does not run."""
        model_type = str(config.get("model_type", ""))
        if model_type in _LLAMA_TYPES:
            spec = _llama_spec(config, model_type)
        elif model_type == "opt":
            spec = _opt_spec(config)
        else:
            archs = config.get("architectures") or [model_type or "unknown"]
            raise UnsupportedModelError(
                f"model type {model_type!r} ({', '.join(map(str, archs))}) is not supported; "
                f"supported: {', '.join(sorted(_LLAMA_TYPES | {'opt'}))}"
            )
        if spec.hidden_act not in _ACTIVATIONS:
            raise UnsupportedModelError(f"activation {spec.hidden_act!r} is not supported")
        if spec.num_heads % spec.num_kv_heads:
            raise UnsupportedModelError(
                f"{spec.num_heads} attention heads do not divide into {spec.num_kv_heads} key/value heads"
            )
        return spec

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V cache one token takes across all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def _eos_ids(config: dict[str, Any]) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


def _rope(config: dict[str, Any]) -> RopeSpec:
    # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = str(params.get("rope_type", params.get("type", "default")))
    if kind == "default":
        return RopeSpec(theta=theta)
    if kind == "linear":
        return RopeSpec(theta=theta, kind=kind, factor=float(params["factor"]))
    if kind == "llama3":
        return RopeSpec(
            theta=theta,
            kind=kind,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (default, linear, llama3 are)")


def _windows(config: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    if model_type == "mistral" and window:
        return (int(window),) * num_layers
    if model_type == "qwen2" and window and config.get("use_sliding_window"):
        # Qwen2 applies the window from layer max_window_layers onwards
        first = int(config.get("max_window_layers", 0))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


def _llama_spec(config: dict[str, Any], model_type: str) -> ModelSpec:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    bias = bool(config.get("attention_bias", model_type == "qwen2"))
    return ModelSpec(
        arch="llama",
        model_type=model_type,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate_size=int(config["intermediate_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        hidden_act=str(config.get("hidden_act", "silu")),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope=_rope(config),
        qkv_bias=bias,
        o_bias=bias and model_type != "qwen2",
        mlp_bias=bool(config.get("mlp_bias", False)),
        sliding_windows=_windows(config, model_type, layers),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_eos_ids(config),
        torch_dtype=config.get("torch_dtype") or config.get("dtype"),
    )


def _opt_spec(config: dict[str, Any]) -> ModelSpec:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    before = bool(config.get("do_layer_norm_before", True))
    bias = bool(config.get("enable_bias", True))
    return ModelSpec(
        arch="opt",
        model_type="opt",
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(config["ffn_dim"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        hidden_act=str(config.get("activation_function", "relu")),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        sliding_windows=(None,) * layers,
        do_layer_norm_before=before,
        word_embed_proj_dim=int(config.get("word_embed_proj_dim") or hidden),
        layer_norm_affine=bool(config.get("layer_norm_elementwise_affine", True)),
        final_layer_norm=before and not bool(config.get("_remove_final_layer_norm", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_eos_ids(config),
        torch_dtype=config.get("torch_dtype") or config.get("dtype"),
    )
