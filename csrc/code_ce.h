// Shared pieces of the fused_code_ce kernels: constants, the margin function, input checks.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#if defined(__CUDACC__)
#define GIF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GIF_HOST_DEVICE inline
#endif

namespace gif {

// Same values as gif_kernels/constants.py (the Python backends read them there).
constexpr double kNormEps = 1e-12;  // rows are divided by max(||v||, kNormEps), as F.normalize does
constexpr double kSinEps = 1e-12;   // sin(theta) = sqrt(max(1 - c^2, kSinEps)) keeps phi' finite at c = +-1

// ArcFace margin on the target cosine: phi(c) = cos(theta + m2) while theta + m2 <= pi, else the
// fallback c - m2 sin(m2). Returns phi(c) and writes its exact derivative (of the clamped formula).
template <typename T>
GIF_HOST_DEVICE T arcface_phi(T c, T cos_m, T sin_m, T m2, T* dphi) {
  if (c < -cos_m) {
    *dphi = T(1);
    return c - m2 * sin_m;
  }
  const T sin_sq = T(1) - c * c;
  if (sin_sq < T(kSinEps)) {
    *dphi = cos_m;
    return c * cos_m - std::sqrt(T(kSinEps)) * sin_m;
  }
  const T sin_t = std::sqrt(sin_sq);
  *dphi = cos_m + sin_m * c / sin_t;
  return c * cos_m - sin_t * sin_m;
}

// Checks shapes, dtypes and scalar arguments shared by every backend; codes' values are checked by
// check_code_values where that needs no device sync.
void check_code_ce_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
                          const c10::optional<at::Tensor>& position_weight, double scale, double m2,
                          double m3, bool normalize);

// Whether the reduction of a loss with gradients in the forward is "mean" (else "sum"); raises for
// any other value.
bool reduction_is_mean(c10::string_view reduction);

// Raises naming the first code outside [0, V) that is not ignore_index. CPU tensors only.
void check_code_values(const at::Tensor& codes, int64_t num_tokens, int64_t ignore_index);

}  // namespace gif
