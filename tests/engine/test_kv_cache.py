"""KVCache: sizing and swapping blocks out to host memory and back."""

from __future__ import annotations

import torch

from ember.engine.kv_cache import KVCache, num_blocks_for_budget
from ember.engine.model import ModelSpec

SPEC = ModelSpec(
    arch="llama",
    model_type="llama",
    vocab_size=32,
    hidden_size=16,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    intermediate_size=32,
    max_position_embeddings=64,
    sliding_windows=(None,) * 3,
)


def test_budget_counts_every_layer_k_and_v() -> None:
    per_token = 2 * 3 * 2 * 4 * 4  # K and V, layers, kv heads, head_dim, float32 bytes
    assert SPEC.kv_bytes_per_token(torch.float32) == per_token
    assert num_blocks_for_budget(SPEC, per_token * 16 * 10 + 5, 16, torch.float32) == 10
    kv = KVCache(SPEC, 10, 16, torch.float32, torch.device("cpu"))
    assert kv.block_bytes == per_token * 16
    assert kv.keys[0].shape == kv.values[0].shape == (11, 16, 2, 4)  # + the zero null block
    assert kv.layers[0].shape == (11, 16, 2, 2, 4)  # K and V side by side
    assert kv.keys[0][kv.null_block].eq(0).all()
    kv.keys[1][3, 5] = 7.0  # the views write through to the layer's tensor
    assert kv.layers[1][3, 5, 0].eq(7.0).all() and not kv.layers[1][3, 5, 1].eq(7.0).all()


def test_blocks_round_trip_through_host_memory() -> None:
    kv = KVCache(SPEC, 8, 4, torch.float32, torch.device("cpu"))
    torch.manual_seed(0)
    for t in kv.layers:
        t[:8].copy_(torch.randn_like(t[:8]))
    before = [(k.clone(), v.clone()) for k, v in zip(kv.keys, kv.values, strict=True)]
    host = kv.copy_blocks_out([1, 6, 3])
    assert len(host) == SPEC.num_layers and host[0].device.type == "cpu"
    for t in kv.layers:
        t[:8].zero_()
    kv.copy_blocks_in([2, 0, 5], host)  # swapped back in to other blocks
    for layer, (k0, v0) in enumerate(before):
        for src, dst in ((1, 2), (6, 0), (3, 5)):
            assert torch.equal(kv.keys[layer][dst], k0[src])
            assert torch.equal(kv.values[layer][dst], v0[src])
        assert kv.keys[layer][1].eq(0).all()
