// fused_code_ce through GEMMs: the dot products of a block of samples with every weight row come
// from one matrix product of the raw inputs (float16/bfloat16 inputs on tensor cores with float32
// accumulation, where PyTorch has that GEMM for the device); a device-specific row step divides them
// by the norms into cosines and turns those into loss and lse (forward) or into the gradient factors
// dLoss/dcos (backward); the gradients are two more products per block, with the factors sent as
// hi + lo halves when the inputs are 16-bit (they hold terms of size `scale` that cancel down to
// O(1)). With gradients in the forward (gemm_code_ce_forward_grad) one sweep does both: the dots, one
// row step giving loss, lse and the factors, and the two gradient products: three products per training
// step instead of four. Blocks bound the temporary memory, so no (B, L, V) tensor exists at once or is kept for
// backward. The CPU kernels use this for every shape, the CUDA kernels beyond the small-V kernel.
#pragma once

#include <ATen/ATen.h>

#include <array>
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

// One block of rows, samples [b0, b0 + nb). dots is (nb, L, V) in the accumulation dtype, possibly
// strided; with normalization the cosine is dots / (feat_norm[b, jx] * row_norm[j, v]) (jx = 0 for
// shared features, else j), without it feat_norm and row_norm are undefined and the cosine is the dot.
// codes, lse and loss are the block's (nb, L) slices (contiguous); position_weight is (L,) in the
// accumulation dtype.
struct ForwardBlock {
  at::Tensor dots, feat_norm, row_norm, codes, position_weight, loss, lse;
  double scale, m2, m3;
  int64_t ignore_index;
};
// Writes loss and lse of the block's rows.
using ForwardRowStep = std::function<void(const ForwardBlock&)>;

// The gradient factors are written as GEMM operands: in the accumulation dtype, or, where the GEMMs take
// 16-bit operands (the _lo tensors are then defined), in the inputs' dtype as high halves (rounded
// factors) and low halves (the rounded remainders), whose sum carries a factor to about 2^-16 of its size.
struct BackwardBlock {
  at::Tensor dots, feat_norm, row_norm, codes, position_weight;
  at::Tensor grad_loss, lse;   // in the accumulation dtype
  at::Tensor grad_for_feats;   // out: (nb, L, V) contiguous, dLoss/dcos / row_norm (0 on ignored rows)
  at::Tensor grad_for_rows;    // out: (nb, L, V) contiguous, dLoss/dcos / feat_norm
  at::Tensor grad_for_feats_lo, grad_for_rows_lo;  // out: low halves, or undefined
  double scale, m2, m3;
  int64_t ignore_index;
};
using BackwardRowStep = std::function<void(const BackwardBlock&)>;
// Both in one step: writes the forward block's loss and lse, then the backward block's factors from that
// lse (the two blocks share dots, codes and lse; the backward block's grad_loss is each row's constant
// weight in the reduced loss).
using ForwardGradRowStep = std::function<void(const ForwardBlock&, const BackwardBlock&)>;

// The chain rule through v / ||v|| for the gradient grad_unit of the unit vectors, in place along the last
// dimension: grad = (grad_unit - unit * (unit . grad_unit)) / ||v||, norm being ||v|| clamped to kNormEps
// with a trailing dimension of 1. The dot is taken of the computed gradient itself, so that its rounding
// cancels in the difference. Below eps the divisor is the constant eps and nothing is removed (the
// gradient of F.normalize there). remove_normal_component does it with ATen operations on any device; a
// device may pass its own fused loop to the driver (the CPU does: one pass instead of five).
using NormalStep = std::function<void(at::Tensor& grad_unit, const at::Tensor& v, const at::Tensor& norm)>;
void remove_normal_component(at::Tensor& grad_unit, const at::Tensor& v, const at::Tensor& norm);

// block_elements bounds the dot products of one block (the backward keeps about four such tensors).
std::tuple<at::Tensor, at::Tensor> gemm_code_ce_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
    const c10::optional<at::Tensor>& position_weight, double scale, double m2, double m3,
    bool normalize, int64_t ignore_index, int64_t block_elements, const ForwardRowStep& row_step);

std::tuple<at::Tensor, at::Tensor> gemm_code_ce_backward(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& codes, const c10::optional<at::Tensor>& position_weight,
    const at::Tensor& lse, double scale, double m2, double m3, bool normalize,
    int64_t ignore_index, int64_t block_elements, const BackwardRowStep& row_step,
    const NormalStep& normal_step = remove_normal_component);

// The reduced loss ("sum", or "mean" = sum / B) and its gradients in x and weight from one sweep, each
// gradient computed only where output_mask asks for it (else an empty tensor). Returns (loss: 0-dim in
// the accumulation dtype, grad_x, grad_weight).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gemm_code_ce_forward_grad(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
    const c10::optional<at::Tensor>& position_weight, double scale, double m2, double m3,
    bool normalize, int64_t ignore_index, bool mean, std::array<bool, 2> output_mask,
    int64_t block_elements, const ForwardGradRowStep& row_step,
    const NormalStep& normal_step = remove_normal_component);

// Sum of the (B, L) loss rows, divided by B for "mean" (NaN for B = 0, as F.cross_entropy).
at::Tensor reduce_rows(const at::Tensor& loss, bool mean);

// Accumulation dtype of fused_code_ce: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// position_weight as a contiguous (L,) tensor in the accumulation dtype acc; all ones when absent.
at::Tensor position_weight_or_ones(const c10::optional<at::Tensor>& position_weight,
                                   const at::Tensor& weight, at::ScalarType acc);

// grad_loss and lse of the backward must have codes' shape (B, L).
void check_backward_rows(const at::Tensor& grad_loss, const at::Tensor& lse, const at::Tensor& codes);

}  // namespace gif
