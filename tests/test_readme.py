"""The README's python examples run as written, in order, in one namespace (as a reader would paste them)."""

import pathlib
import re
import warnings

import amnets_kernels as ak


def test_readme_api_example_runs():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ak.FallbackWarning)
        scope = {}
        for block in blocks:
            exec(compile(block, "README.md", "exec"), scope)
    assert scope["loss"].ndim == 0 and scope["out"].shape == (100, 8, 256)
