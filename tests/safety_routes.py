"""Corrupt index and label data through every route that once crashed a kernel; run as a script.

`python tests/safety_routes.py FACE [DEVICE]` runs each route with the backend FACE on DEVICE (default cpu;
the routes that CUDA tensors do not support or that are documented as unchecked there are left out: see
UNCHECKED_ON_CUDA), in this one process (the
caller, tests/test_safety.py, runs it in a subprocess so that a segfault fails the test instead of
killing pytest), and prints one JSON line per route: {"route", "outcome", "message"}, where outcome is
the exception's type name, or "returned" when the call gave a result (a silent wrong result: every
route here is invalid input). The test asserts that every route raised ValueError or TypeError
naming the corrupted argument and that the process ended without a signal.
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


def route(argument: str):
    """Register a route whose error must name `argument`."""
    def register(fn):
        ROUTES.append((argument, fn))
        return fn
    return register


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


@route("col_indices")
def native_ops_bad_col():  # the compiled kernels called with no Python layer in front (cpu only)
    values, crow, col, n, k = raw_bsr_args()
    x, g = torch.randn(3, k), torch.randn(3, n)
    for call in (lambda: torch.ops.amnets_native.bsr_linear_forward(x, values, crow, col, n, k, None),
                 lambda: torch.ops.amnets_native.bsr_linear_backward(g, x, values, crow, col, n, k, True, True),
                 lambda: torch.ops.amnets_native.bsr_lstm_cell_forward(
                     torch.randn(3, 48), torch.randn(3, 16), torch.randn(3, 16), values, crow, col, None)):
        try:
            call()
        except ValueError as exc:
            if "col_indices" not in str(exc):
                raise
        else:
            return "returned"
    raise ValueError("col_indices: every native op refused it")


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


# The compiled cpu face's own kernels, called with no Python layer in front.
NATIVE_ONLY = {"native_ops_bad_col", "native_ops_bad_crow", "native_lowrank_cell_mismatched_factors",
               "native_rnnt_bad_labels", "native_joint_bad_lengths"}
# On CUDA tensors the index check is cached per version (reading device data is a sync): an edit that
# bumps no version is not seen (README, safety contract); a CUDA tensor has no .numpy().
UNCHECKED_ON_CUDA = {"col_edited_through_data", "col_edited_through_numpy"}


def main(face: str, device: str) -> None:
    torch.manual_seed(0)
    torch.set_default_device(device)
    with ak.use_backend(face):
        for argument, fn in ROUTES:
            if (fn.__name__ in NATIVE_ONLY and face != "cpu") or (device != "cpu" and fn.__name__ in UNCHECKED_ON_CUDA):
                continue
            print(json.dumps({"route": fn.__name__, "outcome": "started"}), flush=True)
            try:
                outcome, message = ("returned", "") if fn() is not None else ("returned None", "")
            except Exception as exc:  # noqa: BLE001 - the outcome is what the test judges
                outcome, message = type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""
            print(json.dumps({"route": fn.__name__, "argument": argument, "outcome": outcome,
                              "message": message}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu")
