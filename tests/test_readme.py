"""Every ```python block of README.md runs as written (on the shipped bundle), each in a fresh namespace; the
block that renders is skipped, with the reason, where no OpenGL backend can render."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code, request, capsys):
    if "render" in code:
        request.getfixturevalue("gl_renderer")  # skips where MuJoCo cannot render
    exec(compile(code, "README.md python block", "exec"), {"__name__": "readme"})
