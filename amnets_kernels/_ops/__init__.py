"""The ops, one file per op family: torch.ops.amnets.<op>, its face contract, its autograd.

Every op has three parts:
  amnets::<op>            public, CompositeImplicitAutograd: defaults, light reshaping, reduction;
                          takes the Python function's arguments in the same order.
  amnets::<op>_forward    the op autograd is registered on (opaque to torch.compile), with a fake impl:
                          checks its arguments, then routes to the face chosen by the backend; with
                          save=True it also returns what backward needs.
  amnets::<op>_backward   routed the same way.
bsr_linear and the lowrank LSTM ops live in C++ (csrc/bsr.cpp, csrc/lowrank_lstm.cpp): checks, autograd
and routing run without Python, and the compiled face is called directly; the reference and Triton
faces are reached through the Python ops amnets_faces::<op>_<direction> registered here (python_face).
The fake impls stay in Python (tracing is Python's; they must handle symbolic shapes). The RNN-T ops
are still Python custom ops (composite + custom_op below), routed by `run`.
Each face implements <op>_forward/<op>_backward with exactly these arguments (the reference in
amnets_kernels/reference/, Triton in amnets_kernels/triton/, C++ as torch.ops.amnets_native.*; see
csrc/ops.cpp). Faces get contiguous tensors and return fresh ones.
"""

import torch

from .. import _backend

_LIB = torch.library.Library("amnets", "FRAGMENT")  # holds the composite ops' registrations


def composite(schema: str):
    """Define torch.ops.amnets.<name> from `schema`, implemented by the decorated Python function."""

    def register(fn):
        _LIB.define(schema)
        _LIB.impl(schema.split("(", 1)[0], fn, "CompositeImplicitAutograd")
        return fn

    return register


# Faces want contiguous tensors; this tag makes inductor hand them over contiguous (instead of asserting
# the strides it traced, which breaks when it re-lays out a saved activation).
_LAYOUT = getattr(torch.Tag, "needs_contiguous_strides", torch.Tag.needs_fixed_stride_order)


def custom_op(name: str):
    """torch.library.custom_op for an amnets forward/backward op: no mutation, contiguous inputs."""
    return torch.library.custom_op(f"amnets::{name}", mutates_args=(), tags=(_LAYOUT,))


def run(op: str, direction: str, *args):
    """Call the current face's <op>_<direction> on contiguous arguments."""
    face = _backend.resolve(op, args[0].device)  # every face contract starts with a tensor
    fn = face.forward if direction == "forward" else face.backward
    # A list, not a generator: this runs on every call, streaming steps included.
    return fn(*[a.contiguous() if isinstance(a, torch.Tensor) else a for a in args])


_FACES = torch.library.Library("amnets_faces", "DEF")  # the Python faces of the ops that live in C++


def python_face(op: str, direction: str, native_op) -> None:
    """amnets_faces::<op>_<direction>, with the schema of the C++ op `native_op`: what that op calls when
    the backend asks for a face it does not have compiled in (the reference, Triton; csrc/face.h). It
    resolves the face as every Python-routed op does (FaceUnavailableError, FallbackWarning, last_face)."""
    schema = str(native_op._schema)
    _FACES.define(f"{op}_{direction}" + schema[schema.index("("):])
    _FACES.impl(f"{op}_{direction}", lambda *args: run(op, direction, *args), "CompositeExplicitAutograd")


def register_autograd(op, backward, setup_context):
    """op.register_autograd, with backward run under the backend that was in force for the forward
    (in eager mode: `with use_backend("cpu"): loss = f(x)` then `loss.backward()` outside it still
    uses the cpu face; a compiled graph reads the backend when its backward runs)."""

    def setup(ctx, inputs, output):
        ctx.backend = _backend.get_backend()
        setup_context(ctx, inputs, output)

    def run_backward(ctx, *grads):
        with _backend.use_backend(ctx.backend):
            return backward(ctx, *grads)

    op.register_autograd(run_backward, setup_context=setup)


def wants_grad(*tensors) -> bool:
    """Whether an autograd graph will be built through these inputs (decides save=True)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def eager_inference(*tensors) -> bool:
    """Whether a public op may call its face directly, skipping the torch.ops layers (composite op,
    custom op, autograd wrapper: ~25 us a call, more than a streaming frame's kernel at small sizes).
    Only for plain eager inference: no gradient wanted, nothing tracing (torch.compile/export, a
    dispatch mode such as make_fx or FakeTensorMode), and plain tensors (no subclass, no functorch
    wrapper). Everything else goes through torch.ops.amnets, which computes the same on the same face."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: this runs on every streaming call
        if t is None:
            continue
        if type(t) is not torch.Tensor or (grad and t.requires_grad) or _is_wrapped(t):
            return False
    return True


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


from . import bsr, lowrank_lstm, rnnt  # noqa: E402,F401  (registers the ops)
