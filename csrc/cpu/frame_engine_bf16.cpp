// The frame engine's block kernels for bf16 weights (frame_engine_kernels.h says why they are a source of
// their own).

#include "frame_engine_kernels.h"

namespace amnets::cpu::engine_kernels {
AMNETS_ENGINE_KERNELS(c10::BFloat16, bf16)
}  // namespace amnets::cpu::engine_kernels
