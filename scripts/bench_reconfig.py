"""Reconfiguration benchmark: downtime of live TP×PP(×EP) switches vs a restart, measured in one run.

    python scripts/bench_reconfig.py --model runs/llama-125m --world 4 --chain 2x2 1x4 4x1 2x2
    python scripts/bench_reconfig.py --model runs/mixtral-1b --world 4 --chain 4x1x4 4x1x2 2x2x2 4x1x4

For each transition of the chain (repeated --runs times), with --requests requests
mid-generation: the downtime from the pause to the first token at the new topology, its phase
breakdown, bytes moved and peak extra memory; the same with the new weights pre-staged while
serving goes on. The restart baseline, measured in the same invocation: stop the serving world
(timed), relaunch torchrun at the target topology, load the checkpoint, re-prefill the
interrupted requests (prompt + tokens so far), first token. The lower bound is the bytes that
must move divided by the gloo point-to-point bandwidth measured in the serving world. "Sent"
is what the ranks counted on the wire; "planned" is the layout planner's prediction.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PHASE_COLS = ("validate", "build", "plan", "move_weights", "move_kv", "apply", "commit")


def gloo_bandwidth(rt, nbytes: int = 64 * 2**20, reps: int = 5) -> float:
    """Bytes/s of one rank-0 -> rank-1 send, median of ``reps`` (collective)."""
    import torch.distributed as dist

    buf = torch.empty(nbytes // 4, dtype=torch.float32)
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        if rt.rank == 0:
            dist.send(buf, dst=1)
        elif rt.rank == 1:
            dist.recv(buf, src=0)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def serve(args) -> None:
    """Worker mode: live switches along the chain; rank 0 writes the measurements."""
    import torch.distributed as dist

    from remp_megatron.config import EngineConfig
    from remp_megatron.engine import Engine
    from remp_megatron.worker import load_worker, worker_loop
    from remp_megatron.request import Request, SamplingParams
    from remp_megatron.runtime import init_distributed
    from remp_megatron.spec import ModelSpec
    from remp_megatron.topology import Topology

    rt = init_distributed()
    spec = ModelSpec.from_file(Path(args.model) / "config.json")
    cfg = EngineConfig(kv_budget_mb=args.kv_budget_mb, prestage_budget_mb=4096, prestage_rounds_per_step=1)
    chain = [Topology.parse(t) for t in args.chain]
    bandwidth = gloo_bandwidth(rt)
    worker = load_worker(rt, spec, args.model, chain[0], cfg)
    if rt.rank != 0:
        worker_loop(worker)
        dist.destroy_process_group()
        return
    engine = Engine(worker, cfg)
    g = torch.Generator().manual_seed(0)
    counter = [0]

    def in_flight() -> list:
        """Keep --requests requests running, each at least --progress tokens in."""
        while len(engine.sched.running) + len(engine.sched.waiting) < args.requests:
            counter[0] += 1
            prompt = torch.randint(0, spec.vocab_size, (args.prompt_len,), generator=g).tolist()
            engine.add_request(Request(request_id=f"b{counter[0]}", prompt_token_ids=prompt,
                                       params=SamplingParams(max_new_tokens=args.max_new, ignore_eos=True)))
        while min((len(s.output) for s in engine.sched.running), default=0) < args.progress or engine.sched.waiting:
            engine.step()
        return [s.prompt + s.output for s in engine.sched.running]

    rows, interrupted = [], {}
    for run in range(args.runs):
        for src, dst in zip(chain, chain[1:]):
            for prestaged in (False, True):
                tokens = in_flight()
                if prestaged:
                    t_stage = time.perf_counter()
                    job, steps = engine.prestage(dst), 0
                    while not job.done.is_set():  # weights, then the full KV blocks copied ahead
                        engine.step()
                        steps += 1
                    # No KV copied ahead when the target cache cannot keep the block ids (renumbering).
                    assert job.staged, job
                    staging = time.perf_counter() - t_stage
                    tokens = [s.prompt + s.output for s in engine.sched.running]
                t0 = time.perf_counter()
                tl = engine.reconfigure(dst)
                engine.step()  # the first token of every in-flight request at the new topology
                downtime = time.perf_counter() - t0
                assert (tl.source, tl.target) == (str(src), str(dst)), (tl.source, tl.target)
                interrupted[f"{src}->{dst}"] = tokens
                rows.append({"transition": f"{src}->{dst}", "run": run, "prestaged": prestaged,
                             "downtime_s": downtime, "phases": tl.phases, "weights_moved": tl.weights_moved,
                             "kv_moved": tl.kv_moved, "bytes_in_pause": tl.bytes_sent_in_pause,
                             "bytes_sent": tl.bytes_sent,
                             "bytes_planned": tl.weights_moved + tl.kv_moved + tl.kv_moved_ahead,
                             "peak_extra": tl.peak_extra_bytes, "in_flight": len(tokens),
                             "kv_blocks": tl.kv_blocks, "kv_blocks_ahead": tl.kv_blocks_staged,
                             "staging_s": staging if prestaged else 0.0, "staging_steps": steps if prestaged else 0})
                print(f"{src}->{dst} run {run} {'prestaged ' if prestaged else ''}downtime {downtime * 1e3:.0f} ms",
                      file=sys.stderr, flush=True)
                if not prestaged:  # back to src for the pre-staged measurement; after it, on from dst
                    engine.reconfigure(src)
    for s in list(engine.sched.running) + list(engine.sched.waiting):
        engine.cancel(s.request_id)
    t_stop = time.time()
    engine.stop_workers()
    Path(args.out).write_text(json.dumps({"rows": rows, "bandwidth": bandwidth, "interrupted": interrupted,
                                          "t_stop": t_stop, "world": rt.world_size}))
    dist.destroy_process_group()


def restart(args) -> None:
    """Worker mode: a fresh world at the target; re-prefill the interrupted requests, first token."""
    import torch.distributed as dist

    from remp_megatron.config import EngineConfig
    from remp_megatron.engine import Engine
    from remp_megatron.worker import load_worker, worker_loop
    from remp_megatron.request import Request, SamplingParams
    from remp_megatron.runtime import init_distributed
    from remp_megatron.spec import ModelSpec
    from remp_megatron.topology import Topology

    rt = init_distributed()
    spec = ModelSpec.from_file(Path(args.model) / "config.json")
    cfg = EngineConfig(kv_budget_mb=args.kv_budget_mb)
    worker = load_worker(rt, spec, args.model, Topology.parse(args.target), cfg)
    if rt.rank != 0:
        worker_loop(worker)
        dist.destroy_process_group()
        return
    engine = Engine(worker, cfg)
    for i, toks in enumerate(json.loads(Path(args.tokens).read_text())):
        engine.add_request(Request(request_id=f"r{i}", prompt_token_ids=toks, params=SamplingParams(max_new_tokens=1)))
    engine.run_until_idle()
    Path(args.out).write_text(json.dumps({"t_first_token": time.time()}))
    engine.stop_workers()
    dist.destroy_process_group()


def torchrun(world: int, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                    __file__, *args], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--chain", nargs="+", default=["2x2", "1x4", "4x1", "2x2"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--progress", type=int, default=4, help="tokens each request has made at a switch")
    p.add_argument("--max-new", type=int, default=512)
    p.add_argument("--kv-budget-mb", type=float, default=64)
    p.add_argument("--mode", choices=["main", "serve", "restart"], default="main", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode == "serve":
        return serve(args)
    if args.mode == "restart":
        return restart(args)
    common = ["--model", args.model, "--kv-budget-mb", str(args.kv_budget_mb)]
    with tempfile.TemporaryDirectory() as tmp:
        live = Path(tmp) / "live.json"
        torchrun(args.world, "--mode", "serve", "--out", str(live), "--chain", *args.chain, "--runs", str(args.runs),
                 "--requests", str(args.requests), "--prompt-len", str(args.prompt_len), "--progress",
                 str(args.progress), "--max-new", str(args.max_new), *common)
        stop_s = time.time() - json.loads(live.read_text())["t_stop"]  # stop command -> world exited
        res = json.loads(live.read_text())
        restarts = {}
        for tr, tokens in res["interrupted"].items():
            (Path(tmp) / "tokens.json").write_text(json.dumps(tokens))
            t0 = time.time()
            torchrun(args.world, "--mode", "restart", "--target", tr.split("->")[1],
                     "--tokens", str(Path(tmp) / "tokens.json"), "--out", str(Path(tmp) / "r.json"), *common)
            restarts[tr] = stop_s + json.loads((Path(tmp) / "r.json").read_text())["t_first_token"] - t0
    report(res, restarts, stop_s, args)


def report(res: dict, restarts: dict, stop_s: float, args) -> None:
    bw = res["bandwidth"]
    print(f"\nworld {res['world']}, {args.requests} requests in flight ({args.prompt_len}-token prompts), "
          f"median of {args.runs} runs; gloo p2p bandwidth {bw / 2**20:.0f} MiB/s; stopping the serving world "
          f"took {stop_s:.1f} s (included in restart)\n")
    print("Downtime = pause (all switch phases) + the first decode step at the new topology.\n")
    print("| transition | downtime ms | pause ms | first step ms | prestaged downtime ms | prestaged pause ms | "
          + " | ".join(f"{c} ms" for c in PHASE_COLS)
          + " | weights moved MiB | KV moved MiB | sent ÷ planned | peak extra MiB | lower bound ms | restart s | "
            "restart ÷ live |")
    print("|---|" + "---:|" * (len(PHASE_COLS) + 13))
    live_all, staged_all, ratio_all, pre_pause_all = [], [], [], []
    for tr in dict.fromkeys(r["transition"] for r in res["rows"]):
        rows = [r for r in res["rows"] if r["transition"] == tr and not r["prestaged"]]
        staged = [r for r in res["rows"] if r["transition"] == tr and r["prestaged"]]
        med = lambda xs: statistics.median(xs)  # noqa: E731
        live = med(r["downtime_s"] for r in rows)
        pre = med(r["downtime_s"] for r in staged)
        pause = med(sum(r["phases"].values()) for r in rows)
        pre_pause = med(sum(r["phases"].values()) for r in staged)
        phases = [med(r["phases"].get(c, 0.0) for r in rows) * 1e3 for c in PHASE_COLS]
        moved = rows[0]["weights_moved"] + rows[0]["kv_moved"]
        ratio = restarts[tr] / live
        live_all.append(live)
        staged_all.append(pre)
        pre_pause_all.append(pre_pause)
        ratio_all.append(ratio)
        print(f"| {tr} | {live * 1e3:.0f} | {pause * 1e3:.0f} | {(live - pause) * 1e3:.0f} | {pre * 1e3:.0f} | "
              f"{pre_pause * 1e3:.0f} | " + " | ".join(f"{x:.0f}" for x in phases)
              + f" | {rows[0]['weights_moved'] / 2**20:.1f} | {rows[0]['kv_moved'] / 2**20:.2f} | "
              f"{sum(r['bytes_sent'] for r in rows + staged) / sum(r['bytes_planned'] for r in rows + staged):.4f} | "
              f"{med(r['peak_extra'] for r in rows) / 2**20:.0f} | {moved / bw * 1e3:.0f} | {restarts[tr]:.1f} | "
              f"{ratio:.0f}× |")
    print(f"\nmedian over transitions: live {statistics.median(live_all) * 1e3:.0f} ms, pre-staged "
          f"{statistics.median(staged_all) * 1e3:.0f} ms (pause {statistics.median(pre_pause_all) * 1e3:.0f} ms), "
          f"restart ÷ live {statistics.median(ratio_all):.0f}×")


if __name__ == "__main__":
    main()
