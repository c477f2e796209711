// The GEMM driver of fused_code_ce shared by the CPU and CUDA kernels (see code_ce_gemm.h).
#include "code_ce_gemm.h"

#include <algorithm>

namespace gif {
namespace {

// Inputs in the accumulation dtype, normalized when asked, as (B, Lx, D) with Lx = 1 for shared x.
struct Prepared {
  at::Tensor feats;            // (B, Lx, D) unit rows (or raw with normalize=false)
  at::Tensor rows;             // (L, V, D) unit rows (or raw)
  at::Tensor inv_feat_norm;    // (B, Lx), undefined without normalize
  at::Tensor inv_row_norm;     // (L, V), undefined without normalize
  at::Tensor position_weight;  // (L,) in the accumulation dtype
};

at::Tensor clamped_norm(const at::Tensor& t) {
  return at::linalg_vector_norm(t, 2, {-1}).clamp_min(kNormEps);
}

Prepared prepare(const at::Tensor& x, const at::Tensor& weight,
                 const c10::optional<at::Tensor>& position_weight, bool normalize) {
  const auto acc = accumulation_type(x);
  Prepared p;
  p.feats = (x.dim() == 2 ? x.unsqueeze(1) : x).to(acc);
  p.rows = weight.to(acc);
  if (normalize) {
    // Divide (not multiply by the reciprocal) so that D = 1 rows come out exactly +-1.
    const at::Tensor feat_norm = clamped_norm(p.feats), row_norm = clamped_norm(p.rows);
    p.feats = p.feats / feat_norm.unsqueeze(-1);
    p.rows = p.rows / row_norm.unsqueeze(-1);
    p.inv_feat_norm = feat_norm.reciprocal();
    p.inv_row_norm = row_norm.reciprocal();
  }
  p.position_weight = position_weight.has_value()
                          ? position_weight->to(acc).contiguous()
                          : at::ones({weight.size(0)}, weight.options().dtype(acc));
  return p;
}

// Cosines of samples [b0, b1) as (nb, L, V); contiguous for shared features, strided otherwise.
at::Tensor block_cosines(const Prepared& p, int64_t b0, int64_t b1) {
  const int64_t L = p.rows.size(0), V = p.rows.size(1), D = p.rows.size(2);
  const at::Tensor feats = p.feats.slice(0, b0, b1);
  if (feats.size(1) == 1) {
    return at::mm(feats.squeeze(1), p.rows.reshape({L * V, D}).t()).view({b1 - b0, L, V});
  }
  return at::bmm(feats.transpose(0, 1), p.rows.transpose(1, 2)).transpose(0, 1);
}

int64_t block_rows(int64_t L, int64_t V, int64_t block_elements) {
  return std::max<int64_t>(1, block_elements / (L * V));
}

}  // namespace

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
  const Prepared p = prepare(x, weight, position_weight, normalize);
  const at::Tensor codes64 = codes.to(at::kLong).contiguous();
  at::Tensor loss = at::empty({B, L}, p.rows.options());
  at::Tensor lse = at::empty({B, L}, p.rows.options());
  const int64_t rows_per_block = block_rows(L, V, block_elements);
  for (int64_t b0 = 0; b0 < B; b0 += rows_per_block) {
    const int64_t b1 = std::min(B, b0 + rows_per_block);
    row_step({block_cosines(p, b0, b1), codes64.slice(0, b0, b1), p.position_weight,
              loss.slice(0, b0, b1), lse.slice(0, b0, b1), scale, m2, m3, ignore_index});
  }
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> gemm_code_ce_backward(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& codes, const c10::optional<at::Tensor>& position_weight,
    const at::Tensor& lse, double scale, double m2, double m3, bool normalize,
    int64_t ignore_index, int64_t block_elements, const BackwardRowStep& row_step) {
  const int64_t B = x.size(0), L = weight.size(0), V = weight.size(1), D = weight.size(2);
  const Prepared p = prepare(x, weight, position_weight, normalize);
  const bool shared = p.feats.size(1) == 1;
  const auto acc = p.rows.scalar_type();
  const at::Tensor codes64 = codes.to(at::kLong).contiguous();
  const at::Tensor grad_rows = grad_loss.to(acc).contiguous();
  const at::Tensor saved_lse = lse.to(acc).contiguous();
  at::Tensor grad_feats = at::empty_like(p.feats);
  at::Tensor grad_rows_acc = at::zeros_like(p.rows);             // sum_b gc_bv * feat_b
  at::Tensor row_dot_cos = at::zeros({L, V}, p.rows.options());  // sum_b gc_bv * c_bv
  const int64_t rows_per_block = block_rows(L, V, block_elements);
  for (int64_t b0 = 0; b0 < B; b0 += rows_per_block) {
    const int64_t b1 = std::min(B, b0 + rows_per_block), nb = b1 - b0;
    const at::Tensor cos = block_cosines(p, b0, b1);
    at::Tensor gc = at::empty({nb, L, V}, cos.options());
    at::Tensor feat_dot = at::empty({nb, L}, cos.options());
    row_step({cos, codes64.slice(0, b0, b1), p.position_weight, grad_rows.slice(0, b0, b1),
              saved_lse.slice(0, b0, b1), gc, feat_dot, scale, m2, m3, ignore_index});
    const at::Tensor feats = p.feats.slice(0, b0, b1);
    at::Tensor grad_block;
    if (shared) {
      grad_block = at::mm(gc.view({nb, L * V}), p.rows.reshape({L * V, D})).unsqueeze(1);
      grad_rows_acc.view({L * V, D}).addmm_(gc.view({nb, L * V}).t(), feats.squeeze(1));
      if (normalize) feat_dot = feat_dot.sum(1, /*keepdim=*/true);
    } else {
      grad_block = at::bmm(gc.transpose(0, 1), p.rows).transpose(0, 1);
      grad_rows_acc.baddbmm_(gc.permute({1, 2, 0}), feats.transpose(0, 1));
    }
    if (normalize) {
      grad_block.sub_(feats * feat_dot.unsqueeze(-1));
      row_dot_cos.add_((gc * cos).sum(0));
    }
    grad_feats.slice(0, b0, b1).copy_(grad_block);
  }
  if (normalize) {
    // Through v / ||v||: grad = (grad_unit - unit * (unit . grad_unit)) / ||v||.
    grad_feats.mul_(p.inv_feat_norm.unsqueeze(-1));
    grad_rows_acc.sub_(p.rows * row_dot_cos.unsqueeze(-1)).mul_(p.inv_row_norm.unsqueeze(-1));
  }
  at::Tensor grad_x = (x.dim() == 2 ? grad_feats.squeeze(1) : grad_feats).to(x.scalar_type());
  return {grad_x, grad_rows_acc.to(weight.scalar_type())};
}

}  // namespace gif
