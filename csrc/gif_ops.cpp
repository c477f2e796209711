// Every schema of torch.ops.gif, in one place. Kernels register per backend in csrc/cpu and
// csrc/cuda (C++); the Python side of each op (Triton kernels, autograd, fake kernels) lives in
// gif_kernels/ops/, one file per op, named here by set_python_module.
#include <torch/library.h>

TORCH_LIBRARY(gif, m) {
  m.set_python_module("gif_kernels.ops.code_ce");
  // Public op: reduces the per-row loss of the fastest backend for the inputs' device.
  m.def(
      "fused_code_ce(Tensor x, Tensor weight, Tensor codes, Tensor? position_weight=None, "
      "float scale=64.0, float m2=0.0, float m3=0.0, bool normalize=True, int ignore_index=-100, "
      "str reduction=\"mean\") -> Tensor");
  // One forward/backward pair per kernel family: C++ (CPU and CUDA keys, always deterministic) and
  // Triton. The forward gives (loss (B, L) = position_weight_j * CE_bj, lse (B, L) saved for the
  // backward); the backward, from the gradient of that loss, (grad_x, grad_weight).
  m.def(
      "code_ce_forward(Tensor x, Tensor weight, Tensor codes, Tensor? position_weight, float scale, "
      "float m2, float m3, bool normalize, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "code_ce_backward(Tensor grad_loss, Tensor x, Tensor weight, Tensor codes, "
      "Tensor? position_weight, Tensor lse, float scale, float m2, float m3, bool normalize, "
      "int ignore_index) -> (Tensor, Tensor)");
  // Gradients in the forward: the reduced loss ("sum" or "mean") of the same rows and its gradients in
  // x and weight (where output_mask asks, else empty tensors) from one sweep, for the autograd of
  // fused_code_ce to scale by the incoming gradient: (loss (0-dim), grad_x, grad_weight).
  m.def(
      "code_ce_forward_grad(Tensor x, Tensor weight, Tensor codes, Tensor? position_weight, "
      "float scale, float m2, float m3, bool normalize, int ignore_index, str reduction, "
      "bool[2] output_mask) -> (Tensor, Tensor, Tensor)");
  // The Triton family takes one more argument: `deterministic` picks its backward (partial sums
  // added in a fixed order instead of atomics); the forward is the same either way.
  m.def(
      "triton_code_ce_forward(Tensor x, Tensor weight, Tensor codes, Tensor? position_weight, "
      "float scale, float m2, float m3, bool normalize, int ignore_index, bool deterministic) "
      "-> (Tensor, Tensor)");
  m.def(
      "triton_code_ce_backward(Tensor grad_loss, Tensor x, Tensor weight, Tensor codes, "
      "Tensor? position_weight, Tensor lse, float scale, float m2, float m3, bool normalize, "
      "int ignore_index, bool deterministic) -> (Tensor, Tensor)");

  m.set_python_module("gif_kernels.ops.beam_search");
  // Best topk codes of each query by beam search over the trie of valid codes (gif_kernels/codebook.py)
  // -> (ids (Q, topk) int64, total (Q, topk) float32, exact (Q,) bool). One per kernel family: C++
  // (CPU and CUDA keys) and Triton.
  m.def(
      "code_beam_search(Tensor scores, Tensor child_offsets, Tensor child_tokens, Tensor leaf_ids, "
      "int beam, int topk) -> (Tensor, Tensor, Tensor)");
  m.def(
      "triton_code_beam_search(Tensor scores, Tensor child_offsets, Tensor child_tokens, "
      "Tensor leaf_ids, int beam, int topk) -> (Tensor, Tensor, Tensor)");
}
