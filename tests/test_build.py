"""The compiled extension: what it was built for, and that its schemas equal the Python contract."""

import ast
import os
import re
import shutil
import subprocess

import pytest
import torch

import amnets_kernels as ak
from amnets_kernels import _backend


def test_extension_loaded_with_openmp():
    info = ak.build_info()
    assert info["extension"] == "loaded"
    assert info["openmp"] is True  # else at::parallel_for would run our kernels on one thread


def test_extension_uses_the_process_libstdcxx():
    # With a copy of libstdc++ of its own (its own __cxa_throw), every C++ error the library raised crashed the
    # process on the GPU machines, whose compiler links it so (setup.py's shared_libstdcxx_link_args).
    path = ak._C.__file__
    with open(path, "rb") as f:
        assert b"libstdc++.so.6" in f.read(), f"{path} does not link libstdc++ shared"
    if shutil.which("nm"):
        defined = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True)
        assert " __cxa_throw" not in defined.stdout, f"{path} has a libstdc++ of its own"


def _setup_function(name):
    """A function of setup.py, without running the build that importing it would start."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "setup.py")) as f:
        tree = ast.parse(f.read())
    module = ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                         or isinstance(n, ast.FunctionDef) and n.name == name], type_ignores=[])
    scope = {}
    exec(compile(module, "setup.py", "exec"), scope)
    return scope[name]


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_setup_links_libstdcxx_shared_where_the_compiler_would_not(tmp_path):
    probe = _setup_function("shared_libstdcxx_link_args")
    assert probe("c++") == []
    # a compiler that links libstdc++ statically into shared objects, as /opt/gcc/bin/g++ on the GPU machines
    wrapper = tmp_path / "static-g++"
    wrapper.write_text('#!/bin/sh\nexec c++ "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    assert probe(str(wrapper)) == ["-l:libstdc++.so.6"]
    # and that flag makes the wrapper link it shared
    src, out = tmp_path / "t.cpp", tmp_path / "t.so"
    src.write_text('#include <stdexcept>\nvoid f() { throw std::runtime_error("x"); }\n')
    subprocess.run([str(wrapper), "-shared", "-fPIC", str(src), "-o", str(out), "-l:libstdc++.so.6"], check=True)
    assert b"libstdc++.so.6" in out.read_bytes()


@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None
                    or os.environ.get("AMNETS_BUILD_CUDA") == "0", reason="no CUDA build possible here")
def test_cuda_part_compiled_for_requested_archs():
    info = ak.build_info()
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0a"
    expected = ["sm_" + a.replace(".", "").removesuffix("+PTX") for a in re.split(r"[;\s]+", wanted) if a]
    assert [a for a in info["cuda_archs"] if a.startswith("sm_")] == expected
    # nvcc's own list (virtual archs, no "a" suffix) must agree with what setup.py asked for.
    nvcc = sorted(int(v) // 10 for v in info["nvcc_arch_list"].split(","))
    assert nvcc == sorted(int(re.sub(r"\D", "", a)) for a in expected)


def _arguments(schema):
    return [(a.name, str(a.type)) for a in schema.arguments]


@pytest.mark.parametrize("op", sorted(_backend.OPS))
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_native_schema_equals_python_contract(op, direction):
    python = getattr(torch.ops.amnets, f"{op}_{direction}").default._schema
    native = getattr(torch.ops.amnets_native, f"{op}_{direction}").default._schema
    assert _arguments(native) == _arguments(python)
    assert [str(r.type) for r in native.returns] == [str(r.type) for r in python.returns]


@pytest.mark.parametrize("op", sorted(_backend.OPS))
def test_public_op_takes_the_python_function_arguments(op):
    import inspect

    schema = getattr(torch.ops.amnets, op).default._schema
    params = list(inspect.signature(getattr(ak, op)).parameters)
    names = [a.name for a in schema.arguments]
    if op == "bsr_linear":  # the BlockSparseMatrix travels as its tensors and logical shape
        params[1:2] = ["values", "crow_indices", "col_indices", "out_features", "in_features"]
    assert names == params


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("op", sorted(_backend.OPS))
def test_every_kernel_file_registers_its_ops(op):
    """A csrc/cpu/<file>.cpp registers the op's CPU kernels; a csrc/cuda/<file>.cu, in a CUDA build,
    its CUDA kernels (compiled here without a GPU, run by benchmarks/gpu_suite.sh)."""
    file = _backend.OPS[op]
    keys = []
    if os.path.exists(os.path.join(ROOT, "csrc", "cpu", f"{file}.cpp")):
        keys.append("CPU")
    if os.path.exists(os.path.join(ROOT, "csrc", "cuda", f"{file}.cu")) and ak.build_info()["cuda_archs"]:
        keys.append("CUDA")
    if not keys:
        pytest.skip(f"no compiled face of {op} yet")
    for key in keys:
        for direction in ("forward", "backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"amnets_native::{op}_{direction}", key), (op, key)
