"""Foundation demo (torchrun, 3 ranks): SmolLM2 at TP3·PP1, then at TP1·PP3 in the same
processes; the same greedy answer to a chat prompt from each.

    python -m torch.distributed.run --standalone --nproc-per-node=3 scripts/demo.py --model runs/smollm2
"""
import argparse
import time
from pathlib import Path

import torch.distributed as dist

from remp_megatron.engine import Engine, EngineConfig, load_worker, worker_loop
from remp_megatron.request import Request, SamplingParams
from remp_megatron.runtime import init_distributed
from remp_megatron.spec import ModelSpec
from remp_megatron.topology import Topology


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
        t0 = time.perf_counter()
        cfg = EngineConfig(kv_budget_mb=32)
        worker = load_worker(rt, spec, args.model, topo, cfg)
        t1 = time.perf_counter()
        if rt.rank != 0:
            worker_loop(worker)
            continue
        engine = Engine(worker, cfg, tok)
        handle = engine.add_request(Request(request_id=t, prompt_token_ids=prompt,
                                            params=SamplingParams(max_new_tokens=args.max_new_tokens)))
        engine.run_until_idle()
        engine.stop_workers()
        answer = handle.result()
        t2 = time.perf_counter()
        answers[t] = answer.token_ids
        n = len(answer.token_ids)
        print(f"[{topo}] build+load {t1 - t0:.2f}s, {n} greedy tokens in {t2 - t1:.2f}s ({n / (t2 - t1):.1f} tok/s)")
        print(f"[{topo}] {answer.text!r} ({answer.finish_reason.value})", flush=True)
    same = rt.rank != 0 or len({tuple(a) for a in answers.values()}) == 1
    if rt.rank == 0:
        print(f"answers identical across {', '.join(answers)}: {same}")
    dist.barrier()
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
