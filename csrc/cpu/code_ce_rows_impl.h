// The CPU row steps of fused_code_ce (see code_ce_rows.h), written once with ATen's Vectorized and
// compiled once per instruction set: included by code_ce_rows_<capability>.cpp with CPU_CAPABILITY
// defined, after code_ce_rows.h, so that everything outside at::vec and this file's namespace is
// compiled for the baseline instruction set only.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace gif {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kRowsPerTask = 16;  // rows of a block per parallel task

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

// A row's softmax: its cosines turned into logits (scale * cos, the margin on the target t unless the
// row is ignored) and overwritten by exp(logit - top), whose sum is `sum`.
template <typename T>
struct RowSoftmax {
  T logit_t, dphi, top, sum;
  T lse() const { return top + std::log(sum); }
};

template <typename T>
RowSoftmax<T> softmax_in_place(const RowParams<T>& rp, int64_t V, int64_t t, bool ignored, T* logits) {
  using Vec = Vectorized<T>;
  RowSoftmax<T> s{T(0), T(1), T(0), T(0)};
  if (!ignored) s.logit_t = rp.target_logit(logits[t], &s.dphi);
  at::vec::map([&rp](Vec c) { return c * Vec(rp.scale); }, logits, logits, V);
  if (!ignored) logits[t] = s.logit_t;
  s.top = at::vec::reduce_all<T>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, logits, V);
  const Vec top(s.top);
  Vec sums(0);
  int64_t v = 0;
  for (; v + Vec::size() <= V; v += Vec::size()) {
    const Vec e = (Vec::loadu(logits + v) - top).exp();
    e.store(logits + v);
    sums = sums + e;
  }
  s.sum = at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, sums);
  for (; v < V; ++v) {
    logits[v] = std::exp(logits[v] - s.top);
    s.sum += logits[v];
  }
  return s;
}

// Row r's gradient factors from its softmax prob_scale * e (e: (V,), scratch): g_v = weight_g * p_v off
// the target t and weight_g * (p_t - 1) * dphi on it; writes g / row_norm into gf and g / feat_norm
// into gr (g itself without normalization).
template <typename T>
void store_factors(const RowCosines<T>& c, T* e, T prob_scale, int64_t V, int64_t t, T weight_g, T dphi, T* gf,
                   T* gr) {
  using Vec = Vectorized<T>;
  const bool normalize = c.feat_norm > 0;
  const T p_t = e[t] * prob_scale;
  const Vec factor(weight_g * prob_scale), inv_feat_norm(normalize ? T(1) / c.feat_norm : T(1));
  int64_t v = 0;
  for (; v + Vec::size() <= V; v += Vec::size()) {
    const Vec g = factor * Vec::loadu(e + v);
    (normalize ? g / Vec::loadu(c.row_norm + v) : g).store(gf + v);
    (g * inv_feat_norm).store(gr + v);
  }
  for (; v < V; ++v) {
    const T g = weight_g * prob_scale * e[v];
    gf[v] = normalize ? g / c.row_norm[v] : g;
    gr[v] = normalize ? g / c.feat_norm : g;
  }
  const T g_t = weight_g * (p_t - 1) * dphi;
  gf[t] = normalize ? g_t / c.row_norm[t] : g_t;
  gr[t] = normalize ? g_t / c.feat_norm : g_t;
}

// An ignored row contributes no gradient.
template <typename T>
void zero_factors(int64_t V, T* gf, T* gr) {
  std::fill(gf, gf + V, T(0));
  std::fill(gr, gr + V, T(0));
}

void forward_rows(const ForwardBlock& blk) {
  const int64_t nb = blk.dots.size(0), L = blk.dots.size(1), V = blk.dots.size(2);
  AT_DISPATCH_FLOATING_TYPES(blk.dots.scalar_type(), "code_ce_forward_rows", [&] {
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
        const auto s = softmax_in_place(rp, V, t, ignored, logits.data());
        lse_out[r] = s.lse();
        loss_out[r] = ignored ? scalar_t(0) : position_weight[r % L] * (s.lse() - s.logit_t);
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
    at::parallel_for(0, nb * L, kRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> prob(V);
      for (int64_t r = begin; r < end; ++r) {
        const auto c = row_cosines<scalar_t>(blk.dots, blk.feat_norm, blk.row_norm, r);
        scalar_t* gf = for_feats + r * V;
        scalar_t* gr = for_rows + r * V;
        const int64_t t = code[r];
        if (t == rp.ignore_index) {
          zero_factors(V, gf, gr);
          continue;
        }
        c.store(V, prob.data());
        scalar_t dphi;
        const scalar_t logit_t = rp.target_logit(prob[t], &dphi);
        const scalar_t lse = lse_row[r];
        at::vec::map([&](Vec cv) { return (cv * Vec(rp.scale) - Vec(lse)).exp(); }, prob.data(), prob.data(), V);
        prob[t] = std::exp(logit_t - lse);  // the target's own logit (its plain one may overflow exp)
        store_factors(c, prob.data(), scalar_t(1), V, t, grad_row[r] * position_weight[r % L] * rp.scale, dphi,
                      gf, gr);
      }
    });
  });
}

// Forward and gradient factors in one pass over each row: the softmax's exponentials serve both.
void forward_grad_rows(const ForwardBlock& fwd, const BackwardBlock& blk) {
  const int64_t nb = blk.dots.size(0), L = blk.dots.size(1), V = blk.dots.size(2);
  AT_DISPATCH_FLOATING_TYPES(blk.dots.scalar_type(), "code_ce_forward_grad_rows", [&] {
    const auto rp = row_params<scalar_t>(blk.scale, blk.m2, blk.m3, blk.ignore_index);
    const scalar_t* position_weight = blk.position_weight.data_ptr<scalar_t>();
    const int64_t* code = blk.codes.data_ptr<int64_t>();
    const scalar_t* grad_row = blk.grad_loss.data_ptr<scalar_t>();
    scalar_t* loss_out = fwd.loss.data_ptr<scalar_t>();
    scalar_t* lse_out = fwd.lse.data_ptr<scalar_t>();
    scalar_t* for_feats = blk.grad_for_feats.data_ptr<scalar_t>();
    scalar_t* for_rows = blk.grad_for_rows.data_ptr<scalar_t>();
    at::parallel_for(0, nb * L, kRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> e(V);
      for (int64_t r = begin; r < end; ++r) {
        const auto c = row_cosines<scalar_t>(blk.dots, blk.feat_norm, blk.row_norm, r);
        c.store(V, e.data());
        const int64_t t = code[r];
        const bool ignored = t == rp.ignore_index;
        const auto s = softmax_in_place(rp, V, t, ignored, e.data());
        const scalar_t weight = position_weight[r % L];
        lse_out[r] = s.lse();
        loss_out[r] = ignored ? scalar_t(0) : weight * (s.lse() - s.logit_t);
        scalar_t* gf = for_feats + r * V;
        scalar_t* gr = for_rows + r * V;
        if (ignored) {
          zero_factors(V, gf, gr);
        } else {
          store_factors(c, e.data(), scalar_t(1) / s.sum, V, t, grad_row[r] * weight * rp.scale, s.dphi, gf, gr);
        }
      }
    });
  });
}

// remove_normal_component (code_ce_gemm.h) as one pass per vector: the dot and the update of a D-long
// row stay in L1, where the ATen composite makes five passes over tensors of x's or weight's size.
void normal_component_rows(at::Tensor& grad_unit, const at::Tensor& v, const at::Tensor& norm) {
  const int64_t D = grad_unit.size(-1), N = D > 0 ? grad_unit.numel() / D : 0;
  TORCH_INTERNAL_ASSERT(grad_unit.is_contiguous(), "code_ce CPU rows: the gradient must be contiguous");
  const at::Tensor vectors = v.contiguous(), norms = norm.contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad_unit.scalar_type(), "code_ce_normal_component", [&] {
    using Vec = Vectorized<scalar_t>;
    scalar_t* grad = grad_unit.data_ptr<scalar_t>();
    const scalar_t* vec = vectors.data_ptr<scalar_t>();
    const scalar_t* norm_of = norms.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(D, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* g = grad + n * D;
        const scalar_t* u = vec + n * D;
        const scalar_t length = norm_of[n];
        const scalar_t dot = at::vec::map2_reduce_all<scalar_t>(
            [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; }, g, u, D);
        const scalar_t coefficient = length > scalar_t(kNormEps) ? dot / (length * length) : scalar_t(0);
        at::vec::map2([coefficient, length](Vec a, Vec b) { return (a - b * Vec(coefficient)) / Vec(length); },
                      g, g, u, D);
      }
    });
  });
}

}  // namespace

RowSteps row_steps() { return {forward_rows, backward_rows, forward_grad_rows, normal_component_rows}; }

}  // namespace CPU_CAPABILITY
}  // namespace gif
