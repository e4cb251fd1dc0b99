// bsr_linear's CPU kernels for fp32 weights (bsr_kernels.h says why they are a source of their own).

#include "bsr_kernels.h"

namespace amnets::cpu::bsr_kernels {
AMNETS_BSR_KERNELS(float, f32)
}  // namespace amnets::cpu::bsr_kernels
