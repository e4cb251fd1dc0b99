// bsr_linear's CPU kernels for bf16 weights (bsr_kernels.h says why they are a source of their own).

#include "bsr_kernels.h"

namespace amnets::cpu::bsr_kernels {
AMNETS_BSR_KERNELS(c10::BFloat16, bf16)
}  // namespace amnets::cpu::bsr_kernels
