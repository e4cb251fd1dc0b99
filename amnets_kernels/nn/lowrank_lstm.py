"""LowRankLSTM / LowRankLSTMCell: nn.LSTM's / nn.LSTMCell's contract with each gate matrix a low-rank product
(the factorized branch)."""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from .. import _backend, _validate
from .._ops import functorch
from .._ops.lstm_update import lstm_pointwise
from .._weights import weights_changed
from ..formats import lowrank_factors, rank_for_energy
from .cost import warn_if_not_cheaper
from .resize import take_saved_shape
from .stacked_lstm import (StackedLSTM, check_hx_pair, check_weights_dtype, combined_bias, copy_into, lstm_config_of,
                           own_tensors, parameter_from, reset_projection)

_stack = torch.ops.amnets_native.lowrank_lstm_stack_step.default
_FACTORS = ("w_ih_u", "w_ih_v", "w_hh_u", "w_hh_v")
_TENSORS = (*_FACTORS, "bias")  # a direction's (LowRankLSTM) or the cell's, in the ops' order


def _wanted(op: str, name: str, wanted):
    """rank / rank_hh as a plain int >= 1 or float in (0, 1] (numpy scalars too, as swap_in takes them), or None."""
    if wanted is None:
        return None
    if isinstance(wanted, numbers.Real) and not isinstance(wanted, bool):
        if isinstance(wanted, numbers.Integral):
            if wanted >= 1:
                return int(wanted)
        elif 0 < wanted <= 1:
            return float(wanted)
    raise ValueError(f"{op}: {name} must be an int >= 1 or a float in (0, 1] (a fraction of spectral "
                     f"energy); got {wanted!r}")


def _int_rank(op: str, name: str, value) -> int:
    """A constructor's rank / rank_hh: an int >= 1, numpy integers too (as from_lstm and swap_in take them),
    returned as a plain int. The sizes stay plain ints, as nn.LSTM wants them."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int; got {type(value).__name__}")
    _validate._int(op, name, int(value), 1)
    return int(value)


def _pick_rank(weight: torch.Tensor, wanted: int | float) -> int:
    r = rank_for_energy(weight, wanted) if isinstance(wanted, float) else wanted
    return min(r, *weight.shape)  # a rank above the matrix's is its full rank


def _factor_into(module: nn.Module, tag: str, w_ih: torch.Tensor, w_hh: torch.Tensor, rank, rank_hh) -> tuple:
    """Truncated SVD of one direction's W_ih and W_hh into module parameters w_*_{u,v}{tag}; its ranks."""
    r_ih, r_hh = _pick_rank(w_ih, rank), _pick_rank(w_hh, rank if rank_hh is None else rank_hh)
    for name, tensor, source in zip(_FACTORS, (*lowrank_factors(w_ih, r_ih), *lowrank_factors(w_hh, r_hh)),
                                    (w_ih, w_ih, w_hh, w_hh)):
        module.register_parameter(f"{name}{tag}", parameter_from(tensor, source))
    return r_ih, r_hh


def _init_into(module: nn.Module, tag: str, hidden: int, d: int, rec: int, r_ih: int, r_hh: int, bias: bool,
               device, dtype) -> None:
    """Fresh factors for one direction (input size d, recurrent input size rec), drawn by _reset_factors."""
    for name, shape in zip(_FACTORS, ((4 * hidden, r_ih), (r_ih, d), (4 * hidden, r_hh), (r_hh, rec))):
        module.register_parameter(f"{name}{tag}", nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
    module.register_parameter(f"bias{tag}", nn.Parameter(torch.empty(4 * hidden, device=device, dtype=dtype))
                              if bias else None)
    _reset_factors(module, tag, hidden)


@torch.no_grad()
def _reset_factors(module: nn.Module, tag: str, hidden: int) -> None:
    """One direction's factors and bias drawn anew in place, at nn.LSTM's weight scale: nn.LSTM draws W from
    uniform(-s, s) (variance s^2 / 3); U V with both factors uniform(-a, a) and inner size r has variance
    r (a^2 / 3)^2, equal when a = (3 / r)^(1/4) sqrt(s)."""
    scale = 1.0 / math.sqrt(hidden)
    for name in _FACTORS:
        factor = getattr(module, f"{name}{tag}")
        inner = factor.shape[1] if name.endswith("_u") else factor.shape[0]
        bound = (3.0 / inner) ** 0.25 * math.sqrt(scale)
        factor.uniform_(-bound, bound)
    bias = getattr(module, f"bias{tag}")
    if bias is not None:
        bias.uniform_(-scale, scale)


def _adopt_saved_ranks(module: nn.Module, state_dict, prefix: str, tag: str, d: int, rec: int) -> tuple | None:
    """A checkpoint of the same layer at other ranks (lstm_rank=0.9 picks them from the weights, so a model swapped
    anew gets other ones): the factors take the saved shapes in their own objects (nn/resize.py), as BlockSparseLSTM
    takes a saved pattern. Returns the new (r_ih, r_hh), or None where the saved factors are absent, the same
    shapes, or not a consistent factorisation of this layer (the default loader then reports the size mismatch; as
    for nn.LSTM, it has copied the tensors whose shapes do match by then)."""
    names = [f"{name}{tag}" for name in _FACTORS]
    saved = [state_dict.get(prefix + name) for name in names]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in saved):
        return None
    u_ih, v_ih, u_hh, v_hh = saved
    gates = 4 * module.hidden_size
    r_ih, r_hh = u_ih.shape[1], u_hh.shape[1]
    if (u_ih.shape[0], u_hh.shape[0], tuple(v_ih.shape), tuple(v_hh.shape)) != (gates, gates, (r_ih, d), (r_hh, rec)) \
            or min(r_ih, r_hh) < 1 or all(module._parameters[n].shape == t.shape for n, t in zip(names, saved)):
        return None
    for name, t in zip(names, saved):  # the saved values already: consistent even if another key then fails
        own = module._parameters[name]  # (the same object: an optimizer built before the load trains it on)
        take_saved_shape(own, t.shape, prefix + name)
        with torch.no_grad():
            own.copy_(t)
    return r_ih, r_hh


def _factor_macs(ranks, hidden: int, d: int) -> int:
    """Per frame: x -> r_ih -> 4H and h -> r_hh -> 4H (the pointwise part is not counted)."""
    r_ih, r_hh = ranks
    return r_ih * (d + 4 * hidden) + r_hh * (hidden + 4 * hidden)


class LowRankLSTM(StackedLSTM):
    """nn.LSTM whose W_ih = U_ih V_ih (rank r) and W_hh = U_hh V_hh (rank rank_hh, default r).

    forward(input, hx=None) -> (output, (h_n, c_n)) exactly as nn.LSTM: input (T, B, input_size), or
    (B, T, input_size) with batch_first, or unbatched (T, input_size); bidirectional, proj_size and
    dropout between layers as nn.LSTM. Each direction of each layer is one lowrank_lstm_sequence op.
    Parameters per direction (tag l{layer}, or l{layer}_reverse): w_ih_u (4H, r), w_ih_v (r, D),
    w_hh_u (4H, r_hh), w_hh_v (r_hh, P or H), one combined bias (4H,) (nn.LSTM's two biases summed) and,
    with proj_size P, w_hr (P, H). `ranks[k]` = (r_ih, r_hh) of direction k = layer * directions + direction.
    """

    _PER_DIRECTION = _TENSORS

    def __init__(self, input_size: int, hidden_size: int, rank: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, rank_hh: int | None = None, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None):
        super().__init__()
        op = "LowRankLSTM"
        rank = _int_rank(op, "rank", rank)
        rank_hh = None if rank_hh is None else _int_rank(op, "rank_hh", rank_hh)
        self._configure(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size)
        if dropout and num_layers == 1:  # as nn.LSTM says it (from_lstm's nn.LSTM said it when built)
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}")
        rec = proj_size or hidden_size
        self.ranks = []
        for _, layer, suffix, d in self.directions():
            ranks = (min(rank, 4 * hidden_size, d), min(rank if rank_hh is None else rank_hh, rec))
            self.ranks.append(ranks)
            _init_into(self, f"_l{layer}{suffix}", hidden_size, d, rec, *ranks, bias, device, dtype)
            if proj_size:
                self.register_parameter(f"w_hr_l{layer}{suffix}", nn.Parameter(
                    torch.empty(proj_size, hidden_size, device=device, dtype=dtype)))
                reset_projection(self, f"_l{layer}{suffix}", hidden_size)
        warn_if_not_cheaper(self, self.macs_per_frame(), self.dense_macs_per_frame())

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, rank: int | float, rank_hh: int | float | None = None) -> LowRankLSTM:
        """Factor every direction of every layer of `lstm` by truncated SVD. rank: an int, or a float in
        (0, 1] meaning the smallest rank keeping that fraction of each matrix's spectral energy. At full
        rank the result reproduces the nn.LSTM (to float32 rounding); a projection (proj_size) is kept dense."""
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"LowRankLSTM.from_lstm: lstm must be an nn.LSTM; got {type(lstm).__name__}")
        op = "LowRankLSTM.from_lstm"
        rank, rank_hh = _wanted(op, "rank", rank), _wanted(op, "rank_hh", rank_hh)
        module = cls.__new__(cls)
        StackedLSTM.__init__(module)
        module._configure(**lstm_config_of(lstm))
        module.ranks = []
        for _, layer, suffix, _ in module.directions():
            tag = f"_l{layer}{suffix}"
            module.ranks.append(_factor_into(module, tag, getattr(lstm, f"weight_ih{tag}"),
                                             getattr(lstm, f"weight_hh{tag}"), rank, rank_hh))
            module.register_parameter(f"bias{tag}", combined_bias(lstm, tag))
            if lstm.proj_size:
                w_hr = getattr(lstm, f"weight_hr{tag}")
                module.register_parameter(f"w_hr{tag}", parameter_from(w_hr.detach().clone(), w_hr))
        module.train(lstm.training)
        warn_if_not_cheaper(module, module.macs_per_frame(), module.dense_macs_per_frame())
        return module

    def layer_weights(self, layer: int, reverse: bool = False):
        """(w_ih_u, w_ih_v, w_hh_u, w_hh_v, bias) of one direction of one layer, in the ops' order."""
        op = "LowRankLSTM.layer_weights"
        if isinstance(layer, numbers.Integral) and not isinstance(layer, bool):
            layer = int(layer)  # numpy integers too, as the constructors take them
        _validate._int(op, "layer", layer, 0)
        if not isinstance(reverse, bool):
            raise TypeError(f"{op}: reverse must be a bool; got {type(reverse).__name__}")
        if layer >= self.num_layers or (reverse and not self.bidirectional):
            raise ValueError(f"{op}: no layer {layer}{' reverse' if reverse else ''} in "
                             f"{self.num_layers} layer(s), bidirectional={self.bidirectional}")
        return self._direction_tensors(layer * self.num_directions + bool(reverse))

    def reset_parameters(self) -> None:
        """As nn.LSTM.reset_parameters: every parameter drawn anew in place (the ranks kept), the factors at
        nn.LSTM's weight scale (see the constructor) and a projection from uniform(-1/sqrt(H), 1/sqrt(H))."""
        for _, layer, suffix, _ in self.directions():
            _reset_factors(self, f"_l{layer}{suffix}", self.hidden_size)
            if self.proj_size:
                reset_projection(self, f"_l{layer}{suffix}", self.hidden_size)
        weights_changed()  # inference tensors redrawn in place bump no version

    def _load_from_state_dict(self, state_dict, prefix, *args):
        for k, (_, layer, suffix, d) in enumerate(self.directions()):
            ranks = _adopt_saved_ranks(self, state_dict, prefix, f"_l{layer}{suffix}", d,
                                       self.proj_size or self.hidden_size)
            if ranks is not None:
                self.ranks[k] = ranks
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _run(self, k, x, h0, c0):
        u_ih, v_ih, u_hh, v_hh, b = self._direction_tensors(k)
        sequence = functorch.lowrank_lstm_sequence if functorch.active() else torch.ops.amnets.lowrank_lstm_sequence
        if not self.proj_size:
            return sequence(x, h0, c0, u_ih, v_ih, u_hh, v_hh, b)
        # With a projection the recurrence reads h W_hr^T: U_hh V_hh (h W_hr^T) = U_hh (V_hh W_hr) h, the
        # same rank, so the fused op runs on the full h; a given h0 is already projected, so the first
        # step reads it directly.
        layer, reverse = divmod(k, self.num_directions)
        w_hr = getattr(self, f"w_hr_l{layer}{'_reverse' if reverse else ''}")
        if h0 is None and x.shape[0] > 1:
            full, h, c = sequence(x, None, c0, u_ih, v_ih, u_hh, v_hh @ w_hr, b)
        else:
            # The first step here: V_rec = V_hh W_hr (r_hh P H multiply-adds) only where later steps read it; a
            # frame a call (streaming) computed it every call, more than the dense layer's whole frame.
            if h0 is None and torch.is_grad_enabled() and (u_hh.requires_grad or v_hh.requires_grad):
                # nn.LSTM's zero state: the recurrent factors get its (zero) gradient, not None (DDP
                # without find_unused_parameters fails on a parameter that got none)
                h0 = x.new_zeros(x.shape[1], self.proj_size)
            gates = F.linear(F.linear(x[0], v_ih), u_ih, b)
            if h0 is not None:
                gates = gates + F.linear(F.linear(h0, v_hh), u_hh)
            h, c = lstm_pointwise(gates, c0 if c0 is not None else gates.new_zeros(gates.shape[0], self.hidden_size))
            full = h[None]
            if x.shape[0] > 1:
                rest, h, c = sequence(x[1:], h, c, u_ih, v_ih, u_hh, v_hh @ w_hr, b)
                full = torch.cat([full, rest])
        return F.linear(full, w_hr), F.linear(h, w_hr), c

    def _stack_step(self, x, hx):
        if functorch.active() or _backend.resolve("lowrank_lstm_sequence", x.device).name != "cpu":
            return None
        weights, biases = [], []
        for k in range(self.num_layers):
            *factors, b = self._direction_tensors(k)
            weights += factors
            if self.proj_size:  # the op's fifth tensor a layer: h is proj_size wide
                weights += own_tensors(self, (f"w_hr_l{k}",))
            biases.append(b)
        return self._native_stack(_stack, x, hx, weights, biases, weights)

    _STACK_KIND = "lowrank"

    def _stack_entries(self):  # the factors, projections and biases themselves: in-place writes are read as they come
        names = [name for names in self._names for name in names]
        names += [f"w_hr_l{k}" for k in range(self.num_layers)] if self.proj_size else []
        return [(self._parameters if name in self._parameters else self._buffers, name, False) for name in names]

    def _dense_weights(self, k):
        layer, reverse = divmod(k, self.num_directions)
        u_ih, v_ih, u_hh, v_hh, b = self._direction_tensors(k)
        w_hr = getattr(self, f"w_hr_l{layer}{'_reverse' if reverse else ''}") if self.proj_size else None
        return u_ih @ v_ih, u_hh @ v_hh, b, w_hr

    def macs_per_frame(self, batch: int = 1) -> int:
        """Multiply-adds per frame as this module runs them (gate products and projection, no pointwise)."""
        total = sum(_factor_macs(self.ranks[k], self.hidden_size, d) + self.proj_size * self.hidden_size
                    for k, _, _, d in self.directions())
        return total * batch

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, ranks={self.ranks}, num_layers={self.num_layers}, " \
               + self._lstm_config()


class LowRankLSTMCell(nn.Module):
    """nn.LSTMCell with W_ih = U_ih V_ih and W_hh = U_hh V_hh, on the lowrank_lstm_cell op.

    forward(input, hx=None) -> (h_1, c_1) exactly as nn.LSTMCell: input (B, input_size) or unbatched
    (input_size,), hx = (h_0, c_0) each (B, hidden_size), zeros when None. Parameters w_ih_u (4H, r),
    w_ih_v (r, D), w_hh_u (4H, r_hh), w_hh_v (r_hh, H) and one combined bias (4H,).
    """

    def __init__(self, input_size: int, hidden_size: int, rank: int, bias: bool = True,
                 rank_hh: int | None = None, device=None, dtype=None):
        super().__init__()
        op = "LowRankLSTMCell"
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            _validate._int(op, name, value, 1)
        rank = _int_rank(op, "rank", rank)
        rank_hh = None if rank_hh is None else _int_rank(op, "rank_hh", rank_hh)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.ranks = (min(rank, 4 * hidden_size, input_size), min(rank if rank_hh is None else rank_hh, hidden_size))
        _init_into(self, "", hidden_size, input_size, hidden_size, *self.ranks, bias, device, dtype)
        warn_if_not_cheaper(self, self.macs_per_frame(), self.dense_macs_per_frame())

    @classmethod
    def from_lstm_cell(cls, cell: nn.LSTMCell, rank: int | float,
                       rank_hh: int | float | None = None) -> LowRankLSTMCell:
        """Factor an nn.LSTMCell by truncated SVD (rank as in LowRankLSTM.from_lstm)."""
        if not isinstance(cell, nn.LSTMCell):
            raise TypeError(f"LowRankLSTMCell.from_lstm_cell: cell must be an nn.LSTMCell; got {type(cell).__name__}")
        op = "LowRankLSTMCell.from_lstm_cell"
        rank, rank_hh = _wanted(op, "rank", rank), _wanted(op, "rank_hh", rank_hh)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.input_size, module.hidden_size = cell.input_size, cell.hidden_size
        module.ranks = _factor_into(module, "", cell.weight_ih, cell.weight_hh, rank, rank_hh)
        module.register_parameter("bias", combined_bias(cell, ""))
        module.train(cell.training)
        warn_if_not_cheaper(module, module.macs_per_frame(), module.dense_macs_per_frame())
        return module

    def reset_parameters(self) -> None:
        """As nn.LSTMCell.reset_parameters: the factors and bias drawn anew in place (the ranks kept), at
        nn.LSTMCell's weight scale."""
        _reset_factors(self, "", self.hidden_size)
        weights_changed()  # inference tensors redrawn in place bump no version

    def _load_from_state_dict(self, state_dict, prefix, *args):
        ranks = _adopt_saved_ranks(self, state_dict, prefix, "", self.input_size, self.hidden_size)
        if ranks is not None:
            self.ranks = ranks
        super()._load_from_state_dict(state_dict, prefix, *args)
        weights_changed()  # loaded in place: inference tensors (loaded under inference_mode) bump no version

    def forward(self, input, hx=None):
        op = "LowRankLSTMCell"
        _validate._tensor(op, "input", input, dtypes=_validate.FLOAT_DTYPES)
        tensors = own_tensors(self, _TENSORS)
        check_weights_dtype(op, tensors[0], input)
        if input.dim() not in (1, 2):
            raise ValueError(f"{op}: input must be 1-D (unbatched) or 2-D (B, input_size); got shape "
                             f"{tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{op}: input.shape[-1] must be input_size = {self.input_size}; got shape "
                             f"{tuple(input.shape)}")
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        if hx is None:
            h = c = x.new_zeros(x.shape[0], self.hidden_size)
        else:
            check_hx_pair(op, hx, input.dim())  # the op checks their shapes, dtypes and devices
            h, c = (t.unsqueeze(0) for t in hx) if unbatched else hx
        cell = functorch.lowrank_lstm_cell if functorch.active() else torch.ops.amnets.lowrank_lstm_cell
        h1, c1 = cell(x, h, c, *tensors)
        if h1.dtype != c.dtype and x.device.type == "cpu":
            # CPU autocast: the op ran at the autocast dtype (csrc/autocast.cpp). nn.LSTMCell, whose op is on no
            # CPU autocast list, runs its two products in that dtype and the update in c_0's: h_1 and c_1 come
            # out in c_0's dtype whatever the input's and h_0's are, and so do this drop-in's (here c_1 is
            # computed in the autocast dtype, then widened).
            h1, c1 = h1.to(c.dtype), c1.to(c.dtype)
        return (h1.squeeze(0), c1.squeeze(0)) if unbatched else (h1, c1)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):  # code written for nn.LSTMCell
                raise AttributeError(
                    f"LowRankLSTMCell has no {name!r}: nn.LSTMCell's dense weights are not kept here (its parameters "
                    "are w_ih_u, w_ih_v, w_hh_u, w_hh_v and one combined bias); to_dense() gives the equivalent "
                    "nn.LSTMCell") from None
            raise

    def macs_per_frame(self, batch: int = 1) -> int:
        return _factor_macs(self.ranks, self.hidden_size, self.input_size) * batch

    def dense_macs_per_frame(self) -> int:
        return 4 * self.hidden_size * (self.input_size + self.hidden_size)

    @torch.no_grad()
    def to_dense(self) -> nn.LSTMCell:
        """A plain nn.LSTMCell computing what this cell computes (bias as bias_ih, bias_hh zero)."""
        cell = nn.LSTMCell(self.input_size, self.hidden_size, bias=self.bias is not None, device=self.w_ih_u.device,
                           dtype=self.w_ih_u.dtype)
        with torch.enable_grad():  # so each product's requires_grad says if a factor of it trains
            w_ih, w_hh = self.w_ih_u @ self.w_ih_v, self.w_hh_u @ self.w_hh_v
        copy_into(cell.weight_ih, w_ih, w_ih)
        copy_into(cell.weight_hh, w_hh, w_hh)
        if self.bias is not None:
            copy_into(cell.bias_ih, self.bias, self.bias)
            copy_into(cell.bias_hh, 0.0, self.bias)
        cell.train(self.training)
        return cell

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, ranks={self.ranks}, bias={self.bias is not None}"
