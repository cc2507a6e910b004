"""The TP all-reduce of a layer's output: on CPU (gloo), small tensors as one round of messages.

Gloo's ``all_reduce`` of a 2 KB tensor takes ~2 ms between 2 processes on this 2-core host and
~8 ms among 4 (several thread hand-offs per ring step), and every TP layer runs two per step:
at TP4 they were most of a tiny model's step. Here each rank sends its tensor to every other
rank of the group at once and adds all of them in rank order: one message latency (0.24 ms and
~2 ms measured), and every rank adds the same tensors in the same order, so all get the same
bits. Above ``SMALL_BYTES`` gloo's ring, which sends less per rank, is faster. On GPUs NCCL's
``all_reduce`` is used as it is.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

SMALL_BYTES = 512 << 10  # gloo is as fast from 0.3-1 MB on (scripts/bench_collectives.py, worlds 2-4)


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Sum ``x`` over ``group`` in place."""
    if x.device.type != "cpu" or x.numel() * x.element_size() > SMALL_BYTES:
        dist.all_reduce(x, group=group)
        return
    assert x.is_contiguous()
    me, ranks = dist.get_rank(), dist.get_process_group_ranks(group)
    parts = [x if r == me else torch.empty_like(x) for r in ranks]
    works = [dist.isend(x, r, group=group) for r in ranks if r != me]
    works += [dist.irecv(p, r, group=group) for r, p in zip(ranks, parts) if r != me]
    for w in works:
        w.wait()
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    x.copy_(total)
