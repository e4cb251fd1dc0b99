"""LowRankLSTM: nn.LSTM's contract with each gate matrix a low-rank product (the factorized branch)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _validate
from ..formats import lowrank_factors, rank_for_energy


class LowRankLSTM(nn.Module):
    """A stacked LSTM whose W_ih = U_ih V_ih (rank r) and W_hh = U_hh V_hh (rank rank_hh, default r).

    forward(input, hx=None) -> (output, (h_n, c_n)) exactly as nn.LSTM (unidirectional, no projection):
    input (T, B, input_size) or (B, T, input_size) with batch_first, or unbatched (T, input_size);
    h_n, c_n (num_layers, B, hidden_size). Each layer runs as one lowrank_lstm_sequence op.
    Per layer l: parameters w_ih_u_l{l} (4H, r), w_ih_v_l{l} (r, in), w_hh_u_l{l} (4H, r_hh),
    w_hh_v_l{l} (r_hh, H) and one combined bias_l{l} (4H,) (nn.LSTM's two biases summed).
    """

    def __init__(self, input_size: int, hidden_size: int, rank: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, rank_hh: int | None = None, device=None, dtype=None):
        super().__init__()
        op = "LowRankLSTM"
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("rank", rank),
                            ("num_layers", num_layers)):
            _validate._int(op, name, value, 1)
        if rank_hh is not None:
            _validate._int(op, "rank_hh", rank_hh, 1)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.bias = batch_first, bias
        self.ranks = []
        scale = 1.0 / math.sqrt(hidden_size)
        for layer in range(num_layers):
            d = input_size if layer == 0 else hidden_size
            r_ih = min(rank, 4 * hidden_size, d)
            r_hh = min(rank if rank_hh is None else rank_hh, hidden_size)
            self.ranks.append((r_ih, r_hh))
            # nn.LSTM draws W from uniform(-scale, scale), variance scale^2 / 3. U V with both factors
            # uniform(-a, a) and inner size r has variance r (a^2 / 3)^2: equal when a = (3 / r)^(1/4) sqrt(scale).
            for name, shape, inner in ((f"w_ih_u_l{layer}", (4 * hidden_size, r_ih), r_ih),
                                       (f"w_ih_v_l{layer}", (r_ih, d), r_ih),
                                       (f"w_hh_u_l{layer}", (4 * hidden_size, r_hh), r_hh),
                                       (f"w_hh_v_l{layer}", (r_hh, hidden_size), r_hh)):
                bound = (3.0 / inner) ** 0.25 * math.sqrt(scale)
                self.register_parameter(name, nn.Parameter(
                    torch.empty(shape, device=device, dtype=dtype).uniform_(-bound, bound)))
            if bias:
                self.register_parameter(f"bias_l{layer}", nn.Parameter(
                    torch.empty(4 * hidden_size, device=device, dtype=dtype).uniform_(-scale, scale)))
            else:
                self.register_parameter(f"bias_l{layer}", None)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, rank: int | float, rank_hh: int | float | None = None) -> LowRankLSTM:
        """Factor every layer of `lstm` by truncated SVD. rank: an int, or a float in (0, 1] meaning the
        smallest rank keeping that fraction of each matrix's spectral energy. At full rank the result
        reproduces the nn.LSTM (to float32 rounding)."""
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"LowRankLSTM.from_lstm: lstm must be an nn.LSTM; got {type(lstm).__name__}")
        if lstm.bidirectional or lstm.proj_size > 0:
            raise ValueError("LowRankLSTM.from_lstm: bidirectional LSTMs and proj_size > 0 are not supported")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.input_size, module.hidden_size, module.num_layers = lstm.input_size, lstm.hidden_size, lstm.num_layers
        module.batch_first, module.bias = lstm.batch_first, lstm.bias
        module.ranks = []

        for name, wanted in (("rank", rank), ("rank_hh", rank if rank_hh is None else rank_hh)):
            count = isinstance(wanted, int) and not isinstance(wanted, bool) and wanted >= 1
            if not (count or (isinstance(wanted, float) and 0 < wanted <= 1)):
                raise ValueError(f"LowRankLSTM.from_lstm: {name} must be an int >= 1 or a float in (0, 1] (a "
                                 f"fraction of spectral energy); got {wanted!r}")

        def pick(weight, wanted):
            r = rank_for_energy(weight, wanted) if isinstance(wanted, float) else wanted
            return min(r, *weight.shape)  # a rank above the matrix's is its full rank

        for layer in range(lstm.num_layers):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
            r_ih, r_hh = pick(w_ih, rank), pick(w_hh, rank if rank_hh is None else rank_hh)
            module.ranks.append((r_ih, r_hh))
            for name, tensor in zip(("w_ih_u", "w_ih_v"), lowrank_factors(w_ih, r_ih)):
                module.register_parameter(f"{name}_l{layer}", nn.Parameter(tensor))
            for name, tensor in zip(("w_hh_u", "w_hh_v"), lowrank_factors(w_hh, r_hh)):
                module.register_parameter(f"{name}_l{layer}", nn.Parameter(tensor))
            b = (getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")).detach().clone() \
                if lstm.bias else None
            module.register_parameter(f"bias_l{layer}", None if b is None else nn.Parameter(b))
        return module

    def layer_weights(self, layer: int):
        return tuple(getattr(self, f"{n}_l{layer}") for n in ("w_ih_u", "w_ih_v", "w_hh_u", "w_hh_v", "bias"))

    def forward(self, input, hx=None):
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError("LowRankLSTM: PackedSequence input is not supported; pass a padded tensor")
        op = "LowRankLSTM"
        _validate._tensor(op, "input", input, dtypes=_validate.FLOAT_DTYPES)
        unbatched = input.dim() == 2
        if input.dim() not in (2, 3):
            raise ValueError(f"{op}: input must be 2-D (unbatched) or 3-D; got shape {tuple(input.shape)}")
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{op}: input.shape[-1] must be input_size = {self.input_size}; got {tuple(input.shape)}")
        batch = x.shape[1]
        if hx is None:
            h0 = c0 = [None] * self.num_layers
        else:
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            expected = (self.num_layers, batch, self.hidden_size)
            for name, t in (("h_0", h0), ("c_0", c0)):
                _validate._tensor(op, name, t, ndim=3)
                _validate._shape(op, name, t, expected, "(num_layers, B, hidden_size) = ")
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            x, h, c = torch.ops.amnets.lowrank_lstm_sequence(x, h0[layer], c0[layer], *self.layer_weights(layer))
            h_n.append(h)
            c_n.append(c)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if unbatched:
            return x.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (x.transpose(0, 1) if self.batch_first else x), (h_n, c_n)

    def macs_per_frame(self, batch: int = 1) -> int:
        """Multiply-adds per frame (gate products; the pointwise part is not counted)."""
        total = 0
        for layer, (r_ih, r_hh) in enumerate(self.ranks):
            d = self.input_size if layer == 0 else self.hidden_size
            total += r_ih * (d + 4 * self.hidden_size) + r_hh * (self.hidden_size + 4 * self.hidden_size)
        return total * batch

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, ranks={self.ranks}, num_layers={self.num_layers}, "
                f"bias={self.bias}, batch_first={self.batch_first}")
