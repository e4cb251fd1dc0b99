// CPU kernels of one file used by another (csrc/cpu/row_products.cpp: the low-rank LSTM's and the frame
// engine's small-row products): raw-pointer entry points on checked float data, no ATen op inside (a
// streaming frame at small H costs what its calls cost), threads on our pool (csrc/cpu/parallel.h);
// pack_transposed(Tensor) is the one ATen-side helper, run once per weight.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace amnets::cpu {

// y (batch, rows) = x (batch, cols) A^T (or += with accumulate) for A (rows, cols) row-major float;
// x contiguous, batch <= kMaxDotBatch.
constexpr int64_t kMaxDotBatch = 4;
void small_batch_mm(const float* x, int64_t batch, const float* a, int64_t rows, int64_t cols, float* y,
                    bool accumulate);

// The right operand of expand, U^T (R, G), in panels of 64 columns: row j of panel c (columns 64c .. 64c + 63)
// starts at data + c * chunk_stride + j * ldu. Row-major (R, G) is {ut, G, 64}; packed (pack_transposed) is
// {p, 64, 64 R}: each panel one contiguous run, so the thread walking a panel down its R rows reads one
// sequential stream (down a row-major matrix it jumps 4 G bytes a row, and past a page per row the hardware
// prefetcher gives up: the frame engine's H=1024 low-rank layers read their factors at ~40 GB/s that way).
// An operand narrower than 64 columns (one panel) is packed at its width rounded up to 16 floats: V^T of a
// rank-48 factor padded to 64 made a quarter of its reads zeros, with dead cache lines in L2 (with one pass
// over the 48 columns instead of three, the frame engine's V x went from 14 to 28 GMAC/s, one AMD EPYC core).
constexpr int64_t kPanel = 64;
struct Panels {
  const float* data;
  int64_t ldu, chunk_stride;
};
inline Panels row_major(const float* ut, int64_t G) { return {ut, G, kPanel}; }
inline int64_t panel_width(int64_t G) { return G < kPanel ? (G + 15) / 16 * 16 : kPanel; }
// Floats the packed panels of an (R, G) operand take.
inline int64_t packed_size(int64_t R, int64_t G) {
  const int64_t width = panel_width(G);
  return (G + width - 1) / width * width * R;
}
// Packs W^T for W (G, R) row-major float into out (packed_size(R, G) floats; the last panel zero past G).
Panels pack_transposed(const float* w, int64_t G, int64_t R, float* out);
// Packs U^T given row-major, ut (R, G), into out the same way.
Panels pack_rows(const float* ut, int64_t R, int64_t G, float* out);

// A weight W (G, R) as expand's right operand W^T in packed panels (of floats, or bf16 pairs below), owning them.
template <typename Element, typename PanelsOf>
struct Packed {
  std::vector<Element> data;
  PanelsOf panels{nullptr, 0, 0};
  int64_t R = 0, G = 0;
};
using PackedT = Packed<float, Panels>;
PackedT pack_transposed(const at::Tensor& w);  // any float dtype

// out (M, G; row stride ldo) (+)= s (M, R; row stride lds) U for U^T given as panels. Threads split the
// panels from kParallelMinMacs multiply-adds (parallel.h); each panel serves every row of s before the next.
void expand(Panels u, int64_t R, int64_t G, const float* s, int64_t lds, int64_t M, float* out, int64_t ldo,
            bool accumulate);

// bf16 weights: the same two products on vdpbf16ps, the float left operand (x, s) rounded to bf16 on the way in
// and every sum in fp32, as torch's bf16 GEMMs do. Half the weight bytes of the float kernels and twice the
// products per instruction. expand() needs a CPU with AVX512-BF16 (simd::has_dpbf16(); callers check);
// small_batch_mm runs anywhere (without it, on the bf16 operands widened to fp32).
void small_batch_mm(const float* x, int64_t batch, const c10::BFloat16* a, int64_t rows, int64_t cols, float* y,
                    bool accumulate);

// U^T (R, G) as bf16 row pairs in panels of up to 64 columns: pair row q of panel c, at data + c * chunk_stride
// + q * ldu, holds (W[g, 2q], W[g, 2q + 1]) for each column g of the panel, so that one 64-byte load is 16
// columns' pairs, the operand of one vdpbf16ps against a broadcast pair of s. Zero past R and past G.
struct PairPanels {
  const uint16_t* data;
  int64_t ldu, chunk_stride;
};
// uint16 elements the pair panels of an (R, G) operand take.
inline int64_t packed_pairs_size(int64_t R, int64_t G) { return packed_size((R + 1) / 2, G) * 2; }
// Packs W^T for W (G, R) row-major bf16 into out (packed_pairs_size(R, G) elements).
PairPanels pack_pairs_transposed(const c10::BFloat16* w, int64_t G, int64_t R, uint16_t* out);
using PackedPairsT = Packed<uint16_t, PairPanels>;
PackedPairsT pack_pairs_transposed(const at::Tensor& w);  // bf16
// out (M, G) (+)= s (M, R) U as expand() above, U^T given as pair panels.
void expand(PairPanels u, int64_t R, int64_t G, const float* s, int64_t lds, int64_t M, float* out, int64_t ldo,
            bool accumulate);

// The low-rank LSTM's lean inference step (csrc/cpu/lowrank_lstm.cpp; also run per layer by the prepared stack
// call, csrc/cpu/lstm_stack.cpp): one step of B <= kMaxDotBatch rows whose factors are contiguous, all fp32, or
// all bf16 on a CPU with AVX512-BF16 (simd::has_dpbf16()), checked by the caller. Rows in the factors' dtype.
// With a projection (nn.LSTM's proj_size P, w_hr (P, H)) the state h is the projected one: w_hh_v reads R = P
// columns and the step's h1 is sigmoid(o) tanh(c1) W_hr^T; without, R = H and w_hr is null.
struct LowrankStep {
  const void *w_ih_u, *w_ih_v, *w_hh_u, *w_hh_v, *bias;  // (4H, r_ih), (r_ih, D), (4H, r_hh), (r_hh, R), (4H,) or null
  int64_t d, hidden, r_ih, r_hh;
  bool bf16;
  const void* w_hr = nullptr;  // (P, H) or null
  int64_t rec = 0;             // R: the width of h and h1 (P with a projection, else H)
};
LowrankStep lowrank_step_of(const at::Tensor& w_ih_u, const at::Tensor& w_ih_v, const at::Tensor& w_hh_u,
                            const at::Tensor& w_hh_v, const std::optional<at::Tensor>& bias,
                            const at::Tensor* w_hr = nullptr);
int64_t lean_work_floats(const LowrankStep& step, int64_t batch);  // floats of `work` lean_step_into needs
// x (B, D), h (B, R) and c (B, H) (null: zeros) -> h1 (B, R), c1 (B, H), which alias none of them.
void lean_step_into(const LowrankStep& step, int64_t batch, const void* x, const void* h, const void* c, void* h1,
                    void* c1, float* work);

// A block-sparse LSTM layer's inference step (csrc/cpu/bsr.cpp) for the prepared stack call (lstm_stack.cpp): its
// [W_ih | W_hh] (4H, D + R) blocks with a fast kernel (b 16/32/64, fp32 or bf16), the pattern checked once and
// held as int32, the bias (4H,) in the values' dtype or undefined; R, the width of h, is H, or nn.LSTM's proj_size
// P with the projection w_hr (P, H) (contiguous, the values' dtype; undefined without). bsr_lstm_layer raises
// (ValueError, TypeError) for anything else.
struct BsrLstmLayer {
  at::Tensor values, crow, col, bias, w_hr;
  int64_t d = 0, hidden = 0, rec = 0;
};
BsrLstmLayer bsr_lstm_layer(const at::Tensor& values, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                            const std::optional<at::Tensor>& bias, int64_t d, int64_t hidden,
                            const at::Tensor* w_hr = nullptr, const char* op = "bsr_lstm_cell_forward");
int64_t bsr_step_work_floats(const BsrLstmLayer& layer, int64_t batch);
// x (B, D), h (B, R) and c (B, H) (null: zeros) in the values' dtype, any B -> h1 (B, R), c1 (B, H), which alias
// none of them; work holds bsr_step_work_floats floats. The fused cell bsr_lstm_cell_forward is its checks and then
// this.
void bsr_step_into(const BsrLstmLayer& layer, int64_t batch, const void* x, const void* h, const void* c, void* h1,
                   void* c1, float* work);

}  // namespace amnets::cpu
