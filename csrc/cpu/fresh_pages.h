// Large outputs on 2 MB pages. glibc maps every allocation of 32 MB or more afresh (its largest mmap threshold) and
// unmaps it when freed, so an op's big output costs a page fault and a zeroed 4 KB page per 4 KB on its first write,
// every call: at rnnt_loss's (16, 100, 31, 512) the 101 MB logits gradient took 22 ms to allocate and fill on one
// AMD EPYC (2 threads), against 3.4 ms to fill it once faulted; fwd+bwd took 50 ms. Where transparent huge pages are
// "madvise" (Ubuntu's default) asking for them before the first write makes that fill 5.5 ms (torch's own
// THP_MEM_ALLOC_ENABLE=1 does the same for every ATen allocation, and took that fwd+bwd to 22 ms). Smaller
// allocations come back from glibc's heap already faulted: nothing to gain, and no mapping to split.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace amnets::cpu {

// at::empty for a CPU output the op writes whole; from 32 MB its 2 MB-aligned interior is advised MADV_HUGEPAGE.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t(2) << 20, kFresh = uintptr_t(32) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr()), bytes = t.nbytes();
  if (bytes >= kFresh) {
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), end = (begin + bytes) & ~(kHuge - 1);
    madvise(reinterpret_cast<void*>(first), end - first, MADV_HUGEPAGE);  // a hint: failing changes nothing
  }
#endif
  return t;
}

}  // namespace amnets::cpu
