// amnets_kernels._C.SourcesSnapshot (csrc/sources_snapshot.h): its Python binding.
#ifdef AMNETS_PYTHON_MODULE
#include "sources_snapshot.h"

namespace amnets {

void bind_sources_snapshot(pybind11::module_& m) {
  pybind11::class_<SourcesSnapshot>(m, "SourcesSnapshot")
      .def(pybind11::init<const std::vector<std::pair<pybind11::dict, pybind11::object>>&>())
      .def("matches", &SourcesSnapshot::matches);
}

}  // namespace amnets
#endif  // AMNETS_PYTHON_MODULE
