"""Packaging and benchmark-output checks that need no build: pyproject's torch range against CI's pin, the
GPU suite's pytest plugins declared, the benchmarks without matplotlib, the spread column, fixed plot
colours, and `python -m benchmarks` run beside a source folder that has no compiled extension."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLDEST_TORCH = "2.13.0"  # the oldest torch built and run against (README: the torch 2.13 install check)


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the package itself takes 3.10)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def requirement(requirements: list[str], name: str) -> Requirement:
    found = [Requirement(r) for r in requirements if Requirement(r).name == name]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def test_torch_is_a_range_that_admits_ci_pin():
    project = pyproject()
    torch_req = requirement(project["project"]["dependencies"], "torch")
    assert not any(s.operator in ("==", "===") for s in torch_req.specifier), torch_req
    # CI (`make install`, .ci/run) installs [build-system].requires before the build: the pin lives there
    pin = requirement(project["build-system"]["requires"], "torch")
    (exact,) = list(pin.specifier)
    assert exact.operator == "==", pin
    assert torch_req.specifier.contains(exact.version), (torch_req, exact.version)
    assert torch_req.specifier.contains(OLDEST_TORCH)
    assert any(s.operator == "<" for s in torch_req.specifier), "a C++ extension: cap the untried newer torch"
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    assert '["build-system"]["requires"]' in makefile, "the Makefile no longer installs the pinned stack"


def test_triton_is_not_pinned_exactly():
    # torch's CUDA wheels pin their own triton: an exact pin here would make pip swap the user's torch
    triton_req = requirement(pyproject()["project"]["dependencies"], "triton")
    assert not any(s.operator in ("==", "===") for s in triton_req.specifier), triton_req
    assert triton_req.specifier.contains("3.8.0") and triton_req.specifier.contains("3.6.0")


def test_gpu_suite_plugins_are_in_test_extra():
    with open(os.path.join(ROOT, "benchmarks", "gpu_suite.sh")) as f:
        script = f.read()
    extra = {Requirement(r).name for r in pyproject()["project"]["optional-dependencies"]["test"]}
    if re.search(r"\(-n \d+\)|pytest .* -n \d", script):
        assert "pytest-xdist" in extra
    if "--timeout" in script:
        assert "pytest-timeout" in extra


def fake_suite(device, quick, wanted):
    """A suite as benchmarks/harness.py describes them: a case is built only when wanted(its name)."""
    from benchmarks.harness import Candidate, Case

    def work():
        return torch.ones(8).sum()

    if not wanted("n=8"):
        return []
    return [Case("fake_op", "n=8", "fwd", {}, Candidate("dense", work, "baseline"),
                 [Candidate("amnets[cpu]", work, "face"), Candidate("torch BSR", work, "other")])]


def run_fake_benchmark(monkeypatch, tmp_path, capsys):
    import benchmarks.__main__ as bench

    monkeypatch.setattr(bench, "SUITES", {"fake": fake_suite})
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--quick", "--ops", "fake", "--out", str(tmp_path), "--name", "t"])
    finally:
        torch.set_num_threads(threads)
    return rc, capsys.readouterr()


def test_benchmarks_without_matplotlib_write_json_and_md(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    rc, out = run_fake_benchmark(monkeypatch, tmp_path, capsys)
    assert rc == 0
    assert "plots skipped: matplotlib is not installed" in out.err
    assert (tmp_path / "t.json").exists() and (tmp_path / "t.md").exists()
    assert not (tmp_path / "t.png").exists()
    assert "t.json/.md (" in out.err


def test_md_table_shows_spread(monkeypatch, tmp_path, capsys):
    rc, _ = run_fake_benchmark(monkeypatch, tmp_path, capsys)
    assert rc == 0
    md = (tmp_path / "t.md").read_text()
    assert "| min–max × |" in md
    face = next(line for line in md.splitlines() if "| amnets[cpu] |" in line)
    assert re.search(r"\| \d+\.\d\d–\d+\.\d\d \(\d+ rounds\) \|", face), face
    rows = {r["label"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    cpu = rows["amnets[cpu]"]
    assert cpu["ratio_min"] <= cpu["ratio"] <= cpu["ratio_max"]
    assert rows["dense"]["ratio_min"] is None  # the baseline has no ratio to itself


def test_plot_colours_fixed_per_label_across_panels():
    pytest.importorskip("matplotlib")
    import benchmarks.__main__ as bench

    def row(op, label, ratio):
        return {"op": op, "case": "c", "mode": "fwd", "label": label, "ratio": ratio, "ratio_min": ratio / 2,
                "ratio_max": ratio * 2}

    # panel 1 has amnets[cpu] alone; panel 2 has two other labels before it in sorted order
    rows = [row("a", "amnets[cpu]", 0.5), row("b", "PyTorch loop", 2.0), row("b", "amnets[cpu]", 0.7),
            row("b", "amnets[reference]", 3.0)]
    fig = bench.figure(rows)
    try:
        seen = {}
        for ax in fig.axes:
            for container in ax.containers:  # one errorbar container per label
                color = container.lines[0].get_color()
                assert seen.setdefault(container.get_label(), color) == color
        assert seen["amnets[cpu]"] != seen["PyTorch loop"] != seen["amnets[reference]"]
        assert len(seen) == 3
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    # our faces keep their colour whatever else a run has
    assert bench.label_colors(["amnets[cpu]"])["amnets[cpu]"] == \
        bench.label_colors(["amnets[cpu]", "a", "b", "torch BSR"])["amnets[cpu]"]


def test_source_folder_without_extension_does_not_shadow_installed_package(tmp_path):
    """`python -m benchmarks` from a clone root after a non-editable install: the root's amnets_kernels/
    (no compiled extension) comes first on sys.path. Here a stand-in folder that fails on import plays it,
    and the dev install plays the installed copy."""
    shadow = tmp_path / "amnets_kernels"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the source folder was imported')\n")
    os.symlink(os.path.join(ROOT, "benchmarks"), tmp_path / "benchmarks")
    code = ("import benchmarks.__main__ as m, amnets_kernels; "
            "print(m._PACKAGE_NOTE); print(amnets_kernels.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    note, location = done.stdout.strip().splitlines()[-2:]
    assert note.startswith("using the installed amnets_kernels") and str(shadow) in note
    assert not location.startswith(str(tmp_path))
