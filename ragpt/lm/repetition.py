"""The decoding rule that ends an answer stuck in a loop.

Small instruction-tuned models fall into two kinds of loop: the same line again and again
("1. Northwind Day / 2. Northwind Day / ..."), and a run of tokens repeated back to back within a
line. Either would run to max_tokens. The guard stops the row as soon as a loop is certain:

* a completed line whose content (list marker, case, spacing and end punctuation aside; at least
  MIN_LINE_CHARS long) is the same as an earlier line's;
* the last `p` tokens equal the `p` before them, for copies enough to cover BLOCK_TOKENS tokens
  and at least MIN_COPIES copies (p up to MAX_PERIOD).

It stops; it does not cut what was generated, so a streamed answer and the same answer returned
whole are the same text. Every surface shares it: Generator.stream (generate, dev evaluation in
training, `ragpt eval`) and serving.request.RowDecoder (CLI, HTTP schedulers, LangChain).
"""

from __future__ import annotations

import re

MIN_LINE_CHARS = 8
BLOCK_TOKENS = 12
MIN_COPIES = 3
MAX_PERIOD = 32

_MARKER = re.compile(r"^\s*(?:[-*\u2022]|\(?\d{1,3}[.)]|\(?[a-zA-Z][.)])\s+")
_END_PUNCT = re.compile(r"[\s.,;:!?]+$")


def line_key(line: str) -> str:
    """A line's content for comparison: no list marker, lower case, single spaces, no end punctuation."""
    return _END_PUNCT.sub("", " ".join(_MARKER.sub("", line).lower().split()))


class RepetitionGuard:
    """Fed one row's tokens in order; `push` returns True when the row is looping."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._seen_lines: set[str] = set()
        self._line_start = 0  # tokens before it are in finished lines or in _partial
        self._partial = ""  # the start of the current line, decoded
        self.fired: str | None = None  # "line" or "tokens" once it has

    def push(self, token: int) -> bool:
        self.tokens.append(token)
        return self._tokens_loop() or self._line_loop(token)

    def _tokens_loop(self) -> bool:
        t, n = self.tokens, len(self.tokens)
        for p in range(1, min(MAX_PERIOD, n // MIN_COPIES) + 1):
            copies = max(MIN_COPIES, -(-BLOCK_TOKENS // p))
            if copies * p > n or t[-1] != t[-1 - p]:
                continue
            tail = t[n - p:]
            if all(t[n - (c + 1) * p:n - c * p] == tail for c in range(1, copies)):
                self.fired = "tokens"
                return True
        return False

    def _line_loop(self, token: int) -> bool:
        piece = self.tokenizer.decode([token], skip_special_tokens=True)
        if "\n" not in piece:
            return False
        # The text since the last line break, decoded whole (a token may hold several characters).
        text = self._partial + self.tokenizer.decode(self.tokens[self._line_start:], skip_special_tokens=True)
        *lines, self._partial = text.split("\n")
        self._line_start = len(self.tokens)
        for line in lines:
            key = line_key(line)
            if len(key) < MIN_LINE_CHARS:
                continue
            if key in self._seen_lines:
                self.fired = "line"
                return True
            self._seen_lines.add(key)
        return False
