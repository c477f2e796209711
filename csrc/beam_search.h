// Shared pieces of code_beam_search: input checks for the kernels of every device.
#pragma once

#include <ATen/ATen.h>

namespace gif {

// Shapes, dtypes, devices, beam and topk: metadata only, so every device's kernel can run them.
void check_beam_search_args(const at::Tensor& scores, const at::Tensor& child_offsets,
                            const at::Tensor& child_tokens, const at::Tensor& leaf_ids, int64_t beam,
                            int64_t topk);

// What the CPU kernel needs to know about a trie whose contents were checked.
struct TrieShape {
  int64_t depth;       // L: levels below the root
  int64_t leaf_start;  // first leaf node (leaves are the last nodes)
  int64_t max_degree;    // most children of one node
  int64_t widest_level;  // most nodes of one level; with max_degree it sizes the candidate buffers
};

// Reads the arrays of CPU tensors (O(M), remembered for unchanged tensors): offsets start at 0, never
// decrease and end at the edge count; tokens lie in [0, num_tokens); the levels implied by the offsets
// end in a level of leaves whose size N is leaf_ids' length; leaf_ids is a permutation of [0, N). Then
// no walk of the trie can leave its arrays, and every id found is an identity's.
TrieShape check_trie_contents(const at::Tensor& child_offsets, const at::Tensor& child_tokens,
                              const at::Tensor& leaf_ids, int64_t num_tokens);

}  // namespace gif
