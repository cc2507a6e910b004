// Decode attention straight from the paged KV cache on CPU: one query token per sequence, keys
// and values read in place through the block table (no gathered copy), grouped-query heads,
// an optional sliding window. Built on first use by cpu_kernels.py.
//
// Work is split over (sequence, KV head) pairs with a raw `omp parallel`, not at::parallel_for:
// the latter's inlined copy of torch's per-thread set-up would reset the calling thread's
// kernel-thread count to the process default (1 off the kernel thread, threads.py) and halve the
// GEMMs that follow. Scores, softmax and the weighted sum accumulate in fp32 (fp64 for fp64).
#include "common.h"

#include <vector>

namespace {

using remp::Acc;
using remp::load;

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& table,
            const at::Tensor& lens, double scale, int64_t window, at::Tensor& out) {
  using A = typename Acc<T>::type;
  const int64_t seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block = k_cache.size(1), kv_heads = k_cache.size(2), group = heads / kv_heads, width = table.size(1);
  const int64_t s_block = k_cache.stride(0), s_slot = k_cache.stride(1), s_head = k_cache.stride(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
#pragma omp parallel
  {
    std::vector<A> scores, acc(group * dim), qs(group * dim);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < seqs * kv_heads; ++i) {
      const int64_t b = i / kv_heads, h = i % kv_heads, len = lp[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0, n = len - first;
      const T* qh = qp + (b * heads + h * group) * dim;
      for (int64_t j = 0; j < group * dim; ++j) qs[j] = load(qh[j]) * static_cast<A>(scale);
      scores.resize(group * n);
      for (int64_t t0 = first - first % block; t0 < len; t0 += block) {  // q · k, a cache block at a time
        const T* kb = kp + tp[b * width + t0 / block] * s_block + h * s_head;
        for (int64_t t = std::max(t0, first); t < std::min(t0 + block, len); ++t) {
          const T* k = kb + (t - t0) * s_slot;
          for (int64_t g = 0; g < group; ++g) {
            const A* qg = &qs[g * dim];
            A s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < dim; ++d) s += qg[d] * load(k[d]);
            scores[g * n + t - first] = s;
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {  // softmax
        A* s = &scores[g * n];
        const A top = *std::max_element(s, s + n);
        A sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) sum += (s[j] = remp::exp_nonpositive(s[j] - top));
        for (int64_t j = 0; j < n; ++j) s[j] /= sum;
      }
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t t0 = first - first % block; t0 < len; t0 += block) {  // p · v
        const T* vb = vp + tp[b * width + t0 / block] * s_block + h * s_head;
        for (int64_t t = std::max(t0, first); t < std::min(t0 + block, len); ++t) {
          const T* v = vb + (t - t0) * s_slot;
          for (int64_t g = 0; g < group; ++g) {
            const A p = scores[g * n + t - first];
            A* a = &acc[g * dim];
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) a[d] += p * load(v[d]);
          }
        }
      }
      T* o = op + (b * heads + h * group) * dim;
      for (int64_t j = 0; j < group * dim; ++j) o[j] = static_cast<T>(acc[j]);
    }
  }
}

}  // namespace

// q [seqs, heads, dim]; k_cache, v_cache [blocks, block_size, kv_heads, dim] (one layer); table
// [seqs, width] int64 block ids; lens [seqs] int64 keys per sequence (its query is the last);
// window: a query sees its last `window` keys (0: all) -> [seqs, heads, dim].
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& table, const at::Tensor& lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "paged_decode: shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "paged_decode: q, k and v must share a dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.strides() == k_cache.strides(), "paged_decode: cache layout");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0, "paged_decode: heads");
  TORCH_CHECK(table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && table.size(0) == q.size(0) &&
                  lens.numel() == q.size(0), "paged_decode: table and lens");
  const at::Tensor qc = q.contiguous(), tc = table.contiguous(), lc = lens.contiguous();
  // Reads go where the table points: check every id and length (a few hundred values a call).
  const int64_t blocks = k_cache.size(0), width = tc.size(1), block = k_cache.size(1);
  const int64_t* tp = tc.data_ptr<int64_t>();
  const int64_t* lp = lc.data_ptr<int64_t>();
  for (int64_t b = 0; b < tc.size(0); ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= width * block, "paged_decode: sequence ", b, " has ", lp[b],
                " keys; its table holds ", width * block);
    for (int64_t j = 0; j < (lp[b] + block - 1) / block; ++j)
      TORCH_CHECK(tp[b * width + j] >= 0 && tp[b * width + j] < blocks, "paged_decode: block id ", tp[b * width + j],
                  " of sequence ", b, " is outside the cache's ", blocks);
  }
  at::Tensor out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode<scalar_t>(qc, k_cache, v_cache, tc, lc, scale, window, out);
  });
  return out;
}
