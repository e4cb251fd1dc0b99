// The AmNets encoder's streaming frame engine on the CPU (python/amnets/encoder.py: AmNetsEncoder.stream
// and AmNetsEncoder.streamer run on it). One native call runs a chunk of frames: per frame the arbitrator,
// every layer's chosen branch, the LSTM update and the state, with no ATen op and no Python in between (a
// frame of a small on-device model costs what its calls cost, ~60 tiny ATen ops before this).
//
// Built once from the encoder's weights (copied: later edits of the model do not reach it):
//   full branch   [W_ih | W_hh] (4H, D + H) as a block-sparse matrix with every 32x32 block stored: the
//                 dense GEMV is the block kernels (frame_engine_kernels.h) at density 1 (one code path for both
//                 branches);
//   cheap branch  sparse: the kept blocks (the encoder's block mask) through the same kernels;
//                 lowrank: s = [V_ih x | V_hh h], then [U_ih | U_hh] s, as axpys over the transposed factors;
//   arbitrator    Linear (axpys over W1^T) -> ReLU -> Linear (row dots); a row is full when logit > cut.
// Blocks are stored transposed (W_k^T, b x b): for a few rows (a live stream) 16 output rows are one vector
// and x is broadcast, so the weights are read once with no horizontal sums (the bsr op's row-major layout
// needs 16 of them per 16 outputs, which costs more than the arithmetic at density 0.2); for many rows
// 16 rows of x are one vector and the weights are broadcast.
// Mixed batches group rows by branch: the full rows pay for the dense weights once, the cheap rows for the
// cheap ones; 64 or more full rows of an fp32 model are one ATen GEMM call (MKL), the one ATen op on the way.
// Weights are fp32 or bf16 (read as bf16, computed in fp32); for bf16 models h and c are rounded to bf16
// after every step, as the bf16 state tensors between chunks hold them, so that chunks continue exactly.
// bf16 low-rank factors on a CPU with AVX512-BF16 stay bf16 and run on vdpbf16ps (kernels.h): x and h are
// bf16 values already, s = [V_ih x | V_hh h] is rounded to bf16 before the U product, as the low-rank LSTM op's
// bf16 forward rounds it (csrc/cpu/lowrank_lstm.cpp).

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/util/BFloat16.h>
#include <torch/custom_class.h>
#include <torch/library.h>
#ifdef AMNETS_PYTHON_MODULE
#include <torch/extension.h>

#include <cmath>

#include "../fast_call.h"
#include "../sources_snapshot.h"
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../face.h"
#include "bf16_convert.h"
#include "frame_engine_kernels.h"
#include "kernels.h"
#include "lstm_pointwise.h"
#include "parallel.h"

namespace amnets::cpu {
namespace {

using at::Tensor;
constexpr const char* kOp = "FrameEngine";
constexpr int64_t kDenseBlock = 32;
// Full-branch rows from which the dense product is an ATen GEMM call (MKL). Below it our broadcast kernel at
// density 1 is faster (python -m benchmarks.dense_rows: 4096x2048 fp32, 1 thread, engine full frame / MKL at
// 8, 16, 32, 48, 64 rows): one AMD EPYC core 0.38, 0.59, 0.73, 0.79, 1.01; one Intel Xeon core (AMX, 480 MB
// L3) 0.45, 0.52, 0.79, 0.79, 1.04 (benchmarks/results/*-1-thread-dense-rows.md). From 64 rows MKL draws
// level, and its packed GEMM keeps the many-row case (our kernel at every row count, tried 2026-12-04 with 48-row
// tiles as bsr_linear's: 0.99 of MKL at 64 rows, 1.20-2.57 from 96 to 256).
constexpr int64_t kGemmRows = 64;

using namespace engine_kernels;  // Bsr and its block kernels (frame_engine_kernels.h)

Bsr own_bsr(const Tensor& values, const Tensor& crow_in, const Tensor& col_in, int64_t n, int64_t k) {
  auto [crow, col] = checks::bsr_pattern(kOp, values, crow_in, col_in, n, k);
  const int64_t b = values.size(1);
  TORCH_CHECK_VALUE((b == 16 || b == 32 || b == 64) &&
                        (values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16),
                    kOp, ": block-sparse weights need b in {16, 32, 64} and fp32 or bf16; got b = ", b, ", ",
                    values.scalar_type());
  return {values.transpose(1, 2).contiguous(), crow.clone(), col.clone(), n, k, b};
}

// Every block of a dense (N, K) matrix, zeros past N and K.
Bsr dense_as_bsr(const Tensor& w) {
  const int64_t n = w.size(0), k = w.size(1), b = kDenseBlock;
  const int64_t nb = (n + b - 1) / b, kb = (k + b - 1) / b;
  const Tensor padded = at::constant_pad_nd(w, {0, kb * b - k, 0, nb * b - n}, 0.0);
  const Tensor values = padded.reshape({nb, b, kb, b}).permute({0, 2, 1, 3}).reshape({nb * kb, b, b});
  const auto int32 = w.options().dtype(at::kInt);
  return own_bsr(values, at::arange(nb + 1, int32) * kb, at::arange(kb, int32).repeat({nb}), n, k);
}

// y (M, N) = x (M, pad, row stride ldx) W^T, on this thread alone below kParallelMinMacs (parallel.h).
void matmul_rows(const Bsr& w, const float* x, int64_t ldx, int64_t M, float* y, std::vector<float>& xt) {
  if (M == 0) return;
  int64_t mp = 0;
  if (M > kFewRowsMax) {
    mp = (M + kWidth - 1) / kWidth * kWidth;
    xt.assign(w.pad() * mp, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < w.pad(); ++j) xt[j * mp + m] = x[m * ldx + j];
  }
  const float* xtp = M > kFewRowsMax ? xt.data() : nullptr;
  const bool bf16 = w.values_t.scalar_type() == at::kBFloat16;
  const int64_t macs = w.values_t.numel() * M;
  const int64_t grain = macs < kParallelMinMacs ? w.block_rows() : 1;
  parallel_for(0, w.block_rows(), grain, [&](int64_t r0, int64_t r1) {
    if (bf16) {
      block_rows_bf16(w, x, ldx, M, xtp, mp, y, r0, r1);
    } else {
      block_rows_f32(w, x, ldx, M, xtp, mp, y, r0, r1);
    }
  });
}

Tensor own_float(const Tensor& t) { return t.to(at::kFloat).contiguous().clone(); }

struct Layer {
  int64_t in = 0, hidden = 0, pad = 0;    // pad: the row stride of [x | h | 0] both branches read
  Bsr full, kept;                          // kept: sparse cheap branch
  // fp32 models: [W_ih | W_hh] row-major for the full branch's GEMM (kGemmRows), built from `full` by the first
  // frame that has that many full rows, or by a stream made for that many (dense_of): a stream of fewer rows never
  // holds this second copy of the dense weights (88 MB at H=1024 x3: building that engine and running a B=1 frame
  // grew the process by 151-160 MB, 215 with the copy; one Intel Xeon).
  std::unique_ptr<std::once_flag> dense_once = std::make_unique<std::once_flag>();
  mutable Tensor dense;
  PackedT v_ih, v_hh, u;                   // lowrank cheap branch: V_ih^T (D, r), V_hh^T (H, r) and
                                           // [U_ih | U_hh]^T (r_ih + r_hh, 4H) as expand's panels
  PackedPairsT v_ih2, v_hh2, u2;           // the same as bf16 pair panels, for bf16 factors on vdpbf16ps
  bool pairs = false;
  Tensor bias;                             // float (4H,)
};

// Scratch of one run() call, sized once per call.
struct Work {
  float *h_ptr = nullptr, *c_ptr = nullptr;  // (L, B, H) float state
  std::vector<char> full;                  // (B, n_dec): the row takes the full branch
  std::vector<float> inp, z, gates;        // (B, width), (B, pad), (B, 4H)
  std::vector<float> s;                    // low-rank [V_ih x | V_hh h]
  std::vector<float> ain, hid, logit;      // arbitrator
  std::vector<float> xt;                   // x transposed, for many rows
  std::vector<float> xf;                   // bf16 frames widened
  std::vector<int64_t> order;  // the batch's rows in branch order: the full ones, then the cheap ones
};

// t (fp32 or bf16, any strides) into dst as contiguous floats.
void load_float(const Tensor& t, float* dst) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) {
    std::memcpy(dst, t.data_ptr<float>(), t.numel() * sizeof(float));
  } else {
    at::from_blob(dst, t.sizes(), t.options().dtype(at::kFloat)).copy_(t);
  }
}

// How run() and a stream call run their arithmetic: as it is, for C++ callers (see WithoutGil).
struct Directly {
  template <typename F>
  void operator()(F&& f) const {
    f();
  }
};

// A stream's state is one: a call into a stream marks it in use, and a second thread entering the same stream
// meanwhile (the Python bindings release the GIL while a chunk runs) gets an error, not a torn state.
class InUse {
 public:
  explicit InUse(std::atomic<bool>& flag) : flag_(flag) {
    TORCH_CHECK(!flag_.exchange(true), kOp, ": this stream is in use by another thread; give each thread its own "
                "stream (Streamer.fork() copies one)");
  }
  ~InUse() { flag_.store(false); }
  InUse(const InUse&) = delete;
  InUse& operator=(const InUse&) = delete;

 private:
  std::atomic<bool>& flag_;
};

}  // namespace

// Output tensors an engine or a stream hands out, taken back for a later call once the caller has let go of
// them: only the pool holds the tensor and its storage (no view of it lives), nothing asked for its gradient,
// and it was made under the inference mode now in force. A frame then allocates nothing and makes no new
// Python object (the outputs' malloc, construction and destruction: a tiny 2-layer frame took 1.88 us before,
// 1.18 after, one AMD EPYC core).
// A full pool lets go of a free slot's tensor for the new one into `evicted`, which the caller drops after
// unlocking the pool: freeing a tensor that had a Python object can release the GIL inside torch
// (THPVariable_clear), and a thread that holds the GIL and waits for the lock would then deadlock with this one
// (two Python threads streaming on one engine hung within seconds before).
class OutputPool {
 public:
  Tensor take(at::IntArrayRef sizes, at::ScalarType dtype, Tensor& evicted) {
    const bool inference = c10::InferenceMode::is_enabled();
    Tensor* spare = nullptr;  // a slot free for a new tensor
    for (Tensor& t : slots_) {
      if (!only_pool_holds(t) || t.requires_grad()) continue;
      if (t.scalar_type() == dtype && t.sizes() == sizes && t.is_contiguous() && t.is_inference() == inference)
        return t;
      spare = &t;
    }
    Tensor t = at::detail::empty_cpu(sizes, at::TensorOptions().dtype(dtype));
    if (slots_.size() < kSlots) slots_.push_back(t);
    else if (spare != nullptr) evicted = std::exchange(*spare, t);
    return t;
  }

 private:
  // No view or numpy array shares the storage, and nothing but the pool holds the tensor: torch (2.13, 2.14)
  // keeps a tensor that went to Python and its Python object alive together, so then the object holds the
  // tensor's second reference and the tensor the object's only one.
  static bool only_pool_holds(const Tensor& t) {
    if (t.storage().use_count() != 1) return false;
    return t.use_count() == 1 ||
           (t.use_count() == 2 && t.unsafeGetTensorImpl()->pyobj_slot()->has_unique_reference());
  }

  // A caller that keeps a few frames' outputs still finds free ones, and so do streams on a few threads at once
  // (each holds its last state and four outputs while its chunk runs).
  static constexpr size_t kSlots = 16;
  std::vector<Tensor> slots_;
};

struct FrameEngine : torch::CustomClassHolder {
  std::vector<Layer> layers;
  PackedT w1t;             // arbitrator: W1^T (D_a, width) as expand's panels
  Tensor b1, w2, b2;       // float
  bool lowrank = false, uses_state = false, per_layer = false;
  int64_t input_size = 0, hidden = 0, n_dec = 1;
  at::ScalarType dtype = at::kFloat;
  // run()'s outputs: a caller that passes each chunk's state on to the next lets go of the one before, so a
  // call allocates nothing (four fresh tensors were ~2 us of a 10 us H=192 frame). Locked: C++ and TorchScript
  // callers may share an engine between threads.
  std::mutex pool_mutex;
  OutputPool pool;

  // cheap: "sparse" | "lowrank". layer_tensors per layer: sparse [W (4H, D+H), kept values, kept crow,
  // kept col, bias]; lowrank [W, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias]. arbitrator: [W1, b1, W2, b2].
  FrameEngine(const std::string& cheap, const std::vector<Tensor>& layer_tensors,
              const std::vector<Tensor>& arbitrator, int64_t input_size_, bool uses_state_, bool per_layer_)
      : lowrank(cheap == "lowrank"), uses_state(uses_state_), per_layer(per_layer_), input_size(input_size_) {
    TORCH_CHECK_VALUE(cheap == "sparse" || cheap == "lowrank", kOp, ": cheap must be 'sparse' or 'lowrank'; got ",
                      cheap);
    const size_t per = lowrank ? 6 : 5;
    TORCH_CHECK_VALUE(!layer_tensors.empty() && layer_tensors.size() % per == 0, kOp, ": layer_tensors must hold ",
                      per, " tensors per layer; got ", layer_tensors.size());
    TORCH_CHECK_VALUE(arbitrator.size() == 4, kOp, ": arbitrator must be [W1, b1, W2, b2]");
    dtype = layer_tensors[0].scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16, kOp, ": weights must be fp32 or bf16; got ",
                     dtype);
    int64_t in = input_size;
    for (size_t at_ = 0; at_ < layer_tensors.size(); at_ += per) {
      const Tensor* t = layer_tensors.data() + at_;
      Layer layer;
      const std::string of = "layer " + std::to_string(layers.size()) + "'s ";
      checks::dims(kOp, "W", t[0], 2);
      check_weight(of + "W", t[0]);
      if (lowrank) {
        const char* names[] = {"w_ih_u", "w_ih_v", "w_hh_u", "w_hh_v"};
        for (int i = 0; i < 4; ++i) check_weight(of + names[i], t[1 + i]);
      } else {
        check_weight(of + "kept values", t[1]);
      }
      check_weight(of + "bias", t[per - 1]);
      layer.hidden = t[0].size(0) / 4;
      layer.in = in;
      TORCH_CHECK_VALUE(layer.hidden >= 1 && t[0].size(0) == 4 * layer.hidden && t[0].size(1) == in + layer.hidden,
                        kOp, ": layer ", layers.size(), "'s W must be (4H, ", in, " + H); got ", t[0].sizes());
      TORCH_CHECK_VALUE(hidden == 0 || layer.hidden == hidden, kOp, ": every layer must have one hidden size");
      hidden = layer.hidden;
      layer.full = dense_as_bsr(t[0]);
      if (lowrank) {
        checks::lowrank_lstm(kOp, t[0].new_empty({0, in}), t[0].new_empty({0, hidden}), t[0].new_empty({0, hidden}),
                             t[1], t[2], t[3], t[4], t[5], false);
        const Tensor u = at::cat({t[1], t[3]}, 1);
        layer.pairs = dtype == at::kBFloat16 && simd::has_dpbf16();
        if (layer.pairs) {
          layer.v_ih2 = pack_pairs_transposed(t[2]), layer.v_hh2 = pack_pairs_transposed(t[4]);
          layer.u2 = pack_pairs_transposed(u);
        } else {
          layer.v_ih = pack_transposed(t[2]), layer.v_hh = pack_transposed(t[4]), layer.u = pack_transposed(u);
        }
      } else {
        layer.kept = own_bsr(t[1], t[2], t[3], 4 * hidden, in + hidden);
      }
      layer.pad = std::max(layer.full.pad(), lowrank ? 0 : layer.kept.pad());
      checks::shape(kOp, "bias", t[per - 1], {4 * hidden});
      layer.bias = own_float(t[per - 1]);
      layers.push_back(std::move(layer));
      in = hidden;
    }
    n_dec = per_layer ? static_cast<int64_t>(layers.size()) : 1;
    const int64_t a_in = input_size + (uses_state ? hidden : 0);
    const char* arbitrator_names[] = {"arbitrator W1", "arbitrator b1", "arbitrator W2", "arbitrator b2"};
    for (int i = 0; i < 4; ++i) check_weight(arbitrator_names[i], arbitrator[i]);
    checks::dims(kOp, "W1", arbitrator[0], 2);
    const int64_t width = arbitrator[0].size(0);
    checks::shape(kOp, "W1", arbitrator[0], {width, a_in});
    checks::shape(kOp, "b1", arbitrator[1], {width});
    checks::shape(kOp, "W2", arbitrator[2], {n_dec, width});
    checks::shape(kOp, "b2", arbitrator[3], {n_dec});
    w1t = pack_transposed(arbitrator[0]), b1 = own_float(arbitrator[1]);
    w2 = own_float(arbitrator[2]), b2 = own_float(arbitrator[3]);
  }

  // Every tensor the engine copies is a CPU tensor of the weights' dtype, checked by name at construction: an
  // fp32 factor of a bf16 engine was an internal assert, a meta one "data is not allocated yet" at run(), and
  // int64 or float64 ones were converted silently.
  void check_weight(const std::string& name, const Tensor& t) const {
    TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, ": ", name, " must be on the cpu like the other weights; got ",
                      t.device());
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, kOp, ": ", name, " must have the weights' dtype ",
                     checks::py_dtype(dtype), "; got ", checks::py_dtype(t.scalar_type()));
  }

  // x (B, T, D) and h0, c0 (L, B, H) in the weights' dtype (both undefined: zeros, a stream's first chunk).
  // force: -1 the arbitrator decides (full when logit > cut), 0 every row cheap, 1 every row full, 2 per row
  // from `rows` (B,) bool on the CPU (True: full).
  // -> (out (B, T, H), h_n, c_n (L, B, H), decisions (B, T) bool, or (B, T, L) with per-layer decisions).
  // Host cost: the checks and four outputs from the pool, a few microseconds. `around` runs the arithmetic
  // (all but the checks and the pool, which reads Python reference counts): the Python bindings pass
  // WithoutGil.
  template <typename Around = Directly>
  std::tuple<Tensor, Tensor, Tensor, Tensor> run(const Tensor& x, const Tensor& h0, const Tensor& c0, int64_t force,
                                                 const c10::optional<Tensor>& rows_in, double cut,
                                                 Around around = {}) {
    check_frames(x, -1);
    const int64_t L = static_cast<int64_t>(layers.size()), B = x.size(0);
    TORCH_CHECK_VALUE(h0.defined() == c0.defined(), kOp, ": pass both h and c, or neither");
    const bool zeros = !h0.defined();
    if (!zeros) {
      for (const auto& [name, t] : {std::pair{"h", &h0}, {"c", &c0}}) check_like_weights(name, *t);
      checks::shape(kOp, "h", h0, {L, B, hidden});
      checks::shape(kOp, "c", c0, {L, B, hidden});
    }
    const Tensor rows = force_rows(force, rows_in, B);
    Tensor out, h_n, c_n, decisions, evicted[4];  // (evicted: dropped at the end, after the lock; see OutputPool)
    {
      const std::lock_guard<std::mutex> lock(pool_mutex);
      out = pool.take(out_sizes(x), dtype, evicted[0]);
      decisions = pool.take(decision_sizes(x), at::kBool, evicted[1]);
      h_n = pool.take({L, B, hidden}, dtype, evicted[2]), c_n = pool.take({L, B, hidden}, dtype, evicted[3]);
    }
    around([&] {
      // The state is float while the chunk runs: in h_n / c_n, or for bf16 models in scratch, converted at the
      // end (exactly: every step rounds it to bf16).
      const bool f32 = dtype == at::kFloat;
      thread_local std::vector<float> h_scratch, c_scratch;
      if (!f32) h_scratch.resize(h_n.numel()), c_scratch.resize(c_n.numel());
      float* h = f32 ? h_n.data_ptr<float>() : h_scratch.data();
      float* c = f32 ? c_n.data_ptr<float>() : c_scratch.data();
      if (zeros) {
        std::fill_n(h, h_n.numel(), 0.f), std::fill_n(c, c_n.numel(), 0.f);
      } else {
        load_float(h0, h), load_float(c0, c);
      }
      advance(x, h, c, force, rows, cut, out, decisions);
      if (!f32) {
        narrow_bf16(h, h_n.data_ptr<c10::BFloat16>(), h_n.numel());
        narrow_bf16(c, c_n.data_ptr<c10::BFloat16>(), c_n.numel());
      }
    });
    return {out, h_n, c_n, decisions};
  }

  // x must be (B, T, input_size) on the CPU in the weights' dtype, B = batch unless batch < 0.
  void check_frames(const Tensor& x, int64_t batch) const {
    checks::dims(kOp, "x", x, 3);
    TORCH_CHECK_VALUE(x.size(2) == input_size && (batch < 0 || x.size(0) == batch), kOp, ": x must be (",
                      batch < 0 ? std::string("B") : std::to_string(batch), ", T, input_size = ", input_size,
                      "); got ", x.sizes());
    check_like_weights("x", x);
  }

  // Strided too: a sparse or mkldnn tensor of the right shape has no storage for load_float to read.
  void check_like_weights(const char* name, const Tensor& t) const {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype && t.device().is_cpu() && t.layout() == at::kStrided, kOp, ": ", name,
                     " must be a dense (strided) CPU ", dtype, " tensor like the engine's weights; got ",
                     t.scalar_type(), " ", t.layout(), " on ", t.device());
  }

  // The checked force code and its rows (contiguous; undefined unless force == 2).
  static Tensor force_rows(int64_t force, const c10::optional<Tensor>& rows_in, int64_t B) {
    TORCH_CHECK_VALUE(force >= -1 && force <= 2, kOp, ": force must be -1, 0, 1 or 2; got ", force);
    if (force != 2) return Tensor();
    TORCH_CHECK_VALUE(rows_in.has_value() && rows_in->scalar_type() == at::kBool && rows_in->is_cpu(), kOp,
                      ": force = 2 needs rows, a (B,) bool tensor on the CPU");
    checks::shape(kOp, "rows", *rows_in, {B});
    return rows_in->contiguous();
  }

  // advance's outputs for frames x (B, T, D): out (B, T, H) in the weights' dtype, decisions (bool) (B, T),
  // or (B, T, L) with per-layer decisions.
  using Sizes = c10::SmallVector<int64_t, 3>;  // no heap allocation per call
  Sizes out_sizes(const Tensor& x) const { return {x.size(0), x.size(1), hidden}; }
  Sizes decision_sizes(const Tensor& x) const {
    if (per_layer) return {x.size(0), x.size(1), n_dec};
    return {x.size(0), x.size(1)};
  }

  // The chunk x (checked) from the float state h, c (L, B, H, contiguous), which it updates in place, into
  // out and decisions (contiguous, of out_sizes / decision_sizes).
  void advance(const Tensor& x_in, float* h, float* c, int64_t force, const Tensor& rows, double cut,
               const Tensor& out, const Tensor& decisions) const {
    const int64_t L = static_cast<int64_t>(layers.size()), H = hidden, B = x_in.size(0), T = x_in.size(1);
    const bool f32 = dtype == at::kFloat;
    thread_local Work w;
    w.h_ptr = h, w.c_ptr = c;
    const Tensor x = x_in.contiguous();  // the weights' dtype (checked)
    if (!f32) {
      w.xf.resize(x.numel());
      widen_bf16(x.data_ptr<c10::BFloat16>(), w.xf.data(), x.numel());
    }
    const float* xp = f32 ? x.data_ptr<float>() : w.xf.data();
    bool* dp = decisions.data_ptr<bool>();
    void* op = out.data_ptr();  // float, or bf16 for bf16 models
    const bool* rp = rows.defined() ? rows.data_ptr<bool>() : nullptr;
    w.full.resize(B * n_dec);
    for (int64_t t = 0; t < T; ++t) {
      w.inp.resize(B * input_size);
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(w.inp.data() + b * input_size, xp + (b * T + t) * input_size, input_size * sizeof(float));
      decide(w, B, force, rp, cut);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < n_dec; ++j) dp[(b * T + t) * n_dec + j] = w.full[b * n_dec + j];
      for (int64_t k = 0; k < L; ++k) step(layers[k], w, B, k);
      for (int64_t b = 0; b < B; ++b) {
        const float* h_top = w.inp.data() + b * H;
        if (f32) {
          std::memcpy(static_cast<float*>(op) + (b * T + t) * H, h_top, H * sizeof(float));
        } else {  // h is already rounded to bf16 (see step): the conversion is exact
          narrow_bf16(h_top, static_cast<c10::BFloat16*>(op) + (b * T + t) * H, H);
        }
      }
    }
  }

  // The GEMM's weights of every layer (dense_of), for a stream that can have kGemmRows full rows.
  void prepare_gemm() const {
    if (dtype != at::kFloat) return;
    for (const Layer& layer : layers) dense_of(layer);
  }

 private:
  // full[b * n_dec + j]: row b takes the full branch (for layer j with per-layer decisions).
  void decide(Work& w, int64_t B, int64_t force, const bool* rows, double cut) const {
    std::vector<char>& full = w.full;
    if (force != -1) {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < n_dec; ++j) full[b * n_dec + j] = force == 2 ? rows[b] : force == 1;
      return;
    }
    const int64_t a_in = w1t.R, width = w1t.G, H = hidden;
    const float* h_top = w.h_ptr + (layers.size() - 1) * B * H;
    w.ain.resize(B * a_in), w.hid.resize(B * width), w.logit.resize(B * n_dec);
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(w.ain.data() + b * a_in, w.inp.data() + b * input_size, input_size * sizeof(float));
      if (uses_state) std::memcpy(w.ain.data() + b * a_in + input_size, h_top + b * H, H * sizeof(float));
    }
    expand(w1t.panels, a_in, width, w.ain.data(), a_in, B, w.hid.data(), width, false);  // no horizontal sums
    const float *bias1 = b1.data_ptr<float>(), *bias2 = b2.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < width; ++j) w.hid[b * width + j] = std::max(w.hid[b * width + j] + bias1[j], 0.f);
    for (int64_t b0 = 0; b0 < B; b0 += kMaxDotBatch) {
      const int64_t n = std::min(kMaxDotBatch, B - b0);
      small_batch_mm(w.hid.data() + b0 * width, n, w2.data_ptr<float>(), n_dec, width, w.logit.data() + b0 * n_dec,
                     false);
    }
    for (int64_t i = 0; i < B * n_dec; ++i) full[i] = w.logit[i] + bias2[i % n_dec] > cut;
  }

  // One layer for every row: gates of each row by its branch, then the LSTM update; w.inp becomes h.
  // z and the gates hold the rows in branch order (the full rows, then the cheap ones), so that each branch
  // reads and writes one contiguous run of rows: gathering each branch's rows and scattering their gates
  // cost a mixed B=64 H=1024 x3 frame ~1 ms (one Intel Xeon core; lowrank f=0.25: 9.3-10.0 ms against
  // 8.3 for its 16 full and 48 cheap rows run as two batches).
  void step(const Layer& layer, Work& w, int64_t B, int64_t k) const {
    const int64_t H = hidden, D = layer.in, G = 4 * H, pad = layer.pad;
    const std::vector<char>& full = w.full;
    float* h = w.h_ptr + k * B * H;
    float* c = w.c_ptr + k * B * H;
    const int64_t j = per_layer ? k : 0;
    std::vector<int64_t>& order = w.order;
    order.clear();
    for (int64_t b = 0; b < B; ++b)
      if (full[b * n_dec + j]) order.push_back(b);
    const int64_t n_full = static_cast<int64_t>(order.size());
    for (int64_t b = 0; b < B; ++b)
      if (!full[b * n_dec + j]) order.push_back(b);
    w.z.assign(B * pad, 0.f);
    for (int64_t i = 0; i < B; ++i) {  // z = [x | h | zeros], in branch order
      std::memcpy(w.z.data() + i * pad, w.inp.data() + order[i] * D, D * sizeof(float));
      std::memcpy(w.z.data() + i * pad + D, h + order[i] * H, H * sizeof(float));
    }
    w.gates.resize(B * G);
    branch(layer, w, true, 0, n_full, pad);
    branch(layer, w, false, n_full, B - n_full, pad);
    for (int64_t i = 0; i < B; ++i)
      finish_step(w.gates.data() + i * G, layer.bias.data_ptr<float>(), c + order[i] * H, h + order[i] * H, 1, H);
    if (dtype == at::kBFloat16) {  // as the bf16 state tensors between chunks hold them
      round_to_bf16(h, B * H), round_to_bf16(c, B * H);
    }
    w.inp.assign(h, h + B * H);
  }

  // layer.dense, built once (thread-safe: streams on one engine may run on several threads) from the blocks.
  const Tensor& dense_of(const Layer& layer) const {
    std::call_once(*layer.dense_once, [&] {
      const Bsr& w = layer.full;
      const int64_t nb = w.block_rows(), kb = w.values_t.size(0) / nb, b = w.b;  // values_t[k][j][i] = W_k[i][j]
      layer.dense = w.values_t.view({nb, kb, b, b}).permute({0, 3, 1, 2}).reshape({nb * b, kb * b})
                        .narrow(0, 0, w.n).narrow(1, 0, w.k).contiguous();
    });
    return layer.dense;
  }

  // gates of the n rows from `first` (branch order) through the full or the cheap branch, reading their z.
  void branch(const Layer& layer, Work& w, bool full, int64_t first, int64_t n, int64_t pad) const {
    if (n == 0) return;
    const float* z = w.z.data() + first * pad;
    float* gates = w.gates.data() + first * 4 * hidden;
    if (full && n >= kGemmRows && dtype == at::kFloat) {
      // Many full rows are compute-bound: ATen's GEMM (MKL), so that the dense baseline is never slowed by
      // our kernel (see kGemmRows).
      const Tensor& dense = dense_of(layer);
      const auto f32 = dense.options();
      Tensor y = at::from_blob(gates, {n, 4 * hidden}, f32);
      at::mm_out(y, at::from_blob(const_cast<float*>(z), {n, pad}, f32).narrow(1, 0, dense.size(1)), dense.t());
    } else if (full || !lowrank) {
      matmul_rows(full ? layer.full : layer.kept, z, pad, n, gates, w.xt);
    } else {
      lowrank_gates(layer, w, z, pad, n, gates);
    }
  }

  // gates (n, 4H) = U_ih (V_ih x) + U_hh (V_hh h) = [U_ih | U_hh] [V_ih x | V_hh h] for rows z (n, pad) =
  // [x | h | 0]: three products, each as axpys over the transposed factor (expand), x and h read in place from
  // z; one product with the stacked U writes the gates once (two read and wrote them twice).
  void lowrank_gates(const Layer& layer, Work& w, const float* z, int64_t pad, int64_t n, float* gates) const {
    if (layer.pairs) return lowrank_gates(layer.v_ih2, layer.v_hh2, layer.u2, layer.in, w, z, pad, n, gates);
    lowrank_gates(layer.v_ih, layer.v_hh, layer.u, layer.in, w, z, pad, n, gates);
  }

  template <typename Packed>
  void lowrank_gates(const Packed& v_ih, const Packed& v_hh, const Packed& u, int64_t D, Work& w, const float* z,
                     int64_t pad, int64_t n, float* gates) const {
    const int64_t H = hidden, r_ih = v_ih.G, r = u.R;
    w.s.resize(n * r);
    expand(v_ih.panels, D, r_ih, z, pad, n, w.s.data(), r, false);
    expand(v_hh.panels, H, v_hh.G, z + D, pad, n, w.s.data() + r_ih, r, false);
    expand(u.panels, r, 4 * H, w.s.data(), r, n, gates, 4 * H, false);
  }
};

// A live stream on an engine (what Python's Streamer calls): the state stays here as floats and is updated
// in place, so a call converts one argument and returns two outputs, not three and four as run(). One thread
// at a time (one state): every method marks the stream in use (InUse).
struct EngineStream {
  c10::intrusive_ptr<FrameEngine> engine;
  int64_t batch, force;
  Tensor rows, h, c;  // h, c: (L, batch, H) float
  double cut;
  OutputPool pool;
  std::unique_ptr<std::atomic<bool>> busy = std::make_unique<std::atomic<bool>>(false);

  EngineStream(c10::intrusive_ptr<FrameEngine> engine_, int64_t batch_, int64_t force_,
               const c10::optional<Tensor>& rows_in, double cut_)
      : engine(std::move(engine_)), batch(batch_), force(force_), cut(cut_) {
    TORCH_CHECK_VALUE(batch >= 1, kOp, ": a stream's batch must be >= 1; got ", batch);
    rows = FrameEngine::force_rows(force, rows_in, batch);
    if (rows.defined()) rows = rows.clone();
    const auto as_float = at::TensorOptions().dtype(at::kFloat);
    h = at::zeros({static_cast<int64_t>(engine->layers.size()), batch, engine->hidden}, as_float);
    c = at::zeros_like(h);
    // A stream that can have kGemmRows full rows builds the GEMM's weights now, not in the middle of a frame
    // (~40 ms at H=1024 x3 on one Intel Xeon core).
    if (batch >= kGemmRows) engine->prepare_gemm();
  }

  // `around` as in FrameEngine::run.
  template <typename Around = Directly>
  std::tuple<Tensor, Tensor> operator()(const Tensor& x, Around around = {}) {
    Tensor evicted[2];  // (destroyed last, when this stream is no longer in use: see OutputPool)
    const InUse use(*busy);
    // The backend may have changed since the stream was made: another face chosen is never run silently here.
    const face::Backend now = face::current();
    TORCH_CHECK_VALUE(now == face::Backend::Auto || now == face::Backend::Cpu, "AmNetsEncoder.streamer: this stream ",
                      "runs the cpu frame engine, which backend '", face::name(now), "' (now in force) does not run: ",
                      "make a new streamer under it, or call stream()");
    engine->check_frames(x, batch);
    Tensor out = pool.take(engine->out_sizes(x), engine->dtype, evicted[0]);
    Tensor decisions = pool.take(engine->decision_sizes(x), at::kBool, evicted[1]);
    around([&] { engine->advance(x, h.data_ptr<float>(), c.data_ptr<float>(), force, rows, cut, out, decisions); });
    return {std::move(out), std::move(decisions)};
  }

  // Copies in the weights' dtype: a state read earlier does not change with later calls.
  std::tuple<Tensor, Tensor> state() const {
    const InUse use(*busy);
    if (engine->dtype == at::kFloat) return {h.clone(), c.clone()};
    return {h.to(engine->dtype), c.to(engine->dtype)};
  }

  void set_state(const Tensor& h0, const Tensor& c0) {
    const InUse use(*busy);
    for (const auto& [name, t] : {std::pair{"h", &h0}, {"c", &c0}}) {
      engine->check_like_weights(name, *t);
      checks::shape(kOp, name, *t, h.sizes());
    }
    load_float(h0, h.data_ptr<float>()), load_float(c0, c.data_ptr<float>());
  }

  void reset() {
    const InUse use(*busy);
    h.zero_(), c.zero_();
  }

  // Another stream on the same engine from this one's state now, with its own state and outputs.
  EngineStream fork() const {
    const InUse use(*busy);
    EngineStream other(engine, batch, force, rows.defined() ? c10::optional<Tensor>(rows) : c10::nullopt, cut);
    other.h.copy_(h), other.c.copy_(c);
    return other;
  }
};

#ifdef AMNETS_PYTHON_MODULE  // the Python module amnets_kernels._C; not the library a C++ program loads
// AmNetsEncoder.stream() in one native call, from its Python arguments as given (python/amnets/encoder.py):
// whether the engine still matches the weights and the backend it was built under, the arguments' kinds and
// the engine's run. Python around it cost ~2 us a call, a fifth of a cheap H=192 frame. Returns None where
// this path does not apply, and stream() then takes its checked Python path:
//   the weights or the backend changed since the engine was built (stream() rebuilds it);
//   a state that is not None or a pair of tensors, force not None / "full" / "cheap" / a tensor, a threshold
//   not a float or int in [0, 1];
//   arguments the engine refuses (TypeError or ValueError): stream()'s own checks name them in its words.
class StreamCall {
 public:
  // `sources` is owned by the Python SourcesSnapshot object that the StreamCall function holds with it.
  static constexpr const char* kName = "amnets.StreamCall";
  static constexpr const char* kDoc = "AmNetsEncoder.stream() in one native call, or None";
  static constexpr int kArity = 6;  // (x, state, force, threshold, default_force, default_threshold)

  StreamCall(c10::intrusive_ptr<FrameEngine> engine, const SourcesSnapshot* sources)
      : engine_(std::move(engine)), sources_(sources), backend_(face::current()) {}

  pybind11::object operator()(PyObject* const* args) const {
    return (*this)(args[0], args[1], args[2], args[3], args[4], args[5]);
  }

  // force / threshold None: the encoder's own, default_force / default_threshold.
  pybind11::object operator()(pybind11::handle x, pybind11::handle state, pybind11::handle force,
                              pybind11::handle threshold, pybind11::handle default_force,
                              pybind11::handle default_threshold) const {
    const pybind11::object skip = pybind11::none();
    if (force.is_none()) force = default_force;
    if (threshold.is_none()) threshold = default_threshold;
    int64_t code = -1;  // FrameEngine::run's force codes
    c10::optional<Tensor> rows;
    if (THPVariable_Check(force.ptr())) {  // per row (the engine checks it: a (B,) bool tensor on the CPU)
      code = 2, rows = THPVariable_Unpack(force.ptr());
    } else if (!force.is_none()) {
      if (!PyUnicode_Check(force.ptr())) return skip;
      code = PyUnicode_CompareWithASCIIString(force.ptr(), "cheap") == 0  ? 0
             : PyUnicode_CompareWithASCIIString(force.ptr(), "full") == 0 ? 1
                                                                          : -2;
      if (code == -2) return skip;
    }
    double p = 0.0;
    if (PyFloat_CheckExact(threshold.ptr())) {
      p = PyFloat_AS_DOUBLE(threshold.ptr());
    } else if (PyLong_CheckExact(threshold.ptr())) {  // 0 or 1 (True and False are not thresholds)
      const long whole = PyLong_AsLong(threshold.ptr());
      if (whole == -1 && PyErr_Occurred()) return PyErr_Clear(), skip;
      p = static_cast<double>(whole);
    } else {
      return skip;
    }
    if (!(p >= 0.0 && p <= 1.0)) return skip;
    Tensor h0, c0;  // undefined for state None: zeros
    if (!state.is_none()) {
      PyObject *h = nullptr, *c = nullptr;
      if (PyTuple_Check(state.ptr()) && PyTuple_GET_SIZE(state.ptr()) == 2) {
        h = PyTuple_GET_ITEM(state.ptr(), 0), c = PyTuple_GET_ITEM(state.ptr(), 1);
      } else if (PyList_Check(state.ptr()) && PyList_GET_SIZE(state.ptr()) == 2) {
        h = PyList_GET_ITEM(state.ptr(), 0), c = PyList_GET_ITEM(state.ptr(), 1);
      }
      if (h == nullptr || !THPVariable_Check(h) || !THPVariable_Check(c)) return skip;
      h0 = THPVariable_Unpack(h), c0 = THPVariable_Unpack(c);
    }
    if (!THPVariable_Check(x.ptr()) || face::current() != backend_ || !sources_->matches()) return skip;
    // p_full > p exactly when the arbitrator's logit > logit(p), as encoder.py's _logit computes it.
    const double cut = p == 0.0 ? -INFINITY : p == 1.0 ? INFINITY : std::log(p / (1.0 - p));
    try {
      auto [out, h, c, decisions] = engine_->run(THPVariable_Unpack(x.ptr()), h0, c0, code, rows, cut, WithoutGil());
      return pybind11::make_tuple(std::move(out), pybind11::make_tuple(std::move(h), std::move(c)),
                                  std::move(decisions));
    } catch (const c10::ValueError&) {
      return skip;
    } catch (const c10::TypeError&) {
      return skip;
    }
  }

 private:
  c10::intrusive_ptr<FrameEngine> engine_;
  const SourcesSnapshot* sources_;
  face::Backend backend_;
};

// The same engine for Python callers, bound directly: a TorchScript custom-class method call costs ~8 us
// from Python, more than a frame of a small model; a pybind11 call ~1 us. (csrc/build_info.cpp calls this.)
void bind_frame_engine(pybind11::module_& m) {
  pybind11::class_<FrameEngine, c10::intrusive_ptr<FrameEngine>>(m, "FrameEngine")
      .def(pybind11::init([](const std::string& cheap, const std::vector<Tensor>& layers,
                             const std::vector<Tensor>& arbitrator, int64_t input_size, bool uses_state,
                             bool per_layer) {
        return c10::make_intrusive<FrameEngine>(cheap, layers, arbitrator, input_size, uses_state, per_layer);
      }))
      .def("run", [](FrameEngine& self, const Tensor& x, const Tensor& h0, const Tensor& c0, int64_t force,
                     const c10::optional<Tensor>& rows, double cut) {
        return self.run(x, h0, c0, force, rows, cut, WithoutGil());
      })
      .def("stream", [](c10::intrusive_ptr<FrameEngine> self, int64_t batch, int64_t force,
                        const c10::optional<Tensor>& rows, double cut) {
        return EngineStream(std::move(self), batch, force, rows, cut);
      });
  // _C.StreamCall(engine, snapshot): the StreamCall as a builtin function (fast_call.h).
  m.def("StreamCall", [](c10::intrusive_ptr<FrameEngine> engine, const pybind11::object& snapshot) {
    const auto* sources = &snapshot.cast<const SourcesSnapshot&>();  // a TypeError for anything else
    return fast_function(std::make_unique<StreamCall>(std::move(engine), sources), snapshot);
  });
  pybind11::class_<EngineStream>(m, "EngineStream")
      .def("__call__", [](EngineStream& self, const Tensor& x) { return self(x, WithoutGil()); })
      .def("state", &EngineStream::state)
      .def("set_state", &EngineStream::set_state)
      .def("reset", &EngineStream::reset)
      .def("fork", &EngineStream::fork);
}
#endif

TORCH_LIBRARY_FRAGMENT(amnets_native, m) {
  m.class_<FrameEngine>("FrameEngine")
      .def(torch::init<std::string, std::vector<Tensor>, std::vector<Tensor>, int64_t, bool, bool>())
      .def("run", [](const c10::intrusive_ptr<FrameEngine>& self, const Tensor& x, const Tensor& h0, const Tensor& c0,
                     int64_t force, const c10::optional<Tensor>& rows, double cut) {
        return self->run(x, h0, c0, force, rows, cut);
      });
}

}  // namespace amnets::cpu
