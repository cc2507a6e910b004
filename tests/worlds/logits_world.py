"""torchrun world for parity tests, per model and topology: full-sequence logits of each
prompt and (with --greedy N) N greedy tokens per prompt.

One world serves every (model, topology) case: parallel state is re-initialised in place.
The last stage's TP rank 0 writes {out}/{model}__tp{T}pp{P}.pt: {"logits": [[len, vocab]...],
"greedy": [[N ids]...]}.
"""
import argparse
import json
from pathlib import Path

import torch

from remp_megatron.generate import block_tables_for, greedy_generate
from remp_megatron.model_runner import load_runner
from remp_megatron.paged_attention import AttentionMetadata
from remp_megatron.runtime import init_distributed
from remp_megatron.spec import ModelSpec
from remp_megatron.topology import Topology

BLOCK = 16


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--topologies", nargs="+", required=True)
    p.add_argument("--prompts", required=True, help="json: list of token-id lists")
    p.add_argument("--out", required=True)
    p.add_argument("--greedy", type=int, default=0)
    args = p.parse_args()
    rt = init_distributed()
    prompts = json.loads(Path(args.prompts).read_text())
    for model_dir in args.models:
        spec = ModelSpec.from_file(Path(model_dir) / "config.json")
        for t in args.topologies:
            topo = Topology.parse(t)
            topo.validate(spec, rt.world_size)
            lengths = [len(x) + args.greedy for x in prompts]
            tables = block_tables_for(lengths, BLOCK)
            runner = load_runner(spec, model_dir, topo, rt.rank, rt.device, sum(map(len, tables)), BLOCK)
            result = {}
            if runner is not None:
                meta = AttentionMetadata.build([0] * len(prompts), [len(x) for x in prompts], tables, BLOCK, rt.device)
                ids = torch.tensor([i for x in prompts for i in x])
                logits = runner.forward(ids, meta, torch.arange(len(ids)))
                if logits is not None:
                    result["logits"] = list(torch.split(logits, [len(x) for x in prompts]))
            if args.greedy:
                result["greedy"] = greedy_generate(runner, topo, rt.control_group, prompts, args.greedy)
            if runner is not None and runner.is_last and runner.tp_rank == 0:
                torch.save(result, Path(args.out) / f"{Path(model_dir).name}__tp{topo.tp}pp{topo.pp}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
