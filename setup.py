"""Build amnets_kernels._C and install the packages `amnets_kernels` and `amnets`.

The CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always compiled. The CUDA sources (csrc/cuda/*.cu)
are compiled when torch is a CUDA build and nvcc exists, with or without a GPU on this machine.
Environment:
  AMNETS_BUILD_CUDA=0/1        force the CUDA part off/on (on fails loudly if it cannot be built)
  TORCH_CUDA_ARCH_LIST         archs to compile for; default "8.0;9.0a" (no GPU to detect here)
  CUDA_HOME                    toolkit root; default: asked of nvcc itself (the nvcc on PATH may be a
                               wrapper script, and torch's own guess from its location is then wrong)
  AMNETS_DEBUG_INFO=1          keep the C++ debug info (-g, which Python's own flags add): off by default,
                               it took a third of the compile time of our largest sources (csrc/cpu/bsr*.cpp)
                               and most of the 72 MB of the built library; the sanitizer builds turn it on
Metadata and dependencies live in pyproject.toml; build with `pip install --no-build-isolation .`
because torch must be importable here.
"""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def cuda_toolkit_root():
    """The folder holding bin/nvcc, or None when there is no nvcc."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and os.path.exists(os.path.join(env, "bin", "nvcc")):
        return env
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # `nvcc --dryrun` prints the toolkit root it really uses as "#$ TOP=<root>/bin/..".
    probe = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                           capture_output=True, text=True)
    match = re.search(r"^#\$ TOP=(.+?)\s*$", probe.stdout + probe.stderr, re.M)
    if match:
        return os.path.realpath(match.group(1))
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def nvidia_wheel_include():
    """Include dir of the nvidia-* wheels torch depends on (cuBLAS/cuSPARSE headers live only there)."""
    try:
        import nvidia  # namespace package installed by torch's CUDA dependencies
    except ImportError:
        return None
    for base in nvidia.__path__:
        for header in sorted(glob.glob(os.path.join(base, "*", "include", "cublas_v2.h"))):
            return os.path.dirname(header)
    return None


def gencode_flags(arch_list):
    """'8.0;9.0a+PTX' -> nvcc -gencode flags, plus the sm_ names for build_info()."""
    flags, names = [], []
    for arch in filter(None, re.split(r"[;\s]+", arch_list)):
        ptx = arch.endswith("+PTX")
        arch = arch.removesuffix("+PTX")
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)", arch)
        if not match:
            sys.exit(f"setup.py: TORCH_CUDA_ARCH_LIST entry {arch!r} is not like '9.0' or '9.0a'")
        num = match.group(1) + match.group(2) + match.group(3)
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        names.append(f"sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
            names.append(f"compute_{num}")
    return flags, names


def shared_libstdcxx_link_args(cxx):
    """['-l:libstdc++.so.6'] where the C++ compiler cxx would link libstdc++ statically into a shared object.

    Our library must use the process's one libstdc++. The GPU machines' $CXX (/opt/gcc/bin/g++, a wrapper whose
    library dirs hold libstdc++.a alone) links a copy of it into a shared object, and there every C++ error our
    library raised (a ValueError from csrc/checks.h) crashed the process; linked shared, it raised
    (benchmarks/results/nvidia-h200-libstdcxx-2026-12-04.log). Probed by linking a one-line shared object: a
    shared libstdc++ leaves its name among the NEEDED entries.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            f.write('#include <stdexcept>\nvoid amnets_probe() { throw std::runtime_error("probe"); }\n')
        try:
            subprocess.run([*shlex.split(cxx), "-shared", "-fPIC", src, "-o", out], check=True,
                           capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return []  # the build itself will say what is wrong with this compiler
        with open(out, "rb") as f:
            if b"libstdc++.so.6" in f.read():
                return []
    print(f"setup.py: {cxx} links libstdc++ statically into shared objects; linking it shared instead "
          "(-l:libstdc++.so.6)", file=sys.stderr)
    return ["-l:libstdc++.so.6"]


def want_cuda(torch_has_cuda, toolkit):
    flag = os.environ.get("AMNETS_BUILD_CUDA")
    if flag not in (None, "", "0", "1"):
        sys.exit(f"setup.py: AMNETS_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False
    possible = torch_has_cuda and toolkit is not None
    if flag == "1" and not possible:
        sys.exit("setup.py: AMNETS_BUILD_CUDA=1 but "
                 + ("torch is not a CUDA build" if not torch_has_cuda else "nvcc was not found"))
    return possible


def extensions():
    toolkit = cuda_toolkit_root()
    if toolkit and not os.environ.get("CUDA_HOME"):
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported: set it first.
        os.environ["CUDA_HOME"] = toolkit
    import torch
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -Wno-psabi: the SIMD clones pass 64-byte vectors between always-inlined helpers (csrc/cpu/simd.h).
    # AMNETS_PYTHON_MODULE: the pybind11 parts (examples/deploy builds the same sources without them).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-psabi", "-DAMNETS_PYTHON_MODULE"]
    if os.environ.get("AMNETS_DEBUG_INFO") != "1":
        cxx.append("-g0")  # after Python's -g, so it wins
    link = ["-fopenmp"]  # at::parallel_for is inlined OpenMP: without it our loops run on one thread
    # the compiler that links a C++ extension (setuptools: $CXX, else Python's own CXX)
    link += shared_libstdcxx_link_args(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    if not want_cuda(torch.version.cuda is not None, toolkit):
        return [cpp_extension.CppExtension("amnets_kernels._C", cpu_sources,
                                           extra_compile_args={"cxx": cxx}, extra_link_args=link)], \
            cpp_extension.BuildExtension

    flags, names = gencode_flags(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS)
    include = nvidia_wheel_include()
    if include:
        # After the toolkit's own -I dirs, so its headers win where both have one.
        os.environ["CPATH"] = os.pathsep.join(filter(None, [os.environ.get("CPATH"), include]))
    define = [f'-DAMNETS_CUDA_ARCHS="{";".join(names)}"', "-DAMNETS_WITH_CUDA"]
    nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", *flags,
            # Every kernel must fit its registers: a spill fails the build, and -v prints the budget.
            "--ptxas-options=-v,--warn-on-spills,--warning-as-error", *define]
    ext = cpp_extension.CUDAExtension(
        "amnets_kernels._C", cpu_sources + sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
        extra_compile_args={"cxx": cxx + define, "nvcc": nvcc}, extra_link_args=link)
    return [ext], cpp_extension.BuildExtension


ext_modules, build_ext = extensions()
setup(
    packages=find_packages(include=["amnets_kernels", "amnets_kernels.*"])
    + ["amnets"] + [f"amnets.{p}" for p in find_packages("python/amnets")],
    package_dir={"amnets": "python/amnets"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
)
