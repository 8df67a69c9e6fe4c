"""What a careless or hostile user meets: Ctrl-C at any moment, an --out holding other files or
out of reach, corrupt saved outputs, bad thresholds and lists, a metric swapped on resume, and
a zero gap. Each case gets exit 130 or a clear ``attrpatch: error:`` and nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_patching import make_task

from attrpatch.cli import main
from attrpatch.patching import patch
from attrpatch.results import PatchResults, Scores
from attrpatch.validation import validate

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "ioi-gpt2-4l"
CONSOLE = Path(sys.executable).parent / "attrpatch"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random GPT-2 checkpoint and a token-id data file for it."""
    from conftest import build_hf_gpt2

    root = tmp_path_factory.mktemp("reliability")
    build_hf_gpt2(seed=5).save_pretrained(root / "model")
    t = make_task(seed=2)
    np.savez(root / "data.npz", clean_tokens=np.asarray(t.clean_tokens),
             corrupt_tokens=np.asarray(t.corrupt_tokens), correct_tokens=np.asarray(t.correct_tokens),
             incorrect_tokens=np.asarray(t.incorrect_tokens))
    return root / "model", root / "data.npz"


def _scan(ckpt, out, *extra):
    model, data = ckpt
    return main(["scan", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet",
                 *extra])


def test_ctrl_c_at_any_moment_exits_130_and_keeps_the_old_output(tmp_path):
    """SIGINT (default disposition, as a launcher leaves it) at several moments of an all-sites
    exact scan: every time exit 130, no crash, the previous --out byte-for-byte as it was and no
    staging directory left. Before the interrupt handling, 2 of 5 such runs ended in a
    segmentation fault."""
    from attrpatch.tasks import task_for_model

    t = task_for_model(SHIPPED)
    data = tmp_path / "ioi.npz"
    np.savez(data, clean_tokens=np.asarray(t.clean_tokens), corrupt_tokens=np.asarray(t.corrupt_tokens),
             correct_tokens=np.asarray(t.correct_tokens), incorrect_tokens=np.asarray(t.incorrect_tokens))
    out = tmp_path / "o"
    # as a launcher that leaves SIGINT at its default starts it (a test runner may ignore it)
    default_sigint = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, "
                      "signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"]
    args = [*default_sigint, str(CONSOLE), "scan", "--model", str(SHIPPED), "--data", str(data),
            "--out", str(out), "--quiet"]
    env = dict(os.environ, MPLBACKEND="Agg")
    subprocess.run(args + ["--methods", "atp", "--sites", "resid_pre"], check=True, env=env,
                   capture_output=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for delay in (2.5, 5.0, 8.0, 11.0):
        proc = subprocess.Popen(
            args + ["--sites", "resid_pre", "attn_out", "mlp_out", "z", "z_by_pos"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        assert proc.poll() is None, "the scan finished before the signal; make it longer"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, (delay, proc.returncode, err)
        assert "Fatal Python error" not in err and "Traceback" not in err, err
        assert "interrupted; nothing written" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ioi.npz", "o"]


def test_out_with_files_attrpatch_did_not_write_is_refused(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    (out / "summary.json").write_text("{}")  # looks like an output, lists nothing
    assert _scan(tiny_ckpt, out, "--sites", "z") == 2
    assert "keep.txt" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "summary.json"]
    # a real output with one foreign file added is refused too; without it, replaced
    out2 = tmp_path / "o2"
    assert _scan(tiny_ckpt, out2, "--sites", "z", "--methods", "atp") == 0
    (out2 / "notes.md").write_text("mine")
    assert _scan(tiny_ckpt, out2, "--sites", "z", "--methods", "atp") == 2
    assert "notes.md" in capsys.readouterr().err and (out2 / "notes.md").read_text() == "mine"
    (out2 / "notes.md").unlink()
    assert _scan(tiny_ckpt, out2, "--sites", "attn_out", "--methods", "atp") == 0
    assert json.loads((out2 / "summary.json").read_text())["run"]["granularities"] == "attn_out"


@pytest.mark.parametrize("where", ["parent_is_file", "unwritable"])
def test_out_we_cannot_write_is_refused_before_compute(where, tiny_ckpt, tmp_path, capsys):
    if where == "parent_is_file":
        (tmp_path / "f").write_text("x")
        out, message = tmp_path / "f" / "o", "is a file"
    else:  # /proc takes no new files, whoever asks (these tests may run as root)
        out, message = Path("/proc/attrpatch-test-out"), "cannot write"
    t0 = time.perf_counter()
    assert _scan(tiny_ckpt, out, "--sites", "z") == 2
    err = capsys.readouterr().err
    assert "attrpatch: error:" in err and message in err and "--out" in err
    assert time.perf_counter() - t0 < 30  # refused up front: no compile, no compute
    assert sorted(p.name for p in tmp_path.iterdir()) == (["f"] if where == "parent_is_file" else [])


@pytest.mark.parametrize("damage", ["summary_not_json", "summary_list", "summary_no_run",
                                    "results_truncated", "results_empty", "diagnostics_junk"])
def test_validate_on_a_corrupt_output_is_a_clear_error(damage, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    assert _scan(tiny_ckpt, out, "--sites", "z") == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    name, content = {
        "summary_not_json": ("summary.json", b"{not json"),
        "summary_list": ("summary.json", b"[]"),
        "summary_no_run": ("summary.json", b'{"files": []}'),
        "results_truncated": ("results.npz", files["results.npz"][:100]),
        "results_empty": ("results.npz", b""),
        "diagnostics_junk": ("diagnostics.npz", os.urandom(300)),
    }[damage]
    (out / name).write_bytes(content)
    assert main(["validate", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"attrpatch: error: {out / name} is corrupt" in err
    assert (out / name).read_bytes() == content  # nothing rewritten


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1"])
def test_non_finite_or_negative_threshold_is_refused(value, tiny_ckpt, tmp_path, capsys):
    assert _scan(tiny_ckpt, tmp_path / "o", "--threshold", f"large={value}") == 2
    assert "large" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_lists_take_commas_or_spaces_and_suggest(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    assert _scan(tiny_ckpt, out, "--sites", "z,attn_out", "resid_pre", "--methods", "atp",
                 "exact") == 0
    with np.load(out / "results.npz") as f:
        assert set(f.files) == {f"{m}/{g}" for m in ("atp", "exact")
                                for g in ("z", "attn_out", "resid_pre")}
    assert _scan(tiny_ckpt, tmp_path / "o2", "--sites", "atn_out") == 2
    assert "did you mean 'attn_out'" in capsys.readouterr().err
    assert _scan(tiny_ckpt, tmp_path / "o2", "--methods", "atp,exct") == 2
    assert "did you mean 'exact'" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_resume_with_another_metric_of_the_same_name_is_refused(tiny_model, tmp_path):
    """The checkpoint fingerprint identifies the metric by its code and what it reads, not its
    name: a different function (or lambda) never reuses stale results; the same one resumes."""
    model, _ = tiny_model
    task = make_task(seed=3)
    ckpt = tmp_path / "ckpt"

    def metric(logits, task, reference):
        return logits[:, 0] - logits[:, 1]

    first = patch(model, task, ["attn_out"], metric=metric, progress=False, checkpoint_dir=ckpt)
    same = patch(model, task, ["attn_out"], metric=metric, progress=False, checkpoint_dir=ckpt)
    np.testing.assert_array_equal(first["attn_out"], same["attn_out"])

    def metric(logits, task, reference):  # noqa: F811  (same name, other function)
        return logits[:, 2] - logits[:, 1]

    with pytest.raises(ValueError, match="different model, task or options"):
        patch(model, task, ["attn_out"], metric=metric, progress=False, checkpoint_dir=ckpt)
    for k in (0, 2):  # lambdas differing only in a captured value
        with pytest.raises(ValueError, match="different model, task or options"):
            patch(model, task, ["attn_out"], metric=lambda lg, t, r, k=k: lg[:, k], progress=False,
                  checkpoint_dir=ckpt)
    handle = object()
    with pytest.raises(ValueError, match="no stable identity"):
        patch(model, task, ["attn_out"], metric=lambda lg, t, r: lg[:, 0] * (handle is not None),
              progress=False, checkpoint_dir=tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_zero_gap_gives_no_verdict():
    """Effects of nothing agree perfectly and prove nothing: a zero gap is "n/a", with why."""
    zeros = {"z": Scores("z", np.zeros((2, 4)))}
    atp = PatchResults("atp", "denoise", "logit_diff", 1.5, 1.5, zeros)
    exact = PatchResults("exact", "denoise", "logit_diff", 1.5, 1.5, zeros)
    v = validate(atp, exact)
    assert set(v.verdicts.values()) == {"n/a"}
    assert "gap" in v.note and v.to_json()["note"] == v.note


@pytest.mark.parametrize("methods", ["exact", "atp", "atp,exact"])
def test_non_finite_weights_are_refused_before_anything_is_written(methods, tiny_ckpt, tmp_path,
                                                                   capsys):
    """A NaN weight makes every metric NaN: refused with the cause named, exit 2, no --out
    (it used to give all-NaN results, a misleading traceback, or a TypeError after writing)."""
    from safetensors.numpy import load_file, save_file

    model_dir, data = tiny_ckpt
    broken = tmp_path / "nan-model"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    tensors = load_file(model_dir / "model.safetensors")
    w = tensors["transformer.h.1.mlp.c_proj.weight"].copy()
    w[0, 0] = np.nan
    tensors["transformer.h.1.mlp.c_proj.weight"] = w
    save_file(tensors, broken / "model.safetensors")
    rc = main(["scan", "--model", str(broken), "--data", str(data), "--sites", "z",
               "--methods", methods, "--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "metric is nan on prompt(s) [0, 1, 2]" in err and "NaN or infinite weights" in err
    assert not (tmp_path / "out").exists()
