// Every schema of the charmlp operator library, in one place. Defined twice: as the `charmlp` library
// (registration.cpp: the product's CPU and CUDA kernels) and as the test-only `charmlp_emu` library
// (emulation/registration.cpp: the CUDA kernels built on the CPU emulator), so both take the same arguments.
//
// Dimension names used throughout: B batch, T context (block_size), E embedding, H hidden, V vocabulary.
// `reduction` follows at::Reduction: 0 none, 1 mean, 2 sum.
#pragma once

#include <torch/library.h>

namespace charmlp {

inline void define_schemas(torch::Library& m) {
  // ---- embed + linear + tanh -------------------------------------------------------------------
  // h = tanh(C[idx].view(B, T*E) @ W1 + b1); idx (B, T) int64/int32, C (V, E), W1 (T*E, H), b1 (H) -> h (B, H)
  m.def("embed_linear_tanh(Tensor idx, Tensor C, Tensor W1, Tensor b1) -> Tensor");
  // -> (grad_C (V, E), grad_W1 (T*E, H), grad_b1 (H)), from h saved by the forward.
  m.def("embed_linear_tanh_backward(Tensor grad_h, Tensor h, Tensor idx, Tensor C, Tensor W1) -> (Tensor, Tensor, Tensor)");

  // ---- softmax cross-entropy -------------------------------------------------------------------
  // F.cross_entropy semantics for logits (B, V) and targets (B,).
  m.def("cross_entropy(Tensor logits, Tensor targets, int reduction=1, int ignore_index=-100) -> Tensor");
  // -> (loss, lse (B,) float64 log-sum-exp per row, saved for the backward). float64 whatever the logits'
  // dtype: a float32 lse near |logits| ~ 1e4 would carry an absolute error of ulp(1e4) ~ 1e-3 into every
  // softmax probability exp(x - lse) of the backward.
  m.def("cross_entropy_forward(Tensor logits, Tensor targets, int reduction, int ignore_index) -> (Tensor, Tensor)");
  // -> grad_logits (B, V)
  m.def("cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor targets, Tensor lse, int reduction, int ignore_index) -> Tensor");

  // ---- linear + cross-entropy (the output layer fused with the loss) ---------------------------
  // loss of logits = h @ W2 + b2 without materialising (B, V); h (B, H), W2 (H, V), b2 (V), targets (B,)
  m.def("linear_cross_entropy(Tensor h, Tensor W2, Tensor b2, Tensor targets, int reduction=1, int ignore_index=-100) -> Tensor");
  // -> (loss, lse (B,) float64, grad_h (B, H), grad_W2 (H, V), grad_b2 (V)). With compute_grad the gradients of
  // the loss for grad_loss = 1 come out of the same pass over the logits (the autograd kernel then only scales
  // them: 3 GEMMs instead of 4 for forward + backward); without it they are empty (0,) tensors.
  m.def("linear_cross_entropy_forward(Tensor h, Tensor W2, Tensor b2, Tensor targets, int reduction, int ignore_index, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (grad_h (B, H), grad_W2 (H, V), grad_b2 (V)), recomputing the logits tile by tile from lse
  // (used for reduction="none", where the per-row incoming gradient is only known in the backward).
  m.def("linear_cross_entropy_backward(Tensor grad_loss, Tensor h, Tensor W2, Tensor b2, Tensor targets, Tensor lse, int reduction, int ignore_index) -> (Tensor, Tensor, Tensor)");

  // ---- whole-training ops (persistent SGD) -----------------------------------------------------
  // S SGD steps of M independent models in one call (csrc/sgd_train/sgd_train.h): per step, B rows drawn by Philox from
  // seeds (M,) keyed by (seed, start_step + i, row) -- or read from batch_idx (S, B) / (M, S, B) -- then forward,
  // backward and p -= lrs[..., i] * (grad + weight_decay * p) (weight decay on C, W1 and W2, not on the biases).
  // C (M, V, E), W1 (M, T*E, H), b1 (M, H), W2 (M, H, V), b2 (M, V) float32 are updated in place; W2 may be
  // (M, H + T*E, V), its last T*E rows the direct connections from the context to the logits (CPU only); X (N, T), Y (N,) int64/int32; lrs (S,) or (M, S) float32. Exactly one of seeds and
  // batch_idx. -> losses (M, ceil(S / loss_every)): the mean training loss of each window of loss_every steps.
  // cluster_size: blocks per model on CUDA (0 = auto; see sgd_train_cuda_plan), ignored on the CPU.
  m.def("sgd_train(Tensor(a!) C, Tensor(b!) W1, Tensor(c!) b1, Tensor(d!) W2, Tensor(e!) b2, Tensor X, Tensor Y, "
        "Tensor lrs, Tensor? seeds, Tensor? batch_idx, int start_step, int batch_size, int loss_every=1, "
        "int cluster_size=0, float weight_decay=0.0) -> Tensor");
  // The rows sgd_train draws: (M, num_steps, batch_size) int64 in [0, num_rows) for steps start_step[0] + i.
  // start_step is a one-element int64 tensor on the device of seeds, so that a captured CUDA graph can advance it.
  m.def("philox_minibatch(Tensor seeds, Tensor start_step, int num_steps, int batch_size, int num_rows) -> Tensor");
  // Whether a model size fits the persistent CUDA kernel on a device with smem_per_block bytes of opt-in shared
  // memory per block and compute capability cc_major.x: -> ("" or the reason it does not,
  // [cluster_size, ks_logits, ks_dx, shared-memory bytes per block] when it does). Host code, any machine.
  m.def("sgd_train_cuda_plan(int vocab_size, int block_size, int n_embd, int n_hidden, int batch_size, "
        "int smem_per_block, int cc_major, int cluster_size=0) -> (str, int[])");
  // The instruction set the CPU kernel of sgd_train runs with on this machine: "avx512", "avx2" or "baseline".
  m.def("sgd_train_cpu_isa() -> str");
}

}  // namespace charmlp
