"""Output processing on rank 0: a sampled token becomes a streamed chunk, and the token-level
stop conditions (end of text, stop token ids, length) in one place. Text and stop strings are
the front end's (server/detokenizer.py)."""
from __future__ import annotations

from typing import Optional

from .request import FinishReason, Sequence, StepOutput


class OutputProcessor:
    def __init__(self, eos_ids: frozenset[int]):
        self.eos_ids = eos_ids

    def append(self, seq: Sequence, tok: int) -> StepOutput:
        """Append ``tok`` to ``seq`` and return its chunk; ``finished`` says the request ends."""
        p = seq.params
        seq.output.append(tok)
        reason: Optional[FinishReason] = None
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = FinishReason.STOP
        elif len(seq.output) >= p.max_new_tokens:
            reason = FinishReason.LENGTH
        return StepOutput(seq.request_id, [tok], reason is not None, reason, len(seq.prompt), len(seq.output))
