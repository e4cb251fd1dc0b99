"""torch.func transforms (grad, vjp, jacrev, hessian, functional_call + grad, vmap of them) over the ops.

The ops' autograd is C++ (torch::autograd::Function), which functorch refuses ("cannot use C++
torch::autograd::Function with functorch transforms"). While a transform is active, the Python entry
points (ak.bsr_linear, ak.lowrank_lstm_cell, ..., the nn modules, PreparedBsrLinear) come here instead:
Python autograd.Functions around the same op directions, amnets::<op>_forward and <op>_backward called
below autograd, so the same checks, face and kernels run as without a transform. vmap loops over the
batch (functorch's fallback for ops without a batching rule, which warns once that it is slow).

bsr_linear is differentiable to any order, in forward mode too (jacfwd, jvp, hessian): it is bilinear, so
its derivatives are its two directions again. The other ops are differentiable once, in reverse mode: a
second derivative or a jvp of them raises NotImplementedError naming the op, never a silent zero.
torch.ops.amnets.* called directly under a transform still gives PyTorch's error.
"""

from __future__ import annotations

import warnings

import torch

from .. import _backend


@torch.compiler.assume_constant_result  # torch.compile traces the transforms itself: read once there
def active() -> bool:
    """Whether a torch.func transform is active (then the entry points route here)."""
    return torch._C._are_functorch_transforms_active()


def _below(op, *args):
    """op on args without its C++ autograd (which functorch refuses): the checks and the face only."""
    with torch._C._AutoDispatchBelowAutograd():
        if not _under_vmap():
            return op(*args)
        if op not in _per_sample_said:
            _per_sample_said.add(op)
            warnings.warn(f"amnets {op.__name__.split('.')[0]} under torch.func.vmap runs once per sample (no "
                          "batching rule): correct, not batched", stacklevel=3)
        return _quietly_per_sample(op, *args)


def _quietly_per_sample(op, *args):
    """op under vmap, run once per sample by functorch's fallback (no batching rule), with PyTorch's C++ warning
    of it off for the call: that warning, queued in a call that then raises (a bad pattern in one member of an
    ensemble), turned our named ValueError into "SystemError: <class 'UserWarning'> returned a result with an
    exception set"; and it asks users to file an issue with PyTorch. PyTorch has no getter for the switch: it
    goes back to its default, on."""
    torch._C._functorch._set_vmap_fallback_warning_enabled(False)
    try:
        return op(*args)
    finally:
        torch._C._functorch._set_vmap_fallback_warning_enabled(True)


_per_sample_said: set = set()


def _under_vmap() -> bool:
    top = torch._C._functorch.peek_interpreter_stack()
    return top is not None and top.key() == torch._C._functorch.TransformType.Vmap


def _forward_mode_unsupported(op: str):
    def jvp(ctx, *tangents):
        raise NotImplementedError(f"{op}: forward-mode derivatives (torch.func.jvp, jacfwd, hessian) are not "
                                  "supported; use reverse mode (grad, vjp, jacrev)")
    return staticmethod(jvp)


class _Remember(torch.autograd.Function):
    """What every Function here shares: vmap by functorch's rule; setup_context calls _keep_backend, so
    that backward runs under the backend that was in force for the forward (as the C++ autograd does)."""
    generate_vmap_rule = True


def _keep_backend(ctx) -> None:
    ctx.backend = _backend.get_backend()


class _FirstOrder(_Remember):
    """An op's backward direction, differentiable no further: a second derivative of the op raises
    instead of being silently zero."""

    @staticmethod
    def forward(op_name, backward_op, *args):
        return _below(backward_op, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op_name = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(f"{ctx.op_name}: derivatives beyond the first are not supported under torch.func "
                                  "(bsr_linear's are)")

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(f"{ctx.op_name}: forward-mode derivatives of its backward are not supported")


def _first_order(op_name: str, backward_op, ctx, *args):
    with _backend.use_backend(ctx.backend):
        return _FirstOrder.apply(op_name, backward_op, *args)


# ---------------------------------------------------------------------------------------------------
# bsr_linear: y = x Wᵀ + bias. With gx = g W and gv = the blocks of gᵀx at W's pattern (the backward op),
# d/dx and d/dvalues of y are those, and the backward's own derivatives are the two directions again:
# d/dg = ggx Wᵀ + x GGVᵀ, d/dx = g GGV, d/dvalues = the blocks of gᵀ ggx (as csrc/bsr.cpp's BsrLinearBackward).

_BSR_FORWARD = torch.ops.amnets.bsr_linear_forward.default
_BSR_BACKWARD = torch.ops.amnets.bsr_linear_backward.default


def _given(t):
    """A gradient or tangent that carries something (None and the backward's empty placeholder do not)."""
    return t is not None and t.numel() > 0


class _BsrLinear(_Remember):
    generate_vmap_rule = False  # its own: the rows of every sample in one call (vmap below)

    @staticmethod
    def forward(x, values, crow, col, out_features, in_features, bias):
        return _below(_BSR_FORWARD, x, values, crow, col, out_features, in_features, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, values, crow, col, out_features, in_features, bias = inputs
        ctx.save_for_backward(x, values, crow, col)
        ctx.save_for_forward(x, values, crow, col)
        ctx.shape = (out_features, in_features)
        _keep_backend(ctx)

    @staticmethod
    def backward(ctx, g):
        x, values, crow, col = ctx.saved_tensors
        need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = gv = gb = None
        if need_x or need_values:
            with _backend.use_backend(ctx.backend):
                gx, gv = _BsrLinearBackward.apply(g, x, values, crow, col, *ctx.shape, need_x, need_values)
        if ctx.needs_input_grad[6]:  # a bias, wanting its gradient
            gb = g.sum(0, dtype=torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype).to(g.dtype)
        return gx if need_x else None, gv if need_values else None, None, None, None, None, gb

    @staticmethod
    def vmap(info, in_dims, x, values, crow, col, out_features, in_features, bias):
        if any(d is not None for d in in_dims[1:]):  # stacked weights (an ensemble): one call per member
            return _per_sample(_BsrLinear, info, in_dims, (x, values, crow, col, out_features, in_features, bias),
                               "over stacked weights runs once per member")
        rows = _batch_first(x, in_dims[0], info.batch_size)  # (batch, M, K): one call on batch·M rows
        y = _BsrLinear.apply(rows.reshape(-1, in_features), values, crow, col, out_features, in_features, bias)
        return y.reshape(info.batch_size, -1, out_features), 0

    @staticmethod
    def jvp(ctx, dx, dvalues, dcrow, dcol, dout, din, dbias):
        x, values, crow, col = ctx.saved_tensors
        terms = [_BsrLinear.apply(dx, values, crow, col, *ctx.shape, None) if _given(dx) else None,
                 _BsrLinear.apply(x, dvalues, crow, col, *ctx.shape, None) if _given(dvalues) else None,
                 dbias]
        return _sum(terms, lambda: x.new_zeros(x.shape[0], ctx.shape[0]))


class _BsrLinearBackward(_Remember):
    generate_vmap_rule = False

    @staticmethod
    def forward(g, x, values, crow, col, out_features, in_features, need_x, need_values):
        return _below(_BSR_BACKWARD, g, x, values, crow, col, out_features, in_features, need_x, need_values)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, x, values, crow, col, out_features, in_features, need_x, need_values = inputs
        ctx.save_for_backward(g, x, values, crow, col)
        ctx.save_for_forward(g, x, values, crow, col)
        ctx.shape, ctx.need = (out_features, in_features), (need_x, need_values)
        _keep_backend(ctx)

    @staticmethod
    def backward(ctx, ggx, ggv):
        g, x, values, crow, col = ctx.saved_tensors
        ggx, ggv = (t if _given(t) else None for t in (ggx, ggv))
        fwd = lambda a, v: _BsrLinear.apply(a, v, crow, col, *ctx.shape, None)  # noqa: E731
        bwd = lambda a, b, v, nx, nv: _BsrLinearBackward.apply(a, b, v, crow, col, *ctx.shape, nx, nv)  # noqa: E731
        with _backend.use_backend(ctx.backend):
            grad_g = _sum([fwd(ggx, values) if ggx is not None else None,
                           fwd(x, ggv) if ggv is not None else None], lambda: None) \
                if ctx.needs_input_grad[0] else None
            grad_x = bwd(g, x, ggv, True, False)[0] if ctx.needs_input_grad[1] and ggv is not None else None
            grad_v = bwd(g, ggx, values, False, True)[1] if ctx.needs_input_grad[2] and ggx is not None else None
        return grad_g, grad_x, grad_v, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, g, x, values, crow, col, out_features, in_features, need_x, need_values):
        args = (g, x, values, crow, col, out_features, in_features)
        if any(d is not None for d in in_dims[2:5]):  # stacked weights: one call per member
            return _per_sample(_BsrLinearBackward, info, in_dims, (*args, need_x, need_values),
                               "over stacked weights runs once per member")
        gx = gv = None
        if need_x:  # g W row by row: the batch folds into the rows, one call (jacrev in x, vmap of grad in x)
            rows = [_batch_first(t, d, info.batch_size) for t, d in zip((g, x), in_dims)]
            gx = _BsrLinearBackward.apply(*(t.reshape(-1, t.shape[-1]) for t in rows), *args[2:], True, False)[0]
            gx = gx.reshape(info.batch_size, -1, in_features)
        if need_values:  # a sum over each sample's rows: one call per sample
            gv = _per_sample(_BsrLinearBackward, info, in_dims, (*args, False, True),
                             "computes the values' gradient once per sample")[0][1]
        empty = values.new_empty(0)  # the op's placeholder for a gradient not wanted, the same for every sample
        return (gx if need_x else empty, gv if need_values else empty), (0 if need_x else None,
                                                                         0 if need_values else None)

    @staticmethod
    def jvp(ctx, dg, dx, dvalues, *rest):
        # gx = g W(values): d = dg W + g W(dvalues);  gv = blocks(gᵀ x): d = blocks(dgᵀ x) + blocks(gᵀ dx)
        g, x, values, crow, col = ctx.saved_tensors
        need_x, need_values = ctx.need
        bwd = lambda a, b, v, nx, nv: _BsrLinearBackward.apply(a, b, v, crow, col, *ctx.shape, nx, nv)  # noqa: E731
        tx = _sum([bwd(dg, x, values, True, False)[0] if _given(dg) else None,
                   bwd(g, x, dvalues, True, False)[0] if _given(dvalues) else None],
                  lambda: torch.zeros_like(x)) if need_x else x.new_empty(0)
        tv = _sum([bwd(dg, x, values, False, True)[1] if _given(dg) else None,
                   bwd(g, dx, values, False, True)[1] if _given(dx) else None],
                  lambda: torch.zeros_like(values)) if need_values else values.new_empty(0)
        return tx, tv


def _batch_first(t, dim, batch_size: int):
    """A vmapped tensor with its batch dim first; one vmap does not map (dim None) is the same for every sample."""
    return t.movedim(dim, 0) if dim is not None else t.expand(batch_size, *t.shape)


def _per_sample(function, info, in_dims, args, what: str):
    """function.apply once per sample of a vmap, the outputs stacked: (outputs, out_dims) for a vmap rule. Says
    so once per case (what)."""
    if what not in _per_sample_said:
        _per_sample_said.add(what)
        warnings.warn(f"amnets bsr_linear under torch.func.vmap {what}: correct, not batched", stacklevel=4)
    outs = [function.apply(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
            for i in range(info.batch_size)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    return tuple(torch.stack(column) for column in zip(*outs)), (0,) * len(outs[0])


def _sum(terms, zero):
    """The sum of the terms that are not None; zero() when none is."""
    present = [t for t in terms if t is not None]
    if not present:
        return zero()
    total = present[0]
    for t in present[1:]:
        total = total + t
    return total


def bsr_linear(x, values, crow_indices, col_indices, out_features, in_features, bias):
    """torch.ops.amnets.bsr_linear under a transform: x (..., in_features)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != in_features:
        # the op's own check says it (x's shape, in_features)
        return torch.ops.amnets.bsr_linear.default(x, values, crow_indices, col_indices, out_features,
                                                   in_features, bias)
    rows = x.reshape(-1, in_features)
    y = _BsrLinear.apply(rows, values, crow_indices, col_indices, out_features, in_features, bias)
    return y.reshape(*x.shape[:-1], out_features)


# ---------------------------------------------------------------------------------------------------
# The low-rank LSTM: the forward saves (c1, gates) or (out, gates, cells) for the backward op.

_CELL = ("lowrank_lstm_cell", torch.ops.amnets.lowrank_lstm_cell_forward.default,
         torch.ops.amnets.lowrank_lstm_cell_backward.default)
_SEQUENCE = ("lowrank_lstm_sequence", torch.ops.amnets.lowrank_lstm_sequence_forward.default,
             torch.ops.amnets.lowrank_lstm_sequence_backward.default)


def _wanted(ctx, grads):
    """The backward op's gradients, one per tensor input in order, kept where the input wants one (an absent
    bias does not)."""
    return tuple(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad))


def _lowrank(spec, differentiable: int, saved: tuple, zeros_like: tuple):
    """The Function of one low-rank LSTM op: forward (x, h, c, the four factors, bias) -> the op's outputs, the
    first `differentiable` of them differentiable. Its backward op reads the seven tensor inputs, then the
    outputs at `saved`; a gradient not given is zeros shaped like the saved tensor at `zeros_like`."""
    name, forward_op, backward_op = spec

    def forward(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias):
        return _below(forward_op, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, True)

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[differentiable:])
        ctx.save_for_backward(*inputs[:7], *(output[i] for i in saved))
        _keep_backend(ctx)

    def backward(ctx, *grads):
        tensors = ctx.saved_tensors
        given = [torch.zeros_like(tensors[like]) if g is None else g
                 for g, like in zip(grads[:differentiable], zeros_like)]
        return _wanted(ctx, _first_order(name, backward_op, ctx, *given, *tensors))

    methods = dict(forward=staticmethod(forward), setup_context=staticmethod(setup_context),
                   backward=staticmethod(backward), jvp=_forward_mode_unsupported(name))
    return type(f"_{name}", (_Remember,), methods)


# cell: (h1, c1, gates), the backward op reads c1 and gates; sequence: (out, h_n, c_n, gates, cells), it reads
# out, gates and cells. A missing grad_h1/grad_c1 is zeros like h/c; grad_out like out, grad_h_n/c_n like h0/c0.
_LowrankCell = _lowrank(_CELL, 2, saved=(1, 2), zeros_like=(1, 2))
_LowrankSequence = _lowrank(_SEQUENCE, 3, saved=(0, 3, 4), zeros_like=(7, 1, 2))


def lowrank_lstm_cell(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias=None):
    h1, c1, _ = _LowrankCell.apply(x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
    return h1, c1


def lowrank_lstm_sequence(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias=None):
    if h0 is None or c0 is None:  # the zero state, as the op's composite makes it
        zeros = x.new_zeros(x.shape[1], w_hh_v.shape[1]) if x.dim() == 3 and w_hh_v.dim() == 2 else None
        if zeros is None:  # the op's own checks name the argument
            return torch.ops.amnets.lowrank_lstm_sequence.default(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
        h0, c0 = (zeros if t is None else t for t in (h0, c0))
    out, h_n, c_n, _, _ = _LowrankSequence.apply(x, h0, c0, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias)
    return out, h_n, c_n


# ---------------------------------------------------------------------------------------------------
# The RNN-T losses: per-sequence costs, then the public ops' reduction (amnets::_rnnt_reduce).

_LOSS = ("rnnt_loss", torch.ops.amnets.rnnt_loss_forward.default, torch.ops.amnets.rnnt_loss_backward.default)
_JOINT = ("fused_joint_rnnt_loss", torch.ops.amnets.fused_joint_rnnt_loss_forward.default,
          torch.ops.amnets.fused_joint_rnnt_loss_backward.default)


class _RnntLoss(_Remember):
    @staticmethod
    def forward(logits, targets, logit_lengths, target_lengths, blank, clamp, fused_log_softmax):
        return _below(_LOSS[1], logits, targets, logit_lengths, target_lengths, blank, clamp, fused_log_softmax, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        costs, alphas, betas, den = output
        ctx.mark_non_differentiable(alphas, betas, den)
        ctx.save_for_backward(*inputs[:4], *output)
        ctx.scalars = inputs[4:]
        _keep_backend(ctx)

    @staticmethod
    def backward(ctx, grad_costs, *_):
        grad = _first_order(_LOSS[0], _LOSS[2], ctx, grad_costs, *ctx.saved_tensors, *ctx.scalars)
        return grad, None, None, None, None, None, None

    jvp = _forward_mode_unsupported(_LOSS[0])


class _FusedJointRnntLoss(_Remember):
    @staticmethod
    def forward(enc, pred, weight, bias, targets, logit_lengths, target_lengths, blank, activation, clamp):
        return _below(_JOINT[1], enc, pred, weight, bias, targets, logit_lengths, target_lengths, blank, activation,
                      clamp, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        costs, alphas, betas, den = output
        ctx.mark_non_differentiable(alphas, betas, den)
        ctx.save_for_backward(*inputs[:7], *output)  # bias may be None: save_for_backward takes it
        ctx.scalars = inputs[7:]
        _keep_backend(ctx)

    @staticmethod
    def backward(ctx, grad_costs, *_):
        grads = _first_order(_JOINT[0], _JOINT[2], ctx, grad_costs, *ctx.saved_tensors, *ctx.scalars)
        return (*_wanted(ctx, grads), None, None, None, None, None, None)

    jvp = _forward_mode_unsupported(_JOINT[0])


def _reduce(op: str, costs, reduction, zero_infinity: bool):
    # the public ops' own check and reduction (csrc/rnnt.cpp), a composite op: per sample under vmap (the loss
    # direction before it has said so)
    args = costs, reduction, zero_infinity, op
    reduce = torch.ops.amnets._rnnt_reduce
    return _quietly_per_sample(reduce, *args) if _under_vmap() else reduce(*args)


def rnnt_loss(logits, targets, logit_lengths, target_lengths, blank, clamp, reduction, fused_log_softmax,
              zero_infinity):
    costs = _RnntLoss.apply(logits, targets, logit_lengths, target_lengths, blank, clamp, fused_log_softmax)[0]
    return _reduce(_LOSS[0], costs, reduction, zero_infinity)


def fused_joint_rnnt_loss(enc, pred, weight, bias, targets, logit_lengths, target_lengths, blank, activation, clamp,
                          reduction, zero_infinity):
    costs = _FusedJointRnntLoss.apply(enc, pred, weight, bias, targets, logit_lengths, target_lengths, blank,
                                      activation, clamp)[0]
    return _reduce(_JOINT[0], costs, reduction, zero_infinity)
