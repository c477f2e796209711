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

}  // namespace

TORCH_LIBRARY_IMPL(gif, CUDA, m) {
  m.impl("code_ce_forward", &code_ce_forward_cuda);
  m.impl("code_ce_backward", &code_ce_backward_cuda);
}

}  // namespace gif
