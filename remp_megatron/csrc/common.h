// What the CPU kernels share: accumulation types, loads that widen, a vectorisable exp.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace remp {

// Sums and products in fp32 for 16- and 32-bit inputs, in fp64 for fp64 (the exactness tests).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T>
inline typename Acc<T>::type load(T x) { return static_cast<typename Acc<T>::type>(x); }

template <>
inline float load<c10::BFloat16>(c10::BFloat16 x) {  // a shift the compiler vectorises
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}

// v rounded to T (to nearest, ties to even), in integer arithmetic for bf16 so that loops over it
// vectorise (c10's conversion does not: a bf16 SwiGLU took 177 us at 32 rows instead of ~24).
template <typename T>
inline T store(typename Acc<T>::type v) { return static_cast<T>(v); }

template <>
inline c10::BFloat16 store<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t even = bits + 0x7fffu + ((bits >> 16) & 1u);
  c10::BFloat16 r;
  r.x = static_cast<uint16_t>(std::isnan(v) ? 0x7fc0u : even >> 16);
  return r;
}

// exp(x) for x <= 0 in plain arithmetic so that loops over it vectorise (glibc's vector exp needs
// -ffast-math; the scalar one was a quarter of the decode kernel's time): 2^n * p(r), with
// r = x - n ln2 in [-ln2/2, ln2/2] (ln2 in two parts) and p exp's Taylor polynomial of degree 6.
// Relative error <= 2.5e-7 on [-87, 0] (checked against fp64), about 2 ulp.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // below this exp is under float's normal range
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.0f / 720;
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = p * r + c;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace remp
