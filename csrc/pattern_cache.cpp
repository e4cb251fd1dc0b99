#include "pattern_cache.h"

#include "tensor_identity.h"

#include <deque>
#include <mutex>
#include <string>

namespace amnets::pattern {
namespace {

struct Entry {
  std::string what;
  TensorIdentity crow, col;
  std::vector<int64_t> shape;
  std::vector<at::Tensor> tensors;

  bool holds(const char* kind, const at::Tensor& c, const at::Tensor& k, const std::vector<int64_t>& s) const {
    return what == kind && shape == s && crow.matches(c) && col.matches(k);
  }
};

constexpr size_t kEntries = 64;
std::mutex mutex;
std::deque<Entry> entries;

}  // namespace

std::vector<at::Tensor> derived(const char* what, const at::Tensor& crow, const at::Tensor& col, const std::vector<int64_t>& shape,
                                const std::function<std::vector<at::Tensor>()>& build) {
  if (crow.is_inference() || col.is_inference()) return build();  // no version counter to trust
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (const Entry& entry : entries)
      if (entry.holds(what, crow, col, shape)) return entry.tensors;
  }
  std::vector<at::Tensor> tensors = build();  // may raise (a failed check is not remembered)
  std::lock_guard<std::mutex> lock(mutex);
  if (entries.size() == kEntries) entries.pop_front();
  entries.push_back(Entry{what, TensorIdentity(crow), TensorIdentity(col), shape, tensors});
  return tensors;
}

void forget_all() {
  std::lock_guard<std::mutex> lock(mutex);
  entries.clear();
}

}  // namespace amnets::pattern
