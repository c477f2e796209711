// The GEMM driver of fused_code_ce shared by the CPU and CUDA kernels (see code_ce_gemm.h).
#include "code_ce_gemm.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

namespace gif {
namespace {

// The inputs as GEMM operands: the inputs' own dtype when it is 16-bit, else the accumulation dtype.
struct Operands {
  at::Tensor feats;            // (B, Lx, D), Lx = 1 for shared features
  at::Tensor rows;             // (L, V, D)
  at::Tensor feat_norm;        // (B, Lx) clamped norms in the accumulation dtype; undefined without normalize
  at::Tensor row_norm;         // (L, V)
  at::Tensor position_weight;  // (L,) in the accumulation dtype
  at::ScalarType acc;
};

at::Tensor clamped_norm(const at::Tensor& t, at::ScalarType acc) {
  return at::linalg_vector_norm(t, 2, {-1}, /*keepdim=*/false, acc).clamp_min(kNormEps);
}

std::optional<c10::OperatorHandle> find_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchema({name, overload});
}

// PyTorch's GEMM of 16-bit operands with float32 output (aten::mm.dtype, or bmm.dtype for 3-D) where the
// device has one (CUDA), else nullopt.
std::optional<c10::OperatorHandle> float32_output_gemm(const at::Tensor& like, int64_t dim) {
  static const auto mm_dtype = find_op("aten::mm", "dtype"), bmm_dtype = find_op("aten::bmm", "dtype");
  const auto& op = dim == 2 ? mm_dtype : bmm_dtype;
  const auto key = c10::computeDispatchKey(c10::nullopt, like.layout(), like.device());
  return op.has_value() && op->hasKernelForDispatchKey(key) ? op : std::nullopt;
}

Operands operands(const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& position_weight, bool normalize) {
  Operands o;
  o.acc = accumulation_type(x);
  // 16-bit operands where the device multiplies them with float32 output; elsewhere (CPU) float32 copies,
  // made once here rather than per product.
  const bool half = (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) &&
                    float32_output_gemm(x, 2).has_value() && float32_output_gemm(x, 3).has_value();
  const auto operand = half ? x.scalar_type() : o.acc;
  o.feats = (x.dim() == 2 ? x.unsqueeze(1) : x).to(operand);
  o.rows = weight.to(operand);
  if (normalize) {
    o.feat_norm = clamped_norm(o.feats, o.acc);
    o.row_norm = clamped_norm(o.rows, o.acc);
  }
  o.position_weight = position_weight_or_ones(position_weight, weight, o.acc);
  return o;
}

// a @ b (2-D, or batched 3-D) with output in the accumulation dtype; 16-bit operands only where
// float32_output_gemm has a kernel (operands() made float32 copies elsewhere).
at::Tensor matmul_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return a.dim() == 2 ? at::mm(a, b) : at::bmm(a, b);
  const auto op = float32_output_gemm(a, a.dim());
  TORCH_INTERNAL_ASSERT(op.has_value(), "no GEMM of ", a.scalar_type(), " operands with ", acc, " output on ",
                        a.device());
  return op->typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>().call(a, b, acc);
}

// Gradient factors as GEMM operands: one tensor, or high and low halves (see BackwardBlock).
using Parts = std::vector<at::Tensor>;

Parts factor_parts(const at::Tensor& factors, const at::Tensor& low_halves) {
  return low_halves.defined() ? Parts{factors, low_halves} : Parts{factors};
}

Parts map_parts(const Parts& parts, const std::function<at::Tensor(const at::Tensor&)>& view) {
  Parts out;
  for (const at::Tensor& part : parts) out.push_back(view(part));
  return out;
}

// out (+)= sum over the parts of part @ b (2-D, or batched 3-D); out is in the accumulation dtype.
// Operands in that dtype go straight into out (mm_out, addmm_, ...): no product tensor, no extra pass.
void matmul_parts_into(at::Tensor& out, const Parts& parts, const at::Tensor& b, bool accumulate) {
  for (size_t i = 0; i < parts.size(); ++i) {
    const bool add = accumulate || i > 0;
    if (parts[i].scalar_type() == out.scalar_type() && b.scalar_type() == out.scalar_type()) {
      if (parts[i].dim() == 2) {
        add ? out.addmm_(parts[i], b) : at::mm_out(out, parts[i], b);
      } else {
        add ? out.baddbmm_(parts[i], b) : at::bmm_out(out, parts[i], b);
      }
    } else {
      const at::Tensor product = matmul_acc(parts[i], b, out.scalar_type());
      add ? out.add_(product) : out.copy_(product);
    }
  }
}

// Dot products of samples [b0, b1) with every weight row as (nb, L, V); strided for per-position features.
at::Tensor block_dots(const Operands& o, int64_t b0, int64_t b1) {
  const int64_t L = o.rows.size(0), V = o.rows.size(1), D = o.rows.size(2);
  const at::Tensor feats = o.feats.slice(0, b0, b1);
  if (feats.size(1) == 1) {
    return matmul_acc(feats.squeeze(1), o.rows.reshape({L * V, D}).t(), o.acc).view({b1 - b0, L, V});
  }
  return matmul_acc(feats.transpose(0, 1), o.rows.transpose(1, 2), o.acc).transpose(0, 1);
}

int64_t block_rows(int64_t L, int64_t V, int64_t block_elements) {
  return std::max<int64_t>(1, block_elements / (L * V));
}

at::Tensor slice_or_undefined(const at::Tensor& t, int64_t b0, int64_t b1) {
  return t.defined() ? t.slice(0, b0, b1) : t;
}

// The factor tensors of a block of nb samples (see BackwardBlock), for the row step to fill.
BackwardBlock backward_block(const Operands& o, const at::Tensor& codes, const at::Tensor& grad_loss,
                             const at::Tensor& lse, int64_t b0, int64_t b1, double scale, double m2, double m3,
                             int64_t ignore_index) {
  const int64_t nb = b1 - b0, L = o.rows.size(0), V = o.rows.size(1);
  const bool halves = o.rows.scalar_type() != o.acc;
  const auto acc_options = o.position_weight.options();
  const auto factor_options = acc_options.dtype(o.rows.scalar_type());
  return {block_dots(o, b0, b1), slice_or_undefined(o.feat_norm, b0, b1), o.row_norm, codes.slice(0, b0, b1),
          o.position_weight, grad_loss.slice(0, b0, b1), lse.slice(0, b0, b1),
          at::empty({nb, L, V}, factor_options), at::empty({nb, L, V}, factor_options),
          halves ? at::empty({nb, L, V}, factor_options) : at::Tensor(),
          halves ? at::empty({nb, L, V}, factor_options) : at::Tensor(), scale, m2, m3, ignore_index};
}

// The gradients being summed block by block: grad_feats (B, Lx, D) and grad_rows (L, V, D), in the
// accumulation dtype, each undefined where it is not wanted.
struct Gradients {
  at::Tensor feats, rows;
};

Gradients empty_gradients(const Operands& o, std::array<bool, 2> output_mask) {
  const auto options = o.position_weight.options();
  const int64_t D = o.rows.size(2);
  // The first block writes grad_rows, the others add to it (zeros only when there is no block).
  Gradients grads;
  if (output_mask[0]) grads.feats = at::empty({o.feats.size(0), o.feats.size(1), D}, options);
  if (output_mask[1]) {
    grads.rows = o.feats.size(0) > 0 ? at::empty(o.rows.sizes(), options) : at::zeros(o.rows.sizes(), options);
  }
  return grads;
}

// The block's two gradient products from its factors: grad_feats of samples [b0, b1) (written) and
// grad_rows (sum_b grad_for_rows_bv * feat_b: written by the first block, added to by the others); then
// the chain rule of the features' normalization for the block.
void add_block_gradients(const Operands& o, int64_t b0, const BackwardBlock& blk, Gradients& grads,
                         const NormalStep& normal_step) {
  const int64_t nb = blk.dots.size(0), L = o.rows.size(0), V = o.rows.size(1), D = o.rows.size(2);
  const int64_t b1 = b0 + nb;
  const bool shared = o.feats.size(1) == 1;
  const Parts for_feats = factor_parts(blk.grad_for_feats, blk.grad_for_feats_lo);
  const Parts for_rows = factor_parts(blk.grad_for_rows, blk.grad_for_rows_lo);
  const at::Tensor feats = o.feats.slice(0, b0, b1);
  if (grads.feats.defined()) {
    at::Tensor grad_block = grads.feats.slice(0, b0, b1);
    if (shared) {
      at::Tensor grad_block_2d = grad_block.view({nb, D});
      const auto flat = [&](const at::Tensor& t) { return t.view({nb, L * V}); };
      matmul_parts_into(grad_block_2d, map_parts(for_feats, flat), o.rows.reshape({L * V, D}), false);
    } else {
      at::Tensor grad_block_by_position = at::empty({L, nb, D}, grad_block.options());
      const auto by_position = [](const at::Tensor& t) { return t.transpose(0, 1); };
      matmul_parts_into(grad_block_by_position, map_parts(for_feats, by_position), o.rows, false);
      grad_block.copy_(grad_block_by_position.transpose(0, 1));
    }
    if (blk.feat_norm.defined()) normal_step(grad_block, feats.to(o.acc), blk.feat_norm.unsqueeze(-1));
  }
  if (grads.rows.defined()) {
    if (shared) {
      at::Tensor grad_rows_2d = grads.rows.view({L * V, D});
      const auto flat_t = [&](const at::Tensor& t) { return t.view({nb, L * V}).t(); };
      matmul_parts_into(grad_rows_2d, map_parts(for_rows, flat_t), feats.squeeze(1), b0 > 0);
    } else {
      const auto by_position_t = [](const at::Tensor& t) { return t.permute({1, 2, 0}); };
      matmul_parts_into(grads.rows, map_parts(for_rows, by_position_t), feats.transpose(0, 1), b0 > 0);
    }
  }
}

// The summed gradients as the op returns them: the rows' normalization chain rule applied, in the
// inputs' dtypes and shapes; a gradient not wanted is an empty tensor.
std::tuple<at::Tensor, at::Tensor> finish_gradients(const Operands& o, Gradients& grads, const at::Tensor& x,
                                                    const at::Tensor& weight, const NormalStep& normal_step) {
  if (grads.rows.defined() && o.row_norm.defined()) {
    normal_step(grads.rows, o.rows.to(o.acc), o.row_norm.unsqueeze(-1));
  }
  const at::Tensor grad_x = grads.feats.defined()
      ? (x.dim() == 2 ? grads.feats.squeeze(1) : grads.feats).to(x.scalar_type())
      : at::empty({0}, x.options());
  const at::Tensor grad_weight = grads.rows.defined() ? grads.rows.to(weight.scalar_type())
                                                      : at::empty({0}, weight.options());
  return {grad_x, grad_weight};
}

}  // namespace

void remove_normal_component(at::Tensor& grad_unit, const at::Tensor& v, const at::Tensor& norm) {
  const at::Tensor coefficient = at::linalg_vecdot(grad_unit, v).unsqueeze(-1) / (norm * norm);
  grad_unit.addcmul_(v, at::where(norm > kNormEps, coefficient, at::zeros({}, coefficient.options())), -1)
      .div_(norm);
}

at::Tensor position_weight_or_ones(const c10::optional<at::Tensor>& position_weight,
                                   const at::Tensor& weight, at::ScalarType acc) {
  return position_weight.has_value() ? position_weight->to(acc).contiguous()
                                     : at::ones({weight.size(0)}, weight.options().dtype(acc));
}

void check_backward_rows(const at::Tensor& grad_loss, const at::Tensor& lse, const at::Tensor& codes) {
  TORCH_CHECK_VALUE(grad_loss.sizes() == codes.sizes(), "grad_loss: expected shape ", codes.sizes(),
                    ", got ", grad_loss.sizes());
  TORCH_CHECK_VALUE(lse.sizes() == codes.sizes(), "lse: expected shape ", codes.sizes(), ", got ",
                    lse.sizes());
  TORCH_CHECK_VALUE(grad_loss.device() == codes.device() && lse.device() == codes.device(),
                    "grad_loss and lse: expected device ", codes.device(), ", got ",
                    grad_loss.device(), " and ", lse.device());
}

std::tuple<at::Tensor, at::Tensor> gemm_code_ce_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
    const c10::optional<at::Tensor>& position_weight, double scale, double m2, double m3,
    bool normalize, int64_t ignore_index, int64_t block_elements, const ForwardRowStep& row_step) {
  const int64_t B = x.size(0), L = weight.size(0), V = weight.size(1);
  const Operands o = operands(x, weight, position_weight, normalize);
  const at::Tensor codes64 = codes.to(at::kLong).contiguous();
  at::Tensor loss = at::empty({B, L}, o.position_weight.options());
  at::Tensor lse = at::empty({B, L}, o.position_weight.options());
  const int64_t rows_per_block = block_rows(L, V, block_elements);
  for (int64_t b0 = 0; b0 < B; b0 += rows_per_block) {
    const int64_t b1 = std::min(B, b0 + rows_per_block);
    row_step({block_dots(o, b0, b1), slice_or_undefined(o.feat_norm, b0, b1), o.row_norm,
              codes64.slice(0, b0, b1), o.position_weight, loss.slice(0, b0, b1), lse.slice(0, b0, b1),
              scale, m2, m3, ignore_index});
  }
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> gemm_code_ce_backward(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& codes, const c10::optional<at::Tensor>& position_weight,
    const at::Tensor& lse, double scale, double m2, double m3, bool normalize,
    int64_t ignore_index, int64_t block_elements, const BackwardRowStep& row_step,
    const NormalStep& normal_step) {
  const int64_t B = x.size(0), L = weight.size(0), V = weight.size(1);
  const Operands o = operands(x, weight, position_weight, normalize);
  const at::Tensor codes64 = codes.to(at::kLong).contiguous();
  const at::Tensor grad_rows = grad_loss.to(o.acc).contiguous();
  const at::Tensor saved_lse = lse.to(o.acc).contiguous();
  Gradients grads = empty_gradients(o, {true, true});
  const int64_t rows_per_block = block_rows(L, V, block_elements);
  for (int64_t b0 = 0; b0 < B; b0 += rows_per_block) {
    const int64_t b1 = std::min(B, b0 + rows_per_block);
    const BackwardBlock blk = backward_block(o, codes64, grad_rows, saved_lse, b0, b1, scale, m2, m3, ignore_index);
    row_step(blk);
    add_block_gradients(o, b0, blk, grads, normal_step);
  }
  return finish_gradients(o, grads, x, weight, normal_step);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gemm_code_ce_forward_grad(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
    const c10::optional<at::Tensor>& position_weight, double scale, double m2, double m3,
    bool normalize, int64_t ignore_index, bool mean, std::array<bool, 2> output_mask,
    int64_t block_elements, const ForwardGradRowStep& row_step, const NormalStep& normal_step) {
  const int64_t B = x.size(0), L = weight.size(0), V = weight.size(1);
  const Operands o = operands(x, weight, position_weight, normalize);
  const at::Tensor codes64 = codes.to(at::kLong).contiguous();
  const auto acc_options = o.position_weight.options();
  at::Tensor loss = at::empty({B, L}, acc_options);
  at::Tensor lse = at::empty({B, L}, acc_options);
  // Each row's weight in the reduced loss: the incoming gradient of every row.
  const at::Tensor row_grad = at::full({B, L}, mean && B > 0 ? 1.0 / double(B) : 1.0, acc_options);
  Gradients grads = empty_gradients(o, output_mask);
  const int64_t rows_per_block = block_rows(L, V, block_elements);
  for (int64_t b0 = 0; b0 < B; b0 += rows_per_block) {
    const int64_t b1 = std::min(B, b0 + rows_per_block);
    const BackwardBlock blk = backward_block(o, codes64, row_grad, lse, b0, b1, scale, m2, m3, ignore_index);
    row_step({blk.dots, blk.feat_norm, blk.row_norm, blk.codes, blk.position_weight, loss.slice(0, b0, b1),
              blk.lse, scale, m2, m3, ignore_index},
             blk);
    add_block_gradients(o, b0, blk, grads, normal_step);
  }
  const auto [grad_x, grad_weight] = finish_gradients(o, grads, x, weight, normal_step);
  return {reduce_rows(loss, mean), grad_x, grad_weight};
}

at::Tensor reduce_rows(const at::Tensor& loss, bool mean) {
  // "mean" of an empty batch is 0 / 0 = NaN, as F.cross_entropy's.
  return mean ? loss.sum() / double(loss.size(0)) : loss.sum();
}

}  // namespace gif
