"""LLM end to end on a tiny random Llama (float64) with SmolLM2's tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ember import LLM, SamplingParams
from ember.errors import ContextLengthError, InvalidRequestError, UnsupportedModelError
from ember.store import save_tensors

pytestmark = pytest.mark.timeout(120)

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived a",
    "1 2 3",
    "日本語のテキスト 🙂 and more words to make this prompt the longest of the batch",
]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=11, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama: tuple[Path, Any]) -> LLM:
    return LLM(str(tiny_llama[0]), device="cpu")


def tokens(outs: list[Any]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_output_is_identical_to_transformers_generate(llm: LLM, tiny_llama: tuple[Path, Any]) -> None:
    model = tiny_llama[1]
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(ids) :].tolist()
        (out,) = llm.generate(prompt, GREEDY)
        assert out.outputs[0].token_ids == ref
        assert out.prompt_token_ids == ids
        assert out.outputs[0].text == llm.tokenizer.decode(ref, skip_special_tokens=True)
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_batch_chunking_and_preemption_give_each_request_its_own_tokens(
    llm: LLM, tiny_llama: tuple[Path, Any], params: SamplingParams
) -> None:
    alone = [tokens(llm.generate(p, params))[0] for p in PROMPTS]
    assert tokens(llm.generate(PROMPTS, params)) == alone
    # 1 KiB of KV per token (2 layers x 2 heads x 16 x 2 x float64): 48 tokens for 4 requests of 16-35
    tight = LLM(
        str(tiny_llama[0]), device="cpu", block_size=4, kv_cache_bytes=48 * 1024, max_num_batched_tokens=16
    )
    assert tokens(tight.generate(PROMPTS, params)) == alone
    assert tight.engine.scheduler.num_preemptions > 0


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    first = tokens(llm.generate(PROMPTS, SEEDED))
    assert tokens(llm.generate(PROMPTS, SEEDED)) == first
    n3 = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=8))[0]
    assert [c.index for c in n3.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in n3.outputs}) == 3


def test_stop_string_cuts_the_text(llm: LLM) -> None:
    (full,) = llm.generate(PROMPTS[1], GREEDY)
    text = full.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    (cut,) = llm.generate(
        PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True)
    )
    assert cut.outputs[0].text == text[: text.index(stop)]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop


def test_logprobs_and_token_id_prompts(llm: LLM) -> None:
    ids = llm.tokenizer.encode(PROMPTS[0])
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=True, top_logprobs=2)
    (out,) = llm.generate({"prompt_token_ids": ids}, params)
    lps = out.outputs[0].logprobs
    assert lps is not None and len(lps) == 4
    for lp, t in zip(lps, out.outputs[0].token_ids, strict=True):
        assert lp.chosen.token_id == t == lp.top[0].token_id and lp.chosen.logprob <= 0


def test_chat_applies_the_template(llm: LLM) -> None:
    (out,) = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=3))
    text = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert out.prompt == text
    assert out.prompt_token_ids == llm.tokenizer.encode(text, add_special_tokens=False)
    assert len(out.outputs[0].token_ids) <= 3


def test_bad_input_is_refused_with_a_clear_error(
    llm: LLM, tmp_path: Path, tiny_llama: tuple[Path, Any]
) -> None:
    with pytest.raises(ContextLengthError):
        llm.generate({"prompt_token_ids": [5] * 300}, GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate("", GREEDY)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate({"prompt_token_ids": [1, 49152]}, GREEDY)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    config = json.loads((tiny_llama[0] / "model" / "config.json").read_text())
    save_tensors(
        {"w": torch.zeros(1)},
        tmp_path / "mamba",
        files={"model/config.json": json.dumps(config | {"model_type": "mamba"}).encode()},
    )
    with pytest.raises(UnsupportedModelError, match="mamba"):
        LLM(str(tmp_path / "mamba"), device="cpu")
    assert tokens(llm.generate(PROMPTS[0], GREEDY))  # and it goes on serving


SCRIPT = """
import sys
from ember.engine.llm import LLM
from ember.engine.request import SamplingParams
out = LLM(sys.argv[1], device="cpu").generate("Hello", SamplingParams(max_tokens=3, temperature=0))
assert len(out[0].outputs[0].token_ids) >= 1
bad = [m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m]
print("MODELING", bad)
"""


@pytest.mark.slow  # a Python subprocess importing torch and transformers
def test_engine_does_not_import_transformers_modelling_code(tiny_llama: tuple[Path, Any]) -> None:
    src = Path(__file__).resolve().parents[2] / "src"
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_llama[0])],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "HOME": str(tiny_llama[0].parent)},
        timeout=100,
    )
    assert run.returncode == 0, run.stderr
    assert "MODELING []" in run.stdout


SAMPLE_SCRIPT = """
import sys
from ember import LLM, SamplingParams
llm = LLM(sys.argv[1], device="cpu")
for seed in (None, 21):
    out = llm.generate("Once upon a time", SamplingParams(temperature=1.0, seed=seed, max_tokens=16))
    print(seed, out[0].outputs[0].token_ids)
"""


def test_a_new_process_samples_new_text_unless_seeded(tiny_llama: tuple[Path, Any]) -> None:
    src = Path(__file__).resolve().parents[2] / "src"
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin", "HOME": str(tiny_llama[0].parent)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SAMPLE_SCRIPT, str(tiny_llama[0])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    runs = []
    for proc in procs:
        out, err = proc.communicate(timeout=100)
        assert proc.returncode == 0, err
        runs.append(dict(line.split(" ", 1) for line in out.splitlines()))
    assert runs[0]["None"] != runs[1]["None"]  # unseeded: each process its own text
    assert runs[0]["21"] == runs[1]["21"]  # seeded: the same text everywhere
