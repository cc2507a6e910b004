"""Start-up costs per rank: import megatron-core, build this rank's GPTModel stage, load its
shard from the dist-checkpoint; median of --runs loads per topology, max over ranks.

    python -m torch.distributed.run --standalone --nproc-per-node=3 scripts/bench_load.py \
        --model runs/smollm2 --topologies 1x1 3x1 1x3
"""
import argparse
import statistics
import time
from pathlib import Path

t_start = time.perf_counter()
import remp_megatron  # noqa: E402,F401  (timed with megatron-core: the imports are part of a cold start)
import megatron.core  # noqa: E402,F401

IMPORT_S = time.perf_counter() - t_start

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from remp_megatron import groups  # noqa: E402
from remp_megatron.model import build_stage_model, load_stage_weights  # noqa: E402
from remp_megatron.runtime import init_distributed  # noqa: E402
from remp_megatron.spec import ModelSpec  # noqa: E402
from remp_megatron.topology import Topology  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--topologies", nargs="+", default=["1x1", "3x1", "1x3"])
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    rt = init_distributed()
    spec = ModelSpec.from_file(Path(args.model) / "config.json")
    rows = []
    for t in args.topologies:
        topo = Topology.parse(t)
        topo.validate(spec, rt.world_size)
        groups.activate(topo)
        builds, loads = [], []
        for _ in range(args.runs):
            coords = topo.coords(rt.rank)
            t0 = time.perf_counter()
            model = build_stage_model(spec, topo, coords[0], rt.device) if coords else None
            t1 = time.perf_counter()
            load_stage_weights(model, args.model)
            t2 = time.perf_counter()
            builds.append(t1 - t0)
            loads.append(t2 - t1)
            del model
        local = torch.tensor([IMPORT_S, statistics.median(builds), statistics.median(loads)])
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        rows.append((str(topo), *local.tolist()))
    if rt.rank == 0:
        print(f"\n{Path(args.model).name}, world {rt.world_size}, median of {args.runs} runs, max over ranks\n")
        print("| topology | import megatron.core s | build stage s | load shard s |")
        print("|---|---:|---:|---:|")
        for name, imp, build, load in rows:
            print(f"| {name} | {imp:.2f} | {build:.2f} | {load:.2f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
