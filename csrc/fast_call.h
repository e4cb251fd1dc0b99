// What the native fast paths called from Python share (csrc/cpu/frame_engine.cpp: AmNetsEncoder.stream();
// csrc/cpu/lstm_stack.cpp: a swapped LSTM stepped a frame a call): a C++ call object as a builtin function,
// and the GIL released around its arithmetic only where another Python thread could use it.
// Part of the Python module only (examples/deploy builds the other sources without AMNETS_PYTHON_MODULE).
#pragma once
#ifdef AMNETS_PYTHON_MODULE
#include <torch/extension.h>

#include <memory>
#include <utility>

namespace amnets {

// Runs f with the GIL released, as torch's own ops run theirs, so that other Python threads (other streams,
// each with its own state) run meanwhile; but only when another Python thread exists. Alone, the release and
// the reacquire would only cost time: 0.07-0.2 us a call (alternating processes of the builds, a tiny
// model's frame 1.2 -> 1.3 us). A thread started meanwhile waits for the GIL until f is done.
struct WithoutGil {
  template <typename F>
  void operator()(F&& f) const {
    PyThreadState* self = PyThreadState_Get();
    const bool alone = PyInterpreterState_ThreadHead(PyThreadState_GetInterpreter(self)) == self &&
                       PyThreadState_Next(self) == nullptr;
    if (alone) return f();
    pybind11::gil_scoped_release released;
    f();
  }
};

namespace detail {
template <typename Call>
PyObject* call_fast(PyObject* self, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  const auto* call = static_cast<const Call*>(PyCapsule_GetPointer(PyTuple_GET_ITEM(self, 0), Call::kName));
  TORCH_CHECK_TYPE(n == Call::kArity, Call::kName, " takes ", Call::kArity, " arguments; got ", n);
  return (*call)(args).release().ptr();
  END_HANDLE_TH_ERRORS
}
}  // namespace detail

// `call` as a builtin function of Call::kArity positional arguments, (*call)(PyObject* const* args) ->
// pybind11::object, called through CPython's vectorcall (METH_FASTCALL) with no pybind11 dispatcher in between
// (~0.15 us less a call than a pybind11 function; a cheap H=192 frame is ~10 us, a tiny model's ~1.2). Its self
// is the tuple (capsule of the call, keep): `keep` (e.g. the SourcesSnapshot the call reads) lives as long as
// the function, and the cycle collector sees it through the tuple (a capsule's contents it cannot see).
template <typename Call>
pybind11::object fast_function(std::unique_ptr<Call> call, const pybind11::object& keep) {
  static PyMethodDef def = {Call::kName, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&detail::call_fast<Call>)),
                            METH_FASTCALL, Call::kDoc};
  pybind11::capsule owner(call.release(), Call::kName,
                          [](PyObject* c) { delete static_cast<Call*>(PyCapsule_GetPointer(c, Call::kName)); });
  const pybind11::tuple self = pybind11::make_tuple(owner, keep);
  PyObject* function = PyCFunction_New(&def, self.ptr());
  if (function == nullptr) throw pybind11::error_already_set();
  return pybind11::reinterpret_steal<pybind11::object>(function);
}

}  // namespace amnets
#endif
