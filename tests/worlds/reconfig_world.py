"""torchrun world: live reconfiguration while serving.

Input (--spec JSON): {"model", "start", "engine": {...}, "requests": [{"id", "prompt",
"max_new"}], "switches": [{"target", "mode", "fault": {phase, rank, kind} | null,
"timeout": s, "kv_check": bool, "prestage": bool}], "min_inflight": n}.
Rank 0 keeps >= min_inflight requests mid-generation at every switch and writes --out JSON:
{"requests": {id: tokens}, "switches": [{timeline, rolled_back, topology_after, inflight,
kv_check}], "preemptions"}. Every rank writes its weight hashes at start and end to
--out.rank{r}.{start,end}.json (for A -> ... -> A bit-identity).
"""
import dataclasses
import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from common import kv_check, start_world
from remp_megatron.engine import Engine, EngineConfig, exchange_command, load_worker, worker_loop
from remp_megatron.reconfigure import Fault, RolledBack
from remp_megatron.request import Request, SamplingParams
from remp_megatron.topology import Topology


def weight_hashes(worker) -> dict:
    if worker.runner is None:
        return {}
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in worker.runner.model.state_dict().items() if v is not None}


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
            if sum(1 for s in engine.sched.running if s.output) >= want:
                break
            engine.step()
            top_up()
        inflight = {s.request_id: s.num_tokens for s in engine.sched.running if s.output}  # token positions
        fault = Fault(**sw["fault"]) if sw.get("fault") else None
        rec = {"inflight": inflight}
        if sw.get("prestage"):  # move the weights while serving goes on, then switch
            rec["prestage"] = dataclasses.asdict(engine.prestage(Topology.parse(sw["target"])))
            steps = 0
            while engine.prestaged is None:
                engine.step()
                top_up()
                steps += 1
            rec["steps_while_staging"] = steps
            inflight = {s.request_id: s.num_tokens for s in engine.sched.running if s.output}
            rec["inflight"] = inflight
        preempted_before = engine.sched.num_preemptions
        try:
            tl = engine.reconfigure(Topology.parse(sw["target"]), sw.get("mode", "migrate"), fault,
                                    phase_timeout_s=sw.get("timeout", 120.0))
            rec["rolled_back"] = False
        except RolledBack as e:
            tl = e.timeline
            rec["rolled_back"] = True
        rec["timeline"] = dataclasses.asdict(tl)
        rec["topology_after"] = str(engine.topo)
        rec["preempted_by_switch"] = engine.sched.num_preemptions - preempted_before
        if sw.get("kv_check"):
            engine.stop_workers()
            exchange_command("kv_check", rt.control_group)
            rec["kv_check"] = kv_check(engine.runner, rt, engine)
        engine.step()  # first step at the new topology
        switches.append(rec)
    top_up()
    while todo or engine.has_work:
        engine.step()
        top_up()
    engine.stop_workers()
    exchange_command("done", rt.control_group)
    return {"requests": {rid: h.result().token_ids for rid, h in handles.items()}, "switches": switches,
            "preemptions": engine.sched.num_preemptions}


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
            if exchange_command(None, rt.control_group) == "done":
                break
            kv_check(worker.runner, rt)
    Path(f"{args.out}.rank{rt.rank}.end.json").write_text(json.dumps(weight_hashes(worker)))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
