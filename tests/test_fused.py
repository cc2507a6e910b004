"""fused.py's ops, through the CPU kernels and through the torch ops they replace, against fp64
computed from the same inputs. Bounds come from the roundings each op makes: u = the unit roundoff
of the dtype (2^-8 bf16, 2^-24 fp32, 2^-53 fp64), relative per rounding to the value rounded;
sums over n terms in the accumulation dtype (fp32, fp64 for fp64) add n * u_acc."""
import pytest
import torch

from remp_megatron import cpu_kernels, fused
from remp_megatron.paged_attention import Rotary
from remp_megatron.rope import RopeScaling, angle_table

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
ROWS = [1, 3, 40]  # 40 x 576: over the kernels' threshold for splitting rows over threads


def u(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def u_acc(dtype: torch.dtype) -> float:
    return u(torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernels, "kernels", lambda: None)
    else:
        assert cpu_kernels.kernels() is not None, "the CPU kernels did not build (see the log)"
    return request.param


def _norm(cols: int, dtype: torch.dtype, g: torch.Generator) -> torch.nn.RMSNorm:
    norm = torch.nn.RMSNorm(cols, eps=1e-5).to(dtype)
    norm.weight.data = (torch.rand(cols, generator=g) + 0.5).to(dtype)
    return norm


def _norm64(h: torch.Tensor, norm: torch.nn.RMSNorm) -> torch.Tensor:
    h = h.double()
    return norm.weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)


def _norm_bound(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # two roundings (h * rsqrt, then * weight), the sum of squares over the row, rsqrt's own
    return (2 * u(dtype) + (ref.shape[-1] + 4) * u_acc(dtype)) * ref.abs()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_and_its_residual_add(path, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 1, 576, generator=g) * 3).to(dtype)
    residual = torch.randn(rows, 1, 576, generator=g).to(dtype)
    norm = _norm(576, dtype, g)

    y = fused.rms_norm(norm, x)
    ref = _norm64(x, norm)
    assert y.dtype == dtype and y.shape == x.shape
    assert ((y.double() - ref).abs() <= _norm_bound(ref, dtype)).all()

    normed, total = fused.add_rms_norm(norm, x, residual)
    assert torch.equal(total, x + residual)  # one rounding of the exact sum on both paths
    ref = _norm64(total, norm)
    assert ((normed.double() - ref).abs() <= _norm_bound(ref, dtype)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul(path, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 1, 2 * 768, generator=g) * 4).to(dtype)
    x[0, 0, :4] = torch.tensor([0.0, 60.0, -60.0, -100.0], dtype=dtype)  # exp's far ends
    y = fused.silu_mul(x)
    gate, up = x.double().chunk(2, dim=-1)
    ref = gate * torch.sigmoid(gate) * up
    assert y.dtype == dtype and y.shape == ref.shape
    # silu's exp (the kernel's: <= 2.5e-7 relative, ~4 fp32 roundoffs), its divide and product,
    # then the two roundings to the dtype; below exp's normal range only an absolute 1e-30.
    bound = (2 * u(dtype) + 8 * u_acc(dtype)) * ref.abs() + 1e-30 * up.abs()
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 33])
def test_rope_of_queries_and_keys(path, dtype, tokens):
    """A fused QKV output [tokens, groups, per_group + 2, dim] -> queries and keys, rotated as
    megatron rotates them (t * cos + rotate_half(t) * sin); the values are left alone."""
    groups, per_group, dim = 3, 4, 64
    g = torch.Generator().manual_seed(tokens)
    angles = angle_table(RopeScaling(), dim, 10000.0, 512)[torch.randint(0, 512, (tokens,), generator=g)]
    rotary = Rotary.of(angles, 1.0, dtype)
    qkv = torch.randn(tokens, groups, per_group + 2, dim, generator=g).to(dtype)

    query, key = fused.rope_qk(rotary, qkv)
    assert query.shape == (tokens, groups * per_group, dim) and key.shape == (tokens, groups, dim)
    t = qkv[:, :, :per_group + 1].double()
    cos, sin = rotary.cos.double()[:, None, None], rotary.sin.double()[:, None, None]
    rolled = t.roll(dim // 2, -1)
    ref = t * cos + rolled * sin
    bound = 3 * u(dtype) * ((t * cos).abs() + (rolled * sin).abs())  # two products and their sum rounded
    got = torch.cat([query.view(tokens, groups, per_group, dim), key[:, :, None]], dim=2).double()
    assert ((got - ref).abs() <= bound).all()


def test_the_kernels_name_what_is_wrong():
    k = cpu_kernels.kernels()
    assert k is not None
    x = torch.randn(2, 576)
    with pytest.raises(RuntimeError, match=r"rms_norm: weight must be \[576\] of x's dtype"):
        k.rms_norm(x, torch.ones(576, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(RuntimeError, match="silu_mul: the last dimension"):
        k.silu_mul(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="silu_mul: x must have a last dimension of at least 1"):
        k.silu_mul(torch.randn(2, 0))
    with pytest.raises(RuntimeError, match="rope_qk: cos and sin must be"):
        k.rope_qk(torch.randn(2, 1, 3, 8), torch.randn(3, 8), torch.randn(3, 8))
