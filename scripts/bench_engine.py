"""Serving benchmark: our gRPC server against HF transformers ``generate``, same prompts, same
machine, one run, with the machine's physical limits measured alongside.

    python scripts/bench_engine.py --model runs/smollm2 --dtypes fp32 bf16 --concurrency 1 8 32 64
    python scripts/bench_engine.py --model runs/smollm2 --world 3 --topologies 3x1 1x3 --dtypes fp32 --no-hf

For each dtype and topology it starts `remp serve` and sends ``c`` streams at once over gRPC
(token-id prompts of mixed lengths, EOS ignored, --new-tokens each), for each concurrency ``c``;
HF ``generate`` runs the same ``c`` prompts as one left-padded batch in this process with the
same thread count, its runs alternating with ours (the server idles meanwhile). Every cell: one
warm-up, then --runs runs; tokens/s is the median run, TTFT/TPOT percentiles are over every
request of those runs (HF: one value per run, the whole batch shares it).

The limit beside each row is what this machine allows a decode step of ``c`` sequences: every
weight read once per step (memory bandwidth, measured here) and 2 FLOP per parameter per token
(matmul throughput at ``c`` rows in that dtype, measured here); decode tok/s = c / TPOT p50.
Attention's KV reads and the prefill are left out of the limit (small next to the weights at
these lengths), so the limit is a bound, not an estimate.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remp_megatron.topology import Topology  # noqa: E402
from server.client import RempClient  # noqa: E402
from server.launch import ServerProcess  # noqa: E402

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Cell:
    impl: str
    dtype: str
    concurrency: int
    tok_s: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float


def prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` random token-id prompts, lengths uniform in [lo, hi] (the same list for every impl)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(length)).tolist() for length in rng.integers(lo, hi + 1, n)]


def cell(impl: str, dtype: str, c: int, got: "Samples", new_tokens: int) -> Cell:
    pct = lambda xs, q: float(np.percentile(xs, q))  # noqa: E731
    return Cell(impl, dtype, c, c * new_tokens / statistics.median(got.walls), pct(got.ttfts, 50),
                pct(got.ttfts, 99), pct(got.tpots, 50), pct(got.tpots, 99))


def burst(addr: str, batch: list[list[int]], new_tokens: int) -> tuple[float, list[float], list[float]]:
    """Send every prompt at once as a gRPC stream; (wall s, TTFTs, TPOTs)."""
    ttft, tpot = [0.0] * len(batch), [0.0] * len(batch)
    start = threading.Barrier(len(batch) + 1)

    def one(i: int, client: RempClient) -> None:
        start.wait()
        sent, times = time.monotonic(), []
        for chunk in client.stream(batch[i], max_new_tokens=new_tokens, ignore_eos=True):
            times.extend([time.monotonic()] * len(chunk.token_ids))
        if len(times) != new_tokens:
            raise RuntimeError(f"request {i}: {len(times)} tokens, expected {new_tokens}")
        ttft[i], tpot[i] = times[0] - sent, (times[-1] - times[0]) / max(1, len(times) - 1)

    with RempClient(addr) as client:
        threads = [threading.Thread(target=one, args=(i, client)) for i in range(len(batch))]
        for th in threads:
            th.start()
        start.wait()
        t0 = time.monotonic()
        for th in threads:
            th.join()
        return time.monotonic() - t0, ttft, tpot


@dataclass
class Samples:
    """Every run of one cell: wall s per run, TTFT and TPOT per request."""

    walls: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tpots: list[float] = field(default_factory=list)

    def add(self, wall: float, ttft: list[float], tpot: list[float]) -> None:
        self.walls.append(wall)
        self.ttfts += ttft
        self.tpots += tpot


def kv_bytes_per_token(model: str, topo: Topology, dtype: str) -> float:
    from remp_megatron.kv_cache import block_bytes
    from remp_megatron.spec import ModelSpec

    spec = ModelSpec.from_file(Path(model) / "config.json").served_in(dtype, torch.device("cpu"))
    return block_bytes(spec, topo, block_size=1)


def start_server(args, topo: Topology, dtype: str, tmp: Path) -> ServerProcess:
    c_max = max(args.concurrency)
    # KV for the largest burst at full length (HF's cache holds it too), so no run measures preemption.
    kv_tokens = c_max * (args.max_prompt + args.new_tokens + 16)
    kv_mb = kv_tokens * kv_bytes_per_token(args.model, topo, dtype) / 2**20 * 1.05
    threads = max(1, args.threads // args.world)
    extra = ["--dtype", dtype, "--max-num-seqs", str(c_max), "--kv-budget-mb", f"{kv_mb:.1f}",
             "--ep", str(topo.ep)]
    return ServerProcess(args.model, args.world, topo.tp, topo.pp, *extra, workdir=tmp, name=f"{topo.short}-{dtype}",
                         env={"OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"})


class HFGenerate:
    """HF ``generate`` on left-padded batches, greedy, exactly ``n`` new tokens."""

    def __init__(self, hf_dir: Path, dtype: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=TORCH_DTYPES[dtype]).eval()
        eos = self.model.config.eos_token_id
        self.pad = eos if isinstance(eos, int) else 0

    @torch.inference_mode()
    def generate(self, batch: list[list[int]], n: int) -> None:
        width = max(map(len, batch))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=self.pad)

    def run(self, batch: list[list[int]], new_tokens: int) -> tuple[float, list[float], list[float]]:
        """(wall s, [TTFT], [TPOT]): the whole batch shares one TTFT (a 1-token generate) and TPOT."""
        t0 = time.monotonic()
        self.generate(batch, 1)
        ttft = time.monotonic() - t0
        t0 = time.monotonic()
        self.generate(batch, new_tokens)
        wall = time.monotonic() - t0
        return wall, [ttft], [(wall - ttft) / (new_tokens - 1)]


def measure(args, dtype: str, work: list[list[int]], tmp: Path) -> list[Cell]:
    """Every topology's server; for the first one HF's runs alternate with ours, run by run, so a
    machine that slows down for a while (a shared VM does) weighs on both sides alike."""
    hf = None if args.no_hf else HFGenerate(tmp / "hf", dtype)
    cells = []
    for i, topo in enumerate(map(Topology.parse, args.topologies)):
        print(f"ReMP {topo} {dtype} through gRPC{'' if hf is None or i else ', HF generate alternating'} ...",
              file=sys.stderr, flush=True)
        with start_server(args, topo, dtype, tmp) as server:
            for c in args.concurrency:
                batch = work[:c]
                sides = {f"ReMP {topo}": lambda b, n: burst(server.addr, b, n)}
                if hf is not None and i == 0:
                    sides["HF transformers"] = hf.run
                for run in sides.values():  # warm-up
                    run(batch, min(8, args.new_tokens))
                samples = {impl: Samples() for impl in sides}
                for _ in range(args.runs):
                    for impl, run in sides.items():
                        samples[impl].add(*run(batch, args.new_tokens))
                for impl, got in samples.items():
                    cells.append(cell(impl, dtype, c, got, args.new_tokens))
                    print(f"  {cells[-1]}", file=sys.stderr, flush=True)
    return cells


@dataclass
class Limits:
    read_gb_s: float  # memory read bandwidth
    gflop_s: dict[int, float]  # matmul throughput at c rows

    def tok_s(self, c: int, weight_bytes: float, flop_per_token: float) -> float:
        return min(c * self.read_gb_s * 1e9 / weight_bytes, self.gflop_s[c] * 1e9 / flop_per_token)


def measure_limits(hidden: int, width: int, dtype: torch.dtype, rows: list[int]) -> Limits:
    """Memory read (sum of a 512 MiB array) and a [c, hidden] x [hidden, width] matmul with the
    faster of MKL's GEMM and oneDNN's on a packed weight (linear.py's two kernels): each the best
    of 5 timings, since a limit is the most this machine showed (this VM's speed drifts)."""
    def best(fn, n: int = 5) -> float:
        fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    big = torch.ones(2**27, dtype=torch.float32)
    read = big.numel() * 4 / best(big.sum) / 1e9
    big = None  # 512 MiB
    w = torch.randn(width, hidden, dtype=dtype)
    kernels = [lambda x: torch.nn.functional.linear(x, w)]
    if torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 32)
        kernels.append(lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    flops = {}
    for c in rows:
        x = torch.randn(c, hidden, dtype=dtype)
        seconds = min(best(lambda: [gemm(x) for _ in range(20)]) for gemm in kernels) / 20
        flops[c] = 2 * c * hidden * width / seconds / 1e9
    return Limits(read, flops)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--world", type=int, default=1, help="ranks of the server (--nproc)")
    p.add_argument("--topologies", nargs="+", default=["1x1"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(TORCH_DTYPES))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all (split across the server's ranks)")
    p.add_argument("--no-hf", action="store_true", help="skip HF generate")
    p.add_argument("--json-out", type=Path, help="write every cell and the limits here")
    p.add_argument("--profile-out", help="write the adaptive policy's cost profile (JSON) here (first dtype)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from remp_megatron.spec import ModelSpec

    spec = ModelSpec.from_file(Path(args.model) / "config.json")
    work = prompts(max(args.concurrency), args.min_prompt, args.max_prompt, spec.vocab_size)
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "checkpoint_tools.convert", "export", args.model, f"{tmp}/hf"],
                       check=True, stdout=subprocess.DEVNULL)
        for dtype in args.dtypes:
            cells += measure(args, dtype, work, Path(tmp))
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):  # the parameter count only
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(f"{tmp}/hf")).parameters())
    # Decode reads every parameter once per step; the tied embedding is read as the output layer.
    read_params = params - (0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size)
    limits = {d: measure_limits(spec.hidden_size, 2 * spec.intermediate_size, TORCH_DTYPES[d], args.concurrency)
              for d in args.dtypes}
    if args.json_out:
        args.json_out.write_text(json.dumps({"cells": [asdict(c) for c in cells],
                                             "limits": {d: asdict(v) for d, v in limits.items()}}, indent=1))
    if args.profile_out:
        from remp_megatron.policy import CostProfile, TopologyCost

        ours = [c for c in cells if c.impl.startswith("ReMP") and c.dtype == args.dtypes[0]]
        lo, hi = min(args.concurrency), max(args.concurrency)
        CostProfile(tuple(
            TopologyCost(t, next(c.tpot_p50 for c in ours if c.impl == f"ReMP {t}" and c.concurrency == lo),
                         next(c.tok_s for c in ours if c.impl == f"ReMP {t}" and c.concurrency == hi))
            for t in map(Topology.parse, args.topologies))).save(Path(args.profile_out))
    hf = {(c.dtype, c.concurrency): c for c in cells if c.impl == "HF transformers"}
    print(f"\nprompts {args.min_prompt}-{args.max_prompt} tokens (uniform), {args.new_tokens} new tokens, "
          f"{args.threads} threads, {args.runs} runs; {params / 1e6:.0f}M parameters")
    for d, lim in limits.items():
        print(f"limits {d}: memory read {lim.read_gb_s:.1f} GB/s; matmul GFLOP/s at c rows: "
              + ", ".join(f"{c}: {g:.0f}" for c, g in lim.gflop_s.items()))
    print("\n| implementation | dtype | c | tokens/s | × HF | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
          "decode tok/s | limit tok/s | % of limit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in cells:
        ref = hf.get((c.dtype, c.concurrency))
        decode = c.concurrency / c.tpot_p50
        limit = limits[c.dtype].tok_s(c.concurrency, read_params * TORCH_DTYPES[c.dtype].itemsize, 2 * read_params)
        print(f"| {c.impl} | {c.dtype} | {c.concurrency} | {c.tok_s:.1f} | "
              f"{f'{c.tok_s / ref.tok_s:.2f}' if ref else '–'} | {c.ttft_p50 * 1e3:.0f} / {c.ttft_p99 * 1e3:.0f} | "
              f"{c.tpot_p50 * 1e3:.0f} / {c.tpot_p99 * 1e3:.0f} | {decode:.0f} | {limit:.0f} | "
              f"{100 * decode / limit:.0f}% |")


if __name__ == "__main__":
    main()
