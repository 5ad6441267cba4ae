"""The model against transformers: tiny random Llama / Qwen2 / Mistral / OPT in float64,
fed through the paged cache in mixed batches; zero-copy weights; the real SmolLM2."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import transformers

from ember.engine.kv_cache import KVCache
from ember.engine.model import ModelSpec, build_model
from ember.errors import MissingWeightError, UnsupportedModelError
from ember.store import load_tensors, save_tensors
from tests.engine.helpers import all_logits, greedy

BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, max_position_embeddings=128)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        dict(
            BASE, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
        ),
    ),
    "llama3-rope": (
        "LlamaConfig",
        dict(
            BASE,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            BASE,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(BASE, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, sliding_window=7),
    ),
    "opt": ("OPTConfig", dict(BASE, ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=64)),
    "opt-350m-style": (
        "OPTConfig",
        dict(BASE, ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=32, do_layer_norm_before=False),
    ),
}


def hf_model(name: str) -> Any:
    cls_name, kwargs = CONFIGS[name]
    config = getattr(transformers, cls_name)(
        **kwargs, eos_token_id=None, bos_token_id=None, pad_token_id=None, initializer_range=0.3
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.to(torch.float64).eval()
    with torch.no_grad():  # random norms, so the norm weights are exercised too
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def ours(hf: Any, block_size: int = 4, num_blocks: int = 64) -> tuple[Any, KVCache]:
    spec = ModelSpec.from_hf_config(hf.config.to_dict())
    weights = dict(hf.state_dict())
    model = build_model(spec, weights, torch.device("cpu"))
    kv = KVCache(spec, num_blocks, block_size, torch.float64, torch.device("cpu"))
    return model, kv


def tokens(n: int, seed: int, vocab: int = 96) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_in_mixed_batches(name: str) -> None:
    hf = hf_model(name)
    model, kv = ours(hf)
    seqs = [tokens(13, 1), tokens(5, 2), tokens(22, 3)]
    # step 1: seq 0 whole prefill, seq 1 prefill, seq 2 first chunk; step 2: decodes + seq 2's
    # second chunk (context 9, 8 new); then decodes and the last chunk, then decodes only.
    schedule = [[10, 4, 9], [1, 1, 8], [1, 0, 3], [1, 0, 1], [0, 0, 1]]
    got = all_logits(model, kv, seqs, schedule)
    for seq, logits in zip(seqs, got, strict=True):
        with torch.no_grad():
            want = hf(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(logits, want.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "llama3-rope", "qwen2", "mistral"])
def test_fused_projections_over_store_weights_match_transformers(name: str, tmp_path: Path) -> None:
    """Through the store, q/k/v and gate/up lie back to back: one product each, as views."""
    hf = hf_model(name)
    save_tensors(hf.state_dict(), tmp_path / "ckpt")
    weights = load_tensors(tmp_path / "ckpt")
    model = build_model(ModelSpec.from_hf_config(hf.config.to_dict()), weights, torch.device("cpu"))
    layer = model.layers[0]
    assert layer.gate_up is not None
    assert (layer.qkv is None) == (name == "qwen2")  # qwen2's 512-byte biases are not adjacent
    assert layer.gate_up.weight.data_ptr() == weights["model.layers.0.mlp.gate_proj.weight"].data_ptr()
    kv = KVCache(model.spec, 64, 4, torch.float64, torch.device("cpu"))
    seqs = [tokens(13, 1), tokens(5, 2), tokens(22, 3)]
    got = all_logits(model, kv, seqs, [[10, 4, 9], [1, 1, 8], [1, 0, 3], [1, 0, 1], [0, 0, 1]])
    for seq, logits in zip(seqs, got, strict=True):
        with torch.no_grad():
            want = hf(torch.tensor([seq])).logits[0]
        torch.testing.assert_close(logits, want.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_transformers_generate(name: str) -> None:
    hf = hf_model(name)
    model, kv = ours(hf, block_size=4, num_blocks=80)
    prompts = [tokens(9, 4), tokens(3, 5), tokens(17, 6)]
    got = greedy(model, kv, prompts, max_new_tokens=16, chunk=6)
    for prompt, out in zip(prompts, got, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None)
        assert out == ref[0, len(prompt) :].tolist()


def test_weights_are_not_copied() -> None:
    hf = hf_model("llama")
    weights = dict(hf.state_dict())
    model = build_model(ModelSpec.from_hf_config(hf.config.to_dict()), weights, torch.device("cpu"))
    ptrs = {t.data_ptr() for t in weights.values()}
    params = list(model.named_parameters(remove_duplicate=False))
    assert len(params) >= len(weights) - 1
    for pname, p in params:
        assert p.data_ptr() in ptrs, pname
    # tied: the output projection is the embedding itself
    assert model.lm_head.data_ptr() == weights["model.embed_tokens.weight"].data_ptr()


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        ModelSpec.from_hf_config({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})
    assert UnsupportedModelError.status == 422


def test_unsupported_rope_scaling_is_a_clear_error() -> None:
    config = hf_model("llama").config.to_dict()
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelSpec.from_hf_config(config)


def test_missing_weight_names_the_tensor() -> None:
    hf = hf_model("qwen2")
    weights = dict(hf.state_dict())
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(MissingWeightError, match=r"layers\.1\.mlp\.up_proj"):
        build_model(ModelSpec.from_hf_config(hf.config.to_dict()), weights, torch.device("cpu"))


def test_spec_reads_families() -> None:
    qwen = ModelSpec.from_hf_config(hf_model("qwen2").config.to_dict())
    assert (qwen.qkv_bias, qwen.o_bias, qwen.num_kv_heads) == (True, False, 1)
    mistral = ModelSpec.from_hf_config(hf_model("mistral").config.to_dict())
    assert mistral.sliding_windows == (7, 7)
    opt = ModelSpec.from_hf_config(hf_model("opt-350m-style").config.to_dict())
    assert (opt.arch, opt.do_layer_norm_before, opt.final_layer_norm) == ("opt", False, False)
    assert opt.kv_bytes_per_token(torch.float32) == 2 * 2 * 4 * 16 * 4


def test_building_on_loaded_checkpoint_adds_no_weight_memory(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        vocab_size=16000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=512,
    ).to_dict()
    spec = ModelSpec.from_hf_config(config)
    shapes = {
        "model.embed_tokens.weight": (16000, 768),
        "model.norm.weight": (768,),
        "lm_head.weight": (16000, 768),
    }
    for i in range(6):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (768,), p + "post_attention_layernorm.weight": (768,)}
        shapes |= {p + f"self_attn.{n}_proj.weight": (768, 768) for n in "qo"}
        shapes |= {p + f"self_attn.{n}_proj.weight": (256, 768) for n in "kv"}
        shapes |= {p + "mlp.gate_proj.weight": (2048, 768), p + "mlp.up_proj.weight": (2048, 768)}
        shapes[p + "mlp.down_proj.weight"] = (768, 2048)
    save_tensors({n: torch.randn(s) for n, s in shapes.items()}, tmp_path / "ckpt")
    weights = load_tensors(tmp_path / "ckpt")
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    assert nbytes > 200e6
    gc.collect()
    rss = psutil.Process().memory_info().rss
    model = build_model(spec, weights, torch.device("cpu"))
    growth = psutil.Process().memory_info().rss - rss
    assert growth < 0.02 * nbytes, f"building grew RSS by {growth / 1e6:.1f} MB for {nbytes / 1e6:.0f} MB"
    for name, p in model.named_parameters():
        assert any(p.data_ptr() == t.data_ptr() for t in weights.values()), name
    # and it runs on those views
    kv = KVCache(spec, 4, 4, torch.float32, torch.device("cpu"))
    out = greedy(model, kv, [[1, 2, 3]], max_new_tokens=2)
    assert len(out[0]) == 2


# --- the real SmolLM2-135M-Instruct: Ember's import of its GGUF against transformers' ---

# Chosen so that the reference's top-2 logit gap stays >= 0.05 at every one of the 32
# greedy steps (ours differs from transformers by ~1e-4). Dropped: "List three prime
# numbers." (gap 0.0028 at step 10: a near-tie either side may legitimately take).
SMOL_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU cache is in one sentence.",
    "How do I boil an egg?",
    "What is 2 + 2?",
    "Give me a fun fact about octopuses.",
]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_smollm2_greedy_matches_transformers(smollm2_reference: Any, smollm2_checkpoint: Path) -> None:
    hf, tok = smollm2_reference
    # The checkpoint `ember store import` made from the GGUF, loaded as served: q/k/v
    # and gate/up then run as fused products.
    spec = ModelSpec.from_hf_config(json.loads((smollm2_checkpoint / "model" / "config.json").read_text()))
    weights = load_tensors(smollm2_checkpoint)
    model = build_model(spec, weights, torch.device("cpu"))
    assert model.layers[0].qkv is not None and model.layers[0].gate_up is not None
    assert model.lm_head.data_ptr() == weights["model.embed_tokens.weight"].data_ptr()
    stored_tok = transformers.AutoTokenizer.from_pretrained(smollm2_checkpoint / "model")
    prompts = []
    for text in SMOL_PROMPTS:
        chat = [{"role": "user", "content": text}]
        ids = tok.apply_chat_template(chat, add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
        stored = stored_tok.apply_chat_template(chat, add_generation_prompt=True)
        assert list(stored["input_ids"] if hasattr(stored, "keys") else stored) == prompts[-1]
    kv = KVCache(spec, 128, 16, torch.float32, torch.device("cpu"))
    got = greedy(model, kv, prompts, max_new_tokens=32, chunk=20)
    for text, prompt, out in zip(SMOL_PROMPTS, prompts, got, strict=True):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            # an explicit mask: with eos_token_id=None, generate would mask the prompt's
            # <|im_end|> tokens as padding (pad id 2)
            ref = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                output_logits=True,
                return_dict_in_generate=True,
            )
        top2 = torch.stack([step[0].topk(2).values for step in ref.logits])
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, f"near-tie in the reference for {text!r}"
        assert out == ref.sequences[0, len(prompt) :].tolist(), text
