// What the CUDA kernels of fused_code_ce share: the block shape, warp reductions, the online logsumexp,
// a row's target, dLoss/dcos, and the two paths' host entry points. The small-V kernels
// (code_ce_small_v.cu) and the GEMM path's row kernels (code_ce_gemm_rows.cu) include it; code_ce.cu
// chooses between them per shape.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "../code_ce_gemm.h"

namespace gif {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T neg_inf() { return static_cast<T>(-INFINITY); }
template <typename T>
__device__ __forceinline__ T quiet_nan() { return static_cast<T>(NAN); }

// Online logsumexp state: running max m and sum s of exp(value - m).
template <typename T>
struct OnlineLse {
  T m, s;
  __device__ OnlineLse() : m(neg_inf<T>()), s(0) {}
  __device__ __forceinline__ void add(T value) {
    if (value > m) {
      s = s * std::exp(m - value) + T(1);
      m = value;
    } else {
      s += std::exp(value - m);
    }
  }
  __device__ __forceinline__ T warp_result() {
    const T top = warp_max(m);
    const T total = warp_sum(top == neg_inf<T>() ? T(0) : s * std::exp(m - top));
    return top + std::log(total);
  }
};

// The target of a row: valid (in [0, V)), ignored, or out of range (NaN loss: checking would cost a
// host sync here; the CPU kernels raise instead).
struct Target {
  int64_t t;
  bool ignored, valid;
  __device__ Target(int64_t code, int64_t V, int64_t ignore_index)
      : t(code), ignored(code == ignore_index), valid(code >= 0 && code < V && code != ignore_index) {}
};

// dLoss/dcos of one row's token v: position_weight_j * g * scale * (p_v - [v == t]) * (dphi at the target).
template <typename acc_t>
__device__ __forceinline__ acc_t grad_cos(const RowParams<acc_t>& rp, acc_t c, bool is_target,
                                          acc_t logit_t, acc_t dphi, acc_t row_lse, acc_t row_grad) {
  const acc_t prob = std::exp((is_target ? logit_t : rp.scale * c) - row_lse);
  return row_grad * rp.scale * (is_target ? (prob - acc_t(1)) * dphi : prob);
}

// The small-V path (code_ce_small_v.cu): whether it takes the shape, and the op's forward and backward
// there. codes are int64 and contiguous; position_weight is in the accumulation dtype, or undefined for
// all ones.
bool small_v_fits(const at::Tensor& x, const at::Tensor& weight);
std::tuple<at::Tensor, at::Tensor> small_v_forward(const at::Tensor& x, const at::Tensor& weight,
                                                   const at::Tensor& codes, const at::Tensor& position_weight,
                                                   double scale, double m2, double m3, bool normalize,
                                                   int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor> small_v_backward(const at::Tensor& grad_loss, const at::Tensor& x,
                                                    const at::Tensor& weight, const at::Tensor& codes,
                                                    const at::Tensor& position_weight, const at::Tensor& lse,
                                                    double scale, double m2, double m3, bool normalize,
                                                    int64_t ignore_index);

// The GEMM path's row steps (code_ce_gemm_rows.cu), for gemm_code_ce_forward / _backward.
void forward_rows_cuda(const ForwardBlock& blk);
void backward_rows_cuda(const BackwardBlock& blk);

}  // namespace gif
