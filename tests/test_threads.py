"""Per-step thread counts: the chooser's rule with given step times, and a real engine whose
steps run at both counts (two allowed) and still give HF's tokens."""
import json
import sys

import torch

from conftest import ROOT, run
from remp_megatron.threads import ThreadChooser, powers_of_two


def simulate(chooser: ThreadChooser, seconds, steps: int, tokens: int = 1) -> list[int]:
    """Run ``steps`` steps of ``tokens`` tokens; ``seconds(step, threads)`` is what each takes."""
    used = []
    for i in range(steps):
        t = chooser.choose(tokens)
        chooser.record(tokens, t, seconds(i, t))
        used.append(t)
    return used


def test_candidates_are_powers_of_two_up_to_the_budget():
    assert powers_of_two(1) == (1,) and powers_of_two(2) == (1, 2)
    assert powers_of_two(6) == (1, 2, 4, 6) and powers_of_two(8) == (1, 2, 4, 8)


def test_it_settles_on_the_faster_count_and_still_tries_the_other_now_and_then():
    used = simulate(ThreadChooser((1, 2)), lambda i, t: 0.07 if t == 1 else 0.10, 320)
    assert used[:2] == [2, 1]  # each once first, the most first
    assert 18 <= used.count(2) <= 22  # then one step in 16
    used = simulate(ThreadChooser((1, 2)), lambda i, t: 0.10 if t == 1 else 0.07, 320)
    assert 18 <= used.count(1) <= 22


def test_it_follows_the_machine_when_the_faster_count_changes_and_ignores_one_slow_step():
    # Two threads faster for 200 steps (one of them stolen: 10x slower), then one thread.
    def seconds(i, t):
        if i < 200:
            return 1.0 if i == 100 else (0.07 if t == 2 else 0.10)
        return 0.07 if t == 1 else 0.10

    used = simulate(ThreadChooser((1, 2)), seconds, 400)
    assert used[101:200].count(1) <= 8  # the one slow two-thread step did not flip it
    assert used[300:].count(1) >= 90  # settled on one thread within 100 steps of the change


def test_step_sizes_are_chosen_apart():
    chooser = ThreadChooser((1, 2))

    def seconds(tokens):  # one sequence: one thread; 32: two
        return lambda i, t: (0.07 if t == 1 else 0.10) if tokens == 1 else (0.30 if t == 1 else 0.20)

    for _ in range(10):
        small = simulate(chooser, seconds(1), 16, tokens=1)
        big = simulate(chooser, seconds(32), 16, tokens=32)
    assert small.count(1) >= 15 and big.count(2) >= 15


def test_an_engine_allowed_two_threads_runs_steps_at_both_and_gives_hfs_tokens(llama_mg, llama_hf):
    """A real pipeline allowed two threads: the thread count each step of the decoder ran at (a
    forward pre-hook), and the tokens, which must equal HF generate's (the output layer packed)."""
    script = ("import json, sys, torch, remp_megatron\n"
              "torch.set_num_threads(2)\n"
              "seen = []\n"
              "with remp_megatron.pipeline(sys.argv[1]) as pipe:\n"
              "    pipe.engine.worker.runner.model.decoder.register_forward_pre_hook(\n"
              "        lambda *_: seen.append(torch.get_num_threads()))\n"
              "    out = pipe([[5, 6, 7], [9, 10, 11, 12, 13, 14]], max_new_tokens=40)\n"
              "    head = pipe.engine.worker.runner.model.output_layer.packed is not None\n"
              "print(json.dumps({'threads': seen, 'tokens': [r.token_ids for r in out], 'head_packed': head}))\n")
    proc = run([sys.executable, "-c", script, str(llama_mg)], timeout=300, cwd=ROOT)
    out = json.loads(proc.stdout.splitlines()[-1])
    assert set(out["threads"]) == {1, 2}, out["threads"]
    assert out["head_packed"]  # the output layer's GEMM runs on oneDNN's layout too (linear.py)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llama_hf), dtype=torch.float32).eval()
    for prompt, tokens in zip([[5, 6, 7], [9, 10, 11, 12, 13, 14]], out["tokens"]):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
        assert tokens == ref[0, len(prompt):].tolist()
