"""The float32 GGUF for the llama.cpp peer: same metadata, tensors dequantised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ember.bench.gguf_f32 import write_f32_gguf
from ember.errors import InvalidRequestError


def _quantised_gguf(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    tensors = {"blk.0.ffn_up.weight": rng.standard_normal((8, 64)).astype(np.float32),
               "output_norm.weight": rng.standard_normal(64).astype(np.float32)}  # fmt: skip
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_token_list(["<a>", "b", "c"])
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(7)  # mostly Q8_0
    q8 = GGMLQuantizationType.Q8_0
    up = tensors["blk.0.ffn_up.weight"]
    writer.add_tensor("blk.0.ffn_up.weight", quantize(up, q8), raw_dtype=q8)
    writer.add_tensor("output_norm.weight", tensors["output_norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_tensors_become_float32_and_metadata_stays(tmp_path: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    src, dest = tmp_path / "q.gguf", tmp_path / "f32.gguf"
    original = _quantised_gguf(src)
    write_f32_gguf(src, dest)
    before, after = GGUFReader(src), GGUFReader(dest)
    assert after.fields["general.file_type"].contents() == 0
    for key in ("general.architecture", "llama.block_count", "tokenizer.ggml.tokens", "llama.rope.freq_base"):
        assert after.fields[key].contents() == before.fields[key].contents()
    for b, a in zip(before.tensors, after.tensors, strict=True):
        assert a.name == b.name and a.tensor_type.name == "F32" and a.shape.tolist() == b.shape.tolist()
        np.testing.assert_array_equal(a.data.reshape(-1), dequantize(b.data, b.tensor_type).reshape(-1))
    up = after.tensors[0].data.reshape(8, 64)
    assert np.abs(up - original["blk.0.ffn_up.weight"]).max() < 0.05  # Q8_0's rounding, no more


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(InvalidRequestError, match="cannot read"):
        write_f32_gguf(bad, tmp_path / "out.gguf")
