"""The step tuner's rule (step_tuner.py) with given step times, and a real pipeline that tries both
GEMM paths at its decode size and keeps the faster."""
from remp_megatron.step_tuner import StepTuner


def simulate(tuner: StepTuner, seconds, steps: int, tokens: int = 1) -> list:
    """Run ``steps`` steps of ``tokens`` tokens; ``seconds(step, way)`` is what each takes."""
    used = []
    for i in range(steps):
        way = tuner.choose(tokens)
        tuner.record(tokens, way, seconds(i, way))
        used.append(way)
    return used


def test_it_settles_on_the_faster_way_and_still_tries_the_other_now_and_then():
    used = simulate(StepTuner(("packed", "mkl")), lambda i, w: 0.07 if w == "mkl" else 0.10, 320)
    assert used[:2] == ["packed", "mkl"]  # each once first, in the order given
    assert 18 <= used.count("packed") <= 22  # then one step in 16
    used = simulate(StepTuner(("packed", "mkl")), lambda i, w: 0.10 if w == "mkl" else 0.07, 320)
    assert 18 <= used.count("mkl") <= 22


def test_it_follows_the_machine_when_the_faster_way_changes_and_ignores_one_slow_step():
    # Packed faster for 200 steps (one of them stolen: 10x slower), then MKL.
    def seconds(i, w):
        if i < 200:
            return 1.0 if i == 100 else (0.07 if w == "packed" else 0.10)
        return 0.07 if w == "mkl" else 0.10

    used = simulate(StepTuner(("packed", "mkl")), seconds, 400)
    assert used[101:200].count("mkl") <= 8  # the one slow packed step did not flip it
    assert used[300:].count("mkl") >= 90  # settled on MKL within 100 steps of the change


def test_step_sizes_are_chosen_apart():
    tuner = StepTuner(("packed", "mkl"))

    def seconds(tokens):  # one sequence: MKL faster; 32: packed
        return lambda i, w: (0.07 if w == "mkl" else 0.10) if tokens == 1 else (0.30 if w == "mkl" else 0.20)

    for _ in range(10):
        small = simulate(tuner, seconds(1), 16, tokens=1)
        big = simulate(tuner, seconds(32), 16, tokens=32)
    assert small.count("mkl") >= 15 and big.count("packed") >= 15
