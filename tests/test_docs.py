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


def test_readme_family_site_table_is_derived_from_the_configs():
    """The per-family site table, from configs converted from `transformers`' own configs."""
    import transformers
    from families import FAMILIES

    from attrpatch.arch import CONVERTERS
    from attrpatch.sites import family_sites_markdown

    def converted(config_cls, **kwargs):
        raw = getattr(transformers, config_cls)(**kwargs).to_dict()
        return CONVERTERS[raw["model_type"]].config_from_hf(raw)

    families = {name: converted(cls, **kwargs) for name, (cls, _, kwargs) in FAMILIES.items()}
    columns = {
        "GPT-2": converted("GPT2Config", n_layer=2, n_embd=32, n_head=4),
        "GPT-NeoX (parallel)": families["gpt_neox-parallel-partial-rotary"],
        "GPT-NeoX (sequential)": families["gpt_neox-sequential"],
        "Llama, Mistral, Qwen2, Gemma, Gemma 2": families["llama-gqa-llama3-rope"],
        "Qwen3, Gemma 3, OLMo 2": families["qwen3-qknorm-window"],
    }
    for name in ("mistral-window", "qwen2-biases-window", "gemma-mqa", "gemma2-softcap-window"):
        assert family_sites_markdown({"a": families[name]}) == family_sites_markdown(
            {"a": columns["Llama, Mistral, Qwen2, Gemma, Gemma 2"]}), name
    for name in ("gemma3_text-qknorm-local-rope", "olmo2-postnorm-qknorm"):
        assert family_sites_markdown({"a": families[name]}) == family_sites_markdown(
            {"a": columns["Qwen3, Gemma 3, OLMo 2"]}), name
    assert family_sites_markdown(columns) in README
