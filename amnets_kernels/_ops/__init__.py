"""The ops, one file per op family: torch.ops.amnets.<op>, its face contract, its Python faces.

Every op has three parts, all in C++ (csrc/bsr.cpp, csrc/lowrank_lstm.cpp, csrc/rnnt.cpp):
  amnets::<op>            public, CompositeImplicitAutograd: defaults, light reshaping, reduction;
                          takes the Python function's arguments in the same order.
  amnets::<op>_forward    the op autograd is registered on (opaque to torch.compile): checks its arguments
                          once, then routes to the face chosen by the backend (csrc/face.h); with save=True
                          it also returns what backward needs.
  amnets::<op>_backward   routed the same way.
The compiled faces are called from C++ without entering Python; the reference and Triton faces are
reached through the Python ops amnets_faces::<op>_<direction> registered here (python_face). The fake
impls are in Python, beside each op (tracing is Python's; they must handle symbolic shapes).
Each face implements <op>_forward/<op>_backward with exactly these arguments (the reference in
amnets_kernels/reference/, Triton in amnets_kernels/triton/, C++ as torch.ops.amnets_native.*; see
csrc/ops.cpp). Faces get contiguous tensors and return fresh ones.
"""

import torch

from .. import _backend, _validate


def run(op: str, direction: str, *args):
    """Call the current face's <op>_<direction> on contiguous arguments."""
    face = _backend.resolve(op, args[0].device)  # every face contract starts with a tensor
    fn = face.forward if direction == "forward" else face.backward
    # A list, not a generator: this runs on every call, streaming steps included.
    return fn(*[a.contiguous() if isinstance(a, torch.Tensor) else a for a in args])


# The Python faces of the ops (which live in C++), and the non-finite report the RNN-T ops call.
FACES_LIBRARY = torch.library.Library("amnets_faces", "DEF")


def python_face(op: str, direction: str, native_op) -> None:
    """amnets_faces::<op>_<direction>, with the schema of the C++ op `native_op`: what that op calls when
    the backend asks for a face it does not have compiled in (the reference, Triton; csrc/face.h). It
    resolves the face as every op always has (FaceUnavailableError, FallbackWarning, last_face)."""
    schema = str(native_op._schema)
    FACES_LIBRARY.define(f"{op}_{direction}" + schema[schema.index("("):])
    FACES_LIBRARY.impl(f"{op}_{direction}", lambda *args: run(op, direction, *args), "CompositeExplicitAutograd")


# A module's weights are nn.Parameters: a Tensor subclass that overrides nothing the kernels see.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_inference(*tensors) -> bool:
    """Whether a prepared step may call a fused kernel directly instead of the public ops (which autograd
    and tracing need). Only for plain eager inference: no gradient wanted, nothing tracing
    (torch.compile/export, a dispatch mode such as make_fx or FakeTensorMode), no autocast, and plain
    tensors or nn.Parameters (no other subclass, no functorch wrapper)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._get_tracing_state() is not None:  # torch.jit.trace records dispatcher calls, not a kernel's writes
        return False
    if torch._C._is_any_autocast_enabled():  # the public ops cast for autocast (csrc/autocast.cpp); kernels do not
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: this runs on every streaming call
        if t is None:
            continue
        if type(t) not in _PLAIN or (grad and t.requires_grad) or _is_wrapped(t):
            return False
    return True


_is_wrapped = _validate.is_wrapped  # one definition, shared with the index check


from . import bsr, lowrank_lstm, rnnt  # noqa: E402,F401  (registers the ops)
