"""The TP all-reduce on CPU: gloo's ``all_reduce`` against ``collectives.all_reduce_sum`` (one
round of messages), per tensor size, at this world size. Run under torchrun:

    torchrun --standalone --nproc-per-node 4 scripts/bench_collectives.py --runs 5

Prints, from rank 0, a markdown row per size: median over ``--runs`` of the mean time of
``--iters`` back-to-back calls, and the ratio. (A decode step of SmolLM2 at batch c reduces
c × 576 fp32 values, 2.3 KB per sequence, twice per layer.)
"""
import argparse
import statistics
import time

import torch
import torch.distributed as dist

from remp_megatron.collectives import SMALL_BYTES, all_reduce_sum


def mean_us(fn, iters: int) -> float:
    for _ in range(10):
        fn()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--kb", type=int, nargs="+", default=[2, 18, 72, 288, 1152, 2304])
    args = p.parse_args()
    dist.init_process_group("gloo")
    group, world = dist.group.WORLD, dist.get_world_size()
    if dist.get_rank() == 0:
        print(f"world {world}, gloo on loopback, {torch.get_num_threads()} thread(s) per rank; "
              f"all_reduce_sum sends at most {SMALL_BYTES >> 10} KB itself\n")
        print("| KB | gloo all_reduce µs | all_reduce_sum µs | × faster |\n|---:|---:|---:|---:|")
    for kb in args.kb:
        x = torch.randn(kb * 256)
        ring = statistics.median(mean_us(lambda: dist.all_reduce(x.clone(), group=group), args.iters)
                                 for _ in range(args.runs))
        ours = statistics.median(mean_us(lambda: all_reduce_sum(x.clone(), group), args.iters)
                                 for _ in range(args.runs))
        if dist.get_rank() == 0:
            print(f"| {kb} | {ring:.0f} | {ours:.0f} | {ring / ours:.2f} |", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
