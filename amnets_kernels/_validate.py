"""The argument checks in Python: the fake (tracing) kernels and the prepared steps run these; the ops
themselves run their C++ twins (csrc/checks.h), which give the same messages.

Each check raises TypeError (wrong type or dtype) or ValueError (wrong rank, shape, value), naming
the op and the argument and giving the expected and the actual value. Faces assume valid input.
`data=False` skips the checks that read tensor contents (index arrays, lengths, labels): fake
tensors under torch.compile have none, and the op's real run checks them.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
REDUCTIONS = ("none", "mean", "sum")
ACTIVATIONS = ("tanh", "relu", "identity")


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def _tensor(op: str, name: str, t, *, ndim: int | None = None, dtypes=None, optional: bool = False):
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D; got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in ({_names(dtypes)}); got {t.dtype}")


def tensor_types(op: str, optional=(), **named) -> None:
    """Type check run by the public Python functions before torch.ops dispatch (which would otherwise
    answer a non-tensor with a RuntimeError of its own)."""
    for name, t in named.items():
        if not isinstance(t, Tensor) and not (t is None and name in optional):
            raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")


def _shape(op: str, name: str, t: Tensor | None, expected: tuple, meaning: str = ""):
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {meaning}{tuple(expected)}; got {tuple(t.shape)}")


def _int(op: str, name: str, value, low: int | None = None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int; got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{op}: {name} must be >= {low}; got {value}")


def scalars(op: str, **named) -> None:
    """The public functions' scalar arguments, before torch.ops would answer a wrong type with a
    RuntimeError of its own: ints (blank), real numbers (clamp), strings (reduction, activation), bools (flags)."""
    for name, value in named.items():
        if name == "blank":
            _int(op, name, value)
            if not -2**63 <= value < 2**63:  # torch.ops: "Expected a value of type 'int' ... found type 'int'"
                raise ValueError(f"{op}: blank must be an index in [-V, V) (V = the vocabulary size); got {value}")
        elif name in ("reduction", "activation"):
            if not isinstance(value, str):
                raise TypeError(f"{op}: {name} must be a str; got {type(value).__name__}")
        elif name == "clamp":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{op}: {name} must be a float; got {type(value).__name__}")
            try:
                float(value)
            except OverflowError:  # an int no double holds
                raise ValueError(f"{op}: clamp must be a float (<= 0: no clamp); got an int of {value.bit_length()} "
                                 "bits") from None
        elif not isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be a bool; got {type(value).__name__}")


def _same_device_and_dtype(op: str, dtype_of: str, tensors: dict[str, Tensor | None], ints=()):
    """All tensors on one device; the floating ones in the dtype of `dtype_of`."""
    present = {k: v for k, v in tensors.items() if v is not None}
    ref = present[dtype_of]
    for name, t in present.items():
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {dtype_of} is on {ref.device}; "
                             "all tensors must be on one device")
        if name not in ints and t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {dtype_of} has {ref.dtype}; "
                            "they must match")


def prepared_input(op: str, name: str, t, width: int, like: Tensor, rows: int | None = None) -> None:
    """An activation handed to a prepared op (weights checked at preparation): a floating tensor
    (..., width) (or (rows, width)) in the weights' dtype, on their device."""
    if type(t) is not Tensor and not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() < 1 or t.shape[-1] != width or (rows is not None and tuple(t.shape) != (rows, width)):
        want = f"({rows}, {width})" if rows is not None else f"(..., {width})"
        raise ValueError(f"{op}: {name} must have shape {want}; got {tuple(t.shape)}")
    if t.device != like.device or (t.dtype != like.dtype and not _autocast_activation(t, like)):
        raise TypeError(f"{op}: {name} must be {like.dtype} on {like.device} like the prepared weights; "
                        f"got {t.dtype} on {t.device}")


def _autocast_activation(t: Tensor, like: Tensor) -> bool:
    """Under autocast the public ops cast fp32 weights to the autocast dtype (csrc/autocast.cpp), so an
    activation already in that dtype is what they expect (as nn.LSTM under autocast gets)."""
    kind = like.device.type
    return (like.dtype == torch.float32 and torch.is_autocast_enabled(kind)
            and t.dtype == torch.get_autocast_dtype(kind))


def prepared_step(op: str, x, h, c, input_size: int, hidden: int, like: Tensor) -> None:
    """The activations of a prepared LSTM step: x (B, input_size), h and c (B, hidden), all in the
    prepared weights' dtype on their device. One quick test for the usual case, then the precise error."""
    try:
        if (x.dim() == 2 and x.shape[1] == input_size and h.shape == c.shape == (x.shape[0], hidden)
                and x.dtype == h.dtype == c.dtype == like.dtype and x.device == h.device == c.device == like.device):
            return
    except AttributeError:
        pass
    prepared_input(op, "x", x, input_size, like)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (B, input_size); got shape {tuple(x.shape)}")
    for name, t in (("h", h), ("c", c)):
        prepared_input(op, name, t, hidden, like, rows=x.shape[0])


# ---------------------------------------------------------------------------------------------------
# bsr_linear

# Index arrays already checked, keyed by crow_indices: (col_indices ref, versions, block columns).
_checked_indices: WeakIdKeyDictionary = WeakIdKeyDictionary()


def version(t: Tensor):
    """t._version, or None for an inference tensor (which keeps no version counter)."""
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter: never cached
        return None


def _native_pattern_check():
    """torch.ops.amnets_native.bsr_check_pattern, or None without the compiled extension."""
    global _native_check
    if _native_check is False:
        try:
            _native_check = torch.ops.amnets_native.bsr_check_pattern.default
        except (AttributeError, RuntimeError):  # extension not loaded: the Python check below serves
            _native_check = None
    return _native_check


_native_check = False
# functorch's wrappers (vmap's batched tensors, grad's): no storage of their own, no data to read here
is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def index_data_readable(values: Tensor) -> bool:
    """Whether a weight's index data can be read now: not on "meta" (a model built there to be materialised
    later) nor while tracing (torch.compile/export or a dispatch mode such as make_fx or FakeTensorMode:
    tensors may be fake). Where not, the op checks the data itself on every real call."""
    return values.device.type != "meta" and not (torch.compiler.is_compiling()
                                                 or torch._C._len_torch_dispatch_stack() > 0)


def bsr_indices(op: str, crow: Tensor, col: Tensor, nnzb: int, block: int, out_features: int,
                in_features: int) -> None:
    """crow_indices/col_indices describe a canonical BSR pattern of nnzb blocks of block x block.

    CPU tensors: checked on every call by the compiled check the CPU kernels run themselves (a pass
    over the index arrays, a few microseconds; no cache, so no edit can slip past it: .data,
    .numpy(), inference tensors). CUDA tensors: reading them is a device sync, so the answer is
    cached until either tensor's version changes; an edit that bumps no version (.data, .numpy(), an
    inference tensor) is not seen by this check there.
    """
    if is_wrapped(crow) or is_wrapped(col):
        return  # functorch's wrappers (vmap over stacked weights) hold no data here; each sample's op call checks
    native = _native_pattern_check()
    if native is not None and crow.device.type == "cpu" and col.device.type == "cpu":
        native(crow, col, nnzb, block, out_features, in_features, op)
        return
    block_cols = -(-in_features // block)
    key = (version(crow), version(col), block_cols)
    seen = _checked_indices.get(crow)
    if seen is not None and seen[0]() is col and seen[1] == key and None not in key[:2]:
        return
    c = crow.detach().to("cpu", torch.int64)
    k = col.detach().to("cpu", torch.int64)
    if c[0].item() != 0:
        raise ValueError(f"{op}: crow_indices[0] must be 0; got {c[0].item()}")
    steps = c.diff()
    if (steps < 0).any():
        row = int((steps < 0).nonzero()[0, 0])
        raise ValueError(f"{op}: crow_indices must be non-decreasing; crow_indices[{row + 1}] = "
                         f"{c[row + 1].item()} < crow_indices[{row}] = {c[row].item()}")
    if c[-1].item() != nnzb:
        raise ValueError(f"{op}: crow_indices[-1] must equal the number of blocks "
                         f"(col_indices.numel() = {nnzb}); got {c[-1].item()}")
    if nnzb:
        low, high = k.min().item(), k.max().item()
        if low < 0 or high >= block_cols:
            raise ValueError(f"{op}: col_indices must lie in [0, {block_cols}) (block columns of "
                             f"in_features); got values in [{low}, {high}]")
        # Strictly increasing inside each block row: no duplicate blocks, canonical order.
        rising = k[1:] > k[:-1]
        row_starts = c[1:-1]
        rising[row_starts[(row_starts > 0) & (row_starts < nnzb)] - 1] = True
        if not rising.all():
            at = int((~rising).nonzero()[0, 0]) + 1
            row = int(torch.searchsorted(c, torch.tensor(at), right=True)) - 1
            raise ValueError(f"{op}: col_indices must be strictly increasing within each block row; "
                             f"block row {row} has {k[at - 1].item()} then {k[at].item()}")
    _checked_indices[crow] = (weakref.ref(col), key)


def bsr_linear(op: str, x, values, crow_indices, col_indices, out_features, in_features, bias, *,
               data: bool) -> None:
    _tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension (..., in_features); got a scalar")
    _int(op, "out_features", out_features, 1)
    _int(op, "in_features", in_features, 1)
    if x.shape[-1] != in_features:
        raise ValueError(f"{op}: x.shape[-1] must equal in_features = {in_features}; "
                         f"got x of shape {tuple(x.shape)}")
    _tensor(op, "values", values, ndim=3, dtypes=FLOAT_DTYPES)
    b = values.shape[1]
    if b < 1 or values.shape[2] != b:
        raise ValueError(f"{op}: values must have shape (nnzb, b, b) with square blocks; "
                         f"got {tuple(values.shape)}")
    _tensor(op, "crow_indices", crow_indices, ndim=1, dtypes=INDEX_DTYPES)
    _tensor(op, "col_indices", col_indices, ndim=1, dtypes=INDEX_DTYPES)
    block_rows, block_cols = -(-out_features // b), -(-in_features // b)
    _shape(op, "crow_indices", crow_indices, (block_rows + 1,), "(ceil(out_features / b) + 1,) = ")
    _shape(op, "col_indices", col_indices, (values.shape[0],), "(nnzb,) = ")
    if crow_indices.dtype != col_indices.dtype:
        raise TypeError(f"{op}: crow_indices ({crow_indices.dtype}) and col_indices "
                        f"({col_indices.dtype}) must have the same dtype")
    _tensor(op, "bias", bias, ndim=1, optional=True)
    _shape(op, "bias", bias, (out_features,), "(out_features,) = ")
    _same_device_and_dtype(op, "x", {"x": x, "values": values, "bias": bias, "crow_indices": crow_indices,
                                     "col_indices": col_indices}, ints=("crow_indices", "col_indices"))
    if data:
        bsr_indices(op, crow_indices, col_indices, values.shape[0], b, out_features, in_features)


# ---------------------------------------------------------------------------------------------------
# lowrank_lstm_cell / lowrank_lstm_sequence


def lowrank_lstm(op: str, x, h, c, w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias, *, sequence: bool) -> int:
    """Checks a cell (x (B, D)) or a sequence (x (T, B, D), h/c may be None); returns H."""
    _tensor(op, "x", x, ndim=3 if sequence else 2, dtypes=FLOAT_DTYPES)
    if sequence and x.shape[0] < 1:
        raise ValueError(f"{op}: x must have at least one time step; got shape {tuple(x.shape)}")
    batch, d = x.shape[-2], x.shape[-1]
    for name, w in (("w_ih_u", w_ih_u), ("w_ih_v", w_ih_v), ("w_hh_u", w_hh_u), ("w_hh_v", w_hh_v)):
        _tensor(op, name, w, ndim=2)
    hidden = w_hh_v.shape[1]
    if hidden < 1:
        raise ValueError(f"{op}: w_hh_v must have shape (rank_hh, H) with H >= 1; got {tuple(w_hh_v.shape)}")
    s = "h0" if sequence else "h"
    for name, t in ((s, h), ("c0" if sequence else "c", c)):
        _tensor(op, name, t, ndim=2, optional=sequence)
        _shape(op, name, t, (batch, hidden), "(B, H) = ")
    for pre, w_u, w_v, k in (("w_ih", w_ih_u, w_ih_v, d), ("w_hh", w_hh_u, w_hh_v, hidden)):
        if w_u.shape[0] != 4 * hidden:
            raise ValueError(f"{op}: {pre}_u must have 4*H = {4 * hidden} rows (gates i, f, g, o; "
                             f"H = {hidden} from w_hh_v); got shape {tuple(w_u.shape)}")
        rank = w_u.shape[1]
        if pre == "w_ih" and tuple(w_v.shape[:1]) == (rank,) and w_v.shape[1] != d:  # the factors agree
            raise ValueError(f"{op}: x's last dim (D = {d}) and w_ih_v's columns ({w_v.shape[1]}) must agree; got x "
                             f"of shape {tuple(x.shape)}, w_ih_v of shape {tuple(w_v.shape)}")
        _shape(op, f"{pre}_v", w_v, (rank, k), f"(rank, {'D' if pre == 'w_ih' else 'H'}) = ")
        if not 1 <= rank <= min(4 * hidden, k):
            raise ValueError(f"{op}: the rank of {pre} ({pre}_u.shape[1] = {rank}) must be in "
                             f"[1, min(4*H, {'D' if pre == 'w_ih' else 'H'})] = [1, {min(4 * hidden, k)}]")
    _tensor(op, "bias", bias, ndim=1, optional=True)
    _shape(op, "bias", bias, (4 * hidden,), "(4*H,) = ")
    _same_device_and_dtype(op, "x", {"x": x, s: h, "c0" if sequence else "c": c, "w_ih_u": w_ih_u,
                                     "w_ih_v": w_ih_v, "w_hh_u": w_hh_u, "w_hh_v": w_hh_v, "bias": bias})
    return hidden


# ---------------------------------------------------------------------------------------------------
# rnnt_loss / fused_joint_rnnt_loss


def _rnnt_labels(op, targets, logit_lengths, target_lengths, batch, frames, labels, vocab, blank, data):
    """Shared by both losses: shapes and (with data) values of targets and lengths; returns blank."""
    _tensor(op, "targets", targets, ndim=2, dtypes=INDEX_DTYPES)
    _tensor(op, "logit_lengths", logit_lengths, ndim=1, dtypes=INDEX_DTYPES)
    _tensor(op, "target_lengths", target_lengths, ndim=1, dtypes=INDEX_DTYPES)
    _shape(op, "targets", targets, (batch, labels), "(B, U) = ")
    _shape(op, "logit_lengths", logit_lengths, (batch,), "(B,) = ")
    _shape(op, "target_lengths", target_lengths, (batch,), "(B,) = ")
    _int(op, "blank", blank)
    if not -vocab <= blank < vocab:
        raise ValueError(f"{op}: blank must be in [-V, V) = [{-vocab}, {vocab}); got {blank}")
    blank %= vocab
    if data:
        for name, lengths, low, high, dim in (("logit_lengths", logit_lengths, 1, frames, "T"),
                                              ("target_lengths", target_lengths, 0, labels, "U")):
            lo, hi = lengths.min().item(), lengths.max().item()
            if lo < low or hi > high:
                raise ValueError(f"{op}: {name} must lie in [{low}, {high}] (padded {dim} = {high}); "
                                 f"got values in [{lo}, {hi}]")
        live = torch.arange(labels, device=targets.device) < target_lengths[:, None]
        bad = live & ((targets < 0) | (targets >= vocab) | (targets == blank))
        if bad.any():
            b, u = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{op}: targets must lie in [0, V = {vocab}) and differ from blank = {blank} "
                             f"(within target_lengths); got targets[{b}, {u}] = {targets[b, u].item()}")
    return blank


def _reduction_and_clamp(op, reduction, clamp):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if isinstance(clamp, bool) or not isinstance(clamp, (int, float)):
        raise TypeError(f"{op}: clamp must be a float; got {type(clamp).__name__}")
    if clamp != clamp:  # as csrc/rnnt.cpp's check_clamp
        raise ValueError(f"{op}: clamp must be a number (<= 0: no clamp); got nan")


def loss_module(op, blank, clamp, reduction, activation=None, vocab=None, **flags) -> None:
    """The loss modules' settings, checked when the module is built (the op checks them again per call)."""
    scalars(op, blank=blank, clamp=clamp, reduction=reduction, **flags,
            **({} if activation is None else {"activation": activation}))
    _reduction_and_clamp(op, reduction, clamp)
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}; got {activation!r}")
    if vocab is not None and not -vocab <= blank < vocab:
        raise ValueError(f"{op}: blank must be in [-V, V) = [{-vocab}, {vocab}) (V = vocab_size); got {blank}")


def rnnt_loss(op, logits, targets, logit_lengths, target_lengths, blank, clamp, reduction, *, data) -> int:
    """Returns blank normalised to [0, V)."""
    _tensor(op, "logits", logits, ndim=4, dtypes=FLOAT_DTYPES)
    batch, frames, labels_plus_1, vocab = logits.shape
    if batch < 1 or frames < 1 or labels_plus_1 < 1 or vocab < 1:
        raise ValueError(f"{op}: logits must have shape (B, T, U+1, V) with every dim >= 1; "
                         f"got {tuple(logits.shape)}")
    _reduction_and_clamp(op, reduction, clamp)
    blank = _rnnt_labels(op, targets, logit_lengths, target_lengths, batch, frames, labels_plus_1 - 1,
                         vocab, blank, data)
    _same_device_and_dtype(op, "logits", {"logits": logits, "targets": targets, "logit_lengths": logit_lengths,
                                          "target_lengths": target_lengths},
                           ints=("targets", "logit_lengths", "target_lengths"))
    return blank


def fused_joint_rnnt_loss(op, enc, pred, weight, bias, targets, logit_lengths, target_lengths, blank,
                          activation, clamp, reduction, *, data) -> int:
    """Returns blank normalised to [0, V)."""
    _tensor(op, "enc", enc, ndim=3, dtypes=FLOAT_DTYPES)
    _tensor(op, "pred", pred, ndim=3)
    _tensor(op, "weight", weight, ndim=2)
    _tensor(op, "bias", bias, ndim=1, optional=True)
    batch, frames, hidden = enc.shape
    if batch < 1 or frames < 1 or hidden < 1:
        raise ValueError(f"{op}: enc must have shape (B, T, H) with every dim >= 1; got {tuple(enc.shape)}")
    if pred.shape[0] != batch or pred.shape[2] != hidden or pred.shape[1] < 1:
        raise ValueError(f"{op}: pred must have shape (B, U+1, H) = ({batch}, U+1, {hidden}) to match enc; "
                         f"got {tuple(pred.shape)}")
    vocab = weight.shape[0]
    if vocab < 1 or weight.shape[1] != hidden:
        raise ValueError(f"{op}: weight must have shape (V, H) = (V, {hidden}) with V >= 1; "
                         f"got {tuple(weight.shape)}")
    _shape(op, "bias", bias, (vocab,), "(V,) = ")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}; got {activation!r}")
    _reduction_and_clamp(op, reduction, clamp)
    blank = _rnnt_labels(op, targets, logit_lengths, target_lengths, batch, frames, pred.shape[1] - 1,
                         vocab, blank, data)
    _same_device_and_dtype(op, "enc", {"enc": enc, "pred": pred, "weight": weight, "bias": bias,
                                       "targets": targets, "logit_lengths": logit_lengths,
                                       "target_lengths": target_lengths},
                           ints=("targets", "logit_lengths", "target_lengths"))
    return blank


# ---------------------------------------------------------------------------------------------------
# The backward ops: arguments are the forward's (checked by the checks above) plus these.


def grads_and_saved(op: str, expected: dict[str, tuple[Tensor, tuple]]) -> None:
    """Each named tensor (a gradient or a saved activation) has its expected shape."""
    for name, (t, shape) in expected.items():
        _tensor(op, name, t)
        if t.numel() == 0 and 0 not in shape:
            raise RuntimeError(f"{op}: {name} is empty: the forward ran with save=False, so there is "
                               "nothing to differentiate")
        _shape(op, name, t, shape)
