"""bsr_linear against dense F.linear on the same masked weight, and against torch's own sparse
matmuls (BSR and CSR), forward and forward+backward. Headline shapes: W 4096x2048 (the gate
matrix of a 1024-unit LSTM layer) and 1024x1024."""

import torch
import torch.nn.functional as F

import amnets_kernels as ak
from amnets_kernels import BlockSparseMatrix

from .harness import (DTYPE_NAMES, Candidate, Case, backward_of, face_candidates, inference, pick_grid,
                      rotating)

FULL = dict(shapes=[(4096, 2048), (1024, 1024)], blocks=[16, 32, 64], densities=[0.5, 0.25, 0.1],
            rows=[1, 4, 16, 64, 256], dtypes=[torch.float32, torch.bfloat16], modes=["fwd", "fwd+bwd"])
QUICK = dict(shapes=[(1024, 1024)], blocks=[32], densities=[0.25], rows=[1, 16], dtypes=[torch.float32],
             modes=["fwd", "fwd+bwd"])
# On a GPU the 1024x1024 matrix and block 16 are launch-bound noise; the time goes to the target shape.
GPU = dict(FULL, shapes=[(4096, 2048)], blocks=[32, 64], rows=[1, 16, 256])
WEIGHT_SETS = 4  # 4 x 32 MB dense at 4096x2048: more than the 32 MB L3 of the reference CPU


def _weight_sets(shape, block, density, dtype, device, train):
    sets = []
    for _ in range(WEIGHT_SETS):
        sparse = BlockSparseMatrix.from_dense(torch.randn(shape), block_size=block, sparsity=1 - density)
        sparse = sparse.to(device=device, dtype=dtype)
        dense = sparse.to_dense()
        sets.append(dict(sparse=sparse, dense=dense.requires_grad_(train),
                         values=sparse.values.requires_grad_(train),
                         torch_bsr=dense.detach().to_sparse_bsr((block, block)),  # grid shapes are whole blocks
                         torch_csr=dense.detach().to_sparse_csr()))
    return sets


def cases(device: torch.device, quick: bool):
    grid = pick_grid(device, quick, FULL, QUICK, GPU)
    for shape in grid["shapes"]:
        for block in grid["blocks"]:
            for density in grid["densities"]:
                for dtype in grid["dtypes"]:
                    for mode in grid["modes"]:
                        train = mode == "fwd+bwd"
                        sets = _weight_sets(shape, block, density, dtype, device, train)
                        for m in grid["rows"]:
                            yield _case(shape, block, density, dtype, mode, m, sets, device)


def _case(shape, block, density, dtype, mode, m, sets, device):
    train = mode == "fwd+bwd"
    x = torch.randn(m, shape[1], device=device, dtype=dtype, requires_grad=train)
    wrap = backward_of if train else inference
    pick = {key: rotating([s[key] for s in sets]) for key in sets[0]}
    baseline = Candidate("dense F.linear", wrap(lambda: F.linear(x, pick["dense"]())), "baseline",
                         "same pruned weight, stored dense")
    others = [Candidate("torch BSR", wrap(lambda: (pick["torch_bsr"]() @ x.T).T), "other"),
              Candidate("torch CSR", wrap(lambda: (pick["torch_csr"]() @ x.T).T), "other")]
    faces, skipped = face_candidates("bsr_linear", device, wrap(lambda: ak.bsr_linear(x, pick["sparse"]())))
    name = f"W={shape[0]}x{shape[1]} b={block} d={density} M={m} {DTYPE_NAMES[dtype]}"
    params = dict(out_features=shape[0], in_features=shape[1], block=block, density=density, rows=m,
                  dtype=DTYPE_NAMES[dtype], weight_sets=WEIGHT_SETS)
    kept_bytes = sets[0]["sparse"].values.numel() * sets[0]["sparse"].values.element_size()
    derive = (lambda seconds: f"{kept_bytes / seconds / 1e9:.1f} GB/s of kept weights") if mode == "fwd" else None
    return Case("bsr_linear", name, mode, params, baseline, others + faces, skipped, derive)


def headline(params: dict, mode: str) -> bool:
    """The rows README quotes: the headline shape."""
    return (params["out_features"], params["block"], params["dtype"], mode) == (4096, 32, "fp32", "fwd") \
        and params["rows"] in (1, 16)
