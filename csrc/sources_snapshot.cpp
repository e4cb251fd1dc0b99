// amnets_kernels._C.SourcesSnapshot and the weights epoch (csrc/sources_snapshot.h): their Python bindings.
#ifdef AMNETS_PYTHON_MODULE
#include "pattern_cache.h"
#include "sources_snapshot.h"

namespace amnets {

void bind_sources_snapshot(pybind11::module_& m) {
  // Tracked by the cycle collector (see SourcesSnapshot::traverse), as pybind11's custom_type_setup allows.
  pybind11::class_<SourcesSnapshot>(m, "SourcesSnapshot", pybind11::custom_type_setup([](PyHeapTypeObject* heap) {
    PyTypeObject* type = &heap->ht_type;
    type->tp_flags |= Py_TPFLAGS_HAVE_GC;
    type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) -> int {
      Py_VISIT(Py_TYPE(self));  // a heap type's instances own a reference to it
      if (!pybind11::detail::is_holder_constructed(self)) return 0;
      return pybind11::cast<const SourcesSnapshot&>(pybind11::handle(self)).traverse(visit, arg);
    };
    type->tp_clear = [](PyObject* self) -> int {
      if (pybind11::detail::is_holder_constructed(self))
        pybind11::cast<SourcesSnapshot&>(pybind11::handle(self)).clear();
      return 0;
    };
  }))
      .def(pybind11::init<const std::vector<pybind11::tuple>&>())
      .def("matches", &SourcesSnapshot::matches);
  // indices=false from the optimizer step hook: a step writes values, never a pattern, and forgetting the
  // patterns would re-check (a device sync) and re-derive every layer's indices after each training step.
  m.def(
      "weights_changed",
      [](bool indices) {
        weights_epoch().fetch_add(1, std::memory_order_acq_rel);
        if (indices) pattern::forget_all();
      },
      pybind11::arg("indices") = true);
  m.def("weights_epoch", [] { return weights_epoch().load(std::memory_order_acquire); });
}

}  // namespace amnets
#endif  // AMNETS_PYTHON_MODULE
