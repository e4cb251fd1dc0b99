"""Reference faces of rnnt_loss and fused_joint_rnnt_loss (torchaudio's conventions).

Lattice of sequence b: frames t < T_b, label positions u <= U_b. With lp = log_softmax(z) (or z itself
when fused_log_softmax=False), lp_blank(t,u) = lp[t,u,blank], lp_y(t,u) = lp[t,u,y_{u+1}]:
  alpha(0,0) = 0,  alpha(t,u) = logaddexp(alpha(t-1,u) + lp_blank(t-1,u), alpha(t,u-1) + lp_y(t,u-1))
  beta(T_b-1,U_b) = lp_blank(T_b-1,U_b),  beta(t,u) = logaddexp(beta(t+1,u) + lp_blank(t,u),
                                                              beta(t,u+1) + lp_y(t,u))
  cost_b = -log P = -(alpha(T_b-1,U_b) + lp_blank(T_b-1,U_b)) = -beta(0,0).
Workspace (save=True), all in the accumulation dtype (float32, or float64 for float64 input):
alphas, betas (B, T, U+1) (-inf outside the lattice) and den (B, T, U+1) = logsumexp_k z (zeros when
fused_log_softmax=False). The recursions here run in float64 whatever the input dtype.
Targets beyond target_lengths are never read as labels, whatever they hold.
"""

import torch
from torch import Tensor

from . import acc_dtype

NEG_INF = float("-inf")


def _denominators(z: Tensor) -> Tensor:
    """logsumexp over V; NaN (not +inf) when a row holds +inf, as a NaN logit gives: the cell's log-probs
    are then NaN and so is its sequence's cost (every face: a non-finite logit gives a non-finite cost
    and a zero gradient)."""
    den = torch.logsumexp(z, dim=-1)
    return torch.where(den == float("inf"), float("nan"), den)


def _label_log_probs(z: Tensor, den: Tensor, targets: Tensor, blank: int) -> tuple[Tensor, Tensor]:
    """lp_blank (B, T, U+1) and lp_y (B, T, U) from logits z (acc dtype) and denominators den."""
    batch, frames, labels_plus_1, vocab = z.shape
    labels = targets.to(torch.int64).clamp(0, vocab - 1)  # padding past target_lengths may be anything
    index = labels[:, None, :, None].expand(batch, frames, labels_plus_1 - 1, 1)
    lp_y = z[:, :, :-1].gather(-1, index).squeeze(-1) - den[:, :, :-1]
    return z[..., blank] - den, lp_y


def _alphas(lp_blank: Tensor, lp_y: Tensor) -> Tensor:
    batch, frames, labels_plus_1 = lp_blank.shape
    alpha = lp_blank.new_full((batch, frames, labels_plus_1), NEG_INF)
    none = lp_blank.new_full((batch,), NEG_INF)
    for t in range(frames):
        for u in range(labels_plus_1):
            if t == 0 and u == 0:
                alpha[:, 0, 0] = 0.0
                continue
            stay = alpha[:, t - 1, u] + lp_blank[:, t - 1, u] if t > 0 else none
            emit = alpha[:, t, u - 1] + lp_y[:, t, u - 1] if u > 0 else none
            alpha[:, t, u] = torch.logaddexp(stay, emit)
    return alpha


def _betas(lp_blank: Tensor, lp_y: Tensor, frames_b: Tensor, labels_b: Tensor) -> Tensor:
    batch, frames, labels_plus_1 = lp_blank.shape
    beta = lp_blank.new_full((batch, frames, labels_plus_1), NEG_INF)
    none = lp_blank.new_full((batch,), NEG_INF)
    for t in reversed(range(frames)):
        for u in reversed(range(labels_plus_1)):
            stay = beta[:, t + 1, u] + lp_blank[:, t, u] if t + 1 < frames else none
            emit = beta[:, t, u + 1] + lp_y[:, t, u] if u + 1 < labels_plus_1 else none
            value = torch.logaddexp(stay, emit)
            value = torch.where((frames_b - 1 == t) & (labels_b == u), lp_blank[:, t, u], value)
            beta[:, t, u] = torch.where((t < frames_b) & (u <= labels_b), value, none)
    return beta


def _lattice(logits_or_z: Tensor, targets, logit_lengths, target_lengths, blank, fused, save):
    """(costs, alphas, betas, den, lp_blank, lp_y), all float64 except den (acc dtype)."""
    z = logits_or_z.to(acc_dtype(logits_or_z.dtype))
    den = _denominators(z) if fused else z.new_zeros(z.shape[:-1])
    lp_blank, lp_y = (lp.to(torch.float64) for lp in _label_log_probs(z, den, targets, blank))
    frames_b, labels_b = logit_lengths.to(torch.int64), target_lengths.to(torch.int64)
    alphas = _alphas(lp_blank, lp_y)
    batch = torch.arange(z.shape[0], device=z.device)
    costs = -(alphas[batch, frames_b - 1, labels_b] + lp_blank[batch, frames_b - 1, labels_b])
    betas = _betas(lp_blank, lp_y, frames_b, labels_b) if save else alphas.new_empty(0)
    return costs, alphas, betas, den, lp_blank, lp_y


def _arc_posteriors(alphas, betas, costs, lp_blank, lp_y, frames_b, labels_b):
    """gamma_blank (B, T, U+1), gamma_y (B, T, U): posterior of taking each arc; 0 off the lattice."""
    _, frames, labels_plus_1 = alphas.shape
    t = torch.arange(frames, device=alphas.device)[None, :, None]
    u = torch.arange(labels_plus_1, device=alphas.device)[None, None, :]
    frames_b, labels_b = frames_b[:, None, None], labels_b[:, None, None]
    log_p = -costs[:, None, None]
    after_blank = torch.cat([betas[:, 1:], torch.full_like(betas[:, :1], NEG_INF)], dim=1)
    terminal = (t == frames_b - 1) & (u == labels_b)
    g_blank = (alphas + lp_blank + torch.where(terminal, 0.0, after_blank) - log_p).exp()
    g_blank = torch.where((t < frames_b) & (u <= labels_b), g_blank, 0.0)
    g_y = (alphas[:, :, :-1] + lp_y + betas[:, :, 1:] - log_p).exp()
    g_y = torch.where((t < frames_b) & (u[:, :, :-1] < labels_b), g_y, 0.0)
    return g_blank, g_y


def _logit_grads(z, targets, logit_lengths, target_lengths, alphas, betas, den, blank, clamp, fused,
                 grad_costs):
    """d(sum_b grad_costs[b] cost_b)/dz in z's dtype; each sequence's gradient clamped first.

    log P is read off the saved lattice (beta(0,0)): the saved costs may be rounded to fp16.
    """
    alphas, betas = alphas.to(torch.float64), betas.to(torch.float64)
    costs = -betas[:, 0, 0]
    lp_blank, lp_y = (lp.to(torch.float64) for lp in _label_log_probs(z, den.to(z.dtype), targets, blank))
    frames_b, labels_b = logit_lengths.to(torch.int64), target_lengths.to(torch.int64)
    g_blank, g_y = _arc_posteriors(alphas, betas, costs, lp_blank, lp_y, frames_b, labels_b)
    frames, labels_plus_1 = z.shape[1:3]
    t = torch.arange(frames, device=z.device)[None, :, None]
    u = torch.arange(labels_plus_1, device=z.device)[None, None, :]
    on_lattice = (t < frames_b[:, None, None]) & (u <= labels_b[:, None, None])
    if fused:
        # Through log_softmax: every class gets softmax * (posterior of being at this node).
        occupancy = torch.where(on_lattice, (alphas + betas + costs[:, None, None]).exp(), 0.0)
        grad = (z - den.to(z.dtype)[..., None]).exp() * occupancy.to(z.dtype)[..., None]
    else:
        grad = torch.zeros_like(z)
    grad[..., blank] -= g_blank.to(z.dtype)
    labels = targets.to(torch.int64).clamp(0, z.shape[-1] - 1)
    index = labels[:, None, :, None].expand(*g_y.shape, 1)
    grad[:, :, :-1].scatter_add_(-1, index, -g_y.to(z.dtype)[..., None])
    if clamp > 0:
        grad.clamp_(-clamp, clamp)
    # A non-finite cost gets no gradient; nor do cells off the lattice (whatever the padding holds).
    keep = (torch.isfinite(costs)[:, None, None] & on_lattice)[..., None]
    return torch.where(keep, grad * grad_costs.to(z.dtype)[:, None, None, None], 0.0)


def rnnt_loss_forward(logits: Tensor, targets: Tensor, logit_lengths: Tensor, target_lengths: Tensor,
                      blank: int, clamp: float, fused_log_softmax: bool, save: bool):
    return _forward(logits, targets, logit_lengths, target_lengths, blank, fused_log_softmax, save,
                    logits.dtype)


def _forward(z, targets, logit_lengths, target_lengths, blank, fused, save, cost_dtype):
    costs, alphas, betas, den, _, _ = _lattice(z, targets, logit_lengths, target_lengths, blank, fused, save)
    if not save:
        return (costs.to(cost_dtype), *(den.new_empty(0) for _ in range(3)))
    return costs.to(cost_dtype), alphas.to(den.dtype), betas.to(den.dtype), den


def rnnt_loss_backward(grad_costs, logits, targets, logit_lengths, target_lengths, costs, alphas, betas,
                       den, blank: int, clamp: float, fused_log_softmax: bool) -> Tensor:
    z = logits.to(acc_dtype(logits.dtype))
    grad = _logit_grads(z, targets, logit_lengths, target_lengths, alphas, betas, den, blank, clamp,
                        fused_log_softmax, grad_costs)
    return grad.to(logits.dtype)


# ---------------------------------------------------------------------------------------------------
# fused joint + loss: the reference materialises the joint (the fast faces never do).

_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda a: a}


def _joint(enc, pred, weight, bias, activation):
    acc = acc_dtype(enc.dtype)
    hidden = _ACTIVATIONS[activation](enc.to(acc)[:, :, None] + pred.to(acc)[:, None])
    logits = hidden @ weight.to(acc).T
    return hidden, (logits if bias is None else logits + bias.to(acc))


def fused_joint_rnnt_loss_forward(enc, pred, weight, bias, targets, logit_lengths, target_lengths,
                                  blank: int, activation: str, clamp: float, save: bool):
    _, logits = _joint(enc, pred, weight, bias, activation)
    return _forward(logits, targets, logit_lengths, target_lengths, blank, True, save, enc.dtype)


def fused_joint_rnnt_loss_backward(grad_costs, enc, pred, weight, bias, targets, logit_lengths,
                                   target_lengths, costs, alphas, betas, den, blank: int, activation: str,
                                   clamp: float):
    hidden, logits = _joint(enc, pred, weight, bias, activation)
    # Cells whose d logits are 0 (a sequence with a NaN cost, padding) must add 0, not 0 * NaN, to the
    # gradients the batch shares; every live cell of a finite-cost sequence has a finite activation.
    hidden = torch.where(torch.isfinite(hidden), hidden, 0.0)
    d_logits = _logit_grads(logits, targets, logit_lengths, target_lengths, alphas, betas, den, blank,
                            clamp, True, grad_costs)
    d_hidden = d_logits @ weight.to(logits.dtype)
    if activation == "tanh":
        d_hidden = d_hidden * (1 - hidden * hidden)
    elif activation == "relu":
        d_hidden = d_hidden * (hidden > 0)
    d_weight = d_logits.reshape(-1, d_logits.shape[-1]).T @ hidden.reshape(-1, hidden.shape[-1])
    d_bias = d_logits.sum((0, 1, 2)) if bias is not None else d_logits.new_empty(0)
    return (d_hidden.sum(2).to(enc.dtype), d_hidden.sum(1).to(pred.dtype), d_weight.to(weight.dtype),
            d_bias.to(enc.dtype))
