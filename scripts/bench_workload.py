"""Workload replay: every fixed topology and the adaptive policy on the same bursty trace.

    python scripts/bench_workload.py --model runs/smollm2 --world 3 --profile docs/profile.json \
        --fixed 1x1 1x3 3x1 --duration 120 --out docs

Generates a seeded trace (calm and burst phases, Poisson arrivals, heavy-tailed prompt and
output lengths like public LLM traces) or reads a CSV of (timestamp_s, prompt_tokens,
output_tokens). For each configuration it starts `remp serve`, replays the trace over gRPC
(each request streamed at its timestamp), records TTFT, TPOT and end-to-end latency per
request, and the switches made (the adaptive run pays for its own switches). Writes a table
(markdown) and two PNG plots under --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.client import RempClient  # noqa: E402
from server.launch import ServerProcess  # noqa: E402


@dataclass
class Arrival:
    t: float
    prompt_tokens: int
    output_tokens: int


def synthetic_trace(duration: float, seed: int, calm_rate: float, burst_rate: float, calm_s: float, burst_s: float,
                    max_prompt: int, max_output: int) -> list[Arrival]:
    rng = np.random.default_rng(seed)
    out, t, burst = [], 0.0, False
    phase_end = calm_s
    while t < duration:
        rate = burst_rate if burst else calm_rate
        t += rng.exponential(1.0 / rate)
        if t >= phase_end:
            t, burst = phase_end, not burst
            phase_end += burst_s if burst else calm_s
            continue
        if t < duration:
            # Log-normal lengths: the heavy right tail of ShareGPT/Azure-style traces, scaled to this CPU.
            p = int(np.clip(rng.lognormal(np.log(64), 0.7), 8, max_prompt))
            o = int(np.clip(rng.lognormal(np.log(32), 0.6), 4, max_output))
            out.append(Arrival(t, p, o))
    return out


def read_trace(path: Path) -> list[Arrival]:
    with open(path) as f:
        return [Arrival(float(r["timestamp_s"]), int(r["prompt_tokens"]), int(r["output_tokens"]))
                for r in csv.DictReader(f)]


def replay(addr: str, trace: list[Arrival], vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, a.prompt_tokens).tolist() for a in trace]
    results: list[dict] = [{} for _ in trace]
    client = RempClient(addr)
    t0 = time.monotonic()

    def one(i: int) -> None:
        a = trace[i]
        time.sleep(max(0.0, t0 + a.t - time.monotonic()))
        sent = time.monotonic()
        times, reason = [], None
        for chunk in client.stream(prompts[i], max_new_tokens=a.output_tokens, ignore_eos=True):
            if chunk.token_ids:
                times.append(time.monotonic())
            reason = chunk.finish_reason or reason
        results[i] = {"arrival_s": sent - t0, "ttft_s": times[0] - sent, "e2e_s": times[-1] - sent,
                      "tpot_s": (times[-1] - times[0]) / max(1, len(times) - 1), "tokens": len(times),
                      "finish_reason": reason}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(trace))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    results_wall = time.monotonic() - t0
    client.close()
    for r in results:
        r["wall_s"] = results_wall
    return results


def run_config(name: str, args, trace: list[Arrival], tmp: Path) -> dict:
    from remp_megatron.policy import CostProfile
    from remp_megatron.spec import ModelSpec
    from remp_megatron.topology import Topology

    if name == "adaptive":
        topo = CostProfile.load(args.profile).latency_best
        extra = ["--policy-profile", str(args.profile), "--policy", "--policy-interval", str(args.policy_interval),
                 "--policy-low", str(args.policy_low), "--policy-high", str(args.policy_high),
                 "--policy-patience", str(args.policy_patience), "--policy-min-dwell", str(args.policy_min_dwell)]
    else:
        topo, extra = Topology.parse(name), []
    with ServerProcess(args.model, args.world, topo.tp, topo.pp, "--max-queue", "1024", *extra, workdir=tmp,
                       name=name) as server:
        print(f"[{name}] serving at {topo}; replaying {len(trace)} requests over {trace[-1].t:.0f}s ...",
              file=sys.stderr, flush=True)
        started = time.time()
        vocab = ModelSpec.from_file(Path(args.model) / "config.json").vocab_size
        results = replay(server.addr, trace, vocab, args.seed)
        with RempClient(server.addr) as c:
            st = c.status()
    switches = [{"at_s": s.started_unix - started, "source": s.source, "target": s.target, "downtime_s": s.downtime_s,
                 "committed": s.committed} for s in st.switch_history]
    return {"name": name, "results": results, "switches": switches}


def summarize(run: dict) -> dict:
    rs = run["results"]
    pct = lambda xs, q: float(np.percentile(xs, q))  # noqa: E731
    ttft, tpot, e2e = ([r[k] for r in rs] for k in ("ttft_s", "tpot_s", "e2e_s"))
    return {"config": run["name"], "requests": len(rs), "answered": sum(1 for r in rs if r.get("tokens")),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
            "e2e_p50": pct(e2e, 50), "e2e_p99": pct(e2e, 99), "tok_s": sum(r["tokens"] for r in rs) / rs[0]["wall_s"],
            "switches": sum(1 for s in run["switches"] if s["committed"]),
            "switch_downtime_s": sum(s["downtime_s"] for s in run["switches"] if s["committed"])}


def plot(runs: list[dict], rows: list[dict], trace: list[Arrival], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_load, ax) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [1, 3]})
    ax_load.hist([a.t for a in trace], bins=int(trace[-1].t // 5) + 1, color="grey")
    ax_load.set_ylabel("arrivals / 5 s")
    for run in runs:
        rs = sorted(run["results"], key=lambda r: r["arrival_s"])
        ax.plot([r["arrival_s"] for r in rs], [r["e2e_s"] for r in rs], marker=".", lw=0.8, label=run["name"])
    for s in next((r["switches"] for r in runs if r["name"] == "adaptive"), []):
        ax.axvline(s["at_s"], color="red", ls="--", lw=0.8)
        ax.text(s["at_s"], ax.get_ylim()[1] * 0.95, s["target"], rotation=90, color="red", fontsize=7, va="top")
    ax.set_xlabel("request arrival (s)")
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Latency over time (red: adaptive policy's switches)")
    fig.tight_layout()
    fig.savefig(out / "workload_latency.png", dpi=120)

    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    names = [r["config"] for r in rows]
    for ax, (metric, label) in zip(axes, (("ttft", "TTFT (s)"), ("tpot", "TPOT (s)"), ("e2e", "end-to-end (s)"))):
        x = np.arange(len(names))
        ax.bar(x - 0.2, [r[f"{metric}_p50"] for r in rows], 0.4, label="p50")
        ax.bar(x + 0.2, [r[f"{metric}_p99"] for r in rows], 0.4, label="p99")
        ax.set_xticks(x, names)
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "workload_summary.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--world", type=int, default=3)
    p.add_argument("--profile", type=Path, required=True, help="cost profile (bench_engine.py --profile-out)")
    p.add_argument("--fixed", nargs="+", default=["1x1", "1x3", "3x1"])
    p.add_argument("--trace", type=Path, help="CSV with timestamp_s,prompt_tokens,output_tokens")
    p.add_argument("--duration", type=float, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calm-rate", type=float, default=0.1)
    p.add_argument("--burst-rate", type=float, default=1.0)
    p.add_argument("--calm-s", type=float, default=30)
    p.add_argument("--burst-s", type=float, default=20)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-output", type=int, default=96)
    p.add_argument("--policy-interval", type=float, default=1.0)
    p.add_argument("--policy-low", type=float, default=1.0)
    p.add_argument("--policy-high", type=float, default=6.0)
    p.add_argument("--policy-patience", type=int, default=3)
    p.add_argument("--policy-min-dwell", type=float, default=15.0)
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args()
    trace = read_trace(args.trace) if args.trace else synthetic_trace(
        args.duration, args.seed, args.calm_rate, args.burst_rate, args.calm_s, args.burst_s, args.max_prompt,
        args.max_output)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_config(name, args, trace, Path(tmp)) for name in [*args.fixed, "adaptive"]]
    rows = [summarize(r) for r in runs]
    (args.out / "workload_runs.json").write_text(json.dumps(runs))
    plot(runs, rows, trace, args.out)
    lines = [f"{len(trace)} requests over {trace[-1].t:.0f} s (seed {args.seed}); "
             f"median prompt {statistics.median(a.prompt_tokens for a in trace):.0f} tokens, median output "
             f"{statistics.median(a.output_tokens for a in trace):.0f} tokens", "",
             "| config | answered | TTFT p50 s | TTFT p99 s | TPOT p50 s | TPOT p99 s | e2e p50 s | e2e p99 s | "
             "tokens/s | switches | switch downtime s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['answered']}/{r['requests']} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | "
                     f"{r['tpot_p50']:.3f} | {r['tpot_p99']:.3f} | {r['e2e_p50']:.2f} | {r['e2e_p99']:.2f} | "
                     f"{r['tok_s']:.1f} | {r['switches']} | {r['switch_downtime_s']:.2f} |")
    print("\n".join(lines))
    (args.out / "workload_table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
