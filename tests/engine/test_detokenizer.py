"""Incremental detokenisation through SmolLM2's byte-level BPE tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from ember.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "héllo 世界 🙂🎉 日本語のテキスト, 한국어 and emoji 👩‍👩‍👧",
    "  leading spaces,\ttabs\nand newlines\n\n",
]


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = []
    for i, t in enumerate(ids):
        stop = detok.append(t)
        deltas.append(detok.take_delta(finished=stop is not None or i == len(ids) - 1))
        if stop is not None:
            break
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_whole_characters_and_join_to_the_full_decode(tokenizer: Any, text: str) -> None:
    prompt = tokenizer.encode("Say something:")
    ids = tokenizer.encode(text)
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt), ids)
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert sum(1 for d in deltas if d == "") > 0 or text.isascii()  # some tokens held back a partial char


def test_special_tokens_are_skipped_unless_asked(tokenizer: Any) -> None:
    ids = [*tokenizer.encode("one"), tokenizer.eos_token_id, *tokenizer.encode(" two")]
    assert "".join(stream(IncrementalDetokenizer(tokenizer, [1]), ids)) == "one two"
    kept = IncrementalDetokenizer(tokenizer, [1], skip_special_tokens=False)
    assert "".join(stream(kept, ids)) == "one<|im_end|> two"


def test_stop_string_cuts_the_text_and_is_never_streamed(tokenizer: Any) -> None:
    ids = tokenizer.encode("The answer is 42.\nUser: and then")
    detok = IncrementalDetokenizer(tokenizer, [1], stop=["\nUser:", "never"])
    deltas = stream(detok, ids)
    assert "".join(deltas) == detok.text == "The answer is 42."
    assert all("\n" not in d for d in deltas)


def test_text_without_a_stop_string_is_all_released_at_the_end(tokenizer: Any) -> None:
    ids = tokenizer.encode("no stop here at all")
    detok = IncrementalDetokenizer(tokenizer, [1], stop=["a very long stop string"])
    deltas = stream(detok, ids)
    assert deltas[-2] == ""  # held back while it might still become a stop string
    assert "".join(deltas) == "no stop here at all"


def test_resume_marks_what_the_source_streamed(tokenizer: Any) -> None:
    ids = tokenizer.encode("first part, second part")
    source = IncrementalDetokenizer(tokenizer, [1], stop=["xyz"])
    sent = "".join(source.append(t) or source.take_delta(False) for t in ids[:3])
    dest = IncrementalDetokenizer(tokenizer, [1], stop=["xyz"])
    for t in ids[:3]:
        dest.append(t)
    dest.skip_emitted()
    rest = "".join(dest.append(t) or dest.take_delta(False) for t in ids[3:]) + dest.take_delta(True)
    assert sent + rest == "first part, second part"
