"""What LowRankLSTM and BlockSparseLSTM share with nn.LSTM: the contract (layouts, hx, layers, directions,
dropout between layers), the dense MAC count, and the way back to a plain nn.LSTM."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .. import _validate
from .._backend import _C
from .._ops import _is_wrapped, eager_inference
from .._weights import weights_changed
from .cost import lstm_macs


class StackedLSTM(nn.Module):
    """nn.LSTM's forward contract over per-direction sequence runs that subclasses define.

    A subclass sets the configuration with `_configure` and implements `_run(k, x, h0, c0)` for the
    direction k = layer * num_directions + direction: x (T, B, D_k) in time order for that direction,
    h0 (B, proj_size or H) and c0 (B, H) or None -> (out (T, B, proj_size or H), h_n, c_n); and
    `_dense_weights(k)` -> (W_ih, W_hh, bias, W_hr or None) for `to_dense`. `_PER_DIRECTION` names the
    tensors each direction has (suffixed _l{layer} or _l{layer}_reverse), read by `_direction_tensors(k)`.
    """

    _PER_DIRECTION: tuple[str, ...] = ()
    mode = "LSTM"  # as nn.LSTM's (nn.RNNBase.mode), which code that handles recurrent layers reads

    def _configure(self, input_size: int, hidden_size: int, num_layers: int, bias: bool, batch_first: bool,
                   dropout: float, bidirectional: bool, proj_size: int) -> None:
        op = type(self).__name__
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            _validate._int(op, name, value, 1)
        _validate._int(op, "proj_size", proj_size, 0)
        if proj_size >= hidden_size:
            raise ValueError(f"{op}: proj_size must be smaller than hidden_size = {hidden_size}; got {proj_size}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"{op}: dropout must be a number in [0, 1]; got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bool(bidirectional), proj_size
        self._index_directions()

    def _index_directions(self) -> None:
        """The directions and their tensors' names, walked on every forward (a streaming step is one call a
        frame): computed once, from the configuration."""
        self._directions = tuple((layer * self.num_directions + direction, layer, "_reverse" if direction else "",
                                  self.input_size_of(layer * self.num_directions + direction))
                                 for layer in range(self.num_layers) for direction in range(self.num_directions))
        self._names = tuple(tuple(f"{n}_l{layer}{suffix}" for n in self._PER_DIRECTION)
                            for _, layer, suffix, _ in self._directions)

    def _load_from_state_dict(self, *args):
        super()._load_from_state_dict(*args)
        weights_changed()  # loaded in place: inference tensors (loaded under inference_mode) bump no version

    def __getstate__(self):
        """Pickling (torch.save of the module, copy.deepcopy) leaves the stack call behind: it holds this
        module's tensors, and a copy makes its own at its first frame."""
        state = dict(super().__getstate__())
        state.pop("_stack_call", None)
        state.pop("_stack_sources", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_directions" not in self.__dict__:  # a whole module pickled before they were kept
            self._index_directions()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def input_size_of(self, k: int) -> int:
        """The input size of direction k (layer 0 reads the input; later layers every direction's output)."""
        return self.input_size if k < self.num_directions else self.num_directions * (self.proj_size or self.hidden_size)

    def directions(self):
        """(k, layer, parameter-name suffix, input size) for every direction, in nn.LSTM's order."""
        return iter(self._directions)

    def _direction_tensors(self, k: int) -> tuple:
        """Direction k's tensors named by _PER_DIRECTION (own_tensors)."""
        return own_tensors(self, self._names[k])

    def forward(self, input, hx=None):
        call = self.__dict__.get("_stack_call")  # a frame a call, once the native stack step has run: see _keep_call
        if call is not None and not (self.dropout and self.training or torch.compiler.is_compiling()
                                     or torch._C._get_tracing_state() is not None):  # jit.trace: the ops
            stepped = call(input, hx, self.batch_first)
            if stepped is not None:
                self._stepped()
                return stepped
        op = type(self).__name__
        input, hx, c_dtype = _in_autocast_dtype(input, hx, self.proj_size > 0)
        if c_dtype is not None:  # (autocast only: the common case does not pay for the call)
            out, (h_n, c_n) = self._forward_checked(op, input, hx)
            return out, (h_n, c_n.to(c_dtype))
        return self._forward_checked(op, input, hx)

    def _forward_checked(self, op: str, input, hx):
        if isinstance(input, PackedSequence):
            check_weights_dtype(op, own_tensors(self, self._names[0][:1])[0], input.data)
            self._check_hx(op, hx, int(input.batch_sizes[0]), input.data)
            return self._forward_packed(input, hx)
        _validate._tensor(op, "input", input, dtypes=_validate.FLOAT_DTYPES)
        check_weights_dtype(op, own_tensors(self, self._names[0][:1])[0], input)
        if input.dim() not in (2, 3):
            raise ValueError(f"{op}: input must be 2-D (unbatched) or 3-D; got shape {tuple(input.shape)}")
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        if x.shape[0] == 0:  # as nn.LSTM, which refuses it too
            raise ValueError(f"{op}: input must have at least one time step; got shape {tuple(input.shape)}")
        self._check_hx(op, hx, None if unbatched else x.shape[1], input)
        if unbatched and hx is not None:
            hx = tuple(t.unsqueeze(1) for t in hx)
        out, (h_n, c_n) = self._forward_time_major(x, hx)
        if unbatched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (out.transpose(0, 1) if self.batch_first else out), (h_n, c_n)

    def _check_hx(self, op: str, hx, batch: int | None, like: torch.Tensor) -> None:
        """hx as the caller gave it, as nn.LSTM takes it: None or (h_0, c_0), each (num_layers *
        num_directions, B, proj_size or hidden_size) (no B for unbatched input: batch None), in the
        input's dtype and on its device."""
        if hx is None:
            return
        check_hx_pair(op, hx, 2 if batch is None else 3)
        stack = self.num_layers * self.num_directions
        for name, t, size in (("h_0", hx[0], self.proj_size or self.hidden_size), ("c_0", hx[1], self.hidden_size)):
            _validate._shape(op, name, t, (stack, size) if batch is None else (stack, batch, size),
                             f"(num_layers * num_directions, {'' if batch is None else 'B, '}"
                             f"{'proj_size' if name == 'h_0' and self.proj_size else 'hidden_size'}) = ")
            if t.dtype != like.dtype:
                raise TypeError(f"{op}: {name} must have the input's dtype {like.dtype}; got {t.dtype}")
            if t.device != like.device:
                raise ValueError(f"{op}: {name} must be on the input's device ({like.device}); got {t.device}")

    def _forward_time_major(self, x, hx):
        """x (T, B, input_size), hx None or (h_0, c_0), checked -> (output (T, B, ...), (h_n, c_n))."""
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{type(self).__name__}: input.shape[-1] must be input_size = {self.input_size}; "
                             f"got {tuple(x.shape)}")
        if x.shape[0] == 1 and not (self.bidirectional or (self.dropout and self.training)
                                    or torch.compiler.is_compiling()):  # (traced: the layers' public ops)
            stepped = self._stack_step(x[0], hx)  # a frame a call (streaming): the whole stack in one native call
            if stepped is not None:
                out, h_n, c_n = stepped
                return out[None], (h_n, c_n)
        if hx is None:
            h0 = c0 = (None,) * (self.num_layers * self.num_directions)
        else:
            h0, c0 = hx[0].unbind(0), hx[1].unbind(0)
        h_n, c_n, outs, directions = [], [], [], self.num_directions
        dropout = self.dropout if self.training else 0.0
        for k, layer, suffix, _ in self._directions:
            if suffix:  # the reverse direction
                out, h, c = self._run(k, x.flip(0), h0[k], c0[k])
                outs.append(out.flip(0))
            else:
                out, h, c = self._run(k, x, h0[k], c0[k])
                outs.append(out)
            h_n.append(h)
            c_n.append(c)
            if len(outs) == directions:  # the layer is complete: its output feeds the next one
                x = torch.cat(outs, dim=-1) if directions > 1 else out
                outs = []
                if dropout and layer < self.num_layers - 1:
                    x = F.dropout(x, dropout, training=True)
        return x, (torch.stack(h_n), torch.stack(c_n))

    def _stack_step(self, x, hx):
        """One frame x (B, input_size) through a unidirectional stack with no dropout in force, hx checked:
        (out (B, proj_size or H), h_n, c_n) from one native call where the subclass has one that applies
        (the cpu face, plain eager inference, weights its kernel takes), else None: the layers run one by one.
        A subclass's native call refusing its arguments (ValueError, TypeError) returns None too, so that the
        error comes from the layer-by-layer path, in the words a sequence gets."""
        return None

    def _native_stack(self, stack, x, hx, weights: list, biases: list, floating: tuple):
        """stack(x, h0, c0, weights, biases, hidden_size), the subclass's native stack step, where plain eager
        inference allows it (`floating`: the weights autograd could want), else None; a refusal is None too."""
        h0, c0 = (None, None) if hx is None else hx
        if not eager_inference(x, h0, c0, *floating, *biases):
            return None
        try:
            stepped = stack(x, h0, c0, weights, biases, self.hidden_size)
        except (TypeError, ValueError):
            return None
        self._keep_call(weights, biases)
        return stepped

    # _C.StackCall's kind: "lowrank" or "sparse" (csrc/cpu/lstm_stack.cpp), set by the subclasses with a stack step.
    _STACK_KIND = ""

    def _stack_entries(self) -> list[tuple]:
        """Where the tensors the stack step was given come from, as _C.SourcesSnapshot entries (dict, key[, track
        version]); the subclass's."""
        raise NotImplementedError

    def _keep_call(self, weights: list, biases: list) -> None:
        """After a native stack step: the call forward makes first from then on, _C.StackCall, which runs the same
        step on the same tensors from forward's own arguments in one native call, and declines (None: forward's
        Python path) once any of the module's tensors behind them is replaced, re-pointed (`.data = ...`, .to())
        or, where the entries track it, written in place, or where the frame is not plain eager inference on the
        cpu face. Kept while its snapshot matches; none where a tensor is not the module's own (a
        parametrization, pruning) or is a functorch wrapper. Inference tensors have no version: an in-place edit
        of one (only inside inference mode) needs ak.weights_changed(), as a .data write does."""
        kept = self.__dict__.get("_stack_sources")
        if kept is not None and kept.matches():  # the call declined this frame for reasons of its own
            return
        entries = self._stack_entries()
        own = all(name in d for d, name, *_ in entries) and not any(
            _is_wrapped(t) for d, name, *_ in entries for t in (d[name],) if t is not None)
        if not own:
            self.__dict__.pop("_stack_call", None)
            self.__dict__.pop("_stack_sources", None)
            return
        sources = _C.SourcesSnapshot(entries)
        # Set in __dict__ directly: not parameters, buffers or modules (and nn.Module.__setattr__ costs ~2 us).
        self.__dict__["_stack_call"] = _C.StackCall(self._STACK_KIND, weights, biases, self.hidden_size,
                                                    self.input_size, sources)
        self.__dict__["_stack_sources"] = sources

    def _stepped(self) -> None:
        """A frame ran through the stack call (BlockSparseLSTM records it in last_path)."""

    def _forward_packed(self, packed: PackedSequence, hx):
        """A PackedSequence as nn.LSTM takes it: each sequence runs to its own length (the reverse direction
        starts at its own last frame). Rows are grouped by length, one padded run per distinct length."""
        padded, lengths = pad_packed_sequence(packed)  # (T, B, D), rows in the caller's order
        stack, batch = self.num_layers * self.num_directions, padded.shape[1]
        out = padded.new_zeros(padded.shape[0], batch, self.num_directions * (self.proj_size or self.hidden_size))
        h_n = padded.new_zeros(stack, batch, self.proj_size or self.hidden_size)
        c_n = padded.new_zeros(stack, batch, self.hidden_size)
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero().squeeze(1).to(padded.device)
            sub = None if hx is None else tuple(t.index_select(1, rows) for t in hx)
            o, (h, c) = self._forward_time_major(padded[:length].index_select(1, rows), sub)
            # the input's dtype, as nn.LSTM: under autocast an op may return the autocast dtype
            out[:length, rows], h_n[:, rows], c_n[:, rows] = o.to(out.dtype), h.to(out.dtype), c.to(out.dtype)
        # Back into the input's packing: time-major, the rows of step t in its sorted order.
        order = packed.sorted_indices if packed.sorted_indices is not None else torch.arange(batch)
        active = torch.arange(batch)[None] < packed.batch_sizes[:, None]
        data = out.index_select(1, order.to(out.device))[active.to(out.device)]
        return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), (h_n, c_n)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith(_DENSE_NAMES):  # code written for nn.LSTM reaching for its dense weights
                raise AttributeError(
                    f"{type(self).__name__} has no {name!r}: nn.LSTM's dense weights are not kept here (see "
                    f"{type(self).__name__}'s docstring for its parameters); to_dense() gives the equivalent "
                    "nn.LSTM") from None
            raise

    def flatten_parameters(self) -> None:
        """nn.LSTM's cuDNN weight-layout call, which models make before every forward: nothing to do here."""

    def dense_macs_per_frame(self) -> int:
        """Multiply-adds per frame of the nn.LSTM this module stands for."""
        return lstm_macs(self.input_size, self.hidden_size, self.num_layers, self.bidirectional, self.proj_size)

    @torch.no_grad()
    def to_dense(self) -> nn.LSTM:
        """A plain nn.LSTM computing what this module computes (the factors / kept blocks multiplied out;
        the one bias per direction becomes bias_ih, bias_hh is zero)."""
        ref = next(self.parameters())
        lstm = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, bias=self.bias,
                       batch_first=self.batch_first, dropout=self.dropout, bidirectional=self.bidirectional,
                       proj_size=self.proj_size, device=ref.device, dtype=ref.dtype)
        for k, layer, suffix, _ in self.directions():
            with torch.enable_grad():  # so each product's requires_grad says if a factor of it trains
                w_ih, w_hh, b, w_hr = self._dense_weights(k)
            for name, value, source in (("weight_ih", w_ih, w_ih), ("weight_hh", w_hh, w_hh), ("bias_ih", b, b),
                                        ("bias_hh", 0.0, b), ("weight_hr", w_hr, w_hr)):
                if source is not None:  # no bias / no projection
                    copy_into(getattr(lstm, f"{name}_l{layer}{suffix}"), value, source)
        lstm.train(self.training)
        return lstm

    def _lstm_config(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)}" for name, default in
                        (("dropout", 0.0), ("bidirectional", False), ("proj_size", 0))
                        if getattr(self, name) != default)
        return f"bias={self.bias}, batch_first={self.batch_first}{extra}"


# nn.LSTM's dense weight names and lists, which these modules replace.
_DENSE_NAMES = ("weight_ih_l", "weight_hh_l", "bias_ih_l", "bias_hh_l", "weight_hr_l", "all_weights", "_flat_weights")


def check_hx_pair(op: str, hx, ndim: int) -> None:
    """hx given to an LSTM module or cell: a pair (h_0, c_0) of ndim-D tensors (a tuple or a list, as nn.LSTM)."""
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        got = f"a {type(hx).__name__} of {len(hx)}" if isinstance(hx, (tuple, list)) else type(hx).__name__
        raise TypeError(f"{op}: hx must be None or a tuple (h_0, c_0); got {got}")
    for name, t in zip(("h_0", "c_0"), hx):
        _validate._tensor(op, name, t, ndim=ndim)


def own_tensors(module: nn.Module, names: tuple[str, ...]) -> tuple:
    """The module's tensors `names`, read from its own dicts: through nn.Module.__getattr__ each name costs
    ~0.5 us, and a streaming step reads them on every call. By attribute when one is not a plain parameter or
    buffer there (a parametrization, or torch.nn.utils.prune, which computes it anew), so that what those
    compute is what runs."""
    params, buffers = module._parameters, module._buffers
    try:
        return tuple([params[n] if n in params else buffers[n] for n in names])
    except KeyError:
        return tuple(getattr(module, n) for n in names)


@torch.no_grad()
def reset_projection(module: nn.Module, tag: str, hidden: int) -> None:
    """nn.LSTM's projection w_hr{tag} drawn anew in place, as nn.LSTM draws it: uniform(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1.0 / math.sqrt(hidden)
    getattr(module, f"w_hr{tag}").uniform_(-bound, bound)


def lstm_config_of(lstm: nn.LSTM) -> dict:
    """The keyword arguments of `_configure` that reproduce an nn.LSTM's settings."""
    return dict(input_size=lstm.input_size, hidden_size=lstm.hidden_size, num_layers=lstm.num_layers,
                bias=lstm.bias, batch_first=lstm.batch_first, dropout=lstm.dropout,
                bidirectional=lstm.bidirectional, proj_size=lstm.proj_size)


def parameter_from(tensor: torch.Tensor, *sources: torch.Tensor) -> nn.Parameter:
    """A new parameter holding `tensor`, trainable only if a parameter it is made from is: swap_in, unswap
    and to_dense keep a frozen layer (or a frozen bias alone) frozen."""
    return nn.Parameter(tensor, requires_grad=any(s.requires_grad for s in sources))


def copy_into(param: nn.Parameter, value, source: torch.Tensor) -> None:
    """A dense module's parameter takes `value`, and trains only if `source` does (a frozen layer stays frozen)."""
    with torch.no_grad():
        param.copy_(torch.as_tensor(value))
    param.requires_grad_(source.requires_grad)


def combined_bias(lstm: nn.Module, suffix: str) -> nn.Parameter | None:
    """nn.LSTM's / nn.LSTMCell's two biases as the one parameter our ops take (bias_ih + bias_hh), or None."""
    b_ih = getattr(lstm, f"bias_ih{suffix}", None)
    if b_ih is None:
        return None
    b_hh = getattr(lstm, f"bias_hh{suffix}")
    return parameter_from((b_ih + b_hh).detach(), b_ih, b_hh)


def check_weights_dtype(op: str, weight: torch.Tensor, input: torch.Tensor) -> None:
    """input in the dtype of the module's weights (`weight`, one of them), outside autocast (where the ops cast the
    weights): a mismatch was named in the words of whichever op met it first (bsr_lstm_cell_forward, ...)."""
    if input.dtype == weight.dtype or (torch.amp.is_autocast_available(input.device.type)
                                       and torch.is_autocast_enabled(input.device.type)):
        return
    raise TypeError(f"{op}: input must have the weights' dtype {weight.dtype} (or run under torch.autocast); "
                    f"got {input.dtype}")


def _in_autocast_dtype(input, hx, projected: bool):
    """As nn.LSTM under autocast: input and state, where each is fp32 or the autocast dtype (a bf16 feature
    frontend with a fresh fp32 state, say), all in the autocast dtype, so that the results are in it too (the
    ops cast the weights: csrc/autocast.cpp). Two exceptions, measured on torch 2.14, where nn.LSTM on the CPU
    is not one autocast op but per-step products (in the autocast dtype) and updates in c_0's dtype (the
    input's without a state): a PackedSequence of unequal lengths, whose results all come in that dtype (here
    everything runs in it, the ops' products in the autocast dtype again), and a projected LSTM (proj_size),
    whose out and h_n come in the autocast dtype (h is projected by an autocast product) and c_n in that
    dtype. -> (input, hx, the dtype c_n must be returned in, or None: as it comes). Anything else, fp64 say,
    is left as it is for the checks to name."""
    if not torch._C._is_any_autocast_enabled():  # one native call: the common case ends here
        return input, hx, None
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    if not (isinstance(data, torch.Tensor) and torch.amp.is_autocast_available(data.device.type)  # not "meta"
            and torch.is_autocast_enabled(data.device.type)):
        return input, hx, None
    dtype = torch.get_autocast_dtype(data.device.type)
    states = tuple(hx) if isinstance(hx, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in hx) else ()
    if any(t.dtype not in (torch.float32, dtype) for t in (data, *states)):
        return input, hx, None
    c_dtype = None
    if data.device.type == "cpu" and (projected or packed and input.batch_sizes[0] != input.batch_sizes[-1]):
        c_dtype = states[1].dtype if len(states) == 2 else data.dtype
        dtype = dtype if projected else c_dtype
    if states:
        hx = tuple(t.to(dtype) for t in states)
    data = data.to(dtype)
    return (PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices) if packed
            else data), hx, c_dtype
