"""Detokenisation and stop strings, in the front end: the engine streams token ids, this turns
them into text deltas. It sees a request's whole output, so a request re-admitted after an
engine restart goes on with the same text."""
from __future__ import annotations

from typing import Any


class Detokenizer:
    """One request's output text. ``add`` takes the next token ids and returns (text delta,
    stopped): ``stopped`` when a stop string appeared (it and what follows are cut)."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""

    def add(self, token_ids: list[int], last: bool) -> tuple[str, bool]:
        """``last``: the engine finished the request with these tokens (emit whatever there is)."""
        self.ids += token_ids
        if self.tokenizer is None or not token_ids:
            return "", False
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:  # a stop string wins over a length finish on the same token
            full = full[:cut]
        elif not last and full.endswith("\ufffd"):
            # Hold back a trailing partial UTF-8 character until the next token completes it.
            full = self.text
        delta, self.text = full[len(self.text):], full
        return delta, cut >= 0
