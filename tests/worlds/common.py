"""Helpers shared by the test worlds."""
import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from remp_megatron.worker import broadcast
from remp_megatron.runtime import init_distributed
from remp_megatron.scheduler import StepPlan
from remp_megatron.spec import ModelSpec


def start_world():
    """Parse --spec/--out, join the world; returns (args, runtime, job, model spec)."""
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rt = init_distributed()
    job = json.loads(Path(args.spec).read_text())
    return args, rt, job, ModelSpec.from_file(Path(job["model"]) / "config.json")


def kv_check(runner, rt, engine=None):
    """Collective (rank 0 passes its engine). For each running sequence, recompute its cached
    tokens into free scratch blocks and compare K/V there with K/V at its own block table.
    Returns [{id, max_abs_diff, num_computed, num_tokens, table_len}] on every rank."""
    job = None
    if rt.rank == 0:
        state = engine.state()
        free = engine.sched.alloc.free_ids()
        job = []
        for s in state.sequences:
            if s.status != "running":
                continue
            need = -(-s.num_computed // state.block_size)
            scratch, free = free[:need], free[need:]
            job.append({"id": s.request_id, "tokens": (s.prompt + s.output)[: s.num_computed],
                        "table": s.block_table, "scratch": scratch, "num_computed": s.num_computed,
                        "num_tokens": len(s.prompt) + len(s.output)})
    job = broadcast(job, rt.control_group)
    report = []
    for c in job:
        n = c["num_computed"]
        diff = torch.zeros(())
        if runner is not None:
            runner.run_step(StepPlan(c["tokens"], [0], [n], [c["scratch"]], [True]))
            bs = runner.kv.block_size
            pos = torch.arange(n)
            own = torch.tensor(c["table"])[pos // bs] * bs + pos % bs
            new = torch.tensor(c["scratch"])[pos // bs] * bs + pos % bs
            flat = runner.kv.buffer.flatten(2, 3)  # [2, layers, slots, heads, dim]
            diff = (flat[:, :, own] - flat[:, :, new]).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=rt.control_group)
        report.append({"id": c["id"], "max_abs_diff": float(diff), "num_computed": n, "num_tokens": c["num_tokens"],
                       "table_len": len(c["table"])})
    return report
