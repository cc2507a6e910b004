"""The adaptive topology policy on synthetic load signals (pure, no world)."""
import pytest

from remp_megatron.policy import CostProfile, Policy, PolicyConfig, Signals, TopologyCost
from remp_megatron.topology import Topology

T1x1, T1x3, T3x1 = Topology(1, 1), Topology(1, 3), Topology(3, 1)
PROFILE = CostProfile((
    TopologyCost(T1x1, tpot_s=0.05, tokens_per_s=40.0),  # latency-optimal
    TopologyCost(T1x3, tpot_s=0.09, tokens_per_s=90.0),  # throughput-optimal
    TopologyCost(T3x1, tpot_s=0.20, tokens_per_s=30.0),
))
CFG = PolicyConfig(low_load=1, high_load=6, patience=3, min_dwell_s=10)


def sig(t, load, kv=0.1):
    return Signals(time=t, queue_depth=max(0, load - 2), running=min(load, 2), kv_usage=kv)


def test_profile_picks_latency_and_throughput_optima(tmp_path):
    assert (PROFILE.latency_best, PROFILE.throughput_best) == (T1x1, T1x3)
    PROFILE.save(tmp_path / "p.json")
    assert '"1x3"' in (tmp_path / "p.json").read_text()  # the file keeps the CLI's spelling
    assert CostProfile.load(tmp_path / "p.json") == PROFILE


def test_burst_moves_to_throughput_after_patience():
    p = Policy(CFG, PROFILE, T1x1, now=0)
    decisions = [p.observe(sig(20 + i, load=10)) for i in range(3)]
    assert [d.switch for d in decisions] == [False, False, True]
    assert decisions[-1].wanted == T1x3 and "load 10 >= 6" in decisions[-1].reason


def test_calm_moves_back_to_latency_optimal():
    p = Policy(CFG, PROFILE, T1x3, now=0)
    d = [p.observe(sig(30 + i, load=0)) for i in range(3)][-1]
    assert d.switch and d.wanted == T1x1


def test_kv_pressure_counts_as_high_load():
    p = Policy(CFG, PROFILE, T1x1, now=0)
    d = [p.observe(sig(30 + i, load=3, kv=0.95)) for i in range(3)][-1]
    assert d.switch and d.wanted == T1x3 and "KV" in d.reason


def test_band_between_thresholds_keeps_the_current_topology():
    p = Policy(CFG, PROFILE, T1x3, now=0)
    assert not any(p.observe(sig(30 + i, load=3)).switch for i in range(20))


def test_alternating_load_never_flaps():
    p = Policy(CFG, PROFILE, T1x1, now=0)
    # Load flips every observation: no streak reaches the patience, so nothing switches.
    assert not any(p.observe(sig(30 + i, load=10 if i % 2 else 0)).switch for i in range(50))


def test_min_dwell_blocks_a_quick_second_switch():
    p = Policy(CFG, PROFILE, T1x1, now=0)
    assert [p.observe(sig(20 + i, load=10)) for i in range(3)][-1].switch
    p.switched(T1x3, now=22)
    held = [p.observe(sig(23 + i, load=0)) for i in range(5)]  # t = 23..27 < 22 + 10
    assert not any(d.switch for d in held) and "min dwell" in held[-1].reason
    assert p.observe(sig(33, load=0)).switch  # dwell over, streak kept


def test_config_rejects_an_inverted_band():
    with pytest.raises(ValueError, match="low_load"):
        PolicyConfig(low_load=5, high_load=2)


def test_a_shrunk_world_serves_where_the_profile_says_among_what_fits():
    fits = [T1x1, T3x1]  # the throughput-best T1x3 no longer fits
    assert PROFILE.best_among(fits, load=10, cfg=CFG) == T1x1  # 40 tok/s beats T3x1's 30
    assert PROFILE.best_among([T3x1, Topology(2, 1)], load=10, cfg=CFG) == T3x1
    assert PROFILE.best_among([T3x1, T1x3], load=0, cfg=CFG) == T1x3  # below high_load: latency
    assert PROFILE.best_among([Topology(2, 1)], load=0, cfg=CFG) is None  # nothing profiled fits


@pytest.mark.parametrize("text,why", [("{not json", "JSONDecodeError"), ("[]", "lists no topology"),
                                      ('[{"topology": "3y1", "tpot_s": 1, "tokens_per_s": 1}]', "cannot parse"),
                                      ('[{"topology": "1x1", "tpot_s": 1}]', "tokens_per_s"), ("7", "TypeError")])
def test_a_bad_profile_file_is_refused_naming_it(tmp_path, text, why):
    (tmp_path / "p.json").write_text(text)
    with pytest.raises(ValueError, match=why) as e:
        CostProfile.load(tmp_path / "p.json")
    assert str(tmp_path / "p.json") in str(e.value)
    with pytest.raises(ValueError, match="cannot read"):
        CostProfile.load(tmp_path / "missing.json")
