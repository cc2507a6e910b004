"""Live reconfiguration over a real torchrun world (world 4, tiny Llama): every ordered pair
of topologies while requests are mid-generation, the three modes, rollback from a fault in
every phase, bit-identical weights after a round trip, exact byte accounting, no leaks."""
import json

import pytest
import torch

from conftest import torchrun
from remp_megatron.reconfigure import PHASES

pytestmark = pytest.mark.world

TOPOLOGIES = ["2x2", "1x1", "2x1", "1x2", "4x1", "1x4"]  # at world 4: 1x1, 2x1, 1x2 leave ranks standby
START = "2x2"
BLOCK = 8


def eulerian_tour(nodes: list[str]) -> list[str]:
    """A closed walk using every ordered pair (u, v), u != v, exactly once (Hierholzer)."""
    out = {u: [v for v in nodes if v != u] for u in nodes}
    stack, tour = [nodes[0]], []
    while stack:
        u = stack[-1]
        if out[u]:
            stack.append(out[u].pop())
        else:
            tour.append(stack.pop())
    return tour[::-1]


def test_tour_covers_every_ordered_pair():
    tour = eulerian_tour(TOPOLOGIES)
    pairs = list(zip(tour, tour[1:]))
    assert len(pairs) == len(set(pairs)) == 30 and tour[0] == tour[-1]


def requests(n: int, max_new: int = 20):
    g = torch.Generator().manual_seed(11)
    return [{"id": f"q{i}", "prompt": torch.randint(3, 256, (int(torch.randint(4, 40, (1,), generator=g)),),
                                                   generator=g).tolist(), "max_new": max_new} for i in range(n)]


def switch_plan():
    tour = eulerian_tour(TOPOLOGIES)
    assert tour[0] == START
    plan = [{"target": t, "mode": "migrate", "kv_check": i % 5 == 0, "tag": "tour"} for i, t in enumerate(tour[1:])]
    plan += [{"target": "1x4", "mode": "recompute", "tag": "recompute"},
             {"target": "2x2", "mode": "recompute", "tag": "recompute"},
             {"target": "4x1", "mode": "drain", "tag": "drain"}, {"target": "2x2", "mode": "drain", "tag": "drain"},
             {"target": "1x4", "prestage": True, "tag": "prestage"}, {"target": "2x2", "prestage": True, "tag": "prestage"},
             # A new cache just as large as the live KV: block ids must be renumbered to fit.
             {"target": "1x4", "kv_blocks": "live", "tag": "renumber"},
             # One block short: the newest request's KV is dropped and recomputed after the commit.
             {"target": "2x2", "kv_blocks": "live-1", "tag": "drop"},
             # The same topology with the cache back at its configured size: no weight byte moves.
             {"target": "2x2", "tag": "same"}]
    for i, phase in enumerate(PHASES):  # a fault in every phase, on varying ranks: all roll back
        plan.append({"target": "1x4" if i % 2 else "4x1", "fault": {"phase": phase, "rank": i % 4}, "tag": "fault"})
    plan.append({"target": "1x2", "fault": {"phase": "move_weights", "rank": 3, "kind": "stall"}, "timeout": 1.5,
                 "tag": "stall"})
    return plan


@pytest.fixture(scope="module")
def run(llama_mg, tmp_path_factory):
    d = tmp_path_factory.mktemp("reconfig")
    job = {"model": str(llama_mg), "start": START, "requests": requests(70), "switches": switch_plan(),
           "min_inflight": 3, "engine": {"block_size": BLOCK, "num_blocks": 96, "max_tokens_per_step": 64,
                      "prestage_budget_mb": 64}}
    (d / "job.json").write_text(json.dumps(job))
    torchrun("reconfig_world.py", 4, ["--spec", d / "job.json", "--out", d / "out.json"], timeout=900)
    return job, json.loads((d / "out.json").read_text()), d


@pytest.fixture(scope="module")
def reference(llama_hf):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llama_hf), dtype=torch.float32).eval()
    ref = {}
    for r in requests(70):
        g = hf.generate(torch.tensor([r["prompt"]]), max_new_tokens=r["max_new"], do_sample=False)
        ref[r["id"]] = g[0, len(r["prompt"]):].tolist()
    return ref


def tagged(out, tag):
    return [s for s in out["switches"] if s["tag"] == tag]


def migrate_tour(out):
    return tagged(out, "tour")


def test_every_ordered_pair_switched_with_requests_in_flight(run):
    tour = migrate_tour(run[1])
    pairs = {(s["timeline"]["source"], s["timeline"]["target"]) for s in tour}
    assert len(pairs) == 30
    for s in tour:
        assert not s["rolled_back"], s["timeline"]["error"]
        assert len(s["inflight"]) >= 3 and len(set(s["inflight"].values())) >= 2  # mid-generation, different positions
        assert s["preempted_by_switch"] == 0  # migrate: KV kept, nothing re-prefilled
        assert s["timeline"]["kv_blocks"] > 0


def test_all_requests_finish_with_uninterrupted_tokens(run, reference):
    assert run[1]["requests"] == reference


def test_migrated_kv_equals_a_fresh_prefill(run):
    checked = [c for s in migrate_tour(run[1]) for c in s.get("kv_check", [])]
    assert len(checked) >= 10
    for c in checked:
        assert c["table_len"] == -(-c["num_computed"] // BLOCK)
        assert c["max_abs_diff"] < 1e-5, c


def test_bytes_moved_equal_the_plan(run, llama_hf):
    """For every committed switch: bytes sent == the plan's moved bytes; the plan's moved +
    kept bytes == what the ranks hold afterwards (parameters, live KV blocks)."""
    from safetensors.torch import load_file

    model_bytes = sum(t.numel() * t.element_size() for t in load_file(llama_hf / "model.safetensors").values())
    kv_block_bytes = 2 * 8 * BLOCK * 4 * 8 * 4  # K and V, 8 layers, 4 KV heads, head_dim 8, fp32
    committed = [s for s in run[1]["switches"] if s["timeline"]["committed"]]
    assert len(committed) == 39
    for s in committed:
        tl = s["timeline"]
        assert tl["bytes_sent"] == tl["weights_moved"] + tl["kv_moved"] + tl["kv_moved_ahead"]
        assert tl["kv_moved"] + tl["kv_kept"] == (tl["kv_blocks"] - tl["kv_blocks_staged"]) * kv_block_bytes
        assert tl["weights_moved"] + tl["weights_kept"] == s["param_bytes"], s["tag"]
        if tl["target"] == "TP1·PP1":  # one rank holds the whole model, once
            assert s["param_bytes"] == model_bytes
    same = tagged(run[1], "same")[0]["timeline"]
    assert same["source"] == same["target"] == "TP2·PP2" and same["kv_blocks"] > 0
    assert same["weights_moved"] == 0 and same["kv_moved"] == 0 and same["bytes_sent"] == 0  # nothing crosses ranks


def test_smaller_kv_cache_renumbers_or_drops_and_stays_exact(run):
    """A new cache smaller than the live block ids renumbers them; one smaller than the live KV
    drops the newest requests, which are recomputed. The requests decode on from the renumbered
    KV, and every request's tokens still equal HF's (test_all_requests_finish_with_uninterrupted_tokens)."""
    renumber, = tagged(run[1], "renumber")
    tl = renumber["timeline"]
    assert renumber["max_live_block"] >= renumber["live_blocks"] == renumber["new_num_blocks"]  # ids did not fit
    assert tl["committed"] and tl["kv_renumbered"] and tl["requests_dropped"] == 0
    assert tl["kv_blocks"] == renumber["live_blocks"] and renumber["preempted_by_switch"] == 0
    drop, = tagged(run[1], "drop")
    tl = drop["timeline"]
    assert drop["new_num_blocks"] == drop["live_blocks"] - 1
    assert tl["committed"] and tl["requests_dropped"] >= 1
    assert drop["preempted_by_switch"] == tl["requests_dropped"]  # back to the queue, not lost
    assert tl["kv_blocks"] <= drop["new_num_blocks"] < drop["live_blocks"]


def test_round_trip_leaves_weights_bit_identical(run):
    _, out, d = run
    assert out["switches"][-1]["topology_after"] == "TP2·PP2"
    for r in range(4):
        start = json.loads((d / f"out.json.rank{r}.start.json").read_text())
        end = json.loads((d / f"out.json.rank{r}.end.json").read_text())
        assert start and start == end


def test_recompute_and_drain_modes(run):
    modes = tagged(run[1], "recompute") + tagged(run[1], "drain")
    assert [s["timeline"]["mode"] for s in modes] == ["recompute", "recompute", "drain", "drain"]
    for s in modes:
        assert s["timeline"]["committed"] and s["timeline"]["kv_blocks"] == 0  # no KV migrated
    assert modes[0]["preempted_by_switch"] > 0  # recompute re-queued the in-flight requests
    for drain in modes[2:]:  # drain: the in-flight requests finished first, nothing re-queued
        assert len(drain["inflight"]) >= 3 and drain["preempted_by_switch"] == 0


def test_prestaged_switch_moves_only_kv_in_the_pause(run):
    for s in tagged(run[1], "prestage"):
        tl = s["timeline"]
        assert tl["committed"] and tl["prestaged"] and s["steps_while_staging"] >= 1
        assert s["prestage"]["weights_moved"] > 0 and tl["weights_moved"] == s["prestage"]["weights_moved"]
        assert tl["bytes_sent_in_pause"] == tl["kv_moved"]  # the pause moved no weight bytes
        assert tl["kv_blocks"] > 0 and len(s["inflight"]) >= 3
        # Full KV blocks were copied ahead (one step before the switch); the pause moved only the
        # blocks written since, and the requests' tokens still equal HF's (test above).
        assert s["kv_copied_ahead"] >= s["kv_still_staged"] == tl["kv_blocks_staged"] > 0
        assert tl["kv_blocks_staged"] < tl["kv_blocks"] and tl["kv_moved_ahead"] > 0


def test_new_weights_are_packed_after_the_pause_not_in_it(run):
    # Packing (linear.py) costs ~0.1 s for a real model: a switch's pause must not include it.
    out = run[1]
    for s in migrate_tour(out) + tagged(out, "prestage"):
        assert s["unpacked_after"] == s["linears"] > 0, s["tag"]
    assert out["unpacked_at_end"] == 0  # the steps since packed them all


@pytest.mark.parametrize("phase", PHASES)
def test_fault_in_any_phase_rolls_back(run, phase):
    s, = [s for s in tagged(run[1], "fault") if s["timeline"]["failed_phase"] == phase]
    assert s["rolled_back"] and "injected fault" in s["timeline"]["error"]
    assert s["topology_after"] == s["timeline"]["source"]


def test_stalled_rank_times_out_and_rolls_back(run):
    s, = tagged(run[1], "stall")
    assert s["rolled_back"] and s["timeline"]["failed_phase"] == "move_weights"
    assert "TimeoutError" in s["timeline"]["error"] and s["topology_after"] == "TP2·PP2"


def test_no_resource_growth_over_twenty_switches(run):
    tour = migrate_tour(run[1])
    # Every topology's groups exist once each has been visited; from there on nothing may grow.
    seen, warm = set(), None
    for i, s in enumerate(tour):
        seen.add(s["timeline"]["target"])
        if len(seen) == len(TOPOLOGIES):
            warm = i
            break
    assert warm is not None and len(tour) - 1 - warm >= 20
    first, last = tour[warm]["timeline"]["resources"], tour[-1]["timeline"]["resources"]
    assert last["process_groups"] == first["process_groups"]
    assert last["threads"] <= first["threads"] + 2
    assert last["fds"] <= first["fds"] + 4
    # Every switch frees a shard and a KV cache (test_memory: the heap is returned); a leak of
    # either would ratchet RSS up over 20 switches.
    assert last["rss"] <= first["rss"] * 1.05, " ".join(str(s["timeline"]["resources"]["rss"] >> 20) for s in tour[warm:])


# ---- MoE: a chain that changes TP, PP and EP, experts resharded live (tiny Mixtral) ----------
MOE_CHAIN = ["4x1x4", "1x4", "2x2x2", "4x1x2", "2x2"]  # from and back to 2x2; each hop moves experts
MOE_REQUESTS, MOE_NEW = 12, 12


@pytest.fixture(scope="module")
def moe_run(mixtral_mg, tmp_path_factory):
    d = tmp_path_factory.mktemp("reconfig-moe")
    switches = [{"target": t, "mode": "migrate", "kv_check": i == 2, "tag": "chain"} for i, t in enumerate(MOE_CHAIN)]
    switches.insert(2, {"target": "2x1x2", "prestage": True, "tag": "prestage"})  # EP with standby ranks
    job = {"model": str(mixtral_mg), "start": START, "requests": requests(MOE_REQUESTS, MOE_NEW), "switches": switches,
           "min_inflight": 3, "engine": {"block_size": BLOCK, "num_blocks": 96, "max_tokens_per_step": 64,
                                         "prestage_budget_mb": 64}}
    (d / "job.json").write_text(json.dumps(job))
    torchrun("reconfig_world.py", 4, ["--spec", d / "job.json", "--out", d / "out.json"], timeout=600)
    return json.loads((d / "out.json").read_text()), d


def test_moe_switches_reshard_experts_and_stay_exact(moe_run, mixtral_hf):
    """Every switch commits with requests mid-generation and KV migrated; experts move when TP,
    PP or EP changes, exactly the planned bytes; tokens equal HF's; weights come back bit-identical."""
    from transformers import AutoModelForCausalLM

    out, d = moe_run
    hops = [(s["timeline"]["source"], s["timeline"]["target"]) for s in out["switches"]]
    assert [t for _, t in hops] == ["TP4·PP1·EP4", "TP1·PP4", "TP2·PP1·EP2", "TP2·PP2·EP2", "TP4·PP1·EP2", "TP2·PP2"]
    for s in out["switches"]:
        tl = s["timeline"]
        assert tl["committed"] and not s["rolled_back"], tl["error"]
        assert len(s["inflight"]) >= 3 and tl["kv_blocks"] > 0 and s["preempted_by_switch"] == 0
        assert tl["bytes_sent"] == tl["weights_moved"] + tl["kv_moved"] + tl["kv_moved_ahead"]
        assert tl["weights_moved"] + tl["weights_kept"] == s["param_bytes"]
        assert tl["weights_moved"] > 0  # every hop changes some expert's or layer's owner
    prestaged, = [s["timeline"] for s in out["switches"] if s["tag"] == "prestage"]
    assert prestaged["prestaged"] and prestaged["bytes_sent_in_pause"] == prestaged["kv_moved"]
    checked = [c for s in out["switches"] for c in s.get("kv_check", [])]
    assert checked and all(c["max_abs_diff"] < 1e-5 for c in checked)
    hf = AutoModelForCausalLM.from_pretrained(str(mixtral_hf), dtype=torch.float32).eval()
    for r in requests(MOE_REQUESTS, MOE_NEW):
        g = hf.generate(torch.tensor([r["prompt"]]), max_new_tokens=r["max_new"], do_sample=False)
        assert out["requests"][r["id"]] == g[0, len(r["prompt"]):].tolist(), r["id"]
    assert out["switches"][-1]["topology_after"] == "TP2·PP2"
    for r in range(4):
        start = json.loads((d / f"out.json.rank{r}.start.json").read_text())
        assert start and start == json.loads((d / f"out.json.rank{r}.end.json").read_text())
