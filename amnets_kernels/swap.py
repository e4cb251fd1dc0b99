"""swap_in: put the amnets kernels into an existing model, in place."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from .nn import BlockSparseLinear, LowRankLSTM, RNNTLoss


@dataclass
class SwapReport:
    """What swap_in replaced: one entry per module, with parameters and multiply-adds per frame (row)."""

    replaced: list[dict] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(r["params_before"] for r in self.replaced)

    @property
    def params_after(self) -> int:
        return sum(r["params_after"] for r in self.replaced)

    @property
    def macs_before(self) -> int:
        return sum(r["macs_before"] for r in self.replaced)

    @property
    def macs_after(self) -> int:
        return sum(r["macs_after"] for r in self.replaced)

    def __str__(self) -> str:
        lines = [f"{'module':32s} {'from':>10s} -> {'to':20s} {'params':>21s} {'MACs/frame':>21s}"]
        for r in self.replaced:
            lines.append(f"{r['name'] or '(root)':32s} {r['from']:>10s} -> {r['to']:20s} "
                         f"{r['params_before']:>9,d} -> {r['params_after']:<9,d} "
                         f"{r['macs_before']:>9,d} -> {r['macs_after']:<9,d}")
        lines.append(f"{'total':32s} {'':>10s}    {'':20s} {self.params_before:>9,d} -> {self.params_after:<9,d} "
                     f"{self.macs_before:>9,d} -> {self.macs_after:<9,d}")
        return "\n".join(lines)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _macs(module: nn.Module) -> int:
    """Multiply-adds per frame (LSTM) or per row (Linear); losses count 0."""
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    if isinstance(module, BlockSparseLinear):
        return module.values.numel()
    if isinstance(module, nn.LSTM):
        h = module.hidden_size
        return sum(4 * h * ((module.input_size if layer == 0 else h) + h) for layer in range(module.num_layers))
    if isinstance(module, LowRankLSTM):
        return module.macs_per_frame()
    return 0


def _is_torchaudio_rnnt_loss(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "RNNTLoss" and cls.__module__.startswith("torchaudio")


def swap_in(model: nn.Module, lstm_rank: int | float | None = None, linear_sparsity: float | None = None,
            block_size: int = 32, loss: bool = True, include=None, exclude=None, return_report: bool = False):
    """Replace, in place, nn.LSTM by LowRankLSTM.from_lstm (when lstm_rank is set: an int rank, or a
    float in (0, 1] = fraction of spectral energy kept), nn.Linear by BlockSparseLinear.from_dense (when
    linear_sparsity is set; a Linear pruned with torch.nn.utils.prune keeps its own mask), and
    torchaudio's RNNTLoss by ours (when loss). include / exclude: fnmatch patterns (or lists of them)
    on module names as named_modules() gives them ("" is the model itself). Returns the model, or
    (model, SwapReport) with return_report. Full rank and sparsity 0 leave the outputs unchanged.
    """
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else (exclude or [])

    def wanted(name: str) -> bool:
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in exclude)

    def replacement(module: nn.Module):
        if lstm_rank is not None and type(module) is nn.LSTM:
            return LowRankLSTM.from_lstm(module, lstm_rank)
        if linear_sparsity is not None and type(module) is nn.Linear:
            return BlockSparseLinear.from_dense(module, block_size=block_size, sparsity=linear_sparsity)
        if loss and _is_torchaudio_rnnt_loss(module):
            return RNNTLoss(module.blank, module.clamp, module.reduction, module.fused_log_softmax)
        return None

    report = SwapReport()
    plans = [(name, module, new) for name, module in model.named_modules()
             if wanted(name) and (new := replacement(module)) is not None]
    for name, old, new in plans:
        new.train(old.training)
        if name == "":
            model = new
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
        report.replaced.append(dict(name=name, **{"from": type(old).__name__, "to": type(new).__name__},
                                    params_before=_params(old), params_after=_params(new),
                                    macs_before=_macs(old), macs_after=_macs(new)))
    return (model, report) if return_report else model
