"""What the front end ⇄ engine core link costs per token: the engine core's side sends one
TokenOutput per sequence per step (as engine_core does), the front end's side receives and
decodes them, over real ZeroMQ sockets on loopback.

    python scripts/bench_link.py --tokens 20000 --runs 5

Reports µs per token from the first send to the last receive (median of the runs), and what that
is of a decode step of ``--batch`` sequences taking ``--step-ms`` (measured elsewhere:
docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server import link  # noqa: E402


def one_run(n: int) -> float:
    done, received = threading.Event(), [0]

    def on_message(_peer, msg):
        if isinstance(msg, link.TokenOutput):
            received[0] += 1
            if received[0] == n:
                done.set()

    front, address = link.bind("127.0.0.1", 0, on_message, "bench-front")
    core = link.connect(address, lambda msg: None, "bench-core")
    core.send(link.TokenOutput("warm-up", [1]))
    n += 1
    t0 = time.perf_counter()
    for i in range(n - 1):
        core.send(link.TokenOutput(f"req-{i % 64}", [i % 50000]))
    assert done.wait(120), f"only {received[0]} of {n} messages arrived"
    elapsed = time.perf_counter() - t0
    core.close()
    front.close()
    return elapsed / (n - 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--step-ms", type=float, default=317.0, help="a decode step of --batch sequences (ms)")
    args = p.parse_args()
    per = [one_run(args.tokens) for _ in range(args.runs)]
    us = statistics.median(per) * 1e6
    step_us = us * args.batch
    print(f"link: {us:.1f} µs per token (median of {args.runs} runs of {args.tokens}; min {min(per) * 1e6:.1f}); "
          f"a {args.batch}-sequence step sends {args.batch} tokens: {step_us / 1e3:.2f} ms, "
          f"{100 * step_us / 1e3 / args.step_ms:.2f} % of a {args.step_ms:.0f} ms step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
