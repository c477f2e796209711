// Every schema of torch.ops.gif, in one place. Kernels register per backend in csrc/cpu and
// csrc/cuda (C++) and in gif_kernels/ops.py (Triton, autograd, fake kernels).
#include <torch/library.h>

#include <string>

namespace {

// fused_code_ce's per-row forward: (loss (B, L) = lambda_j * CE_bj, lse (B, L) saved for backward).
const std::string kCodeCeForwardArgs =
    "(Tensor x, Tensor weight, Tensor codes, Tensor? position_weight, float scale, float m2, "
    "float m3, bool normalize, int ignore_index) -> (Tensor, Tensor)";
// Its backward from grad of the per-row loss: (grad_x, grad_weight).
const std::string kCodeCeBackwardArgs =
    "(Tensor grad_loss, Tensor x, Tensor weight, Tensor codes, Tensor? position_weight, "
    "Tensor lse, float scale, float m2, float m3, bool normalize, int ignore_index) "
    "-> (Tensor, Tensor)";
// code_beam_search: best topk codes of each query by beam search over the trie of valid codes
// (DESIGN.md) -> (ids (Q, topk) int64, total (Q, topk) float32, exact (Q,) bool).
const std::string kCodeBeamSearchArgs =
    "(Tensor scores, Tensor child_offsets, Tensor child_tokens, Tensor leaf_ids, int beam, int topk) "
    "-> (Tensor, Tensor, Tensor)";

// The Triton family takes one more argument: `deterministic` picks its backward (partial sums added in a
// fixed order instead of atomics); the forward is the same either way.
std::string with_deterministic(const std::string& args) {
  return args.substr(0, args.find(") ->")) + ", bool deterministic) ->" + args.substr(args.find(") ->") + 4);
}

}  // namespace

TORCH_LIBRARY(gif, m) {
  m.set_python_module("gif_kernels.ops");
  // Public op: reduces the per-row loss of the fastest backend for the inputs' device.
  m.def(
      "fused_code_ce(Tensor x, Tensor weight, Tensor codes, Tensor? position_weight=None, "
      "float scale=64.0, float m2=0.0, float m3=0.0, bool normalize=True, int ignore_index=-100, "
      "str reduction=\"mean\") -> Tensor");
  // One forward/backward pair per kernel family: C++ (CPU and CUDA keys, always deterministic) and Triton.
  m.def(("code_ce_forward" + kCodeCeForwardArgs).c_str());
  m.def(("code_ce_backward" + kCodeCeBackwardArgs).c_str());
  m.def(("triton_code_ce_forward" + with_deterministic(kCodeCeForwardArgs)).c_str());
  m.def(("triton_code_ce_backward" + with_deterministic(kCodeCeBackwardArgs)).c_str());
  // One beam search per kernel family: C++ (CPU key so far) and Triton.
  for (const std::string family : {"code_beam_search", "triton_code_beam_search"}) {
    m.def((family + kCodeBeamSearchArgs).c_str());
  }
}
