// code_beam_search on CUDA: one block per query walks the trie level by level.
//
// Per level, the children of the beam's prefixes are enumerated through a prefix sum of their
// degrees (consecutive threads read consecutive edges), scored, and merged chunk by chunk into a
// running best list by a bitonic sort of 64-bit keys in shared memory. A key orders by score
// descending, then node (or identity) ascending: the ranking of the C++ kernel
// (csrc/cpu/beam_search.cpp), whose comments give the exactness rule. Totals are summed in float32
// in position order, so for float32 scores both kernels return the same bits. No host syncs: the trie
// arrays are validated when the CodeTrie is built, and every read is masked to its array regardless.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../beam_search.h"

namespace gif {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBeam = kThreads;  // one beam slot per thread in the degree scan
constexpr int kKeep = 512;          // the running best list: the beam and the best pruned prefix
constexpr int kChunk = 512;         // candidates scored per merge
constexpr int kSorted = kKeep + kChunk;
constexpr int64_t kNoKey = std::numeric_limits<int64_t>::min();

// Sorts ascending by (score, -key): the float32 bits made order-preserving as a signed int32 in
// the high half, 2^32 - 1 - key in the low half.
__device__ __forceinline__ int64_t ranking_key(float score, int64_t key) {
  const int32_t bits = __float_as_int(score);
  const int32_t ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF);
  return (static_cast<int64_t>(ordered) << 32) + (int64_t(0xFFFFFFFF) - key);
}

__device__ __forceinline__ float score_of(int64_t ranking) {
  const int32_t ordered = static_cast<int32_t>(ranking >> 32);
  return __int_as_float(ordered ^ ((ordered >> 31) & 0x7FFFFFFF));
}

__device__ __forceinline__ int64_t key_of(int64_t ranking) {
  return int64_t(0xFFFFFFFF) - (ranking & int64_t(0xFFFFFFFF));
}

// Sorts keys[0, kSorted) descending (bitonic network, all threads of the block).
__device__ void sort_descending(int64_t* keys) {
  for (int size = 2; size <= kSorted; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < kSorted / 2; i += kThreads) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const int64_t a = keys[lo], b = keys[hi];
        if ((a < b) == descending) {
          keys[lo] = b;
          keys[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

template <typename scalar_t>
__device__ __forceinline__ float finite_or_neg_inf(scalar_t value) {
  const float v = static_cast<float>(value);
  return v != v ? -INFINITY : v;  // NaN ranks as -inf, as in the C++ kernel
}

struct TrieArrays {
  const int64_t* offsets;
  const int32_t* tokens;
  const int64_t* leaf_ids;
  int64_t num_nodes, num_edges, num_leaves, leaf_start;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
beam_search_kernel(const scalar_t* scores, int64_t stride_q, int64_t stride_l, int64_t stride_v,
                   int64_t length, int64_t num_tokens, TrieArrays trie, int64_t beam, int64_t topk,
                   int64_t* ids, float* totals, bool* exact) {
  __shared__ int64_t keys[kSorted];
  __shared__ int64_t beam_node[kMaxBeam], edge_start[kMaxBeam], degree_end[kMaxBeam];
  __shared__ float beam_score[kMaxBeam];
  __shared__ float partial[kThreads / 32];
  __shared__ int64_t beam_size, candidates;
  extern __shared__ float position_max[];  // (length,)
  const int64_t q = blockIdx.x;
  const scalar_t* query = scores + q * stride_q;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // Each position's best score, for the bound on pruned prefixes.
  for (int64_t j = 0; j < length; ++j) {
    float best = -INFINITY;
    for (int64_t v = threadIdx.x; v < num_tokens; v += kThreads) {
      best = fmaxf(best, finite_or_neg_inf(query[j * stride_l + v * stride_v]));
    }
    for (int offset = 16; offset > 0; offset /= 2) best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, offset));
    if (lane == 0) partial[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < kThreads / 32; ++w) best = fmaxf(best, partial[w]);
      position_max[j] = best;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    beam_node[0] = 0;  // the root
    beam_score[0] = 0.0f;
    beam_size = 1;
  }
  __syncthreads();
  bool pruned = false;          // kept by thread 0
  float pruned_bound = -INFINITY;
  for (int64_t level = 0; level < length; ++level) {
    const bool last = level == length - 1;
    // Children of the beam: an inclusive prefix sum of the degrees gives each candidate its slot.
    const int t = threadIdx.x;
    int64_t degree = 0;
    if (t < beam_size) {
      const int64_t node = beam_node[t];
      if (node >= 0 && node < trie.num_nodes) {
        const int64_t start = trie.offsets[node], end = trie.offsets[node + 1];
        edge_start[t] = start;
        degree = end > start ? end - start : 0;
      }
    }
    degree_end[t] = degree;
    __syncthreads();
    for (int offset = 1; offset < kMaxBeam; offset <<= 1) {
      const int64_t before = t >= offset ? degree_end[t - offset] : 0;
      __syncthreads();
      degree_end[t] += before;
      __syncthreads();
    }
    if (t == 0) candidates = degree_end[kMaxBeam - 1];
    for (int i = t; i < kKeep; i += kThreads) keys[i] = kNoKey;
    __syncthreads();
    const scalar_t* row = query + level * stride_l;
    for (int64_t c0 = 0; c0 < candidates; c0 += kChunk) {
      for (int i = t; i < kChunk; i += kThreads) {
        const int64_t c = c0 + i;
        int64_t ranking = kNoKey;
        if (c < candidates) {
          int lo = 0, hi = int(beam_size) - 1;  // the first slot whose running degree passes c
          while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if (degree_end[mid] > c) hi = mid; else lo = mid + 1;
          }
          const int64_t edge = edge_start[lo] + c - (lo > 0 ? degree_end[lo - 1] : 0);
          if (edge >= 0 && edge < trie.num_edges) {
            const int64_t token = trie.tokens[edge];
            const int64_t leaf = edge + 1 - trie.leaf_start;
            if (token >= 0 && token < num_tokens && (!last || (leaf >= 0 && leaf < trie.num_leaves))) {
              float score = beam_score[lo] + static_cast<float>(row[token * stride_v]);
              score = score != score ? -INFINITY : score;
              ranking = ranking_key(score, last ? trie.leaf_ids[leaf] : edge + 1);
            }
          }
        }
        keys[kKeep + i] = ranking;
      }
      __syncthreads();
      sort_descending(keys);
    }
    // keys[0, keep) go on; keys[keep] is the best pruned prefix.
    const int64_t keep = last ? topk : beam;
    if (t == 0 && !last && keys[keep] != kNoKey) {
      float bound = score_of(keys[keep]);
      for (int64_t j = level + 1; j < length; ++j) bound += position_max[j];
      pruned = true;
      pruned_bound = fmaxf(pruned_bound, bound);
    }
    __syncthreads();
    if (!last) {
      if (t < keep) {
        const int64_t ranking = keys[t];
        beam_node[t] = ranking != kNoKey ? key_of(ranking) : -1;
        beam_score[t] = score_of(ranking);
      }
      if (t == 0) beam_size = candidates < keep ? candidates : keep;
      __syncthreads();
    }
  }
  // The last level's list holds the best topk codes, keyed by identity.
  for (int64_t i = threadIdx.x; i < topk; i += kThreads) {
    const int64_t ranking = keys[i];
    ids[q * topk + i] = ranking != kNoKey ? key_of(ranking) : -1;
    totals[q * topk + i] = ranking != kNoKey ? score_of(ranking) : -INFINITY;
  }
  if (threadIdx.x == 0) {
    const int64_t count = candidates < topk ? candidates : topk;
    exact[q] = !pruned || (count > 0 && score_of(keys[count - 1]) > pruned_bound);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> code_beam_search_cuda(
    const at::Tensor& scores, const at::Tensor& child_offsets, const at::Tensor& child_tokens,
    const at::Tensor& leaf_ids, int64_t beam, int64_t topk) {
  check_beam_search_args(scores, child_offsets, child_tokens, leaf_ids, beam, topk);
  TORCH_CHECK_VALUE(beam <= kMaxBeam, "beam: the CUDA kernel takes beam <= ", kMaxBeam, ", got ", beam);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t num_queries = scores.size(0), length = scores.size(1);
  at::Tensor ids = at::empty({num_queries, topk}, scores.options().dtype(at::kLong));
  at::Tensor totals = at::empty({num_queries, topk}, scores.options().dtype(at::kFloat));
  at::Tensor exact = at::empty({num_queries}, scores.options().dtype(at::kBool));
  if (num_queries == 0) return {ids, totals, exact};
  const at::Tensor offsets = child_offsets.contiguous(), tokens = child_tokens.contiguous(),
                   leaves = leaf_ids.contiguous();
  const int64_t num_nodes = offsets.numel() - 1;
  TORCH_CHECK_VALUE(num_nodes < (int64_t(1) << 32), "child_offsets: the CUDA kernel ranks nodes by 32-bit keys, got ",
                    num_nodes, " nodes");
  const TrieArrays trie{offsets.data_ptr<int64_t>(), tokens.data_ptr<int32_t>(), leaves.data_ptr<int64_t>(),
                        num_nodes, tokens.numel(), leaves.numel(), num_nodes - leaves.numel()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "code_beam_search_cuda", [&] {
    beam_search_kernel<scalar_t><<<num_queries, kThreads, length * sizeof(float),
                                   c10::cuda::getCurrentCUDAStream()>>>(
        scores.data_ptr<scalar_t>(), scores.stride(0), scores.stride(1), scores.stride(2), length,
        scores.size(2), trie, beam, topk, ids.data_ptr<int64_t>(), totals.data_ptr<float>(),
        exact.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ids, totals, exact};
}

}  // namespace

TORCH_LIBRARY_IMPL(gif, CUDA, m) { m.impl("code_beam_search", &code_beam_search_cuda); }

}  // namespace gif
