// fused_code_ce on the CPU: the GEMM driver (code_ce_gemm.h, MKL / oneDNN through ATen) with the
// cosines, margin, logsumexp and gradient factors fused per row (OpenMP over rows).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../code_ce_gemm.h"

namespace gif {
namespace {

constexpr int64_t kBlockElements = int64_t(1) << 22;  // cosines per block (16 MB in float32)
constexpr int64_t kRowsPerTask = 16;                  // rows of a block per parallel task

// One row's cosines: dots at stride `step` divided by the feature's and each weight row's norm.
template <typename T>
struct RowCosines {
  const T* dots;
  int64_t step;
  T feat_norm;         // 0 without normalization
  const T* row_norm;   // (V,) of the row's position

  T operator[](int64_t v) const {
    return feat_norm > 0 ? dots[v * step] / (feat_norm * row_norm[v]) : dots[v * step];
  }
};

// The cosines of row r = b * L + j of a block.
template <typename T>
RowCosines<T> row_cosines(const at::Tensor& dots, const at::Tensor& feat_norm, const at::Tensor& row_norm,
                          int64_t r) {
  const int64_t L = dots.size(1), V = dots.size(2), b = r / L, j = r % L;
  const T* base = dots.data_ptr<T>() + b * dots.stride(0) + j * dots.stride(1);
  if (!feat_norm.defined()) return {base, dots.stride(2), T(0), nullptr};
  const int64_t jx = feat_norm.size(1) == 1 ? 0 : j;
  return {base, dots.stride(2), feat_norm.data_ptr<T>()[b * feat_norm.size(1) + jx],
          row_norm.data_ptr<T>() + j * V};
}

// logsumexp over the row's V logits, with the target logit substituted at t (if valid).
template <typename T>
T row_logsumexp(const RowParams<T>& rp, const RowCosines<T>& c, int64_t V, int64_t t, T logit_t) {
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t v = 0; v < V; ++v) top = std::max(top, v == t ? logit_t : rp.scale * c[v]);
  T sum = 0;
  for (int64_t v = 0; v < V; ++v) sum += std::exp((v == t ? logit_t : rp.scale * c[v]) - top);
  return top + std::log(sum);
}

void forward_rows(const ForwardBlock& blk) {
  const int64_t nb = blk.dots.size(0), L = blk.dots.size(1), V = blk.dots.size(2);
  AT_DISPATCH_FLOATING_TYPES(blk.dots.scalar_type(), "code_ce_forward_rows", [&] {
    const auto rp = row_params<scalar_t>(blk.scale, blk.m2, blk.m3, blk.ignore_index);
    const scalar_t* lambda = blk.position_weight.data_ptr<scalar_t>();
    const int64_t* code = blk.codes.data_ptr<int64_t>();
    scalar_t* loss_out = blk.loss.data_ptr<scalar_t>();
    scalar_t* lse_out = blk.lse.data_ptr<scalar_t>();
    at::parallel_for(0, nb * L, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const auto c = row_cosines<scalar_t>(blk.dots, blk.feat_norm, blk.row_norm, r);
        const int64_t t = code[r];
        const bool ignored = t == rp.ignore_index;
        scalar_t dphi;
        const scalar_t logit_t = ignored ? scalar_t(0) : rp.target_logit(c[t], &dphi);
        const scalar_t row_lse = row_logsumexp(rp, c, V, ignored ? -1 : t, logit_t);
        lse_out[r] = row_lse;
        loss_out[r] = ignored ? scalar_t(0) : lambda[r % L] * (row_lse - logit_t);
      }
    });
  });
}

void backward_rows(const BackwardBlock& blk) {
  const int64_t nb = blk.dots.size(0), L = blk.dots.size(1), V = blk.dots.size(2);
  AT_DISPATCH_FLOATING_TYPES(blk.dots.scalar_type(), "code_ce_backward_rows", [&] {
    const auto rp = row_params<scalar_t>(blk.scale, blk.m2, blk.m3, blk.ignore_index);
    const scalar_t* lambda = blk.position_weight.data_ptr<scalar_t>();
    const int64_t* code = blk.codes.data_ptr<int64_t>();
    const scalar_t* grad_row = blk.grad_loss.data_ptr<scalar_t>();
    const scalar_t* lse_row = blk.lse.data_ptr<scalar_t>();
    scalar_t* for_feats = blk.grad_for_feats.data_ptr<scalar_t>();
    scalar_t* for_rows = blk.grad_for_rows.data_ptr<scalar_t>();
    scalar_t* cos_dot = blk.cos_dot.data_ptr<scalar_t>();
    at::parallel_for(0, nb * L, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const auto c = row_cosines<scalar_t>(blk.dots, blk.feat_norm, blk.row_norm, r);
        scalar_t* gf = for_feats + r * V;
        scalar_t* gr = for_rows + r * V;
        const int64_t t = code[r];
        if (t == rp.ignore_index) {
          std::fill(gf, gf + V, scalar_t(0));
          std::fill(gr, gr + V, scalar_t(0));
          cos_dot[r] = 0;
          continue;
        }
        const scalar_t weight_g = grad_row[r] * lambda[r % L];
        scalar_t dphi;
        const scalar_t logit_t = rp.target_logit(c[t], &dphi);
        scalar_t dot = 0;
        for (int64_t v = 0; v < V; ++v) {
          const scalar_t cv = c[v];
          const scalar_t prob = std::exp((v == t ? logit_t : rp.scale * cv) - lse_row[r]);
          const scalar_t g = weight_g * rp.scale * (v == t ? (prob - 1) * dphi : prob);
          gf[v] = c.feat_norm > 0 ? g / c.row_norm[v] : g;
          gr[v] = c.feat_norm > 0 ? g / c.feat_norm : g;
          dot += g * cv;
        }
        cos_dot[r] = dot;
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> code_ce_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& codes,
    const c10::optional<at::Tensor>& position_weight, double scale, double m2, double m3,
    bool normalize, int64_t ignore_index) {
  check_code_ce_inputs(x, weight, codes, position_weight, scale, m2, m3, normalize);
  check_code_values(codes, weight.size(1), ignore_index);
  return gemm_code_ce_forward(x, weight, codes, position_weight, scale, m2, m3, normalize,
                              ignore_index, kBlockElements, forward_rows);
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
                               normalize, ignore_index, kBlockElements, backward_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(gif, CPU, m) {
  m.impl("code_ce_forward", &code_ce_forward_cpu);
  m.impl("code_ce_backward", &code_ce_backward_cpu);
}

}  // namespace gif
