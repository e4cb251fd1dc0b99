// The frame engine's block kernels for fp32 weights (frame_engine_kernels.h says why they are a source of
// their own).

#include "frame_engine_kernels.h"

namespace amnets::cpu::engine_kernels {
AMNETS_ENGINE_KERNELS(float, f32)
}  // namespace amnets::cpu::engine_kernels
