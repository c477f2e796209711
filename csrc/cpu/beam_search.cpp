// code_beam_search on the CPU: queries in parallel (OpenMP through at::parallel_for). Per level the
// children of the beam's prefixes are scored into a per-thread buffer and the best `beam` kept with
// nth_element; the last level keeps the best `topk` codes, sorted.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../beam_search.h"

namespace gif {
namespace {

constexpr int64_t kQueriesPerTask = 4;

// A scored prefix. key is its node, or its identity at the last level: ties go to the lower key.
template <typename acc_t>
struct Candidate {
  acc_t score;
  int64_t key;
};

template <typename acc_t>
bool ranks_before(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return a.score > b.score || (a.score == b.score && a.key < b.key);
}

template <typename acc_t>
struct TrieView {
  const int64_t* offsets;
  const int32_t* tokens;
  const int64_t* leaf_ids;
  TrieShape shape;
};

// Reusable per-thread storage: nothing is allocated per query.
template <typename acc_t>
struct SearchBuffers {
  std::vector<Candidate<acc_t>> beam, candidates;
  std::vector<acc_t> position_max;

  SearchBuffers(int64_t capacity, int64_t length)
      : beam(capacity), candidates(capacity), position_max(length) {}
};

// Searches one query. scores points at its (L, V) block. Writes topk ids and totals (-1 and -inf
// past the last code) and whether the answer is certified exact.
//
// Exactness: a prefix pruned at level d (positions 0..d summed) can reach at most its partial score
// plus the maximum score of each later position. Adding those maxima in the order the search adds
// scores rounds no lower than any completion's total (rounding is monotone), so the bound holds in
// floating point, and the best pruned prefix of a level bounds all of that level's pruned prefixes.
// The answer is exact when the k-th score beats every level's bound strictly: each pruned code then
// ranks below the k-th, ties by id included. The last level selects among complete codes with the
// same order as the exhaustive top-k, so its pruned codes need no bound.
template <typename acc_t>
void search_query(const acc_t* scores, int64_t stride_l, int64_t stride_v, int64_t num_tokens,
                  const TrieView<acc_t>& trie, int64_t beam_width, int64_t topk, SearchBuffers<acc_t>& buf,
                  int64_t* ids, float* totals, bool* exact) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t length = trie.shape.depth;
  for (int64_t j = 0; j < length; ++j) {
    acc_t best = kNegInf;
    for (int64_t v = 0; v < num_tokens; ++v) best = std::max(best, scores[j * stride_l + v * stride_v]);
    buf.position_max[j] = best;  // NaN scores are skipped: they rank as -inf below
  }
  Candidate<acc_t>* beam = buf.beam.data();
  Candidate<acc_t>* candidates = buf.candidates.data();
  beam[0] = {acc_t(0), 0};  // the root
  int64_t beam_size = 1;
  bool pruned = false;
  acc_t pruned_bound = kNegInf;
  for (int64_t level = 0; level < length; ++level) {
    const acc_t* row = scores + level * stride_l;
    const bool last = level == length - 1;
    int64_t count = 0;
    for (int64_t b = 0; b < beam_size; ++b) {
      const Candidate<acc_t> parent = beam[b];
      for (int64_t e = trie.offsets[parent.key]; e < trie.offsets[parent.key + 1]; ++e) {
        const acc_t score = parent.score + row[trie.tokens[e] * stride_v];
        const int64_t key = last ? trie.leaf_ids[e + 1 - trie.shape.leaf_start] : e + 1;
        candidates[count++] = {std::isnan(score) ? kNegInf : score, key};
      }
    }
    const int64_t keep = std::min(last ? topk : beam_width, count);
    if (keep < count) {
      std::nth_element(candidates, candidates + keep, candidates + count, ranks_before<acc_t>);
      if (!last) {  // candidates[keep] is now the best pruned prefix
        acc_t bound = candidates[keep].score;
        for (int64_t j = level + 1; j < length; ++j) bound += buf.position_max[j];
        pruned = true;
        pruned_bound = std::max(pruned_bound, bound);
      }
    }
    if (last) {
      std::sort(candidates, candidates + keep, ranks_before<acc_t>);
      for (int64_t i = 0; i < keep; ++i) {
        ids[i] = candidates[i].key;
        totals[i] = static_cast<float>(candidates[i].score);
      }
      *exact = !pruned || (keep > 0 && candidates[keep - 1].score > pruned_bound);
    } else {
      std::swap(beam, candidates);
      beam_size = keep;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> code_beam_search_cpu(
    const at::Tensor& scores, const at::Tensor& child_offsets, const at::Tensor& child_tokens,
    const at::Tensor& leaf_ids, int64_t beam, int64_t topk) {
  check_beam_search_args(scores, child_offsets, child_tokens, leaf_ids, beam, topk);
  const int64_t num_queries = scores.size(0), length = scores.size(1), num_tokens = scores.size(2);
  const TrieShape shape = check_trie_contents(child_offsets, child_tokens, leaf_ids, num_tokens);
  TORCH_CHECK_VALUE(length == shape.depth, "scores: expected L = ", shape.depth,
                    " positions (the trie's depth), got shape ", scores.sizes());
  at::Tensor ids = at::full({num_queries, topk}, -1, scores.options().dtype(at::kLong));
  at::Tensor totals = at::full({num_queries, topk}, -std::numeric_limits<float>::infinity(),
                               scores.options().dtype(at::kFloat));
  at::Tensor exact = at::empty({num_queries}, scores.options().dtype(at::kBool));
  // float64 scores are summed in float64 (totals are rounded once at the end); others in float32.
  const at::Tensor acc_scores = scores.scalar_type() == at::kDouble ? scores : scores.to(at::kFloat);
  const at::Tensor offsets = child_offsets.contiguous(), tokens = child_tokens.contiguous(),
                   leaves = leaf_ids.contiguous();
  // A level's candidates are children of at most `beam` nodes, and never more than the level holds.
  const int64_t capacity =
      std::max<int64_t>(1, std::min(std::min(beam, shape.widest_level) * shape.max_degree, shape.widest_level));
  AT_DISPATCH_FLOATING_TYPES(acc_scores.scalar_type(), "code_beam_search_cpu", [&] {
    const TrieView<scalar_t> trie{offsets.data_ptr<int64_t>(), tokens.data_ptr<int32_t>(),
                                  leaves.data_ptr<int64_t>(), shape};
    const scalar_t* base = acc_scores.data_ptr<scalar_t>();
    const int64_t stride_q = acc_scores.stride(0), stride_l = acc_scores.stride(1),
                  stride_v = acc_scores.stride(2);
    int64_t* ids_out = ids.data_ptr<int64_t>();
    float* totals_out = totals.data_ptr<float>();
    bool* exact_out = exact.data_ptr<bool>();
    at::parallel_for(0, num_queries, kQueriesPerTask, [&](int64_t begin, int64_t end) {
      SearchBuffers<scalar_t> buf(capacity, length);
      for (int64_t q = begin; q < end; ++q) {
        search_query(base + q * stride_q, stride_l, stride_v, num_tokens, trie, beam, topk, buf,
                     ids_out + q * topk, totals_out + q * topk, exact_out + q);
      }
    });
  });
  return {ids, totals, exact};
}

}  // namespace

TORCH_LIBRARY_IMPL(gif, CPU, m) { m.impl("code_beam_search", &code_beam_search_cpu); }

}  // namespace gif
