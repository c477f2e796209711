// fused_code_ce on the CPU: the GEMM driver (code_ce_gemm.h, MKL / oneDNN through ATen) with the
// cosines, margin, logsumexp and gradient factors fused per row (OpenMP over rows).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../code_ce_gemm.h"

namespace gif {
namespace {

constexpr int64_t kBlockElements = int64_t(1) << 22;  // cosines per block (16 MB in float32)
constexpr int64_t kRowsPerTask = 16;                  // rows of a block per parallel task

using at::vec::Vectorized;

// One row's cosines: dots divided by the feature's and each weight row's norm.
template <typename T>
struct RowCosines {
  const T* dots;       // (V,) contiguous
  T feat_norm;         // 0 without normalization
  const T* row_norm;   // (V,) of the row's position

  // cos[v] for every v, vectorized; one division, as the other backends: parallel vectors give exactly +-1.
  void store(int64_t V, T* cos) const {
    if (feat_norm == 0) {
      std::copy(dots, dots + V, cos);
      return;
    }
    using Vec = Vectorized<T>;
    const Vec norm(feat_norm);
    int64_t v = 0;
    for (; v + Vec::size() <= V; v += Vec::size()) {
      (Vec::loadu(dots + v) / (norm * Vec::loadu(row_norm + v))).store(cos + v);
    }
    for (; v < V; ++v) cos[v] = dots[v] / (feat_norm * row_norm[v]);
  }
};

// The cosines of row r = b * L + j of a block (the driver's dots are contiguous along V).
template <typename T>
RowCosines<T> row_cosines(const at::Tensor& dots, const at::Tensor& feat_norm, const at::Tensor& row_norm,
                          int64_t r) {
  const int64_t L = dots.size(1), V = dots.size(2), b = r / L, j = r % L;
  TORCH_INTERNAL_ASSERT(dots.stride(2) == 1, "code_ce rows: dots must be contiguous along V");
  const T* base = dots.data_ptr<T>() + b * dots.stride(0) + j * dots.stride(1);
  if (!feat_norm.defined()) return {base, T(0), nullptr};
  const int64_t jx = feat_norm.size(1) == 1 ? 0 : j;
  return {base, feat_norm.data_ptr<T>()[b * feat_norm.size(1) + jx], row_norm.data_ptr<T>() + j * V};
}

// logsumexp of the row's logits (V,), overwritten in place by exp(logit - max).
template <typename T>
T logsumexp_in_place(T* logits, int64_t V) {
  using Vec = Vectorized<T>;
  const T top = at::vec::reduce_all<T>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, logits, V);
  const T sum = at::vec::map_reduce_all<T>([top](Vec x) { return (x - Vec(top)).exp(); },
                                           [](Vec a, Vec b) { return a + b; }, logits, V);
  return top + std::log(sum);
}

void forward_rows(const ForwardBlock& blk) {
  const int64_t nb = blk.dots.size(0), L = blk.dots.size(1), V = blk.dots.size(2);
  AT_DISPATCH_FLOATING_TYPES(blk.dots.scalar_type(), "code_ce_forward_rows", [&] {
    using Vec = Vectorized<scalar_t>;
    const auto rp = row_params<scalar_t>(blk.scale, blk.m2, blk.m3, blk.ignore_index);
    const scalar_t* position_weight = blk.position_weight.data_ptr<scalar_t>();
    const int64_t* code = blk.codes.data_ptr<int64_t>();
    scalar_t* loss_out = blk.loss.data_ptr<scalar_t>();
    scalar_t* lse_out = blk.lse.data_ptr<scalar_t>();
    at::parallel_for(0, nb * L, kRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> logits(V);
      for (int64_t r = begin; r < end; ++r) {
        row_cosines<scalar_t>(blk.dots, blk.feat_norm, blk.row_norm, r).store(V, logits.data());
        const int64_t t = code[r];
        const bool ignored = t == rp.ignore_index;
        scalar_t dphi;
        const scalar_t logit_t = ignored ? scalar_t(0) : rp.target_logit(logits[t], &dphi);
        at::vec::map([&rp](Vec c) { return c * Vec(rp.scale); }, logits.data(), logits.data(), V);
        if (!ignored) logits[t] = logit_t;
        const scalar_t row_lse = logsumexp_in_place(logits.data(), V);
        lse_out[r] = row_lse;
        loss_out[r] = ignored ? scalar_t(0) : position_weight[r % L] * (row_lse - logit_t);
      }
    });
  });
}

void backward_rows(const BackwardBlock& blk) {
  // The CPU has no GEMM of 16-bit operands with float32 output: factors stay in the accumulation dtype.
  TORCH_INTERNAL_ASSERT(!blk.grad_for_feats_lo.defined(), "code_ce CPU rows: 16-bit GEMM operands");
  const int64_t nb = blk.dots.size(0), L = blk.dots.size(1), V = blk.dots.size(2);
  AT_DISPATCH_FLOATING_TYPES(blk.dots.scalar_type(), "code_ce_backward_rows", [&] {
    using Vec = Vectorized<scalar_t>;
    const auto rp = row_params<scalar_t>(blk.scale, blk.m2, blk.m3, blk.ignore_index);
    const scalar_t* position_weight = blk.position_weight.data_ptr<scalar_t>();
    const int64_t* code = blk.codes.data_ptr<int64_t>();
    const scalar_t* grad_row = blk.grad_loss.data_ptr<scalar_t>();
    const scalar_t* lse_row = blk.lse.data_ptr<scalar_t>();
    scalar_t* for_feats = blk.grad_for_feats.data_ptr<scalar_t>();
    scalar_t* for_rows = blk.grad_for_rows.data_ptr<scalar_t>();
    scalar_t* feat_cos_dot = blk.feat_cos_dot.data_ptr<scalar_t>();
    at::parallel_for(0, nb * L, kRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> cos(V);
      for (int64_t r = begin; r < end; ++r) {
        const auto c = row_cosines<scalar_t>(blk.dots, blk.feat_norm, blk.row_norm, r);
        scalar_t* gf = for_feats + r * V;
        scalar_t* gr = for_rows + r * V;
        const int64_t t = code[r];
        if (t == rp.ignore_index) {
          std::fill(gf, gf + V, scalar_t(0));
          std::fill(gr, gr + V, scalar_t(0));
          feat_cos_dot[r] = 0;
          continue;
        }
        c.store(V, cos.data());
        // g = dLoss/dcos: weight * scale * prob off the target, weight * scale * (prob - 1) * phi' on it.
        // The loop runs over every column with the target's cosine set to 0 (its term there is then
        // finite and adds nothing to the dot); the target's own terms follow it.
        scalar_t dphi;
        const scalar_t cos_t = cos[t];
        const scalar_t logit_t = rp.target_logit(cos_t, &dphi);
        cos[t] = 0;
        const scalar_t weight_g = grad_row[r] * position_weight[r % L] * rp.scale;
        const scalar_t lse = lse_row[r];
        const bool normalize = c.feat_norm > 0;
        const Vec scale(rp.scale), shift(lse), factor(weight_g), feat_norm(c.feat_norm);
        Vec dots(0);
        int64_t v = 0;
        for (; v + Vec::size() <= V; v += Vec::size()) {
          const Vec cv = Vec::loadu(cos.data() + v);
          const Vec g = factor * (scale * cv - shift).exp();
          (normalize ? g / Vec::loadu(c.row_norm + v) : g).store(gf + v);
          (normalize ? g / feat_norm : g).store(gr + v);
          dots = dots + g * cv;
        }
        scalar_t dot = at::vec::vec_reduce_all<scalar_t>([](Vec a, Vec b) { return a + b; }, dots);
        for (; v < V; ++v) {
          const scalar_t g = weight_g * std::exp(rp.scale * cos[v] - lse);
          gf[v] = normalize ? g / c.row_norm[v] : g;
          gr[v] = normalize ? g / c.feat_norm : g;
          dot += g * cos[v];
        }
        const scalar_t g_t = weight_g * (std::exp(logit_t - lse) - 1) * dphi;
        dot += g_t * cos_t;
        gf[t] = normalize ? g_t / c.row_norm[t] : g_t;
        gr[t] = normalize ? g_t / c.feat_norm : g_t;
        feat_cos_dot[r] = dot;
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
