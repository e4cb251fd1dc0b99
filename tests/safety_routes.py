"""Corrupt index and label data through every route that once crashed a kernel; run as a script.

`python tests/safety_routes.py FACE [DEVICE [GROUP]]` runs each route of GROUP (default "indices") with the
backend FACE on DEVICE (default cpu;
the routes that CUDA tensors do not support or that are documented as unchecked there are left out: see
UNCHECKED_ON_CUDA), in this one process (the
caller, tests/test_safety.py, runs it in a subprocess so that a segfault fails the test instead of
killing pytest), and prints one JSON line per route: {"route", "outcome", "message"}, where outcome is
the exception's type name, or "returned" when the call gave a result (a silent wrong result: every
route here is invalid input). The test asserts that every route raised ValueError or TypeError (the one
the route names, where it names one) naming the corrupted argument and that the process ended without a
signal. The other groups (tests/test_safety.py: ARGUMENT_GROUPS) are the native ops' (torch.ops.amnets_native.*, the
FrameEngine) other arguments: state shapes, strings, dtypes, sizes; cpu face only.
"""

import json
import os
import sys

if (sys.argv[2:] or ["cpu"])[0] == "cpu":  # Triton faces on CPU tensors: before any kernel import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import amnets_kernels as ak  # noqa: E402

HUGE = 10_000_000
ROUTES = []
native = torch.ops.amnets_native


def route(argument: str, error: type | None = None, group: str = "indices"):
    """Register a route of `group` whose error must name `argument` (and be an `error`, when given)."""
    def register(fn):
        ROUTES.append((argument, error, group, fn))
        return fn
    return register


def all_refuse(argument: str, *calls, also: str = ""):
    """Every call must raise ValueError or TypeError naming `argument` (and `also`); raises the last one (the
    route's outcome), re-raises any other error, and returns "returned" for a call that gave a result."""
    for call in calls:
        try:
            call()
        except (ValueError, TypeError) as exc:
            if argument not in str(exc) or also not in str(exc):
                raise
            last = exc
        else:
            return "returned"
    raise last


def matrix(out_f=64, in_f=64, block=16, sparsity=0.5):
    return ak.BlockSparseMatrix.from_dense(torch.randn(out_f, in_f), block_size=block, sparsity=sparsity)


def corrupt_prepared_under_inference(make, edit):
    """Built and edited under inference_mode: inference tensors keep no version counter."""
    with torch.inference_mode():
        weight = matrix()
        step = make(weight)
        step.call()  # fine before the edit
        edit(weight)
        return step.call()


class Linear:
    def __init__(self, weight):
        self.step, self.x = ak.PreparedBsrLinear(weight), torch.randn(2, 64)

    def call(self):
        return self.step(self.x)


class Cell:  # [W_ih | W_hh] with D = 48, H = 16: a (64, 64) matrix
    def __init__(self, weight):
        self.step = ak.PreparedBsrLstmCell(weight)
        self.args = torch.randn(2, 48), torch.randn(2, 16), torch.randn(2, 16)

    def call(self):
        return self.step(*self.args)


def set_col(value, index=0):
    return lambda w: w.col_indices.__setitem__(index, value)


@route("col_indices")
def prepared_linear_inference_col_huge():  # was a segfault (cpu and Triton faces)
    return corrupt_prepared_under_inference(Linear, set_col(HUGE))


@route("col_indices")
def prepared_linear_inference_col_just_out():  # was a silent wrong result (max |dy| ~1e34)
    return corrupt_prepared_under_inference(Linear, set_col(4, index=1))


@route("crow_indices")
def prepared_linear_inference_crow_huge():
    return corrupt_prepared_under_inference(Linear, lambda w: w.crow_indices.__setitem__(1, HUGE))


@route("col_indices")
def prepared_cell_inference_col_huge():
    return corrupt_prepared_under_inference(Cell, set_col(HUGE))


def edited_after_a_call(edit):
    weight, x = matrix(), torch.randn(3, 64)
    ak.bsr_linear(x, weight)  # the check of this pattern is now cached (on CUDA tensors)
    edit(weight.col_indices)
    return ak.bsr_linear(x, weight)


@route("col_indices")
def col_edited_through_data():  # no version bump; was a segfault on the cpu face
    return edited_after_a_call(lambda col: col.data.__setitem__(0, HUGE))


@route("col_indices")
def col_edited_through_numpy():
    return edited_after_a_call(lambda col: col.numpy().__setitem__(0, -5))


@route("col_indices")
def col_edited_through_data_then_weights_changed():  # CUDA too: weights_changed() forgets checked patterns
    def edit(col):
        col.data[0] = HUGE
        ak.weights_changed()
    return edited_after_a_call(edit)


def raw_bsr_args(col_value=HUGE):
    weight = matrix()
    col = weight.col_indices.clone()
    col[0] = col_value
    return weight.values, weight.crow_indices, col, 64, 64


@route("col_indices")
def registered_backward_op_bad_col():  # was a segfault: it validated without reading the indices
    values, crow, col, n, k = raw_bsr_args()
    x, g = torch.randn(3, k), torch.randn(3, n)
    return torch.ops.amnets.bsr_linear_backward(g, x, values, crow, col, n, k, True, True)


@route("col_indices")
def registered_forward_op_bad_col():
    values, crow, col, n, k = raw_bsr_args(-1)
    return torch.ops.amnets.bsr_linear_forward(torch.randn(3, k), values, crow, col, n, k, None)


@route("col_indices", ValueError)
def native_ops_bad_col():  # the compiled kernels called with no Python layer in front (cpu only)
    values, crow, col, n, k = raw_bsr_args()
    x, g = torch.randn(3, k), torch.randn(3, n)
    return all_refuse("col_indices",
                      lambda: native.bsr_linear_forward(x, values, crow, col, n, k, None),
                      lambda: native.bsr_linear_backward(g, x, values, crow, col, n, k, True, True),
                      lambda: native.bsr_lstm_cell_forward(
                          torch.randn(3, 48), torch.randn(3, 16), torch.randn(3, 16), values, crow, col, None),
                      lambda: native.bsr_lstm_stack_step(torch.randn(3, 48), None, None, [values, crow, col],
                                                         [None], 16))


@route("crow_indices")
def native_ops_bad_crow():
    weight = matrix()
    crow = weight.crow_indices.clone()
    crow[2] = HUGE
    return torch.ops.amnets_native.bsr_linear_forward(torch.randn(3, 64), weight.values, crow,
                                                                     weight.col_indices, 64, 64, None)


def values_set_to_fewer_blocks(make):
    weight = matrix()
    step = make(weight)
    step.call()
    weight.values.set_(weight.values[:3].clone())  # the index arrays still name every block
    return step.call()


@route("col_indices")
def prepared_linear_values_set_smaller():  # was an out-of-bounds read (NaN garbage) on the cpu face
    return values_set_to_fewer_blocks(Linear)


@route("col_indices")
def prepared_cell_values_set_smaller():  # was a segfault on the Triton face
    return values_set_to_fewer_blocks(Cell)


@route("w_hh_u")
def prepared_lowrank_weight_resized():  # was a silent run on the resized weights
    factors = [torch.randn(64, 4), torch.randn(4, 8), torch.randn(64, 4), torch.randn(4, 16)]
    step = ak.PreparedLowrankLstmCell(*factors, torch.randn(64))
    args = torch.randn(2, 8), torch.randn(2, 16), torch.randn(2, 16)
    step(*args)
    factors[2].resize_(64, 2)
    return step(*args)


@route("w_ih_v")
def native_lowrank_cell_mismatched_factors():
    x, h = torch.randn(2, 8), torch.randn(2, 16)
    return torch.ops.amnets_native.lowrank_lstm_cell_forward(
        x, h, h, torch.randn(64, 4), torch.randn(4, 9), torch.randn(64, 4), torch.randn(4, 16), None, False)


def lattice(batch=2, frames=5, labels=3, vocab=7):
    logits = torch.randn(batch, frames, labels + 1, vocab)
    targets = torch.randint(1, vocab, (batch, labels), dtype=torch.int32)
    return logits, targets, torch.full((batch,), frames, dtype=torch.int32), \
        torch.full((batch,), labels, dtype=torch.int32)


def saved_lattice(logits, targets, frames, labels):
    """The forward's outputs on valid labels: what backward reads besides them."""
    return torch.ops.amnets.rnnt_loss_forward(logits, targets, frames, labels, 0, -1.0, True, True)


@route("targets")
def registered_rnnt_backward_bad_target():  # was a segfault
    logits, targets, frames, labels = lattice()
    saved = saved_lattice(logits, targets, frames, labels)
    targets[1, 0] = HUGE
    return torch.ops.amnets.rnnt_loss_backward(torch.ones(2), logits, targets, frames, labels, *saved,
                                                         0, -1.0, True)


@route("logit_lengths")
def registered_rnnt_backward_lengths_too_long():  # was a silent pass
    logits, targets, frames, labels = lattice()
    saved = saved_lattice(logits, targets, frames, labels)
    frames[0] = 9
    return torch.ops.amnets.rnnt_loss_backward(torch.ones(2), logits, targets, frames, labels,
                                                               *saved, 0, -1.0, True)


@route("targets")
def native_rnnt_bad_labels():
    logits, targets, frames, labels = lattice()
    saved = saved_lattice(logits, targets, frames, labels)
    for name, edit in (("targets", lambda: targets.__setitem__((0, 1), -4)),
                       ("target_lengths", lambda: labels.__setitem__(1, 4)),
                       ("logit_lengths", lambda: frames.__setitem__(0, 0))):
        t, f, u = targets.clone(), frames.clone(), labels.clone()
        edit()
        for call in (lambda: torch.ops.amnets_native.rnnt_loss_forward(logits, targets, frames, labels, 0, -1.0,
                                                                       True, True),
                     lambda: torch.ops.amnets_native.rnnt_loss_backward(torch.ones(2), logits, targets, frames,
                                                                        labels, *saved, 0, -1.0, True)):
            try:
                call()
            except ValueError as exc:
                if name not in str(exc):
                    raise
            else:
                return "returned"
        targets.copy_(t), frames.copy_(f), labels.copy_(u)
    raise ValueError("targets, target_lengths, logit_lengths: every native loss op refused every corruption")


def joint(batch=2, frames=4, labels=2, hidden=6, vocab=5):
    enc, pred = torch.randn(batch, frames, hidden), torch.randn(batch, labels + 1, hidden)
    weight, bias = torch.randn(vocab, hidden), torch.randn(vocab)
    targets = torch.randint(1, vocab, (batch, labels), dtype=torch.int32)
    return enc, pred, weight, bias, targets, torch.full((batch,), frames, dtype=torch.int32), \
        torch.full((batch,), labels, dtype=torch.int32)


@route("targets")
def registered_joint_backward_bad_target():
    enc, pred, weight, bias, targets, frames, labels = joint()
    saved = torch.ops.amnets.fused_joint_rnnt_loss_forward(enc, pred, weight, bias, targets, frames, labels, 0,
                                                           "tanh", -1.0, True)
    targets[0, 1] = 5  # = V
    return torch.ops.amnets.fused_joint_rnnt_loss_backward(
        torch.ones(2), enc, pred, weight, bias, targets, frames, labels, *saved, 0, "tanh", -1.0)


@route("target_lengths")
def native_joint_bad_lengths():
    enc, pred, weight, bias, targets, frames, labels = joint()
    labels[0] = 3
    return torch.ops.amnets_native.fused_joint_rnnt_loss_forward(
        enc, pred, weight, bias, targets, frames, labels, 0, "tanh", -1.0, True)


@route("logit_lengths")
def int64_lengths_that_wrap_in_int32():  # 2^32 + 3 would narrow to a valid 3
    logits, targets, frames, labels = lattice()
    return ak.rnnt_loss(logits, targets, frames.long() + 2**32, labels)


@route("col_indices")
def float_indices_rejected():  # 2.7 was truncated to 2
    weight = matrix(16, 16, 8, 0.0)
    return ak.BlockSparseMatrix(weight.values, weight.crow_indices, weight.col_indices + 0.7,
                                               (16, 16))


@route("crow_indices")
def int64_indices_that_wrap_in_int32():
    weight = matrix(16, 16, 8, 0.0)
    return ak.BlockSparseMatrix(weight.values, weight.crow_indices.long() + 2**32,
                                                weight.col_indices.long(), (16, 16))


# ---------------------------------------------------------------------------------------------------
# The native ops' other arguments, a group per kind (tests/test_safety.py: ARGUMENT_GROUPS; cpu face only).

def dense_bsr(n, k, b=32):
    """Every b x b block of an (n, k) matrix stored: (values, crow_indices, col_indices)."""
    nb, kb = n // b, k // b
    return torch.randn(nb * kb, b, b), torch.arange(nb + 1) * kb, torch.arange(kb).repeat(nb)


@route(": h ", ValueError, group="state_batch")
def native_bsr_lstm_sequence_h_batch():  # h's batch was never checked: heap corruption (larger), over-read (smaller)
    hidden, d, steps = 64, 32, 3
    weights = (*dense_bsr(4 * hidden, d), *dense_bsr(4 * hidden, hidden))

    def call(batch, h_batch):
        return native.bsr_lstm_sequence_forward(torch.randn(steps, batch, d), torch.randn(h_batch, hidden),
                                                torch.randn(batch, hidden), *weights, None)
    return all_refuse(": h ", lambda: call(1, 64), lambda: call(64, 1))


@route(": c ", ValueError, group="state_batch")
def native_lstm_c_batch():  # the same for c, on every native LSTM op
    x, h, wrong = torch.randn(3, 48), torch.randn(3, 16), torch.randn(5, 16)
    weight = matrix()
    factors = torch.randn(64, 4), torch.randn(4, 48), torch.randn(64, 4), torch.randn(4, 16)
    sequence = (*dense_bsr(64, 32, 16), *dense_bsr(64, 16, 16))
    return all_refuse(": c ",
                      lambda: native.bsr_lstm_cell_forward(x, h, wrong, weight.values, weight.crow_indices,
                                                           weight.col_indices, None),
                      lambda: native.bsr_lstm_sequence_forward(torch.randn(2, 3, 32), h, wrong, *sequence, None),
                      lambda: native.lowrank_lstm_cell_forward(x, h, wrong, *factors, None, False))


@route("0 must have shape", ValueError, group="state_batch")
def native_stack_step_h0_shape():  # the stacked steps read (L, B, H) of h0: its layers, batch and width
    x, weight = torch.randn(3, 48), matrix()
    factors = torch.randn(64, 4), torch.randn(4, 48), torch.randn(64, 4), torch.randn(4, 16)
    calls = []
    blocks = [weight.values, weight.crow_indices, weight.col_indices]
    for shape in ((2, 3, 16), (1, 5, 16), (1, 1, 16), (1, 3, 8), (3, 16)):
        state = torch.randn(shape), torch.randn(1, 3, 16)
        for h0, c0 in (state, state[::-1]):  # (each of h0 and c0 wrong; the route names h0, the message either)
            calls += [lambda h0=h0, c0=c0: native.bsr_lstm_stack_step(x, h0, c0, blocks, [None], 16),
                      lambda h0=h0, c0=c0: native.lowrank_lstm_stack_step(x, h0, c0, list(factors), [None], 16)]
    return all_refuse("0 must have shape (num_layers, B, hidden_size) = (1, 3, 16)", *calls)


@route("0 must have shape", ValueError, group="state_batch")
def native_stack_step_projected_state():  # with a projection (5 tensors a layer) h is (L, B, P), c (L, B, H)
    x, factors = torch.randn(3, 48), [torch.randn(64, 4), torch.randn(4, 48), torch.randn(64, 4), torch.randn(4, 8),
                                      torch.randn(8, 16)]
    good_h, good_c = torch.randn(1, 3, 8), torch.randn(1, 3, 16)
    return all_refuse("0 must have shape (num_layers, B, ",
                      lambda: native.lowrank_lstm_stack_step(x, torch.randn(1, 3, 16), good_c, factors, [None], 16),
                      lambda: native.lowrank_lstm_stack_step(x, good_h, torch.randn(1, 3, 8), factors, [None], 16),
                      lambda: native.lowrank_lstm_stack_step(x, torch.randn(2, 3, 8), None, factors, [None], 16))


@route("w_h", ValueError, group="state_batch")
def native_stack_step_projection_shapes():  # the projection's width is read from w_hr: each factor must agree
    x = torch.randn(3, 48)

    def factors(w_hh_v=(4, 8), w_hr=(8, 16), d=48):
        return [torch.randn(64, 4), torch.randn(4, d), torch.randn(64, 4), torch.randn(w_hh_v), torch.randn(w_hr)]
    return all_refuse("w_h",
                      lambda: native.lowrank_lstm_stack_step(x, None, None, factors(w_hr=(8, 12)), [None], 16),
                      lambda: native.lowrank_lstm_stack_step(x, None, None, factors(w_hr=(8,)), [None], 16),
                      lambda: native.lowrank_lstm_stack_step(x, None, None, factors(w_hr=(0, 16)), [None], 16),
                      lambda: native.lowrank_lstm_stack_step(x, None, None, factors(w_hh_v=(4, 16)), [None], 16),
                      lambda: native.lowrank_lstm_stack_step(x, None, None, factors() + factors(w_hr=(6, 16), d=8),
                                                             [None, None], 16))


@route("w_hr", ValueError, group="state_batch")
def native_bsr_projection_checks():  # block-sparse layers with nn.LSTM's projection: w_hr's shape and dtype,
    hidden, proj, d = 32, 16, 48     # and with it the state's widths (the kernels index h by w_hr's rows)
    x, blocks = torch.randn(3, d), list(dense_bsr(4 * hidden, d + proj, 16))
    sequence = (*dense_bsr(4 * hidden, d, 16), *dense_bsr(4 * hidden, proj, 16))
    h, c = torch.randn(3, proj), torch.randn(3, hidden)

    def stack(w_hr, h0=None, c0=None):
        return lambda: native.bsr_lstm_stack_step(x, h0, c0, blocks + [w_hr], [None], hidden)

    def run(w_hr, h=h, c=c):
        return lambda: native.bsr_lstm_sequence_forward(torch.randn(2, 3, d), h, c, *sequence, None, w_hr)
    return all_refuse("w_hr", stack(torch.randn(proj, 24)), stack(torch.randn(proj)), stack(torch.randn(0, hidden)),
                      stack(torch.randn(proj, hidden, dtype=torch.bfloat16)), run(torch.randn(8, hidden)),
                      run(torch.randn(proj)), run(torch.randn(proj, hidden, dtype=torch.float64)),
                      run(torch.randn(proj, 24)))


@route("0 must have shape", ValueError, group="state_batch")
def native_bsr_stack_step_projected_state():  # with a projection (4 tensors a layer) h is (L, B, P), c (L, B, H)
    hidden, proj, d = 32, 16, 48
    x, blocks = torch.randn(3, d), list(dense_bsr(4 * hidden, d + proj, 16)) + [torch.randn(proj, hidden)]
    good_h, good_c = torch.randn(1, 3, proj), torch.randn(1, 3, hidden)
    return all_refuse("0 must have shape (num_layers, B, ",
                      lambda: native.bsr_lstm_stack_step(x, torch.randn(1, 3, hidden), good_c, blocks, [None], hidden),
                      lambda: native.bsr_lstm_stack_step(x, good_h, torch.randn(1, 3, proj), blocks, [None], hidden),
                      lambda: native.bsr_lstm_stack_step(x, torch.randn(2, 3, proj), None, blocks, [None], hidden))


@route("biases", ValueError, group="state_batch")
def native_stack_step_layer_count():  # the weight list is read per layer: its length must match the layers
    x, weight = torch.randn(3, 48), matrix()
    factors = [torch.randn(64, 4), torch.randn(4, 48), torch.randn(64, 4), torch.randn(4, 16)]
    blocks = [weight.values, weight.crow_indices, weight.col_indices]
    return all_refuse("biases",
                      lambda: native.bsr_lstm_stack_step(x, None, None, blocks, [None, None], 16),
                      lambda: native.bsr_lstm_stack_step(x, None, None, blocks[:2], [None], 16),
                      lambda: native.lowrank_lstm_stack_step(x, None, None, factors, [None, None], 16),
                      lambda: native.lowrank_lstm_stack_step(x, None, None, factors[:3], [None], 16),
                      lambda: native.lowrank_lstm_stack_step(x, None, None, [], [], 16))


@route("activation", ValueError, group="joint")
def native_joint_unknown_activation():  # any other string ran as the identity
    enc, pred, weight, bias, targets, frames, labels = joint()
    saved = native.fused_joint_rnnt_loss_forward(enc, pred, weight, bias, targets, frames, labels, 0, "tanh", -1.0,
                                                 True)
    forward = [lambda a=a: native.fused_joint_rnnt_loss_forward(enc, pred, weight, bias, targets, frames, labels, 0,
                                                                a, -1.0, False) for a in ("TANH", "sigmoid", "")]
    return all_refuse("activation", *forward,
                      lambda: native.fused_joint_rnnt_loss_backward(torch.ones(2), enc, pred, weight, bias, targets,
                                                                    frames, labels, *saved, 0, "sigmoid", -1.0),
                      also="('tanh', 'relu', 'identity')")


@route("enc", ValueError, group="joint")
def native_joint_zero_hidden():
    enc, pred, weight, bias, targets, frames, labels = joint(hidden=0)
    return native.fused_joint_rnnt_loss_forward(enc, pred, weight, bias, targets, frames, labels, 0, "tanh", -1.0,
                                                False)


def engine(cheap="lowrank", dtype=torch.float32, edit=None, arbitrator_edit=None):
    """A one-layer FrameEngine (D = 12, H = 16), its tensors edited first."""
    d, hidden, rank = 12, 16, 4
    weight = torch.randn(4 * hidden, d + hidden) / 3
    if cheap == "sparse":
        kept = ak.BlockSparseMatrix.from_dense(weight, block_size=16, sparsity=0.5)
        layer = [weight, kept.values, kept.crow_indices, kept.col_indices, torch.randn(4 * hidden)]
    else:
        layer = [weight, torch.randn(4 * hidden, rank), torch.randn(rank, d), torch.randn(4 * hidden, rank),
                 torch.randn(rank, hidden), torch.randn(4 * hidden)]
    layer = [t.to(dtype) if t.is_floating_point() else t for t in layer]
    arbitrator = [t.to(dtype) for t in (torch.randn(8, d + hidden), torch.randn(8), torch.randn(1, 8),
                                        torch.randn(1))]
    if edit:
        edit(layer)
    if arbitrator_edit:
        arbitrator_edit(arbitrator)
    return torch.classes.amnets_native.FrameEngine(cheap, layer, arbitrator, d, True, False)


def replace(index, change):
    return lambda tensors: tensors.__setitem__(index, change(tensors[index]))


@route("w_ih_u", TypeError, group="frame_engine")
def engine_bf16_with_fp32_factor():  # was a PyTorch INTERNAL ASSERT
    return engine(dtype=torch.bfloat16, edit=replace(1, lambda t: t.float()))


@route("w_ih_v", TypeError, group="frame_engine")
def engine_integer_or_double_factor():  # were converted silently
    return all_refuse("w_ih_v", lambda: engine(edit=replace(2, lambda t: t.long())),
                      lambda: engine(edit=replace(2, lambda t: t.double())))


@route("kept values", ValueError, group="frame_engine")
def engine_meta_kept_values():  # was accepted, then "data is not allocated yet" at run()
    return engine("sparse", edit=replace(1, lambda t: t.to("meta")))


@route("bias", ValueError, group="frame_engine")
def engine_meta_bias():
    return engine("sparse", edit=replace(4, lambda t: t.to("meta")))


@route("bias", TypeError, group="frame_engine")
def engine_integer_bias():
    return engine("sparse", edit=replace(4, lambda t: t.long()))


@route("arbitrator W1", TypeError, group="frame_engine")
def engine_arbitrator_other_dtype():
    return engine(arbitrator_edit=replace(0, lambda t: t.double()))


def lowrank_cell_saved():
    x, h, c = torch.randn(2, 8), torch.randn(2, 16), torch.randn(2, 16)
    factors = torch.randn(64, 4), torch.randn(4, 8), torch.randn(64, 4), torch.randn(4, 16)
    h1, c1, gates = native.lowrank_lstm_cell_forward(x, h, c, *factors, None, True)
    return torch.randn_like(h1), torch.randn_like(c1), x, h, c, factors, c1, gates


@route("c1", ValueError, group="lowrank_cell_backward")
def native_lowrank_cell_backward_bad_c1():  # was reported as the sequence's "cells"
    grad_h1, grad_c1, x, h, c, factors, c1, gates = lowrank_cell_saved()
    return native.lowrank_lstm_cell_backward(grad_h1, grad_c1, x, h, c, *factors, c1[:1], gates)


@route("grad_h1", ValueError, group="lowrank_cell_backward")
def native_lowrank_cell_backward_bad_grad_h1():  # was reported as "grad_out"
    grad_h1, grad_c1, x, h, c, factors, c1, gates = lowrank_cell_saved()
    return native.lowrank_lstm_cell_backward(grad_h1[:, :3], grad_c1, x, h, c, *factors, c1, gates)


@route(": x ", TypeError, group="dtypes")
def native_ops_integer_x():  # bsr_linear_forward returned int64; the low-rank ops converted it
    weight = matrix()
    values, crow, col = weight.values, weight.crow_indices, weight.col_indices
    x, h = torch.randn(2, 8), torch.randn(2, 16)
    factors = torch.randn(64, 4), torch.randn(4, 8), torch.randn(64, 4), torch.randn(4, 16)
    return all_refuse(": x ",
                      lambda: native.bsr_linear_forward(torch.ones(3, 64, dtype=torch.long), values.long(), crow,
                                                        col, 64, 64, None),
                      lambda: native.lowrank_lstm_cell_forward(x.long(), h, h, *factors, None, False),
                      lambda: native.lowrank_lstm_sequence_forward(x[None].long(), h, h, *factors, None, False))


@route("must have dtype torch.float32 (the forward's lattice", TypeError, group="dtypes")
def native_rnnt_backward_lattice_of_another_dtype():  # was converted silently: another gradient (off by 1.5e-2)
    logits, targets, frames, labels = lattice()
    costs, alphas, betas, den = saved_lattice(logits, targets, frames, labels)
    enc, pred, weight, bias, j_targets, j_frames, j_labels = joint()
    j_saved = native.fused_joint_rnnt_loss_forward(enc, pred, weight, bias, j_targets, j_frames, j_labels, 0, "tanh",
                                                   -1.0, True)
    calls = []
    for edit in (lambda a, b, d: (a.half(), b, d), lambda a, b, d: (a, b.bfloat16(), d),
                 lambda a, b, d: (a, b, d.double())):
        lattice_ = edit(alphas, betas, den)
        calls.append(lambda l=lattice_: native.rnnt_loss_backward(torch.ones(2), logits, targets, frames, labels,
                                                                 costs, *l, 0, -1.0, True))
        joint_ = edit(*j_saved[1:])
        calls.append(lambda l=joint_: native.fused_joint_rnnt_loss_backward(
            torch.ones(len(j_frames)), enc, pred, weight, bias, j_targets, j_frames, j_labels, j_saved[0], *l, 0,
            "tanh", -1.0))
    return all_refuse("must have dtype torch.float32 (the forward's lattice", *calls)


@route("grad_costs", TypeError, group="dtypes")
def native_rnnt_backward_grad_costs_of_another_dtype():  # was converted silently
    logits, targets, frames, labels = lattice()
    saved = saved_lattice(logits, targets, frames, labels)
    return native.rnnt_loss_backward(torch.ones(2, dtype=torch.float64), logits, targets, frames, labels, *saved, 0,
                                     -1.0, True)


@route("bias", TypeError, group="dtypes")
def native_bsr_bias_other_dtype():  # was cast silently
    weight, x = matrix(), torch.randn(3, 64)
    args = weight.values, weight.crow_indices, weight.col_indices, 64, 64
    return all_refuse("bias", *(lambda t=t: native.bsr_linear_forward(x, *args, torch.ones(64, dtype=t))
                                for t in (torch.float64, torch.long)))


@route("weight", TypeError, group="dtypes")
def native_joint_integer_weight():
    enc, pred, weight, bias, targets, frames, labels = joint()
    return native.fused_joint_rnnt_loss_forward(enc, pred, weight.long(), bias, targets, frames, labels, 0, "tanh",
                                                -1.0, False)


@route("pred", TypeError, group="dtypes")
def native_joint_double_pred():
    enc, pred, weight, bias, targets, frames, labels = joint()
    return native.fused_joint_rnnt_loss_forward(enc, pred.double(), weight, bias, targets, frames, labels, 0, "tanh",
                                                -1.0, False)


def huge_out_features(blocks, block_size):
    """bsr_linear_forward, native and public, with out_features = 2^63 - 1: (N + b - 1) / b overflowed (undefined
    behaviour; a negative count in the message). The message must give ceil(N / b) + 1 exactly."""
    n, x = 2**63 - 1, torch.randn(3, 64)
    calls = [lambda op=op: op(x, *blocks, n, 64, None)
             for op in (native.bsr_linear_forward, torch.ops.amnets.bsr_linear_forward)]
    return all_refuse("out_features", *calls, also=f"= ({-(-n // block_size) + 1},)")


@route("out_features", ValueError, group="ceil_div")
def bsr_out_features_near_int64_max():
    weight = matrix()
    return huge_out_features((weight.values, weight.crow_indices, weight.col_indices), 16)


@route("out_features", ValueError, group="ceil_div")
def bsr_out_features_int64_max_block_1():  # ceil(N / 1) + 1 = 2^63 itself overflows an int64
    return huge_out_features((torch.randn(1, 1, 1), torch.tensor([0, 1]), torch.tensor([0])), 1)


# The compiled cpu face's own kernels, called with no Python layer in front.
NATIVE_ONLY = {"native_ops_bad_col", "native_ops_bad_crow", "native_lowrank_cell_mismatched_factors",
               "native_rnnt_bad_labels", "native_joint_bad_lengths"}
# On CUDA tensors the index check is cached per version (reading device data is a sync): an edit that
# bumps no version is not seen (README, safety contract); a CUDA tensor has no .numpy().
UNCHECKED_ON_CUDA = {"col_edited_through_data", "col_edited_through_numpy"}


def main(face: str, device: str, group: str = "indices") -> None:
    torch.manual_seed(0)
    torch.set_default_device(device)
    with ak.use_backend(face):
        for argument, error, in_group, fn in ROUTES:
            if in_group != group:
                continue
            if (fn.__name__ in NATIVE_ONLY and face != "cpu") or (device != "cpu" and fn.__name__ in UNCHECKED_ON_CUDA):
                continue
            print(json.dumps({"route": fn.__name__, "outcome": "started"}), flush=True)
            try:
                outcome, message = ("returned", "") if fn() is not None else ("returned None", "")
            except Exception as exc:  # noqa: BLE001 - the outcome is what the test judges
                outcome, message = type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""
            print(json.dumps({"route": fn.__name__, "argument": argument, "error": error and error.__name__,
                              "outcome": outcome, "message": message}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu", sys.argv[3] if len(sys.argv) > 3 else "indices")
