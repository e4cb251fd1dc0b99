"""The README's API example runs as written (falling back to the reference face, as README says)."""

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
        for block in blocks:
            scope = {}
            exec(compile(block, "README.md", "exec"), scope)
            assert scope["loss"].ndim == 0 and scope["out"].shape == (100, 8, 256)
