// fused_code_ce on the CPU. Cosines of a block of samples come from one GEMM against the normalized
// weights (MKL / oneDNN through ATen); margin, logsumexp and the gradient factors are fused per row
// (OpenMP over rows); gradients are two more GEMMs per block. Blocks bound the temporary memory, so
// no (B, L, V) tensor exists at once or is kept for backward.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../code_ce.h"

namespace gif {
namespace {

constexpr int64_t kBlockElements = int64_t(1) << 22;  // cosines per block (16 MB in float32)
constexpr int64_t kRowsPerTask = 16;                  // rows of a block per parallel task

// Inputs in the accumulation dtype, normalized when asked, as (B, Lx, D) with Lx = 1 for shared x.
struct Prepared {
  at::Tensor feats;        // (B, Lx, D) unit rows (or raw with normalize=false)
  at::Tensor rows;         // (L, V, D) unit rows (or raw)
  at::Tensor inv_feat_norm;  // (B, Lx), undefined without normalize
  at::Tensor inv_row_norm;   // (L, V), undefined without normalize
  at::Tensor position_weight;  // (L,) in the accumulation dtype
};

at::ScalarType accumulation_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

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

int64_t block_rows(int64_t L, int64_t V) { return std::max<int64_t>(1, kBlockElements / (L * V)); }

// One row's logits on the fly: scale * c_v, and scale * (phi(c_t) - m3) at the target.
template <typename T>
struct RowLogits {
  T scale, m2, m3, cos_m, sin_m;

  T target_logit(T c, T* dphi) const { return scale * (arcface_phi(c, cos_m, sin_m, m2, dphi) - m3); }

  // logsumexp over V cosines at stride `step`, with the target logit substituted at t (if valid).
  T logsumexp(const T* cos, int64_t step, int64_t V, int64_t t, T logit_t) const {
    T top = -std::numeric_limits<T>::infinity();
    for (int64_t v = 0; v < V; ++v) top = std::max(top, v == t ? logit_t : scale * cos[v * step]);
    T sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp((v == t ? logit_t : scale * cos[v * step]) - top);
    return top + std::log(sum);
  }
};

template <typename T>
RowLogits<T> row_logits(double scale, double m2, double m3) {
  return {T(scale), T(m2), T(m3), T(std::cos(m2)), T(std::sin(m2))};
}

std::tuple<at::Tensor, at::Tensor> code_ce_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
    const c10::optional<at::Tensor>& position_weight, double scale, double m2, double m3,
    bool normalize, int64_t ignore_index) {
  check_code_ce_inputs(x, weight, codes, position_weight, scale, m2, m3, normalize);
  const int64_t B = x.size(0), L = weight.size(0), V = weight.size(1);
  check_code_values(codes, V, ignore_index);
  const Prepared p = prepare(x, weight, position_weight, normalize);
  const at::Tensor codes64 = codes.to(at::kLong).contiguous();
  at::Tensor loss = at::empty({B, L}, p.rows.options());
  at::Tensor lse = at::empty({B, L}, p.rows.options());

  AT_DISPATCH_FLOATING_TYPES(p.rows.scalar_type(), "code_ce_forward_cpu", [&] {
    const RowLogits<scalar_t> logits = row_logits<scalar_t>(scale, m2, m3);
    const scalar_t* lambda = p.position_weight.data_ptr<scalar_t>();
    const int64_t* code = codes64.data_ptr<int64_t>();
    scalar_t* loss_out = loss.data_ptr<scalar_t>();
    scalar_t* lse_out = lse.data_ptr<scalar_t>();
    const int64_t rows_per_block = block_rows(L, V);
    for (int64_t b0 = 0; b0 < B; b0 += rows_per_block) {
      const int64_t b1 = std::min(B, b0 + rows_per_block);
      const at::Tensor cos = block_cosines(p, b0, b1);
      const scalar_t* cos_data = cos.data_ptr<scalar_t>();
      const int64_t sb = cos.stride(0), sj = cos.stride(1), sv = cos.stride(2);
      at::parallel_for(0, (b1 - b0) * L, kRowsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / L, j = r % L, row = (b0 + b) * L + j;
          const scalar_t* c = cos_data + b * sb + j * sj;
          const int64_t t = code[row];
          const bool ignored = t == ignore_index;
          scalar_t dphi;
          const scalar_t logit_t = ignored ? scalar_t(0) : logits.target_logit(c[t * sv], &dphi);
          const scalar_t row_lse = logits.logsumexp(c, sv, V, ignored ? -1 : t, logit_t);
          lse_out[row] = row_lse;
          loss_out[row] = ignored ? scalar_t(0) : lambda[j] * (row_lse - logit_t);
        }
      });
    }
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> code_ce_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& codes, const c10::optional<at::Tensor>& position_weight,
    const at::Tensor& lse, double scale, double m2, double m3, bool normalize,
    int64_t ignore_index) {
  check_code_ce_inputs(x, weight, codes, position_weight, scale, m2, m3, normalize);
  const int64_t B = x.size(0), L = weight.size(0), V = weight.size(1), D = weight.size(2);
  TORCH_CHECK(grad_loss.sizes() == codes.sizes(), "grad_loss: expected shape ", codes.sizes(),
              ", got ", grad_loss.sizes());
  TORCH_CHECK(lse.sizes() == codes.sizes(), "lse: expected shape ", codes.sizes(), ", got ",
              lse.sizes());
  check_code_values(codes, V, ignore_index);
  const Prepared p = prepare(x, weight, position_weight, normalize);
  const bool shared = p.feats.size(1) == 1;
  const auto acc = p.rows.scalar_type();
  const at::Tensor codes64 = codes.to(at::kLong).contiguous();
  const at::Tensor grad_rows = grad_loss.to(acc).contiguous();
  const at::Tensor saved_lse = lse.to(acc).contiguous();
  at::Tensor grad_feats = at::empty_like(p.feats);
  at::Tensor grad_rows_acc = at::zeros_like(p.rows);  // sum_b gc_bv * feat_b
  at::Tensor row_dot_cos = at::zeros({L, V}, p.rows.options());  // sum_b gc_bv * c_bv

  AT_DISPATCH_FLOATING_TYPES(acc, "code_ce_backward_cpu", [&] {
    const RowLogits<scalar_t> logits = row_logits<scalar_t>(scale, m2, m3);
    const scalar_t* lambda = p.position_weight.data_ptr<scalar_t>();
    const int64_t* code = codes64.data_ptr<int64_t>();
    const scalar_t* grad_row = grad_rows.data_ptr<scalar_t>();
    const scalar_t* lse_row = saved_lse.data_ptr<scalar_t>();
    const int64_t rows_per_block = block_rows(L, V);
    for (int64_t b0 = 0; b0 < B; b0 += rows_per_block) {
      const int64_t b1 = std::min(B, b0 + rows_per_block), nb = b1 - b0;
      const at::Tensor cos = block_cosines(p, b0, b1);
      at::Tensor gc = at::empty({nb, L, V}, cos.options());  // dLoss / dcos
      at::Tensor feat_dot = at::empty({nb, L}, cos.options());  // sum_v gc_bv * c_bv
      const scalar_t* cos_data = cos.data_ptr<scalar_t>();
      const int64_t sb = cos.stride(0), sj = cos.stride(1), sv = cos.stride(2);
      scalar_t* gc_data = gc.data_ptr<scalar_t>();
      scalar_t* feat_dot_data = feat_dot.data_ptr<scalar_t>();
      at::parallel_for(0, nb * L, kRowsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / L, j = r % L, row = (b0 + b) * L + j;
          const scalar_t* c = cos_data + b * sb + j * sj;
          scalar_t* g = gc_data + r * V;
          const int64_t t = code[row];
          if (t == ignore_index) {
            std::fill(g, g + V, scalar_t(0));
            feat_dot_data[r] = 0;
            continue;
          }
          const scalar_t weight_g = grad_row[row] * lambda[j];
          const scalar_t row_lse = lse_row[row];
          scalar_t dphi;
          const scalar_t logit_t = logits.target_logit(c[t * sv], &dphi);
          scalar_t dot = 0;
          for (int64_t v = 0; v < V; ++v) {
            const scalar_t cv = c[v * sv];
            const scalar_t logit = v == t ? logit_t : logits.scale * cv;
            const scalar_t prob = std::exp(logit - row_lse);
            g[v] = weight_g * logits.scale * (v == t ? (prob - 1) * dphi : prob);
            dot += g[v] * cv;
          }
          feat_dot_data[r] = dot;
        }
      });
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
  });
  if (normalize) {
    // Through v / ||v||: grad = (grad_unit - unit * (unit . grad_unit)) / ||v||.
    grad_feats.mul_(p.inv_feat_norm.unsqueeze(-1));
    grad_rows_acc.sub_(p.rows * row_dot_cos.unsqueeze(-1)).mul_(p.inv_row_norm.unsqueeze(-1));
  }
  at::Tensor grad_x = (x.dim() == 2 ? grad_feats.squeeze(1) : grad_feats).to(x.scalar_type());
  return {grad_x, grad_rows_acc.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(gif, CPU, m) {
  m.impl("code_ce_forward", &code_ce_forward_cpu);
  m.impl("code_ce_backward", &code_ce_backward_cpu);
}

}  // namespace gif
