// The CPU kernels' Python module (cpu_kernels.py builds it from every source in this folder).
#include <torch/extension.h>

#include <tuple>

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& table, const at::Tensor& lens, double scale, int64_t window);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor> rope_qk(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention from the paged KV cache");
  m.def("rms_norm", &rms_norm, "HF's RMSNorm");
  m.def("add_rms_norm", &add_rms_norm, "(x + residual, RMSNorm of it) in one pass");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [gate, up]");
  m.def("rope_qk", &rope_qk, "RoPE of a fused QKV output's queries and keys");
}
