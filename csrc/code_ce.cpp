// Input checks of fused_code_ce shared by the C++ kernels of every device.
#include "code_ce.h"

#include <cmath>

namespace gif {

void check_code_ce_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
                          const c10::optional<at::Tensor>& position_weight, double scale, double m2,
                          double m3, bool normalize) {
  TORCH_CHECK_VALUE(weight.dim() == 3, "weight: expected shape (L, V, D), got ", weight.sizes());
  const int64_t L = weight.size(0), V = weight.size(1), D = weight.size(2);
  TORCH_CHECK_VALUE(L >= 1 && V >= 1 && D >= 1, "weight: expected L, V, D >= 1, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "x: expected shape (B, D) or (B, L, D), got ",
                    x.sizes());
  const int64_t B = x.size(0);
  TORCH_CHECK_VALUE(x.size(-1) == D, "x: feature size ", x.size(-1), " does not match weight's D = ", D);
  TORCH_CHECK_VALUE(x.dim() == 2 || x.size(1) == L, "x: expected (B, L, D) with L = ", L, ", got ",
                    x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                       dtype == at::kDouble,
                   "x: expected float32, bfloat16, float16 or float64, got ", dtype);
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight: dtype ", weight.scalar_type(),
                   " does not match x's dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 2 && codes.size(0) == B && codes.size(1) == L,
                    "codes: expected shape (B, L) = (", B, ", ", L, "), got ", codes.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(codes.scalar_type()) && !at::isComplexType(codes.scalar_type()) &&
                       codes.scalar_type() != at::kBool,
                   "codes: expected an integer dtype, got ", codes.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device() && codes.device() == x.device(),
                    "x, weight and codes must be on one device, got ", x.device(), ", ",
                    weight.device(), ", ", codes.device());
  if (position_weight.has_value()) {
    const at::Tensor& pw = *position_weight;
    TORCH_CHECK_VALUE(pw.dim() == 1 && pw.size(0) == L, "position_weight: expected shape (L,) = (", L,
                      ",), got ", pw.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(pw.scalar_type()), "position_weight: expected a float dtype, got ",
                     pw.scalar_type());
    TORCH_CHECK_VALUE(pw.device() == x.device(), "position_weight: expected device ", x.device(),
                      ", got ", pw.device());
  }
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, "scale: expected a finite number > 0, got ", scale);
  TORCH_CHECK_VALUE(std::isfinite(m2) && m2 >= 0.0 && m2 <= M_PI, "m2: expected a finite angle in [0, pi], got ", m2);
  TORCH_CHECK_VALUE(std::isfinite(m3), "m3: expected a finite number, got ", m3);
  TORCH_CHECK_VALUE(normalize || m2 == 0.0, "m2: must be 0 when normalize=False (an angular margin needs cosines), got ", m2);
}

bool reduction_is_mean(c10::string_view reduction) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum", "reduction: expected 'mean' or 'sum' with ",
                    "gradients in the forward, got '", reduction, "'");
  return reduction == "mean";
}

void check_code_values(const at::Tensor& codes, int64_t num_tokens, int64_t ignore_index) {
  TORCH_INTERNAL_ASSERT(codes.device().is_cpu(), "check_code_values reads codes on the host");
  // One pass on the host: the batch's few codes cost less than the tensor operations' dispatch.
  const at::Tensor values = codes.to(at::kLong).contiguous();
  const int64_t* code = values.data_ptr<int64_t>();
  const int64_t L = values.size(1);  // (B, L), as check_code_ce_inputs checked
  for (int64_t i = 0; i < values.numel(); ++i) {
    const int64_t c = code[i];
    TORCH_CHECK_VALUE((c >= 0 && c < num_tokens) || c == ignore_index, "codes: values must be in [0, V) = [0, ",
                      num_tokens, ") or equal ignore_index (", ignore_index, "); found ", c, " at [", i / L, ", ",
                      i % L, "]");
  }
}

}  // namespace gif
