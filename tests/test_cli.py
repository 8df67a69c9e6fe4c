"""The command line end to end on a tiny random checkpoint: outputs, re-validation, data formats,
and bad input (clear error, exit code 2, nothing written)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from html import escape
from pathlib import Path

import numpy as np
import pytest

from attrpatch.cli import DEMO_METHODS, main, sites_to_granularities
from attrpatch.data import DataError, load_task

N_VOCAB = 61
WORDS = ["<unk>"] + [f"w{i}" for i in range(1, N_VOCAB - 1)] + ["<bos>"]
DEMO_GRANS = ("resid_pre", "attn_out", "mlp_out", "z", "z_by_pos", "q", "k", "post")
SHIPPED = Path(__file__).resolve().parent.parent / "models" / "ioi-gpt2-4l"
ATTN_ONLY = Path(__file__).resolve().parent.parent / "models" / "attn-only-2l-induction"


def _no_nan(constant):
    raise AssertionError(f"summary.json is not strict JSON: {constant}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random GPT-2 checkpoint with a word-level tokenizer.json and a task file."""
    from conftest import build_hf_gpt2

    from attrpatch.tokenizer import word_level_tokenizer

    path = tmp_path_factory.mktemp("cli") / "tiny"
    build_hf_gpt2(seed=3).save_pretrained(path)
    word_level_tokenizer(WORDS).save(str(path / "tokenizer.json"))
    (path / "attrpatch_task.json").write_text(json.dumps(
        {"task": "induction", "args": {"n_prompts": 3, "seq_len": 4, "vocab": N_VOCAB}}))
    return path


@pytest.fixture(scope="module")
def npz_data(ckpt):
    rng = np.random.default_rng(0)
    clean = rng.integers(1, N_VOCAB, (3, 6))
    corrupt = clean.copy()
    corrupt[:, 2] = rng.integers(1, N_VOCAB, 3)
    path = ckpt.parent / "data.npz"
    np.savez(path, clean_tokens=clean, corrupt_tokens=corrupt,
             correct_tokens=rng.integers(1, N_VOCAB, 3), incorrect_tokens=rng.integers(1, N_VOCAB, 3))
    return path


def _report_refs(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def _check_outputs(out: Path, methods=("atp", "exact"), grans=("z", "attn_out")):
    summary = json.loads((out / "summary.json").read_text(), parse_constant=_no_nan)
    for name in summary["files"]:
        assert (out / name).is_file(), name
    with np.load(out / "results.npz") as f:
        keys = set(f.files)
        shapes = {k: f[k].shape for k in keys}
    graddrop = {f"graddrop/{g}" for g in grans} if "atp_star" in methods else set()
    assert keys == {f"{m}/{g}" for m in methods for g in grans} | graddrop
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == sum(int(np.prod(shapes[f"{m}/{g}"])) for m in methods for g in grans)
    assert {"method", "granularity", "component", "effect", "normalized", "flag"} <= set(rows[0])
    html = (out / "report.html").read_text()
    for ref in _report_refs(html):
        assert ref.startswith("data:image/png;base64,") or (out / ref).is_file(), ref
    # every figure is in the report: an image, or a heatmap whose cells show values on hover
    assert len(_report_refs(html)) + html.count("<div class='heatmap'>") == len(summary["figures"]) > 0
    for fig in summary["figures"]:
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return summary, rows, html


def test_scan_end_to_end_and_revalidate(ckpt, npz_data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["scan", "--model", str(ckpt), "--data", str(npz_data), "--sites", "z", "attn_out",
               "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "heads" in printed
    summary, rows, html = _check_outputs(out)
    v = summary["validation"]
    assert set(v["verdicts"]) == {"heads", "attention outputs"}
    for fam in ("heads", "attention outputs"):
        assert fam in html and v["verdicts"][fam] in html
    assert summary["run"]["command"].startswith("attrpatch")
    assert summary["run"]["versions"]["jax"]
    # what matters first, settings last; heatmap cells show their values on hover
    assert (html.index("Verdict per site family") < html.index("Flags (")
            < html.index("<div class='heatmap'>") < html.index("Run settings and thresholds"))
    # the csv effect column is the saved array, the normalised column effect / gap
    with np.load(out / "results.npz") as f:
        z = f["exact/z"]
    gap = summary["exact"]["gap"]
    row = next(r for r in rows if r["method"] == "exact" and r["granularity"] == "z"
               and r["index"] == "1,2")
    assert float(row["effect"]) == pytest.approx(z[1, 2], rel=1e-4, abs=1e-7)
    assert float(row["normalized"]) == pytest.approx(z[1, 2] / gap, rel=1e-4, abs=1e-6)
    # flags in the csv are those in summary.json
    n_flag_rows = sum(bool(r["flag"]) for r in rows if r["method"] == "exact")
    assert n_flag_rows == len(v["flags"])
    # re-validate with a threshold nothing can cross: no flags; files rewritten consistently
    rc = main(["validate", str(out), "--threshold", "large=1000"])
    assert rc == 0
    summary2, rows2, _ = _check_outputs(out)
    assert summary2["validation"]["flags"] == []
    assert summary2["validation"]["thresholds"]["large"] == 1000
    assert not any(r["flag"] for r in rows2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    # other recall thresholds: the columns follow them (summary, printout, report)
    capsys.readouterr()
    rc = main(["validate", str(out), "--threshold", "top_k=3", "--threshold", "top_share=0.25"])
    assert rc == 0
    printed = capsys.readouterr().out
    summary3, _, html3 = _check_outputs(out)
    stats = summary3["validation"]["by_family"]["heads"]
    assert [k for k in stats if k.startswith("recall@")] == ["recall@3", "recall@25%"]
    assert stats["recall@3"] is not None
    for text in (printed, html3):
        assert "recall@3" in text and "recall@25%" in text and "recall@10" not in text


def test_scan_compares_estimators_side_by_side(ckpt, npz_data, tmp_path, capsys):
    """Every estimator validated against exact with the same machinery: one column each in the
    printout, the summary and the report; AtP*'s GradDrop saved and read back by validate."""
    out = tmp_path / "out"
    methods = ("atp_star", "atp", "ig", "exact")
    rc = main(["scan", "--model", str(ckpt), "--data", str(npz_data), "--sites", "z,k",
               "--methods", ",".join(methods), "--steps", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    summary, rows, html = _check_outputs(out, methods, ("z", "k"))
    assert summary["primary"] == "atp_star" and summary["run"]["steps"] == 2
    assert list(summary["estimators"]) == ["atp_star", "atp", "ig"]
    assert summary["estimators"]["ig"]["cost_forwards"] == 2 + 3 * 2 * 2 * 2  # steps, layers, sites
    for fam in ("heads", "q/k/v"):
        assert set(summary["comparison"][fam]) == {"atp_star", "atp", "ig"}
    assert set(summary["validations"]) == {"atp", "ig"}  # the primary's is "validation"
    assert "Estimators side by side" in html and "estimators against exact" in printed
    # validation of each estimator uses its own numbers: AtP and AtP* agree on z, not on k
    comp = summary["comparison"]
    assert comp["heads"]["atp"]["pearson"] == pytest.approx(comp["heads"]["atp_star"]["pearson"])
    with np.load(out / "results.npz") as f:
        assert not np.allclose(f["atp/k"], f["atp_star/k"])
        graddrop = f["graddrop/z"]
    assert {r["method"] for r in rows} == set(methods)
    rc = main(["validate", str(out)])
    assert rc == 0
    summary2, _, _ = _check_outputs(out, methods, ("z", "k"))
    assert summary2["comparison"] == summary["comparison"]
    with np.load(out / "results.npz") as f:
        np.testing.assert_array_equal(f["graddrop/z"], graddrop)


def test_validate_reads_outputs_written_before_estimators(ckpt, npz_data, tmp_path):
    """An output directory from before several estimators (its summary has "atp", not
    "estimators") is still re-validated."""
    out = tmp_path / "old"
    assert main(["scan", "--model", str(ckpt), "--data", str(npz_data), "--sites", "z",
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    summary["atp"] = summary.pop("estimators")["atp"]
    for key in ("primary", "comparison", "validations", "verify_until"):
        summary.pop(key)
    (out / "summary.json").write_text(json.dumps(summary))
    assert main(["validate", str(out), "--threshold", "large=0.2"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["primary"] == "atp" and again["validation"]["thresholds"]["large"] == 0.2


def test_scan_verify_until(ckpt, npz_data, tmp_path, capsys):
    """--verify-until: exact patching in the estimator's order until the rest is bounded; the
    statement is printed, saved and reported, and the verified effects are exact's."""
    out = tmp_path / "until"
    rc = main(["scan", "--model", str(ckpt), "--data", str(npz_data), "--sites", "post",
               "--methods", "atp_star", "--verify-until", "0.05", "--verify-budget", "150",
               "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    summary, _, html = _check_outputs(out, ("atp_star", "exact"), ("post",))
    report = summary["verify_until"]["post"]
    assert report["sentence"] in printed and escape(report["sentence"]) in html
    assert report["n_components"] == 256 and 0 < len(report["ranked"]) + len(report["random"]) <= 150
    assert "95% confidence" in report["sentence"]
    with np.load(out / "results.npz") as f:
        assert np.isfinite(f["exact/post"]).sum() == len(report["ranked"]) + len(report["random"])
    rc = main(["scan", "--model", str(ckpt), "--data", str(npz_data), "--methods", "atp,exact",
               "--verify-until", "0.05", "--out", str(tmp_path / "x")])
    assert rc == 2 and "drop exact" in capsys.readouterr().err


def test_interrupted_exact_writes_nothing(ckpt, npz_data, tmp_path, monkeypatch, capsys):
    """Ctrl-C during exact patching: the engine returns NaN-filled partial results with a
    warning; the CLI must not commit them as complete (exit 130, nothing written, a previous
    output left as it was)."""
    import warnings

    import attrpatch.patching
    from attrpatch.results import PatchResults, Scores

    def interrupted_patch(model, task, granularities, direction, metric, progress, **kw):
        warnings.warn("patch: interrupted; returning partial results (NaN where not computed)",
                      stacklevel=2)
        z = np.full((2, 4), np.nan)
        z[0] = 0.1  # layer 0 finished, layer 1 not
        return PatchResults("exact", direction, "logit_diff", 0.0, 1.0, {"z": Scores("z", z)})

    def incomplete_patch(*args, **kw):  # a `complete` flag and no warning
        res = interrupted_patch(*args, **kw)
        res.complete = False
        return res

    out = tmp_path / "out"
    args = ["scan", "--model", str(ckpt), "--data", str(npz_data), "--sites", "z", "--out",
            str(out), "--quiet"]
    for fake in (interrupted_patch, incomplete_patch):
        monkeypatch.setattr(attrpatch.patching, "patch", fake)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = main(args)
        assert rc == 130
        assert "interrupted; nothing written" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # no out, no staging dir
    # a previous complete output survives an interrupted rerun untouched
    monkeypatch.undo()
    assert main(args) == 0
    before = (out / "summary.json").read_text()
    monkeypatch.setattr(attrpatch.patching, "patch", interrupted_patch)
    assert main(args) == 130
    assert (out / "summary.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_json_safe_maps_non_finite_to_null():
    from attrpatch.cli import json_safe

    x = {"a": float("nan"), "b": [np.float32(np.inf), 1.5, np.int64(3)], "c": np.array([np.nan, 2.0]),
         "d": None, "e": "s", "f": (True,)}
    assert json.dumps(json_safe(x), allow_nan=False) == (
        '{"a": null, "b": [null, 1.5, 3], "c": [null, 2.0], "d": null, "e": "s", "f": [true]}')


@pytest.mark.skipif(not (ATTN_ONLY / "config.json").is_file(), reason="attention-only model absent")
def test_scan_attention_only_default_sites(tmp_path):
    """The default --sites on an attention-only model: mlp_out dropped, not an error."""
    rng = np.random.default_rng(1)
    clean = rng.integers(1, 60, (2, 6))
    corrupt = clean.copy()
    corrupt[:, 2] = rng.integers(1, 60, 2)
    data = tmp_path / "d.npz"
    np.savez(data, clean_tokens=clean, corrupt_tokens=corrupt, correct_tokens=[3, 4],
             incorrect_tokens=[5, 6])
    out = tmp_path / "out"
    rc = main(["scan", "--model", str(ATTN_ONLY), "--data", str(data), "--methods", "atp",
               "--out", str(out), "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["estimators"]["atp"]["granularities"] == ["resid_pre", "attn_out", "z"]


def test_budgeted_scan(ckpt, npz_data, tmp_path):
    out = tmp_path / "budget"
    rc = main(["scan", "--model", str(ckpt), "--data", str(npz_data), "--sites", "z",
               "--methods", "atp", "--verify-top", "2", "--verify-random", "3", "--out", str(out),
               "--quiet"])
    assert rc == 0
    summary, rows, _ = _check_outputs(out, grans=("z",))
    with np.load(out / "results.npz") as f:
        assert np.isfinite(f["exact/z"]).sum() == 5
        assert np.isfinite(f["atp/z"]).all()
    b = summary["budget"]["z"]
    assert len(b["top"]) == 2 and len(b["random"]) == 3 and b["n_rest"] == b["n_components"] - 2
    assert summary["validation"]["by_granularity"]["z"]["n"] == 5


def test_demo_and_python_m(ckpt, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "attrpatch", "demo", "--model", str(ckpt), "--out", str(out),
         "--quiet"], capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "report:" in proc.stdout
    summary, _, html = _check_outputs(out, DEMO_METHODS, DEMO_GRANS)
    # a tokenizer exists: axes carry token strings
    assert summary["tokens"] and all(isinstance(t, str) for t in summary["tokens"])
    # neurons: exact on AtP's top 64 plus 32 random others, with the missed-effect estimate
    b = summary["budget"]["post"]
    assert len(b["top"]) == 64 and len(b["random"]) == 32 and b["n_components"] == 2 * 128
    with np.load(out / "results.npz") as f:
        assert np.isfinite(f["exact/post"]).sum() == 96


@pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="shipped IOI model not built")
def test_demo_shipped_model(tmp_path):
    """The default demo: the shipped IOI model, AtP + exact + validation + report."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "attrpatch", "demo", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary, _, html = _check_outputs(out, DEMO_METHODS, DEMO_GRANS)
    assert Path(summary["run"]["model"]).resolve() == SHIPPED
    assert abs(summary["exact"]["gap"]) > 0.5  # a trained model: clean and corrupt differ
    verdicts = summary["validation"]["verdicts"]
    assert set(verdicts) == {
        "residual stream", "attention outputs", "MLP outputs", "heads", "q/k/v", "neurons"}
    assert verdicts["heads"] == "reliable"  # the model card: Pearson 1.000, no high flags
    with np.load(out / "results.npz") as f:
        z = f["exact/z"]
    layer, head = np.unravel_index(np.argmax(np.abs(z)), z.shape)
    assert (layer, head) == (3, 2)  # the card's finding: L3H2 is the largest head


def test_demo_on_the_shipped_llama_model(tmp_path):
    """`demo --model` on the Llama-architecture IOI model: the same kind of findings as the
    default demo (noising: AtP misses the residual-stream patches that carry the names, with
    causes; the largest head by exact patching is the card's)."""
    out = tmp_path / "demo"
    model = SHIPPED.parent / "ioi-llama-4l"
    proc = subprocess.run([sys.executable, "-m", "attrpatch", "demo", "--model", str(model), "--out",
                           str(out), "--quiet"], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary, _, html = _check_outputs(out, DEMO_METHODS, DEMO_GRANS)
    assert summary["exact"]["gap"] < -5  # noising removes the answer
    assert summary["validation"]["verdicts"]["residual stream"] == "unreliable"
    flags = summary["validation"]["flags"]
    assert any(f["granularity"] == "resid_pre" and f["kind"] == "false negative" and f["causes"]
               for f in flags), flags[:3]
    with np.load(out / "results.npz") as f:
        z = f["exact/z"]
        assert f["exact/k"].shape == (4, 2)  # per kv head
    assert np.unravel_index(np.argmax(np.abs(z)), z.shape) == (0, 2)  # the card's L0H2
    assert "L0H2" in html


def test_sites_mapping():
    assert sites_to_granularities(["z", "resid_pre"]) == ["z", "resid_pre"]
    assert sites_to_granularities(["z", "pattern", "post"], by_pos=True) == [
        "z", "z_by_pos", "pattern", "pattern_by_query", "post", "post_by_pos"]
    assert sites_to_granularities("q,k_by_pos") == ["q", "k_by_pos"]


# ----------------------------------------------------------------------------------------------
# Data formats


def test_text_formats_agree(ckpt, tmp_path):
    prompts = [("w1 w2 w3 w4", "w1 w5 w3 w4", "w2", "w5"), ("w7 w8 w9", "w7 w10 w9", "w8", "w10")]
    plain = [dict(clean=c, corrupt=x, answer=a, wrong_answer=w) for c, x, a, w in prompts]
    auto = {"prompts": [dict(clean=c, corrupt=x, answers=[a], wrong_answers=[w])
                        for c, x, a, w in prompts]}
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    (tmp_path / "auto.json").write_text(json.dumps(auto))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(p) for p in plain))
    with open(tmp_path / "p.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["clean", "corrupt", "answer", "wrong_answer"])
        w.writeheader()
        w.writerows(plain)
    tasks = [load_task(tmp_path / n, model_dir=ckpt) for n in ("plain.json", "auto.json", "p.jsonl", "p.csv")]
    ref = tasks[0]
    np.testing.assert_array_equal(ref.clean_tokens, [[1, 2, 3, 4], [7, 8, 9, 0]])
    np.testing.assert_array_equal(ref.corrupt_tokens[0], [1, 5, 3, 4])
    np.testing.assert_array_equal(ref.attention_mask, [[1, 1, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(np.asarray(ref.correct_tokens)[:, 0], [2, 8])
    for t in tasks[1:]:
        for k in ("clean_tokens", "corrupt_tokens", "correct_tokens", "incorrect_tokens", "attention_mask"):
            np.testing.assert_array_equal(getattr(t, k), getattr(ref, k))
    with_bos = load_task(tmp_path / "auto.json", model_dir=ckpt, prepend_bos=True)
    np.testing.assert_array_equal(with_bos.clean_tokens, [[60, 1, 2, 3, 4], [60, 7, 8, 9, 0]])
    np.testing.assert_array_equal(with_bos.answer_positions, [4, 3])


BAD = {
    "missing key": ({"clean_tokens": [[1, 2]], "corrupt_tokens": [[1, 3]], "correct_tokens": [1]},
                    "missing key.*incorrect_tokens"),
    "mismatched lengths": ({"clean_tokens": [[1, 2, 3]], "corrupt_tokens": [[1, 3]],
                            "correct_tokens": [1], "incorrect_tokens": [2]}, "ragged|same shape"),
    "out of vocabulary": ({"clean_tokens": [[1, 2]], "corrupt_tokens": [[1, 99]],
                           "correct_tokens": [1], "incorrect_tokens": [2]}, "outside the vocabulary"),
    "answer out of vocabulary": ({"clean_tokens": [[1, 2]], "corrupt_tokens": [[1, 3]],
                                  "correct_tokens": [70], "incorrect_tokens": [2]},
                                 "outside the vocabulary"),
    "multi-token answer": ([{"clean": "w1 w2", "corrupt": "w1 w3", "answer": "w4 w5",
                             "wrong_answer": "w6"}], "not exactly\\s+one"),
    "unknown answer word": ([{"clean": "w1 w2", "corrupt": "w1 w3", "answer": "zebra",
                              "wrong_answer": "w6"}], "not in the tokenizer"),
    "text lengths differ": ([{"clean": "w1 w2", "corrupt": "w1 w3 w4", "answer": "w4",
                              "wrong_answer": "w6"}], "same length"),
    "float token ids": ({"clean_tokens": [[1.5, 2.0]], "corrupt_tokens": [[1, 3]],
                         "correct_tokens": [1], "incorrect_tokens": [2]}, "must be an integer array"),
    "bool token ids": ({"clean_tokens": [[True, False]], "corrupt_tokens": [[1, 3]],
                        "correct_tokens": [1], "incorrect_tokens": [2]}, "must be an integer array"),
    "missing text field": ([{"clean": "w1 w2", "corrupt": "w1 w3", "answer": "w4"}],
                           "missing or empty field.*wrong_answer"),
    "empty auto-circuit answers": ({"prompts": [{"clean": "w1 w2", "corrupt": "w1 w3", "answers": [],
                                                 "wrong_answers": ["w6"]}]},
                                   "missing or empty field.*answers"),
    "wrong-typed text field": ([{"clean": 5, "corrupt": "w1 w3", "answer": "w4",
                                 "wrong_answer": "w6"}], "clean must be a string, got 5"),
    "no prompts": ({"prompts": []}, "non-empty list of prompts"),
    "answers as a dict": ({"prompts": [{"clean": "w1 w2", "corrupt": "w1 w3",
                                        "answers": {"w4": 1}, "wrong_answers": ["w6"]}]},
                          "answers must be a string or a list of strings"),
    "attention mask of 2": ({"clean_tokens": [[1, 2]], "corrupt_tokens": [[1, 3]],
                             "correct_tokens": [1], "incorrect_tokens": [2],
                             "attention_mask": [[1, 2]]}, "attention_mask holds 2"),
    "ids beyond int32": ({"clean_tokens": [[1, 2**33 + 1]], "corrupt_tokens": [[1, 3]],
                          "correct_tokens": [1], "incorrect_tokens": [2]},
                         "clean_tokens holds 8589934593: token ids must be in 0..2147483647"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_clear_error_and_nothing_written(case, ckpt, tmp_path, capsys):
    content, message = BAD[case]
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(content))
    out = tmp_path / "out"
    rc = main(["scan", "--model", str(ckpt), "--data", str(data), "--sites", "z", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "attrpatch: error:" in err and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]  # no out, no temp dir


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"], ids=["empty", "truncated"])
def test_unreadable_npz_is_a_clear_error(content, ckpt, tmp_path, capsys):
    data = tmp_path / "bad.npz"
    data.write_bytes(content)
    rc = main(["scan", "--model", str(ckpt), "--data", str(data), "--sites", "z", "--out",
               str(tmp_path / "out")])
    assert rc == 2
    assert "not a readable .npz file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


def test_bad_arguments_nothing_written(ckpt, npz_data, tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        (["--sites", "nonsense"], "unknown site"),
        (["--methods", "atp,magic"], "--methods"),
        (["--threshold", "bogus=1"], "bad --threshold"),
        (["--methods", "exact", "--verify-top", "2"], "need an estimator"),
        (["--methods", "ig", "--steps", "0"], "--steps must be"),
    ]
    for extra, message in cases:
        rc = main(["scan", "--model", str(ckpt), "--data", str(npz_data), "--out", str(out), *extra])
        assert rc == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    rc = main(["scan", "--model", str(tmp_path / "nope"), "--data", str(npz_data), "--out", str(out)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    # an existing directory that is not an attrpatch output is never overwritten
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    rc = main(["scan", "--model", str(ckpt), "--data", str(npz_data), "--sites", "z", "--out", str(out)])
    assert rc == 2 and "refusing" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_load_task_checks_model(ckpt, npz_data):
    from attrpatch.loading import load_model

    model = load_model(ckpt)
    task = load_task(npz_data, model=model)
    assert task.clean_tokens.shape == (3, 6)
    with pytest.raises(DataError, match="does not exist"):
        load_task(ckpt / "missing.npz")


def test_token_labels_read_byte_level_and_sentencepiece_tokens():
    from attrpatch.tokenizer import display_token

    assert [display_token(t) for t in ("\u0120Mary", "\u2581Mary", "<0x0A>", "\u010a", "to")] == [
        " Mary", " Mary", "\\n", "\\n", "to"]


def test_models_lists_every_shipped_model(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shipped = sorted(p.name for p in SHIPPED.parent.iterdir() if (p / "config.json").is_file())
    assert [line.split()[0] for line in lines] == shipped
    assert any("(demo default)" in line and line.startswith("ioi-gpt2-4l") for line in lines)
    assert all("layers, d_model" in line for line in lines)


def test_compiled_once_across_runs(ckpt, npz_data, tmp_path):
    """The command line keeps compiled computations on disk: a second identical run compiles
    nothing new (no new cache files) and gives the same results; --no-compile-cache writes none."""
    env = dict(os.environ, ATTRPATCH_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("ATTRPATCH_COMPILE_CACHE")  # conftest turns the cache off for in-process tests
    args = [sys.executable, "-m", "attrpatch", "scan", "--model", str(ckpt), "--data",
            str(npz_data), "--sites", "z", "--methods", "atp,exact", "--quiet"]
    entries = []
    for run in ("a", "b"):
        subprocess.run([*args, "--out", str(tmp_path / run)], env=env, check=True,
                       capture_output=True)
        entries.append(sorted(p.name for p in (tmp_path / "cache" / "jax").iterdir()))
    assert entries[0] and entries[1] == entries[0]
    with np.load(tmp_path / "a" / "results.npz") as a, np.load(tmp_path / "b" / "results.npz") as b:
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])
    env["ATTRPATCH_CACHE_DIR"] = str(tmp_path / "off")
    subprocess.run([*args, "--no-compile-cache", "--out", str(tmp_path / "c")], env=env,
                   check=True, capture_output=True)
    assert not (tmp_path / "off").exists()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_show_on_a_terminal_only_and_quiet_silences_them(monkeypatch):
    from attrpatch.progress import progress_bar

    for terminal, enabled, shown in ((True, True, True), (True, False, False), (False, True, False)):
        err = _Terminal() if terminal else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        with progress_bar(3, enabled, "exact edges", unit="edge", delay=0) as bar:
            bar.update(3)
        assert ("exact edges" in err.getvalue()) == shown, (terminal, enabled)
        if shown:  # tqdm's bar: share done, count, elapsed<remaining time, rate in the unit
            assert all(p in err.getvalue() for p in ("%|", "/3 [00:00<", "edge/s"))


def test_verify_command_of_an_unreliable_family_runs(ckpt, tmp_path):
    """The report's command for an unreliable family is a valid scan of exactly that family, and
    a shipped model's task file is accepted as --data."""
    import shlex

    from attrpatch.cli import build_parser
    from attrpatch.report import verify_command

    run = {"model": str(ckpt), "data": str(ckpt / "attrpatch_task.json"), "out": str(tmp_path / "o"),
           "direction": "noise", "metric": "logit_diff"}
    command = verify_command(run, "q/k/v", ["q", "k"], "atp_star")
    assert command.endswith(f"--out {tmp_path / 'o'}-verify-qkv")
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.sites, args.methods, args.direction) == (["q,k"], ["atp_star,exact"], "noise")
    args.out, args.quiet = str(tmp_path / "verify"), True
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "verify" / "summary.json").read_text())
    assert set(summary["exact"]["granularities"]) == {"q", "k"}
