"""A checkpoint whose tensors have other shapes than the module's own (another pruning pattern, other low-rank
ranks) loads into the module's own parameter and buffer objects, which take the saved shapes: an optimizer built
before the load (a resumed run builds the model and its optimizer, then loads both states) goes on training them.
An optimizer state made for the old shape (Adam's moments, SGD's momentum, Adafactor's factored statistics) is
refused by name at that optimizer's next step, where the step itself failed with a bare size mismatch."""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

_RESIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # parameter -> its name, resized by a load
_HOOK = []  # the step pre-hook's handle, registered at the first resize


def take_saved_shape(tensor: torch.Tensor, shape, name: str) -> None:
    """`tensor` (a module's own) takes `shape`, its object kept; its values are the caller's to load."""
    tensor.grad = None  # the old shape's: the next backward would add the new one's to it
    tensor.data = tensor.new_empty(shape)
    if isinstance(tensor, nn.Parameter):
        _RESIZED[tensor] = name
        if not _HOOK:
            _HOOK.append(register_optimizer_step_pre_hook(_check_optimizer_state))


def resize_to_saved(module: nn.Module, state_dict, prefix: str, names) -> None:
    """The module's tensors `names` take the shapes of those saved, where they differ."""
    for name in names:
        saved = state_dict.get(prefix + name)
        current = getattr(module, name)
        if saved is not None and saved.shape != current.shape:
            take_saved_shape(current, saved.shape, prefix + name)


def _stale(state: torch.Tensor, param: torch.Tensor) -> bool:
    """A state tensor of the parameter's rank whose sizes are neither the parameter's nor 1 (factored states,
    Adafactor's, keep one size of the parameter and 1 for the other)."""
    return state.dim() == param.dim() and any(s not in (p, 1) for s, p in zip(state.shape, param.shape))


def _check_optimizer_state(optimizer, args, kwargs) -> None:
    """Before any optimizer step: only the parameters a load resized are looked at."""
    for param, name in list(_RESIZED.items()):
        state = optimizer.state[param] if param in optimizer.state else {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and _stale(value, param):
                raise ValueError(
                    f"{type(optimizer).__name__}.step: its state for {name} ({key!r} of shape {tuple(value.shape)}) "
                    f"was made before load_state_dict gave that parameter the shape {tuple(param.shape)}: load the "
                    "optimizer's state saved with the checkpoint (optimizer.load_state_dict), or drop the stale "
                    "state (optimizer.state.pop(parameter))")
