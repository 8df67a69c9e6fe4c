"""The README stays true: its site table is the code's, its test command is what CI runs."""

from pathlib import Path

from attrpatch.sites import site_table_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_readme_site_table_is_the_code_table():
    assert site_table_markdown() in (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    marker = readme.index("# install and run the tests")
    assert "pytest" in readme[marker + 1]
    assert "# install and run the tests" in (ROOT / ".ci" / "run").read_text()
