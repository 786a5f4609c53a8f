// select_transfer: the per-row rules shared by the CPU and CUDA implementations.
//
// Semantics are those of genjo_fast.sampling.select_transfer (the torch op, the oracle):
// rank_i = #{j : precedes(c_j, j, c_i, i)} is position i's place in the row's stable
// decreasing order as torch sorts it: NaN above every number, equal values (NaNs among
// themselves) by position, lowest first; and
//   top-k:     rank_i < k
//   threshold: c_i > -inf and (rank_i == 0 or c_i >= threshold)
//   factor:    c_i > -inf and rank_i < n, n = the first rank r >= 1 whose confidence fails
//              c >= 1 - factor / (r + 2) (the row length if none fails).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GENJO_HOST_DEVICE __host__ __device__
#else
#define GENJO_HOST_DEVICE
#endif

namespace genjo_fast {

enum Rule : int { kTopK = 0, kThreshold = 1, kFactor = 2 };

// 1 - factor / (rank + 2) exactly as torch evaluates the oracle's expression on an int64
// tensor: Tensor.__rtruediv__ is reciprocal() * factor, so float32 reciprocal, float32
// product, float32 difference, each rounded to nearest (never contracted into an FMA).
GENJO_HOST_DEVICE inline float factor_threshold(float factor, int64_t rank) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(1.0f, __fmul_rn(factor, __frcp_rn(static_cast<float>(rank + 2))));
#else
  volatile float recip = 1.0f / static_cast<float>(rank + 2);  // volatile: no FMA contraction
  volatile float scaled = factor * recip;
  return 1.0f - scaled;
#endif
}

// Whether position j (value w) comes before position i (value v) in the row's order. (x != x
// tests NaN on host and device alike; the extension is not built with fast-math.)
template <typename acc_t>
GENJO_HOST_DEVICE inline bool precedes(acc_t w, int64_t j, acc_t v, int64_t i) {
  const bool nan_w = w != w, nan_v = v != v;
  if (nan_w || nan_v) return nan_w && (!nan_v || j < i);
  return w > v || (w == v && j < i);
}

// Whether position i (value v, rank r) is transferred, once the row's ranks are known.
template <typename acc_t>
GENJO_HOST_DEVICE inline bool selected(int rule, acc_t v, int64_t r, int64_t k, acc_t threshold,
                                       int64_t first_fail) {
  const bool finite_or_inf = v > -static_cast<acc_t>(INFINITY);  // not -inf (nor NaN)
  if (rule == kTopK) return r < k;  // as the oracle: the k first in the order, NaN included
  if (rule == kThreshold) return finite_or_inf && (r == 0 || v >= threshold);
  return finite_or_inf && r < first_fail;
}

// Whether rank r (value v) breaks the factor rule's prefix.
template <typename acc_t>
GENJO_HOST_DEVICE inline bool factor_fails(acc_t v, int64_t r, float factor) {
  return r != 0 && !(v >= static_cast<acc_t>(factor_threshold(factor, r)));
}

}  // namespace genjo_fast
