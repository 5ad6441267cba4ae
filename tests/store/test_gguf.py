"""GGUF imports on tiny files: the same tensors, config, tokenizer and generation
config as transformers' GGUF loader; q/k rows back in Hugging Face's order; one
progress over the whole import; files that are not GGUF refused clearly."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ember.errors import InvalidRequestError, UnsupportedFeatureError
from ember.store import gguf_model, load_tensors, read_index
from ember.store.gguf_file import read_gguf_file
from ember.store.gguf_model import hf_name
from ember.store.import_progress import DEQUANTISE, DONE, PARSE, SYNC, TOKENIZER, VERIFY, WRITE
from ember.store.importer import import_checkpoint
from ember.store.local import LocalStore
from ember.store.model_files import config_json, tokenizer_files
from tests.store.tiny_gguf import CHAT_TEMPLATE, vocabulary, write_tiny_gguf

CASES = {"llama-tied": ("llama", True), "qwen2-untied": ("qwen2", False)}
TEXTS = ["hello world", " hell or  heaven\n", "<|im_start|>user\nhi<|im_end|>", "ünïcödé ☃"]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("tiny-gguf")
    out = {}
    for case, (arch, tied) in CASES.items():
        path = root / case / f"{case}.gguf"
        path.parent.mkdir()
        out[case] = (path, write_tiny_gguf(path, arch, tied=tied))
    return out


def _reference(path: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_gguf_import_matches_transformers(gguf_files: dict[str, Any], case: str) -> None:
    path, _ = gguf_files[case]
    result = import_checkpoint(path, "tiny")
    loaded = load_tensors(result.path, verify=True)
    ref_model, ref_tok = _reference(path)

    expected = ref_model.state_dict()
    assert set(loaded) == set(expected)
    for name, t in expected.items():
        assert loaded[name].dtype == torch.float32, name
        assert torch.equal(loaded[name], t), name
    tied = CASES[case][1]
    same_storage = loaded["lm_head.weight"].data_ptr() == loaded["model.embed_tokens.weight"].data_ptr()
    assert same_storage == tied

    model_dir = result.path / "model"
    stored_config = json.loads((model_dir / "config.json").read_text())
    want_config = json.loads(config_json(ref_model.config, "float32"))
    assert _without(stored_config, "_name_or_path") == _without(want_config, "_name_or_path")
    want_gen = json.loads(ref_model.generation_config.to_json_string(use_diff=True))
    assert json.loads((model_dir / "generation_config.json").read_text()) == want_gen

    want_files = tokenizer_files(ref_tok)
    assert (model_dir / "tokenizer.json").read_bytes() == want_files["tokenizer.json"]
    local = ("is_local", "local_files_only")  # how transformers was called, not the tokenizer
    stored_tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert _without(stored_tok_config, *local) == _without(
        json.loads(want_files["tokenizer_config.json"]), *local
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    chat = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(chat, tokenize=False)
    assert tok.chat_template == CHAT_TEMPLATE


@pytest.mark.timeout(120)
def test_other_architectures_go_through_transformers_loader(
    gguf_files: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = gguf_files["llama-tied"]
    direct = load_tensors(import_checkpoint(path, "direct").path)
    monkeypatch.setattr(gguf_model, "DIRECT_ARCHITECTURES", ())  # as for an architecture not converted here
    calls: list[tuple[str, int, int]] = []
    result = import_checkpoint(path, "through-transformers", progress=lambda *call: calls.append(call))
    through = load_tensors(result.path, verify=True)
    assert set(through) == set(direct)
    for name, t in direct.items():
        assert torch.equal(through[name], t), name
    assert calls[-1][0] == DONE and calls[-1][1] == calls[-1][2] > 0
    assert AutoTokenizer.from_pretrained(result.path / "model").chat_template == CHAT_TEMPLATE


def test_llama_q_and_k_come_back_in_hugging_face_row_order(gguf_files: dict[str, Any]) -> None:
    path, original = gguf_files["llama-tied"]
    loaded = load_tensors(import_checkpoint(path, "tiny").path)
    for i in range(2):
        k = f"model.layers.{i}.self_attn.k_proj.weight"  # stored as F32: exact
        assert torch.equal(loaded[k], original[k])
        q = f"model.layers.{i}.self_attn.q_proj.weight"  # Q4_1: within a quantisation step
        err = (loaded[q] - original[q]).abs().max().item()
        assert err < 0.1 * original[q].abs().max().item()
    assert torch.equal(loaded["model.norm.weight"], original["model.norm.weight"])


def test_a_layers_q_k_v_and_gate_up_are_stored_back_to_back(gguf_files: dict[str, Any]) -> None:
    # the engine runs each group as one product over the stored bytes when they are
    path, _ = gguf_files["llama-tied"]
    index = read_index(import_checkpoint(path, "tiny").path)
    for i in range(2):
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            parts = [index.tensors[f"model.layers.{i}.{_module(p)}.{p}.weight"] for p in group]
            for a, b in itertools.pairwise(parts):
                assert (b.partition, b.offset) == (a.partition, a.offset + a.nbytes), group


def _module(proj: str) -> str:
    return "self_attn" if proj in ("q_proj", "k_proj", "v_proj") else "mlp"


def test_one_progress_runs_over_every_stage(gguf_files: dict[str, Any]) -> None:
    path, _ = gguf_files["llama-tied"]
    calls: list[tuple[str, int, int]] = []
    import_checkpoint(path, "tiny", progress=lambda stage, done, total: calls.append((stage, done, total)))
    stages = [s for i, (s, _, _) in enumerate(calls) if i == 0 or calls[i - 1][0] != s]
    assert stages == [PARSE, DEQUANTISE, TOKENIZER, WRITE, SYNC, VERIFY, DONE]
    planned = [(d, t) for _, d, t in calls if t > 0]
    totals = {t for _, t in planned}
    assert len(totals) == 1  # the whole import's size, fixed once planned
    dones = [d for d, _ in planned]
    assert dones == sorted(dones) and dones[-1] == planned[-1][1]
    assert len(set(dones)) > 8  # it moves within stages, not only between them
    by_stage = {s: max(d for st, d, t in calls if st == s and t) for s in stages if s != PARSE}
    assert 0 < by_stage[DEQUANTISE] < by_stage[WRITE] < by_stage[VERIFY] <= by_stage[DONE]


def test_parsing_reads_every_metadata_value(gguf_files: dict[str, Any]) -> None:
    path, _ = gguf_files["qwen2-untied"]
    gguf = read_gguf_file(path)
    tokens, types = vocabulary()
    assert gguf.architecture == "qwen2"
    assert gguf.metadata["tokenizer.ggml.tokens"] == tokens
    assert gguf.metadata["tokenizer.ggml.token_type"] == types
    assert gguf.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert gguf.metadata["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert gguf.metadata["tokenizer.ggml.add_bos_token"] is False
    embd = next(t for t in gguf.tensors if t.name == "token_embd.weight")
    assert embd.shape == (len(tokens), 64)
    assert gguf.dequantize(embd).shape == (len(tokens), 64)


def test_a_file_that_is_not_gguf_or_cut_short_is_refused(tmp_path: Path, gguf_files: dict[str, Any]) -> None:
    path, _ = gguf_files["llama-tied"]
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 50])  # inside the vocabulary
    with pytest.raises(InvalidRequestError, match=r"cut\.gguf"):
        import_checkpoint(cut, "x")
    tail = tmp_path / "tail.gguf"
    tail.write_bytes(data[: len(data) - 100])  # the header whole, the last tensor cut
    with pytest.raises(InvalidRequestError, match="runs past its end"):
        import_checkpoint(tail, "x")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(InvalidRequestError, match=r"empty\.gguf"):
        import_checkpoint(empty, "x")
    assert LocalStore().list() == []


def test_tensor_names_map_to_hugging_face_names() -> None:
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None
    with pytest.raises(UnsupportedFeatureError, match="attn_q_norm"):
        hf_name("blk.0.attn_q_norm.weight")


def test_dequantising_matches_the_gguf_package(gguf_files: dict[str, Any]) -> None:
    from gguf import GGUFReader, dequantize

    path, _ = gguf_files["qwen2-untied"]
    ours = read_gguf_file(path)
    theirs = {t.name: t for t in GGUFReader(path).tensors}
    assert [t.name for t in ours.tensors] == list(theirs)
    for t in ours.tensors:
        ref = dequantize(theirs[t.name].data, theirs[t.name].tensor_type).reshape(t.shape)
        assert np.array_equal(ours.dequantize(t), ref), t.name
