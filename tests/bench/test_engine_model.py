"""The engine-model benchmark functions run end to end on a tiny model (no timing asserts)."""

from __future__ import annotations

import pytest
import torch
import transformers

from ember.bench.engine_model import compare, measure_bandwidth_floor, time_decode, weight_bytes
from ember.engine.model import ModelSpec, build_model


def tiny() -> tuple[object, object]:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    model = build_model(
        ModelSpec.from_hf_config(config.to_dict()), dict(hf.state_dict()), torch.device("cpu")
    )
    return model, hf


def test_weight_bytes_counts_tied_embedding_once() -> None:
    model, hf = tiny()
    assert weight_bytes(model) == sum(p.numel() * 4 for p in hf.parameters())  # type: ignore[attr-defined]


def test_bandwidth_floor_is_weights_over_bandwidth() -> None:
    bw = measure_bandwidth_floor(10 << 20, buffer_bytes=16 << 20, repeats=2)
    assert bw.bytes_per_s > 0
    assert bw.floor_s == pytest.approx((10 << 20) / bw.bytes_per_s)


def test_decode_and_comparison_run() -> None:
    model, hf = tiny()
    assert time_decode(model, 2, context_len=8, steps=2) > 0  # type: ignore[arg-type]
    rows = compare(model, hf, batches=(1, 2), prompt_len=16, context_len=8, rounds=1)  # type: ignore[arg-type]
    assert [r.label for r in rows] == ["prefill 16", "decode b1", "decode b2"]
    assert all(r.ours_tps > 0 and r.hf_tps > 0 for r in rows)
