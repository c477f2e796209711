// Input checks of code_beam_search shared by the C++ kernels of every device.
#include "beam_search.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <deque>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

namespace gif {
namespace {
constexpr int64_t kCheckGrain = 1 << 16;  // trie entries per task of the O(M) checks
}  // namespace

void check_beam_search_args(const at::Tensor& scores, const at::Tensor& child_offsets,
                            const at::Tensor& child_tokens, const at::Tensor& leaf_ids, int64_t beam,
                            int64_t topk) {
  TORCH_CHECK_VALUE(scores.dim() == 3 && scores.size(1) >= 1 && scores.size(2) >= 1,
                    "scores: expected shape (Q, L, V) with L, V >= 1, got ", scores.sizes());
  const auto dtype = scores.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                       dtype == at::kDouble,
                   "scores: expected float32, bfloat16, float16 or float64, got ", dtype);
  TORCH_CHECK_VALUE(child_offsets.dim() == 1 && child_offsets.size(0) >= 2,
                    "child_offsets: expected shape (M + 1,) with M >= 1 nodes, got ", child_offsets.sizes());
  TORCH_CHECK_TYPE(child_offsets.scalar_type() == at::kLong, "child_offsets: expected int64, got ",
                   child_offsets.scalar_type());
  const int64_t num_nodes = child_offsets.size(0) - 1;
  TORCH_CHECK_VALUE(child_tokens.dim() == 1 && child_tokens.size(0) == num_nodes - 1,
                    "child_tokens: expected shape (M - 1,) = (", num_nodes - 1, ",) for M = ", num_nodes,
                    " nodes, got ", child_tokens.sizes());
  TORCH_CHECK_TYPE(child_tokens.scalar_type() == at::kInt, "child_tokens: expected int32, got ",
                   child_tokens.scalar_type());
  TORCH_CHECK_VALUE(leaf_ids.dim() == 1 && leaf_ids.size(0) >= 1 && leaf_ids.size(0) <= num_nodes,
                    "leaf_ids: expected shape (N,) with 1 <= N <= M = ", num_nodes, ", got ", leaf_ids.sizes());
  TORCH_CHECK_TYPE(leaf_ids.scalar_type() == at::kLong, "leaf_ids: expected int64, got ",
                   leaf_ids.scalar_type());
  TORCH_CHECK_VALUE(child_offsets.device() == scores.device() && child_tokens.device() == scores.device() &&
                        leaf_ids.device() == scores.device(),
                    "scores, child_offsets, child_tokens and leaf_ids must be on one device, got ",
                    scores.device(), ", ", child_offsets.device(), ", ", child_tokens.device(), ", ",
                    leaf_ids.device());
  TORCH_CHECK_VALUE(topk >= 1, "topk: expected >= 1, got ", topk);
  TORCH_CHECK_VALUE(beam >= topk, "beam: expected >= topk = ", topk, ", got ", beam);
}

namespace {

struct CheckedContents {
  TrieShape shape;
  int64_t lowest_token, highest_token;  // checked against [0, V) of the scores on every call
};

CheckedContents read_trie_contents(const at::Tensor& child_offsets, const at::Tensor& child_tokens,
                                   const at::Tensor& leaf_ids) {
  const at::Tensor offsets_c = child_offsets.contiguous(), tokens_c = child_tokens.contiguous();
  const int64_t* offsets = offsets_c.data_ptr<int64_t>();
  const int32_t* tokens = tokens_c.data_ptr<int32_t>();
  const int64_t num_nodes = child_offsets.size(0) - 1, num_edges = child_tokens.size(0);
  TORCH_CHECK_VALUE(offsets[0] == 0, "child_offsets: expected child_offsets[0] = 0, got ", offsets[0]);
  TORCH_CHECK_VALUE(offsets[num_nodes] == num_edges, "child_offsets: last offset ", offsets[num_nodes],
                    " != len(child_tokens) = ", num_edges);
  // One pass of plain min/max reductions (vectorized, parallel: the trie can hold 10^7 nodes);
  // a second pass finds the offending entry only when a check fails.
  struct Range {
    int64_t lowest, highest;
  };
  const auto merge = [](Range a, Range b) {
    return Range{std::min(a.lowest, b.lowest), std::max(a.highest, b.highest)};
  };
  const Range no_values{std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min()};
  const auto degree_range = [&](int64_t lo, int64_t hi, Range r) {
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t degree = offsets[u + 1] - offsets[u];
      r.lowest = std::min(r.lowest, degree);
      r.highest = std::max(r.highest, degree);
    }
    return r;
  };
  const Range degrees = at::parallel_reduce(0, num_nodes, kCheckGrain, no_values, degree_range, merge);
  if (degrees.lowest < 0) {
    const int64_t u =
        std::adjacent_find(offsets, offsets + num_nodes + 1, std::greater<int64_t>()) - offsets;
    TORCH_CHECK_VALUE(false, "child_offsets: expected non-decreasing offsets, got ", offsets[u], " then ",
                      offsets[u + 1], " at node ", u);
  }
  const int64_t max_degree = degrees.highest;
  const auto tokens_range = [&](int64_t lo, int64_t hi, Range r) {
    for (int64_t e = lo; e < hi; ++e) {
      r.lowest = std::min<int64_t>(r.lowest, tokens[e]);
      r.highest = std::max<int64_t>(r.highest, tokens[e]);
    }
    return r;
  };
  const Range token_range = at::parallel_reduce(0, num_edges, kCheckGrain, no_values, tokens_range, merge);
  // Edge e leads to node e + 1, so level d + 1 is the children range of level d.
  int64_t begin = 0, end = 1, depth = 0, widest_level = 1;
  while (offsets[begin] < offsets[end]) {
    TORCH_CHECK_VALUE(offsets[begin] + 1 == end, "child_offsets: the children of level ", depth,
                      " start at node ", offsets[begin] + 1, ", expected the next node ", end,
                      " (nodes are numbered level by level)");
    begin = offsets[begin] + 1;
    end = offsets[end] + 1;
    widest_level = std::max(widest_level, end - begin);
    ++depth;
  }
  TORCH_CHECK_VALUE(end == num_nodes, "child_offsets: the level of leaves ends at node ", end,
                    ", not at the node count M = ", num_nodes, " (leaves must all have depth L)");
  const int64_t num_leaves = leaf_ids.size(0);
  TORCH_CHECK_VALUE(end - begin == num_leaves, "leaf_ids: expected one id per leaf (", end - begin, "), got ",
                    num_leaves);
  // Leaf ids are the rows of the code table, each once: a permutation of [0, N).
  const at::Tensor leaves_c = leaf_ids.contiguous();
  const int64_t* leaves = leaves_c.data_ptr<int64_t>();
  std::vector<bool> seen(num_leaves, false);
  for (int64_t i = 0; i < num_leaves; ++i) {
    TORCH_CHECK_VALUE(leaves[i] >= 0 && leaves[i] < num_leaves && !seen[leaves[i]], "leaf_ids: expected each id ",
                      "of [0, N) = [0, ", num_leaves, ") once, got ", leaves[i], " at leaf ", i);
    seen[leaves[i]] = true;
  }
  return {{depth, begin, max_degree, widest_level}, num_edges == 0 ? 0 : token_range.lowest,
          num_edges == 0 ? -1 : token_range.highest};
}

// The contents checks are O(M) (about 15 ms at 10^7 codes, on every call of a search): the result is
// remembered for the last few tries, by their arrays' TensorImpls (held weakly, so a freed tensor never
// matches), data pointers and version counters (bumped by every in-place write through PyTorch), and a
// search over the same unchanged arrays skips the check. Inference tensors keep no version: always checked.
struct CacheEntry {
  std::array<c10::weak_intrusive_ptr<c10::TensorImpl>, 3> arrays;
  std::array<const void*, 3> data;
  std::array<int64_t, 3> versions;
  CheckedContents contents;
};
constexpr size_t kCachedTries = 8;
std::mutex cache_mutex;
std::deque<CacheEntry> cache;

bool same_arrays(const CacheEntry& entry, const std::array<const at::Tensor*, 3>& arrays) {
  for (size_t i = 0; i < 3; ++i) {
    const at::Tensor& t = *arrays[i];
    if (entry.arrays[i].lock().get() != t.unsafeGetTensorImpl() || entry.data[i] != t.data_ptr() ||
        entry.versions[i] != t._version()) {
      return false;
    }
  }
  return true;
}

}  // namespace

TrieShape check_trie_contents(const at::Tensor& child_offsets, const at::Tensor& child_tokens,
                              const at::Tensor& leaf_ids, int64_t num_tokens) {
  const std::array<const at::Tensor*, 3> arrays{&child_offsets, &child_tokens, &leaf_ids};
  const bool cacheable = !child_offsets.is_inference() && !child_tokens.is_inference() && !leaf_ids.is_inference();
  std::optional<CheckedContents> contents;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex);
    for (const CacheEntry& entry : cache) {
      if (same_arrays(entry, arrays)) {
        contents = entry.contents;
        break;
      }
    }
  }
  if (!contents) {
    contents = read_trie_contents(child_offsets, child_tokens, leaf_ids);
    if (cacheable) {
      const auto weak = [](const at::Tensor& t) { return c10::weak_intrusive_ptr<c10::TensorImpl>(t.getIntrusivePtr()); };
      CacheEntry entry{{weak(child_offsets), weak(child_tokens), weak(leaf_ids)},
                       {child_offsets.data_ptr(), child_tokens.data_ptr(), leaf_ids.data_ptr()},
                       {child_offsets._version(), child_tokens._version(), leaf_ids._version()},
                       *contents};
      std::lock_guard<std::mutex> lock(cache_mutex);
      cache.push_front(std::move(entry));
      if (cache.size() > kCachedTries) cache.pop_back();
    }
  }
  TORCH_CHECK_VALUE(contents->lowest_token >= 0 && contents->highest_token < num_tokens,
                    "child_tokens: expected tokens in [0, V) = [0, ", num_tokens, ") of scores, found ",
                    contents->lowest_token < 0 ? contents->lowest_token : contents->highest_token);
  return contents->shape;
}

}  // namespace gif
