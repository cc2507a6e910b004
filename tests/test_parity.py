"""Numerical parity with HF transformers at every topology, over real torchrun/gloo worlds.

Two checks per (model, topology), from one world per model group that runs both dtypes:

- fp64 proves the function. Our model built in fp64 from the same fp32 checkpoint against an
  all-fp64 HF copy (``fp64_oracle``): max|Δlogits| <= FP64_REL x max|ref| per prompt.
  Measured here (Sapphire Rapids, 2 cores): 5.8e-16..7.8e-16 of the logit scale for the tiny
  Llama/Qwen2 (8 layers), 6.4e-15..6.6e-15 for SmolLM2 (30 layers), at every topology.
  FP64_REL = 1e-12 leaves a factor >= 150 for other CPUs' summation orders, and is still 100x
  below the smallest real deviation we measured: RoPE angles computed in fp64 instead of
  fp32 (one ulp of an fp32 cos/sin) moves the logits by 1.1e-10 (tiny) and 1.3e-7 (SmolLM2)
  of their scale; HF's own fp32 RMSNorm in an fp64 model by 1e-7..6e-7.
- fp32 (the serving dtype) is bounded by HF against itself: see ``assert_fp32_within_hf_rounding``.
"""
import copy
import json
import subprocess
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from conftest import torchrun
from remp_megatron.hf_reference import CLEAR_MARGIN, hf_greedy

pytestmark = pytest.mark.world

TINY_TOPOLOGIES = ["1x1", "2x1", "1x2", "2x2", "4x1", "1x4"]  # world 4: 1x1, 2x1, 1x2 have standby ranks
EP_TOPOLOGIES = ["2x1x2", "2x2x2", "4x1x2", "4x1x4"]  # MoE models only: experts over 2 or 4 ranks
# fp64 proves the function at every topology; fp32's rounding bound is checked where the
# summation order departs most from HF's: the widest TP, experts spread widest.
TINY_FP32_TOPOLOGIES = ["4x1", "4x1x4"]
SMOL_TOPOLOGIES = ["1x1", "3x1", "1x3"]
SMOL_BF16_TOPOLOGY = "3x1"  # serving in bf16 (cast at load, shards of the fp32 checkpoint): one TP>1 topology
DTYPES = ["float32", "float64"]
CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "How many legs does a spider have?",
]
# bf16 greedy is compared on prompts whose next tokens are near-certain (test_smollm2_bf16_...).
WIDE = [", ".join(map(str, range(1, 31))) + ",", ", ".join(map(str, range(100, 131))) + ","]
BF16_GREEDY = 2
FP64_REL = 1e-12  # see the module docstring
K_FP32 = 4  # see assert_fp32_within_hf_rounding


def _rms_norm_in_input_dtype(self, x):
    # HF's LlamaRMSNorm/Qwen2RMSNorm formula without its upcast to fp32.
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _router_in_input_dtype(self, hidden_states):
    # HF's Mixtral/Qwen3-MoE TopKRouter formula without its softmax in fp32.
    logits = torch.nn.functional.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
    top, index = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
    if not hasattr(self, "norm_topk_prob") or self.norm_topk_prob:  # Mixtral always renormalises
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top, index


def with_attention(model, impl: str):
    m = copy.deepcopy(model)
    m.set_attn_implementation(impl)
    return m


def fp64_oracle(model):
    """An fp64 copy of an HF fp32 model that computes in fp64 throughout.

    HF computes RMSNorm and MoE routers' softmax in fp32 whatever the model dtype (right for
    bf16, a precision ceiling for fp64: 1e-7..6e-7 of the logit scale here), so the copy's norms
    and routers keep the input dtype; eager attention's softmax is fp32 too, so the copy uses
    sdpa. RoPE is left alone: HF and megatron build the same fp32 angle table (measured: fp64
    agreement to 1e-15 with it).
    """
    m = with_attention(model, "sdpa").to(torch.float64)
    moe = False
    for mod in m.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = types.MethodType(_rms_norm_in_input_dtype, mod)
        if type(mod).__name__.endswith("TopKRouter"):
            mod.forward = types.MethodType(_router_in_input_dtype, mod)
            moe = True
    if moe:  # HF's default grouped-GEMM experts take no fp64; the eager loop does
        m.set_experts_implementation("eager")
    return m


def hf_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0] for ids in prompts]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@dataclass
class Oracle:
    fp64: list[torch.Tensor]  # HF all-fp64: the exact function to ~1e-15
    fp32: list[torch.Tensor]  # HF fp32, sdpa attention (its default)
    fp32_self: float  # max|HF eager - HF sdpa| in fp32: only the summation order differs


def hf_oracle(model32, prompts) -> Oracle:
    sdpa = hf_logits(with_attention(model32, "sdpa"), prompts)
    eager = hf_logits(with_attention(model32, "eager"), prompts)
    return Oracle(hf_logits(fp64_oracle(model32), prompts), sdpa, max_diff(eager, sdpa))


def assert_fp64_exact(ours: list[torch.Tensor], ref: list[torch.Tensor]):
    for i, (got, want) in enumerate(zip(ours, ref)):
        assert got.dtype == torch.float64 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
        err, scale = (got - want).abs().max().item(), want.abs().max().item()
        assert err <= FP64_REL * scale, (
            f"prompt {i}: fp64 max|Δlogits| {err:.3g} = {err / scale:.2g} of the logit scale > {FP64_REL:g}")


def assert_fp32_within_hf_rounding(ours: list[torch.Tensor], oracle: Oracle):
    """Rule: in fp32, ours vs HF may differ by at most K_FP32 x the largest discrepancy HF
    shows against itself when only the summation order changes (eager vs sdpa attention,
    same weights, same prompts, measured in this test).

    K_FP32 = 4 because ours and HF differ in summation order in about 4 places per layer (QKV
    GEMM, attention, o_proj and MLP with their TP all-reduces) where eager vs sdpa differs in
    one; independent roundings add like sqrt(4) = 2, and a factor 2 more covers other CPUs.
    Measured here: SmolLM2 5.8e-5 (HF vs itself) -> bound 2.3e-4, ours 5.5e-5..1.07e-4 (1.08e-4 on
    another CPU); tiny models ~1e-7 -> ours 0.9e-7..1.2e-7. The bound is ~6e-6 of SmolLM2's
    logit scale: a bf16 rounding anywhere (4e-3 relative) or any wrong math fails it; the
    fp64 check is the one that proves the math exactly.
    """
    assert oracle.fp32_self > 0, "HF eager and sdpa agree bit for bit: no summation-order reference"
    for got, want in zip(ours, oracle.fp32):
        assert got.dtype == torch.float32 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    err, bound = max_diff(ours, oracle.fp32), K_FP32 * oracle.fp32_self
    assert err <= bound, (f"fp32 max|Δlogits| {err:.3g} > {K_FP32} x {oracle.fp32_self:.3g} "
                          f"(HF eager vs sdpa) = {bound:.3g}")


def load_ours(d, model: str, dtype: str, topo: str) -> dict:
    return torch.load(d / f"{model}__{dtype}__{topo}.pt")


@pytest.fixture(scope="module")
def tiny_prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 23, 41)]


@pytest.fixture(scope="module")
def tiny_results(llama_mg, qwen2_mg, llama3_mg, qwen3_mg, mixtral_mg, qwen3_moe_mg, tiny_prompts, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-logits")
    (d / "prompts.json").write_text(json.dumps(tiny_prompts))
    models = [llama_mg, qwen2_mg, llama3_mg, qwen3_mg, mixtral_mg, qwen3_moe_mg]
    torchrun("logits_world.py", 4, ["--models", *models, "--topologies", *TINY_TOPOLOGIES, *EP_TOPOLOGIES,
                                    "--dtype-topologies", "float32=" + ",".join(TINY_FP32_TOPOLOGIES),
                                    "--dtypes", *DTYPES, "--prompts", d / "prompts.json", "--out", d], timeout=600)
    return d


@pytest.fixture(scope="module")
def tiny_oracles(request, tiny_prompts) -> dict[str, Oracle]:
    from transformers import AutoModelForCausalLM

    return {which: hf_oracle(AutoModelForCausalLM.from_pretrained(str(request.getfixturevalue(f"{which}_hf")),
                                                                  dtype=torch.float32).eval(), tiny_prompts)
            for which in TINY_MODELS}


# llama3: Llama 3.x RoPE scaling; qwen3: Qwen3 QK-norm with YaRN; mixtral, qwen3_moe: experts
# (conftest.TINY).
TINY_MODELS = ["llama", "qwen2", "llama3", "qwen3", "mixtral", "qwen3_moe"]
TINY_CASES = [(m, t) for m in TINY_MODELS for t in TINY_TOPOLOGIES] + [
    (m, t) for m in ("mixtral", "qwen3_moe") for t in EP_TOPOLOGIES]


@pytest.mark.parametrize("which,topo", TINY_CASES)
def test_tiny_logits_match_hf_fp64(which, topo, tiny_results, tiny_oracles):
    """Exact to fp64 rounding: max|Δ| <= FP64_REL x max|ref| (module docstring), through the CPU
    kernels (fused.py, cpu_kernels.py)."""
    ours = load_ours(tiny_results, f"tiny-{which}", "float64", topo)
    assert ours["cpu_kernels"]
    assert_fp64_exact(ours["logits"], tiny_oracles[which].fp64)


@pytest.mark.parametrize("which", ["llama", "qwen3"])  # qwen3: QK-norm, YaRN, a sliding window
def test_without_the_cpu_kernels_the_torch_ops_match_hf_fp64(which, tiny_prompts, tiny_oracles, tmp_path, request):
    """What a machine without a compiler runs (REMP_CPU_KERNELS=0 here): the same function."""
    from remp_megatron import cpu_kernels

    (tmp_path / "prompts.json").write_text(json.dumps(tiny_prompts))
    torchrun("logits_world.py", 1, ["--models", request.getfixturevalue(f"{which}_mg"), "--topologies", "1x1",
                                    "--dtypes", "float64", "--prompts", tmp_path / "prompts.json", "--out", tmp_path],
             env={cpu_kernels.ENABLE_ENV: "0"}, timeout=300)
    ours = load_ours(tmp_path, f"tiny-{which}", "float64", "1x1")
    assert not ours["cpu_kernels"]
    assert_fp64_exact(ours["logits"], tiny_oracles[which].fp64)


@pytest.mark.parametrize("which,topo", [(m, t) for m, t in TINY_CASES if t in TINY_FP32_TOPOLOGIES])
def test_tiny_logits_match_hf_fp32(which, topo, tiny_results, tiny_oracles):
    """fp32 within K_FP32 x HF's own summation-order discrepancy (assert_fp32_within_hf_rounding)."""
    assert_fp32_within_hf_rounding(load_ours(tiny_results, f"tiny-{which}", "float32", topo)["logits"],
                                   tiny_oracles[which])


@pytest.fixture(scope="module")
def hf_bf16(smol_hf):
    return with_attention(smol_hf, "sdpa").to(torch.bfloat16)


@pytest.fixture(scope="module")
def smol_wide(smol_mg, hf_bf16) -> list[tuple[list[int], list[int]]]:
    """WIDE prompts and HF-bf16's greedy continuation of each."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_mg))
    return [(ids, hf_greedy(hf_bf16, ids, BF16_GREEDY)[0]) for ids in (tok.encode(w) for w in WIDE)]


@pytest.fixture(scope="module")
def smol_prompts(smol_mg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_mg))
    return [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]) for q in CHAT]


@pytest.fixture(scope="module")
def smol_bf16_prompts(smol_prompts, smol_wide):
    """The chat prompts, then each WIDE prompt, then each WIDE prompt followed by HF-bf16's
    continuation (our logits along HF's greedy path)."""
    return smol_prompts + [ids for ids, _ in smol_wide] + [ids + ref[:-1] for ids, ref in smol_wide]


@pytest.fixture(scope="module")
def smol_results(smol_mg, smol_prompts, smol_bf16_prompts, tmp_path_factory):
    d = tmp_path_factory.mktemp("smol-logits")
    (d / "prompts.json").write_text(json.dumps(smol_prompts))
    (d / "bf16-prompts.json").write_text(json.dumps(smol_bf16_prompts))
    torchrun("logits_world.py", 3, ["--models", smol_mg, "--topologies", *SMOL_TOPOLOGIES, "--dtypes", *DTYPES, "bf16",
                                    "--dtype-topologies", f"bf16={SMOL_BF16_TOPOLOGY}", "--prompts",
                                    d / "prompts.json", "--dtype-prompts", f"bf16={d / 'bf16-prompts.json'}",
                                    "--out", d, "--greedy", 16], timeout=600)
    return d


@pytest.fixture(scope="module")
def smol_oracle(smol_hf, smol_prompts) -> Oracle:
    return hf_oracle(smol_hf, smol_prompts)


@pytest.mark.parametrize("topo", SMOL_TOPOLOGIES)
def test_smollm2_logits_match_hf_fp64(topo, smol_results, smol_oracle):
    """Exact to fp64 rounding: max|Δ| <= FP64_REL x max|ref| (module docstring)."""
    assert_fp64_exact(load_ours(smol_results, "smollm2", "float64", topo)["logits"], smol_oracle.fp64)


@pytest.fixture(scope="module")
def smol_hf_greedy(smol_hf, smol_prompts) -> list[tuple[list[int], float]]:
    return [hf_greedy(smol_hf, ids, 16) for ids in smol_prompts]


@pytest.mark.parametrize("topo", SMOL_TOPOLOGIES)
def test_smollm2_logits_and_greedy_match_hf_fp32(topo, smol_results, smol_oracle, smol_hf_greedy):
    """fp32 logits within K_FP32 x HF's own summation-order discrepancy
    (assert_fp32_within_hf_rounding); greedy tokens equal where HF's top-2 margin is clear."""
    ours = load_ours(smol_results, "smollm2", "float32", topo)
    assert_fp32_within_hf_rounding(ours["logits"], smol_oracle)
    compared = 0
    for got, (ref, margin) in zip(ours["greedy"], smol_hf_greedy):
        if margin > CLEAR_MARGIN:  # near-ties cannot be asked to break the same way (DESIGN.md §5)
            assert got == ref
            compared += 1
    assert compared >= 2, "too few chat prompts with a clear greedy margin"


def test_smollm2_bf16_serving_matches_hf_bf16(smol_results, smol_bf16_prompts, smol_wide, hf_bf16):
    """`--dtype bf16` (weights cast from the fp32 checkpoint at load, bf16 KV cache, attention in
    fp32 on CPU) against HF's own bf16 model.

    Logits of every prompt: within K_FP32 x HF-bf16's eager-vs-sdpa discrepancy (the fp32 rule;
    bf16 rounding makes it ~1 logit here). Greedy on the WIDE prompts: along HF's greedy path our
    logits differ from HF's by some d at each decision position; where HF's top-2 margin exceeds
    2d there, the argmax cannot differ, so the engine's greedy decode (KV cache, decode steps)
    must produce HF's tokens."""
    prompts = smol_bf16_prompts
    sdpa = [x.float() for x in hf_logits(hf_bf16, prompts)]
    self_diff = max_diff([x.float() for x in hf_logits(with_attention(hf_bf16, "eager"), prompts)], sdpa)
    ours = load_ours(smol_results, "smollm2", "bf16", SMOL_BF16_TOPOLOGY)
    assert ours["dtype"] == "bfloat16"
    err, bound = max_diff(ours["logits"], sdpa), K_FP32 * self_diff
    assert 0 < err <= bound, f"bf16 max|Δlogits| {err:.3g} vs bound {bound:.3g} (HF-bf16 eager vs sdpa {self_diff:.3g})"
    n = len(smol_wide)
    for i, (ids, ref) in enumerate(smol_wide):
        forced = len(prompts) - n + i  # ids + ref[:-1]
        decide = slice(len(ids) - 1, None)
        d = (ours["logits"][forced][decide] - sdpa[forced][decide]).abs().max().item()
        top = sdpa[forced][decide].topk(2).values
        margin = (top[:, 0] - top[:, 1]).min().item()
        assert margin > 2 * d, f"WIDE[{i}]: HF-bf16 margin {margin:.3g} <= 2 x our deviation {d:.3g}: pick another"
        assert ours["greedy"][len(prompts) - 2 * n + i][:len(ref)] == ref


def test_a_rank_imports_megatron_without_its_compiler():
    """jit_off: a fresh process that imports our engine gets megatron with its fuser off, and
    never imports dynamo (~2 s of every rank's start when it does)."""
    code = ("import sys, remp_megatron.worker, megatron.core.jit as jit; "
            "print(jit.jit_fuser.__module__, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["remp_megatron.jit_off", "False"], out


def test_every_cpu_patch_is_needed_and_sufficient(tmp_path):
    torchrun("compat_world.py", 2, ["--out", tmp_path / "compat.json"], timeout=300)
    report = json.loads((tmp_path / "compat.json").read_text())
    from remp_megatron.cpu_compat import PATCHES

    assert set(report) == {p.name for p in PATCHES}
    for name, r in report.items():
        assert r["without"] is not None, f"{name}: call site works without the patch (drop the patch?)"
        assert r["with"] is None, f"{name}: call site still fails with the patch: {r['with']}"
