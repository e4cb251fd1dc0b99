"""swap_in / unswap: put the amnets kernels into an existing model in place, only where they pay, and take
them out again."""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

from torch import nn

from .nn import BlockSparseLinear, BlockSparseLSTM, LowRankLSTM, LowRankLSTMCell, RNNTLoss
from .nn.cost import NotCheaperWarning, lstm_macs, why_not_cheaper


@dataclass
class SwapReport:
    """What swap_in replaced (one entry per module, with parameters and multiply-adds per frame or row) and
    what it left as it was, with the reason (`skipped`: name, from, reason)."""

    replaced: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

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
        w = max([32] + [len(r["name"]) + 1 for r in self.replaced + self.skipped])  # long dotted names fit
        lines = [f"{'module':{w}s} {'from':>10s} -> {'to':20s} {'params':>21s} {'MACs/frame':>21s}"]
        for r in self.replaced:
            lines.append(f"{r['name'] or '(root)':{w}s} {r['from']:>10s} -> {r['to']:20s} "
                         f"{r['params_before']:>9,d} -> {r['params_after']:<9,d} "
                         f"{r['macs_before']:>9,d} -> {r['macs_after']:<9,d}")
        lines.append(f"{'total':{w}s} {'':>10s}    {'':20s} {self.params_before:>9,d} -> {self.params_after:<9,d} "
                     f"{self.macs_before:>9,d} -> {self.macs_after:<9,d}")
        if self.skipped:
            lines.append(f"kept as they are ({len(self.skipped)}):")
            lines += [f"  {s['name'] or '(root)':{w - 2}s} {s['from']:>10s}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _macs(module: nn.Module) -> int:
    """Multiply-adds per frame (recurrent layers) or per row (Linear) as each module runs them; losses 0."""
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    if isinstance(module, nn.LSTM):
        return lstm_macs(module.input_size, module.hidden_size, module.num_layers, module.bidirectional,
                         module.proj_size)
    if isinstance(module, nn.LSTMCell):
        return 4 * module.hidden_size * (module.input_size + module.hidden_size)
    if isinstance(module, (BlockSparseLinear, BlockSparseLSTM, LowRankLSTM, LowRankLSTMCell)):
        return module.macs_per_frame()
    return 0


def _kept_blocks(module: nn.Module) -> int | None:
    if isinstance(module, BlockSparseLinear):
        return module.values.shape[0]
    if isinstance(module, BlockSparseLSTM):
        return min(module._pattern(k)[0].shape[0] for k, *_ in module.directions())
    return None


def _is_torchaudio_rnnt_loss(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "RNNTLoss" and cls.__module__.startswith("torchaudio")


_RECURRENT = (nn.GRU, nn.RNN, nn.GRUCell, nn.RNNCell)


def _patterns(value) -> list[str] | None:
    return [value] if isinstance(value, str) else (None if value is None else list(value))


def _set_child(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at `name` (the model itself when name is ""); returns the (possibly new) root."""
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


def swap_in(model: nn.Module, lstm_rank: int | float | None = None, linear_sparsity: float | None = None,
            block_size: int = 32, loss: bool = True, include=None, exclude=None, return_report: bool = False,
            lstm_sparsity: float | None = None, min_macs: int = 0, only_if_cheaper: bool = True,
            strict: bool = False):
    """Replace layers of `model` in place by the amnets modules, where that pays:

    - nn.LSTM -> LowRankLSTM.from_lstm (lstm_rank: an int rank, or a float in (0, 1] = fraction of spectral
      energy kept) or BlockSparseLSTM.from_lstm (lstm_sparsity, blocks of block_size; no proj_size);
      nn.LSTMCell -> LowRankLSTMCell (lstm_rank); bidirectional, proj_size and dropout carry over;
    - nn.Linear -> BlockSparseLinear.from_dense (linear_sparsity; a Linear pruned with
      torch.nn.utils.prune keeps its own mask);
    - torchaudio's RNNTLoss -> ours (loss).

    A layer is left as it is, and the report says why, when its replacement would keep no block, when it
    would cost no fewer multiply-adds per frame than the layer (a rank too high, padding to whole blocks;
    only_if_cheaper=False replaces those anyway, with a NotCheaperWarning), when the dense layer has fewer
    than min_macs multiply-adds, or when it has no counterpart here (nn.GRU / nn.RNN, a projected LSTM for
    lstm_sparsity). strict=True raises ValueError instead of leaving a layer for any reason but min_macs.
    include / exclude: fnmatch patterns (or lists) on names as named_modules() gives them ("" is the model
    itself). A model on the meta device is refused (pruning and SVD read the weights). Returns the model,
    or (model, SwapReport) with return_report. Full rank and sparsity 0 (with only_if_cheaper=False) leave
    the outputs unchanged; unswap(model) multiplies the factors / blocks back out into plain modules.
    """
    if lstm_rank is not None and lstm_sparsity is not None:
        raise ValueError("swap_in: give lstm_rank (low-rank LSTMs) or lstm_sparsity (block-sparse LSTMs), not both")
    include, exclude = _patterns(include), _patterns(exclude) or []

    def wanted(name: str) -> bool:
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in exclude)

    lstms = lstm_rank is not None or lstm_sparsity is not None

    def replacement(module: nn.Module):
        """The new module, or a string saying why there is none, or None when the module is not a target."""
        kind = type(module)
        if kind is nn.LSTM and lstms:
            if lstm_rank is not None:
                return lambda: LowRankLSTM.from_lstm(module, lstm_rank)
            if module.proj_size:
                return "a projected LSTM (proj_size) has no block-sparse form here; lstm_rank supports it"
            return lambda: BlockSparseLSTM.from_lstm(module, lstm_sparsity, block_size)
        if kind is nn.LSTMCell and lstms:
            if lstm_rank is not None:
                return lambda: LowRankLSTMCell.from_lstm_cell(module, lstm_rank)
            return "no block-sparse nn.LSTMCell here; lstm_rank gives a LowRankLSTMCell"
        if kind in _RECURRENT and lstms:
            return f"nn.{kind.__name__} has no amnets counterpart (LSTMs only)"
        if kind is nn.Linear and linear_sparsity is not None:
            return lambda: BlockSparseLinear.from_dense(module, block_size=block_size, sparsity=linear_sparsity)
        if loss and _is_torchaudio_rnnt_loss(module):
            return lambda: RNNTLoss(module.blank, module.clamp, module.reduction, module.fused_log_softmax)
        return None

    report, plans, refused = SwapReport(), [], []
    for name, module in model.named_modules():
        if not wanted(name) or (plan := replacement(module)) is None:
            continue
        entry = dict(name=name, **{"from": type(module).__name__})
        if isinstance(plan, str):
            report.skipped.append(dict(entry, reason=plan))
            refused.append(name)
            continue
        if any(p.is_meta for p in module.parameters()):
            raise ValueError(f"swap_in: {name or 'the model'} ({type(module).__name__}) has its weights on the meta "
                             "device; pruning and the SVD read them: materialise the model first (to_empty() "
                             "and load_state_dict, or build it on a real device)")
        if _macs(module) and _macs(module) < min_macs:
            report.skipped.append(dict(entry, reason=f"{_macs(module):,} MACs per frame, below min_macs = {min_macs:,}"))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotCheaperWarning)  # the report (or the warning below) says it
            new = plan()
        reason = why_not_cheaper(_macs(new), _macs(module), _kept_blocks(new)) if _macs(module) else None
        if reason is not None and (only_if_cheaper or _kept_blocks(new) == 0):
            report.skipped.append(dict(entry, reason=f"{type(new).__name__} would not pay: {reason}"))
            refused.append(name)
            continue
        if reason is not None:
            warnings.warn(f"swap_in: {name or 'the model'} -> {type(new).__name__}: {reason} (only_if_cheaper=False)",
                          NotCheaperWarning, stacklevel=2)
        plans.append((name, module, new))
    if strict and refused:
        raise ValueError("swap_in(strict=True): these layers would be left as they are:\n"
                         + "\n".join(f"  {s['name'] or '(root)'} ({s['from']}): {s['reason']}" for s in report.skipped
                                     if s["name"] in refused))
    for name, old, new in plans:
        new.train(old.training)
        model = _set_child(model, name, new)
        report.replaced.append(dict(name=name, **{"from": type(old).__name__, "to": type(new).__name__},
                                    params_before=_params(old), params_after=_params(new),
                                    macs_before=_macs(old), macs_after=_macs(new)))
    return (model, report) if return_report else model


def unswap(model: nn.Module, return_report: bool = False):
    """Undo swap_in, in place: every BlockSparseLinear / LowRankLSTM / BlockSparseLSTM / LowRankLSTMCell
    becomes the plain nn.Linear / nn.LSTM / nn.LSTMCell computing what it computes (factors and kept blocks
    multiplied out), and our RNNTLoss torchaudio's when torchaudio is installed. The result's state_dict
    loads into the original dense model. Returns the model, or (model, SwapReport) with return_report."""
    report = SwapReport()
    plans = []
    for name, module in model.named_modules():
        if isinstance(module, (BlockSparseLinear, BlockSparseLSTM, LowRankLSTM, LowRankLSTMCell)):
            plans.append((name, module, module.to_dense()))
        elif type(module) is RNNTLoss:
            if module.zero_infinity:
                report.skipped.append(dict(name=name, **{"from": "RNNTLoss"},
                                           reason="zero_infinity=True has no torchaudio equivalent"))
                continue
            try:
                from torchaudio.transforms import RNNTLoss as AudioRNNTLoss
            except ImportError:
                report.skipped.append(dict(name=name, **{"from": "RNNTLoss"}, reason="torchaudio is not installed"))
                continue
            plans.append((name, module, AudioRNNTLoss(module.blank, module.clamp, module.reduction,
                                                      module.fused_log_softmax)))
    for name, old, new in plans:
        model = _set_child(model, name, new)
        report.replaced.append(dict(name=name, **{"from": type(old).__name__, "to": type(new).__name__},
                                    params_before=_params(old), params_after=_params(new),
                                    macs_before=_macs(old), macs_after=_macs(new)))
    return (model, report) if return_report else model
