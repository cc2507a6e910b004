"""torchrun world: live reconfiguration while serving.

Input (--spec JSON): {"model", "start", "engine": {...}, "requests": [{"id", "prompt",
"max_new"}], "switches": [{"target", "mode", "fault": {phase, rank, kind} | null,
"timeout": s, "kv_check": bool, "prestage": bool, "kv_blocks": "live" | "live-1", "tag"}],
"min_inflight": n}. ``kv_blocks`` sizes the new KV cache from the live blocks at the switch
("live-1": one block short, so the newest request's KV cannot all be kept).
Rank 0 keeps >= min_inflight requests mid-generation at every switch and writes --out JSON:
{"requests": {id: tokens}, "switches": [{tag, timeline, rolled_back, topology_after, inflight,
live_blocks, max_live_block, new_num_blocks, param_bytes, kv_check, unpacked_after, linears}], "preemptions",
"unpacked_at_end"} (``unpacked_*``: rank 0's linears not yet in oneDNN's layout).
``param_bytes`` is the sum over ranks of the parameter bytes held after the switch. Every rank writes its weight hashes at start and end to
--out.rank{r}.{start,end}.json (for A -> ... -> A bit-identity).
"""
import dataclasses
import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from common import kv_check, start_world
from remp_megatron.config import EngineConfig
from remp_megatron.engine import Engine
from remp_megatron.linear import _Packable
from remp_megatron.worker import broadcast, load_worker, worker_loop
from remp_megatron.reconfigure import Fault, RolledBack
from remp_megatron.request import Request, SamplingParams
from remp_megatron.topology import Topology


def weight_hashes(worker) -> dict:
    if worker.runner is None:
        return {}
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in worker.runner.model.state_dict().items() if v is not None}


def param_bytes(worker, rt) -> int:
    """Collective: parameter bytes held by all ranks together."""
    n = sum(p.numel() * p.element_size() for p in worker.runner.model.parameters()) if worker.runner else 0
    total = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(total, group=rt.control_group)
    return int(total.item())


def linears(runner) -> int:
    return sum(isinstance(m, _Packable) for m in runner.model.modules())


def live_block_ids(engine: Engine) -> list[int]:
    return [b for s in engine.state().sequences if s.status == "running" for b in s.block_table]


def drive(engine: Engine, job: dict, rt) -> dict:
    todo = list(job["requests"])
    handles, switches = {}, []
    want = job.get("min_inflight", 3)

    def top_up():
        while todo and len(engine.sched.running) + len(engine.sched.waiting) < want + 1:
            r = todo.pop(0)
            handles[r["id"]] = engine.add_request(Request(
                request_id=r["id"], prompt_token_ids=r["prompt"], params=SamplingParams(max_new_tokens=r["max_new"])))

    for sw in job["switches"]:
        top_up()
        for _ in range(50):  # until enough requests are mid-generation (have output, not done)
            # A resized cache must still fit any one request (<= 8 blocks).
            if (sum(1 for s in engine.sched.running if s.output) >= want
                    and (not sw.get("kv_blocks") or len(live_block_ids(engine)) >= 9)):
                break
            engine.step()
            top_up()
        inflight = {s.request_id: s.num_tokens for s in engine.sched.running if s.output}  # token positions
        fault = Fault(**sw["fault"]) if sw.get("fault") else None
        rec = {"tag": sw.get("tag", ""), "inflight": inflight}
        if sw.get("prestage"):  # move the weights while serving goes on, then switch
            job = engine.prestage(Topology.parse(sw["target"]))
            steps = 0
            while not job.done.is_set():
                engine.step()
                top_up()
                steps += 1
            assert job.staged, job
            rec["prestage"] = dataclasses.asdict(job.timeline)
            rec["steps_while_staging"] = steps
            rec["kv_copied_ahead"], rec["kv_still_staged"] = job.kv_blocks, len(engine.sched.kv_staged)
            inflight = {s.request_id: s.num_tokens for s in engine.sched.running if s.output}
            rec["inflight"] = inflight
        preempted_before = engine.sched.num_preemptions
        live = live_block_ids(engine)
        rec["live_blocks"], rec["max_live_block"] = len(live), max(live, default=-1)
        num_blocks = {None: None, "live": len(live), "live-1": len(live) - 1}[sw.get("kv_blocks")]
        try:
            tl = engine.reconfigure(Topology.parse(sw["target"]), sw.get("mode", "migrate"), fault,
                                    phase_timeout_s=sw.get("timeout", 120.0), num_blocks=num_blocks)
            rec["rolled_back"] = False
        except RolledBack as e:
            tl = e.timeline
            rec["rolled_back"] = True
        rec["timeline"] = dataclasses.asdict(tl)
        rec["topology_after"] = str(engine.topo)
        rec["preempted_by_switch"] = engine.sched.num_preemptions - preempted_before
        rec["new_num_blocks"] = engine.state().num_blocks
        rec["unpacked_after"] = len(engine.runner.unpacked)  # on rank 0, before the first step
        rec["linears"] = linears(engine.runner)
        engine.stop_workers()
        broadcast("param_bytes", rt.control_group)
        rec["param_bytes"] = param_bytes(engine.worker, rt)
        if sw.get("kv_check"):
            engine.stop_workers()
            broadcast("kv_check", rt.control_group)
            rec["kv_check"] = kv_check(engine.runner, rt, engine)
        engine.step()  # first step at the new topology
        switches.append(rec)
    top_up()
    while todo or engine.has_work:
        engine.step()
        top_up()
    engine.stop_workers()
    broadcast("done", rt.control_group)
    return {"requests": {rid: h.result().token_ids for rid, h in handles.items()}, "switches": switches,
            "preemptions": engine.sched.num_preemptions, "unpacked_at_end": len(engine.runner.unpacked)}


def main():
    args, rt, job, spec = start_world()
    cfg = EngineConfig(**job.get("engine", {}))
    worker = load_worker(rt, spec, job["model"], Topology.parse(job["start"]), cfg)
    Path(f"{args.out}.rank{rt.rank}.start.json").write_text(json.dumps(weight_hashes(worker)))
    if rt.rank == 0:
        Path(args.out).write_text(json.dumps(drive(Engine(worker, cfg), job, rt)))
    else:
        while True:
            worker_loop(worker)
            what = broadcast(None, rt.control_group)
            if what == "done":
                break
            if what == "param_bytes":
                param_bytes(worker, rt)
            else:
                kv_check(worker.runner, rt)
    Path(f"{args.out}.rank{rt.rank}.end.json").write_text(json.dumps(weight_hashes(worker)))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
