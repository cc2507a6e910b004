"""Static-batch greedy generation over the world (no scheduler): the foundation check and demo.

Collective: every rank calls it; standby ranks pass ``runner=None`` and only take part in the
per-step broadcast of the chosen tokens (from the last stage's TP rank 0, over the control
group) so all ranks stay in lock-step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .model_runner import ModelRunner
from .paged_attention import AttentionMetadata
from .topology import Topology


def block_tables_for(lengths: list[int], block_size: int) -> list[list[int]]:
    """Disjoint, consecutive block ids giving each sequence room for ``length`` tokens."""
    tables, nxt = [], 0
    for n in lengths:
        k = -(-n // block_size)
        tables.append(list(range(nxt, nxt + k)))
        nxt += k
    return tables


def greedy_generate(
    runner: Optional[ModelRunner],
    topo: Topology,
    control_group,
    prompts: list[list[int]],
    max_new_tokens: int,
) -> list[list[int]]:
    block_size = runner.kv.block_size if runner else 1
    tables = block_tables_for([len(p) + max_new_tokens for p in prompts], block_size)
    src = topo.rank_of(topo.pp - 1, 0)
    starts = [0] * len(prompts)
    feed = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        tokens = torch.empty(len(prompts), dtype=torch.long)
        if runner is not None:
            lens = [len(f) for f in feed]
            meta = AttentionMetadata.build(starts, lens, tables, block_size, runner.device)
            rows = torch.tensor(lens).cumsum(0) - 1
            logits = runner.forward(torch.tensor([t for f in feed for t in f]), meta, rows)
            if logits is not None:
                tokens = logits.argmax(-1).cpu()
        dist.broadcast(tokens, src=src, group=control_group)
        for i, t in enumerate(tokens.tolist()):
            out[i].append(t)
            starts[i] += len(feed[i])
            feed[i] = [t]
    return out
