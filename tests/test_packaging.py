"""A wheel carries its package and its shipped models: build one, install it into a fresh
virtual environment, and run the command line from an empty directory."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_with_its_models_and_runs_from_an_empty_directory(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")], check=True)
    wheel = next((tmp_path / "dist").glob("attrpatch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "attrpatch").rglob("__init__.py")}
    for package in packages:  # every subpackage of the source tree is in the wheel
        assert f"{package}/__init__.py" in names, package
    for model in (ROOT / "models").iterdir():
        for f in model.iterdir():
            assert f"attrpatch/models/{model.name}/{f.name}" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = venv / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # The dependencies come from this test environment (a path, not its editable attrpatch).
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    attrpatch = str(venv / "bin" / "attrpatch")
    help_text = subprocess.run([attrpatch, "demo", "--help"], cwd=empty, capture_output=True,
                               text=True, check=True).stdout
    assert "--out" in help_text
    listing = subprocess.run([attrpatch, "models"], cwd=empty, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert len(listing) == len(list((ROOT / "models").iterdir()))
    for line in listing:  # every model is the installed copy, not the checkout's
        assert str(site / "attrpatch" / "models") in line, line
    assert any("(demo default)" in line for line in listing)
