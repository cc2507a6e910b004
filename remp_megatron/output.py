"""Output processing: a sampled token becomes a streamed chunk (stop conditions,
detokenisation, stop strings), in one place."""
from __future__ import annotations

from typing import Any, Optional

from .request import FinishReason, Sequence, StepOutput


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_ids: frozenset[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids

    def append(self, seq: Sequence, tok: int) -> StepOutput:
        """Append ``tok`` to ``seq`` and return its chunk; ``finished`` says the request ends."""
        p = seq.params
        seq.output.append(tok)
        reason: Optional[FinishReason] = None
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = FinishReason.STOP
        elif len(seq.output) >= p.max_new_tokens:
            reason = FinishReason.LENGTH
        delta = ""
        if self.tokenizer is not None:
            full = self.tokenizer.decode(seq.output, skip_special_tokens=True)
            cut = min((i for i in (full.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:  # a stop string wins over a length finish on the same token
                full, reason = full[:cut], FinishReason.STOP
            # Hold back a trailing partial UTF-8 character until the next token completes it
            # (on the last token there is no next one: emit what there is).
            if reason is None and full.endswith("\ufffd"):
                full = seq.text
            delta, seq.text = full[len(seq.text):], full
        return StepOutput(seq.request_id, [tok], delta, reason is not None, reason, len(seq.prompt), len(seq.output))
