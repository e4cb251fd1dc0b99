"""BlockSparseLinear / BlockSparseLSTM: nn.Linear / nn.LSTM with block-sparse weights (the pruned AmNets branch)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .. import _backend, _validate
from .._ops import _is_wrapped, eager_inference
from .._ops import functorch
from .._ops.bsr import _FAST_BLOCKS, _FAST_DTYPES, PreparedBsrLstmCell, _fused_cell, bsr_linear, say_if_slow
from .._ops.lstm_update import lstm_pointwise
from .._weights import weights_changed
from ..formats import BlockSparseMatrix, bsr_to_dense
from .cost import warn_if_not_cheaper
from .resize import resize_to_saved
from .stacked_lstm import (StackedLSTM, combined_bias, copy_into, lstm_config_of, own_tensors, parameter_from,
                           reset_projection)


@torch.no_grad()
def _redraw_blocks(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape: tuple[int, int],
                   bound: float) -> None:
    """The stored blocks of a `shape` matrix drawn anew in place from uniform(-bound, bound), the pattern kept
    and entries past the shape zero, as pruning a dense draw leaves them (reset_parameters). A module on meta
    has no pattern to keep: nothing to draw."""
    if values.device.type == "meta":
        return
    kept = BlockSparseMatrix(values, crow, col, shape).block_mask()
    dense = torch.empty(shape, device=values.device, dtype=values.dtype).uniform_(-bound, bound)
    values.copy_(BlockSparseMatrix.from_dense(dense, block_size=values.shape[-1], mask=kept).values)


def _narrower(prefix: str, name: str, last: int, cols: int, b: int) -> str | None:
    """A tensor-only checkpoint (safetensors: no extra state naming its shape) whose pattern leaves this layer's last
    block column empty: most likely a layer with fewer inputs, whose weights would meet the wrong inputs here (a
    silent wrong answer), so it is refused, with the way to load it if it really is this layer's."""
    if last >= cols - 1:
        return None
    return (f"size mismatch for {prefix}{name}: a checkpoint without _extra_state whose blocks stop at block column "
            f"{last}, where this layer has {cols} of {b}: it looks like a layer with fewer inputs. If it is this "
            f"layer's (its last block column pruned away), load it with state_dict['{prefix}_extra_state'] = "
            f"module.get_extra_state(), its block_size set to the checkpoint's ({b})")


class BlockSparseLinear(nn.Module):
    """y = x @ W^T + bias with W kept as b x b blocks; only the stored blocks are parameters.

    Parameters: `values` (nnzb, b, b) and `bias`; buffers: `crow_indices`, `col_indices` (the pattern,
    fixed after construction). `sparse_weight` is a BlockSparseMatrix view over them.
    """

    def __init__(self, in_features: int, out_features: int, block_size: int = 32, sparsity: float = 0.75,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            _validate._int("BlockSparseLinear", name, size, 1)
        # nn.Linear's initialisation, then magnitude block pruning.
        dense = torch.empty(out_features, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        self._adopt(BlockSparseMatrix.from_dense(dense, block_size=block_size, sparsity=sparsity))
        if bias:
            bound = 1 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def _adopt(self, matrix: BlockSparseMatrix, requires_grad: bool = True) -> None:
        self.in_features, self.out_features = matrix.shape[1], matrix.shape[0]
        self.block_size = matrix.block_size
        self.values = nn.Parameter(matrix.values.detach().clone(), requires_grad=requires_grad)
        self.register_buffer("crow_indices", matrix.crow_indices.clone())
        self.register_buffer("col_indices", matrix.col_indices.clone())
        warn_if_not_cheaper(self, self.values.numel(), self.in_features * self.out_features, matrix.nnzb)

    @classmethod
    def from_dense(cls, linear: nn.Linear, block_size: int = 32, sparsity: float | None = 0.75,
                   mask: torch.Tensor | None = None) -> BlockSparseLinear:
        """Prune an nn.Linear: keep its largest-norm blocks (or those of `mask`, a block mask or the
        element mask torch.nn.utils.prune leaves as `weight_mask`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"BlockSparseLinear.from_dense: linear must be an nn.Linear; got {type(linear).__name__}")
        if mask is not None:
            sparsity = None
        elif hasattr(linear, "weight_mask"):  # torch.nn.utils.prune was applied: honour its mask
            mask, sparsity = linear.weight_mask, None
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._adopt(BlockSparseMatrix.from_dense(linear.weight.detach(), block_size=block_size, sparsity=sparsity,
                                                   mask=mask), linear.weight.requires_grad)
        module.bias = None if linear.bias is None else parameter_from(linear.bias.detach().clone(), linear.bias)
        return module

    @classmethod
    def from_torch_bsr(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       shape: tuple[int, int] | None = None) -> BlockSparseLinear:
        """From a torch.sparse_bsr weight (optionally cropped to a logical `shape`)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._adopt(BlockSparseMatrix.from_torch_bsr(weight, shape))
        if bias is not None:  # checked here, not at the first forward
            op = "BlockSparseLinear.from_torch_bsr"
            _validate._tensor(op, "bias", bias, ndim=1)
            _validate._shape(op, "bias", bias, (module.out_features,), "(out_features,) = ")
            _validate._same_device_and_dtype(op, "weight", {"weight": module.values, "bias": bias})
        module.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        return module

    def reset_parameters(self) -> None:
        """As nn.Linear.reset_parameters: the kept blocks and the bias drawn anew in place at nn.Linear's scale,
        uniform(-1/sqrt(in_features), 1/sqrt(in_features)); the pattern is kept."""
        bound = 1.0 / math.sqrt(self.in_features)
        _redraw_blocks(self.values, self.crow_indices, self.col_indices, (self.out_features, self.in_features),
                       bound)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)
        weights_changed()  # inference tensors redrawn in place bump no version

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "weight":  # code written for nn.Linear reaching for its dense weight
                raise AttributeError(
                    "BlockSparseLinear has no 'weight': nn.Linear's dense weight is not kept here (values, "
                    "crow_indices and col_indices hold the kept blocks); .sparse_weight gives them as a "
                    "BlockSparseMatrix, to_dense() the equivalent nn.Linear") from None
            raise

    @property
    def sparse_weight(self) -> BlockSparseMatrix:
        return BlockSparseMatrix(self.values, self.crow_indices, self.col_indices,
                                 (self.out_features, self.in_features))

    @property
    def density(self) -> float:
        return self.sparse_weight.density

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):  # as nn.Linear: torch.ops would raise a RuntimeError of its own
            raise TypeError(f"BlockSparseLinear: x must be a torch.Tensor; got {type(x).__name__}")
        # Read from the module's dicts, not through nn.Module.__getattr__ (~0.5 us each: a third of a small
        # layer's call); through it where prune or a parametrization computes one on access.
        params, buffers = self._parameters, self._buffers
        values = params["values"] if "values" in params else self.values
        bias = params["bias"] if "bias" in params else self.bias
        if values.dtype not in _FAST_DTYPES or values.shape[-1] not in _FAST_BLOCKS:  # no fast kernel somewhere
            say_if_slow(x, values)  # (on x's face: said once)
        op = functorch.bsr_linear if functorch.active() else torch.ops.amnets.bsr_linear
        return op(x, values, buffers["crow_indices"] if "crow_indices" in buffers else self.crow_indices,
                  buffers["col_indices"] if "col_indices" in buffers else self.col_indices, self.out_features,
                  self.in_features, bias)

    def get_extra_state(self):
        return {"shape": (self.out_features, self.in_features), "block_size": self.block_size}

    def set_extra_state(self, state):
        self.out_features, self.in_features = state["shape"]
        self.block_size = state["block_size"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        # Another pattern or block size loads (the saved pattern replaces ours); another layer shape is a
        # size mismatch, as for nn.Linear, and nothing of this module changes. Checkpoints name their shape
        # in the extra state; a tensor-only one (safetensors) must fit by its tensors, checked before
        # anything changes.
        saved = state_dict.get(prefix + "_extra_state")
        if saved is not None and tuple(saved["shape"]) != (self.out_features, self.in_features):
            where = prefix.rstrip(".") or type(self).__name__
            error_msgs.append(f"size mismatch for {where}: a checkpoint of a {tuple(saved['shape'])} (out, in) "
                              f"BlockSparseLinear cannot load into this {(self.out_features, self.in_features)} one")
            return
        misfit = self._misfit(state_dict, prefix, tensor_only=saved is None)
        if misfit is not None:
            error_msgs.append(misfit)
            return
        values = state_dict.get(prefix + "values")
        if values is not None:
            self.block_size = values.shape[-1]  # a tensor-only checkpoint says its block size only there
        resize_to_saved(self, state_dict, prefix, ("values", "crow_indices", "col_indices"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs)
        weights_changed()  # loaded in place: inference tensors (loaded under inference_mode) bump no version

    def _misfit(self, state_dict, prefix: str, tensor_only: bool) -> str | None:
        """Why the saved pattern (with ours where a tensor is not saved) is not one of this layer's, or None:
        square blocks, a row of blocks per b output rows, columns within the blocks of in_features, one
        column index per block, a bias of out_features; and for a tensor-only checkpoint, whose shape is unknown,
        a block in the last block column (_narrower)."""
        get = lambda name: state_dict.get(prefix + name, getattr(self, name))  # noqa: E731
        values, crow, col, bias = get("values"), get("crow_indices"), get("col_indices"), get("bias")
        ours = f"this BlockSparseLinear is {(self.out_features, self.in_features)} (out, in)"
        if values.dim() != 3 or values.shape[1] != values.shape[2]:
            return (f"size mismatch for {prefix}values: the checkpoint's must be (nnzb, b, b) square blocks; "
                    f"got {tuple(values.shape)}")
        b = values.shape[-1]
        rows, cols = -(-self.out_features // b), -(-self.in_features // b)
        last = int(col.max()) if col.numel() and not col.is_meta else -1  # (meta: a module built to be assigned)
        if crow.numel() != rows + 1 or col.numel() != values.shape[0] or last >= cols:
            return (f"size mismatch for {prefix}crow_indices/col_indices: the checkpoint's pattern ({values.shape[0]} "
                    f"blocks of {b}, {crow.numel() - 1} block rows, {col.numel()} column indices up to {last}) "
                    f"does not fit: {ours}, {rows} block rows and {cols} block columns of {b}")
        if bias is not None and self.bias is not None and tuple(bias.shape) != (self.out_features,):
            return f"size mismatch for {prefix}bias: the checkpoint's is {tuple(bias.shape)}; {ours}"
        if tensor_only and prefix + "col_indices" in state_dict:
            return _narrower(prefix, "col_indices", last, cols, b)
        return None

    def macs_per_frame(self) -> int:
        """Multiply-adds per row as the kernel runs them: every stored block entry, padding included."""
        return self.values.numel()

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with the pruned weight (zeros where no block is stored)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        copy_into(linear.weight, self.sparse_weight.to_dense(), self.values)
        if self.bias is not None:
            copy_into(linear.bias, self.bias, self.bias)
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"density={self.density:.3f}, bias={self.bias is not None}")


_sequence = torch.ops.amnets_native.bsr_lstm_sequence_forward.default
_stack = torch.ops.amnets_native.bsr_lstm_stack_step.default
# The native projection (proj_size) of bf16 weights runs on vdpbf16ps: AVX512-BF16 (csrc/cpu/bsr.cpp).
_BF16_PROJECTION = {"avx512bf16", "avx512bw"} <= set(_backend._C.build_info().get("cpu_features", []))


class BlockSparseLSTM(StackedLSTM):
    """nn.LSTM whose every direction's [W_ih | W_hh] (4H, D + R) is kept as b x b blocks (magnitude block
    pruning), as the AmNets encoder's sparse branch; R = proj_size or H. The forward contract is nn.LSTM's
    (layouts, hx, bidirectional, dropout between layers, proj_size).

    Eager inference on the cpu face (block 16/32/64, fp32/bf16 weights) runs each direction as one native
    call: the input part of every step in one product over the whole sequence, then the recurrence
    (W_ih and W_hh blocks split once per pattern and values version), and a frame a call through a
    unidirectional stack one native call for every layer. Otherwise (autograd, another face) each step is one
    PreparedBsrLstmCell call: bsr_linear on [x | h] and the PyTorch LSTM update.
    `last_path` says which ran last ("native sequence", "fused step" for one frame, or "steps"). Per
    direction (tag l{layer} or l{layer}_reverse): parameter values{tag} (nnzb, b, b), buffers crow_indices{tag} / col_indices{tag}, parameter bias{tag}
    (4H,) (nn.LSTM's two biases summed) and, with proj_size P, parameter w_hr{tag} (P, H), kept dense as
    LowRankLSTM keeps it: the native calls project h after each update (bf16 weights: where the CPU has
    AVX512-BF16), and the steps are bsr_linear on [x | h], the LSTM update and h W_hr^T.
    """

    _PER_DIRECTION = ("values", "crow_indices", "col_indices", "bias")

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 block_size: int = 32, sparsity: float = 0.75, proj_size: int = 0, device=None, dtype=None):
        super().__init__()
        # nn.LSTM's initialisation (and its checks of the sizes), then magnitude block pruning.
        self._prune(nn.LSTM(input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
                            dropout=dropout, bidirectional=bidirectional, proj_size=proj_size, device=device,
                            dtype=dtype),
                    sparsity, block_size)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, sparsity: float = 0.75, block_size: int = 32) -> BlockSparseLSTM:
        """Prune every direction of an nn.LSTM: keep the largest-norm blocks of [W_ih | W_hh]. Sparsity 0
        reproduces it (to float32 rounding)."""
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"BlockSparseLSTM.from_lstm: lstm must be an nn.LSTM; got {type(lstm).__name__}")
        module = cls.__new__(cls)
        StackedLSTM.__init__(module)
        module._prune(lstm, sparsity, block_size)
        module.train(lstm.training)
        return module

    def _prune(self, lstm: nn.LSTM, sparsity: float, block_size: int) -> None:
        self._configure(**lstm_config_of(lstm))
        self.block_size, self._steps, self._splits, self.last_path = block_size, {}, {}, None
        for _, layer, suffix, _ in self.directions():
            tag = f"_l{layer}{suffix}"
            w_ih, w_hh = getattr(lstm, f"weight_ih{tag}"), getattr(lstm, f"weight_hh{tag}")
            m = BlockSparseMatrix.from_dense(torch.cat([w_ih, w_hh], dim=1).detach(), block_size=block_size,
                                             sparsity=sparsity)
            self.register_parameter(f"values{tag}", parameter_from(m.values.clone(), w_ih, w_hh))
            self.register_buffer(f"crow_indices{tag}", m.crow_indices.clone())
            self.register_buffer(f"col_indices{tag}", m.col_indices.clone())
            self.register_parameter(f"bias{tag}", combined_bias(lstm, tag))
            if lstm.proj_size:
                w_hr = getattr(lstm, f"weight_hr{tag}")
                self.register_parameter(f"w_hr{tag}", parameter_from(w_hr.detach().clone(), w_hr))
        kept = min(getattr(self, f"values_l{layer}{suffix}").shape[0] for _, layer, suffix, _ in self.directions())
        warn_if_not_cheaper(self, self.macs_per_frame(), self.dense_macs_per_frame(), kept)

    def _pattern(self, k: int):
        return self._direction_tensors(k)

    @property
    def _rec(self) -> int:
        """The width of h as the recurrence reads it: proj_size or hidden_size."""
        return self.proj_size or self.hidden_size

    def _shape(self, d: int) -> tuple[int, int]:
        """[W_ih | W_hh] of a direction whose input is d wide."""
        return 4 * self.hidden_size, d + self._rec

    def _sources(self, k: int, track_values: bool) -> list[tuple]:
        """Where direction k's values, pattern and bias live, as _C.SourcesSnapshot entries (dict, key[, track
        version]): a cache built from them is stale once any is replaced, re-pointed (`.data = ...`, .to()) or,
        where tracked, written in place. The pattern is always tracked; the values and bias only for a cache
        that copies them (which then needs no bias)."""
        tag = f"_l{k // self.num_directions}{'_reverse' if k % self.num_directions else ''}"
        entries = [(self._parameters, f"values{tag}", track_values), (self._buffers, f"crow_indices{tag}"),
                   (self._buffers, f"col_indices{tag}")]
        return entries + [(self._parameters, f"bias{tag}", track_values)] if not track_values else entries

    def _cached(self, cache: dict, k: int, track_values: bool, build):
        """cache[k]'s value while its snapshot matches (one native check, ~0.2 us), else build() cached anew.
        Built per call, not cached, when a source is not in the module's own dicts or is a functorch wrapper
        (torch.func.vmap over stacked weights). Inference tensors (a model loaded under torch.inference_mode(),
        as servers load them) are cached: they have no version, so an in-place edit of one (possible only inside
        inference mode) needs ak.weights_changed(), as a .data write does; rebuilding every call made such a
        model 2-3x slower than the dense LSTM it replaced."""
        hit = cache.get(k)
        if hit is not None and hit[0].matches():
            return hit[1]
        sources = self._sources(k, track_values)
        if not all(name in d for d, name, *_ in sources):
            # Not a plain parameter or buffer (torch.nn.utils.prune, a parametrization, weight_norm: values
            # computed anew on each access or forward): nothing stable to watch, built from what is there now.
            return build(*(getattr(self, name) for _, name, *_ in sources))
        value = build(*(d[name] for d, name, *_ in sources))
        if not any(t is not None and _is_wrapped(t) for d, name, *_ in sources for t in (d[name],)):
            cache[k] = (_backend._C.SourcesSnapshot(sources), value)
        return value

    def _step(self, k: int, d: int) -> PreparedBsrLstmCell:
        """Direction k's prepared step, rebuilt when its tensors are replaced (.to(), a new pattern loaded)
        or its pattern changes in place; values updated in place (an optimizer step) are followed."""
        return self._cached(self._steps, k, False, lambda values, crow, col, b: PreparedBsrLstmCell(
            BlockSparseMatrix(values, crow, col, self._shape(d)), b))

    def _split(self, k: int, d: int) -> tuple[BlockSparseMatrix, BlockSparseMatrix]:
        """Direction k's kept blocks as W_ih (4H, D) and W_hh (4H, R) (re-blocked where D is not a multiple
        of b), rebuilt when the pattern or the values change (in place too: an optimizer step)."""
        def build(values, crow, col):
            with torch.no_grad():
                whole = BlockSparseMatrix(values, crow, col, self._shape(d))
                b = self.block_size
                kept = whole.block_mask().repeat_interleave(b, 0).repeat_interleave(b, 1)[: whole.shape[0], : whole.shape[1]]
                dense = whole.to_dense()
                return tuple(BlockSparseMatrix.from_dense(dense[:, cols], block_size=b, mask=kept[:, cols])
                             for cols in (slice(0, d), slice(d, None)))
        return self._cached(self._splits, k, True, build)

    def _stack_step(self, x, hx):
        if self.proj_size:
            return self._projected_stack_step(x, hx)
        steps = [self._step(k, d) for k, _, _, d in self._directions]  # (each checks its weight, once per version)
        if not all(step._fast for step in steps) or _backend.resolve("bsr_linear", x.device).name != "cpu":
            return None
        blocks, biases = [], []
        for step in steps:
            linear = step.linear
            blocks += (linear.values, linear.crow_indices, linear.col_indices)
            biases.append(linear.bias)
        stepped = self._native_stack(_stack, x, hx, blocks, biases, blocks[::3])
        if stepped is not None:
            self._took("fused step")
        return stepped

    def _projected_stack_step(self, x, hx):
        """_stack_step with proj_size: four tensors a layer (the blocks and w_hr), checked by the op (a prepared
        step's cell reads an h H wide)."""
        if _backend.resolve("bsr_linear", x.device).name != "cpu":
            return None
        blocks, biases = [], []
        for k, *_ in self._directions:
            values, crow, col, bias = self._pattern(k)
            if values.shape[-1] not in _FAST_BLOCKS or values.dtype not in _FAST_DTYPES:
                return None
            blocks += (values, crow, col, self._w_hr(k))
            biases.append(bias)
        stepped = self._native_stack(_stack, x, hx, blocks, biases, blocks[::4] + blocks[3::4])
        if stepped is not None:
            self._took("fused step")
        return stepped

    def _w_hr(self, k: int):
        """Direction k's projection w_hr (with proj_size)."""
        layer, reverse = divmod(k, self.num_directions)
        return own_tensors(self, (f"w_hr_l{layer}{'_reverse' if reverse else ''}",))[0]

    _STACK_KIND = "sparse"

    def _stack_entries(self):  # as the prepared steps': the pattern tracked, the values (and w_hr) read as they come
        entries = [entry for k, *_ in self._directions for entry in self._sources(k, False)]
        return entries + [(self._parameters, f"w_hr_l{k}", False) for k in range(self.num_layers) if self.proj_size]

    def _stepped(self):
        self._took("fused step")

    def _run(self, k, x, h0, c0):
        d = self.input_size_of(k)  # x.shape[-1]; a plain int also under torch.jit.trace, where a shape is a tensor
        if self.proj_size:
            return self._run_projected(k, d, x, h0, c0)
        h, c = h0, c0
        if h is None or c is None:
            zeros = x.new_zeros(x.shape[1], self.hidden_size)
            h, c = (zeros if h is None else h), (zeros if c is None else c)
        if torch.compiler.is_compiling():  # traced: the public op a step (the prepared steps' caches, face and
            values, crow, col, bias = self._pattern(k)  # mode checks are eager-only)
            weight = BlockSparseMatrix(values, crow, col, self._shape(d))
            out = []
            for x_t in x:
                h, c = lstm_pointwise(bsr_linear(torch.cat([x_t, h], dim=1), weight, bias), c)
                out.append(h)
            return torch.stack(out), h, c
        step = self._step(k, d)
        values, bias = step.linear.values, step.linear.bias  # the module's own tensors (the step's snapshot matched)
        if step._fast and _backend.resolve("bsr_linear", x.device).name == "cpu" \
                and eager_inference(x, h, c, values, bias):
            if x.shape[0] == 1:  # a frame a call (streaming): the fused step on the module's own blocks, no split
                self._took("fused step")  # copy to build or follow; 1.8x the one-step sequence at H=192 b=32
                h, c = _fused_cell(x[0], h, c, values, step.linear.crow_indices, step.linear.col_indices, bias)
                return h[None], h, c
            w_ih, w_hh = self._split(k, d)
            self._took("native sequence")
            return _sequence(x.contiguous(), h, c, w_ih.values, w_ih.crow_indices, w_ih.col_indices, w_hh.values,
                             w_hh.crow_indices, w_hh.col_indices, bias)
        self._took("steps")
        out = []
        for x_t in x:
            h, c = step(x_t, h, c)
            out.append(h)
        return torch.stack(out), h, c

    def _run_projected(self, k, d, x, h0, c0):
        """_run with proj_size P. In eager inference on the cpu face with fast blocks: the native sequence with
        the projection. Otherwise a step at a time: gates = [x | h] W^T + bias by bsr_linear (h P wide), the
        LSTM update, then h = h W_hr^T."""
        w_hr = self._w_hr(k)
        values, crow, col, bias = self._pattern(k)
        batch = x.shape[1]
        h = h0 if h0 is not None else x.new_zeros(batch, self.proj_size)
        c = c0 if c0 is not None else x.new_zeros(batch, self.hidden_size)
        if (values.shape[-1] in _FAST_BLOCKS and values.dtype in _FAST_DTYPES
                and (values.dtype == torch.float32 or _BF16_PROJECTION) and eager_inference(x, h, c, values, bias, w_hr)
                and _backend.resolve("bsr_linear", x.device).name == "cpu"):
            w_ih, w_hh = self._split(k, d)
            self._took("native sequence")
            return _sequence(x.contiguous(), h, c, w_ih.values, w_ih.crow_indices, w_ih.col_indices, w_hh.values,
                             w_hh.crow_indices, w_hh.col_indices, bias, w_hr)
        self._took("steps")
        out = []
        weight = BlockSparseMatrix(values, crow, col, self._shape(d))
        for x_t in x:
            h, c = lstm_pointwise(bsr_linear(torch.cat([x_t, h], dim=1), weight, bias), c)
            h = F.linear(h, w_hr)
            out.append(h)
        return torch.stack(out), h, c

    def _took(self, path: str) -> None:
        if self.last_path != path:  # written only on a change: nn.Module.__setattr__ costs ~2 us a call
            self.last_path = path

    def _dense_weights(self, k):
        values, crow, col, b = self._pattern(k)
        in_size = self.input_size_of(k)
        w = bsr_to_dense(values, crow, col, self._shape(in_size))
        return w[:, :in_size], w[:, in_size:], b, self._w_hr(k) if self.proj_size else None

    def reset_parameters(self) -> None:
        """As nn.LSTM.reset_parameters: every direction's kept blocks drawn anew in place from nn.LSTM's
        uniform(-1/sqrt(H), 1/sqrt(H)), the pattern kept; its one bias as nn.LSTM's two summed (each from that
        uniform); a projection as nn.LSTM draws it."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for k, layer, suffix, d in self._directions:
            values, crow, col, bias = self._pattern(k)
            _redraw_blocks(values, crow, col, self._shape(d), bound)
            if bias is not None:
                with torch.no_grad():
                    bias.copy_(torch.empty_like(bias).uniform_(-bound, bound) + torch.empty_like(bias).uniform_(
                        -bound, bound))
            if self.proj_size:
                reset_projection(self, f"_l{layer}{suffix}", self.hidden_size)
        weights_changed()  # inference tensors redrawn in place bump no version: the split weights' cache

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        # Another pattern or block size loads; another hidden or input size is a size mismatch, as for
        # nn.LSTM, and nothing of this module changes. Checkpoints name their sizes in the extra state; for
        # older ones each direction's crow_indices must have a row of blocks per b gate rows and its
        # col_indices stay within the blocks of [x | h].
        saved = state_dict.get(prefix + "_extra_state")
        if saved is not None:
            b = saved["block_size"]
        else:  # a tensor-only checkpoint (safetensors) says its block size only in its values' shape
            blocks = {tuple(v.shape[1:]) for v in (state_dict.get(f"{prefix}values_l{layer}{suffix}")
                                                   for _, layer, suffix, _ in self.directions()) if v is not None}
            if len(blocks) > 1 or any(len(s) != 2 or s[0] != s[1] for s in blocks):
                error_msgs.append(f"size mismatch for {prefix}values: the checkpoint's must be (nnzb, b, b) square "
                                  f"blocks of one size b in every direction; got blocks {sorted(blocks)}")
                return
            b = blocks.pop()[0] if blocks else self.block_size
        sizes = {} if saved is None else {k: saved[k] for k in ("input_size", "hidden_size") if k in saved}
        if "hidden_size" in sizes:  # (checkpoints from before proj_size was taken have none)
            sizes["proj_size"] = saved.get("proj_size", 0)
        ours = {"input_size": self.input_size, "hidden_size": self.hidden_size, "proj_size": self.proj_size}
        if any(sizes[k] != ours[k] for k in sizes):
            where = prefix.rstrip(".") or type(self).__name__
            error_msgs.append(f"size mismatch for {where}: a checkpoint of a BlockSparseLSTM with {sizes} cannot "
                              f"load into this one with {ours}")
            return
        for _, layer, suffix, d in self.directions():
            crow, col = (state_dict.get(f"{prefix}{n}_l{layer}{suffix}") for n in ("crow_indices", "col_indices"))
            if crow is None or col is None:
                continue  # missing keys: reported by the loader
            rows, cols = -(-4 * self.hidden_size // b), -(-(d + self._rec) // b)
            last = int(col.max()) if col.numel() else -1
            if crow.numel() != rows + 1 or last >= cols:
                error_msgs.append(f"size mismatch for {prefix}crow_indices_l{layer}{suffix}/col_indices: the "
                                  f"checkpoint's pattern does not fit this BlockSparseLSTM (hidden_size "
                                  f"{self.hidden_size}, input {d}, block {b}: {rows} block rows, {cols} block "
                                  f"columns; saved {crow.numel() - 1} block rows)")
                return
            values = state_dict.get(f"{prefix}values_l{layer}{suffix}")
            if values is not None and (tuple(values.shape[1:]) != (b, b) or values.shape[0] != col.numel()):
                error_msgs.append(f"size mismatch for {prefix}values_l{layer}{suffix}: the checkpoint's must be "
                                  f"(nnzb, b, b) = ({col.numel()}, {b}, {b}), a block per column index and the "
                                  f"block size {b}; got {tuple(values.shape)}")
                return
            narrower = _narrower(prefix, f"col_indices_l{layer}{suffix}", last, cols, b) if saved is None else None
            if narrower is not None:
                error_msgs.append(narrower)
                return
        names = [f"{n}_l{layer}{suffix}" for _, layer, suffix, _ in self.directions()
                 for n in ("values", "crow_indices", "col_indices")]
        self.block_size = b  # (set again from the extra state, where the checkpoint has one)
        resize_to_saved(self, state_dict, prefix, names)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs)

    def get_extra_state(self):
        return {"block_size": self.block_size, "input_size": self.input_size, "hidden_size": self.hidden_size,
                "proj_size": self.proj_size}

    def __getstate__(self):
        """Pickling (torch.save of the module, copy.deepcopy) leaves the inference caches behind: they hold
        the original's tensors, and the copy rebuilds its own at its first forward."""
        state = dict(super().__getstate__())
        state["_steps"], state["_splits"] = {}, {}
        return state

    def set_extra_state(self, state):
        self.block_size = state["block_size"]

    def macs_per_frame(self, batch: int = 1) -> int:
        """Multiply-adds per frame as the kernels run them: every stored block entry, padding included, and
        the dense projection (proj_size)."""
        return batch * sum(self._pattern(k)[0].numel() + self.proj_size * self.hidden_size
                           for k, _, _, _ in self.directions())

    def density(self) -> float:
        """Stored blocks / all blocks, over every direction."""
        total = sum(-(-4 * self.hidden_size // self.block_size) * -(-(d + self._rec) // self.block_size)
                    for _, _, _, d in self.directions())
        return sum(self._pattern(k)[0].shape[0] for k, _, _, _ in self.directions()) / total

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, block_size={self.block_size}, "
                f"density={self.density():.3f}, " + self._lstm_config())
