// Schemas of the compiled faces ("cpu" and "cuda" backends). Each kernel file registers its
// implementation for one dispatch key with TORCH_LIBRARY_IMPL(amnets_native, CPU|CUDA, m), so one
// schema serves both devices. The public ops torch.ops.amnets.* check the arguments once and route here,
// or to the reference or Triton face, by the backend in force (csrc/face.h), all in C++ (csrc/bsr.cpp,
// csrc/lowrank_lstm.cpp, csrc/rnnt.cpp). These schemas must equal the face contract there and in
// amnets_kernels/_ops/ (a test compares them).
#include <torch/library.h>

TORCH_LIBRARY(amnets_native, m) {
  // y = x @ W^T + bias, W given as BSR blocks. x is (M, in_features), contiguous.
  m.def("bsr_linear_forward(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
        "int out_features, int in_features, Tensor? bias) -> Tensor");
  // (grad_x or an empty tensor, grad_values or an empty tensor), as need_x / need_values ask.
  m.def("bsr_linear_backward(Tensor grad_out, Tensor x, Tensor values, Tensor crow_indices, "
        "Tensor col_indices, int out_features, int in_features, bool need_x, bool need_values) "
        "-> (Tensor, Tensor)");
  // Raises ValueError/TypeError naming `op` unless crow_indices/col_indices (CPU) are a canonical BSR
  // pattern of nnzb blocks of b x b in an (out_features, in_features) matrix: the check every CPU kernel
  // runs on every call (csrc/checks.h), for the Python layer's CPU tensors.
  m.def("bsr_check_pattern(Tensor crow_indices, Tensor col_indices, int nnzb, int block_size, "
        "int out_features, int in_features, str op) -> ()");
  // Inference only, CPU only (amnets_kernels.PreparedBsrLstmCell): one LSTM step with [W_ih | W_hh]
  // block-sparse, gates = [x | h] W^T + bias, -> (h1, c1).
  m.def("bsr_lstm_cell_forward(Tensor x, Tensor h, Tensor c, Tensor values, Tensor crow_indices, "
        "Tensor col_indices, Tensor? bias) -> (Tensor, Tensor)");
  // Inference only, CPU only (amnets_kernels.nn.BlockSparseLSTM): a whole sequence, W_ih (4H, D) and
  // W_hh (4H, R) block-sparse: x (T, B, D), h (B, R), c (B, H) -> (out (T, B, R), h_T, c_T); R is H, or
  // nn.LSTM's proj_size P with its projection w_hr (P, H).
  m.def("bsr_lstm_sequence_forward(Tensor x, Tensor h, Tensor c, Tensor ih_values, Tensor ih_crow_indices, "
        "Tensor ih_col_indices, Tensor hh_values, Tensor hh_crow_indices, Tensor hh_col_indices, Tensor? bias, "
        "Tensor? w_hr=None) -> (Tensor, Tensor, Tensor)");

  // Inference only, CPU only (amnets_kernels.nn.BlockSparseLSTM stepped one frame a call): the fused cell
  // above through every layer of a unidirectional stack in one call. x (B, D), h0 / c0 (L, B, H) or None
  // (zeros), blocks (values, crow_indices, col_indices) per layer, one bias per layer -> (out (B, H), h_n, c_n);
  // with nn.LSTM's projection, (values, crow_indices, col_indices, w_hr (P, H)) per layer and h0, out, h_n
  // P wide.
  m.def("bsr_lstm_stack_step(Tensor x, Tensor? h0, Tensor? c0, Tensor[] blocks, Tensor?[] biases, "
        "int hidden_size) -> (Tensor, Tensor, Tensor)");

  // (h1, c1, gates); gates = post-activation i,f,g,o (B, 4H) in the accumulation dtype when save.
  m.def("lowrank_lstm_cell_forward(Tensor x, Tensor h, Tensor c, Tensor w_ih_u, Tensor w_ih_v, "
        "Tensor w_hh_u, Tensor w_hh_v, Tensor? bias, bool save) -> (Tensor, Tensor, Tensor)");
  // Inference only, CPU only (amnets_kernels.nn.LowRankLSTM stepped one frame a call): the cell's forward
  // through every layer of a unidirectional stack in one call. weights (w_ih_u, w_ih_v, w_hh_u, w_hh_v) per
  // layer, one bias per layer; otherwise as bsr_lstm_stack_step.
  m.def("lowrank_lstm_stack_step(Tensor x, Tensor? h0, Tensor? c0, Tensor[] weights, Tensor?[] biases, "
        "int hidden_size) -> (Tensor, Tensor, Tensor)");
  // -> (grad x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
  m.def("lowrank_lstm_cell_backward(Tensor grad_h1, Tensor grad_c1, Tensor x, Tensor h, Tensor c, "
        "Tensor w_ih_u, Tensor w_ih_v, Tensor w_hh_u, Tensor w_hh_v, Tensor c1, Tensor gates) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (out (T,B,H), h_n, c_n, gates (T,B,4H), cells (T,B,H)); the last two only when save.
  m.def("lowrank_lstm_sequence_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih_u, "
        "Tensor w_ih_v, Tensor w_hh_u, Tensor w_hh_v, Tensor? bias, bool save) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> (grad x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
  m.def("lowrank_lstm_sequence_backward(Tensor grad_out, Tensor grad_h_n, Tensor grad_c_n, "
        "Tensor x, Tensor h0, Tensor c0, Tensor w_ih_u, Tensor w_ih_v, Tensor w_hh_u, "
        "Tensor w_hh_v, Tensor out, Tensor gates, Tensor cells) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // (costs (B,), alphas, betas, den (B,T,U+1) in the accumulation dtype), the last three only when
  // save (else empty). blank is in [0, V); targets past target_lengths may hold anything. The
  // forward ops take clamp only so that autograd can hand it to backward; they ignore it.
  m.def("rnnt_loss_forward(Tensor logits, Tensor targets, Tensor logit_lengths, "
        "Tensor target_lengths, int blank, float clamp, bool fused_log_softmax, bool save) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // d(sum_b grad_costs[b] * costs[b]) / d logits, each sequence's gradient clamped before scaling.
  m.def("rnnt_loss_backward(Tensor grad_costs, Tensor logits, Tensor targets, Tensor logit_lengths, "
        "Tensor target_lengths, Tensor costs, Tensor alphas, Tensor betas, Tensor den, int blank, "
        "float clamp, bool fused_log_softmax) -> Tensor");
  // The RNN-T losses' label checks on the labels' device (csrc/rnnt.cpp, label_checks "device"): targets (B, U),
  // the lengths (B,), int32 or int64 each -> (targets clamped into [0, V), logit_lengths, target_lengths as
  // int32, a bad sequence's lengths 1 and 0; bad (B,) bool). `op` names the loss in errors. No host sync.
  m.def("rnnt_device_labels(Tensor targets, Tensor logit_lengths, Tensor target_lengths, int max_frames, "
        "int vocab, int blank, str op) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fused_joint_rnnt_loss_forward(Tensor enc, Tensor pred, Tensor weight, Tensor? bias, "
        "Tensor targets, Tensor logit_lengths, Tensor target_lengths, int blank, str activation, "
        "float clamp, bool save) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> (grad enc, pred, weight, bias or an empty tensor)
  m.def("fused_joint_rnnt_loss_backward(Tensor grad_costs, Tensor enc, Tensor pred, Tensor weight, "
        "Tensor? bias, Tensor targets, Tensor logit_lengths, Tensor target_lengths, Tensor costs, "
        "Tensor alphas, Tensor betas, Tensor den, int blank, str activation, float clamp) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}
