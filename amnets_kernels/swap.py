"""swap_in / unswap: put the amnets kernels into an existing model in place, only where they pay, and take
them out again."""

from __future__ import annotations

import fnmatch
import functools
import numbers
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod

from ._ops.bsr import no_fast_kernel
from .nn import BlockSparseLinear, BlockSparseLSTM, LowRankLSTM, LowRankLSTMCell, RNNTLoss
from .nn.cost import SMALL_LINEAR_MACS, NotCheaperWarning, SmallLayerWarning, lstm_macs, why_not_cheaper


@dataclass
class SwapReport:
    """What swap_in replaced (one entry per module, with parameters and multiply-adds per frame or row) and
    what it left as it was, with the reason (`skipped`: name, from, reason). A module found at more than
    one place in the model has one entry: `name` is its first name, `also` (only then present) the others."""

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
        entries = self.replaced + self.skipped
        w = max([32] + [len(_label(r)) + 1 for r in entries])  # long dotted names fit
        f = max([10] + [len(r["from"]) for r in entries])  # and class names (unswap's are long)
        lines = [f"{'module':{w}s} {'from':>{f}s} -> {'to':20s} {'params':>21s} {'MACs/frame':>21s}"]
        for r in self.replaced:
            lines.append(f"{_label(r):{w}s} {r['from']:>{f}s} -> {r['to']:20s} "
                         f"{r['params_before']:>9,d} -> {r['params_after']:<9,d} "
                         f"{r['macs_before']:>9,d} -> {r['macs_after']:<9,d}")
        lines.append(f"{'total':{w}s} {'':>{f}s}    {'':20s} {self.params_before:>9,d} -> {self.params_after:<9,d} "
                     f"{self.macs_before:>9,d} -> {self.macs_after:<9,d}")
        if self.skipped:
            lines.append(f"kept as they are ({len(self.skipped)}):")
            lines += [f"  {_label(s):{w - 2}s} {s['from']:>{f}s}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def _label(entry: dict) -> str:
    label = entry["name"] or "(root)"
    return f"{label} (also {', '.join(entry['also'])})" if entry.get("also") else label


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
_EXACT = (nn.Linear, nn.LSTM, nn.LSTMCell)

# Parents whose forward reads a Linear child's .weight itself instead of calling the child: a
# BlockSparseLinear there has no weight to read, so those children stay (subclasses too: they inherit that
# forward). nn.TransformerEncoder's fast path reads its first layer's, which this covers.
_READ_BY_PARENT = [
    (nn.TransformerEncoderLayer, ("linear1", "linear2"),
     "reads {}.weight in its fused inference path (eval mode, torch._transformer_encoder_layer_fwd)"),
    (nn.MultiheadAttention, ("out_proj",), "passes {}.weight to the attention function"),
] + ([(nn.LinearCrossEntropyLoss, ("linear",), "passes {}.weight to linear_cross_entropy")]
     if hasattr(nn, "LinearCrossEntropyLoss") else [])


def _read_by_parent(places) -> dict[int, str]:
    """id(child) -> why its parent needs it dense, for each Linear child a _READ_BY_PARENT parent holds."""
    why: dict[int, str] = {}
    for parent, names in places.values():
        for kind, children, reads in _READ_BY_PARENT:
            if isinstance(parent, kind):
                for child in children:
                    if isinstance(parent._modules.get(child), nn.Linear):
                        why.setdefault(id(parent._modules[child]), (
                            f"its parent{' ' + names[0] if names[0] else ''} ({type(parent).__name__}) "
                            f"{reads.format(child)}; a BlockSparseLinear has no dense weight"))
    return why


class _NotATarget(str):
    """Why a module of a target's family is not one (a subclass, an uninitialized lazy module): reported among
    the layers left as they are, but strict=True does not count it (it was never going to be replaced)."""


def _not_exact(module: nn.Module, kind: type) -> _NotATarget:
    only = "swap_in replaces exact nn.Linear / nn.LSTM / nn.LSTMCell only"
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return _NotATarget(f"an uninitialized {kind.__name__} has no weight yet (run a forward first: it then "
                           f"becomes the plain module); {only}")
    base = next(b for b in _EXACT if issubclass(kind, b))
    return _NotATarget(f"{kind.__name__} subclasses nn.{base.__name__}; {only} (a subclass may compute more than "
                       "its base)")


def _no_fast_kernel(weight, block_size: int) -> str | None:
    """Why blocks of this size and dtype would run bsr_linear's exact generic path (slower than the dense
    layer) on the face that would run them, or not run at all (the Triton face's missing sizes), or None."""
    slow = no_fast_kernel(weight.device, block_size, weight.dtype)
    if slow is None:
        return None
    if slow[0] == "triton":
        return f"the triton face has {slow[1]}: the layer could not run there"
    return f"the {slow[0]} face has {slow[1]}; its exact generic path is slower than the dense layer"


def _patterns(name: str, value) -> list[str] | None:
    if value is None or isinstance(value, str):
        return None if value is None else [value]
    expected = f"swap_in: {name} must be a str or an iterable of str (fnmatch patterns), or None"
    try:
        patterns = list(value)
    except TypeError:
        raise TypeError(f"{expected}; got {type(value).__name__}") from None
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{expected}; got a {type(value).__name__} holding {type(p).__name__} {p!r}")
    return patterns


def _number(name: str, value, kind: type, fits, expected: str):
    """`value` as a plain int / float (numpy scalars too), or TypeError / ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"swap_in: {name} must be {expected}; got {type(value).__name__}")
    value = int(value) if kind is numbers.Integral else float(value)
    if not fits(value):
        raise ValueError(f"swap_in: {name} must be {expected}; got {value!r}")
    return value


def _places(model: nn.Module) -> dict[int, tuple[nn.Module, list[str]]]:
    """Every module once, in named_modules() order, with all the names it has (a shared module has several,
    and each of them must get the replacement, or the sharing breaks)."""
    places: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        places.setdefault(id(module), (module, []))[1].append(name)
    return places


def _owners(places) -> dict[int, list[tuple[nn.Module, str]]]:
    """Each parameter's holders: (module, qualified name) — more than one module when weights are tied."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module, names in places.values():
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, f"{names[0]}.{pname}" if names[0] else pname))
    return owners


# The hooks a module object carries: a new module would silently not have them. (prune's forward pre-hook
# is not lost: the replacement is built from the masked weight, and BlockSparseLinear keeps the mask.)
_HOOKS = {"forward pre-hook": "_forward_pre_hooks", "forward hook": "_forward_hooks",
          "backward pre-hook": "_backward_pre_hooks", "backward hook": "_backward_hooks",
          "state_dict hook": "_state_dict_hooks", "state_dict pre-hook": "_state_dict_pre_hooks",
          "load_state_dict pre-hook": "_load_state_dict_pre_hooks",
          "load_state_dict post-hook": "_load_state_dict_post_hooks"}


def _what_would_be_lost(module: nn.Module, owners) -> str | None:
    """Why replacing `module` by a new object would silently drop part of what it does, or None."""
    if parametrize.is_parametrized(module):
        return (f"its {', '.join(module.parametrizations)} is parametrized (torch.nn.utils.parametrize); "
                "a replacement would drop the parametrization")
    hooks = [f"{kind} {getattr(h, '__name__', type(h).__name__)}" for kind, attr in _HOOKS.items()
             for h in getattr(module, attr, {}).values() if not isinstance(h, BasePruningMethod)]
    # Hooks on the parameters themselves (Tensor.register_hook, register_post_accumulate_grad_hook): the new
    # module's parameters are new tensors.
    hooks += [f"a gradient hook on {pname}" for pname, p in module.named_parameters()
              if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)]
    if hooks:
        return f"it has {', '.join(hooks)}; a replacement would drop them"
    if "forward" in module.__dict__:  # module.forward = ... (accelerate's hooks, adapters, a user's wrapper)
        return "its forward is replaced on the instance (module.forward = ...); a replacement would drop it"
    inside = {id(m) for m in module.modules()}
    for pname, p in module.named_parameters():
        tied = [qualified for owner, qualified in owners.get(id(p), ()) if id(owner) not in inside]
        if tied:
            return (f"its {pname} is shared with {', '.join(tied)} (tied weights); a replacement would hold a "
                    "copy and break the tie")
    return None


def _refresh_pruned(module: nn.Module) -> None:
    """torch.nn.utils.prune keeps `weight` as weight_orig * mask from the last forward: after an optimizer step
    it is stale until the next one. Recompute it, as that forward's pre-hook would, before reading it (a
    replacement built from the stale one silently computed with the weights of a step ago)."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, BasePruningMethod):
            with torch.no_grad():
                setattr(module, hook._tensor_name, hook.apply_mask(module))


def _put(model: nn.Module, names: list[str], new: nn.Module) -> nn.Module:
    """Put `new` at every one of `names` (the model itself at ""); returns the (possibly new) root."""
    for name in names:
        if name == "":
            model = new
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
    return model


def _entry(module: nn.Module, names: list[str], **more) -> dict:
    return dict(name=names[0], **{"from": type(module).__name__}, **({"also": names[1:]} if names[1:] else {}),
                **more)


def swap_in(model: nn.Module, lstm_rank: int | float | None = None, linear_sparsity: float | None = None,
            block_size: int = 32, loss: bool = True, include=None, exclude=None, return_report: bool = False,
            lstm_sparsity: float | None = None, min_macs: int = 0, only_if_cheaper: bool = True,
            strict: bool = False):
    """Replace layers of `model` in place by the amnets modules, where that pays:

    - nn.LSTM -> LowRankLSTM.from_lstm (lstm_rank: an int rank, or a float in (0, 1] = fraction of spectral
      energy kept) or BlockSparseLSTM.from_lstm (lstm_sparsity, blocks of block_size; a projection kept dense);
      nn.LSTMCell -> LowRankLSTMCell (lstm_rank); bidirectional, proj_size and dropout carry over;
    - nn.Linear -> BlockSparseLinear.from_dense (linear_sparsity; a Linear pruned with
      torch.nn.utils.prune keeps its own mask);
    - torchaudio's RNNTLoss -> ours (loss).

    A layer is left as it is, and the report says why, when its replacement would keep no block, when it
    would cost no fewer multiply-adds per frame than the layer (a rank too high, padding to whole blocks),
    or when its block size or weight dtype has no fast bsr_linear kernel on the face that would run it
    (only_if_cheaper=False replaces those anyway, with a NotCheaperWarning for the costlier ones); when a
    block is larger than the whole layer, or the layer is empty; when the dense layer has fewer than
    min_macs multiply-adds; when it has no counterpart here (nn.GRU / nn.RNN; exact classes only: not a subclass of nn.Linear / nn.LSTM / nn.LSTMCell, nor an
    uninitialized nn.LazyLinear); when its parent reads its dense weight itself (nn.TransformerEncoderLayer's
    linear1 / linear2, nn.MultiheadAttention's out_proj); or when replacing it would drop something
    silently: a parametrization, hooks (but torch.nn.utils.prune's), a weight tied to another module's.
    strict=True raises ValueError instead of leaving a layer for any reason but min_macs (a subclass or an
    uninitialized lazy layer is listed, never a target: not counted). A module found at
    several places in the model is replaced at all of them by one new module (the sharing kept), and named
    once in the report.
    include / exclude: fnmatch patterns (or lists) on names as named_modules(remove_duplicate=False) gives
    them ("" is the model itself); a shared module is replaced only if every one of its names is wanted
    (else it is reported as left as it is); a pattern that matches no layer these settings replace warns.
    A model on the meta device is refused (pruning and SVD read the weights). Returns the model, or (model,
    SwapReport) with return_report. Full rank and sparsity 0 (with only_if_cheaper=False) leave the outputs
    unchanged; unswap(model) multiplies the factors / blocks back out into plain modules.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_in: model must be an nn.Module; got {type(model).__name__}")
    # Every argument checked here, whatever the model holds, so a wrong one is named as given.
    if lstm_rank is not None:
        expected = "an int >= 1 or a float in (0, 1] (a fraction of spectral energy)"
        lstm_rank = (_number("lstm_rank", lstm_rank, numbers.Integral, lambda r: r >= 1, expected)
                     if isinstance(lstm_rank, numbers.Integral) else
                     _number("lstm_rank", lstm_rank, numbers.Real, lambda r: 0 < r <= 1, expected))
    if linear_sparsity is not None:
        linear_sparsity = _number("linear_sparsity", linear_sparsity, numbers.Real, lambda s: 0 <= s <= 1,
                                  "a float in [0, 1]")
    if lstm_sparsity is not None:
        lstm_sparsity = _number("lstm_sparsity", lstm_sparsity, numbers.Real, lambda s: 0 <= s <= 1,
                                "a float in [0, 1]")
    block_size = _number("block_size", block_size, numbers.Integral, lambda b: b >= 1, "an int >= 1")
    min_macs = _number("min_macs", min_macs, numbers.Integral, lambda m: m >= 0, "an int >= 0")
    for name, flag in (("loss", loss), ("return_report", return_report), ("only_if_cheaper", only_if_cheaper),
                       ("strict", strict)):
        if not isinstance(flag, bool):  # a string such as "no" would be truthy
            raise TypeError(f"swap_in: {name} must be a bool; got {type(flag).__name__}")
    include, exclude = _patterns("include", include), _patterns("exclude", exclude) or []
    if lstm_rank is not None and lstm_sparsity is not None:
        raise ValueError("swap_in: give lstm_rank (low-rank LSTMs) or lstm_sparsity (block-sparse LSTMs), not both")

    def wanted(name: str) -> bool:
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in exclude)

    lstms = lstm_rank is not None or lstm_sparsity is not None

    def blocked(weight, shape: tuple[int, int], what: str) -> str | None:
        """Why blocks of block_size do not pay on this matrix, decided before any block is built (a huge
        block_size would otherwise ask the allocator for b * b), or None."""
        if max(shape) < block_size:
            return (f"block_size {block_size} is larger than the layer ({shape[0]} x {shape[1]}, {what}): one "
                    "padded block would cost more than the whole layer")
        return _no_fast_kernel(weight, block_size) if only_if_cheaper else None

    def replacement(module: nn.Module):
        """The new module, or a string saying why there is none, or None when the module is not a target."""
        if isinstance(module, torch.jit.ScriptModule):  # its code is compiled: nothing in it can be replaced
            family = {"Linear": linear_sparsity is not None, "LSTM": lstms, "LSTMCell": lstms}
            if family.get(getattr(module, "original_name", None)):
                return _NotATarget(f"a TorchScript {module.original_name} (torch.jit.script): its compiled code "
                                   "calls it, so it cannot be replaced; call swap_in before scripting")
            return None
        kind = type(module)
        if parametrize.is_parametrized(module):
            kind = kind.__bases__[0]  # parametrize subclasses the module's own class
        if linear_sparsity is not None and issubclass(kind, nn.Linear):
            if kind is not nn.Linear:
                return _not_exact(module, kind)
            if id(module) in read_by:
                return read_by[id(module)]
            if not module.in_features or not module.out_features:
                return f"an empty layer ({module.out_features} x {module.in_features}, out x in): nothing to prune"
            return blocked(module.weight, (module.out_features, module.in_features), "out x in") or (
                lambda: BlockSparseLinear.from_dense(module, block_size=block_size, sparsity=linear_sparsity))
        if lstms and issubclass(kind, (nn.LSTM, nn.LSTMCell)) and kind not in _EXACT:
            return _not_exact(module, kind)
        if kind is nn.LSTM and lstms:
            if lstm_rank is not None:
                return lambda: LowRankLSTM.from_lstm(module, lstm_rank)
            shape = (4 * module.hidden_size, module.input_size + (module.proj_size or module.hidden_size))
            return blocked(module.weight_ih_l0, shape, "[W_ih | W_hh]") or (
                lambda: BlockSparseLSTM.from_lstm(module, lstm_sparsity, block_size))
        if kind is nn.LSTMCell and lstms:
            if lstm_rank is not None:
                return lambda: LowRankLSTMCell.from_lstm_cell(module, lstm_rank)
            return "no block-sparse nn.LSTMCell here; lstm_rank gives a LowRankLSTMCell"
        if kind in _RECURRENT and lstms:
            return f"nn.{kind.__name__} has no amnets counterpart (LSTMs only)"
        if loss and _is_torchaudio_rnnt_loss(module):
            return lambda: RNNTLoss(module.blank, module.clamp, module.reduction, module.fused_log_softmax)
        return None

    places = _places(model)
    owners = _owners(places)
    read_by = _read_by_parent(places)
    report, plans, refused, targets = SwapReport(), [], [], []
    for module, names in places.values():
        if (plan := replacement(module)) is None:
            continue
        if not isinstance(plan, _NotATarget):
            targets += names
        chosen = [n for n in names if wanted(n)]
        if not chosen:
            continue
        entry = _entry(module, names)
        if not isinstance(plan, str):
            left_out = ", ".join(n or "(root)" for n in names if n not in chosen)
            plan = (f"it is also {left_out}, which include / exclude leave out; replacing it would change that too"
                    if left_out else _what_would_be_lost(module, owners)) or plan
        if isinstance(plan, str):
            report.skipped.append(dict(entry, reason=str(plan)))
            if not isinstance(plan, _NotATarget):
                refused.append(names[0])
            continue
        if any(p.is_meta for p in module.parameters()):
            raise ValueError(f"swap_in: {names[0] or 'the model'} ({type(module).__name__}) has its weights on the "
                             "meta device; pruning and the SVD read them: materialise the model first (to_empty() "
                             "and load_state_dict, or build it on a real device)")
        if _macs(module) and _macs(module) < min_macs:
            report.skipped.append(dict(entry, reason=f"{_macs(module):,} MACs per frame, below min_macs = {min_macs:,}"))
            continue
        _refresh_pruned(module)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotCheaperWarning)  # the report (or the warning below) says it
            new = plan()
        reason = why_not_cheaper(_macs(new), _macs(module), _kept_blocks(new)) if _macs(module) else None
        if reason is not None and (only_if_cheaper or _kept_blocks(new) == 0):
            report.skipped.append(dict(entry, reason=f"{type(new).__name__} would not pay: {reason}"))
            refused.append(names[0])
            continue
        if reason is not None:
            warnings.warn(f"swap_in: {names[0] or 'the model'} -> {type(new).__name__}: {reason} "
                          "(only_if_cheaper=False)", NotCheaperWarning, stacklevel=2)
        plans.append((names, module, new))
    for kind, patterns in (("include", include or []), ("exclude", exclude)):
        for p in patterns:  # a misspelt name would otherwise swap (or keep) everything silently
            if not any(fnmatch.fnmatchcase(n, p) for n in targets):
                warnings.warn(f"swap_in: {kind} pattern {p!r} matches no layer these settings replace (patterns "
                              "match whole names from named_modules(), e.g. 'encoder.*' for encoder's layers)",
                              UserWarning, stacklevel=2)
    if strict and refused:
        raise ValueError("swap_in(strict=True): these layers would be left as they are:\n"
                         + "\n".join(f"  {_label(s)} ({s['from']}): {s['reason']}" for s in report.skipped
                                     if s["name"] in refused))
    def listed(names: list[str]) -> str:
        return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")

    small = [names[0] or "(root)" for names, old, new in plans
             if isinstance(new, BlockSparseLinear) and _macs(old) < SMALL_LINEAR_MACS]
    if small and only_if_cheaper:  # fewer MACs, but maybe not less time: said, not silent
        warnings.warn(f"swap_in: {len(small)} Linear(s) under {SMALL_LINEAR_MACS:,} multiply-adds a row "
                      f"({listed(small)}) now run BlockSparseLinear, whose "
                      "per-call host cost can outweigh its saving at a few rows (a 128 x 128 layer took 1.1-1.3x "
                      f"nn.Linear's time at 1-30 rows, one AMD EPYC core: benchmarks.overhead); min_macs="
                      f"{SMALL_LINEAR_MACS} keeps such layers dense", SmallLayerWarning, stacklevel=2)
    training = [names[0] or "(root)" for names, old, new in plans
                if isinstance(new, BlockSparseLSTM) and old.training and old.hidden_size < 512]
    if training and only_if_cheaper:  # BlockSparseLSTM trains a step at a time (its docstring): said, not silent
        warnings.warn(f"swap_in: {listed(training)} (in train mode, "
                      "hidden_size < 512) now BlockSparseLSTM, whose autograd path runs one fused cell a time step "
                      "from Python: training it is slower than nn.LSTM's at these sizes (1.7-1.8x at H=128 x2, "
                      "T=100, B=8, one AMD EPYC core: benchmarks.overhead). Its inference is fast; lstm_rank "
                      "(LowRankLSTM) also trains fast", SmallLayerWarning, stacklevel=2)
    for names, old, new in plans:
        new.train(old.training)
        model = _put(model, names, new)
        report.replaced.append(_entry(old, names, to=type(new).__name__, params_before=_params(old),
                                      params_after=_params(new), macs_before=_macs(old), macs_after=_macs(new)))
    return (model, report) if return_report else model


def swap_like(model: nn.Module, state_dict) -> nn.Module:
    """Replace, in place, the layers of `model` that a swapped checkpoint holds as amnets modules by modules of
    those kinds, so that `model.load_state_dict(state_dict)` loads it: the way to load a swap_in-ed model's
    checkpoint into a fresh dense model when swapping anew would not make the same choices (a fractional
    lstm_rank picks ranks from the weights, and on fresh random weights a layer may not pay and stay dense).
    Decided by the checkpoint's keys under each layer's name: w_ih_u_l0 (LowRankLSTM), values_l0
    (BlockSparseLSTM), w_ih_u (LowRankLSTMCell), values (BlockSparseLinear); the new modules have the
    layer's configuration, and their ranks, block sizes and patterns come with the load. A new parameter trains
    as the layer's weights (a bias: its biases) did, and the train/eval mode is kept. Layers the checkpoint holds
    dense stay as they are; a layer it holds swapped that cannot be replaced (hooks, a parametrization, tied
    weights: as swap_in leaves one) is a ValueError naming it. Returns the model (a new object when the model
    itself is replaced)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_like: model must be an nn.Module; got {type(model).__name__}")
    if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
        raise TypeError(f"swap_like: state_dict must be a mapping of names to tensors (a state_dict); got "
                        f"{type(state_dict).__name__}")
    places = _places(model)
    owners = _owners(places)
    plans = []
    for module, names in places.values():
        kind = _saved_kind(module, names[0], state_dict)
        if kind is None:
            continue
        lost = _what_would_be_lost(module, owners)
        if lost is not None:
            raise ValueError(f"swap_like: the checkpoint holds {names[0] or 'the model'} as {kind.__name__}, but "
                             f"{lost}")
        plans.append((names, module, kind))
    for names, old, kind in plans:
        new = _empty_like(old, kind, state_dict, f"{names[0]}." if names[0] else "")
        weights = any(p.requires_grad for n, p in old.named_parameters() if not n.startswith("bias"))
        biases = any(p.requires_grad for n, p in old.named_parameters() if n.startswith("bias"))
        for name, p in new.named_parameters():
            p.requires_grad_(biases if name.startswith("bias") else weights)
        new.train(old.training)
        model = _put(model, names, new)
    return model


# What a checkpoint's key under a layer's name says it holds there: (dense kind, key) -> amnets kind.
_SAVED_KINDS = {(nn.LSTM, "w_ih_u_l0"): LowRankLSTM, (nn.LSTM, "values_l0"): BlockSparseLSTM,
                (nn.LSTMCell, "w_ih_u"): LowRankLSTMCell, (nn.Linear, "values"): BlockSparseLinear}


def _saved_kind(module: nn.Module, name: str, state_dict):
    """The amnets kind the checkpoint holds at `name` for a dense layer of exactly nn.LSTM / nn.LSTMCell /
    nn.Linear, or None."""
    prefix = f"{name}." if name else ""
    for (dense, key), kind in _SAVED_KINDS.items():
        if type(module) is dense and prefix + key in state_dict:
            return kind
    return None


def _empty_like(old: nn.Module, kind: type, state_dict, prefix: str) -> nn.Module:
    """A `kind` module with `old`'s configuration, device and dtype, for a load to fill: rank 1, or every block
    at the checkpoint's block size (its pattern and ranks replace these: see the modules' load)."""
    ref = next(old.parameters())
    at = dict(device=ref.device, dtype=ref.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (rank 1 and sparsity 0 are placeholders, not a configuration to judge)
        if kind is BlockSparseLinear:
            return BlockSparseLinear(old.in_features, old.out_features, state_dict[prefix + "values"].shape[-1],
                                     0.0, bias=old.bias is not None, **at)
        if kind is LowRankLSTMCell:
            return LowRankLSTMCell(old.input_size, old.hidden_size, 1, bias=old.bias, **at)
        config = dict(num_layers=old.num_layers, bias=old.bias, batch_first=old.batch_first, dropout=old.dropout,
                      bidirectional=old.bidirectional, proj_size=old.proj_size, **at)
        if kind is LowRankLSTM:
            return LowRankLSTM(old.input_size, old.hidden_size, 1, **config)
        return BlockSparseLSTM(old.input_size, old.hidden_size, block_size=state_dict[prefix + "values_l0"].shape[-1],
                               sparsity=0.0, **config)


def unswap(model: nn.Module, return_report: bool = False):
    """Undo swap_in, in place: every BlockSparseLinear / LowRankLSTM / BlockSparseLSTM / LowRankLSTMCell
    becomes the plain nn.Linear / nn.LSTM / nn.LSTMCell computing what it computes (factors and kept blocks
    multiplied out), and our RNNTLoss torchaudio's when torchaudio is installed; a module found at several
    places becomes one dense module at all of them. A module is left as it is, and the report says why, as
    swap_in leaves one: when replacing it would drop a parametrization, hooks or a tie of its weights. The
    result's state_dict loads into the original dense model. Returns the model, or (model, SwapReport) with
    return_report."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unswap: model must be an nn.Module; got {type(model).__name__}")
    places = _places(model)
    owners = _owners(places)
    report, plans = SwapReport(), []
    for module, names in places.values():
        if isinstance(module, (BlockSparseLinear, BlockSparseLSTM, LowRankLSTM, LowRankLSTMCell)):
            plan = module.to_dense
        elif type(module) is RNNTLoss:
            try:
                from torchaudio.transforms import RNNTLoss as AudioRNNTLoss
            except ImportError:
                AudioRNNTLoss = None
            if module.zero_infinity:
                plan = "zero_infinity=True has no torchaudio equivalent"
            elif AudioRNNTLoss is None:
                plan = "torchaudio is not installed"
            else:
                plan = functools.partial(AudioRNNTLoss, module.blank, module.clamp, module.reduction,
                                         module.fused_log_softmax)
        else:
            continue
        if not isinstance(plan, str):
            plan = _what_would_be_lost(module, owners) or plan
        if isinstance(plan, str):
            report.skipped.append(_entry(module, names, reason=plan))
        else:
            plans.append((names, module, plan()))
    for names, old, new in plans:
        model = _put(model, names, new)
        report.replaced.append(_entry(old, names, to=type(new).__name__, params_before=_params(old),
                                      params_after=_params(new), macs_before=_macs(old), macs_after=_macs(new)))
    return (model, report) if return_report else model
