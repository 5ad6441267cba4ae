"""IncrementalDetokenizer: text token by token, stop strings, and what may be emitted yet.

Each new token decodes a short window of recent ids twice (without and with the new
token) and keeps the difference, so byte-level merges and leading spaces come out as
a full decode would give them. A window ending in U+FFFD is an unfinished multi-byte
character: its text waits for the tokens that complete it. With stop strings, the
last len(longest stop) - 1 characters are held back until the completion ends, so a
stop string split across tokens is never streamed before it is recognised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens decoded before the first output, for leading spaces


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens before this are already in `text`
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_id: int) -> str | None:
        """Add one output token; returns the stop string it completed (text cut before it)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return None  # nothing new, or an unfinished character
        start = len(self.text)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        return self._find_stop(start)

    def _find_stop(self, new_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, max(0, new_from - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]

    def skip_emitted(self) -> None:
        """Mark as emitted what a streaming caller would have received so far (resume)."""
        self.emitted = max(self.emitted, len(self.text) - self._holdback)

    def take_delta(self, finished: bool) -> str:
        """New text that may be streamed now; everything that is left when finished."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self._holdback)
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta

    def token_text(self, token_id: int) -> str:
        """One token's text on its own, for logprobs."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
