// Compiled only in CUDA builds. AMNETS_CUDA_ARCHS is the list setup.py turned into -gencode flags;
// __CUDA_ARCH_LIST__ is nvcc's own record of what it compiled; tests/test_build.py checks they agree.
#include <cuda_runtime_api.h>

#include <sstream>
#include <string>
#include <vector>

#ifndef AMNETS_CUDA_ARCHS
#error "setup.py defines AMNETS_CUDA_ARCHS for CUDA builds"
#endif

#define AMNETS_STR2(...) #__VA_ARGS__
#define AMNETS_STR(...) AMNETS_STR2(__VA_ARGS__)

std::vector<std::string> amnets_cuda_archs() {
  std::vector<std::string> archs;
  std::stringstream list(AMNETS_CUDA_ARCHS);
  for (std::string arch; std::getline(list, arch, ';');) archs.push_back(arch);
  return archs;
}

int amnets_cuda_runtime_version() { return CUDART_VERSION; }

// nvcc's own view of the virtual archs it compiled this file for, e.g. "800,900".
std::string amnets_nvcc_arch_list() { return AMNETS_STR(__CUDA_ARCH_LIST__); }
