"""Rank-loss recovery benchmark: SIGKILL one rank of a serving world while streams run, and time
how long clients wait until serving goes on.

    python scripts/bench_recovery.py --model runs/smollm2 --nproc 3 --tp 3 --pp 1 --streams 8 --runs 3

It starts `remp serve` (with --max-restarts = 2 × runs), runs a reference pass (the streams with
no kill: greedy, so every later pass must reproduce it), then for each run starts the streams,
waits until each has --kill-after tokens, SIGKILLs a rank (alternately a worker rank and rank 0,
the one driving the engine) and measures, from the kill: health NOT_SERVING, health SERVING again,
the first token any stream receives after it, and the longest stall a stream saw. Tokens
re-prefilled = the prompts plus the tokens already streamed, which the front end re-admits.
The reference line beside it: a cold `remp serve` start to serving, and the weight load the log
reports (a restart cannot beat starting the ranks and loading the weights).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.client import RempClient  # noqa: E402
from server.launch import ServerProcess  # noqa: E402


class Streams:
    def __init__(self, client: RempClient, prompts: list[list[int]], new_tokens: int):
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.times: list[list[float]] = [[] for _ in prompts]
        self.threads = [threading.Thread(target=self._run, args=(client, i, p, new_tokens), daemon=True)
                        for i, p in enumerate(prompts)]
        for t in self.threads:
            t.start()

    def _run(self, client, i, prompt, new_tokens):
        for chunk in client.stream(prompt, max_new_tokens=new_tokens, ignore_eos=True):
            self.tokens[i] += chunk.token_ids
            self.times[i] += [time.monotonic()] * len(chunk.token_ids)

    def join(self, timeout: float = 600) -> None:
        for t in self.threads:
            t.join(timeout)


def wait(cond, timeout: float = 300, step: float = 0.02) -> float:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(step)
    return time.monotonic()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("runs/smollm2"))
    p.add_argument("--nproc", type=int, default=3)
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--kill-after", type=int, default=16, help="tokens each stream has before the kill")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1000, args.prompt_tokens).tolist() for _ in range(args.streams)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        with ServerProcess(args.model, args.nproc, args.tp, args.pp, "--max-restarts", str(2 * args.runs),
                           "--max-new-tokens", str(args.new_tokens), workdir=Path(tmp),
                           env={"OMP_NUM_THREADS": "1"}) as server, RempClient(server.addr) as c:
            cold = time.monotonic() - t0
            ref = Streams(c, prompts, args.new_tokens)
            ref.join()
            for run in range(args.runs):
                rank = 0 if run % 2 else args.nproc - 1
                s = Streams(c, prompts, args.new_tokens)
                wait(lambda: all(len(t) >= args.kill_after for t in s.tokens))
                pid = next(r.pid for r in c.status().ranks if r.rank == rank)
                before = [len(t) for t in s.tokens]
                t_kill = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                t_down = wait(lambda: c.health() != "SERVING", step=0.005)
                t_up = wait(lambda: c.health() == "SERVING", step=0.005)
                readmitted = sum(len(p) + len(t) for p, t in zip(prompts, s.tokens) if len(t) < args.new_tokens)
                s.join()
                assert s.tokens == ref.tokens, "a stream differs from the no-kill pass"
                after = [times[n] for times, n in zip(s.times, before) if len(times) > n]
                stall = max(times[n] - times[n - 1] for times, n in zip(s.times, before) if len(times) > n)
                rows.append(dict(rank=rank, down=t_down - t_kill, up=t_up - t_kill, first=min(after) - t_kill,
                                 stall=stall, readmitted=readmitted))
                print(f"run {run + 1}: killed rank {rank}: NOT_SERVING after {rows[-1]['down']:.2f} s, SERVING after "
                      f"{rows[-1]['up']:.2f} s, first token after {rows[-1]['first']:.2f} s; {readmitted} tokens "
                      f"re-prefilled; streams exact", file=sys.stderr)
            st = c.status()
        log = server.log_path.read_text()
    loads = [float(x) for x in re.findall(r"weights loaded in ([\d.]+) s", log)]
    print(f"SmolLM2 ({args.model.name}) TP{args.tp}·PP{args.pp} on {args.nproc} ranks, {args.streams} streams of "
          f"{args.prompt_tokens} + {args.new_tokens} tokens, killed after {args.kill_after}; {st.restarts} restarts\n")
    print("| killed rank | kill → NOT_SERVING s | kill → SERVING s | kill → first token s | worst stream stall s "
          "| tokens re-prefilled |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        who = "0 (engine)" if r["rank"] == 0 else f"{r['rank']} (worker)"
        print(f"| {who} | {r['down']:.2f} | {r['up']:.2f} | {r['first']:.2f} | {r['stall']:.2f} | {r['readmitted']} |")
    med = {k: statistics.median(r[k] for r in rows) for k in ("down", "up", "first", "stall")}
    print(f"| **median** | {med['down']:.2f} | {med['up']:.2f} | {med['first']:.2f} | {med['stall']:.2f} | |")
    print(f"\nreference: a cold `remp serve` start to serving {cold:.1f} s; weights loaded per (re)start "
          f"{statistics.median(loads):.1f} s (median of {len(loads)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
