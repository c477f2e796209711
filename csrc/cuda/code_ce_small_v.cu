// fused_code_ce's small-V kernels (V <= 64, the regime codes are made for): one pass over x per block
// of samples and positions (all L, or fewer where small batches would leave the device idle). A block
// stages its samples' features in shared memory chunk by chunk, forms the cosines of its positions (warp
// per weight row, 16-byte loads, shuffle reductions), then applies margin and logsumexp per row. The
// backward recomputes the cosines, forms grad_x in the same block (in parts, one per position block,
// for shared features split over positions) and leaves dLoss/dcos for a grad_weight kernel that
// reduces over samples in fixed-size splits (per-block partials, then one reduction in a fixed order):
// gradients are bitwise reproducible, with no global atomics.
//
// One file past 500 lines: the forward and the backward kernels share the block's slice, its shared
// memory layout and the pass that forms the dot products, which only this file uses.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>

#include "code_ce.cuh"

namespace gif {
namespace {

constexpr int kMaxSmallV = 64;                      // small-V kernels: up to 2 tokens per lane
constexpr int kMaxSmallColumns = 1024;              // and L * V <= this
constexpr int kSamplesPerBlock = 4;                 // samples sharing one read of the weights
constexpr int kBlocksPerSm = 4;                     // small-V grids split positions until they fill this
constexpr int kPerLane = 8;                         // feature elements per lane per step
constexpr int kChunk = kWarp * kPerLane;            // feature elements per warp step
constexpr int kColumnsPerStep = 4;                  // weight rows a warp loads at once (loads in flight)
constexpr int kTileColumns = 32;                    // weight rows staged per step for grad_x
static_assert(kChunk == kThreads, "grad_x gives each thread one feature element of a chunk");
constexpr int kGradTileColumns = 32;                // grad_weight tile: 32 rows x 64 features,
constexpr int kGradTileFeatures = 64;               // 8 features per thread
constexpr int kGradTileSamples = 32;                // samples staged per step

// Loads 8 consecutive elements of a row at d (zeros past D) in the accumulation dtype, with
// 16-byte loads where the row is aligned for them.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_lane(const scalar_t* row, int64_t d, int64_t D, bool vectorized,
                                          acc_t (&out)[kPerLane]) {
  constexpr int kVec = 16 / sizeof(scalar_t);
#pragma unroll
  for (int i = 0; i < kPerLane; i += kVec) {
    if (vectorized && d + i + kVec <= D) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + d + i);
      const scalar_t* v = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) out[i + k] = static_cast<acc_t>(v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        out[i + k] = d + i + k < D ? static_cast<acc_t>(row[d + i + k]) : acc_t(0);
      }
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t clamped_norm(acc_t sum_sq) {
  const acc_t n = std::sqrt(sum_sq);
  return n > acc_t(kNormEps) ? n : acc_t(kNormEps);
}

// The component of a gradient along the unit vector that normalization removes, cos_dot * value / norm;
// none below eps, where the norm is the constant eps (the gradient of F.normalize there).
template <typename acc_t>
__device__ __forceinline__ acc_t projection(acc_t cos_dot, acc_t value, acc_t clamped) {
  return clamped > acc_t(kNormEps) ? cos_dot * value / clamped : acc_t(0);
}

// Arguments of the small-V kernels. x is (B, Lx, D) with Lx = 1 for shared features, weight is
// (N = L * V, D); both contiguous. A block takes kSamplesPerBlock samples (blockIdx.x) and P
// consecutive positions (blockIdx.y): fewer positions per block give more blocks when the samples
// alone do not fill the device.
template <typename scalar_t, typename acc_t>
struct SmallVArgs {
  const scalar_t* x;
  const scalar_t* weight;
  const int64_t* codes;    // (B, L)
  const acc_t* position_weight;  // (L,), or null for all ones
  int64_t B, L, V, D, Lx, P;
  bool normalize, vectorized;
  RowParams<acc_t> rp;

  __device__ __forceinline__ acc_t position_weight_at(int64_t j) const {
    return position_weight ? position_weight[j] : acc_t(1);
  }
};

// The block's slice: samples [b0, b0 + nb), positions [j0, j0 + np), weight rows [c0, c0 + nc) with
// nc = np * V, and nf feature rows per sample (one if shared, else one per position).
struct SmallVSlice {
  int64_t b0, j0, c0;
  int nb, np, nc, nf;

  template <typename Args>
  __device__ explicit SmallVSlice(const Args& a) {
    b0 = int64_t(blockIdx.x) * kSamplesPerBlock;
    j0 = int64_t(blockIdx.y) * a.P;
    c0 = j0 * a.V;
    nb = int(a.B - b0 < kSamplesPerBlock ? a.B - b0 : kSamplesPerBlock);
    np = int(a.L - j0 < a.P ? a.L - j0 : a.P);
    nc = int(np * a.V);
    nf = a.Lx == 1 ? 1 : np;
  }
  // The feature row (of nf) that the block's weight row n (of nc) meets.
  __device__ __forceinline__ int feat_of(int n, int64_t V) const { return nf == 1 ? 0 : int(n / V); }
};

// Shared memory of a small-V block, in the accumulation dtype; P positions of V rows, F = 1 or P
// feature rows per sample.
template <typename acc_t>
struct SmallVSmem {
  acc_t* feats;         // (kSamplesPerBlock * F, kChunk): a chunk of features, lane-major
  acc_t* dots;          // (kSamplesPerBlock, P * V)
  acc_t* row_sq;        // (P * V,) sum of squares of weight rows
  acc_t* feat_sq;       // (kSamplesPerBlock * F,)
  acc_t* grads;         // (kSamplesPerBlock, P * V): dLoss/dcos (backward only)
  acc_t* feat_cos_dot;  // (kSamplesPerBlock * P,) sum_v dLoss/dcos * cos (backward only)
  acc_t* rows_tile;     // (kTileColumns, kChunk): weight rows staged for grad_x (backward only)

  __device__ SmallVSmem(acc_t* base, int64_t P, int64_t V, int64_t F) {
    feats = base;
    dots = feats + kSamplesPerBlock * F * kChunk;
    row_sq = dots + kSamplesPerBlock * P * V;
    feat_sq = row_sq + P * V;
    grads = feat_sq + kSamplesPerBlock * F;
    feat_cos_dot = grads + kSamplesPerBlock * P * V;
    rows_tile = feat_cos_dot + kSamplesPerBlock * P;
  }
  static int64_t bytes(int64_t P, int64_t V, int64_t F, bool backward) {
    const int64_t forward = kSamplesPerBlock * F * kChunk + kSamplesPerBlock * P * V + P * V + kSamplesPerBlock * F;
    const int64_t extra = kSamplesPerBlock * P * V + kSamplesPerBlock * P + kTileColumns * kChunk;
    return int64_t(sizeof(acc_t)) * (forward + (backward ? extra : 0));
  }
};

// Dot products of the block's samples with its weight rows, and the squared norms.
template <typename scalar_t, typename acc_t>
__device__ void small_v_dots(const SmallVArgs<scalar_t, acc_t>& a, const SmallVSlice& sl,
                             const SmallVSmem<acc_t>& sm) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int feat_rows = kSamplesPerBlock * sl.nf;
  for (int i = threadIdx.x; i < kSamplesPerBlock * sl.nc; i += kThreads) sm.dots[i] = 0;
  for (int i = threadIdx.x; i < sl.nc; i += kThreads) sm.row_sq[i] = 0;
  for (int i = threadIdx.x; i < feat_rows; i += kThreads) sm.feat_sq[i] = 0;
  for (int64_t d0 = 0; d0 < a.D; d0 += kChunk) {
    __syncthreads();  // the previous chunk is consumed, the accumulators are zeroed
    // Element lane * kPerLane + k of a row sits at k * kWarp + lane: conflict-free reads below.
    for (int i = threadIdx.x; i < feat_rows * kChunk; i += kThreads) {
      const int row = i / kChunk, pos = i % kChunk, s = row / sl.nf;
      const int64_t d = d0 + (pos % kWarp) * kPerLane + pos / kWarp;
      const int64_t feat_row = (sl.b0 + s) * a.Lx + (a.Lx == 1 ? 0 : sl.j0 + row % sl.nf);
      sm.feats[i] = s < sl.nb && d < a.D ? static_cast<acc_t>(a.x[feat_row * a.D + d]) : acc_t(0);
    }
    __syncthreads();
    for (int row = warp; row < feat_rows; row += kWarps) {
      acc_t sq = 0;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const acc_t v = sm.feats[row * kChunk + k * kWarp + lane];
        sq += v * v;
      }
      sq = warp_sum(sq);
      if (lane == 0) sm.feat_sq[row] += sq;
    }
    // Several rows per warp step, their loads all in flight before the first use (half as many in
    // float64, for registers).
    constexpr int kRows = kColumnsPerStep * sizeof(float) / sizeof(acc_t);
    for (int n0 = warp * kRows; n0 < sl.nc; n0 += kWarps * kRows) {
      acc_t w[kRows][kPerLane];
#pragma unroll
      for (int c = 0; c < kRows; ++c) {
        if (n0 + c < sl.nc) {
          load_lane(a.weight + (sl.c0 + n0 + c) * a.D, d0 + lane * kPerLane, a.D, a.vectorized, w[c]);
        }
      }
#pragma unroll
      for (int c = 0; c < kRows; ++c) {
        const int n = n0 + c;
        if (n >= sl.nc) break;
        const int f = sl.feat_of(n, a.V);
        acc_t sq = 0, part[kSamplesPerBlock];
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) sq += w[c][k] * w[c][k];
#pragma unroll
        for (int s = 0; s < kSamplesPerBlock; ++s) {
          const acc_t* feat = sm.feats + (s * sl.nf + f) * kChunk + lane;
          part[s] = 0;
#pragma unroll
          for (int k = 0; k < kPerLane; ++k) part[s] += w[c][k] * feat[k * kWarp];
        }
        sq = warp_sum(sq);
#pragma unroll
        for (int s = 0; s < kSamplesPerBlock; ++s) part[s] = warp_sum(part[s]);
        if (lane == 0) {
          sm.row_sq[n] += sq;
#pragma unroll
          for (int s = 0; s < kSamplesPerBlock; ++s) sm.dots[s * sl.nc + n] += part[s];
        }
      }
    }
  }
  __syncthreads();
}

// Cosine of sample s (of the block) with the block's weight row n.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t small_v_cos(const SmallVArgs<scalar_t, acc_t>& a, const SmallVSlice& sl,
                                             const SmallVSmem<acc_t>& sm, int s, int n) {
  const acc_t dot = sm.dots[s * sl.nc + n];
  if (!a.normalize) return dot;
  // One division, as the other backends: parallel vectors then give exactly +-1.
  return dot / (clamped_norm(sm.feat_sq[s * sl.nf + sl.feat_of(n, a.V)]) * clamped_norm(sm.row_sq[n]));
}

template <typename acc_t>
__device__ __forceinline__ acc_t* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<acc_t*>(smem_raw);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
small_v_forward_kernel(SmallVArgs<scalar_t, acc_t> a, acc_t* loss, acc_t* lse) {
  const SmallVSlice sl(a);
  const SmallVSmem<acc_t> sm(dynamic_smem<acc_t>(), a.P, a.V, sl.nf);
  small_v_dots(a, sl, sm);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int r = warp; r < sl.nb * sl.np; r += kWarps) {
    const int s = r / sl.np, p = r % sl.np;
    const int64_t j = sl.j0 + p, row = (sl.b0 + s) * a.L + j;
    const Target tg(a.codes[row], a.V, a.rp.ignore_index);
    acc_t dphi, logit_t = 0;
    if (tg.valid) logit_t = a.rp.target_logit(small_v_cos(a, sl, sm, s, int(p * a.V + tg.t)), &dphi);
    OnlineLse<acc_t> acc;
    for (int v = lane; v < a.V; v += kWarp) {
      acc.add(tg.valid && v == tg.t ? logit_t : a.rp.scale * small_v_cos(a, sl, sm, s, int(p * a.V + v)));
    }
    const acc_t row_lse = acc.warp_result();
    if (lane == 0) {
      lse[row] = tg.valid || tg.ignored ? row_lse : quiet_nan<acc_t>();
      loss[row] = tg.ignored ? acc_t(0)
                  : tg.valid ? a.position_weight_at(j) * (row_lse - logit_t) : quiet_nan<acc_t>();
    }
  }
}

// Backward, per block: dLoss/dcos (kept for the grad_weight kernel) and grad_x. Shared features split
// over several position blocks (gridDim.y > 1) get one partial grad_x per block, in grad_x_partial
// (gridDim.y, B, D), which the finishing kernel adds in order; otherwise grad_x is written here.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
small_v_backward_kernel(SmallVArgs<scalar_t, acc_t> a, const acc_t* grad_loss, const acc_t* lse,
                        scalar_t* grad_x, acc_t* grad_x_partial, acc_t* grad_cos_out,
                        acc_t* grad_cos_times_cos_out, acc_t* feat_norm_out, acc_t* row_norm_out) {
  const int64_t N = a.L * a.V;
  const SmallVSlice sl(a);
  const SmallVSmem<acc_t> sm(dynamic_smem<acc_t>(), a.P, a.V, sl.nf);
  small_v_dots(a, sl, sm);
  for (int i = sl.nb * sl.nc + threadIdx.x; i < kSamplesPerBlock * sl.nc; i += kThreads) sm.grads[i] = 0;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int r = warp; r < sl.nb * sl.np; r += kWarps) {
    const int s = r / sl.np, p = r % sl.np;
    const int64_t j = sl.j0 + p, row = (sl.b0 + s) * a.L + j;
    const Target tg(a.codes[row], a.V, a.rp.ignore_index);
    acc_t dphi = 1, logit_t = 0;
    if (tg.valid) logit_t = a.rp.target_logit(small_v_cos(a, sl, sm, s, int(p * a.V + tg.t)), &dphi);
    const acc_t row_grad = tg.valid ? grad_loss[row] * a.position_weight_at(j)
                                    : tg.ignored ? acc_t(0) : quiet_nan<acc_t>();
    acc_t dot = 0;
    for (int v = lane; v < a.V; v += kWarp) {
      const int n = int(p * a.V + v);
      const acc_t c = small_v_cos(a, sl, sm, s, n);
      const acc_t g = tg.ignored ? acc_t(0) : grad_cos(a.rp, c, tg.valid && v == tg.t, logit_t, dphi, lse[row], row_grad);
      sm.grads[s * sl.nc + n] = g;
      grad_cos_out[(sl.b0 + s) * N + sl.c0 + n] = g;
      grad_cos_times_cos_out[(sl.b0 + s) * N + sl.c0 + n] = g * c;
      dot += g * c;
    }
    dot = warp_sum(dot);
    if (lane == 0) sm.feat_cos_dot[s * sl.np + p] = dot;
  }
  // Each feature norm once: shared features by the first position block, per-position ones by theirs.
  if (a.Lx != 1 || blockIdx.y == 0) {
    for (int i = threadIdx.x; i < sl.nb * sl.nf; i += kThreads) {
      const int64_t feat_row = (sl.b0 + i / sl.nf) * a.Lx + (a.Lx == 1 ? 0 : sl.j0 + i % sl.nf);
      feat_norm_out[feat_row] = a.normalize ? clamped_norm(sm.feat_sq[i]) : acc_t(1);
    }
  }
  if (blockIdx.x == 0) {
    for (int n = threadIdx.x; n < sl.nc; n += kThreads) {
      row_norm_out[sl.c0 + n] = a.normalize ? clamped_norm(sm.row_sq[n]) : acc_t(1);
    }
  }
  __syncthreads();
  // Fold 1 / ||w_n|| into the factors: sum_n g_n * w_n / ||w_n|| is then one pass over the weights.
  if (a.normalize) {
    for (int i = threadIdx.x; i < sl.nb * sl.nc; i += kThreads) sm.grads[i] /= clamped_norm(sm.row_sq[i % sl.nc]);
  }
  // Shared features see every position of the block: their sum_n g_n c_n goes to feat_cos_dot[s * np].
  if (a.Lx == 1 && threadIdx.x < sl.nb) {
    acc_t total = 0;
    for (int p = 0; p < sl.np; ++p) total += sm.feat_cos_dot[threadIdx.x * sl.np + p];
    sm.feat_cos_dot[threadIdx.x * sl.np] = total;
  }
  __syncthreads();
  // grad of the unit feature u = x / ||x||: sum_n g_n w_n / ||w_n|| - (sum_n g_n c_n) u; then
  // through the normalization, grad_x = that / ||x|| (the u component is already removed). Both are
  // sums over n, so position blocks add their parts. Weight rows are staged in shared memory tile by
  // tile (16-byte loads, all in flight); each thread then owns one feature element of the chunk.
  for (int64_t d0 = 0; d0 < a.D; d0 += kChunk) {
    const int64_t d = d0 + threadIdx.x;
    for (int f = 0; f < sl.nf; ++f) {
      const int n0 = a.Lx == 1 ? 0 : int(f * a.V), n1 = a.Lx == 1 ? sl.nc : n0 + int(a.V);
      acc_t acc[kSamplesPerBlock] = {};
      for (int t0 = n0; t0 < n1; t0 += kTileColumns) {
        const int cols = n1 - t0 < kTileColumns ? n1 - t0 : kTileColumns;
        __syncthreads();  // the previous tile is consumed
        for (int i = threadIdx.x; i < cols * (kChunk / kPerLane); i += kThreads) {
          const int c = i / (kChunk / kPerLane), part = i % (kChunk / kPerLane);
          acc_t v[kPerLane];
          load_lane(a.weight + (sl.c0 + t0 + c) * a.D, d0 + part * kPerLane, a.D, a.vectorized, v);
#pragma unroll
          for (int k = 0; k < kPerLane; ++k) sm.rows_tile[c * kChunk + part * kPerLane + k] = v[k];
        }
        __syncthreads();
        for (int c = 0; c < cols; ++c) {
          const acc_t w = sm.rows_tile[c * kChunk + threadIdx.x];
#pragma unroll
          for (int s = 0; s < kSamplesPerBlock; ++s) acc[s] += sm.grads[s * sl.nc + t0 + c] * w;
        }
      }
      if (d >= a.D) continue;
#pragma unroll
      for (int s = 0; s < kSamplesPerBlock; ++s) {
        if (s >= sl.nb) break;
        const int64_t feat_row = (sl.b0 + s) * a.Lx + (a.Lx == 1 ? 0 : sl.j0 + f);
        acc_t g = acc[s];
        if (a.normalize) {
          const acc_t feat_cos_dot = sm.feat_cos_dot[s * sl.np + f];
          const acc_t norm = clamped_norm(sm.feat_sq[s * sl.nf + f]);
          g = (g - projection(feat_cos_dot, static_cast<acc_t>(a.x[feat_row * a.D + d]), norm)) / norm;
        }
        if (grad_x_partial) {
          grad_x_partial[(int64_t(blockIdx.y) * a.B + feat_row) * a.D + d] = g;
        } else {
          grad_x[feat_row * a.D + d] = static_cast<scalar_t>(g);
        }
      }
    }
  }
}

// Partial sums over one split of the samples, for a tile of 32 weight rows x 64 features:
// partial[split, n, d] = sum_b g[b, n] * u_b[d] (u = unit feature of n's position), and
// row_cos_dot_partial[split, n] = sum_b g[b, n] * c[b, n].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
small_v_grad_weight_partial_kernel(SmallVArgs<scalar_t, acc_t> a, const acc_t* grad_cos,
                                   const acc_t* grad_cos_times_cos, const acc_t* feat_norm,
                                   int64_t samples_per_split, acc_t* partial, acc_t* row_cos_dot_partial) {
  __shared__ acc_t g_tile[kGradTileSamples][kGradTileColumns + 1];
  __shared__ acc_t gc_tile[kGradTileSamples][kGradTileColumns + 1];
  __shared__ acc_t f_tile[kGradTileSamples][kGradTileFeatures + 1];
  const int64_t N = a.L * a.V;
  // Column tiles never straddle positions when features are per position (one feature row each).
  const int64_t tiles_per_position = (a.V + kGradTileColumns - 1) / kGradTileColumns;
  int64_t n0, n1, jx = 0;
  if (a.Lx == 1) {
    n0 = int64_t(blockIdx.x) * kGradTileColumns;
    n1 = n0 + kGradTileColumns < N ? n0 + kGradTileColumns : N;
  } else {
    jx = blockIdx.x / tiles_per_position;
    n0 = jx * a.V + (blockIdx.x % tiles_per_position) * kGradTileColumns;
    n1 = n0 + kGradTileColumns < (jx + 1) * a.V ? n0 + kGradTileColumns : (jx + 1) * a.V;
  }
  const int64_t d0 = int64_t(blockIdx.y) * kGradTileFeatures;
  const int64_t s0 = int64_t(blockIdx.z) * samples_per_split;
  const int64_t s1 = s0 + samples_per_split < a.B ? s0 + samples_per_split : a.B;
  const bool with_row_cos_dot = blockIdx.y == 0;
  const int tn = threadIdx.x / (kGradTileFeatures / kPerLane), td = threadIdx.x % (kGradTileFeatures / kPerLane);
  acc_t acc[kPerLane] = {}, dot = 0;
  for (int64_t b = s0; b < s1; b += kGradTileSamples) {
    for (int i = threadIdx.x; i < kGradTileSamples * kGradTileColumns; i += kThreads) {
      const int si = i / kGradTileColumns, ci = i % kGradTileColumns;
      const bool in = b + si < s1 && n0 + ci < n1;
      g_tile[si][ci] = in ? grad_cos[(b + si) * N + n0 + ci] : acc_t(0);
      if (with_row_cos_dot) gc_tile[si][ci] = in ? grad_cos_times_cos[(b + si) * N + n0 + ci] : acc_t(0);
    }
    for (int i = threadIdx.x; i < kGradTileSamples * kGradTileFeatures; i += kThreads) {
      const int si = i / kGradTileFeatures, di = i % kGradTileFeatures;
      acc_t f = 0;
      if (b + si < s1 && d0 + di < a.D) {
        const int64_t feat_row = (b + si) * a.Lx + jx;
        f = static_cast<acc_t>(a.x[feat_row * a.D + d0 + di]) / feat_norm[feat_row];
      }
      f_tile[si][di] = f;
    }
    __syncthreads();
#pragma unroll 4
    for (int si = 0; si < kGradTileSamples; ++si) {
      const acc_t g = g_tile[si][tn];
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) acc[k] += g * f_tile[si][td * kPerLane + k];
      if (with_row_cos_dot) dot += gc_tile[si][tn];
    }
    __syncthreads();
  }
  const int64_t n = n0 + tn;
  if (n >= n1) return;
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t d = d0 + td * kPerLane + k;
    if (d < a.D) partial[(int64_t(blockIdx.z) * N + n) * a.D + d] = acc[k];
  }
  if (with_row_cos_dot && td == 0) row_cos_dot_partial[int64_t(blockIdx.z) * N + n] = dot;
}

// grad_weight[n, d] = (P[n, d] - (sum_b g c)[n] * w[n, d] / ||w_n||) / ||w_n||, P summed over splits
// in order; without normalization grad_weight = P. Then, where the backward left grad_x in parts
// (grad_x_parts > 0), grad_x = their sum in order.
template <typename scalar_t, typename acc_t>
__global__ void small_v_finish_kernel(SmallVArgs<scalar_t, acc_t> a, const acc_t* partial,
                                      const acc_t* row_cos_dot_partial, const acc_t* row_norm, int64_t splits, scalar_t* grad_weight,
                                      const acc_t* grad_x_partial, int64_t grad_x_parts, scalar_t* grad_x) {
  const int64_t N = a.L * a.V, weight_total = N * a.D, x_total = grad_x_parts > 0 ? a.B * a.D : 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < weight_total + x_total;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i >= weight_total) {
      const int64_t k = i - weight_total;
      acc_t g = 0;
      for (int64_t z = 0; z < grad_x_parts; ++z) g += grad_x_partial[z * x_total + k];
      grad_x[k] = static_cast<scalar_t>(g);
      continue;
    }
    const int64_t n = i / a.D;
    acc_t p = 0;
    for (int64_t z = 0; z < splits; ++z) p += partial[z * weight_total + i];
    if (a.normalize) {
      acc_t dot = 0;
      for (int64_t z = 0; z < splits; ++z) dot += row_cos_dot_partial[z * N + n];
      const acc_t norm = row_norm[n];
      p = (p - projection(dot, static_cast<acc_t>(a.weight[i]), norm)) / norm;
    }
    grad_weight[i] = static_cast<scalar_t>(p);
  }
}

// ---- Host side.

// An attribute of the current device (the ATen helper for this pulls in the cuBLAS/cuSPARSE headers).
int device_attribute(cudaDeviceAttr attribute) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, c10::cuda::current_device()));
  return value;
}

// Positions per small-V block: all L where the sample blocks alone fill the device kBlocksPerSm times
// over; else fewer, for more blocks, but enough for one step of weight rows per warp. It depends on the
// shape and the device only, so gradients stay bitwise reproducible run to run.
int64_t small_v_positions_per_block(int64_t B, int64_t L, int64_t V) {
  const int64_t sample_blocks = (B + kSamplesPerBlock - 1) / kSamplesPerBlock;
  const int64_t wanted = kBlocksPerSm * device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t min_positions = std::clamp<int64_t>(kWarps * kColumnsPerStep / V, 1, L);
  const int64_t groups = std::clamp<int64_t>((wanted + sample_blocks - 1) / sample_blocks, 1,
                                             (L + min_positions - 1) / min_positions);
  return (L + groups - 1) / groups;
}

template <typename scalar_t, typename acc_t>
SmallVArgs<scalar_t, acc_t> small_v_args(const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& codes, const at::Tensor& position_weight,
                                         bool normalize, const RowParams<acc_t>& rp) {
  const int64_t B = x.size(0), L = weight.size(0), V = weight.size(1), D = weight.size(2);
  const auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  const bool vectorized = D % (16 / sizeof(scalar_t)) == 0 && aligned(weight);
  return {x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), codes.data_ptr<int64_t>(),
          position_weight.defined() ? position_weight.data_ptr<acc_t>() : nullptr, B, L, V, D,
          x.dim() == 2 ? 1 : L, small_v_positions_per_block(B, L, V), normalize, vectorized, rp};
}

template <typename scalar_t, typename acc_t>
dim3 small_v_grid(const SmallVArgs<scalar_t, acc_t>& a) {
  return dim3(static_cast<unsigned>((a.B + kSamplesPerBlock - 1) / kSamplesPerBlock),
              static_cast<unsigned>((a.L + a.P - 1) / a.P));
}

template <typename scalar_t, typename acc_t>
int64_t small_v_smem(const SmallVArgs<scalar_t, acc_t>& a, bool backward) {
  return SmallVSmem<acc_t>::bytes(a.P, a.V, a.Lx == 1 ? 1 : a.P, backward);
}

template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int64_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

}  // namespace

// The small-V kernels take the shape when V and L * V are small and a block's shared memory fits (with
// all L positions, the most a block takes).
bool small_v_fits(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t L = weight.size(0), V = weight.size(1), F = x.dim() == 2 ? 1 : L;
  if (V > kMaxSmallV || L * V > kMaxSmallColumns || weight.size(2) > 65535 * kGradTileFeatures) return false;
  const int64_t bytes = x.scalar_type() == at::kDouble ? SmallVSmem<double>::bytes(L, V, F, true)
                                                       : SmallVSmem<float>::bytes(L, V, F, true);
  return bytes <= int64_t(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
}

std::tuple<at::Tensor, at::Tensor> small_v_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                   const at::Tensor& codes, const at::Tensor& position_weight,
                                                   double scale, double m2, double m3, bool normalize,
                                                   int64_t ignore_index) {
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t B = x.size(0), L = weight.size(0);
  const auto acc_options = x.options().dtype(accumulation_type(x));
  at::Tensor loss = at::empty({B, L}, acc_options);
  at::Tensor lse = at::empty({B, L}, acc_options);
  if (B == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "small_v_forward", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto a = small_v_args<scalar_t, acc_t>(x, weight, codes, position_weight, normalize,
                                                 row_params<acc_t>(scale, m2, m3, ignore_index));
    const int64_t smem = small_v_smem(a, false);
    allow_dynamic_smem(small_v_forward_kernel<scalar_t, acc_t>, smem);
    small_v_forward_kernel<scalar_t, acc_t><<<small_v_grid(a), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        a, loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> small_v_backward(const at::Tensor& grad_loss, const at::Tensor& x_in,
                                                    const at::Tensor& weight_in, const at::Tensor& codes,
                                                    const at::Tensor& position_weight, const at::Tensor& lse,
                                                    double scale, double m2, double m3, bool normalize,
                                                    int64_t ignore_index) {
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t B = x.size(0), L = weight.size(0), V = weight.size(1), D = weight.size(2);
  const int64_t N = L * V, Lx = x.dim() == 2 ? 1 : L;
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weight = at::empty_like(weight);
  if (B == 0) return {grad_x, grad_weight.zero_()};
  const auto acc_options = x.options().dtype(accumulation_type(x));
  at::Tensor grad_cos = at::empty({B, N}, acc_options);       // dLoss/dcos
  at::Tensor grad_cos_times_cos = at::empty({B, N}, acc_options);   // dLoss/dcos * cos
  at::Tensor feat_norm = at::empty({B, Lx}, acc_options);
  at::Tensor row_norm = at::empty({N}, acc_options);
  // Split the samples so that the grad_weight tiles fill the device about twice; the split depends on
  // the shape and the device only, so results are reproducible run to run.
  const int64_t column_tiles = Lx == 1 ? (N + kGradTileColumns - 1) / kGradTileColumns
                                       : L * ((V + kGradTileColumns - 1) / kGradTileColumns);
  const int64_t feature_tiles = (D + kGradTileFeatures - 1) / kGradTileFeatures;
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t max_splits = (B + kGradTileSamples - 1) / kGradTileSamples;
  const int64_t wanted = (2 * sms + column_tiles * feature_tiles - 1) / (column_tiles * feature_tiles);
  const int64_t splits_guess = std::min<int64_t>(std::max<int64_t>(wanted, 1), std::min<int64_t>(max_splits, 65535));
  const int64_t samples_per_split =
      ((B + splits_guess - 1) / splits_guess + kGradTileSamples - 1) / kGradTileSamples * kGradTileSamples;
  const int64_t splits = (B + samples_per_split - 1) / samples_per_split;
  at::Tensor partial = at::empty({splits, N, D}, acc_options);
  at::Tensor row_cos_dot_partial = at::empty({splits, N}, acc_options);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "small_v_backward", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const auto a = small_v_args<scalar_t, acc_t>(x, weight, codes, position_weight, normalize,
                                                 row_params<acc_t>(scale, m2, m3, ignore_index));
    const dim3 grid = small_v_grid(a);
    // Shared features over several position blocks: grad_x in one part per block, added at the end.
    const int64_t grad_x_parts = Lx == 1 && grid.y > 1 ? grid.y : 0;
    at::Tensor grad_x_partial = grad_x_parts > 0 ? at::empty({grad_x_parts, B, D}, acc_options) : at::Tensor();
    acc_t* const grad_x_partial_ptr = grad_x_parts > 0 ? grad_x_partial.data_ptr<acc_t>() : nullptr;
    const int64_t smem = small_v_smem(a, true);
    allow_dynamic_smem(small_v_backward_kernel<scalar_t, acc_t>, smem);
    small_v_backward_kernel<scalar_t, acc_t><<<grid, kThreads, smem, stream>>>(
        a, grad_loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(), grad_x_partial_ptr,
        grad_cos.data_ptr<acc_t>(), grad_cos_times_cos.data_ptr<acc_t>(), feat_norm.data_ptr<acc_t>(),
        row_norm.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 tiles(static_cast<unsigned>(column_tiles), static_cast<unsigned>(feature_tiles),
                     static_cast<unsigned>(splits));
    small_v_grad_weight_partial_kernel<scalar_t, acc_t><<<tiles, kThreads, 0, stream>>>(
        a, grad_cos.data_ptr<acc_t>(), grad_cos_times_cos.data_ptr<acc_t>(), feat_norm.data_ptr<acc_t>(),
        samples_per_split, partial.data_ptr<acc_t>(), row_cos_dot_partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t outputs = N * D + (grad_x_parts > 0 ? B * D : 0);
    const int64_t finish_blocks = std::min<int64_t>((outputs + kThreads - 1) / kThreads, 8 * sms);
    small_v_finish_kernel<scalar_t, acc_t><<<finish_blocks, kThreads, 0, stream>>>(
        a, partial.data_ptr<acc_t>(), row_cos_dot_partial.data_ptr<acc_t>(), row_norm.data_ptr<acc_t>(), splits,
        grad_weight.data_ptr<scalar_t>(), grad_x_partial_ptr, grad_x_parts, grad_x.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_weight};
}

}  // namespace gif
