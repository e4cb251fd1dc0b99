"""The Triton face of rnnt_loss and fused_joint_rnnt_loss at the sizes where its blocks split: V over
several V blocks, U+1 past the narrowest lattice block, several cell tiles, H blocks and backward
chunks of the joint; float64; and the launch configurations AOT_CONFIGS must cover."""

import math
import re
import warnings

import pytest
import torch

import amnets_kernels as ak

from conftest import DEVICE, use_face
from helpers import grads, label_checks
from test_fused_joint import joint_inputs
from test_rnnt import batch_of


def _rnnt(face, logits, labels, **kw):
    with ak.use_backend(face):
        costs = ak.rnnt_loss(logits, *labels, reduction="none", **kw)
        return costs, grads(costs, [logits])[0]


@pytest.mark.parametrize("shape", [(2, 3, 2, 2100), (3, 4, 40, 5)], ids=["two-V-blocks", "U+1=41"])
@pytest.mark.parametrize("fused", [True, False])
def test_rnnt_loss_blocks(shape, fused):
    with use_face("rnnt_loss", "triton"):
        logits, *labels = batch_of(*shape, blank=0)
        if not fused:
            logits = logits.detach().log_softmax(-1).requires_grad_(True)
        kw = {"blank": 0, "clamp": 0.3, "fused_log_softmax": fused}
        (costs, g), (ref_costs, ref_g) = (_rnnt(face, logits, labels, **kw)
                                          for face in ("triton", "reference"))
        torch.testing.assert_close(costs, ref_costs, rtol=1e-6, atol=1e-5)
        # With 44 arcs per path, alpha + beta - log P ~ 60 carries fp32 rounding of ~1e-5 into the
        # gradient (torchaudio differs from the float64 reference by as much).
        torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-6 if shape[2] < 10 else 3e-5)


def test_rnnt_loss_float64():
    with use_face("rnnt_loss", "triton"):
        logits, *labels = batch_of(3, 5, 4, 7, blank=-1, dtype=torch.float64)
        (costs, g), (ref_costs, ref_g) = (_rnnt(face, logits, labels, blank=-1, clamp=0.05)
                                          for face in ("triton", "reference"))
        assert costs.dtype == g.dtype == torch.float64
        torch.testing.assert_close(costs, ref_costs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, ref_g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("checks", ["host", "device"])
def test_rnnt_loss_non_finite_cost_gets_no_gradient(checks):
    """A sequence with no finite path: an infinite cost and a zero gradient, whichever label checks run; host
    checks also warn (a host read of the costs), device checks do not (no sync: the default for CUDA tensors,
    where the H200 run of 2026-12-04 found this test expecting the host checks' warning)."""
    with label_checks(checks), use_face("rnnt_loss", "triton"):
        logits, *labels = batch_of(2, 3, 2, 4, blank=0)
        lp = logits.detach().log_softmax(-1)
        lp[1, :, :, 0] = -math.inf  # sequence 1 can never emit blank
        lp.requires_grad_(True)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            costs, g = _rnnt("triton", lp, labels, blank=0, fused_log_softmax=False)
    said = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    if checks == "host":
        assert any(re.search(r"sequences \[1\] have a non-finite cost", m) for m in said), said
    else:
        assert not any("non-finite" in m for m in said), said
    assert torch.isinf(costs[1]) and torch.isfinite(costs[0])
    assert not g[1].any() and g[0].any() and torch.isfinite(g).all()


def test_rnnt_loss_refuses_too_many_labels():
    with use_face("rnnt_loss", "triton"):
        logits = torch.zeros(1, 1, 4097, 2, device=DEVICE)
        labels = (torch.ones(1, 4096, dtype=torch.int32, device=DEVICE),
                  torch.ones(1, dtype=torch.int32, device=DEVICE),
                  torch.full((1,), 4096, dtype=torch.int32, device=DEVICE))
        with pytest.raises(ValueError, match=r"U\+1 <= 4096 .* got U\+1 = 4097"):
            ak.rnnt_loss(logits, *labels, blank=0)


def _joint(face, inputs, activation, clamp=-1.0):
    with ak.use_backend(face):
        costs = ak.fused_joint_rnnt_loss(*inputs, blank=0, activation=activation, clamp=clamp,
                                         reduction="none")
        return costs, grads(costs, list(inputs[:4]))


@pytest.mark.parametrize("dtype, activation, chunk_bytes", [
    (torch.float32, "tanh", None), (torch.float32, "relu", 1), (torch.float32, "identity", None),
    (torch.float64, "tanh", 1),
], ids=["fp32-tanh", "fp32-relu-chunked", "fp32-identity", "fp64-tanh-chunked"])
def test_fused_joint_blocks(dtype, activation, chunk_bytes, monkeypatch):
    """T and U+1 over several 8 x 8 cell tiles, H over several K blocks, V over several V blocks, ragged;
    chunk_bytes=1 runs the backward one cell tile per chunk."""
    with use_face("fused_joint_rnnt_loss", "triton"):
        if chunk_bytes is not None:
            monkeypatch.setattr("amnets_kernels.triton.rnnt.DLOGITS_CHUNK_BYTES", chunk_bytes)
        inputs = joint_inputs(2, 11, 9, 70, 150, dtype=dtype)
        (costs, g), (ref_costs, ref_g) = (_joint(face, inputs, activation, clamp=0.01)
                                          for face in ("triton", "reference"))
        tol = (1e-6, 1e-5) if dtype == torch.float32 else (1e-12, 1e-12)
        for ours, ref in zip([costs, *g], [ref_costs, *ref_g]):
            torch.testing.assert_close(ours, ref, rtol=tol[0], atol=tol[1])


def test_fused_joint_without_bias_returns_no_bias_gradient():
    with use_face("fused_joint_rnnt_loss", "triton"):
        enc, pred, weight, _, *labels = joint_inputs(2, 3, 2, 4, 5, has_bias=False)
        with torch.no_grad():
            ops = torch.ops.amnets
            saved = ops.fused_joint_rnnt_loss_forward(enc, pred, weight, None, *labels, 0, "tanh", -1.0, True)
            out = ops.fused_joint_rnnt_loss_backward(torch.ones(2, device=DEVICE), enc, pred, weight, None,
                                                     *labels, *saved, 0, "tanh", -1.0)
        assert out[3].numel() == 0 and all(torch.isfinite(g).all() for g in out[:3])


def test_aot_configs_cover_every_launch():
    """Every (kernel, constexprs, warps, stages) a launcher can pick is one that python -m
    amnets_kernels.aot compiles."""
    from amnets_kernels.triton import rnnt as face

    def key(kernel, config):
        return kernel, tuple(sorted(config.constexprs.items())), config.num_warps, config.num_stages

    listed = {key(c.kernel, c) for c in face.AOT_CONFIGS}

    picked = {key(k, face._row_config(v)) for k in (face._row_stats_kernel, face._rnnt_grad_kernel)
              for v in range(1, 5000, 7)}
    picked |= {key(face._lattice_kernel, face._lattice_config(u))
               for u in range(1, face.MAX_LABELS_PLUS_1 + 1, 5)}
    picked |= {key(kernel, config) for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
               for act in face.ACTIVATIONS for kernel, config in face._joint_configs(dtype, act).items()}
    assert picked <= listed, picked - listed
