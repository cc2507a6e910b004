"""Foundation demo (torchrun, 3 ranks): SmolLM2 at TP3·PP1, then at TP1·PP3 in the same
processes; the same greedy answer to a chat prompt from each.

    python -m torch.distributed.run --standalone --nproc-per-node=3 scripts/demo.py --model runs/smollm2
"""
import argparse
import time
from pathlib import Path

import torch.distributed as dist

from remp_megatron.generate import greedy_generate
from remp_megatron.model_runner import load_runner
from remp_megatron.runtime import init_distributed
from remp_megatron.spec import ModelSpec
from remp_megatron.topology import Topology

BLOCK = 16


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--topologies", nargs="+", default=["3x1", "1x3"])
    args = p.parse_args()

    rt = init_distributed()
    spec = ModelSpec.from_file(Path(args.model) / "config.json")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    prompt = list(tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"])
    answers = {}
    for t in args.topologies:
        topo = Topology.parse(t)
        topo.validate(spec, rt.world_size)
        t0 = time.perf_counter()
        blocks = -(-(len(prompt) + args.max_new_tokens) // BLOCK)
        runner = load_runner(spec, args.model, topo, rt.rank, rt.device, blocks, BLOCK)
        t1 = time.perf_counter()
        ids = greedy_generate(runner, topo, rt.control_group, [prompt], args.max_new_tokens)[0]
        t2 = time.perf_counter()
        eos = [i for i, x in enumerate(ids) if x in spec.eos_token_ids]
        answers[t] = ids[: eos[0]] if eos else ids
        if rt.rank == 0:
            print(f"[{topo}] build+load {t1 - t0:.2f}s, {len(ids)} greedy tokens in {t2 - t1:.2f}s "
                  f"({len(ids) / (t2 - t1):.1f} tok/s)")
            print(f"[{topo}] {tok.decode(answers[t])!r}", flush=True)
    if rt.rank == 0:
        same = len({tuple(a) for a in answers.values()}) == 1
        print(f"answers identical across {', '.join(answers)}: {same}")
    dist.barrier()
    dist.destroy_process_group()
    if rt.rank == 0 and not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
