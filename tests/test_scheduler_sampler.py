"""Scheduler, step plans and sampler: pure code, no world."""
import pytest
import torch

from remp_megatron.request import SamplingParams, Sequence, Status
from remp_megatron.sampler import sample
from remp_megatron.scheduler import QueueFull, RequestTooLong, Scheduler, SchedulerConfig, StepPlan


def seq(rid, n, max_new=4):
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(max_new_tokens=max_new), seed=0)


def test_chunked_prefill_then_decode():
    s = Scheduler(SchedulerConfig(num_blocks=16, block_size=4, max_tokens_per_step=6))
    a = seq("a", 10)
    s.add(a)
    first = s.schedule()
    assert [(x.start, x.n, x.sample) for x in first] == [(0, 6, False)]
    a.num_computed = 6
    second = s.schedule()
    assert [(x.start, x.n, x.sample) for x in second] == [(6, 4, True)]
    assert len(a.block_table) == 3  # ceil(10 / 4)


def test_preempts_newest_and_requeues_it_first():
    s = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, max_tokens_per_step=64))
    a, b = seq("a", 8), seq("b", 8)
    s.add(a)
    s.add(b)
    s.schedule()
    for x in (a, b):
        x.num_computed = 8
        x.output.append(5)  # both now need a 3rd block for their 9th token
    out = s.schedule()
    assert [x.seq.request_id for x in out] == ["a"]
    assert b.status is Status.WAITING and s.waiting[0] is b and b.block_table == [] and b.num_computed == 0
    assert s.num_preemptions == 1


def test_finish_frees_blocks_at_once():
    s = Scheduler(SchedulerConfig(num_blocks=8, block_size=4))
    a = seq("a", 9)
    s.add(a)
    s.schedule()
    assert s.alloc.num_free == 5
    s.finish(a)
    assert s.alloc.num_free == 8 and not s.has_work


def test_blocks_copied_ahead_stay_out_of_the_move_until_freed():
    """A pre-staged switch moves only blocks not copied ahead: a full block copied ahead stays
    valid until it is freed (finish, preemption); renumbered ids invalidate every copy."""
    s = Scheduler(SchedulerConfig(num_blocks=8, block_size=4, max_tokens_per_step=64))
    a, b = seq("a", 9), seq("b", 6)
    for x in (a, b):
        s.add(x)
    s.schedule()
    a.num_computed, b.num_computed = 9, 6
    assert s.full_blocks() == a.block_table[:2] + b.block_table[:1]  # a's 3rd and b's 2nd are partial
    s.kv_staged = set(s.full_blocks())
    assert s.plan_kv_move(8).staged == set(a.block_table[:2] + b.block_table[:1])
    s.finish(a)  # its blocks may be handed to another request: no longer valid copies
    assert s.plan_kv_move(8).staged == {b.block_table[0]} == {3}
    assert s.plan_kv_move(2).renumbered and s.plan_kv_move(2).staged == frozenset()  # ids 3, 4 -> 0, 1
    s._preempt(b)
    assert s.kv_staged == set() and s.plan_kv_move(8).staged == frozenset()


def test_limits():
    s = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, max_queue=1, max_model_len=32))
    with pytest.raises(RequestTooLong, match="exceeds the model context of 32"):
        s.check(30, 4)
    with pytest.raises(RequestTooLong, match="KV blocks"):
        s.check(16, 4)
    s.add(seq("a", 4))
    with pytest.raises(QueueFull):
        s.add(seq("b", 4))


def test_microbatches_cover_plan_in_order():
    plan = StepPlan(list(range(20)), [0, 0, 5, 0], [8, 2, 1, 9], [[0], [1], [2], [3]], [True, True, True, False])
    mbs = plan.microbatches(3)
    assert 1 < len(mbs) <= 3
    assert sum((m.token_ids for m in mbs), []) == plan.token_ids
    assert sum((m.block_tables for m in mbs), []) == plan.block_tables
    assert plan.logit_rows() == [7, 9, 10]
    assert plan.microbatches(1) == [plan]


def _one(logits, params, seed, index):
    return sample(logits[None], [(params, seed, index)])[0]


def test_sampler_modes():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert _one(logits, SamplingParams(), 0, 0) == 1
    assert _one(logits, SamplingParams(temperature=1.0, top_k=1), 5, 0) == 1
    assert _one(logits, SamplingParams(temperature=1.0, top_p=0.01), 5, 0) == 1
    p = SamplingParams(temperature=1.0)
    draws = [_one(logits, p, 42, i) for i in range(200)]
    assert draws == [_one(logits, p, 42, i) for i in range(200)]  # seeded: reproducible
    assert draws != [_one(logits, p, 43, i) for i in range(200)]
    assert {1, 2} <= set(draws)  # both likely tokens appear
    top2 = SamplingParams(temperature=1.0, top_k=2)
    assert set(_one(logits, top2, 1, i) for i in range(100)) == {1, 2}


def test_sampler_batch_is_each_row_alone():
    """Greedy rows picked together, random ones drawn per row: the same tokens as one row at a
    time, whatever the batch; a tie goes to the first of the maxima (as argmax)."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    logits[3, 7] = logits[3, 40] = logits[3].max() + 1  # a tie
    greedy, warm = SamplingParams(), SamplingParams(temperature=0.8, top_k=20)
    rows = [(greedy, 0, 0), (warm, 11, 0), (greedy, 0, 3), (greedy, 0, 1), (warm, 11, 1), (warm, 12, 5)]
    batch = sample(logits, rows)
    assert batch == [_one(logits[i], *row) for i, row in enumerate(rows)]
    assert batch[0] == int(logits[0].argmax()) and batch[2] == int(logits[2].argmax()) and batch[3] == 7
    assert sample(logits[[0, 2, 3]], [rows[0], rows[2], rows[3]]) == [batch[0], batch[2], 7]  # all greedy


def test_sampling_params_validation():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(stop=[""])
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0)


def test_last_token_text_is_emitted_even_with_a_partial_character():
    """A finish must flush text: no later token will complete a held-back character."""
    from types import SimpleNamespace

    from server.detokenizer import Detokenizer

    pieces = {3: "ab", 4: "c\ufffd"}  # token 4 decodes to a complete "c" plus half a character
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(pieces[i] for i in ids))
    d = Detokenizer(tok, [])
    first, last = d.add([3], False), d.add([4], True)
    assert first == ("ab", False)
    assert (first[0] + last[0]).startswith("abc") and not last[1]  # the complete "c" is not lost


def test_partial_character_is_held_back_until_completed_and_stop_strings_cut():
    from types import SimpleNamespace

    from remp_megatron.output import OutputProcessor
    from server.detokenizer import Detokenizer

    pieces = {3: "x\ufffd", 4: "é", 5: "STOP", 6: "!"}
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens: "".join(pieces[i] for i in ids).replace("\ufffdé", "é"))
    d = Detokenizer(tok, ["ST"])
    assert d.add([3], False) == ("", False)  # half a character: nothing yet
    assert d.add([4], False) == ("xé", False)
    assert d.add([5], False) == ("", True)  # "ST..." cut, and the request stops
    out = OutputProcessor(frozenset({6}))  # the engine's own stops: end of text, stop ids, length
    eos = out.append(Sequence("e", [1], SamplingParams(), seed=0), 6)
    assert eos.finished and eos.finish_reason.value == "stop"
    stop_id = out.append(Sequence("s", [1], SamplingParams(stop_token_ids=[4]), seed=0), 4)
    assert stop_id.finished and stop_id.finish_reason.value == "stop"
    length = out.append(Sequence("l", [1], SamplingParams(max_new_tokens=1), seed=0), 3)
    assert length.finished and length.finish_reason.value == "length"
    assert not OutputProcessor(frozenset({6})).append(Sequence("i", [1], SamplingParams(ignore_eos=True), seed=0), 6).finished
