"""torchrun world for parity tests: full-sequence logits of each prompt, per model and topology.

One world serves every (model, topology) case: parallel state is re-initialised in place.
Writes {out}/{model_name}__tp{T}pp{P}.pt (a list of [len, vocab] tensors) from rank 0... of
the last stage.
"""
import argparse
import json
from pathlib import Path

import torch

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
    args = p.parse_args()
    rt = init_distributed()
    prompts = json.loads(Path(args.prompts).read_text())
    for model_dir in args.models:
        spec = ModelSpec.from_file(Path(model_dir) / "config.json")
        for t in args.topologies:
            topo = Topology.parse(t)
            topo.validate(spec, rt.world_size)
            tables, next_block = [], 0
            for ids in prompts:
                n = -(-len(ids) // BLOCK)
                tables.append(list(range(next_block, next_block + n)))
                next_block += n
            runner = load_runner(spec, model_dir, topo, rt.rank, rt.device, next_block, BLOCK)
            if runner is None:
                continue
            meta = AttentionMetadata.build([0] * len(prompts), [len(x) for x in prompts], tables, BLOCK, rt.device)
            ids = torch.tensor([i for x in prompts for i in x])
            logits = runner.forward(ids, meta, torch.arange(len(ids)))
            if runner.is_last and runner.tp_rank == 0:
                out = list(torch.split(logits, [len(x) for x in prompts]))
                torch.save(out, Path(args.out) / f"{Path(model_dir).name}__tp{topo.tp}pp{topo.pp}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
