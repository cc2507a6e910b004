// A transformer layer's small ops fused, one pass over the rows each: RMSNorm (with the residual
// add before it), SwiGLU's silu(gate) * up, RoPE on the queries and keys of a fused QKV output.
// In torch each is 3-6 ops, each a parallel region and a temporary: at 32 decoding sequences
// ~50-70 us per RMSNorm against a few here.
//
// Rounding follows HF transformers' Llama modules op for op (each result rounded to the model's
// dtype where HF's is; reductions in fp32, fp64 for fp64). What differs from torch's ops is fp32-
// or fp64-level only: the order of a sum, silu's exp (common.h), and in fp32 and fp64 the multiply-
// adds the compiler fuses (one rounding fewer); bf16 and fp16 round every step as HF does. Rows are split over the calling thread's OpenMP team (see paged_decode.cpp
// for why not at::parallel_for) when there are enough of them to pay for waking it.
#include "common.h"

#include <tuple>

namespace {

using remp::Acc;
using remp::load;

constexpr int64_t kParallelFrom = 8192;  // elements: below, one thread (a team's wake-up costs more)

// v rounded to T, read back at accumulation precision: a torch op's output in T.
template <typename T>
inline typename Acc<T>::type rounded(typename Acc<T>::type v) { return load(remp::store<T>(v)); }

// HF's LlamaRMSNorm: h = x (+ residual, rounded); y = w * round(h * rsqrt(mean(h^2) + eps)).
template <typename T>
void rms_norm_rows(const T* x, const T* residual, const T* w, T* y, T* sum, int64_t rows, int64_t cols, double eps) {
  using A = typename Acc<T>::type;
#pragma omp parallel for schedule(static) if (rows > 1 && rows * cols >= kParallelFrom)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    const T* h = xr;
    if (residual != nullptr) {
      const T* rr = residual + r * cols;
      T* sr = sum + r * cols;
      for (int64_t d = 0; d < cols; ++d) sr[d] = remp::store<T>(load(xr[d]) + load(rr[d]));
      h = sr;
    }
    A squares = 0;
#pragma omp simd reduction(+ : squares)
    for (int64_t d = 0; d < cols; ++d) squares += load(h[d]) * load(h[d]);
    const A scale = A(1) / std::sqrt(squares / static_cast<A>(cols) + static_cast<A>(eps));
    for (int64_t d = 0; d < cols; ++d) yr[d] = remp::store<T>(load(w[d]) * rounded<T>(load(h[d]) * scale));
  }
}

// HF's LlamaMLP: round(round(silu(gate)) * up); silu(g) = g * sigmoid(g), exp taken of -|g| only.
template <typename T>
void silu_mul_rows(const T* x, T* y, int64_t rows, int64_t width) {
  using A = typename Acc<T>::type;
#pragma omp parallel for schedule(static) if (rows > 1 && rows * width >= kParallelFrom)
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = x + r * 2 * width;
    const T* up = gate + width;
    T* yr = y + r * width;
#pragma omp simd
    for (int64_t d = 0; d < width; ++d) {
      const A g = load(gate[d]);
      const A e = remp::exp_nonpositive(-std::abs(g));
      const A sigmoid = g >= 0 ? A(1) / (A(1) + e) : e / (A(1) + e);
      yr[d] = remp::store<T>(rounded<T>(g * sigmoid) * load(up[d]));
    }
  }
}

// Megatron's unfused RoPE as paged_attention.Rotary computes it: round(round(t * cos) +
// round(t[(d + dim/2) % dim] * sin)), sin's first half negated (fp32/fp64: up to a fused
// multiply-add). qkv [tokens, groups, per_group + 2, dim] (each KV head's query heads, its key, its
// value) -> query [tokens, groups * per_group, dim], key [tokens, groups, dim], both rotated; the
// value stays where it is.
template <typename T>
void rope_rows(const T* qkv, const T* cos, const T* sin, T* query, T* key, int64_t tokens, int64_t groups,
               int64_t per_group, int64_t dim) {
  using A = typename Acc<T>::type;
  const int64_t half = dim / 2;
#pragma omp parallel for schedule(static) if (tokens > 1 && tokens * groups * (per_group + 1) * dim >= kParallelFrom)
  for (int64_t t = 0; t < tokens; ++t) {
    const T* c = cos + t * dim;
    const T* s = sin + t * dim;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t j = 0; j <= per_group; ++j) {
        const T* in = qkv + ((t * groups + g) * (per_group + 2) + j) * dim;
        T* out = j < per_group ? query + ((t * groups + g) * per_group + j) * dim : key + (t * groups + g) * dim;
        for (int64_t d = 0; d < dim; ++d) {
          const T rolled = in[d < half ? d + half : d - half];
          out[d] = remp::store<T>(rounded<T>(load(in[d]) * load(c[d])) + rounded<T>(load(rolled) * load(s[d])));
        }
      }
    }
  }
}

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), op, ": ", name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) > 0, op, ": ", name, " must have a last dimension of at least 1");
}

}  // namespace

// x [..., hidden] -> HF's RMSNorm of x with weight [hidden].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm", "x");
  check_rows(weight, "rms_norm", "weight");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0) && x.scalar_type() == weight.scalar_type(),
              "rms_norm: weight must be [", x.size(-1), "] of x's dtype");
  at::Tensor y = at::empty_like(x);
  const int64_t cols = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), nullptr, weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                            nullptr, x.numel() / cols, cols, eps);
  });
  return y;
}

// (x + residual) and its RMSNorm, in one pass: the residual add that precedes a pre-norm.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "add_rms_norm", "x");
  check_rows(residual, "add_rms_norm", "residual");
  check_rows(weight, "add_rms_norm", "weight");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must match x");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0) && x.scalar_type() == weight.scalar_type(),
              "add_rms_norm: weight must be [", x.size(-1), "] of x's dtype");
  at::Tensor y = at::empty_like(x), sum = at::empty_like(x);
  const int64_t cols = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                            y.data_ptr<scalar_t>(), sum.data_ptr<scalar_t>(), x.numel() / cols, cols, eps);
  });
  return {y, sum};
}

// x [..., 2 * width] = [gate, up] -> silu(gate) * up [..., width].
at::Tensor silu_mul(const at::Tensor& x) {
  check_rows(x, "silu_mul", "x");
  TORCH_CHECK(x.size(-1) % 2 == 0, "silu_mul: the last dimension (", x.size(-1), ") must hold gate and up halves");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  const int64_t width = shape.back() / 2;
  shape.back() = width;
  at::Tensor y = at::empty(shape, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_mul", [&] {
    silu_mul_rows<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.numel() / (2 * width), width);
  });
  return y;
}

// qkv [tokens, groups, per_group + 2, dim]; cos, sin [tokens, dim] (sin's first half negated)
// -> (query [tokens, groups * per_group, dim], key [tokens, groups, dim]), rotated.
std::tuple<at::Tensor, at::Tensor> rope_qk(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(qkv, "rope_qk", "qkv");
  check_rows(cos, "rope_qk", "cos");
  check_rows(sin, "rope_qk", "sin");
  TORCH_CHECK(qkv.dim() == 4 && qkv.size(2) >= 3 && qkv.size(3) % 2 == 0, "rope_qk: qkv must be [tokens, groups, "
              "per_group + 2, dim] with an even dim");
  const int64_t tokens = qkv.size(0), groups = qkv.size(1), per_group = qkv.size(2) - 2, dim = qkv.size(3);
  TORCH_CHECK(cos.sizes() == at::IntArrayRef({tokens, dim}) && sin.sizes() == cos.sizes() &&
                  cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(),
              "rope_qk: cos and sin must be [", tokens, ", ", dim, "] of qkv's dtype");
  at::Tensor query = at::empty({tokens, groups * per_group, dim}, qkv.options());
  at::Tensor key = at::empty({tokens, groups, dim}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_qk", [&] {
    rope_rows<scalar_t>(qkv.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                        query.data_ptr<scalar_t>(), key.data_ptr<scalar_t>(), tokens, groups, per_group, dim);
  });
  return {query, key};
}
