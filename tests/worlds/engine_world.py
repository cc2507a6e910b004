"""torchrun world that runs engine scenarios at several topologies (one world for all).

Input (--spec JSON): {"model": dir, "topologies": [...], "engine": {EngineConfig fields},
"scenarios": [{"name", "engine": {overrides}, "requests": [{"id", "prompt"
(ids), "params", "arrive"}], "cancel": {"id": step}, "pause_at": step, "topologies": [...]
(default: all)}]}.
Output (--out JSON, rank 0): {topology: {scenario: {"requests": {id: {tokens, finish_reason}},
"preemptions", "cancel", "pause"}}}. Text and stop strings are the front end's (test_server_admin).
"""
import json
from pathlib import Path

import torch.distributed as dist

from common import kv_check, start_world
from remp_megatron.config import EngineConfig
from remp_megatron.engine import Engine
from remp_megatron.worker import load_worker, worker_loop
from remp_megatron.kv_cache import KVCache
from remp_megatron.request import Request, SamplingParams
from remp_megatron.topology import Topology


def drive(engine: Engine, sc: dict, rt) -> dict:
    """Rank 0: feed requests at their arrival steps, apply cancels and the pause check."""
    pending = sorted(sc["requests"], key=lambda r: r.get("arrive", 0))
    handles, result, step = {}, {}, 0
    while pending or engine.has_work:
        while pending and pending[0].get("arrive", 0) <= step:
            r = pending.pop(0)
            handles[r["id"]] = engine.add_request(
                Request(request_id=r["id"], prompt_token_ids=r["prompt"], params=SamplingParams(**r.get("params", {}))))
        for rid, at in sc.get("cancel", {}).items():
            if at == step:
                before = engine.sched.alloc.num_free
                held = len(next(s for s in engine.state().sequences if s.request_id == rid).block_table)
                engine.cancel(rid)
                result["cancel"] = {"held": held, "freed": engine.sched.alloc.num_free - before}
        if sc.get("pause_at") == step:
            engine.stop_workers()
            result["pause"] = kv_check(engine.runner, rt, engine)
        engine.step()
        step += 1
    engine.stop_workers()
    result["requests"] = {}
    for rid, h in handles.items():
        c = h.result()
        result["requests"][rid] = {"tokens": c.token_ids, "finish_reason": c.finish_reason.value}
    result["preemptions"] = engine.sched.num_preemptions
    return result


def main():
    args, rt, job, spec = start_world()
    results = {}
    for t in job["topologies"]:
        topo = Topology.parse(t)
        base = EngineConfig(**job.get("engine", {}))
        worker = load_worker(rt, spec, job["model"], topo, base)
        runner = worker.runner
        results[t] = {}
        for sc in job["scenarios"]:
            if t not in sc.get("topologies", [t]):
                continue
            cfg = base.model_copy(update=sc.get("engine", {}))
            if runner is not None:
                runner.kv = KVCache.allocate(spec, topo, runner.pp_stage, cfg.blocks_for(spec, topo),
                                             cfg.block_size, rt.device)
            if rt.rank == 0:
                results[t][sc["name"]] = drive(Engine(worker, cfg), sc, rt)
            else:
                worker_loop(worker)
                if "pause_at" in sc:
                    kv_check(runner, rt)
                    worker_loop(worker)
    if rt.rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
