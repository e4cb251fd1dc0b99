"""AmNetsEncoder: a stacked LSTM that switches, frame by frame, between a full and a cheap branch.

Every layer owns full dense LSTM weights (weight_ih_l{k} (4H, D), weight_hh_l{k} (4H, H), one bias_l{k}
(4H,), gates i, f, g, o as nn.LSTM) and a cheap branch that shares the layer's (h, c) and bias:

  cheap="sparse"   the SAME weights under a fixed block mask over [W_ih | W_hh] (4H, D + H): magnitude
                   block pruning of the initial weights at `sparsity`, kept in the buffer block_mask_l{k}
                   (Nb, Kb); no extra parameters. reprune() recomputes the masks from the current weights.
  cheap="lowrank"  factors w_{ih,hh}_{u,v}_l{k} initialised by truncated SVD of the full weights and then
                   trained jointly (they drift away from the full weights: they are parameters of their own).

An arbitrator (Linear -> ReLU -> Linear) reads the current input frame (and, with arbitrator_uses_state,
the previous top-layer h) and gives the logit of p_full; one decision per frame shared by all layers, or
one per layer with per_layer_decisions (then p_full and decisions carry a trailing layer axis).

forward() is the training path (plain PyTorch math, both branches computed every step, mixed with a
straight-through Gumbel-sigmoid decision). stream() is the inference path through amnets_kernels: only
the work the decision asks for is done.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import amnets_kernels as ak
from amnets_kernels._one_thread import OneThread
from amnets_kernels._ops.lstm_update import lstm_pointwise
from amnets_kernels.nn import NotCheaperWarning

CHEAP_KINDS = ("sparse", "lowrank")
FORCE_KINDS = (None, "full", "cheap")


def _logit(p: float) -> float:
    """log(p / (1 - p)), -inf at 0 and inf at 1: p_full > p exactly when the arbitrator's logit > _logit(p)."""
    return -math.inf if p <= 0.0 else math.inf if p >= 1.0 else math.log(p / (1.0 - p))


def _uniform(full):
    """A per-row branch choice as a bool when every row makes the same one: True (all full), False (all
    cheap); a (B,) bool tensor with both values is returned as it is."""
    if isinstance(full, bool):
        return full
    n_full = int(full.sum())
    return True if n_full == full.numel() else False if n_full == 0 else full


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_index(t) -> bool:
    """An integer tensor (not bool, whose True/False would pass as 1/0)."""
    return isinstance(t, Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _input_dtypes(device_type: str, weights_dtype: torch.dtype) -> set:
    """The float dtypes an input may have for weights in weights_dtype: theirs, and under torch.autocast on
    device_type also fp32 and the autocast dtype (the products cast to it); any other (fp64, fp16 under a
    bf16 autocast) fails deep in a matmul with a RuntimeError naming no argument."""
    if not torch.is_autocast_enabled(device_type):
        return {weights_dtype}
    return {weights_dtype, torch.float32, torch.get_autocast_dtype(device_type)}


class AmNetsEncoder(nn.Module):
    """The AmNets switching LSTM encoder (see the module docstring).

    Args:
        input_size, hidden_size, num_layers: as nn.LSTM (unidirectional, batch_first inputs).
        cheap: "sparse" or "lowrank".
        sparsity: fraction of blocks of each layer's [W_ih | W_hh] the sparse branch drops, in [0, 1).
        block_size: block edge of the sparse branch.
        rank: rank of the low-rank factors (clipped per matrix to its smaller side).
        arbitrator_hidden: width of the arbitrator's hidden layer.
        arbitrator_uses_state: also feed the previous top-layer h to the arbitrator.
        per_layer_decisions: one decision per layer per frame instead of one per frame.
        init_p_full: p_full of the untrained arbitrator (its output bias is logit(init_p_full)).
        tau: Gumbel-sigmoid temperature of training (an attribute: anneal it from outside).
        threshold: eval-mode decision rule is p_full > threshold.
        force: None (the arbitrator decides), "full" or "cheap": every frame takes that branch in
            forward() and (by default) in stream(); the arbitrator is not run. force="full" is the plain
            dense LSTM baseline with the same weights and code path.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, cheap: str = "sparse",
                 sparsity: float = 0.8, block_size: int = 32, rank: int = 128, arbitrator_hidden: int = 32,
                 arbitrator_uses_state: bool = False, per_layer_decisions: bool = False,
                 init_p_full: float = 0.5, tau: float = 1.0, threshold: float = 0.5, force: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        _check_init(input_size, hidden_size, num_layers, cheap, sparsity, block_size, rank, arbitrator_hidden,
                    arbitrator_uses_state, per_layer_decisions, init_p_full, tau, threshold, force)
        self.force = force
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.cheap, self.sparsity, self.block_size = cheap, float(sparsity), block_size
        self.arbitrator_uses_state, self.per_layer_decisions = arbitrator_uses_state, per_layer_decisions
        self.tau, self.threshold = float(tau), float(threshold)
        factory = dict(device=device, dtype=dtype)
        H = hidden_size
        scale = 1.0 / math.sqrt(H)
        self.ranks, self.rank = [], rank  # per layer (r_ih, r_hh): `rank` clipped to the layer's sides
        for k in range(num_layers):
            d = self.layer_input_size(k)
            for name, shape in ((f"weight_ih_l{k}", (4 * H, d)), (f"weight_hh_l{k}", (4 * H, H)),
                                (f"bias_l{k}", (4 * H,))):
                weight = torch.empty(shape, **factory).uniform_(-scale, scale)  # nn.LSTM's init
                self.register_parameter(name, nn.Parameter(weight))
            if cheap == "lowrank":
                ranks = (min(rank, 4 * H, d), min(rank, H))
                self.ranks.append(ranks)
                for which, r in zip(("ih", "hh"), ranks):
                    u, v = ak.lowrank_factors(getattr(self, f"weight_{which}_l{k}"), r)
                    self.register_parameter(f"w_{which}_u_l{k}", nn.Parameter(u))
                    self.register_parameter(f"w_{which}_v_l{k}", nn.Parameter(v))
            else:
                grid = (-(-4 * H // block_size), -(-(d + H) // block_size))
                self.register_buffer(f"block_mask_l{k}", torch.zeros(grid, dtype=torch.bool, device=device))
        if cheap == "sparse":
            self.reprune()
        else:
            self._warn_if_not_cheaper()
        arb_in = input_size + (H if arbitrator_uses_state else 0)
        self.arbitrator = nn.Sequential(nn.Linear(arb_in, arbitrator_hidden, **factory), nn.ReLU(),
                                        nn.Linear(arbitrator_hidden, num_layers if per_layer_decisions else 1,
                                                  **factory))
        with torch.no_grad():
            self.arbitrator[2].bias.fill_(math.log(init_p_full / (1.0 - init_p_full)))
        self._step_cache: dict = {}  # layer -> (SourcesSnapshot, its _LayerStep): see _stream_steps
        self._engine_cache: _EngineHit | None = None  # see frame_engine

    def __getstate__(self):
        """Pickling (torch.save of the module, copy.deepcopy) leaves the inference caches behind: the native
        engine cannot be pickled, and a copy's weights are new tensors that would miss them anyway."""
        state = dict(super().__getstate__())
        state["_step_cache"], state["_engine_cache"] = {}, None
        return state

    # -- weights ------------------------------------------------------------------------------------
    def layer_input_size(self, k: int) -> int:
        _check_layer("AmNetsEncoder.layer_input_size", self, k)
        return self.input_size if k == 0 else self.hidden_size

    def full_weight(self, k: int) -> Tensor:
        """[W_ih | W_hh] of layer k, (4H, D + H): one matmul on [x, h] gives the gates."""
        _check_layer("AmNetsEncoder.full_weight", self, k)
        return torch.cat([getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}")], dim=1)

    def element_mask(self, k: int) -> Tensor:
        """The sparse branch's (4H, D + H) 0/1 mask of layer k, expanded from its block mask."""
        _check_layer("AmNetsEncoder.element_mask", self, k)
        if self.cheap != "sparse":
            raise ValueError("AmNetsEncoder.element_mask: only the sparse cheap branch has a mask; "
                             f"cheap={self.cheap!r}")
        b = self.block_size
        keep = getattr(self, f"block_mask_l{k}")
        n, m = 4 * self.hidden_size, self.layer_input_size(k) + self.hidden_size
        return keep.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :m]

    @torch.no_grad()
    def reprune(self) -> None:
        """Recompute every layer's block mask by magnitude block pruning of the current full weights. A layer
        that keeps no block is legal (the engines run it) but never silent: a NotCheaperWarning."""
        if self.cheap != "sparse":
            raise ValueError("AmNetsEncoder.reprune: only the sparse cheap branch has a mask; "
                             f"cheap={self.cheap!r}")
        for k in range(self.num_layers):
            mask = ak.BlockSparseMatrix.from_dense(self.full_weight(k), self.block_size,
                                                   sparsity=self.sparsity).block_mask()
            # In place: bumps its version, which the stream caches see.
            getattr(self, f"block_mask_l{k}").copy_(mask)
        self._warn_if_not_cheaper()

    def _load_from_state_dict(self, state_dict, prefix, *args):
        super()._load_from_state_dict(state_dict, prefix, *args)
        # Loaded in place: inference tensors (an encoder loaded under inference_mode, as servers load it) bump no
        # version, and the frame engine and per-layer steps built from the old weights would go on being used.
        ak.weights_changed()
        self._warn_if_not_cheaper()  # the loaded masks (or ranks) as the constructor's are: never silent

    def _warn_if_not_cheaper(self) -> None:
        """A cheap branch that saves nothing in some layer is legal but never silent: a pruning that keeps no
        block (the sparse branch there is the bias alone), or a cheap branch costing no fewer MACs than the full
        one (a rank clipped to the layer's sides, a pruning that keeps every block)."""
        masks = [getattr(self, f"block_mask_l{k}") for k in range(self.num_layers)] if self.cheap == "sparse" else []
        empty = [f"layer {k} ({m.shape[0]} x {m.shape[1]} blocks)" for k, m in enumerate(masks) if not m.any()]
        if empty:  # as amnets_kernels' modules and swap_in say of a pruning that keeps nothing
            warnings.warn(f"AmNetsEncoder: sparsity={self.sparsity:g} with block_size={self.block_size}: the "
                          f"pruning keeps no block of [W_ih | W_hh] in {', '.join(empty)}, so the sparse branch "
                          "there would be the bias alone; lower sparsity or block_size", NotCheaperWarning,
                          stacklevel=3)
            return
        costly = [f"layer {k} ({self.layer_macs(k, 'cheap'):,} >= {self.layer_macs(k, 'full'):,})"
                  for k in range(self.num_layers) if self.layer_macs(k, "cheap") >= self.layer_macs(k, "full")]
        if costly:
            knob = f"sparsity={self.sparsity:g} with block_size={self.block_size}"
            if self.cheap == "lowrank":
                used = max(max(r) for r in self.ranks)  # the rank given, clipped to the layers' sides
                given = self.__dict__.get("rank", used)
                knob = f"rank={given}" + (f" (clipped to {used} by the layers' sizes)" if given != used else "")
            warnings.warn(f"AmNetsEncoder: cheap={self.cheap!r}, {knob}: the cheap branch costs no fewer MACs per "
                          f"frame than the full one in {', '.join(costly)}, so choosing it saves nothing there; "
                          f"{'lower the rank' if self.cheap == 'lowrank' else 'raise sparsity'}",
                          NotCheaperWarning, stacklevel=3)

    def lowrank_weights(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(U_ih, V_ih, U_hh, V_hh) of layer k's low-rank cheap branch."""
        _check_layer("AmNetsEncoder.lowrank_weights", self, k)
        if self.cheap != "lowrank":
            raise ValueError("AmNetsEncoder.lowrank_weights: only the low-rank cheap branch has factors; "
                             f"cheap={self.cheap!r}")
        return tuple(getattr(self, f"w_{w}_l{k}") for w in ("ih_u", "ih_v", "hh_u", "hh_v"))

    def cheap_weight(self, k: int) -> Tensor:
        """The dense (4H, D + H) equivalent of layer k's cheap branch (training math and tests)."""
        _check_layer("AmNetsEncoder.cheap_weight", self, k)
        if self.cheap == "sparse":
            return self.full_weight(k) * self.element_mask(k)
        u_ih, v_ih, u_hh, v_hh = self.lowrank_weights(k)
        return torch.cat([u_ih @ v_ih, u_hh @ v_hh], dim=1)

    # -- cost model ---------------------------------------------------------------------------------
    def arbitrator_macs(self) -> int:
        return sum(m.in_features * m.out_features for m in self.arbitrator if isinstance(m, nn.Linear))

    def layer_macs(self, k: int, branch: str) -> int:
        """Multiply-adds of layer k's gate products on `branch` ("full" or "cheap") for one frame."""
        _check_layer("AmNetsEncoder.layer_macs", self, k)
        _check_branch("AmNetsEncoder.layer_macs", branch)
        d, H = self.layer_input_size(k), self.hidden_size
        if branch == "full":
            return 4 * H * (d + H)
        if self.cheap == "sparse":  # the stored weights that fall inside the matrix (edge blocks clipped)
            return int(self.element_mask(k).sum())
        r_ih, r_hh = self.ranks[k]
        return r_ih * (d + 4 * H) + r_hh * (H + 4 * H)

    def macs_per_frame(self, branch: str) -> int:
        """Multiply-adds per frame with every layer on `branch` ("full" or "cheap"), arbitrator included.

        Counted: the gate matrix products (x W_ih^T + h W_hh^T, or the kept blocks' share of it, or the
        two low-rank products per matrix) and the arbitrator's two linear layers. Not counted: biases
        and pointwise ops (sigmoid, tanh, the cell update, ReLU), which are O(H) per frame.
        """
        _check_branch("AmNetsEncoder.macs_per_frame", branch)
        return self.arbitrator_macs() + sum(self.layer_macs(k, branch) for k in range(self.num_layers))

    def realized_macs(self, decisions: Tensor) -> Tensor:
        """Multiply-adds of each frame given its hard decisions, (B, T) or (B, T, L) bool as forward() and
        stream() return them: the work stream() does (no arbitrator when the encoder is forced)."""
        _check_decisions("AmNetsEncoder.realized_macs", self, decisions)
        full, cheap = self._layer_mac_table(decisions.device)
        d = decisions.to(torch.float64)
        d = d if self.per_layer_decisions else d.unsqueeze(-1).expand(*d.shape, self.num_layers)
        return (0 if self.force is not None else self.arbitrator_macs()) + d @ full + (1 - d) @ cheap

    def _layer_mac_table(self, device) -> tuple[Tensor, Tensor]:
        return tuple(torch.tensor([self.layer_macs(k, branch) for k in range(self.num_layers)],
                                  dtype=torch.float64, device=device) for branch in ("full", "cheap"))

    # -- arbitrator ---------------------------------------------------------------------------------
    def _p_logits(self, x_t: Tensor, h_top: Tensor) -> Tensor:
        """(B, n_decisions) logits of p_full for frame x_t given the previous top-layer h. The arbitrator's
        layers as plain functions: three module calls a streamed frame cost more than its arithmetic."""
        inp = torch.cat([x_t, h_top], dim=1) if self.arbitrator_uses_state else x_t
        first, last = self.arbitrator[0], self.arbitrator[2]
        return F.linear(F.relu(F.linear(inp, first.weight, first.bias)), last.weight, last.bias)

    # -- training path ------------------------------------------------------------------------------
    def forward(self, x: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, dict]:
        """x (B, T, D), lengths (B,) -> (out (B, T, H), aux). Frames at t >= lengths[b] give zeros.

        Training mode: a Gumbel-sigmoid sample s = sigmoid((logit + logistic noise) / tau) per decision;
        the step uses the hard d = (s > 0.5) while gradients flow through s (straight-through), so the
        gates are d * gates_full + (1 - d) * gates_cheap with d(gates)/d(s) = gates_full - gates_cheap.
        Eval mode: d = p_full > threshold (decided as logit > logit(threshold), as stream() does). aux:
        p_full, decisions (B, T) (or (B, T, L) per layer; 0/False on padded frames), mask (B, T) valid frames, expected_macs (B, T) = arbitrator +
        sum_layers p_full * macs_full + (1 - p_full) * macs_cheap (0 on padding), and cost_fraction, the
        scalar sum(expected_macs) / (valid frames * macs_per_frame("full")) (differentiable in p_full); a
        forced encoder runs no arbitrator, and counts none on either side.
        """
        lengths = _check_forward(self, x, lengths)
        B, T, _ = x.shape
        H, L = self.hidden_size, self.num_layers
        mask = torch.arange(T, device=x.device)[None, :] < lengths.to(x.device)[:, None]
        # Padding is zeroed before any arithmetic: masking a result afterwards keeps a NaN or inf there
        # (NaN * 0 = NaN), and even torch.where would leave NaN gradients from the branch it discards.
        x = x.masked_fill(~mask[..., None], 0)
        tau = float(self.tau)  # a NumPy scalar too
        # A forced encoder computes only its branch (no arbitrator): the dense baseline trains at dense cost.
        weights = [(None if self.force == "cheap" else self.full_weight(k),
                    None if self.force == "full" else self.cheap_weight(k), getattr(self, f"bias_l{k}"))
                   for k in range(L)]
        h = [x.new_zeros(B, H) for _ in range(L)]
        c = [x.new_zeros(B, H) for _ in range(L)]
        outs, p_all, d_all = [], [], []
        n_dec = L if self.per_layer_decisions else 1
        for t in range(T):
            if self.force is not None:
                p = d = x.new_full((B, n_dec), float(self.force == "full"))
            else:
                logits = self._p_logits(x[:, t], h[-1])
                p = torch.sigmoid(logits)
                if self.training:
                    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
                    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
                    d = (soft > 0.5).to(soft.dtype) + soft - soft.detach()
                else:
                    d = (logits > _logit(self.threshold)).to(p.dtype)
            inp = x[:, t]
            for k, (w_full, w_cheap, bias) in enumerate(weights):
                z = torch.cat([inp, h[k]], dim=1)
                dk = d[:, k if self.per_layer_decisions else 0, None]
                if w_cheap is None:
                    gates = F.linear(z, w_full, bias)
                elif w_full is None:
                    gates = F.linear(z, w_cheap, bias)
                else:
                    gates = dk * F.linear(z, w_full, bias) + (1 - dk) * F.linear(z, w_cheap, bias)
                h[k], c[k] = lstm_pointwise(gates, c[k])
                inp = h[k]
            outs.append(inp)
            p_all.append(p)
            d_all.append(d.detach() > 0.5)
        out = torch.stack(outs, 1).masked_fill(~mask[..., None], 0)
        p_full = torch.stack(p_all, 1).masked_fill(~mask[..., None], 0)  # (B, T, n_decisions)
        decisions = torch.stack(d_all, 1) & mask[..., None]
        full, cheap = self._layer_mac_table(x.device)
        p_layers = p_full.to(torch.float64).expand(B, T, L)
        arbitrator = 0 if self.force is not None else self.arbitrator_macs()
        expected = (arbitrator + p_layers @ full + (1 - p_layers) @ cheap).masked_fill(~mask, 0)
        all_full = self.macs_per_frame("full") - (self.arbitrator_macs() if self.force is not None else 0)
        cost_fraction = expected.sum() / (mask.sum().clamp(min=1) * all_full)  # a forced-full encoder: exactly 1
        if not self.per_layer_decisions:
            p_full, decisions = p_full[..., 0], decisions[..., 0]
        return out, dict(p_full=p_full, decisions=decisions, mask=mask, expected_macs=expected.to(x.dtype),
                         cost_fraction=cost_fraction.to(x.dtype))

    # -- inference path -----------------------------------------------------------------------------
    def _layer_sources(self, k: int) -> list[tuple[dict, str]]:
        """Where layer k's parameters and buffers live, as (dict, name): what its streaming step and the frame
        engine are built from, for _C.SourcesSnapshot (csrc/sources_snapshot.cpp), which tells a cache built
        from them whether any has changed since: in place (optimizer steps, load_state_dict, reprune), through
        `.data = ...` or module.to(), replaced or swapped."""
        names = (f"weight_ih_l{k}", f"weight_hh_l{k}", f"bias_l{k}")
        if self.cheap == "lowrank":
            names += tuple(f"w_{w}_l{k}" for w in ("ih_u", "ih_v", "hh_u", "hh_v"))
        sources = [(self._parameters, n) for n in names]
        return sources + [(self._buffers, f"block_mask_l{k}")] if self.cheap == "sparse" else sources

    def frame_engine(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """The frame engine for the current weights (one call runs a chunk of frames, arbitrator and every
        layer included), built once per weight version, or None where stream() runs the per-layer prepared
        steps instead. Which engine follows the face the cheap branch's op would take on the weights' device:
          the cpu face     csrc/cpu/frame_engine.cpp (fp32/bf16 weights, sparse block size 16/32/64);
          the triton face  amnets_kernels/triton/frame_engine.py (CUDA tensors under backend "auto" or
                           "triton"; CPU tensors under TRITON_INTERPRET=1 with "triton" chosen), fp32/bf16
                           weights, sparse block size 16/32/64, arbitrator_hidden <= 256, at most 8
                           per-layer decisions;
        None otherwise: the reference face chosen, backend "cuda" (its faces have no engine: it runs the
        per-layer steps on the CUDA kernels), other dtypes, or an extension built without the CPU engine.
        `device` and `dtype` (default: the weights') must be the weights', else None."""
        # Parameters read from their dicts, not through nn.Module.__getattr__ (~0.5 us each).
        weight = self._parameters["weight_ih_l0"]
        kind = weight.device.type
        if device is not None and torch.device(device).type != kind or dtype is not None and dtype != weight.dtype:
            return None
        engine = self._cached_engine()
        return engine if engine is not None else self._build_engine(kind)

    def _engine_sources(self) -> list[tuple[dict, str]]:
        """Where every tensor the frame engine is built from lives, as (dict, key): every layer's, the
        arbitrator's four and the submodules on the way to them."""
        arbitrator = self._modules["arbitrator"]
        first, last = arbitrator._modules["0"], arbitrator._modules["2"]
        return ([source for k in range(self.num_layers) for source in self._layer_sources(k)]
                + [(self._modules, "arbitrator"), (arbitrator._modules, "0"), (arbitrator._modules, "2")]
                + [(m._parameters, n) for m in (first, last) for n in ("weight", "bias")])

    def _cached_engine(self):
        """The cached engine while the backend and every tensor it was built from are unchanged (in place,
        by `.data = ...`, replaced or moved), else None. Runs on every stream() call: ~0.5 us, one native
        check (_C.SourcesSnapshot)."""
        hit = self._engine_cache
        if hit is not None and hit.backend == ak.get_backend() and hit.sources.matches():
            return hit.engine
        return None

    def _build_engine(self, kind: str):
        """frame_engine() past its cache: the engine for the current weights and backend, cached, or None."""
        weight = self._parameters["weight_ih_l0"]
        if weight.dtype not in (torch.float32, torch.bfloat16) or (
                self.cheap == "sparse" and self.block_size not in (16, 32, 64)):
            return None
        face = _engine_face(_CHEAP_OPS[self.cheap], kind)
        if face is None:
            return None
        if face == "triton":  # past the Triton engine's limits: the per-layer steps (its constructor would raise)
            limits, decisions = _triton_engine(), self.num_layers if self.per_layer_decisions else 1
            if self.arbitrator[0].out_features > limits.MAX_ARBITRATOR_WIDTH or decisions > limits.MAX_DECISIONS:
                return None
        backend, sources = ak.get_backend(), self._engine_sources()
        arbitrator = [d[n] for d, n in sources[-4:]]  # _engine_sources ends with W1, b1, W2, b2
        with torch.no_grad():
            engine = (self._cpu_engine(arbitrator) if face == "cpu" else
                      _triton_engine().FrameEngine(
                          self.cheap, [self._engine_layer(k) for k in range(self.num_layers)],
                          arbitrator, self.input_size, self.arbitrator_uses_state, self.per_layer_decisions,
                          self.block_size))
        snapshot = _C.SourcesSnapshot(sources)
        self._engine_cache = _EngineHit(backend, snapshot, engine,
                                        _C.StreamCall(engine, snapshot) if face == "cpu" else None)
        return engine

    def _cpu_engine(self, arbitrator):
        layers = []
        for k in range(self.num_layers):
            w, bias = self.full_weight(k), getattr(self, f"bias_l{k}")
            if self.cheap == "sparse":
                kept = ak.BlockSparseMatrix.from_block_mask(w, getattr(self, f"block_mask_l{k}"), self.block_size)
                layers += [w, kept.values, kept.crow_indices, kept.col_indices, bias]
            else:
                layers += [w, *self.lowrank_weights(k), bias]
        return _ENGINE(self.cheap, [t.detach() for t in layers], arbitrator, self.input_size,
                       self.arbitrator_uses_state, self.per_layer_decisions)

    def _engine_layer(self, k: int) -> dict:
        """Layer k for the Triton engine: the dense weight and bias, and the element mask or the factors."""
        layer = dict(full=self.full_weight(k), bias=getattr(self, f"bias_l{k}"))
        if self.cheap == "sparse":
            layer["mask"] = self.element_mask(k)
        else:
            layer["factors"] = list(self.lowrank_weights(k))
        return layer

    def streamer(self, batch: int = 1, threshold: float | None = None, force=None) -> "Streamer":
        """A live stream's frame engine: `s = enc.streamer(); out, decisions = s(frames)` for frames
        (batch, T, D), any T per call, the state carried from call to call (s.state, s.reset()). The same
        results as stream() with the state passed along, at the host cost of one native call per chunk.
        Built from the weights as they are now: make a new one after changing them.
        Threads: a chunk runs with the GIL released, so streams on several Python threads run in parallel
        (a server, one stream per thread: python -m benchmarks.serving). A streamer is one state: give each
        thread its own (another streamer(), or fork()); a second thread entering a busy one gets a RuntimeError."""
        return Streamer(self, batch, threshold, force)

    def _stream_steps(self) -> list["_LayerStep"]:
        """Every layer's prepared streaming step, rebuilt when any tensor it was built from has changed
        (see _layer_sources): a stale copy is never used and an unchanged one is never rebuilt."""
        steps = []
        for k in range(self.num_layers):
            hit = self._step_cache.get(k)
            if hit is None or not hit[0].matches():
                sources = self._layer_sources(k)
                w, bias = self.full_weight(k).detach(), getattr(self, f"bias_l{k}").detach()
                step = (_SparseStep(w, getattr(self, f"block_mask_l{k}"), bias, self.block_size)
                        if self.cheap == "sparse" else
                        _LowrankStep(w, [t.detach() for t in self.lowrank_weights(k)], bias))
                hit = self._step_cache[k] = (_C.SourcesSnapshot(sources), step)
            steps.append(hit[1])
        return steps

    def stream(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, force=None,
               threshold: float | None = None) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
        """Inference, frame by frame, through the kernels: x (B, T, D) -> (out (B, T, H), state, decisions).

        state: (h, c), each (num_layers, B, H), as returned by the previous chunk (None: zeros); the
        arbitrator's only memory is h[-1], so chunks of any length continue exactly. force: None (the
        encoder's own `force` if set, else the arbitrator decides: p_full > threshold, default
        self.threshold), "full", "cheap", or a bool tensor (B,) with True = full for every frame.
        decisions: (B, T) bool, or (B, T, L) per layer.
        Rows of one batch may take different branches in the same step; each row's result equals
        running it alone (see _LayerStep for how each branch is computed). Runs without autograd.
        Once the CPU frame engine is built for the current weights, a call is one native call (_C.StreamCall:
        the engine's validity, the arguments' kinds and the chunk; ~1 us of host time more than a streamer's).
        Many threads may stream on one encoder at once, each with its own state: the chunk releases the GIL.
        """
        hit = self._engine_cache
        if hit is not None and hit.native is not None:  # the CPU engine, built: one native call where it applies
            fast = hit.native(x, state, force, threshold, self.force, self.threshold)  # (no autograd graph)
            if fast is not None:
                return fast
        if torch.is_grad_enabled():  # (a streaming loop under no_grad/inference_mode skips this switch)
            with torch.no_grad():
                return self.stream(x, state, force, threshold)
        state, force, threshold = _check_stream(self, x, state, force, threshold)
        engine = self.frame_engine()
        if engine is not None:
            return _run_engine(engine, x, state, force, threshold)
        B, T, _ = x.shape
        h, c = list(state[0].unbind(0)), list(state[1].unbind(0))
        n_dec = self.num_layers if self.per_layer_decisions else 1
        steps = self._stream_steps()
        outs, decisions = [], []
        full = force  # forced: the same branch choice for every frame and layer
        cut = _logit(threshold)  # p_full > threshold as logit > logit(threshold), as forward() decides
        for t in range(T):
            inp = x[:, t]
            if force is None:
                d = self._p_logits(inp, h[-1]) > cut
                decisions.append(d)
                if B == 1:  # a single stream branches on Python bools: one .tolist() a frame
                    d = d.tolist()[0]
            for k, step in enumerate(steps):
                if force is None:
                    j = k if self.per_layer_decisions else 0
                    full = d[j] if B == 1 else d[:, j]
                h[k], c[k] = step(inp, h[k], c[k], full)
                inp = h[k]
            outs.append(inp)
        out = torch.stack(outs, 1) if T else x.new_zeros(B, 0, self.hidden_size)
        if force is None:
            dec = torch.stack(decisions, 1) if T else torch.zeros(B, 0, n_dec, dtype=torch.bool, device=x.device)
        elif isinstance(force, bool):
            dec = torch.full((B, T, n_dec), force, dtype=torch.bool, device=x.device)
        else:
            dec = force[:, None, None].expand(B, T, n_dec).clone()
        return out, (torch.stack(h), torch.stack(c)), dec if self.per_layer_decisions else dec[..., 0]

    def extra_repr(self) -> str:
        cheap = (f"sparsity={self.sparsity}, block_size={self.block_size}" if self.cheap == "sparse"
                 else f"ranks={self.ranks}")
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, cheap={self.cheap!r}, "
                f"{cheap}, arbitrator_uses_state={self.arbitrator_uses_state}, "
                f"per_layer_decisions={self.per_layer_decisions}")


# ---------------------------------------------------------------------------------------------------
# the native frame engine


_C = ak._backend._C  # the compiled extension
# The pybind11 binding (a call costs ~1 us; the same engine is torch.classes.amnets_native.FrameEngine for
# TorchScript and C++). None: an extension built without it, or not loaded: stream() runs the prepared steps.
_ENGINE = getattr(_C, "FrameEngine", None)
_CHEAP_OPS = {"sparse": "bsr_linear", "lowrank": "lowrank_lstm_cell"}


class _EngineHit(NamedTuple):
    """A built frame engine and what it was built under: the backend and a snapshot of its source tensors.
    native: for the CPU engine, stream() as one native call (_C.StreamCall, csrc/cpu/frame_engine.cpp: a builtin
    function that checks the snapshot and the backend itself, returns None where stream() must take its Python
    path)."""
    backend: str
    sources: "_C.SourcesSnapshot"
    engine: object
    native: object  # the _C.StreamCall builtin, or None


def _engine_face(op: str, kind: str) -> str | None:
    """"cpu" or "triton": the engine for weights on `kind` under the current backend; None: no engine."""
    try:
        face = ak.which_face(op, kind)
    except ak.FaceUnavailableError:
        return None
    if face == "cpu":
        return "cpu" if _ENGINE is not None else None
    if face == "triton" or (kind == "cuda" and ak.get_backend() == "auto" and _triton_runs(op, kind)):
        return "triton"
    return None


@functools.lru_cache(maxsize=None)  # faces do not come and go while the process runs (as _backend._pick)
def _triton_runs(op: str, kind: str) -> bool:
    return ak.unavailable_reason(op, "triton", kind) is None


def _triton_engine():
    from amnets_kernels.triton import frame_engine  # imports triton: only when an engine on it is built

    return frame_engine


def _engine_force(force) -> tuple:
    """The engine's (code, rows) for a checked force: None -> the arbitrator decides (-1), a bool -> every
    row full (1) or cheap (0), a (B,) bool tensor -> per row (2)."""
    return (-1, None) if force is None else (int(force), None) if isinstance(force, bool) else (2, force)


def _run_engine(engine, x: Tensor, state, force, threshold):
    """stream()'s result from the engine, on checked arguments."""
    out, h, c, dec = engine.run(x, state[0], state[1], *_engine_force(force), _logit(threshold))
    return out, (h, c), dec


class Streamer:
    """A live stream (or a batch of them) over an AmNetsEncoder: see AmNetsEncoder.streamer.

    `native` says whether it runs on the frame engine (else on stream()'s per-layer prepared steps, for
    the reasons AmNetsEncoder.frame_engine lists)."""

    def __init__(self, encoder: AmNetsEncoder, batch: int = 1, threshold: float | None = None, force=None):
        if not _is_int(batch) or batch < 1:
            raise ValueError(f"AmNetsEncoder.streamer: batch must be an int >= 1; got {batch!r}")
        self.encoder, self.batch = encoder, batch
        probe = encoder.weight_ih_l0.new_zeros(batch, 0, encoder.input_size)
        _, force, self._threshold = _check_stream(encoder, probe, None, force, threshold)
        self._force = _force_argument(force)  # as stream() takes it again
        engine = encoder.frame_engine(probe.device, probe.dtype)
        self.native = engine is not None
        # On an engine the state lives in its stream object (updated in place: a call passes only the frames).
        self._live = engine.stream(batch, *_engine_force(force), _logit(self._threshold)) if self.native \
            else None
        self._one_thread = OneThread("AmNetsEncoder.streamer")  # off the engines (theirs enforce it themselves)
        self.reset()

    @property
    def state(self) -> tuple[Tensor, Tensor]:
        """(h, c), each (num_layers, batch, H): the state after the last call (a copy: later calls leave it)."""
        if self._live is not None:
            return self._live.state()
        with self._one_thread:  # calls replace self._state, never write it: a copy keeps the caller's edits out
            return tuple(t.clone() for t in self._state)

    @state.setter
    def state(self, value: tuple[Tensor, Tensor]) -> None:
        probe = self.encoder.weight_ih_l0.new_zeros(self.batch, 0, self.encoder.input_size)
        value, _, _ = _check_stream(self.encoder, probe, value, self._force, self._threshold)
        if self._live is not None:
            self._live.set_state(*value)
        else:
            with self._one_thread:
                self._state = tuple(t.clone() for t in value)  # the caller's later edits stay theirs

    def reset(self) -> None:
        """Start a new stream: zero state."""
        if self._live is not None:
            self._live.reset()
        else:
            zeros = self.encoder.weight_ih_l0.new_zeros(self.encoder.num_layers, self.batch,
                                                        self.encoder.hidden_size)
            with self._one_thread:
                self._state = (zeros, zeros)

    def fork(self) -> "Streamer":
        """Another stream that continues from this one's state as it is now, with its own state from here on
        (a beam of hypotheses, or trying a continuation and going back): the same engine and settings.
        copy.copy(streamer) is the same; copy.deepcopy also copies the encoder."""
        other = object.__new__(Streamer)
        other.__dict__.update(self.__dict__)
        other._one_thread = OneThread("AmNetsEncoder.streamer")
        if self._live is not None:
            other._live = self._live.fork()
        else:  # the state is a pair of tensors that calls replace and never write: the two can share it
            with self._one_thread:
                other._state = self._state
        return other

    __copy__ = fork

    def __deepcopy__(self, memo) -> "Streamer":
        other = self.fork()
        other.encoder, other._force = copy.deepcopy(self.encoder, memo), copy.deepcopy(self._force, memo)
        return other

    def __reduce__(self):
        # pickle, torch.save, multiprocessing: a stream travels as its encoder, settings and state, and gets an
        # engine of its own where it lands (the engine's native state cannot be pickled).
        return _unpickled_streamer, (self.encoder, self.batch, self._threshold, self._force, self.state)

    def __call__(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """frames (batch, T, input_size) -> (out (batch, T, H), decisions (batch, T) or (batch, T, L))."""
        if self._live is None:
            self._check(frames)
            with self._one_thread:
                out, self._state, dec = self.encoder.stream(frames, self._state, self._force, self._threshold)
            return out, dec
        try:  # the engine checks its arguments itself: no Python check on the way (a frame costs ~10 us)
            return self._live(frames)
        except (TypeError, ValueError):
            self._check(frames)  # the error in stream()'s words, naming the argument
            raise

    def _check(self, frames) -> None:
        _check_stream(self.encoder, frames, None, self._force, self._threshold)
        if frames.shape[0] != self.batch:
            raise ValueError(f"AmNetsEncoder.streamer: frames must have batch = {self.batch} rows (the "
                             f"streamer's); got shape {tuple(frames.shape)}")
        _check_stream(self.encoder, frames, self.state, self._force, self._threshold)


# ---------------------------------------------------------------------------------------------------
# streaming steps: one per layer, holding its weights as the kernels want them


class _LayerStep:
    """One layer's step for a batch of streams, `full` choosing each row's branch.

    Full rows: the dense weights, one matmul on [x | h] and the LSTM update (plain PyTorch: MKL's GEMV/GEMM
    is the fastest dense step we have; the dense baseline, force="full", is exactly this). A step whose
    rows all take one branch is one branch call (B = 1 always is); a mixed step runs `mixed`, which each
    cheap kind defines. The cheap branches run prepared kernels, which check their weights once, so a
    frame pays a few microseconds of host time per layer, not the public ops' full argument checks.
    """

    def __init__(self, w: Tensor, bias: Tensor):
        self.w, self.bias = w.contiguous(), bias

    def __call__(self, inp: Tensor, h: Tensor, c: Tensor, full) -> tuple[Tensor, Tensor]:
        """full: a bool for every row, or a (B,) bool tensor."""
        full = _uniform(full)
        if full is True:
            return self.full(inp, h, c)
        if full is False:
            return self.cheap(inp, h, c)
        return self.mixed(inp, h, c, full)

    def full(self, inp, h, c):
        return lstm_pointwise(F.linear(torch.cat([inp, h], dim=1), self.w, self.bias), c)


class _SparseStep(_LayerStep):
    """Sparse cheap branch. Cheap rows: one fused block-sparse LSTM step over the kept blocks (one native
    call on the CPU). Mixed: the kept blocks for every row, plus the complement blocks for the full rows
    only (kept + complement = W), then the LSTM update."""

    def __init__(self, w: Tensor, keep: Tensor, bias: Tensor, block: int):
        super().__init__(w, bias)
        kept = ak.BlockSparseMatrix.from_block_mask(w, keep, block)
        rest = ak.BlockSparseMatrix.from_block_mask(w, ~keep, block)
        self.cheap = ak.PreparedBsrLstmCell(kept, bias)
        self.kept, self.rest = self.cheap.linear, ak.PreparedBsrLinear(rest)  # kept: prepared once

    def mixed(self, inp, h, c, full):
        rows = full.nonzero().squeeze(1)
        z = torch.cat([inp, h], dim=1)
        gates = self.kept(z).index_add_(0, rows, self.rest(z.index_select(0, rows)))
        return lstm_pointwise(gates, c)


class _LowrankStep(_LayerStep):
    """Low-rank cheap branch. Cheap rows: the low-rank LSTM cell kernel. Mixed: rows grouped by branch."""

    def __init__(self, w: Tensor, factors: list[Tensor], bias: Tensor):
        super().__init__(w, bias)
        self.cheap = ak.PreparedLowrankLstmCell(*factors, bias)

    def mixed(self, inp, h, c, full):
        rows, cheap_rows = full.nonzero().squeeze(1), (~full).nonzero().squeeze(1)
        h1, c1 = torch.empty_like(h), torch.empty_like(c)
        h1[rows], c1[rows] = self.full(inp[rows], h[rows], c[rows])
        h1[cheap_rows], c1[cheap_rows] = self.cheap(inp[cheap_rows], h[cheap_rows], c[cheap_rows])
        return h1, c1


# ---------------------------------------------------------------------------------------------------
# validation: one function per public entry point


def _threshold(op: str, value) -> float:
    """A decision threshold on p_full in [0, 1] (0: every frame full, 1: none), as a float; any real number
    (numpy's included), not a bool or a tensor."""
    if isinstance(value, (bool, Tensor)) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        kind = "" if isinstance(value, numbers.Real) and not isinstance(value, bool) else f" (a {type(value).__name__})"
        raise ValueError(f"{op}: threshold must be in [0, 1] (a number); got {value!r}{kind}")
    return float(value)


def _check_force_kind(op: str, force) -> None:
    if not (force is None or isinstance(force, str) and force in ("full", "cheap")):
        raise ValueError(f"{op}: force must be one of {FORCE_KINDS}; got {force!r}")


def _check_tau(op: str, tau) -> None:
    """Any finite real number > 0 (NumPy's too, as an annealing schedule may give), not a bool: at tau = inf
    every training decision was cheap and the arbitrator got no gradient."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < tau < math.inf:
        raise ValueError(f"{op}: tau must be a finite real number > 0; got {tau!r}")


def _check_layer(op: str, enc: AmNetsEncoder, k) -> None:
    if not _is_int(k) or not 0 <= k < enc.num_layers:
        raise ValueError(f"{op}: k must be a layer index in [0, num_layers={enc.num_layers}); got {k!r}")


def _check_branch(op: str, branch) -> None:
    if not (isinstance(branch, str) and branch in ("full", "cheap")):
        raise ValueError(f"{op}: branch must be 'full' or 'cheap'; got {branch!r}")


def _check_decisions(op: str, enc: AmNetsEncoder, decisions) -> None:
    """Hard decisions as forward() and stream() give them: bool (B, T), or (B, T, L) per layer."""
    want = "(B, T, num_layers={})".format(enc.num_layers) if enc.per_layer_decisions else "(B, T)"
    if not isinstance(decisions, Tensor) or decisions.dtype != torch.bool:
        got = f"{decisions.dtype} tensor" if isinstance(decisions, Tensor) else type(decisions).__name__
        raise ValueError(f"{op}: decisions must be a bool tensor {want}; got a {got}")
    if (decisions.dim() != 3 or decisions.shape[2] != enc.num_layers) if enc.per_layer_decisions \
            else decisions.dim() != 2:
        raise ValueError(f"{op}: decisions must be a bool tensor {want}; got shape {tuple(decisions.shape)}")


def _check_init(input_size, hidden_size, num_layers, cheap, sparsity, block_size, rank, arbitrator_hidden,
                arbitrator_uses_state, per_layer_decisions, init_p_full, tau, threshold, force):
    op = "AmNetsEncoder"
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                        ("block_size", block_size), ("rank", rank), ("arbitrator_hidden", arbitrator_hidden)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{op}: {name} must be an int >= 1; got {value!r}")
    if cheap not in CHEAP_KINDS:
        raise ValueError(f"{op}: cheap must be one of {CHEAP_KINDS}; got {cheap!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{op}: sparsity must be a float in [0, 1); got {sparsity!r}")
    for name, value in (("arbitrator_uses_state", arbitrator_uses_state), ("per_layer_decisions", per_layer_decisions)):
        if not isinstance(value, bool):  # a string such as "no" would be truthy
            raise ValueError(f"{op}: {name} must be a bool; got {value!r}")
    if isinstance(init_p_full, bool) or not isinstance(init_p_full, numbers.Real) or not 0.0 < init_p_full < 1.0:
        raise ValueError(f"{op}: init_p_full must be in (0, 1) (its logit initialises the arbitrator); "
                         f"got {init_p_full!r}")
    _threshold(op, threshold)
    _check_tau(op, tau)
    _check_force_kind(op, force)


def _check_weights_like(op: str, enc: AmNetsEncoder, x: Tensor, autocast_ok: bool = False) -> None:
    """x on the weights' device in their dtype; autocast_ok: any float dtype while torch.autocast is on for
    that device (the training path's products cast as autocast says; the streaming engine does not)."""
    weights = enc.weight_ih_l0
    allowed = _input_dtypes(x.device.type, weights.dtype) if autocast_ok else {weights.dtype}
    if x.device != weights.device or x.dtype not in allowed:
        also = sorted(str(d) for d in allowed - {weights.dtype})
        under = f" (under torch.autocast x may also be {' or '.join(also)})" if also else ""
        raise ValueError(f"{op}: x is {x.dtype} on {x.device} but the encoder's weights are {weights.dtype} on "
                         f"{weights.device}{under}; pass x.to({weights.dtype}) on that device (or convert the "
                         "encoder with .to())")


def _check_input(op: str, enc: AmNetsEncoder, x) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"{op}: x must be a (B, T, input_size) tensor; got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if x.shape[2] != enc.input_size:
        raise ValueError(f"{op}: x has feature dim {x.shape[2]}; the encoder expects "
                         f"input_size={enc.input_size}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be floating point; got {x.dtype}")
    _check_strided(op, "x", x)


def _check_strided(op: str, name: str, t: Tensor) -> None:
    # A sparse or mkldnn tensor has the right shape and dtype but no strided storage to read.
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor; got layout {t.layout}")


def _check_forward(enc: AmNetsEncoder, x, lengths) -> Tensor:
    op = "AmNetsEncoder.forward"
    _check_input(op, enc, x)
    _check_weights_like(op, enc, x, autocast_ok=True)
    _check_tau(op, enc.tau)
    _check_force_kind(op, enc.force)  # attributes a caller may set after construction
    _threshold(op, enc.threshold)
    B, T, _ = x.shape
    if T == 0:
        raise ValueError(f"{op}: x must have at least one frame (as nn.LSTM); got shape {tuple(x.shape)} "
                         "(stream() takes an empty chunk)")
    if lengths is None:
        return torch.full((B,), T, dtype=torch.long, device=x.device)
    if not _is_index(lengths) or lengths.shape != (B,):
        got = f"a {lengths.dtype} tensor of shape {tuple(lengths.shape)}" if isinstance(lengths, Tensor) \
            else type(lengths).__name__
        raise ValueError(f"{op}: lengths must be an integer tensor of shape (B,) = ({B},); got {got}")
    if B and (int(lengths.min()) < 0 or int(lengths.max()) > T):
        raise ValueError(f"{op}: lengths must lie in [0, T={T}]; got {lengths.tolist()}")
    return lengths


class _Arbitrated:
    """A streamer's force where the arbitrator decided when it was made: it goes on deciding whatever enc.force
    says later (None would read enc.force at every call), as an engine's streamer fixes its settings when made."""

    def __reduce__(self):
        return "_ARBITRATED"  # pickled by name: the one instance


_ARBITRATED = _Arbitrated()


def _force_argument(force):
    """_check_stream's force (None, a bool, a (B,) bool tensor) as an argument it takes again, fixed: None is
    _ARBITRATED."""
    return ("full" if force else "cheap") if isinstance(force, bool) else _ARBITRATED if force is None else force


def _unpickled_streamer(encoder: AmNetsEncoder, batch: int, threshold: float, force, state) -> Streamer:
    streamer = Streamer(encoder, batch, threshold, force)
    streamer.state = state
    return streamer


def _check_stream(enc: AmNetsEncoder, x, state, force, threshold):
    """-> (state, force, threshold); force as None (the arbitrator decides), a bool (every row takes the
    full branch, or none does) or a bool tensor (B,) with both values."""
    op = "AmNetsEncoder.stream"
    _check_input(op, enc, x)
    _check_weights_like(op, enc, x)
    B = x.shape[0]
    shape = (enc.num_layers, B, enc.hidden_size)
    if state is None:
        zeros = x.new_zeros(shape)
        state = (zeros, zeros)
    elif not (isinstance(state, (tuple, list)) and len(state) == 2
              and all(isinstance(s, Tensor) and tuple(s.shape) == shape for s in state)):
        raise ValueError(f"{op}: state must be (h, c), each of shape (num_layers, B, H) = {shape}")
    for name, s in zip(("h", "c"), state):
        _check_strided(op, f"state's {name}", s)
        if s.dtype != x.dtype or s.device != x.device:
            raise TypeError(f"{op}: state's {name} must be {x.dtype} on {x.device}, as x and the weights; got "
                            f"{s.dtype} on {s.device}")
    threshold = _threshold(op, enc.threshold if threshold is None else threshold)
    if force is _ARBITRATED:
        force = None
    elif force is None:
        force = enc.force
    if isinstance(force, str):
        if force not in ("full", "cheap"):
            raise ValueError(f"{op}: force must be None, 'full', 'cheap' or a bool tensor (B,); "
                             f"got {force!r}")
        return state, force == "full", threshold
    if force is not None:
        if (not isinstance(force, Tensor) or force.dtype != torch.bool or tuple(force.shape) != (B,)
                or force.is_meta):
            got = ("a meta tensor (no data)" if isinstance(force, Tensor) and force.is_meta else
                   f"a {force.dtype} tensor of shape {tuple(force.shape)}" if isinstance(force, Tensor) else
                   type(force).__name__)
            raise ValueError(f"{op}: force must be None, 'full', 'cheap' or a bool tensor of shape ({B},); "
                             f"got {got}")
        force = _uniform(force.to(x.device))
    return state, force, threshold
