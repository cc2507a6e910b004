"""Where a decode step's time goes, per module of the layers (engine level, one rank, no server).

    OMP_NUM_THREADS=2 python scripts/profile_step.py --model runs/smollm2 --dtype bf16 --concurrency 32

Serves ``--concurrency`` prompts of the benchmark's kind (bench_engine.prompts) in process and
times every submodule of the decoder layers with forward hooks (wall clock, summed over the
layers), the LM head, and the whole step; only steps in which every sequence decodes count.
Prints milliseconds per step: medians over those steps, per run. Submodules nest (``mlp``
contains ``mlp.linear_fc1``; ``layers`` is the layers whole); parts under 0.5 ms are left out;
the hooks themselves add a few %.

``--gemms`` also times the step's GEMMs alone, the floor of a decode step: one pass over every
linear of the model (layers and LM head, in step order, so weights are cold as in serving) at
``--concurrency`` rows, on the packed weights and on MKL's GEMM, median of 5 passes.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from bench_engine import prompts
from remp_megatron.linear import _Packable, use_packed_weights
from remp_megatron.spec import ModelSpec
from server.python_api import pipeline


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--gemms", action="store_true", help="also time one pass over the model's GEMMs alone")
    args = p.parse_args()

    spec = ModelSpec.from_file(f"{args.model}/config.json")
    work = prompts(args.concurrency, 16, 128, spec.vocab_size)
    pipe = pipeline(args.model, dtype=args.dtype, max_num_seqs=args.concurrency, kv_budget_mb=400)
    runner = pipe.engine.worker.runner
    step_ms: dict[str, float] = collections.defaultdict(float)  # this step's time per part
    kept: dict[str, list[float]] = collections.defaultdict(list)  # per part, over decode-only steps
    started: dict[str, float] = {}

    def timed(name: str, module: torch.nn.Module) -> None:
        def before(*_):
            started[name] = time.perf_counter()

        def after(*_):
            step_ms[name] += (time.perf_counter() - started[name]) * 1e3

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    for layer in runner.model.decoder.layers:
        for name, module in layer.named_modules():
            timed(name or "layers", module)
    timed("LM head", runner.model.output_layer)

    run_step = runner.run_step

    def profiled(plan, *a, **kw):
        step_ms.clear()
        t0 = time.perf_counter()
        out = run_step(plan, *a, **kw)
        step_ms["step"] = (time.perf_counter() - t0) * 1e3
        if all(n == 1 for n in plan.query_lens):
            for name, ms in step_ms.items():
                kept[name].append(ms)
        return out

    runner.run_step = profiled
    pipe(work, max_new_tokens=4, ignore_eos=True)  # warm-up
    print(f"{args.dtype}, {args.concurrency} sequences, {torch.get_num_threads()} threads; "
          f"ms per decode step (median over the run's decode-only steps)")
    for run in range(args.runs):
        kept.clear()
        pipe(work, max_new_tokens=args.new_tokens, ignore_eos=True)
        parts = sorted(kept, key=lambda k: -statistics.median(kept[k]))
        print(f"run {run + 1} ({len(kept['step'])} steps): " +
              ", ".join(f"{k} {statistics.median(kept[k]):.1f}" for k in parts if statistics.median(kept[k]) >= 0.5))
    if args.gemms:
        gemm_floor(runner.model, args.concurrency)
    pipe.close()


@torch.inference_mode()
def gemm_floor(model, rows: int) -> None:
    linears = [m for m in model.modules() if isinstance(m, _Packable)]
    weights = [m.weight if m.weight is not None else model.shared_embedding_or_output_weight() for m in linears]
    inputs = [torch.randn(rows, 1, w.shape[1], dtype=w.dtype) for w in weights]
    for packed in (True, False):
        use_packed_weights(model, packed)
        times = []
        for _ in range(6):  # the first pass warms up
            t0 = time.perf_counter()
            for m, x, w in zip(linears, inputs, weights):
                m._gemm(x, w)
            times.append(time.perf_counter() - t0)
        print(f"{len(linears)} GEMMs at {rows} rows, {'packed weights' if packed else 'MKL'}: "
              f"{statistics.median(times[1:]) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
