"""Nothing attrpatch writes destroys a file it did not write, and every stop signal ends a run
either with the previous output untouched (exit 130 / 143 / 129, nothing written) or with the new
output complete (exit 0): never a half-replaced directory, a traceback, or a staging directory
left behind after the next run.

Runs use the shipped attention-only model (the fastest). "During the run" is made deterministic
by hooks at fixed points (after the outputs are written, between the check at the swap and the
move), and signals are sent when the run has visibly reached a stage (JAX loaded, the staging
directory created), not after guessed delays."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from attrpatch import atomic, cli
from attrpatch.atomic import UnsafeOutputError, remove_leftovers, staging_dir
from attrpatch.cli import main

ATTN_ONLY = Path(__file__).resolve().parent.parent / "models" / "attn-only-2l-induction"
DATA = ATTN_ONLY / "attrpatch_task.json"
CONSOLE = Path(sys.executable).parent / "attrpatch"
FAST = ["--methods", "atp", "--sites", "z", "--quiet"]
# as a launcher that leaves the stop signals at their defaults starts it (a test runner may not)
DEFAULT_SIGNALS = [sys.executable, "-c", "import os, signal, sys\n"
                   "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):\n"
                   "    signal.signal(s, signal.SIG_DFL)\n"
                   "os.execv(sys.argv[1], sys.argv[1:])"]
ENV = dict(os.environ, MPLBACKEND="Agg")


def _scan_args(out, *extra) -> list[str]:
    return ["scan", "--model", str(ATTN_ONLY), "--data", str(DATA), "--out", str(out), *extra]


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".staging", ".old")))


def _complete(out: Path) -> bool:
    """Whether `out` is a whole attrpatch output: every file its summary lists, and no other."""
    files = json.loads((out / "summary.json").read_text())["files"]
    return sorted(files) == sorted(p.name for p in out.iterdir())


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> Path:
    """A complete scan output, copied by each test that needs an earlier --out."""
    out = tmp_path_factory.mktemp("previous") / "out"
    assert main(_scan_args(out, *FAST)) == 0
    return out


# ----------------------------------------------------------------------------------------------
# A user's file is never lost


@pytest.mark.parametrize("case", ["new_out", "previous_out", "between_check_and_move"])
def test_file_saved_in_out_during_the_run_survives(case, previous, tmp_path, monkeypatch, capsys):
    """The user saves ``thesis.tex`` in --out while the scan runs: in a directory that did not
    exist at the start, in an earlier output, or in the instant between the check at the swap
    and the swap itself. The file survives, --out is left as it is, exit 2 names the file, and
    the new results are kept, complete, in ``out.new``."""
    out = tmp_path / "out"
    if case != "new_out":
        shutil.copytree(previous, out)
    before = _contents(out) if out.exists() else {}
    real_write = cli.write_outputs

    def save_thesis():
        out.mkdir(exist_ok=True)
        (out / "thesis.tex").write_text("\\chapter{Mine}")

    def write_outputs(*args, **kwargs):  # the outputs are in staging; the swap comes next
        summary = real_write(*args, **kwargs)
        if case == "between_check_and_move":
            real_refuse = atomic.refuse_unsafe_target

            def refuse_then_save(*args, **kwargs):  # the check at the swap passes, then the file
                target = real_refuse(*args, **kwargs)
                save_thesis()
                return target

            monkeypatch.setattr(atomic, "refuse_unsafe_target", refuse_then_save)
        else:
            save_thesis()
        return summary

    monkeypatch.setattr(cli, "write_outputs", write_outputs)
    assert main(_scan_args(out, *FAST)) == 2
    err = capsys.readouterr().err
    assert "thesis.tex" in err and "gained files attrpatch did not write" in err, err
    assert f"new results are in {out}.new" in err, err
    assert _contents(out) == before | {"thesis.tex": b"\\chapter{Mine}"}
    assert _complete(tmp_path / "out.new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.new"]  # no staging, no .old


@pytest.mark.parametrize("where", ["dot", "cwd", "parent", "home"])
def test_current_parent_and_home_directories_are_refused(where, tmp_path, monkeypatch, capsys):
    """``--out .`` (even an empty working directory), the working directory by its path, a
    directory above it, and home: refused before any compute, nothing changed anywhere."""
    work = tmp_path / "home" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out, message = {"dot": (".", "is the current directory"),
                    "cwd": (str(work), "is the current directory"),
                    "parent": ("..", "contains the current directory"),
                    "home": (str(tmp_path / "home"), "is your home directory")}[where]
    if where == "home":
        monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    assert main(_scan_args(out, *FAST)) == 2
    err = capsys.readouterr().err
    assert "attrpatch: error: --out" in err and message in err, err
    assert time.perf_counter() - t0 < 20  # refused up front
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["home", "home/work"]


def test_the_filesystem_root_is_refused():
    with pytest.raises(UnsafeOutputError, match="filesystem root|contains the current directory"):
        atomic.check_target("/", atomic.listed_in_summary, "--out")


# ----------------------------------------------------------------------------------------------
# save_model and training


@pytest.fixture(scope="module")
def model():
    from attrpatch.loading import load_model

    return load_model(ATTN_ONLY)


def _same_params(a, b) -> bool:
    import jax

    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params),
                                                    jax.tree.leaves(b.params), strict=True))


def test_save_model_refuses_a_directory_with_foreign_files(model, tmp_path):
    """`save_model` into ``mine/`` holding ``thesis.tex`` (alone, or beside a checkpoint):
    refused, nothing written, nothing left beside it."""
    from attrpatch.loading import save_model

    alone, beside = tmp_path / "alone", tmp_path / "beside"
    alone.mkdir()
    (alone / "thesis.tex").write_text("mine")
    save_model(model, beside, extra_files={"README.md": "card"})
    (beside / "thesis.tex").write_text("mine")
    for mine in (alone, beside):
        before = _contents(mine)
        with pytest.raises(UnsafeOutputError, match="thesis.tex"):
            save_model(model, mine, extra_files={"README.md": "card"})
        assert _contents(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone", "beside"]


def test_save_model_replaces_its_own_checkpoint(model, tmp_path):
    """A checkpoint `save_model` wrote (sharded, with an index and extra files) is replaced by
    a new one; the old shards go, the new one loads back with the same weights."""
    from attrpatch.loading import load_model, save_model

    path = tmp_path / "ckpt"
    save_model(model, path, extra_files={"README.md": "old card", "tokenizer.json": "{}"},
               max_shard_bytes=20_000)
    assert (path / "model.safetensors.index.json").is_file()
    save_model(model, path, extra_files={"README.md": "new card"})
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (path / "README.md").read_text() == "new card"
    assert _same_params(load_model(path), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_model_into_the_working_directory_is_refused(model, tmp_path, monkeypatch):
    from attrpatch.loading import save_model

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for path in (".", str(work), ".."):
        with pytest.raises(UnsafeOutputError, match="current directory"):
            save_model(model, path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["work"]


def test_save_model_failure_or_change_mid_write_loses_nothing(model, tmp_path, monkeypatch):
    """A full disk while writing: the old checkpoint stays and no staging directory is left. A
    file saved in the target while the checkpoint is written: it survives, the old checkpoint
    stays, and the new one is kept, loadable, in ``<name>.new``."""
    import attrpatch.loading
    from attrpatch.loading import load_model, save_model

    path = tmp_path / "ckpt"
    save_model(model, path, extra_files={"README.md": "old"})
    before = _contents(path)
    real_save_file = attrpatch.loading.save_file

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(attrpatch.loading, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_model(model, path, extra_files={"README.md": "new"})
    assert _contents(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    def save_then_user_writes(*args, **kwargs):
        real_save_file(*args, **kwargs)
        (path / "notes.txt").write_text("mine")

    monkeypatch.setattr(attrpatch.loading, "save_file", save_then_user_writes)
    with pytest.raises(UnsafeOutputError, match=r"notes\.txt.*new results are in .*ckpt\.new"):
        save_model(model, path, extra_files={"README.md": "new"})
    assert _contents(path) == before | {"notes.txt": b"mine"}
    assert (tmp_path / "ckpt.new" / "README.md").read_text() == "new"
    assert _same_params(load_model(tmp_path / "ckpt.new"), model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ckpt.new"]


def test_train_refuses_a_directory_with_foreign_files_before_training(tmp_path, monkeypatch, capsys):
    """``python -m attrpatch.train induction --out mine`` with ``mine/thesis.tex``, and ``--out
    .``: refused before any training (exit 2, a message naming the file), nothing written."""
    from attrpatch import train

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(train, "train", no_training)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    with pytest.raises(UnsafeOutputError, match="thesis.tex"):
        train.build("induction", mine, steps=1, log=None)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["induction", "--out", str(mine), "--steps", "1"])
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err
    monkeypatch.chdir(mine)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["induction", "--out", ".", "--steps", "1"])
    assert exit_info.value.code == 2
    assert "current directory" in capsys.readouterr().err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["mine",
                                                                                "mine/thesis.tex"]


# ----------------------------------------------------------------------------------------------
# Staging directories


def test_leftover_staging_is_removed_by_the_next_run_and_a_live_one_is_not(previous, tmp_path,
                                                                          monkeypatch, capsys):
    """A killed run's ``.out.XXXXXXXX.staging`` (and ``.old``) beside --out is removed by the
    next run into the same place, with a note; one that a live run holds is left alone; an old
    output moved aside by a run killed mid-swap goes back in place."""
    out = tmp_path / "out"
    shutil.copytree(previous, out)
    for name in (".out.abcd1234.staging", ".out.efgh5678.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "half.npz").write_bytes(b"half")
    (tmp_path / ".outer.abcd1234.staging").mkdir()  # another target's: not ours to touch
    assert main(_scan_args(out, *FAST)) == 0
    err = capsys.readouterr().err
    assert err.count("attrpatch: note: removed") == 2, err
    assert _leftovers(tmp_path) == [".outer.abcd1234.staging"] and _complete(out)

    live = staging_dir(out)  # held by this process, as a concurrent run holds its own
    assert remove_leftovers(out) == [] and live.is_dir()
    atomic.remove_staging(live)

    aside = tmp_path / ".out.ijkl9012.old"
    aside.mkdir()
    out.rename(aside / "out")
    before = _contents(aside / "out")
    assert remove_leftovers(out) == [aside]
    assert _contents(out) == before and "restored" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Signals on the command line (a subprocess, as a user runs it)


def _start(out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([*DEFAULT_SIGNALS, str(CONSOLE), *_scan_args(out, "--quiet", *extra)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until(proc: subprocess.Popen, ready, what: str) -> None:
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.communicate()}")
        assert time.monotonic() - t0 < 120, f"no {what} after 120 s"
        time.sleep(0.005)


def _jax_loaded(pid: int) -> bool:
    try:
        return "jaxlib" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("signum, when", [
    (signal.SIGTERM, "loading"), (signal.SIGTERM, "computing"), (signal.SIGTERM, "computing+1.5s"),
    (signal.SIGHUP, "loading"), (signal.SIGHUP, "computing+1.5s"),
])
def test_sigterm_and_sighup_stop_the_run_and_write_nothing(signum, when, previous, tmp_path):
    """SIGTERM (`timeout`, SLURM, ``docker stop``) and SIGHUP (a closed terminal) are handled
    like Ctrl-C: exit 143 / 129 with a one-line message and no traceback, the previous --out
    byte for byte as it was, and no staging directory left, at once or after the next run."""
    out = tmp_path / "out"
    shutil.copytree(previous, out)
    before = _contents(out)
    proc = _start(out, "--sites", "z")  # AtP and exact patching: several seconds of compute
    if when == "loading":
        if not Path(f"/proc/{proc.pid}").is_dir():
            pytest.fail("this test reads /proc/PID/maps (Linux)")
        _wait_until(proc, lambda: _jax_loaded(proc.pid), "JAX was loaded")
    else:
        _wait_until(proc, lambda: _leftovers(tmp_path), "the staging directory appeared")
        if when == "computing+1.5s":
            time.sleep(1.5)
            assert proc.poll() is None, "the scan finished before the signal; make it longer"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, (when, proc.returncode, err)
    assert "Traceback" not in err and "Fatal Python error" not in err, err
    assert f"interrupted by {signal.Signals(signum).name}; nothing written" in err, err
    assert _contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigkill_leaves_a_staging_directory_that_the_next_run_removes(previous, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(previous, out)
    before = _contents(out)
    proc = _start(out, "--sites", "z")
    _wait_until(proc, lambda: _leftovers(tmp_path), "the staging directory appeared")
    time.sleep(0.5)
    proc.kill()
    proc.communicate(timeout=60)
    assert _contents(out) == before
    stale = _leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".out.")
    assert main(_scan_args(out, *FAST)) == 0
    assert f"removed {tmp_path / stale[0]}" in capsys.readouterr().err
    assert _leftovers(tmp_path) == [] and _complete(out)


# Runs the command line with stop signals sent to itself at a fixed point of the swap: just
# after the old output is moved aside (into ``.out.XXXXXXXX.old``), before the new one is in
# place ("swap"), or once it is, while the summary prints ("after"). Three signals: the second
# and third would quit at once anywhere else.
SIGNAL_AT = """
import os, pathlib, signal, sys, time
from attrpatch import cli

def stop():
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        os.kill(os.getpid(), s)
        time.sleep(0.05)

when = sys.argv[1]
if when == "swap":
    real = pathlib.Path.rename
    def rename(self, target):
        moved = real(self, target)
        if pathlib.Path(target).parent.name.endswith(".old"):
            stop()
        return moved
    pathlib.Path.rename = rename
else:
    real = cli.print_summary
    def print_summary(*args, **kwargs):
        stop()
        return real(*args, **kwargs)
    cli.print_summary = print_summary
sys.argv = ["attrpatch", *sys.argv[2:]]
cli.console_main()
"""


@pytest.mark.parametrize("when", ["swap", "after"])
def test_signals_during_or_after_the_swap_exit_0_with_the_complete_output(when, previous, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(previous, out)
    before = _contents(out)
    proc = subprocess.run([*DEFAULT_SIGNALS, sys.executable, "-c", SIGNAL_AT, when,
                           *_scan_args(out, "--methods", "atp", "--sites", "attn_out", "--quiet")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "the output is complete; finishing" in proc.stderr
    assert _complete(out) and _contents(out) != before
    assert json.loads((out / "summary.json").read_text())["run"]["granularities"] == "attn_out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
