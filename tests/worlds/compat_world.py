"""torchrun world (2 ranks, CPU) exercising the call site of every CPU compatibility patch,
once with the patch removed (must fail) and once with it (must work). Rank 0 writes
{patch_name: {"without": error text or None, "with": error text or None}} to --out.
"""
import argparse
import json
import tempfile
import traceback

import torch
import torch.distributed as dist

from remp_megatron import cpu_compat
from remp_megatron import groups
from remp_megatron.model import build_stage_model
from remp_megatron.runtime import init_distributed
from remp_megatron.spec import ModelSpec
from remp_megatron.topology import Topology

SPEC = ModelSpec(
    architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5,
    max_position_embeddings=64, tie_word_embeddings=True, qkv_bias=False,
)


def rotary_frequencies():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)(16)


def dist_checkpoint_save():
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    rank, world = dist.get_rank(), dist.get_world_size()
    sd = {"x": ShardedTensor.from_rank_offsets("x", torch.full((4,), float(rank)), (0, rank, world))}
    with tempfile.TemporaryDirectory() as d:
        path = [d]
        dist.broadcast_object_list(path, src=0)
        dist_checkpointing.save(sd, path[0])
        dist.barrier()


def tied_embeddings_pp2():
    groups.activate(Topology(1, 2))
    build_stage_model(SPEC, Topology(1, 2), dist.get_rank(), torch.device("cpu"))


CALL_SITES = {
    "cuda-current-device": rotary_frequencies,
    "cuda-synchronize": dist_checkpoint_save,
    "tied-embedding-cuda": tied_embeddings_pp2,
}


def attempt(fn):
    try:
        fn()
        return None
    except Exception as e:  # the point is to report what the call site raised
        return f"{type(e).__name__}: {e}".splitlines()[0] or traceback.format_exc(limit=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    init_distributed()
    assert {p.name for p in cpu_compat.PATCHES} == set(CALL_SITES), "every patch needs a call site here"
    report = {}
    for name, fn in CALL_SITES.items():
        with cpu_compat.without(name):
            without = attempt(fn)
        dist.barrier()
        report[name] = {"without": without, "with": attempt(fn)}
        dist.barrier()
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
