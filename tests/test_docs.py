"""The docs stay true: README site table and examples, the CI command, the notebooks."""

import json
import os
import re
import subprocess
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
    readme_command = lines[lines.index("# install and run the tests") + 1]
    assert "pytest" in readme_command
    ci = (ROOT / ".ci" / "run").read_text()
    extract = next(line for line in ci.splitlines() if line.startswith("cmd="))
    script = extract.removeprefix("cmd=$(").removesuffix(")")
    ci_command = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    assert ci_command == readme_command
    assert 'eval "$cmd"' in ci


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
