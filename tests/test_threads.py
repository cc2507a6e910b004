"""One thread per process runs kernels on several cores (threads.py): the rule in a bare process,
and a real pipeline allowed two threads, whose steps run on both, whose other threads (gloo's
among them) get one, whose decode steps try both GEMM paths (step_tuner.py), and whose tokens
equal HF generate's."""
import json
import sys

import torch

from conftest import ROOT, run

_RULE = """
import json, os, threading, torch
from remp_megatron.threads import check_kernel_thread, own_kernel_threads
torch.set_num_threads(2)  # as OMP_NUM_THREADS=2 would (the tests' processes get 1)
own_kernel_threads()
tasks = lambda: len(os.listdir('/proc/self/task'))
got = {}
def other():
    before = tasks()
    torch.ones(1 << 22).add_(1)  # big enough to run in parallel on a thread allowed several
    got.update(threads=torch.get_num_threads(), new_os_threads=tasks() - before)
    try:
        check_kernel_thread()
    except RuntimeError as e:
        got['refused'] = str(e)
th = threading.Thread(target=other, name='not-the-owner'); th.start(); th.join()
check_kernel_thread()
print(json.dumps({'owner': torch.get_num_threads(), **got}))
"""


def test_only_the_owning_thread_runs_kernels_on_several_cores():
    proc = run([sys.executable, "-c", _RULE], timeout=120, cwd=ROOT)
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["owner"] == 2 and out["threads"] == 1
    assert out["new_os_threads"] == 0  # no OpenMP team of its own
    assert "'not-the-owner'" in out["refused"]


def test_a_pipeline_allowed_two_threads_steps_on_two_tries_both_gemms_and_gives_hfs_tokens(llama_mg, llama_hf):
    """The thread count at every step (a forward pre-hook on the first layer), another thread's
    count once the model is loaded and served, and the tokens, which must equal HF generate's
    (the output layer packed)."""
    script = ("import json, sys, threading, torch, remp_megatron\n"
              "torch.set_num_threads(2)\n"
              "seen = []\n"
              "with remp_megatron.pipeline(sys.argv[1]) as pipe:\n"
              "    model = pipe.engine.worker.runner.model\n"
              "    model.decoder.layers[0].register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))\n"
              "    paths = set()\n"
              "    model.output_layer.register_forward_pre_hook(lambda m, _: paths.add(m.use_packed))\n"
              "    out = pipe([[5, 6, 7], [9, 10, 11, 12, 13, 14]], max_new_tokens=40)\n"
              "    head = pipe.engine.worker.runner.model.output_layer.packed is not None\n"
              "    other = []\n"
              "    th = threading.Thread(target=lambda: other.append(torch.get_num_threads())); th.start(); th.join()\n"
              "print(json.dumps({'threads': seen, 'other': other[0], 'tokens': [r.token_ids for r in out],\n"
              "                  'head_packed': head, 'gemm_paths': sorted(paths)}))\n")
    proc = run([sys.executable, "-c", script, str(llama_mg)], timeout=300, cwd=ROOT)
    out = json.loads(proc.stdout.splitlines()[-1])
    assert set(out["threads"]) == {2}, out["threads"]
    assert out["other"] == 1
    assert out["head_packed"]  # the output layer's GEMM runs on oneDNN's layout too (linear.py)
    assert out["gemm_paths"] == [False, True]  # decode steps tried MKL's GEMM and the packed weights (step_tuner.py)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llama_hf), dtype=torch.float32).eval()
    for prompt, tokens in zip([[5, 6, 7], [9, 10, 11, 12, 13, 14]], out["tokens"]):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
        assert tokens == ref[0, len(prompt):].tolist()
