"""Batched paged attention equals attending each sequence on its own (pure; fp64 and bf16).

Steps mix prefill chunks (first and later chunks) and decodes with ragged lengths and
scattered, non-contiguous block tables; the reference gathers each sequence's keys by position
and runs one causal SDPA per sequence, the way the engine did before batching. Decodes run both
ways: through the CPU kernel that reads the cache in place (cpu_kernels.py) and gathered into SDPA."""
import math

import pytest
import torch
import torch.nn.functional as F

from remp_megatron import cpu_kernels
from remp_megatron.kv_cache import KVCache
from remp_megatron.paged_attention import AttentionMetadata, PagedAttention, Rotary, forward_context
from remp_megatron.rope import RopeScaling, angle_table

HEADS, KV_HEADS, DIM, BLOCK, BLOCKS = 8, 4, 16, 4, 64


class _Cfg:
    kv_channels = DIM


def reference(query, k_cache, v_cache, starts, lens, tables, window=None):
    out, row = [], 0
    for start, n, table in zip(starts, lens, tables):
        pos = torch.arange(start + n)
        slots = torch.tensor(table)[pos // BLOCK] * BLOCK + pos % BLOCK
        q = query[row:row + n].transpose(0, 1)
        mask = pos[None, :] <= pos[start:, None]
        if window is not None:  # HF's sliding window: keys in (p - window, p]
            mask &= pos[None, :] > pos[start:, None] - window
        o = F.scaled_dot_product_attention(q, k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1),
                                           attn_mask=mask, scale=1 / math.sqrt(DIM), enable_gqa=True)
        out.append(o.transpose(0, 1))
        row += n
    return torch.cat(out)


@pytest.mark.parametrize("starts, lens", [
    ([0, 5, 17, 3], [7, 1, 1, 9]),  # two first-chunk prefills, two decodes
    ([12, 0, 30, 8, 1], [1, 1, 1, 1, 1]),  # decodes only, ragged contexts (one of length 1)
    ([16, 4], [6, 12]),  # later prefill chunks only
    ([0], [1]),
    ([37], [1]),  # a lone decode over three blocks
    ([20, 0], [1, 9]),  # a lone decode and a lone prefill chunk: two groups of one
])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("blocks", ["scattered", "consecutive"])
@pytest.mark.parametrize("decodes", ["kernel", "sdpa"])
def test_batched_equals_per_sequence(starts, lens, window, dtype, blocks, decodes):
    """fp64: the same math in another summation order, rounding only (1e-12). bf16 (its decodes
    take their own SDPA call): within two bf16 roundings (unit roundoff 2^-8) of max|v| — the
    probabilities and the output; scores accumulate in fp32 — of the fp64 result on the same
    bf16 inputs (measured: 0.23 of that; the kernel keeps probabilities in fp32)."""
    kernel = cpu_kernels.kernels().paged_decode if decodes == "kernel" else None
    assert decodes == "sdpa" or kernel is not None, "the CPU kernel did not build (see the log)"
    g = torch.Generator().manual_seed(sum(starts) + len(lens))
    # Scattered physical blocks, or in order (a lone sequence then attends on its blocks in place).
    perm = torch.randperm(BLOCKS, generator=g).tolist() if blocks == "scattered" else list(range(3, BLOCKS))
    tables, used = [], 0
    for start, n in zip(starts, lens):
        need = -(-(start + n) // BLOCK)
        tables.append(perm[used:used + need])
        used += need
    kv = KVCache(torch.zeros(2, 1, BLOCKS, BLOCK, KV_HEADS, DIM, dtype=dtype), first_layer=0)
    k_cache, v_cache = kv.layer(0)
    # Earlier tokens are already cached; this step writes the new ones.
    for start, table in zip(starts, tables):
        pos = torch.arange(start)
        slots = torch.tensor(table, dtype=torch.long)[pos // BLOCK] * BLOCK + pos % BLOCK
        k_cache[slots] = torch.randn(start, KV_HEADS, DIM, generator=g, dtype=torch.float64).to(dtype)
        v_cache[slots] = torch.randn(start, KV_HEADS, DIM, generator=g, dtype=torch.float64).to(dtype)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, DIM, generator=g, dtype=torch.float64).to(dtype) for h in (HEADS, KV_HEADS, KV_HEADS))

    # With a window, layer 0 slides and layer 1 (same cache contents) attends to everything.
    meta = AttentionMetadata.build(starts, lens, tables, BLOCK, torch.device("cpu"), window, (0,), dtype)
    assert meta.positions.tolist() == [p for s, n in zip(starts, lens) for p in range(s, s + n)]
    if blocks == "consecutive":  # every lone sequence reads its keys in place, the others gather
        assert [g.first_block is not None for g in meta.groups] == [len(g.mask) == 1 for g in meta.groups]
    kv1 = KVCache(kv.buffer.expand(2, 2, *kv.buffer.shape[2:]).clone(), first_layer=0)
    with forward_context(meta, kv1, decode_kernel=kernel):
        got = PagedAttention(_Cfg, 1, None, None)(q, k, v)
        full = PagedAttention(_Cfg, 2, None, None)(q, k, v)
    caches = [[c.double() for c in kv1.layer(i)] for i in (0, 1)]
    want = reference(q.double(), *caches[0], starts, lens, tables, window)
    assert got.shape == (t, HEADS * DIM) and got.dtype == dtype
    atol = 1e-12 if dtype == torch.float64 else 2 * 2 ** -8 * max(c.abs().max().item() for c in (caches[0][1], v))
    torch.testing.assert_close(got.reshape(t, HEADS, DIM).double(), want, rtol=0, atol=atol)
    torch.testing.assert_close(full.reshape(t, HEADS, DIM).double(),
                               reference(q.double(), *caches[1], starts, lens, tables), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mscale", [1.0, 1.3])  # 1.3: a YaRN attention factor
def test_rotary_is_megatrons_unfused_rotary_bit_for_bit(dtype, mscale):
    """Rotary's roll and pre-negated sin give megatron's t*cos + rotate_half(t)*sin exactly, on
    [tokens, groups, heads, dim] (queries and keys rotated together)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    g = torch.Generator().manual_seed(0)
    angles = angle_table(RopeScaling(), DIM, 10000.0, 512)[torch.randint(0, 512, (24,), generator=g)]
    t = torch.randn(24, KV_HEADS, 3, DIM, generator=g).to(dtype)
    assert torch.equal(Rotary.of(angles, mscale, dtype)(t), _apply_rotary_pos_emb_bshd(t, angles, mscale=mscale))


def test_without_a_compiler_the_kernel_is_none_and_says_why(tmp_path):
    """Decodes then gather into SDPA (the path above with decodes="sdpa"); serving goes on."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": "/bin/false", cpu_kernels.ENABLE_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", "from remp_megatron import cpu_kernels; print(cpu_kernels.kernels())"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "None", out.stderr
    assert "CPU kernels unavailable, the torch ops run instead" in out.stderr


def _gamma(k: int, u: float) -> float:
    return k * u / (1 - k * u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim, group", [(64, 3), (128, 4), (16, 1), (32, 16),  # the AVX-512 path where there is one
                                        (80, 2), (64, 17)])  # the portable one everywhere
@pytest.mark.parametrize("block, window", [(16, 0), (32, 20), (8, 7)])
def test_decode_kernel_is_within_its_rounding_of_fp64(dtype, dim, group, block, window):
    """The decode kernel on its own, at the shapes its paths are chosen by, against fp64 attention
    on the same inputs. The bound is the kernel's fp32 rounding (unit u = 2^-24) worked through:
    scores off by E <= gamma_{dim+1} * scale * sum|q k| each, so every softmax weight by a factor
    within exp(2E + 87u)(1 + 2.5e-7) = 1 + a (87: exp's range; 2.5e-7: its polynomial), the
    probabilities by 2a + gamma_n, the weighted sum of n values by gamma_n more: within
    (2a + 3 gamma_{n+1}) max|v|, plus one rounding of the output to ``dtype``."""
    kernel = cpu_kernels.kernels()
    assert kernel is not None, "the CPU kernel did not build (see the log)"
    kv_heads, blocks = 2, 128
    g = torch.Generator().manual_seed(dim * 100 + group + block)
    lens = torch.tensor([1, 15, 16, 17, 33, 100, 3])
    width = -(-int(lens.max()) // block)
    table = torch.randperm(blocks, generator=g)[:len(lens) * width].view(len(lens), width)
    k_cache, v_cache = (torch.randn(blocks, block, kv_heads, dim, generator=g, dtype=torch.float64).to(dtype)
                        for _ in range(2))
    q = torch.randn(len(lens), kv_heads * group, dim, generator=g, dtype=torch.float64).to(dtype)
    scale = 1 / math.sqrt(dim)
    got = kernel.paged_decode(q, k_cache, v_cache, table, lens, scale, window)

    u = 2.0 ** -24
    u_out = {torch.float32: u, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    for b, n in enumerate(lens.tolist()):
        pos = torch.arange(max(0, n - window) if window else 0, n)
        slots = table[b][pos // block] * block + pos % block
        k = k_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)  # [keys, heads, dim]
        v = v_cache.flatten(0, 1)[slots].double().repeat_interleave(group, dim=1)
        qb = q[b].double()
        scores = torch.einsum("hd,khd->hk", qb, k) * scale
        want = torch.einsum("hk,khd->hd", scores.softmax(-1), v)
        e = _gamma(dim + 1, u) * scale * torch.einsum("hd,khd->hk", qb.abs(), k.abs()).max().item()
        a = math.exp(2 * e + 87 * u) * (1 + 2.5e-7) - 1
        vmax = v.abs().max().item()
        bound = (2 * a + 3 * _gamma(len(pos) + 1, u)) * vmax + u_out * want.abs().max().item()
        err = (got[b].double() - want).abs().max().item()
        assert err <= bound, f"sequence {b} ({len(pos)} keys): error {err:.3g} > bound {bound:.3g}"


def test_the_kernels_build_folder_is_keyed_by_the_cpu(monkeypatch, tmp_path):
    """-march=native code built on one CPU may not run on another that shares the folder."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cpu_kernels._cpu_features().startswith("flags")  # Linux: /proc/cpuinfo's feature line
    here = cpu_kernels._build_dir()
    monkeypatch.setattr(cpu_kernels, "_cpu_features", lambda: "flags\t\t: fpu sse2")
    assert cpu_kernels._build_dir() != here
