"""The docs stay true: README site table and examples, the CI command, the notebooks."""

import json
import os
import re
from pathlib import Path

import matplotlib
import pytest

from attrpatch.sites import site_table_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_site_table_is_the_code_table():
    assert site_table_markdown() in README


def test_ci_runs_the_readme_test_command():
    lines = README.splitlines()
    marker = lines.index("# install and run the tests")
    assert "pytest" in lines[marker + 1]
    assert "# install and run the tests" in (ROOT / ".ci" / "run").read_text()


def _run_in_repo_root(code: str) -> dict:
    matplotlib.use("Agg")
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(code, "<docs>", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for block in blocks:
        _run_in_repo_root(block)


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_executes(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    _run_in_repo_root(code)  # any cell that raises fails the test
