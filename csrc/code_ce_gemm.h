// fused_code_ce through GEMMs: the cosines of a block of samples come from one matrix product against
// the normalized weights; a device-specific row step turns each block's cosines into loss and lse
// (forward) or into the gradient factors dLoss/dcos (backward); the gradients are two more products
// per block. Blocks bound the temporary memory, so no (B, L, V) tensor exists at once or is kept for
// backward. The CPU kernels use this for every shape, the CUDA kernels beyond the small-V kernel.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <limits>

#include "code_ce.h"

namespace gif {

// Scalars every row step needs, in the accumulation dtype T.
template <typename T>
struct RowParams {
  T scale, m2, m3, cos_m, sin_m;
  int64_t ignore_index;

  GIF_HOST_DEVICE T target_logit(T c, T* dphi) const {
    return scale * (arcface_phi(c, cos_m, sin_m, m2, dphi) - m3);
  }
};

template <typename T>
RowParams<T> row_params(double scale, double m2, double m3, int64_t ignore_index) {
  return {T(scale), T(m2), T(m3), T(std::cos(m2)), T(std::sin(m2)), ignore_index};
}

// One block of rows, samples [b0, b0 + nb). cos is (nb, L, V), possibly strided; codes, lse and loss
// are the block's (nb, L) slices (contiguous); position_weight is (L,) in the accumulation dtype.
struct ForwardBlock {
  at::Tensor cos, codes, position_weight, loss, lse;
  double scale, m2, m3;
  int64_t ignore_index;
};
// Writes loss and lse of the block's rows.
using ForwardRowStep = std::function<void(const ForwardBlock&)>;

struct BackwardBlock {
  at::Tensor cos, codes, position_weight, grad_loss, lse;  // grad_loss and lse in the accumulation dtype
  at::Tensor grad_cos;  // out: (nb, L, V) contiguous, dLoss/dcos (0 on ignored rows)
  at::Tensor cos_dot;   // out: (nb, L), sum_v grad_cos * cos
  double scale, m2, m3;
  int64_t ignore_index;
};
using BackwardRowStep = std::function<void(const BackwardBlock&)>;

// block_elements bounds the cosines of one block (the backward keeps two such tensors).
std::tuple<at::Tensor, at::Tensor> gemm_code_ce_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
    const c10::optional<at::Tensor>& position_weight, double scale, double m2, double m3,
    bool normalize, int64_t ignore_index, int64_t block_elements, const ForwardRowStep& row_step);

std::tuple<at::Tensor, at::Tensor> gemm_code_ce_backward(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& codes, const c10::optional<at::Tensor>& position_weight,
    const at::Tensor& lse, double scale, double m2, double m3, bool normalize,
    int64_t ignore_index, int64_t block_elements, const BackwardRowStep& row_step);

// Accumulation dtype of fused_code_ce: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// grad_loss and lse of the backward must have codes' shape (B, L).
void check_backward_rows(const at::Tensor& grad_loss, const at::Tensor& lse, const at::Tensor& codes);

}  // namespace gif
