// Argument checks of the native ops, run inside every op on every call, whoever calls it (the public
// functions, the prepared steps, torch.ops.amnets_native.* directly). They make the kernels memory-safe
// against their index and label inputs: a kernel only ever indexes memory these checks have bounded.
// The Python layer (amnets_kernels/_validate.py) checks the same things first with the same messages;
// these are the guard that does not trust any cache of it (an index edited through .data or .numpy(),
// an inference tensor, values.set_() or a resize_()).
//
// Errors are TORCH_CHECK_VALUE / TORCH_CHECK_TYPE: ValueError / TypeError in Python. The data checks read
// index arrays, so they are for CPU tensors; a pass over the index arrays (O(nnzb + Nb), O(B U)) costs
// next to nothing beside the kernel it guards.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>

namespace amnets::checks {

// Python's spelling of a shape, (3, 11) or (20,), and of a dtype, torch.float32: the messages of
// amnets_kernels/_validate.py.
inline std::string py_shape(at::IntArrayRef sizes) {
  std::string text = "(";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + (sizes.size() == 1 ? ",)" : ")");
}

inline std::string py_dtype(at::ScalarType type) { return "torch." + std::string(c10::getDtypeNames(type).first); }

inline void dims(const char* op, const char* name, const at::Tensor& t, int64_t ndim) {
  TORCH_CHECK_VALUE(t.dim() == ndim, op, ": ", name, " must be ", ndim, "-D; got shape ", py_shape(t.sizes()));
}

// `meaning` names the expected shape's parts, e.g. "(B, H) = ".
inline void shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                  const char* meaning = "") {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", meaning, py_shape(expected), "; got ",
                    py_shape(t.sizes()));
}

inline void index_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
                   " must have dtype in (int32, int64); got ", py_dtype(t.scalar_type()));
}

inline void on_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the cpu like the other arguments; got ",
                    t.device());
}

// The int32 copy every kernel reads, made only after the values were checked to fit (a narrowing
// .to(kInt) of an unchecked int64 would wrap 2^32 + 3 to 3).
inline at::Tensor int32(const at::Tensor& t) { return t.to(at::kInt).contiguous(); }

// ---------------------------------------------------------------------------------------------------
// bsr_linear: values (nnzb, b, b), crow_indices (ceil(N/b) + 1,), col_indices (nnzb,).

// ceil(n / b) for n, b >= 1 (checked first): (n + b - 1) / b overflows for n near 2^63.
inline int64_t ceil_div(int64_t n, int64_t b) { return (n - 1) / b + 1; }

inline void bsr_shapes(const char* op, int64_t nnzb, int64_t b, const at::Tensor& crow, const at::Tensor& col,
                       int64_t out_features, int64_t in_features) {
  TORCH_CHECK_VALUE(out_features >= 1 && in_features >= 1, op, ": out_features and in_features must be >= 1; got ",
                    out_features, " and ", in_features);
  TORCH_CHECK_VALUE(b >= 1, op, ": the block size must be >= 1; got ", b);
  index_dtype(op, "crow_indices", crow);
  index_dtype(op, "col_indices", col);
  dims(op, "crow_indices", crow, 1);
  dims(op, "col_indices", col, 1);
  // crow.numel() - 1 against ceil(N / b): the + 1 would overflow at N = 2^63 - 1, b = 1 (printed unsigned).
  const int64_t block_rows = ceil_div(out_features, b);
  TORCH_CHECK_VALUE(crow.numel() - 1 == block_rows, op,
                    ": crow_indices must have shape (ceil(out_features / b) + 1,) = (",
                    static_cast<uint64_t>(block_rows) + 1, ",); got ", crow.sizes());
  TORCH_CHECK_VALUE(col.numel() == nnzb, op, ": col_indices must have shape (nnzb,) = (", nnzb, ",); got ",
                    col.sizes());
}

// The fast pass: branch-free per block (the inner loop vectorises), ~0.3 ns a block. In a block row,
// strictly increasing columns whose first is >= 0 and last < block_cols are all in range.
template <typename I>
bool bsr_pattern_ok(const I* crow, const I* col, int64_t block_rows, int64_t block_cols, int64_t nnzb) {
  bool ok = crow[0] == 0 && crow[block_rows] == nnzb;
  for (int64_t r = 0; r < block_rows && ok; ++r) {
    const I start = crow[r], end = crow[r + 1];
    ok = start <= end && end <= nnzb;
    if (!ok || start == end) continue;
    ok = col[start] >= 0 && col[end - 1] < block_cols;
    bool rising = true;
    for (I k = start + 1; k < end; ++k) rising &= col[k] > col[k - 1];
    ok = ok && rising;
  }
  return ok;
}

// The precise pass, run only when the fast one fails: the first offending entry, named.
template <typename I>
void bsr_pattern_data(const char* op, const I* crow, const I* col, int64_t block_rows, int64_t block_cols,
                      int64_t nnzb) {
  if (bsr_pattern_ok(crow, col, block_rows, block_cols, nnzb)) return;
  TORCH_CHECK_VALUE(crow[0] == 0, op, ": crow_indices[0] must be 0; got ", crow[0]);
  for (int64_t r = 0; r < block_rows; ++r) {
    TORCH_CHECK_VALUE(crow[r + 1] >= crow[r] && crow[r + 1] <= nnzb, op,
                      ": crow_indices must be non-decreasing and at most the number of blocks (", nnzb,
                      "); crow_indices[", r + 1, "] = ", crow[r + 1], " after crow_indices[", r, "] = ", crow[r]);
    for (int64_t k = crow[r]; k < crow[r + 1]; ++k) {
      TORCH_CHECK_VALUE(col[k] >= 0 && col[k] < block_cols, op, ": col_indices must lie in [0, ", block_cols,
                        ") (block columns of in_features); got col_indices[", k, "] = ", col[k]);
      TORCH_CHECK_VALUE(k == crow[r] || col[k] > col[k - 1], op,
                        ": col_indices must be strictly increasing within each block row; block row ", r, " has ",
                        col[k - 1], " then ", col[k]);
    }
  }
  TORCH_CHECK_VALUE(crow[block_rows] == nnzb, op,
                    ": crow_indices[-1] must equal the number of blocks (col_indices.numel() = ", nnzb, "); got ",
                    crow[block_rows]);
}

// The whole pattern of nnzb blocks of b x b on the CPU; returns the int32 (crow, col) the kernels read.
inline std::pair<at::Tensor, at::Tensor> bsr_pattern(const char* op, int64_t nnzb, int64_t b,
                                                     const at::Tensor& crow_in, const at::Tensor& col_in,
                                                     int64_t out_features, int64_t in_features) {
  bsr_shapes(op, nnzb, b, crow_in, col_in, out_features, in_features);
  on_cpu(op, "crow_indices", crow_in);
  on_cpu(op, "col_indices", col_in);
  TORCH_CHECK_TYPE(col_in.scalar_type() == crow_in.scalar_type(), op, ": crow_indices (", crow_in.scalar_type(),
                   ") and col_indices (", col_in.scalar_type(), ") must have the same dtype");
  TORCH_CHECK_VALUE(nnzb <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 blocks; got ", nnzb);
  const at::Tensor crow = crow_in.contiguous(), col = col_in.contiguous();
  AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "bsr_pattern", [&] {
    bsr_pattern_data<index_t>(op, crow.data_ptr<index_t>(), col.data_ptr<index_t>(), ceil_div(out_features, b),
                              ceil_div(in_features, b), nnzb);
  });
  return {int32(crow), int32(col)};
}

// The same for a values tensor (nnzb, b, b).
inline std::pair<at::Tensor, at::Tensor> bsr_pattern(const char* op, const at::Tensor& values,
                                                     const at::Tensor& crow, const at::Tensor& col,
                                                     int64_t out_features, int64_t in_features) {
  dims(op, "values", values, 3);
  TORCH_CHECK_VALUE(values.size(1) >= 1 && values.size(1) == values.size(2), op,
                    ": values must have shape (nnzb, b, b) with square blocks; got ", values.sizes());
  return bsr_pattern(op, values.size(0), values.size(1), crow, col, out_features, in_features);
}

// The arguments of the public op torch.ops.amnets.bsr_linear_forward, checked once per call before a
// face is chosen, with the messages of amnets_kernels/_validate.py (Python's spelling of shapes and
// dtypes). The index data is read by the kernel (cpu face) or by the op before a Python face.

inline void floating(const char* op, const char* name, const at::Tensor& t) {
  const auto type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16 || type == at::kDouble, op, ": ",
                   name, " must have dtype in (float32, float16, bfloat16, float64); got ", py_dtype(type));
}

// Every tensor on the device of the first one (`ref`, named ref_name); the floating ones in its dtype.
inline void like(const char* op, const char* ref_name, const at::Tensor& ref, const char* name, const at::Tensor& t,
                 bool floating) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), "; all tensors must be on one device");
  TORCH_CHECK_TYPE(!floating || t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
                   py_dtype(t.scalar_type()), " but ", ref_name, " has ", py_dtype(ref.scalar_type()),
                   "; they must match");
}

inline void bsr_linear_args(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                            const at::Tensor& col, int64_t out_features, int64_t in_features,
                            const std::optional<at::Tensor>& bias) {
  floating(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension (..., in_features); got a scalar");
  TORCH_CHECK_VALUE(out_features >= 1, op, ": out_features must be >= 1; got ", out_features);
  TORCH_CHECK_VALUE(in_features >= 1, op, ": in_features must be >= 1; got ", in_features);
  TORCH_CHECK_VALUE(x.size(-1) == in_features, op, ": x.shape[-1] must equal in_features = ", in_features,
                    "; got x of shape ", py_shape(x.sizes()));
  dims(op, "values", values, 3);
  floating(op, "values", values);
  const int64_t b = values.size(1);
  TORCH_CHECK_VALUE(b >= 1 && values.size(2) == b, op, ": values must have shape (nnzb, b, b) with square blocks; got ",
                    py_shape(values.sizes()));
  dims(op, "crow_indices", crow, 1);
  index_dtype(op, "crow_indices", crow);
  dims(op, "col_indices", col, 1);
  index_dtype(op, "col_indices", col);
  // As shape() would say it, compared as numel - 1 (see bsr_shapes: the + 1 overflows at N = 2^63 - 1, b = 1).
  const int64_t block_rows = ceil_div(out_features, b);
  TORCH_CHECK_VALUE(crow.numel() - 1 == block_rows, op,
                    ": crow_indices must have shape (ceil(out_features / b) + 1,) = (",
                    static_cast<uint64_t>(block_rows) + 1, ",); got ", py_shape(crow.sizes()));
  shape(op, "col_indices", col, {values.size(0)}, "(nnzb,) = ");
  TORCH_CHECK_TYPE(crow.scalar_type() == col.scalar_type(), op, ": crow_indices (", py_dtype(crow.scalar_type()),
                   ") and col_indices (", py_dtype(col.scalar_type()), ") must have the same dtype");
  if (bias.has_value()) {
    dims(op, "bias", *bias, 1);
    shape(op, "bias", *bias, {out_features}, "(out_features,) = ");
  }
  like(op, "x", x, "values", values, true);
  if (bias.has_value()) like(op, "x", x, "bias", *bias, true);
  like(op, "x", x, "crow_indices", crow, false);
  like(op, "x", x, "col_indices", col, false);
}

// The arguments of the public lowrank LSTM ops, checked once per call before a face is chosen, with the
// messages of amnets_kernels/_validate.py; returns H. h and c are h0 and c0 of a sequence.
inline int64_t lowrank_lstm_args(const char* op, const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                 const at::Tensor& w_ih_u, const at::Tensor& w_ih_v, const at::Tensor& w_hh_u,
                                 const at::Tensor& w_hh_v, const std::optional<at::Tensor>& bias, bool sequence) {
  dims(op, "x", x, sequence ? 3 : 2);
  floating(op, "x", x);
  TORCH_CHECK_VALUE(!sequence || x.size(0) >= 1, op, ": x must have at least one time step; got shape ",
                    py_shape(x.sizes()));
  const int64_t batch = x.size(-2), d = x.size(-1);
  for (const auto& [name, w] : {std::pair{"w_ih_u", &w_ih_u}, {"w_ih_v", &w_ih_v}, {"w_hh_u", &w_hh_u},
                                {"w_hh_v", &w_hh_v}})
    dims(op, name, *w, 2);
  const int64_t hidden = w_hh_v.size(1);
  TORCH_CHECK_VALUE(hidden >= 1, op, ": w_hh_v must have shape (rank_hh, H) with H >= 1; got ",
                    py_shape(w_hh_v.sizes()));
  const char* h_name = sequence ? "h0" : "h";
  const char* c_name = sequence ? "c0" : "c";
  for (const auto& [name, t] : {std::pair{h_name, &h}, {c_name, &c}}) {
    dims(op, name, *t, 2);
    shape(op, name, *t, {batch, hidden}, "(B, H) = ");
  }
  for (const auto& [pre, w_u, w_v, k] : {std::tuple{"w_ih", &w_ih_u, &w_ih_v, d}, {"w_hh", &w_hh_u, &w_hh_v, hidden}}) {
    const bool input = std::string(pre) == "w_ih";
    TORCH_CHECK_VALUE(w_u->size(0) == 4 * hidden, op, ": ", pre, "_u must have 4*H = ", 4 * hidden,
                      " rows (gates i, f, g, o; H = ", hidden, " from w_hh_v); got shape ", py_shape(w_u->sizes()));
    const int64_t rank = w_u->size(1);
    TORCH_CHECK_VALUE(!input || w_v->size(0) != rank || w_v->size(1) == d, op, ": x's last dim (D = ", d,  // the
                      ") and w_ih_v's columns (", w_v->size(1), ") must agree; got x of shape ",  // factors agree
                      py_shape(x.sizes()), ", w_ih_v of shape ", py_shape(w_v->sizes()));
    shape(op, (std::string(pre) + "_v").c_str(), *w_v, {rank, k}, input ? "(rank, D) = " : "(rank, H) = ");
    TORCH_CHECK_VALUE(rank >= 1 && rank <= std::min(4 * hidden, k), op, ": the rank of ", pre, " (", pre,
                      "_u.shape[1] = ", rank, ") must be in [1, min(4*H, ", input ? "D" : "H", ")] = [1, ",
                      std::min(4 * hidden, k), "]");
  }
  if (bias.has_value()) {
    dims(op, "bias", *bias, 1);
    shape(op, "bias", *bias, {4 * hidden}, "(4*H,) = ");
  }
  for (const auto& [name, t] : {std::pair{h_name, &h}, {c_name, &c}, {"w_ih_u", &w_ih_u}, {"w_ih_v", &w_ih_v},
                                {"w_hh_u", &w_hh_u}, {"w_hh_v", &w_hh_v}})
    like(op, "x", x, name, *t, true);
  if (bias.has_value()) like(op, "x", x, "bias", *bias, true);
  return hidden;
}

// A gradient or saved activation handed to a backward op: its expected shape, and not the empty
// tensor of a forward that ran with save=False.
inline void saved(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  bool empty_expected = false;
  for (int64_t n : expected) empty_expected = empty_expected || n == 0;
  TORCH_CHECK(t.numel() != 0 || empty_expected, op, ": ", name,
              " is empty: the forward ran with save=False, so there is nothing to differentiate");
  shape(op, name, t, expected);
}

// The arguments of the public RNN-T ops, checked once per call before a face is chosen, with the messages of
// amnets_kernels/_validate.py. Labels beside a (B, T, U+1, V) lattice; returns blank in [0, V). The label
// data is checked separately (rnnt_labels, below), on int64 copies: before any narrowing to int32.
inline int64_t rnnt_label_args(const char* op, const at::Tensor& targets, const at::Tensor& frames,
                               const at::Tensor& labels, int64_t batch, int64_t max_labels, int64_t vocab,
                               int64_t blank) {
  dims(op, "targets", targets, 2);
  index_dtype(op, "targets", targets);
  dims(op, "logit_lengths", frames, 1);
  index_dtype(op, "logit_lengths", frames);
  dims(op, "target_lengths", labels, 1);
  index_dtype(op, "target_lengths", labels);
  shape(op, "targets", targets, {batch, max_labels}, "(B, U) = ");
  shape(op, "logit_lengths", frames, {batch}, "(B,) = ");
  shape(op, "target_lengths", labels, {batch}, "(B,) = ");
  TORCH_CHECK_VALUE(-vocab <= blank && blank < vocab, op, ": blank must be in [-V, V) = [", -vocab, ", ", vocab,
                    "); got ", blank);
  return (blank + vocab) % vocab;
}

inline void labels_like(const char* op, const char* ref_name, const at::Tensor& ref, const at::Tensor& targets,
                        const at::Tensor& frames, const at::Tensor& labels) {
  like(op, ref_name, ref, "targets", targets, false);
  like(op, ref_name, ref, "logit_lengths", frames, false);
  like(op, ref_name, ref, "target_lengths", labels, false);
}

// torch.ops.amnets_native.rnnt_device_labels (csrc/rnnt.cpp: the labels' checks on their device): targets (B, U)
// and the lengths (B,), int32 or int64 each, on one device, beside a lattice of max_frames >= 1 frames and
// vocab >= 1 entries with blank in [0, V). `op` names the loss whose labels these are.
inline void rnnt_device_labels_args(const char* op, const at::Tensor& targets, const at::Tensor& frames,
                                    const at::Tensor& labels, int64_t max_frames, int64_t vocab, int64_t blank) {
  dims(op, "targets", targets, 2);
  const int64_t batch = targets.size(0);
  TORCH_CHECK_VALUE(batch >= 1 && max_frames >= 1 && vocab >= 1, op,
                    ": the lattice (B, T, U+1, V) must have every dim >= 1; got B = ", batch, ", T = ", max_frames,
                    ", V = ", vocab);
  TORCH_CHECK_VALUE(blank >= 0 && blank < vocab, op, ": blank must be in [0, V = ", vocab, "); got ", blank);
  rnnt_label_args(op, targets, frames, labels, batch, targets.size(1), vocab, blank);
  labels_like(op, "targets", targets, targets, frames, labels);
}

inline int64_t rnnt_loss_args(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                              const at::Tensor& frames, const at::Tensor& labels, int64_t blank) {
  dims(op, "logits", logits, 4);
  floating(op, "logits", logits);
  const int64_t batch = logits.size(0), steps = logits.size(1), u1 = logits.size(2), vocab = logits.size(3);
  TORCH_CHECK_VALUE(batch >= 1 && steps >= 1 && u1 >= 1 && vocab >= 1, op,
                    ": logits must have shape (B, T, U+1, V) with every dim >= 1; got ", py_shape(logits.sizes()));
  blank = rnnt_label_args(op, targets, frames, labels, batch, u1 - 1, vocab, blank);
  labels_like(op, "logits", logits, targets, frames, labels);
  return blank;
}

// The joint's tensors and activation: enc (B, T, H), pred (B, U+1, H), weight (V, H), bias (V,) in enc's floating
// dtype. The public op checks them with the labels (fused_joint_args); the native faces, called directly, alone.
inline void fused_joint_tensors(const char* op, const at::Tensor& enc, const at::Tensor& pred, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const std::string& activation) {
  dims(op, "enc", enc, 3);
  floating(op, "enc", enc);
  dims(op, "pred", pred, 3);
  dims(op, "weight", weight, 2);
  if (bias.has_value()) dims(op, "bias", *bias, 1);
  const int64_t batch = enc.size(0), steps = enc.size(1), hidden = enc.size(2);
  TORCH_CHECK_VALUE(batch >= 1 && steps >= 1 && hidden >= 1, op,
                    ": enc must have shape (B, T, H) with every dim >= 1; got ", py_shape(enc.sizes()));
  TORCH_CHECK_VALUE(pred.size(0) == batch && pred.size(2) == hidden && pred.size(1) >= 1, op,
                    ": pred must have shape (B, U+1, H) = (", batch, ", U+1, ", hidden, ") to match enc; got ",
                    py_shape(pred.sizes()));
  const int64_t vocab = weight.size(0);
  TORCH_CHECK_VALUE(vocab >= 1 && weight.size(1) == hidden, op, ": weight must have shape (V, H) = (V, ", hidden,
                    ") with V >= 1; got ", py_shape(weight.sizes()));
  if (bias.has_value()) shape(op, "bias", *bias, {vocab}, "(V,) = ");
  TORCH_CHECK_VALUE(activation == "tanh" || activation == "relu" || activation == "identity", op,
                    ": activation must be one of ('tanh', 'relu', 'identity'); got '", activation, "'");
  like(op, "enc", enc, "pred", pred, true);
  like(op, "enc", enc, "weight", weight, true);
  if (bias.has_value()) like(op, "enc", enc, "bias", *bias, true);
}

inline int64_t fused_joint_args(const char* op, const at::Tensor& enc, const at::Tensor& pred, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                const at::Tensor& frames, const at::Tensor& labels, int64_t blank,
                                const std::string& activation) {
  fused_joint_tensors(op, enc, pred, weight, bias, activation);
  blank = rnnt_label_args(op, targets, frames, labels, enc.size(0), pred.size(1) - 1, weight.size(0), blank);
  labels_like(op, "enc", enc, targets, frames, labels);
  return blank;
}

// ---------------------------------------------------------------------------------------------------
// rnnt_loss / fused_joint_rnnt_loss: targets (B, U), logit_lengths and target_lengths (B,).

template <typename I>
void rnnt_label_data(const char* op, const I* targets, const I* frames, const I* labels, int64_t batch,
                     int64_t max_frames, int64_t max_labels, int64_t vocab, int64_t blank) {
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(frames[b] >= 1 && frames[b] <= max_frames, op, ": logit_lengths must lie in [1, ",
                      max_frames, "] (padded T = ", max_frames, "); got logit_lengths[", b, "] = ", frames[b]);
    TORCH_CHECK_VALUE(labels[b] >= 0 && labels[b] <= max_labels, op, ": target_lengths must lie in [0, ",
                      max_labels, "] (padded U = ", max_labels, "); got target_lengths[", b, "] = ", labels[b]);
    for (int64_t u = 0; u < labels[b]; ++u) {
      const I y = targets[b * max_labels + u];
      TORCH_CHECK_VALUE(y >= 0 && y < vocab && y != blank, op, ": targets must lie in [0, V = ", vocab,
                        ") and differ from blank = ", blank, " (within target_lengths); got targets[", b, ", ", u,
                        "] = ", y);
    }
  }
}

// The labels' metadata for a loss over a (B, T, U+1, V) lattice: dims, blank, dtypes, shapes (no data read).
inline void rnnt_label_meta(const char* op, const at::Tensor& targets, const at::Tensor& frames,
                            const at::Tensor& labels, int64_t batch, int64_t max_frames, int64_t labels_plus_1,
                            int64_t vocab, int64_t blank) {
  TORCH_CHECK_VALUE(batch >= 1 && max_frames >= 1 && labels_plus_1 >= 1 && vocab >= 1, op,
                    ": the lattice (B, T, U+1, V) must have every dim >= 1; got (", batch, ", ", max_frames, ", ",
                    labels_plus_1, ", ", vocab, ")");
  TORCH_CHECK_VALUE(blank >= 0 && blank < vocab, op, ": blank must be in [0, V = ", vocab, "); got ", blank);
  const char* names[] = {"targets", "logit_lengths", "target_lengths"};
  const at::Tensor* given[] = {&targets, &frames, &labels};
  for (int i = 0; i < 3; ++i) {
    index_dtype(op, names[i], *given[i]);
    TORCH_CHECK_TYPE(given[i]->scalar_type() == targets.scalar_type(), op, ": ", names[i],
                     " must have the dtype of targets (", targets.scalar_type(), "); got ", given[i]->scalar_type());
  }
  shape(op, "targets", targets, {batch, labels_plus_1 - 1});
  shape(op, "logit_lengths", frames, {batch});
  shape(op, "target_lengths", labels, {batch});
}

// The labels of a loss, on the CPU, checked value by value; returns the int32 (targets, logit_lengths,
// target_lengths) the kernels read.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> rnnt_labels(const char* op, const at::Tensor& targets_in,
                                                                  const at::Tensor& frames_in,
                                                                  const at::Tensor& labels_in, int64_t batch,
                                                                  int64_t max_frames, int64_t labels_plus_1,
                                                                  int64_t vocab, int64_t blank) {
  rnnt_label_meta(op, targets_in, frames_in, labels_in, batch, max_frames, labels_plus_1, vocab, blank);
  on_cpu(op, "targets", targets_in);
  on_cpu(op, "logit_lengths", frames_in);
  on_cpu(op, "target_lengths", labels_in);
  const at::Tensor targets = targets_in.contiguous(), frames = frames_in.contiguous(), labels = labels_in.contiguous();
  AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "rnnt_labels", [&] {
    rnnt_label_data<index_t>(op, targets.data_ptr<index_t>(), frames.data_ptr<index_t>(), labels.data_ptr<index_t>(),
                             batch, max_frames, labels_plus_1 - 1, vocab, blank);
  });
  return {int32(targets), int32(frames), int32(labels)};
}

// What a loss's backward reads of its forward: grad_costs (B,), alphas, betas, den (B, T, U+1).
// `dtype`: the logits' (enc's); the saved lattice is in its accumulation dtype (float64 for float64, else
// float32), as the forward wrote it: another dtype was converted silently, and gave another gradient.
inline void rnnt_saved(const char* op, const at::Tensor& grad_costs, const at::Tensor& alphas,
                       const at::Tensor& betas, const at::Tensor& den, int64_t batch, int64_t frames,
                       int64_t labels_plus_1, at::ScalarType dtype) {
  shape(op, "grad_costs", grad_costs, {batch});
  TORCH_CHECK_TYPE(grad_costs.scalar_type() == dtype, op, ": grad_costs must have the costs' dtype ", py_dtype(dtype),
                   "; got ", py_dtype(grad_costs.scalar_type()));
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [name, t] : {std::pair{"alphas", &alphas}, {"betas", &betas}, {"den", &den}}) {
    TORCH_CHECK_VALUE(t->numel() != 0, op, ": ", name,
                      " is empty: the forward ran with save=False, so there is nothing to differentiate");
    shape(op, name, *t, {batch, frames, labels_plus_1});
    TORCH_CHECK_TYPE(t->scalar_type() == acc, op, ": ", name, " must have dtype ", py_dtype(acc), " (the forward's ",
                     "lattice for ", py_dtype(dtype), " input); got ", py_dtype(t->scalar_type()));
  }
}

// ---------------------------------------------------------------------------------------------------
// lowrank LSTM: x (B, D) or (T, B, D), h and c (B, H), w_ih_u (4H, r_ih), w_ih_v (r_ih, D),
// w_hh_u (4H, r_hh), w_hh_v (r_hh, H), bias (4H,). Returns H. With nn.LSTM's projection w_hr (P, H) (a projected
// stack's layer, lowrank_lstm_stack_step), h and w_hh_v's columns are P wide instead: H is read from w_hr.

inline int64_t lowrank_lstm(const char* op, const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                            const at::Tensor& w_ih_u, const at::Tensor& w_ih_v, const at::Tensor& w_hh_u,
                            const at::Tensor& w_hh_v, const c10::optional<at::Tensor>& bias, bool sequence,
                            const at::Tensor* w_hr = nullptr) {
  dims(op, "x", x, sequence ? 3 : 2);
  for (const auto& [name, t] : {std::pair{"w_ih_u", &w_ih_u}, {"w_ih_v", &w_ih_v}, {"w_hh_u", &w_hh_u},
                                {"w_hh_v", &w_hh_v}})
    dims(op, name, *t, 2);
  if (w_hr != nullptr) dims(op, "w_hr", *w_hr, 2);
  const int64_t batch = x.size(-2), d = x.size(-1);
  const int64_t hidden = w_hr != nullptr ? w_hr->size(1) : w_hh_v.size(1), rec = w_hr != nullptr ? w_hr->size(0) : hidden;
  const int64_t r_ih = w_ih_v.size(0), r_hh = w_hh_v.size(0);
  TORCH_CHECK_VALUE(hidden >= 1 && rec >= 1 && r_ih >= 1 && r_hh >= 1, op,
                    ": hidden size and ranks must be >= 1; got w_ih_v ", w_ih_v.sizes(), ", w_hh_v ", w_hh_v.sizes(),
                    w_hr != nullptr ? ", w_hr " : "", w_hr != nullptr ? py_shape(w_hr->sizes()) : "");
  if (w_hr != nullptr) {
    shape(op, "w_hh_v", w_hh_v, {r_hh, rec}, "(rank_hh, proj_size) = ");
    shape(op, sequence ? "h0" : "h", h, {batch, rec}, "(B, proj_size) = ");
  } else {
    shape(op, sequence ? "h0" : "h", h, {batch, hidden});
  }
  shape(op, sequence ? "c0" : "c", c, {batch, hidden});
  shape(op, "w_ih_u", w_ih_u, {4 * hidden, r_ih});
  shape(op, "w_ih_v", w_ih_v, {r_ih, d});
  shape(op, "w_hh_u", w_hh_u, {4 * hidden, r_hh});
  if (bias.has_value()) shape(op, "bias", *bias, {4 * hidden});
  // The public ops' dtype rule (lowrank_lstm_args): a floating x, every other tensor on its device in its dtype.
  floating(op, "x", x);
  for (const auto& [name, t] : {std::pair{sequence ? "h0" : "h", &h}, {sequence ? "c0" : "c", &c}, {"w_ih_u", &w_ih_u},
                                {"w_ih_v", &w_ih_v}, {"w_hh_u", &w_hh_u}, {"w_hh_v", &w_hh_v}})
    like(op, "x", x, name, *t, true);
  if (w_hr != nullptr) like(op, "x", x, "w_hr", *w_hr, true);
  if (bias.has_value()) like(op, "x", x, "bias", *bias, true);
  return hidden;
}

// The sequence backward's inputs: the forward's, the gradients of (out, h_n, c_n) and what the forward saved.
inline void lowrank_lstm_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& grad_h_n,
                                  const at::Tensor& grad_c_n, const at::Tensor& x, const at::Tensor& h0,
                                  const at::Tensor& c0, const at::Tensor& w_ih_u, const at::Tensor& w_ih_v,
                                  const at::Tensor& w_hh_u, const at::Tensor& w_hh_v, const at::Tensor& out,
                                  const at::Tensor& gates, const at::Tensor& cells) {
  const int64_t hidden = lowrank_lstm(op, x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, c10::nullopt, true);
  const int64_t steps = x.size(0), batch = x.size(1);
  shape(op, "grad_out", grad_out, {steps, batch, hidden});
  shape(op, "grad_h_n", grad_h_n, {batch, hidden});
  shape(op, "grad_c_n", grad_c_n, {batch, hidden});
  shape(op, "out", out, {steps, batch, hidden});
  shape(op, "gates", gates, {steps, batch, 4 * hidden});
  shape(op, "cells", cells, {steps, batch, hidden});
  // Floating, on x's device; not x's dtype: gates and cells are saved in the accumulation dtype.
  for (const auto& [name, t] : {std::pair{"grad_out", &grad_out}, {"grad_h_n", &grad_h_n}, {"grad_c_n", &grad_c_n},
                                {"out", &out}, {"gates", &gates}, {"cells", &cells}}) {
    floating(op, name, *t);
    like(op, "x", x, name, *t, false);
  }
}

}  // namespace amnets::checks
