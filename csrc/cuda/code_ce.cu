// fused_code_ce on CUDA: the small-V kernels (code_ce_small_v.cu) where a shape fits them, else the
// GEMM driver of code_ce_gemm.h with the row kernels of code_ce_gemm_rows.cu.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "code_ce.cuh"

namespace gif {
namespace {

constexpr int64_t kGemmBlockElements = int64_t(1) << 26;  // GEMM path: cosines per block (256 MB fp32)

// position_weight in the accumulation dtype, or undefined (the kernels then take all ones).
at::Tensor position_weight_or_undefined(const c10::optional<at::Tensor>& position_weight,
                                        at::ScalarType acc) {
  return position_weight.has_value() ? position_weight->to(acc).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> code_ce_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
    const c10::optional<at::Tensor>& position_weight, double scale, double m2, double m3,
    bool normalize, int64_t ignore_index) {
  check_code_ce_inputs(x, weight, codes, position_weight, scale, m2, m3, normalize);
  const c10::cuda::CUDAGuard guard(x.device());
  if (small_v_fits(x, weight)) {
    return small_v_forward(x, weight, codes.to(at::kLong).contiguous(),
                           position_weight_or_undefined(position_weight, accumulation_type(x)), scale, m2, m3,
                           normalize, ignore_index);
  }
  return gemm_code_ce_forward(x, weight, codes, position_weight, scale, m2, m3, normalize, ignore_index,
                              kGemmBlockElements, forward_rows_cuda);
}

std::tuple<at::Tensor, at::Tensor> code_ce_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& codes, const c10::optional<at::Tensor>& position_weight,
    const at::Tensor& lse, double scale, double m2, double m3, bool normalize,
    int64_t ignore_index) {
  check_code_ce_inputs(x, weight, codes, position_weight, scale, m2, m3, normalize);
  check_backward_rows(grad_loss, lse, codes);
  const c10::cuda::CUDAGuard guard(x.device());
  if (small_v_fits(x, weight)) {
    const auto acc = accumulation_type(x);
    return small_v_backward(grad_loss.to(acc).contiguous(), x, weight, codes.to(at::kLong).contiguous(),
                            position_weight_or_undefined(position_weight, acc), lse.to(acc).contiguous(),
                            scale, m2, m3, normalize, ignore_index);
  }
  return gemm_code_ce_backward(grad_loss, x, weight, codes, position_weight, lse, scale, m2, m3,
                               normalize, ignore_index, kGemmBlockElements, backward_rows_cuda);
}

// Gradients in the forward. The small-V path runs its forward and backward kernels back to back, the
// backward's incoming gradient being each row's constant weight in the reduced loss.
std::tuple<at::Tensor, at::Tensor, at::Tensor> code_ce_forward_grad_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
    const c10::optional<at::Tensor>& position_weight, double scale, double m2, double m3,
    bool normalize, int64_t ignore_index, c10::string_view reduction, std::array<bool, 2> output_mask) {
  check_code_ce_inputs(x, weight, codes, position_weight, scale, m2, m3, normalize);
  const bool mean = reduction_is_mean(reduction);
  const c10::cuda::CUDAGuard guard(x.device());
  if (small_v_fits(x, weight)) {
    const auto acc = accumulation_type(x);
    const at::Tensor codes64 = codes.to(at::kLong).contiguous();
    const at::Tensor pw = position_weight_or_undefined(position_weight, acc);
    const auto [loss, lse] = small_v_forward(x, weight, codes64, pw, scale, m2, m3, normalize, ignore_index);
    const int64_t B = x.size(0);
    const at::Tensor row_grad = at::full(codes.sizes(), mean && B > 0 ? 1.0 / double(B) : 1.0, loss.options());
    auto [grad_x, grad_weight] = small_v_backward(row_grad, x, weight, codes64, pw, lse, scale, m2, m3, normalize,
                                                  ignore_index);
    return {reduce_rows(loss, mean), output_mask[0] ? grad_x : at::empty({0}, x.options()),
            output_mask[1] ? grad_weight : at::empty({0}, weight.options())};
  }
  return gemm_code_ce_forward_grad(
      x, weight, codes, position_weight, scale, m2, m3, normalize, ignore_index, mean, output_mask,
      kGemmBlockElements, [](const ForwardBlock& fwd, const BackwardBlock& bwd) {
        forward_rows_cuda(fwd);
        backward_rows_cuda(bwd);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(gif, CUDA, m) {
  m.impl("code_ce_forward", &code_ce_forward_cuda);
  m.impl("code_ce_backward", &code_ce_backward_cuda);
  m.impl("code_ce_forward_grad", &code_ce_forward_grad_cuda);
}

}  // namespace gif
