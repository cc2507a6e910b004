"""torchrun world for parity tests, per model, dtype and topology: full-sequence logits of
each prompt and (with --greedy N, serving dtypes only) N greedy tokens per prompt.

One world serves every (model, dtype, topology) case: parallel state is re-initialised in
place. ``--dtypes float64`` builds the model in fp64 from the same (fp32) checkpoint, so
parity can be checked without fp32 rounding noise; a serving dtype (``bf16``, ``fp16``) goes
through the server's own path (``EngineConfig.dtype``: cast at load). Rank 0 (the driver, which receives the
last stage's logits) writes {out}/{model}__{dtype}__{topology.short}.pt:
{"dtype": as served, "logits": [[len, vocab]...], "greedy": [[N ids]...], "cpu_kernels": whether the
CPU kernels ran}; greedy decoding runs through the engine with EOS ignored.
"""
import argparse
import itertools
import json
from pathlib import Path
from typing import get_args

import torch

from remp_megatron import cpu_kernels
from remp_megatron.config import EngineConfig
from remp_megatron.engine import Engine
from remp_megatron.worker import load_worker, worker_loop
from remp_megatron.request import Request, SamplingParams
from remp_megatron.scheduler import StepPlan
from remp_megatron.runtime import init_distributed
from remp_megatron.spec import ModelSpec, ServingDtype
from remp_megatron.topology import Topology

BLOCK = 16


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--topologies", nargs="+", required=True)
    p.add_argument("--prompts", required=True, help="json: list of token-id lists")
    p.add_argument("--dtype-prompts", nargs="+", default=[], metavar="DTYPE=FILE",
                   help="DTYPE runs these prompts instead")
    p.add_argument("--out", required=True)
    p.add_argument("--greedy", type=int, default=0)
    p.add_argument("--dtypes", nargs="+", default=["float32"], help="float32, float64, or a serving dtype (bf16)")
    p.add_argument("--dtype-topologies", nargs="+", default=[], metavar="DTYPE=T1,T2",
                   help="run DTYPE only at these topologies (default: every topology)")
    args = p.parse_args()
    rt = init_distributed()
    only = {d: ts.split(",") for d, ts in (x.split("=") for x in args.dtype_topologies)}
    prompt_files = dict(x.split("=") for x in args.dtype_prompts)
    for model_dir, dtype in itertools.product(args.models, args.dtypes):
        prompts = json.loads(Path(prompt_files.get(dtype, args.prompts)).read_text())
        # Same (fp32) checkpoint, model built in `dtype`: loading casts into the model's tensors.
        spec = ModelSpec.from_file(Path(model_dir) / "config.json")
        serving = dtype in get_args(ServingDtype)
        if not serving:
            spec = spec.model_copy(update={"dtype": dtype})
        greedy = args.greedy if serving or dtype == "float32" else 0
        for t in only.get(dtype, args.topologies):
            topo = Topology.parse(t)
            if topo.ep > 1 and spec.moe is None:  # expert parallelism: MoE models only
                continue
            cfg = EngineConfig(block_size=BLOCK, num_blocks=sum(-(-(len(x) + args.greedy) // BLOCK) for x in prompts),
                               dtype=dtype if serving else None)
            worker = load_worker(rt, spec, model_dir, topo, cfg)
            runner = worker.runner
            result = {"dtype": worker.spec.dtype, "cpu_kernels": cpu_kernels.kernels() is not None}
            if runner is not None:
                # Every position's logits, prompts packed in one step (blocks after each other).
                tables, nxt = [], 0
                for x in prompts:
                    k = -(-len(x) // BLOCK)
                    tables.append(list(range(nxt, nxt + k)))
                    nxt += k
                plan = StepPlan([i for x in prompts for i in x], [0] * len(prompts), [len(x) for x in prompts],
                                tables, [True] * len(prompts), all_logits=True)
                logits = runner.run_step(plan)
                if logits is not None:
                    result["logits"] = list(torch.split(logits, [len(x) for x in prompts]))
            if greedy and rt.rank == 0:
                engine = Engine(worker, cfg)
                handles = [engine.add_request(Request(request_id=str(i), prompt_token_ids=x, params=SamplingParams(
                    max_new_tokens=greedy, ignore_eos=True))) for i, x in enumerate(prompts)]
                engine.run_until_idle()
                engine.stop_workers()
                result["greedy"] = [h.result().token_ids for h in handles]
            elif greedy:
                worker_loop(worker)
            if rt.rank == 0:
                torch.save(result, Path(args.out) / f"{Path(model_dir).name}__{dtype}__{topo.short}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
