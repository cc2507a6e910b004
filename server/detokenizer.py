"""Detokenisation and stop strings, in the front end: the engine streams token ids, this turns
them into text deltas. It sees a request's whole output, so a request re-admitted after an
engine restart goes on with the same text."""
from __future__ import annotations

from typing import Any


class Detokenizer:
    """One request's output text. ``add`` takes the next token ids and returns (text delta,
    stopped): ``stopped`` when a stop string appeared (it and what follows are cut, and no part
    of it was sent: text that may begin a stop string waits until it cannot).

    Each call decodes a window, not the whole output (that cost O(n) a token: 0.45 ms at 2,048
    tokens for SmolLM2's tokenizer, on the link thread): the tokens of the last delta give the
    decoder its context (a leading space, a character split across tokens), and the delta is
    what the new tokens add to that window's text (vLLM's incremental scheme)."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string)
        self._sent = 0  # characters of text returned
        self._prefix = 0  # the decode window starts at this token
        self._read = 0  # ids[:_read] are in text
        self._longest_stop = max(map(len, stop), default=0)

    def add(self, token_ids: list[int], last: bool) -> tuple[str, bool]:
        """``last``: the engine finished the request with these tokens (send whatever there is)."""
        self.ids += token_ids
        if self.tokenizer is None:
            return "", False
        searched = len(self.text)
        if self._read < len(self.ids):
            before = self._decode(self.ids[self._prefix:self._read])
            after = self._decode(self.ids[self._prefix:])
            # A trailing partial UTF-8 character waits for the token that completes it.
            if last or not after.endswith("\ufffd"):
                self.text += after[len(before):]
                self._prefix, self._read = self._read, len(self.ids)
        if self.stop:  # only a stop string that ends in the new text is new
            start = max(0, searched - self._longest_stop + 1)
            cut = min((i for i in (self.text.find(s, start) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:  # a stop string wins over a length finish on the same token
                self.text = self.text[:cut]
                return self._send(cut), True
        return self._send(len(self.text) if last else len(self.text) - self._may_begin_stop()), False

    def _send(self, end: int) -> str:
        delta = self.text[self._sent:end]
        self._sent = max(self._sent, end)
        return delta

    def _may_begin_stop(self) -> int:
        """The longest end of the text that a stop string begins with."""
        return max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
