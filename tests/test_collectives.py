"""collectives.all_reduce_sum over a real gloo world of 3 (not a power of two): the sum in rank
order, the same bits on every rank; past SMALL_BYTES gloo's all_reduce; bf16 too."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from remp_megatron.collectives import SMALL_BYTES, all_reduce_sum

WORLD = 3


def _rank(rank: int, init: str, out) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        g = dist.group.WORLD
        result = {}
        for name, numel, dtype in [("small", 4 * 576, torch.float32), ("large", SMALL_BYTES // 4 + 1, torch.float32),
                                   ("bf16", 576, torch.bfloat16)]:
            parts = [torch.randn(numel, generator=torch.Generator().manual_seed(100 * r + numel)).to(dtype)
                     for r in range(WORLD)]
            x = parts[rank].clone()
            all_reduce_sum(x, g)
            gathered = [torch.empty_like(x) for _ in range(WORLD)]
            dist.all_gather(gathered, x)
            in_order = parts[0].clone()
            for p in parts[1:]:
                in_order += p
            result[name] = (all(torch.equal(gathered[0], t) for t in gathered), torch.equal(x, in_order),
                            float((x.double() - sum(p.double() for p in parts)).abs().max()))
        out.put((rank, result))
    finally:
        dist.destroy_process_group()


def test_all_reduce_sum_is_the_sum_in_rank_order_on_every_rank(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = f"file://{tmp_path / 'init'}"
    procs = [ctx.Process(target=_rank, args=(r, init, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for rank, res in results.items():
        same, ordered, err = res["small"]
        assert same and ordered, rank  # one round of messages: exactly parts[0] + parts[1] + parts[2]
        same, _, err = res["large"]
        assert same and err < 1e-5, rank  # gloo's ring: its own order, within fp32 rounding
        same, ordered, _ = res["bf16"]
        assert same and ordered, rank

