"""Which face of an op runs.

Every op has up to four faces with one contract (see amnets_kernels/_ops/):
  "reference"  pure PyTorch (amnets_kernels/reference/<file>.py); always there; the oracle.
  "cpu"        compiled C++ kernels, torch.ops.amnets_native.<op>_forward/_backward on the CPU key.
  "cuda"       compiled CUDA kernels, the same ops on the CUDA key.
  "triton"     amnets_kernels/triton/<file>.py: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"auto" takes the first face present for the tensors' device in AUTO_ORDER. When that is the
reference (no compiled or Triton face yet), it says so: a FallbackWarning once per op and device,
and `last_face(op)` tells which face ran. An explicitly chosen face that is missing raises
FaceUnavailableError; nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
FACES = BACKENDS[1:]

# op name -> the file name its faces share (reference/<file>.py, triton/<file>.py, csrc/*/<file>.*)
OPS = {
    "bsr_linear": "bsr",
    "lowrank_lstm_cell": "lowrank_lstm",
    "lowrank_lstm_sequence": "lowrank_lstm",
    "rnnt_loss": "rnnt",
    "fused_joint_rnnt_loss": "rnnt",
}

# What "auto" tries, per device type, first to last. The interpreter is never auto-selected.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


class FaceUnavailableError(RuntimeError):
    """The chosen backend has no face for this op on this device (yet)."""


class FallbackWarning(UserWarning):
    """backend "auto" found no compiled or Triton face and runs the pure-PyTorch reference; or a face runs a
    slower path of its own and says so (the Triton frame engine's graph call from Python: `native_call`)."""


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}; got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    return name


def _from_env() -> str:
    name = os.environ.get("AMNETS_BACKEND", "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"environment variable AMNETS_BACKEND must be one of {BACKENDS}; got {name!r}")
    return name


# ---------------------------------------------------------------------------------------------------
# The compiled extension: it defines the ops (torch.ops.amnets.*), their compiled faces and the backend
# state (csrc/face.h); the package cannot work without it.

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(f"amnets_kernels: the compiled extension amnets_kernels._C did not load ({exc}); build it "
                      "with `pip install --no-build-isolation .` (or `python setup.py build_ext --inplace` in a "
                      "checkout)") from exc

_state = _C  # get_backend/set_backend/push_backend/pop_backend/last_face/note_face, in C++
_state.set_backend(_from_env())
LABEL_CHECKS = ("auto", "host", "device")


def set_label_checks(mode: str) -> None:
    """Where rnnt_loss and fused_joint_rnnt_loss check their labels and lengths (process-wide; env
    AMNETS_LABEL_CHECKS): "host" reads them on the host and raises a ValueError naming a bad value, and warns
    about non-finite costs (for CUDA tensors a device sync on every call); "device" never reads them on the
    host: a sequence with bad labels or lengths gets a NaN cost and a zero gradient, and the kernels never
    read out of bounds; "auto" (default) is host on the CPU and device on CUDA (no host sync: CUDA graphs
    can capture the losses). Use "host" to debug bad labels on a GPU."""
    if mode not in LABEL_CHECKS:
        raise ValueError(f"label checks must be one of {LABEL_CHECKS}; got {mode!r}")
    _state.set_label_checks(mode)


def get_label_checks() -> str:
    return _state.get_label_checks()


def _label_checks_from_env() -> str:
    mode = os.environ.get("AMNETS_LABEL_CHECKS", "auto") or "auto"
    if mode not in LABEL_CHECKS:
        raise ValueError(f"environment variable AMNETS_LABEL_CHECKS must be one of {LABEL_CHECKS}; got {mode!r}")
    return mode


_state.set_label_checks(_label_checks_from_env())

# The CPU loops' on/off switches, read by the extension once (csrc/cpu/parallel.cpp: 0/false/off/no turn one
# off, in any case). A word it does not know would leave the switch on unsaid: refused here, as AMNETS_BACKEND is.
_SWITCH_WORDS = ("0", "1", "false", "true", "off", "on", "no", "yes")
for _name in ("AMNETS_CONTENTION_GUARD", "AMNETS_CPU_POOL"):
    if os.environ.get(_name, "").lower() not in _SWITCH_WORDS + ("",):  # (empty: unset)
        raise ValueError(f"environment variable {_name} must be one of {_SWITCH_WORDS} (any case); "
                         f"got {os.environ[_name]!r}")
_warned: set[tuple[str, str]] = set()


def set_backend(name: str) -> None:
    """Choose the face every op uses from now on (process-wide); see `use_backend` for a scope."""
    _state.set_backend(_check_name(name))


def get_backend() -> str:
    """The backend in force here: the innermost `use_backend`, else `set_backend`, else AMNETS_BACKEND."""
    return _state.get_backend()


# This thread's open use_backend blocks, in the order they opened, and the override before the first.
_open_blocks = threading.local()


@contextlib.contextmanager
def use_backend(name: str):
    """`with use_backend("cpu"): ...` runs the block with that face (on this thread; nests). Autograd's
    backward of an op runs under the backend its forward ran under."""
    name = _check_name(name)
    opened_on, opened = threading.get_ident(), _open_blocks.__dict__
    blocks = opened.setdefault("blocks", [])
    token = _state.push_backend(name)
    if not blocks:
        opened["before"] = token
    block = (object(), name)
    blocks.append(block)
    try:
        yield
    finally:
        # Blocks can close out of order (asyncio tasks interleaving on one thread): what is in force after
        # one closes is the innermost block still open, else what was before any; not what was in force
        # when this one opened, which may be a block that has closed since.
        blocks.remove(block)
        if threading.get_ident() != opened_on:
            # A generator suspended inside the block, closed or collected on another thread: the backend in
            # force is per thread, and this thread's is not the block's to change (it wiped this thread's own
            # blocks); the opening thread's cannot be changed from here.
            warnings.warn(f"use_backend({name!r}): a block opened on another thread closed here (a generator "
                          "suspended inside it, resumed or collected on this thread); this thread's backend is "
                          "left as it was, and the opening thread keeps the backend its blocks set until it closes "
                          "or sets them there", RuntimeWarning, stacklevel=3)
        elif blocks:
            _state.push_backend(blocks[-1][1])
        else:
            _state.pop_backend(opened["before"])


def _native_has(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered both directions of `op` for this dispatch key (csrc/face.h: the
    ops route by the same answer)."""
    return _C.compiled(op, dispatch_key)


def _triton_module(op: str):
    """The Triton face's module, or a string saying why there is none."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        module = importlib.import_module(f"amnets_kernels.triton.{OPS[op]}")
    except ModuleNotFoundError as exc:
        if exc.name == f"amnets_kernels.triton.{OPS[op]}" or exc.name == "amnets_kernels.triton":
            return f"no Triton face exists for {op} yet (amnets_kernels/triton/{OPS[op]}.py)"
        raise
    missing = [f"{op}_{d}" for d in ("forward", "backward") if not hasattr(module, f"{op}_{d}")]
    if missing:
        return f"amnets_kernels/triton/{OPS[op]}.py has no {' or '.join(missing)} yet"
    return module


def _check_op(op) -> None:
    if not isinstance(op, str) or op not in OPS:
        raise ValueError(f"op must be one of {tuple(OPS)}; got {op!r}")


def _device_type(device) -> str:
    """torch.device(device).type, a bad device named as such (torch's own error says neither)."""
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch.device or a device string such as 'cpu' or 'cuda:0'; "
                         f"got {device!r} ({str(exc).splitlines()[0]})") from None


def unavailable_reason(op: str, face: str, device: str | torch.device = "cpu") -> str | None:
    """None when `face` can run `op` on tensors of `device`; otherwise one sentence saying why not."""
    _check_op(op)
    if not isinstance(face, str) or face not in FACES:
        raise ValueError(f"face must be one of {FACES}; got {face!r}")
    kind = _device_type(device)
    if face == "reference":
        return None
    if kind == "cuda" and not torch.cuda.is_available():  # (which_face(op, "cuda") answered "triton" on such a host)
        return "no CUDA device here (torch.cuda.is_available() is False)"
    if face in ("cpu", "cuda"):
        if kind != face:
            return f"the {face} face runs on {face} tensors, and these are on {kind}"
        if not _native_has(op, face.upper()):
            file = f"csrc/{face}/{OPS[op]}.{'cpp' if face == 'cpu' else 'cu'}"
            if face == "cuda" and not (_C.build_info()["cuda_archs"]):
                return "this build of amnets_kernels._C has no CUDA part (CPU-only torch or no nvcc)"
            return f"no {face} kernel for {op} is compiled in yet ({file})"
        return None
    # triton
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs CPU tensors only under the interpreter (set TRITON_INTERPRET=1 before import)"
    if kind not in ("cpu", "cuda"):
        return f"Triton faces run on cuda tensors, and these are on {kind}"
    module = _triton_module(op)
    return module if isinstance(module, str) else None


def available_backends(op: str | None = None, device: str | torch.device = "cpu"):
    """Faces that can run `op` on `device` now; with op=None, a dict {op: [faces]}."""
    if op is None:
        return {name: available_backends(name, device) for name in OPS}
    return [face for face in FACES if unavailable_reason(op, face, device) is None]


@dataclass(frozen=True)
class Face:
    op: str
    name: str
    forward: Callable
    backward: Callable


@functools.lru_cache(maxsize=None)
def _load(op: str, face: str) -> Face:
    if face == "reference":
        module = importlib.import_module(f"amnets_kernels.reference.{OPS[op]}")
    elif face == "triton":
        module = _triton_module(op)
    else:  # one schema, the dispatch key picks the cpu or cuda kernel
        module = torch.ops.amnets_native
    return Face(op, face, getattr(module, f"{op}_forward"), getattr(module, f"{op}_backward"))


def which_face(op: str, device: str | torch.device = "cpu") -> str:
    """The face that would run `op` on `device` under the current backend (raises if none)."""
    _check_op(op)
    return _pick(get_backend(), op, _device_type(device))


@functools.lru_cache(maxsize=None)  # faces do not come and go while the process runs
def _pick(backend: str, op: str, kind: str) -> str:
    if backend != "auto":
        reason = unavailable_reason(op, backend, kind)
        if reason is not None:
            raise FaceUnavailableError(f"{op}: backend {backend!r} cannot run here: {reason}")
        return backend
    for face in AUTO_ORDER.get(kind, ("reference",)):
        if unavailable_reason(op, face, kind) is None:
            return face
    raise FaceUnavailableError(f"{op}: no face runs on {kind} tensors")  # pragma: no cover


def resolve(op: str, device: torch.device) -> Face:
    """The face to call for `op` on tensors of `device` (used by the ops; records and warns)."""
    backend = get_backend()
    face = _pick(backend, op, device.type)
    if face == "reference" and backend == "auto" and (op, device.type) not in _warned:
        best = AUTO_ORDER.get(device.type, ("reference",))[0]
        warnings.warn(
            f"amnets_kernels.{op}: backend 'auto' runs the pure-PyTorch reference face on {device.type} "
            f"({unavailable_reason(op, best, device.type)}). It is exact but not fast; "
            f"amnets_kernels.last_face({op!r}) reports which face ran.",
            FallbackWarning, stacklevel=3)
        _warned.add((op, device.type))  # once said: a warnings filter of "error" raises on every call instead
    _state.note_face(op, face)
    return _load(op, face)


def last_face(op: str) -> str | None:
    """Which face ran `op` most recently in this process (None if it has not run)."""
    _check_op(op)
    return _state.last_face(op) or None


def build_info() -> dict:
    """What this installation can run: versions, compiled CUDA archs, CPU features, faces per op."""
    import platform

    native = _C.build_info()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from . import __version__

    dpbf16 = native.get("cpu_dpbf16", False)  # the CPU has AVX512-BF16 (and no test turned it off)
    # The bf16 kernels' AMX tiles (csrc/cpu/amx.h): where the CPU and OS offer them, or emulated for a test.
    amx = {"amx": "amx tiles", "amx emulated (tests only)": "amx tiles, emulated (tests only)"}.get(native.get("cpu_amx"))
    return {
        "amnets_kernels": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "extension": "loaded",
        "cuda_archs": native.get("cuda_archs", []),
        "nvcc_arch_list": native.get("nvcc_arch_list"),
        "cpu": platform.machine(),
        "cpu_isa": native.get("cpu_features", []),
        # bsr_linear with bf16 weights and >= 8 rows (csrc/cpu/bsr.cpp): AMX tiles, else vdpbf16ps where the
        # CPU has it.
        "cpu_bf16_bsr_kernel": amx or ("avx512_bf16 dot products" if dpbf16 else "bf16 widened to fp32 FMAs"),
        # lowrank_lstm forward with bf16 input and factors, B <= 64 (csrc/cpu/lowrank_lstm.cpp): the factors
        # stay bf16 (vdpbf16ps; the recurrent products on AMX tiles from 8 rows) where the CPU has it, else the
        # whole op runs in fp32.
        "cpu_bf16_lowrank_lstm_kernel": ("avx512_bf16 dot products" + (f" + {amx} from 8 rows" if amx else "")
                                         if dpbf16 else "fp32"),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "openmp": native.get("openmp"),
        "cpu_contention_guard": _C.cpu_contention()["enabled"],  # AMNETS_CONTENTION_GUARD (csrc/cpu/parallel.h)
        "cuda_runtime": native.get("cuda_runtime"),  # the CUDA runtime the extension's CUDA part was built with
        "compiler": native.get("compiler"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "faces": {device: available_backends(device=device)
                  for device in (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])},
    }
