"""bsr_linear against dense F.linear on the same masked weight, and against torch's own sparse
matmuls (BSR and CSR), forward and forward+backward. Headline shapes: W 4096x2048 (the gate
matrix of a 1024-unit LSTM layer) and 1024x1024."""

import functools

import torch
import torch.nn.functional as F

import amnets_kernels as ak
from amnets_kernels import BlockSparseMatrix

from .harness import (DTYPE_NAMES, Candidate, Case, backward_of, everything, face_candidates, inference,
                      pick_grid, rotating)

FULL = dict(shapes=[(4096, 2048), (1024, 1024)], blocks=[16, 32, 64], densities=[0.5, 0.25, 0.1],
            rows=[1, 4, 16, 64, 256], dtypes=[torch.float32, torch.bfloat16], modes=["fwd", "fwd+bwd"])
QUICK = dict(shapes=[(1024, 1024)], blocks=[32], densities=[0.25], rows=[1, 16], dtypes=[torch.float32],
             modes=["fwd", "fwd+bwd"])
# On a GPU the 1024x1024 matrix and block 16 are launch-bound noise; the time goes to the target shape.
GPU = dict(FULL, shapes=[(4096, 2048)], blocks=[32, 64], rows=[1, 16, 256])
WEIGHT_SETS = 4  # 4 x 32 MB dense at 4096x2048: more than the 32 MB L3 of the reference CPU
# Where the weights live decides a CPU ratio as much as the kernel does (a 32 MB L3 holds rotated sparse
# weights but not the dense ones; a 480 MB one holds both). The headline shape is also timed in two
# stated regimes: "dram" rotates enough weight sets that even the kept blocks are twice the last-level
# cache, "cache" times one set (resident where it fits: the row says whether it does).
REGIMES = {"dram": None, "cache": 1}


def cache_bytes() -> dict:
    """Per-core L2 and shared L3 of this machine (Linux sysfs), in bytes; {} where it cannot be read."""
    import glob

    sizes = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            read = lambda name: open(f"{index}/{name}").read().strip()  # noqa: E731
            level, text = int(read("level")), read("size")
            if read("type") in ("Unified", "Data") and level >= 2:
                sizes[f"L{level}"] = int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
        except (OSError, ValueError, KeyError):
            continue
    return sizes


def residency(nbytes: int, caches: dict) -> str:
    """Which level holds `nbytes` of rotated weights (the smallest that fits), e.g. "L3" or "DRAM"."""
    for level in ("L2", "L3"):  # a quarter of a cache is left to everything else it holds
        if level in caches and nbytes <= caches[level] * 3 // 4:
            return level
    return "DRAM" if caches else "?"


def _weight_sets(shape, block, density, dtype, device, train, count=WEIGHT_SETS, peers=True):
    sets = []
    for _ in range(count):
        sparse = BlockSparseMatrix.from_dense(torch.randn(shape), block_size=block, sparsity=1 - density)
        sparse = sparse.to(device=device, dtype=dtype)
        dense = sparse.to_dense()
        sets.append(dict(sparse=sparse, dense=dense.requires_grad_(train), values=sparse.values.requires_grad_(train)))
        if peers:  # torch's own sparse formats (slow to build: not for the many sets of a regime case)
            sets[-1].update(torch_bsr=dense.detach().to_sparse_bsr((block, block)),  # grid shapes: whole blocks
                            torch_csr=dense.detach().to_sparse_csr())
    return sets


def cases(device: torch.device, quick: bool, wanted=everything):
    grid = pick_grid(device, quick, FULL, QUICK, GPU)
    for shape in grid["shapes"]:
        for block in grid["blocks"]:
            for density in grid["densities"]:
                for dtype in grid["dtypes"]:
                    for mode in grid["modes"]:
                        train = mode == "fwd+bwd"
                        # built for the first wanted row count, shared by the others
                        sets = functools.cache(functools.partial(_weight_sets, shape, block, density, dtype, device,
                                                                 train))
                        for m in grid["rows"]:
                            if wanted(case_name(shape, block, density, m, dtype)):
                                yield _case(shape, block, density, dtype, mode, m, sets(), device)


def regime_cases(device: torch.device, quick: bool = False, wanted=everything):
    """The headline shape (4096x2048, b=32, fwd, M=1 and 16) in the dram and cache regimes, CPU only
    (`python -m benchmarks --ops bsr_regimes`); nothing for --quick."""
    if device.type != "cpu" or quick:
        return
    caches = cache_bytes()
    shape, block = (4096, 2048), 32
    for density in FULL["densities"]:
        for dtype in FULL["dtypes"]:
            kept = shape[0] * shape[1] * density * torch.tensor([], dtype=dtype).element_size()
            for regime, count in REGIMES.items():
                if count is None:  # enough sets that the kept blocks alone are twice the last-level cache
                    count = min(64, max(WEIGHT_SETS, int(2 * caches.get("L3", 32 << 20) / kept) + 1))
                sets = functools.cache(functools.partial(_weight_sets, shape, block, density, dtype, device, False,
                                                         count, peers=False))
                for m in (1, 16):
                    if wanted(case_name(shape, block, density, m, dtype, regime)):
                        yield _case(shape, block, density, dtype, "fwd", m, sets(), device, regime, caches)


def case_name(shape, block, density, m, dtype, regime=None) -> str:
    return f"W={shape[0]}x{shape[1]} b={block} d={density} M={m} {DTYPE_NAMES[dtype]}" + \
        (f" [{regime}]" if regime is not None else "")


def _case(shape, block, density, dtype, mode, m, sets, device, regime=None, caches=None):
    train = mode == "fwd+bwd"
    x = torch.randn(m, shape[1], device=device, dtype=dtype, requires_grad=train)
    wrap = backward_of if train else inference
    pick = {key: rotating([s[key] for s in sets]) for key in sets[0]}
    baseline = Candidate("dense F.linear", wrap(lambda: F.linear(x, pick["dense"]())), "baseline",
                         "same pruned weight, stored dense")
    others = [Candidate("torch BSR", wrap(lambda: (pick["torch_bsr"]() @ x.T).T), "other"),
              Candidate("torch CSR", wrap(lambda: (pick["torch_csr"]() @ x.T).T), "other")] if "torch_bsr" in pick else []
    faces, skipped = face_candidates("bsr_linear", device, wrap(lambda: ak.bsr_linear(x, pick["sparse"]())))
    if regime is not None:  # the oracle's speed says nothing about where weights live
        faces = [f for f in faces if f.label != "amnets[reference]"]
    name = case_name(shape, block, density, m, dtype, regime)
    kept_bytes = sets[0]["sparse"].values.numel() * sets[0]["sparse"].values.element_size()
    dense_bytes = sets[0]["dense"].numel() * sets[0]["dense"].element_size()
    caches = cache_bytes() if caches is None and device.type == "cpu" else (caches or {})
    where = (f"{len(sets)} sets: dense {len(sets) * dense_bytes / 2**20:.0f} MB in "
             f"{residency(len(sets) * dense_bytes, caches)}, kept {len(sets) * kept_bytes / 2**20:.1f} MB in "
             f"{residency(len(sets) * kept_bytes, caches)}") if device.type == "cpu" else f"{len(sets)} sets"
    baseline.note = f"same pruned weight, stored dense; {where}"
    params = dict(out_features=shape[0], in_features=shape[1], block=block, density=density, rows=m,
                  dtype=DTYPE_NAMES[dtype], weight_sets=len(sets), regime=regime or "rotated",
                  dense_in=residency(len(sets) * dense_bytes, caches),
                  kept_in=residency(len(sets) * kept_bytes, caches))
    derive = (lambda seconds: f"{kept_bytes / seconds / 1e9:.1f} GB/s of kept weights") if mode == "fwd" else None
    return Case("bsr_linear", name, mode, params, baseline, others + faces, skipped, derive)


def headline(params: dict, mode: str) -> bool:
    """The rows README quotes: the headline shape."""
    return (params["out_features"], params["block"], params["dtype"], mode) == (4096, 32, "fp32", "fwd") \
        and params.get("regime", "rotated") == "rotated" \
        and params["rows"] in (1, 16)
