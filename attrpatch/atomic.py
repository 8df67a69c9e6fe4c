"""Safe file output: a result is either absent or complete, never half-written, and writing it
never destroys a file attrpatch did not write.

Every writer of a whole directory (the command line's ``--out``, `save_model`, training) goes
through one rule, here:

- a directory is assembled in a hidden staging directory beside its target
  (``.<name>.XXXXXXXX.staging``, :func:`staging_dir`) and moved into place at the end
  (:func:`replace_dir`);
- an existing target is replaced only if every entry in it is a plain file that attrpatch wrote
  there, as the writer's record says (`ours`: :func:`listed_in_summary` for the command line's
  outputs, `attrpatch.loading.checkpoint_files` for checkpoints); checked before any work
  (:func:`check_target`) and again at the moment of the swap, so a file created in the target
  while a run was going survives it;
- the current directory, any directory above it, the home directory and ``/`` are never
  targets;
- a staging directory left by a killed run (SIGKILL, a power cut) is recognised by the next run
  into the same place and removed, with a note on stderr. A live run holds a lock on its own
  (``flock``), so concurrent runs never remove each other's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import IO

from attrpatch.interrupts import final_step

try:
    import fcntl
except ImportError:  # Windows: no flock, so leftover staging directories are left alone there
    fcntl = None

# directory -> the names in it that attrpatch wrote (see `listed_in_summary`)
Ours = Callable[[Path], Collection[str]]

_locks: dict[Path, int] = {}  # staging directory -> open descriptor holding its flock


class UnsafeOutputError(ValueError):
    """A target directory attrpatch must not replace: it holds files attrpatch did not write,
    it is the current, home or root directory (or above the current one), or it cannot be
    written. Nothing was replaced."""


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


# ----------------------------------------------------------------------------------------------
# Which directories may be replaced


def listed_in_summary(directory: Path) -> set[str]:
    """The files an attrpatch output directory's ``summary.json`` lists as written there (its
    ``files``); none if it has no such record."""
    try:
        files = json.loads((Path(directory) / "summary.json").read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(files, list) or "summary.json" not in files:
        return set()
    return {f for f in files if isinstance(f, str)}


def foreign_entries(directory: Path, ours: Ours) -> list[str]:
    """The sorted names of the entries of `directory` that attrpatch did not write: anything
    but a plain file (a subdirectory, a link) or a file `ours` does not name."""
    directory = Path(directory)
    names = set(ours(directory))
    return sorted(p.name for p in directory.iterdir()
                  if p.name not in names or p.is_symlink() or not p.is_file())


def refuse_unsafe_target(path: str | os.PathLike, ours: Ours, label: str = "path") -> Path:
    """`path` resolved, if attrpatch may replace it (absent, or a directory whose every entry
    `ours` names); else `UnsafeOutputError` naming the problem and a way out, with `label`
    (``--out``, say) for the target."""
    target = Path(path).resolve()
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current directory was deleted: nothing to protect there
        cwd = None
    if target == cwd:
        raise UnsafeOutputError(
            f"{label} {path} is the current directory; attrpatch replaces the whole directory it "
            f"writes, so name a new one inside it (e.g. {label} {Path(path) / 'attrpatch-out'})")
    if cwd is not None and target in cwd.parents:
        raise UnsafeOutputError(
            f"{label} {path} is {target}, which contains the current directory; attrpatch replaces "
            f"the whole directory it writes, so name a new one instead")
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home directory known
        home = None
    if target == home:
        raise UnsafeOutputError(f"{label} {path} is your home directory; name a new directory "
                                f"inside it instead")
    if target.parent == target:
        raise UnsafeOutputError(f"{label} {path} is the filesystem root; name a new directory instead")
    if target.exists() and not target.is_dir():
        raise UnsafeOutputError(f"{label} {target} exists and is not a directory; choose another "
                                f"{label}")
    if target.is_dir():
        try:
            foreign = foreign_entries(target, ours)
        except OSError as e:
            raise UnsafeOutputError(f"{label} {target}: cannot read it ({e.strerror}); choose "
                                    f"another {label}") from e
        if foreign:
            raise UnsafeOutputError(
                f"{label} {target} holds files attrpatch did not write ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); refusing to replace it. Choose a new or "
                f"empty {label}, or move those files away")
    return target


def check_target(path: str | os.PathLike, ours: Ours, label: str = "path") -> Path:
    """`refuse_unsafe_target`, and `path` must be writable: its nearest existing ancestor a
    directory we can create files in (and `path` too if it exists). Call it before any work;
    :func:`replace_dir` checks the rule again at the swap. Returns `path` resolved."""
    target = refuse_unsafe_target(path, ours, label)
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UnsafeOutputError(f"{label} {target}: {ancestor} is a file, not a directory")
    for where in [ancestor] + ([target] if target.is_dir() else []):
        try:  # a real probe: permissions, read-only filesystems and root all answer truthfully
            tempfile.TemporaryFile(dir=where).close()
        except OSError as e:
            raise UnsafeOutputError(f"{label} {target}: cannot write in {where} ({e.strerror}); "
                                    f"choose another {label}") from e
    return target


# ----------------------------------------------------------------------------------------------
# Staging directories and the swap


def staging_dir(path: str | os.PathLike) -> Path:
    """A new empty directory beside `path` (``.<name>.XXXXXXXX.staging``), to assemble it in
    before `replace_dir`. First removes the staging directories a killed earlier run left
    beside `path` (noted on stderr); this run's stays locked until it is moved or removed."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".staging", dir=path.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; outputs are meant to be shared
    _lock(staging)
    return staging


def remove_staging(staging: str | os.PathLike) -> None:
    """Delete a staging directory from `staging_dir` (nothing if it is gone: moved into place,
    or kept) and release its lock."""
    staging = Path(staging)
    shutil.rmtree(staging, ignore_errors=True)
    _unlock(staging)


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove the staging directories (``.<name>.XXXXXXXX.staging``) and moved-aside old outputs
    (``.<name>.XXXXXXXX.old``) that runs killed before they finished left beside `path`, and
    return them. One that a live run holds is left alone. An old output moved aside by a run
    killed in the middle of its swap goes back to `path` when `path` is missing."""
    path = Path(path).resolve()
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.(staging|old)")
    removed = []
    for entry in sorted(path.parent.iterdir()):
        kind = pattern.fullmatch(entry.name)
        if kind is None or entry.is_symlink() or not entry.is_dir() or not _unclaimed(entry):
            continue
        old = entry / path.name
        if kind[1] == "old" and old.is_dir() and not os.path.lexists(path):
            old.rename(path)
            sys.stderr.write(f"attrpatch: note: restored {path}, moved aside by an earlier run "
                             "that was killed while replacing it\n")
        shutil.rmtree(entry, ignore_errors=True)
        sys.stderr.write(f"attrpatch: note: removed {entry}, left by an earlier run that was "
                         "killed before it finished\n")
        removed.append(entry)
    return removed


def replace_dir(staging: str | os.PathLike, path: str | os.PathLike, ours: Ours,
                label: str = "path") -> None:
    """Move the finished directory `staging` (from `staging_dir`) to `path`, replacing what was
    there if `refuse_unsafe_target` allows it: the rule is checked again now, on the directory
    as it is at the swap, and once more after it is moved aside.

    If `path` may not be replaced (say a file was saved in it while the run was going), `path`
    is left as it was, the new directory is kept beside it under a visible name
    (``<name>.new``, ``<name>.new2``, ...) and `UnsafeOutputError` says where. Stop signals wait
    for the swap (:func:`attrpatch.interrupts.final_step`): it is a run's last step. The old
    directory is removed file by file (only the files `ours` names)."""
    staging = Path(staging)
    target = Path(path).resolve()
    with final_step():
        try:
            foreign = foreign_entries(target, ours) if target.is_dir() else []
            if foreign:
                raise UnsafeOutputError(f"{label} {target} gained files attrpatch did not write "
                                        f"while this run was going ({', '.join(foreign[:5])})")
            refuse_unsafe_target(target, ours, label)
            aside = None
            if target.is_dir():
                aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old",
                                              dir=target.parent))
                _lock(aside)
                old = aside / target.name
                target.rename(old)
                foreign = foreign_entries(old, ours)  # saved between the check and the move
                if foreign:
                    old.rename(target)
                    _discard(aside)
                    raise UnsafeOutputError(f"{label} {target} gained files attrpatch did not "
                                            f"write while this run was going "
                                            f"({', '.join(foreign[:5])})")
                names = set(ours(old))
            try:
                staging.rename(target)
            except OSError as e:  # `path` was created meanwhile, and is not empty
                if aside is not None:
                    (aside / target.name).rename(target)
                    _discard(aside)
                raise UnsafeOutputError(f"could not move the results into {label} {target} "
                                        f"({e.strerror})") from None
        except UnsafeOutputError as e:
            kept = _keep(staging, target)
            raise UnsafeOutputError(
                f"{e}; it was left as it is, and the new results are in {kept} (move them where "
                f"you want them, or rerun with another {label})" if kept
                else f"{e}; it was left as it is, and the new results were discarded") from None
        _unlock(staging)
        if aside is not None:
            _remove_old(aside / target.name, names, target)
            _discard(aside)


def _keep(staging: Path, target: Path) -> Path | None:
    """Move `staging` to a visible name beside `target` (``<name>.new``, ``<name>.new2``, ...)
    and return it (None, and `staging` removed, if there is no free name)."""
    for i in range(1, 1000):
        kept = target.with_name(f"{target.name}.new{i if i > 1 else ''}")
        if not os.path.lexists(kept):
            staging.rename(kept)
            _unlock(staging)
            return kept
    remove_staging(staging)
    return None


def _remove_old(old: Path, names: set[str], target: Path) -> None:
    """Delete the files of the replaced directory `old` that attrpatch wrote (`names`), then
    `old` itself; anything else (saved there at the last moment) is kept beside `target`."""
    for name in names:
        file = old / name
        if file.is_file() and not file.is_symlink():
            file.unlink()
    try:
        old.rmdir()
    except OSError:
        for i in range(1, 1000):
            kept = target.with_name(f"{target.name}.old{i if i > 1 else ''}")
            if not os.path.lexists(kept):
                old.rename(kept)
                sys.stderr.write(f"attrpatch: note: files saved in {target} while it was being "
                                 f"replaced are in {kept}\n")
                return


def _discard(aside: Path) -> None:
    shutil.rmtree(aside, ignore_errors=True)
    _unlock(aside)


def _lock(directory: Path) -> None:
    """Hold an exclusive flock on `directory` while this process works in it (released when
    the process ends, however it ends)."""
    if fcntl is None:
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a filesystem without flock: the directory is then never seen as stale
        os.close(fd)
        return
    _locks[directory] = fd


def _unlock(directory: Path) -> None:
    fd = _locks.pop(directory, None)
    if fd is not None:
        os.close(fd)


def _unclaimed(directory: Path) -> bool:
    """Whether no live process holds `directory`'s lock (False where that cannot be told)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
