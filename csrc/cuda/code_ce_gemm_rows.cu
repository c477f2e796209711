// fused_code_ce's row kernels for the GEMM path of code_ce_gemm.h (cuBLAS through ATen, bf16/fp16 on
// tensor cores): one warp per (sample, position) row of the block's dots (nb, L, V), turning cosines
// into loss and lse (forward), or into the gradient factors, written as the GEMMs' 16-bit operands
// (backward).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "code_ce.cuh"

namespace gif {
namespace {

template <typename T>
struct DotRows {
  const T* dots;
  int64_t sb, sj, sv, rows, L, V;
  const T* feat_norm;  // (nb, Lx); null without normalization
  const T* row_norm;   // (L, V)
  int64_t Lx;
  const int64_t* codes;
  const T* position_weight;
  RowParams<T> rp;

  // The row's feature norm (1 without normalization) and its cosine with token v.
  __device__ __forceinline__ T feat_norm_of(int64_t row) const {
    return feat_norm ? feat_norm[(row / L) * Lx + (Lx == 1 ? 0 : row % L)] : T(1);
  }
  __device__ __forceinline__ T cos(const T* row_dots, int64_t j, int64_t v, T norm) const {
    // One division, as the other backends: parallel vectors then give exactly +-1.
    return feat_norm ? row_dots[v * sv] / (norm * row_norm[j * V + v]) : row_dots[v * sv];
  }
};

// One (sample, position) row of the dots: where it sits, its feature norm, its target and target logit.
template <typename T>
struct DotRow {
  int64_t j;
  const T* dots;
  T norm;
  Target tg;
  T dphi, logit_t;

  __device__ DotRow(const DotRows<T>& a, int64_t row)
      : j(row % a.L), dots(a.dots + (row / a.L) * a.sb + j * a.sj), norm(a.feat_norm_of(row)),
        tg(a.codes[row], a.V, a.rp.ignore_index), dphi(1), logit_t(0) {
    if (tg.valid) logit_t = a.rp.target_logit(a.cos(dots, j, tg.t, norm), &dphi);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) gemm_forward_rows_kernel(DotRows<T> a, T* loss, T* lse) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= a.rows) return;
  const DotRow<T> r(a, row);
  OnlineLse<T> acc;
  for (int64_t v = lane; v < a.V; v += kWarp) {
    acc.add(r.tg.valid && v == r.tg.t ? r.logit_t : a.rp.scale * a.cos(r.dots, r.j, v, r.norm));
  }
  const T row_lse = acc.warp_result();
  if (lane == 0) {
    lse[row] = r.tg.valid || r.tg.ignored ? row_lse : quiet_nan<T>();
    loss[row] = r.tg.ignored ? T(0)
                : r.tg.valid ? a.position_weight[r.j] * (row_lse - r.logit_t) : quiet_nan<T>();
  }
}

// A gradient factor as a GEMM operand of dtype O: the value rounded, and where lo is given, the rounded
// remainder (see BackwardBlock in code_ce_gemm.h).
template <typename T, typename O>
__device__ __forceinline__ void store_operand(T value, O* hi, O* lo, int64_t i) {
  const O high = static_cast<O>(value);
  hi[i] = high;
  if (lo) lo[i] = static_cast<O>(value - static_cast<T>(high));
}

template <typename T, typename O>
__global__ void __launch_bounds__(kThreads)
gemm_backward_rows_kernel(DotRows<T> a, const T* grad_loss, const T* lse, O* grad_for_feats, O* grad_for_feats_lo,
                          O* grad_for_rows, O* grad_for_rows_lo) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= a.rows) return;
  const DotRow<T> r(a, row);
  const T row_grad = r.tg.valid ? grad_loss[row] * a.position_weight[r.j] : r.tg.ignored ? T(0) : quiet_nan<T>();
  for (int64_t v = lane; v < a.V; v += kWarp) {
    const T c = a.cos(r.dots, r.j, v, r.norm);
    const T g = r.tg.ignored ? T(0)
                : grad_cos(a.rp, c, r.tg.valid && v == r.tg.t, r.logit_t, r.dphi, lse[row], row_grad);
    store_operand(a.feat_norm ? g / a.row_norm[r.j * a.V + v] : g, grad_for_feats, grad_for_feats_lo,
                  row * a.V + v);
    store_operand(g / r.norm, grad_for_rows, grad_for_rows_lo, row * a.V + v);
  }
}

template <typename T>
DotRows<T> dot_rows(const at::Tensor& dots, const at::Tensor& feat_norm, const at::Tensor& row_norm,
                    const at::Tensor& codes, const at::Tensor& position_weight, double scale, double m2,
                    double m3, int64_t ignore_index) {
  const bool normalize = feat_norm.defined();
  return {dots.data_ptr<T>(), dots.stride(0), dots.stride(1), dots.stride(2), dots.size(0) * dots.size(1),
          dots.size(1), dots.size(2), normalize ? feat_norm.data_ptr<T>() : nullptr,
          normalize ? row_norm.data_ptr<T>() : nullptr, normalize ? feat_norm.size(1) : 1,
          codes.data_ptr<int64_t>(), position_weight.data_ptr<T>(), row_params<T>(scale, m2, m3, ignore_index)};
}

int64_t row_blocks(int64_t rows) { return (rows + kWarps - 1) / kWarps; }

template <typename T, typename O>
void launch_backward_rows_as(const DotRows<T>& a, const BackwardBlock& blk) {
  const auto lo = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<O>() : nullptr; };
  gemm_backward_rows_kernel<T, O><<<row_blocks(a.rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      a, blk.grad_loss.data_ptr<T>(), blk.lse.data_ptr<T>(), blk.grad_for_feats.data_ptr<O>(),
      lo(blk.grad_for_feats_lo), blk.grad_for_rows.data_ptr<O>(), lo(blk.grad_for_rows_lo));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Gradient factors in T, or as 16-bit halves (16-bit inputs accumulate in float32).
template <typename T>
void launch_backward_rows(const DotRows<T>& a, const BackwardBlock& blk) {
  if constexpr (std::is_same_v<T, float>) {
    if (blk.grad_for_feats.scalar_type() == at::kBFloat16) return launch_backward_rows_as<float, at::BFloat16>(a, blk);
    if (blk.grad_for_feats.scalar_type() == at::kHalf) return launch_backward_rows_as<float, at::Half>(a, blk);
  }
  launch_backward_rows_as<T, T>(a, blk);
}
}  // namespace

void forward_rows_cuda(const ForwardBlock& blk) {
  AT_DISPATCH_FLOATING_TYPES(blk.dots.scalar_type(), "code_ce_forward_rows_cuda", [&] {
    const auto a = dot_rows<scalar_t>(blk.dots, blk.feat_norm, blk.row_norm, blk.codes, blk.position_weight,
                                      blk.scale, blk.m2, blk.m3, blk.ignore_index);
    if (a.rows == 0) return;
    gemm_forward_rows_kernel<scalar_t><<<row_blocks(a.rows), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a, blk.loss.data_ptr<scalar_t>(), blk.lse.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_rows_cuda(const BackwardBlock& blk) {
  AT_DISPATCH_FLOATING_TYPES(blk.dots.scalar_type(), "code_ce_backward_rows_cuda", [&] {
    const auto a = dot_rows<scalar_t>(blk.dots, blk.feat_norm, blk.row_norm, blk.codes, blk.position_weight,
                                      blk.scale, blk.m2, blk.m3, blk.ignore_index);
    if (a.rows == 0) return;
    launch_backward_rows(a, blk);
  });
}

}  // namespace gif
