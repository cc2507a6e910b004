"""The layout planner and KV-move planning: pure code, no world."""
import itertools

import pytest

from remp_megatron.layout import Box, PlanError, Shard, plan_transfers
from remp_megatron.reshard import kv_layout
from remp_megatron.scheduler import plan_kv_move
from remp_megatron.spec import ModelSpec
from remp_megatron.topology import Topology

SPEC = ModelSpec(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=8,
                 num_heads=8, num_kv_heads=4, head_dim=8, rope_theta=1e4, rms_norm_eps=1e-5,
                 max_position_embeddings=512, tie_word_embeddings=False, qkv_bias=False)
TOPOLOGIES = [Topology(t, p) for t, p in ((1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4))]
ELEM = 4


def weight_layout(topo: Topology, rows: int = 64, cols: int = 32) -> dict[str, list[Shard]]:
    """A column-parallel weight (rows split over TP, replicated over nothing) per stage, and a
    norm replicated on every TP rank (replica 0 primary), like megatron's layouts."""
    layout = {}
    for rank in range(topo.size):
        stage, tp = topo.coords(rank)
        per = rows // topo.tp
        layout.setdefault(f"w{stage}", []).append(Shard(f"w{stage}", rank, 0, Box((tp * per, 0), (per, cols))))
        layout.setdefault(f"norm{stage}", []).append(Shard(f"norm{stage}", rank, 0, Box((0,), (cols,)), tp == 0))
    return layout


def total_bytes(layout) -> int:
    return sum(s.box.numel * ELEM for shards in layout.values() for s in shards)


@pytest.mark.parametrize("old, new", list(itertools.permutations(TOPOLOGIES[:4], 2)))
def test_kv_plan_bytes_moved_plus_kept_equal_the_new_layout(old, new):
    a, b = kv_layout(SPEC, old, 5, 4), kv_layout(SPEC, new, 5, 4)
    plan = plan_transfers(a, b, {"kv": ELEM})
    assert plan.bytes_moved + plan.bytes_kept == total_bytes(b)
    # Every new shard is covered exactly once: the pieces that reach it sum to its size.
    for shard in b["kv"]:
        assert sum(t.box.numel for t in plan.transfers if t.dst == shard.rank) == shard.box.numel


def test_same_layout_keeps_everything_and_moves_nothing():
    layout = kv_layout(SPEC, Topology(2, 2), 7, 4)
    plan = plan_transfers(layout, layout, {"kv": ELEM})
    assert plan.bytes_moved == 0 and plan.bytes_kept == total_bytes(layout)


def test_tp_to_pp_moves_exactly_the_boxes_whose_owner_changes():
    # TP2·PP1 -> TP1·PP2 on 2 ranks: rank 0 keeps layers 0-3 of KV heads 0-1, receives heads
    # 2-3 of those layers from rank 1; rank 1 keeps layers 4-7 of heads 2-3, receives 0-1.
    old, new = kv_layout(SPEC, Topology(2, 1), 3, 4), kv_layout(SPEC, Topology(1, 2), 3, 4)
    plan = plan_transfers(old, new, {"kv": ELEM})
    quarter = total_bytes(new) // 4
    assert plan.bytes_kept == 2 * quarter and plan.bytes_moved == 2 * quarter
    assert {(t.src, t.dst) for t in plan.transfers if t.src != t.dst} == {(0, 1), (1, 0)}


def test_weights_come_only_from_primary_replicas():
    old, new = weight_layout(Topology(2, 2)), weight_layout(Topology(1, 4))
    new = {k: v for k, v in new.items() if k in old}  # stages 0-1 exist in both
    plan = plan_transfers(old, new, dict.fromkeys(new, ELEM))
    assert plan.bytes_moved + plan.bytes_kept == total_bytes(new)
    primaries = {(s.key, s.rank) for shards in old.values() for s in shards if s.primary}
    assert all((t.key, t.src) in primaries or t.src == t.dst for t in plan.transfers)


@pytest.mark.parametrize("bucket", [64, 1000, 4096, 1 << 20])
@pytest.mark.parametrize("old, new", [(TOPOLOGIES[3], TOPOLOGIES[5]), (TOPOLOGIES[4], TOPOLOGIES[2])])
def test_rounds_are_bounded_and_cover_the_plan(old, new, bucket):
    a, b = kv_layout(SPEC, old, 6, 4), kv_layout(SPEC, new, 6, 4)
    plan = plan_transfers(a, b, {"kv": ELEM})
    rounds = list(plan.rounds(4, bucket))
    sent = 0
    for rnd in rounds:
        senders = [s for s, _ in rnd]
        receivers = [d for _, d in rnd]
        assert len(set(senders)) == len(senders) and len(set(receivers)) == len(receivers)  # one each way
        for bucket_transfers in rnd.values():
            nbytes = sum(t.nbytes for t in bucket_transfers)
            assert nbytes <= bucket
            sent += nbytes
    assert sent == plan.bytes_moved


def test_uncovered_new_shard_is_a_plan_error():
    old = {"w": [Shard("w", 0, 0, Box((0,), (4,)))]}
    new = {"w": [Shard("w", 1, 0, Box((0,), (8,)))]}
    with pytest.raises(PlanError, match="cover 4 of 8"):
        plan_transfers(old, new, {"w": ELEM})


def test_kv_move_keeps_ids_that_fit():
    move = plan_kv_move([("a", [3, 9]), ("b", [1])], new_num_blocks=16)
    assert move.old_ids == move.new_ids == [3, 9, 1] and not move.renumbered and move.dropped == []


def test_kv_move_renumbers_densely_in_block_order_when_ids_do_not_fit():
    move = plan_kv_move([("a", [30, 7]), ("b", [12])], new_num_blocks=3)
    assert move.old_ids == [30, 7, 12] and move.new_ids == [2, 0, 1] and move.renumbered
    assert sorted(move.new_ids) == list(range(3))  # a permutation of the new cache's ids


def test_kv_move_keeps_oldest_first_and_drops_what_does_not_fit():
    move = plan_kv_move([("old", [5, 6]), ("mid", [8, 9, 10]), ("new", [1])], new_num_blocks=3)
    assert move.dropped == ["mid"] and move.old_ids == [5, 6, 1] and move.new_ids == [1, 2, 0]
