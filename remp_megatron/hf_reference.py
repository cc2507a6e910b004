"""HF transformers as the reference for greedy output (tests and benchmarks compare to it)."""
from __future__ import annotations

import torch

# A top-2 logit margin this wide cannot be flipped by fp32 summation order: it is >40x the SmolLM2 fp32 bound
# that test_parity derives from HF's own eager-vs-sdpa discrepancy (2.3e-4 measured).
CLEAR_MARGIN = 0.01


def hf_greedy(model, ids: list[int], n: int, eos: int | None = None) -> tuple[list[int], float]:
    """HF's greedy continuation of up to ``n`` tokens (through ``eos`` if given, else no stop) and its
    smallest top-2 logit margin: where that is near zero, fp32 summation order may break the tie
    either way (DESIGN.md §5), so comparisons ask for a clear margin."""
    out, margin, x, cache = [], float("inf"), torch.tensor([ids]), None
    with torch.no_grad():
        for _ in range(n):
            step = model(x, past_key_values=cache, use_cache=True)
            logits, cache = step.logits[0, -1], step.past_key_values
            top = logits.topk(2).values
            margin = min(margin, (top[0] - top[1]).item())
            t = int(logits.argmax())
            out.append(t)
            if t == eos:
                break
            x = torch.tensor([[t]])
    return out, margin
