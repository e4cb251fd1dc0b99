"""Backend selection: explicit faces, the auto fallback (warned and queryable), env var, build_info."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import amnets_kernels as ak
from amnets_kernels import _backend


def small_rnnt():
    logits = torch.randn(1, 2, 2, 3, requires_grad=True)
    return logits, torch.tensor([[1]]), torch.tensor([2]), torch.tensor([1])


def test_set_get_and_scoped_backend():
    assert ak.get_backend() == "auto"
    with ak.use_backend("reference"):
        assert ak.get_backend() == "reference"
        with ak.use_backend("cpu"):
            assert ak.get_backend() == "cpu"
        assert ak.get_backend() == "reference"
    ak.set_backend("reference")
    try:
        assert ak.get_backend() == "reference"
    finally:
        ak.set_backend("auto")
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'gpu'"):
        ak.set_backend("gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.use_backend("fast").__enter__()


def test_a_block_closed_on_another_thread_leaves_that_threads_backend_alone():
    """A generator suspended inside a use_backend block, closed on another thread: that thread's own blocks stay
    in force (they were wiped), with a RuntimeWarning saying what happened; a backend name must be a str."""
    import threading

    def frames():
        with ak.use_backend("reference"):
            yield ak.get_backend()

    suspended = frames()
    worker = threading.Thread(target=next, args=(suspended,))
    worker.start()
    worker.join()
    with ak.use_backend("cpu"):
        with pytest.warns(RuntimeWarning, match="a block opened on another thread closed here"):
            suspended.close()
        assert ak.get_backend() == "cpu"
    assert ak.get_backend() == "auto"
    with pytest.raises(TypeError, match="backend must be a str"):
        ak.set_backend(None)


def test_blocks_closing_out_of_order_leave_the_innermost_open_one_then_none():
    """asyncio tasks interleave use_backend blocks on one thread, so they can close out of order: after
    each close the innermost block still open is in force, and after the last, what was before any."""
    import asyncio

    async def task(name, seconds, seen):
        with ak.use_backend(name):
            await asyncio.sleep(seconds)
            seen.append(ak.get_backend())

    async def both():
        seen = []
        await asyncio.gather(task("reference", 0.01, seen), task("cpu", 0.03, seen))
        return seen

    assert asyncio.run(both()) == ["cpu", "cpu"]  # one thread, one override: the last block opened
    assert ak.get_backend() == "auto"
    outer, inner = ak.use_backend("reference"), ak.use_backend("cpu")
    outer.__enter__(), inner.__enter__()
    outer.__exit__(None, None, None)
    assert ak.get_backend() == "cpu"  # the block still open
    inner.__exit__(None, None, None)
    assert ak.get_backend() == "auto"


@pytest.mark.parametrize("face", ["cpu", "triton", "cuda"])
def test_missing_face_is_an_error_not_a_fallback(face, monkeypatch):
    """A chosen face that cannot run (simulated where it exists) raises, naming the reason."""
    op = "rnnt_loss"
    if ak.unavailable_reason(op, face, "cpu") is None:
        if face == "cpu":  # the C++ routing and Python's face list both ask this
            _backend._C.hide_compiled(op, True)
        else:
            monkeypatch.setattr(_backend, "unavailable_reason", lambda *a: "simulated: not built")
    _backend._pick.cache_clear()
    try:
        with ak.use_backend(face), pytest.raises(ak.FaceUnavailableError, match=f"backend '{face}' cannot run here"):
            ak.rnnt_loss(*small_rnnt())
    finally:
        _backend._C.hide_compiled(op, False)
        monkeypatch.undo()
        _backend._pick.cache_clear()


def test_auto_fallback_warns_once_and_is_queryable(monkeypatch):
    """With no compiled face (simulated: the extension reports no kernels), auto runs the reference,
    warns once per op and device, and last_face says so."""
    op = "lowrank_lstm_cell"
    _backend._C.hide_compiled(op, True)  # the C++ routing and Python's face list both ask it
    _backend._pick.cache_clear()
    _backend._warned.discard((op, "cpu"))
    try:
        x, h = torch.randn(2, 3), torch.randn(2, 2)
        w = (torch.randn(8, 2), torch.randn(2, 3), torch.randn(8, 1), torch.randn(1, 2))
        for _ in range(2):  # a filter of "error" raises on every call, not on the first only (CI forbidding fallbacks)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises(ak.FallbackWarning):
                    ak.lowrank_lstm_cell(x, h, h, *w)
        with pytest.warns(ak.FallbackWarning, match="runs the pure-PyTorch reference face on cpu"):
            ak.lowrank_lstm_cell(x, h, h, *w)
        assert ak.last_face(op) == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ak.lowrank_lstm_cell(x, h, h, *w)  # once is enough
    finally:
        _backend._C.hide_compiled(op, False)
        _backend._pick.cache_clear()
    ak.lowrank_lstm_cell(x, h, h, *w)
    assert ak.last_face(op) == "cpu"  # the real face is back


def test_available_backends_and_reasons():
    faces = ak.available_backends()
    assert set(faces) == set(_backend.OPS)
    assert all("reference" in f for f in faces.values())
    assert ak.unavailable_reason("bsr_linear", "reference") is None
    assert "cuda tensors" in ak.unavailable_reason("bsr_linear", "cuda", "cpu")
    if not torch.cuda.is_available():  # no face but the reference runs CUDA tensors where there is no GPU
        for face in ("cuda", "triton"):
            assert "no CUDA device here" in ak.unavailable_reason("bsr_linear", face, "cuda")
        assert ak.which_face("bsr_linear", "cuda") == "reference"
    with pytest.raises(ValueError, match="op must be one of"):
        ak.available_backends("conv2d")


@pytest.mark.parametrize("query, match", [  # each was a raw "unhashable type" TypeError or torch's device error
    (lambda: ak.which_face(["bsr_linear"]), "op must be one of"),
    (lambda: ak.last_face(["bsr_linear"]), "op must be one of"),
    (lambda: ak.unavailable_reason({}, "cpu"), "op must be one of"),
    (lambda: ak.unavailable_reason("bsr_linear", ["cpu"]), "face must be one of"),
    (lambda: ak.which_face("bsr_linear", "xyz"), "device must be a torch.device or a device string"),
    (lambda: ak.unavailable_reason("bsr_linear", "cpu", 3.5), "device must be a torch.device or a device string"),
])
def test_face_queries_name_a_bad_argument(query, match):
    with pytest.raises(ValueError, match=match):
        query()


def test_env_var_selects_backend_and_rejects_nonsense():
    code = "import amnets_kernels as ak; print(ak.get_backend())"
    env = dict(os.environ, AMNETS_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["AMNETS_BACKEND"] = "turbo"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "AMNETS_BACKEND must be one of" in bad.stderr


def test_build_info_reports_versions_and_faces():
    info = ak.build_info()
    assert info["torch"] == torch.__version__
    assert info["extension"] == "loaded", info["extension"]
    assert set(info["faces"]["cpu"]) == set(_backend.OPS)
    assert isinstance(info["cpu_isa"], list) and info["cpu"]
    native = ak._backend._C.build_info()  # every native field is said (the CUDA runtime and compiler were not)
    assert info["cuda_runtime"] == native["cuda_runtime"] and info["compiler"] == native["compiler"]
    assert info["cpu_contention_guard"] is ak._backend._C.cpu_contention()["enabled"]


def test_eager_inference_path_equals_the_op_path():
    """Without autograd, bsr_linear and lowrank_lstm_cell call their face directly (skipping the
    torch.ops layers); the answer must be the op's, bit for bit, and errors still name the argument."""
    from amnets_kernels._ops import eager_inference

    torch.manual_seed(0)
    w = ak.BlockSparseMatrix.from_dense(torch.randn(48, 40), block_size=16, sparsity=0.5)
    x, bias = torch.randn(2, 3, 40), torch.randn(48)
    # x (B, D), h, c (B, H), w_ih_u (4H, r), w_ih_v (r, D), w_hh_u (4H, rh), w_hh_v (rh, H), bias (4H,)
    cell = [torch.randn(*s) for s in ((5, 7), (5, 6), (5, 6), (24, 3), (3, 7), (24, 2), (2, 6), (24,))]
    with torch.no_grad():
        assert eager_inference(x, w.values, bias)
        assert torch.equal(ak.bsr_linear(x, w, bias), torch.ops.amnets.bsr_linear(
            x, w.values, w.crow_indices, w.col_indices, 48, 40, bias))
        for got, want in zip(ak.lowrank_lstm_cell(*cell), torch.ops.amnets.lowrank_lstm_cell(*cell)):
            assert torch.equal(got, want)
        with pytest.raises(ValueError, match="in_features"):
            ak.bsr_linear(torch.randn(3, 39), w)
    assert not eager_inference(x.requires_grad_(True))  # autograd wanted: the op path


def test_the_switches_take_the_usual_words_and_refuse_others():
    """AMNETS_CONTENTION_GUARD / AMNETS_CPU_POOL: 0/false/off/no (any case) turn them off, 1/true/on/yes or
    unset leave them on; a word the extension does not know ("disable") left the guard on unsaid: refused."""
    code = "from amnets_kernels import _backend; print(_backend._C.cpu_contention()['enabled'])"
    for word, enabled in (("0", "False"), ("Off", "False"), ("FALSE", "False"), ("no", "False"),
                          ("1", "True"), ("on", "True"), ("", "True")):
        env = dict(os.environ, AMNETS_CONTENTION_GUARD=word)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.split() == [enabled], (word, done.stderr)
    for name in ("AMNETS_CONTENTION_GUARD", "AMNETS_CPU_POOL"):
        env = dict(os.environ, **{name: "disable"})
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and f"{name} must be one of" in done.stderr and "'disable'" in done.stderr
