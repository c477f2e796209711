// fused_code_ce on the CPU: the GEMM driver (code_ce_gemm.h, MKL / oneDNN through ATen) with the
// cosines, margin, logsumexp and gradient factors fused per row (code_ce_rows.h, OpenMP over rows).
#include <torch/library.h>

#include "code_ce_rows.h"

namespace gif {
namespace {

constexpr int64_t kBlockElements = int64_t(1) << 22;  // cosines per block (16 MB in float32)

std::tuple<at::Tensor, at::Tensor> code_ce_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
    const c10::optional<at::Tensor>& position_weight, double scale, double m2, double m3,
    bool normalize, int64_t ignore_index) {
  check_code_ce_inputs(x, weight, codes, position_weight, scale, m2, m3, normalize);
  check_code_values(codes, weight.size(1), ignore_index);
  return gemm_code_ce_forward(x, weight, codes, position_weight, scale, m2, m3, normalize,
                              ignore_index, kBlockElements, cpu_row_steps().forward);
}

std::tuple<at::Tensor, at::Tensor> code_ce_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& codes, const c10::optional<at::Tensor>& position_weight,
    const at::Tensor& lse, double scale, double m2, double m3, bool normalize,
    int64_t ignore_index) {
  check_code_ce_inputs(x, weight, codes, position_weight, scale, m2, m3, normalize);
  check_backward_rows(grad_loss, lse, codes);
  check_code_values(codes, weight.size(1), ignore_index);
  return gemm_code_ce_backward(grad_loss, x, weight, codes, position_weight, lse, scale, m2, m3,
                               normalize, ignore_index, kBlockElements, cpu_row_steps().backward,
                               cpu_row_steps().normal_component);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> code_ce_forward_grad_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
    const c10::optional<at::Tensor>& position_weight, double scale, double m2, double m3,
    bool normalize, int64_t ignore_index, c10::string_view reduction, std::array<bool, 2> output_mask) {
  check_code_ce_inputs(x, weight, codes, position_weight, scale, m2, m3, normalize);
  const bool mean = reduction_is_mean(reduction);
  check_code_values(codes, weight.size(1), ignore_index);
  return gemm_code_ce_forward_grad(x, weight, codes, position_weight, scale, m2, m3, normalize, ignore_index,
                                   mean, output_mask, kBlockElements, cpu_row_steps().forward_grad,
                                   cpu_row_steps().normal_component);
}

}  // namespace

TORCH_LIBRARY_IMPL(gif, CPU, m) {
  m.impl("code_ce_forward", &code_ce_forward_cpu);
  m.impl("code_ce_backward", &code_ce_backward_cpu);
  m.impl("code_ce_forward_grad", &code_ce_forward_grad_cpu);
}

}  // namespace gif
