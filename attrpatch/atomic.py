"""Atomic file output: a result is either absent or complete, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(f)`` on a temp file beside `path`, then move it into place (`os.replace`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj, **dump_kwargs) -> None:
    """`atomic_write` of ``json.dumps(obj)`` (indent 2 unless told otherwise)."""
    text = json.dumps(obj, **({"indent": 2} | dump_kwargs)) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def staging_dir(path: str | os.PathLike) -> Path:
    """A new empty directory beside `path`, to assemble it in before `replace_dir`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".staging", dir=path.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; outputs are meant to be shared
    return staging


def replace_dir(staging: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished directory `staging` to `path`, replacing what was there."""
    staging, path = Path(staging), Path(path)
    if not path.exists():
        staging.rename(path)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    try:
        path.rename(trash / path.name)
    except OSError:
        trash.rmdir()
        raise
    try:
        staging.rename(path)
    except OSError:
        (trash / path.name).rename(path)  # put the old one back
        trash.rmdir()
        raise
    shutil.rmtree(trash)
