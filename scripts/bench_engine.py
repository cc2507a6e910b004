"""Engine benchmark: throughput, TTFT and TPOT at several batch sizes and topologies, with HF
transformers ``generate`` on the same machine and weights as the side-by-side reference.

    python scripts/bench_engine.py --model runs/smollm2 --world 3 --topologies 1x1 3x1 1x3

Runs a torchrun world for our engine (this file in --worker mode), then HF in this process on
the same weights (exported from the model dir), and prints one table. Every cell is the
median over --runs runs after one warm-up run. Prompts are random token ids of equal length
and EOS is ignored, so every request produces exactly --new-tokens tokens.
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

from remp_megatron.topology import Topology


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def summarize(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in ("tok_s", "ttft_s", "tpot_s")}


def worker(args) -> None:
    import torch.distributed as dist
    from tqdm import tqdm

    from remp_megatron.config import EngineConfig
    from remp_megatron.engine import Engine
    from remp_megatron.worker import load_worker, worker_loop
    from remp_megatron.request import Request, SamplingParams
    from remp_megatron.runtime import init_distributed
    from remp_megatron.spec import ModelSpec
    from remp_megatron.topology import Topology

    rt = init_distributed()
    spec = ModelSpec.from_file(Path(args.model) / "config.json")
    # KV for the largest batch at full length (HF's cache holds it too): no run is limited by preemption.
    block = EngineConfig().block_size
    num_blocks = max(args.batch_sizes) * -(-(args.prompt_len + args.new_tokens) // block)
    cfg = EngineConfig(num_blocks=num_blocks, max_num_seqs=max(args.batch_sizes),
                       max_tokens_per_step=max(args.batch_sizes) * args.prompt_len)
    results = []
    bar = tqdm(total=len(args.topologies) * len(args.batch_sizes) * (args.runs + 1), desc="engine runs",
               file=sys.stderr, disable=rt.rank != 0)
    for t in args.topologies:
        worker = load_worker(rt, spec, args.model, Topology.parse(t), cfg)
        if rt.rank != 0:
            worker_loop(worker)
            continue
        engine = Engine(worker, cfg)
        for b in args.batch_sizes:
            runs = []
            for r in range(args.runs + 1):
                t0 = time.monotonic()
                hs = [engine.add_request(Request(request_id=f"{t}-{b}-{r}-{i}", prompt_token_ids=p,
                                                 params=SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)))
                      for i, p in enumerate(prompts(b, args.prompt_len, spec.vocab_size))]
                engine.run_until_idle()
                wall = time.monotonic() - t0
                bar.update()
                if r == 0:
                    continue  # warm-up
                ttft = statistics.median(h.token_times[0] - h.arrival for h in hs)
                tpot = statistics.median((h.token_times[-1] - h.token_times[0]) / (len(h.token_times) - 1) for h in hs)
                runs.append({"tok_s": b * args.new_tokens / wall, "ttft_s": ttft, "tpot_s": tpot})
            results.append({"impl": f"ReMP {worker.topo}", "batch": b, **summarize(runs)})
        engine.stop_workers()
    if rt.rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def hf_reference(args, hf_dir: Path) -> list[dict]:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    torch.set_num_threads(args.hf_threads)
    results = []
    for b in tqdm(args.batch_sizes, desc="HF generate", file=sys.stderr):
        ids = torch.tensor(prompts(b, args.prompt_len, model.config.vocab_size))
        runs = []
        for r in range(args.runs + 1):
            with torch.no_grad():
                t0 = time.monotonic()
                model.generate(ids, max_new_tokens=1, do_sample=False)
                ttft = time.monotonic() - t0
                t0 = time.monotonic()
                model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
                wall = time.monotonic() - t0
            if r:
                runs.append({"tok_s": b * args.new_tokens / wall, "ttft_s": ttft,
                             "tpot_s": (wall - ttft) / (args.new_tokens - 1)})
        results.append({"impl": "HF transformers", "batch": b, **summarize(runs)})
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--world", type=int, default=3)
    p.add_argument("--topologies", nargs="+", default=["1x1", "3x1", "1x3"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--hf-threads", type=int, default=2)
    p.add_argument("--profile-out", help="write the adaptive policy's cost profile (JSON) here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engine.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.world}",
               __file__, "--worker", "--out", str(out), *sys.argv[1:]]
        subprocess.run(cmd, check=True)
        rows = json.loads(out.read_text())
        subprocess.run([sys.executable, "-m", "checkpoint_tools.convert", "export", args.model, f"{tmp}/hf"], check=True,
                       stdout=subprocess.DEVNULL)
        rows += hf_reference(args, Path(tmp) / "hf")
    if args.profile_out:
        from remp_megatron.policy import CostProfile, TopologyCost

        ours = [r for r in rows if r["impl"].startswith("ReMP")]
        lo, hi = min(args.batch_sizes), max(args.batch_sizes)
        CostProfile(tuple(
            TopologyCost(t, next(r["tpot_s"] for r in ours if r["impl"] == f"ReMP {t}" and r["batch"] == lo),
                         next(r["tok_s"] for r in ours if r["impl"] == f"ReMP {t}" and r["batch"] == hi))
            for t in map(Topology.parse, args.topologies))).save(Path(args.profile_out))
    hf = {r["batch"]: r for r in rows if r["impl"] == "HF transformers"}
    print(f"\nprompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.runs} runs\n")
    print("| implementation | batch | tokens/s | × HF | TTFT ms | TPOT ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["tok_s"] / hf[r["batch"]]["tok_s"]
        print(f"| {r['impl']} | {r['batch']} | {r['tok_s']:.1f} | {ratio:.2f} | {r['ttft_s'] * 1e3:.0f} | "
              f"{r['tpot_s'] * 1e3:.0f} |")


if __name__ == "__main__":
    main()
