"""Validation: agreement numbers on hand-computable arrays, flags, planted failures, budgets."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from attrpatch.model import Model
from attrpatch.results import PatchResults, Scores
from attrpatch.task import Task
from attrpatch.validation import (
    Diagnostics,
    Thresholds,
    agreement,
    budget_report,
    budget_sample,
    diagnose,
    estimator_label,
    exact_components,
    pearson,
    rankdata,
    severity,
    spearman,
    top_k_recall,
    validate,
    verify_budgeted,
)


def results(method, values: dict, base=0.0, source=2.0, graddrop=None):
    return PatchResults(method, "denoise", "logit_diff", base, source,
                        {g: Scores(g, np.asarray(v, float)) for g, v in values.items()},
                        graddrop=graddrop)


# ----------------------------------------------------------------------------------------------
# Statistics on synthetic arrays


def test_rankdata_average_ties():
    np.testing.assert_array_equal(rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])


def test_pearson_spearman_hand_values():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    # x = [1,2,3], y = [1,3,2]: cov = 0.5 * 2 / 2 ... r = 0.5 by hand
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    # monotone but nonlinear: Spearman 1, Pearson < 1
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert pearson(x, x**3) < 0.99
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])


def test_correlations_nan_without_warnings():
    """Constant input and n < 2 give NaN quietly (scipy warns on constant input)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
        assert np.isnan(spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
        assert np.isnan(pearson([1.0], [2.0])) and np.isnan(spearman([], []))
        assert spearman([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
        assert pearson([0.0, 1.0], [3.0, 1.0]) == pytest.approx(-1.0)


def test_top_k_recall_hand_values():
    exact = np.array([5.0, -4.0, 3.0, 0.1, 0.2])
    atp = np.array([5.0, 0.0, 3.0, 4.0, 0.2])
    # exact top 2 = {0, 1}; atp top 2 = {0, 3} -> 1/2
    assert top_k_recall(exact, atp, 2) == 0.5
    # top 3: exact {0,1,2}, atp {0,3,2} -> 2/3
    assert top_k_recall(exact, atp, 3) == pytest.approx(2 / 3)
    assert top_k_recall(exact, atp, 5) == 1.0


def test_agreement_numbers():
    exact = np.array([1.0, 2.0, 3.0, -1.0, 0.0])
    atp = np.array([1.5, 2.5, 3.5, -0.5, 0.5])  # exact + 0.5: slope 1, intercept 0.5
    s = agreement(atp, exact, gap=-4.0)
    assert s["n"] == 5
    assert s["pearson"] == pytest.approx(1.0)
    assert s["slope"] == pytest.approx(1.0)
    assert s["intercept"] == pytest.approx(0.5)
    assert s["median_abs_error"] == pytest.approx(0.5)
    assert s["max_abs_error"] == pytest.approx(0.5)
    assert s["median_abs_error_share"] == pytest.approx(0.5 / 4)
    # sign agreement over |exact| >= 0.02 * 4: four components, all same sign
    assert s["sign_agreement"] == 1.0
    atp2 = np.array([1.0, 2.0, -3.0, 1.0, 0.0])
    assert agreement(atp2, exact, 4.0)["sign_agreement"] == 0.5
    # NaNs (components not computed) are dropped
    s3 = agreement(np.r_[atp, 9.0], np.r_[exact, np.nan], 4.0)
    assert s3["n"] == 5 and s3["max_abs_error"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------
# Flags on synthetic results (gap = 2, so large = 0.2, small = 0.04 in metric units)


def test_flag_kinds_and_order():
    exact = np.array([[1.0, 0.0, 0.5, 0.4], [0.6, 0.7, 0.01, -0.5]])
    atp = np.array([[0.01, 0.0, 0.5, 1.2], [-0.6, 0.7, 0.9, -0.5]])
    v = validate(results("atp", {"z": atp}), results("exact", {"z": exact}))
    kinds = {f.index: f.kind for f in v.flags}
    assert kinds == {(0, 0): "false negative", (0, 3): "magnitude error",
                     (1, 0): "sign flip", (1, 2): "false positive"}
    sev = [f.severity for f in v.flags]
    assert sev == sorted(sev, reverse=True)
    assert v.flags[0].index == (1, 0) and v.flags[0].level == "high"  # |-0.6 - 0.6| / 2 = 0.6
    assert v.flags[0].severity == pytest.approx(0.6)
    assert v.flag_grids["z"][0, 0] == "false negative" and v.flag_grids["z"][0, 2] == ""
    assert v.verdicts["heads"] == "unreliable"


def test_agreeing_components_not_flagged_and_thresholds_override():
    rng = np.random.default_rng(1)
    exact = rng.normal(size=(3, 4))
    v = validate(results("atp", {"z": exact.copy()}), results("exact", {"z": exact}))
    assert v.flags == [] and v.verdicts["heads"] == "reliable"
    atp = exact.copy()
    atp[0, 0] = exact[0, 0] + 0.5  # |err| = 0.25 of gap: flagged by default
    v = validate(results("atp", {"z": atp}), results("exact", {"z": exact}))
    assert [f.index for f in v.flags] == [(0, 0)]
    loose = Thresholds().replace(large=0.5)
    assert validate(results("atp", {"z": atp}), results("exact", {"z": exact}), thresholds=loose).flags == []
    # uncorrelated but negligible next to the gap (|err| < 0.02 * 2): reliable, not flagged
    tiny_e, tiny_a = 1e-3 * rng.normal(size=(3, 4)), 1e-3 * rng.normal(size=(3, 4))
    v = validate(results("atp", {"z": tiny_a}), results("exact", {"z": tiny_e}))
    assert abs(v.by_family["heads"]["pearson"]) < 0.95 and v.verdicts["heads"] == "reliable"
    v = validate(results("atp", {"z": 10 * tiny_a}), results("exact", {"z": 10 * tiny_e}),
                 thresholds=Thresholds(small=0.001))
    assert v.by_family["heads"]["pearson"] == pytest.approx(0.1619, abs=1e-3)
    assert v.verdicts["heads"] == "unreliable"  # Pearson 0.16 < 0.8, errors not negligible
    with pytest.raises(ValueError, match="unknown threshold"):
        Thresholds().replace(not_a_threshold=1)


def test_sign_flip_below_large_atp():
    """Opposite signs with a large exact effect and a non-negligible AtP are a sign flip, even
    when |AtP| is below `large` (gap 2: exact +0.12 of it, AtP -0.05 of it)."""
    exact, atp = np.array([[0.24, 0.0]]), np.array([[-0.10, 0.0]])
    v = validate(results("atp", {"z": atp}), results("exact", {"z": exact}))
    assert [(f.index, f.kind) for f in v.flags] == [((0, 0), "sign flip")]
    # a negligible AtP of the other sign is a false negative, not a sign flip
    v = validate(results("atp", {"z": [[-0.01, 0.0]]}), results("exact", {"z": exact}))
    assert [(f.index, f.kind) for f in v.flags] == [((0, 0), "false negative")]


def test_sign_flip_at_small_effects():
    """Opposite signs are a sign flip once both are at least `small` (2% of the gap), not only
    when the exact effect is large: +5% against -5% is flagged, +1% against -1% is not."""
    exact, est = np.array([[0.10, 0.02, 0.0]]), np.array([[-0.10, -0.02, 0.0]])  # gap 2
    v = validate(results("atp", {"z": est}), results("exact", {"z": exact}))
    assert [(f.index, f.kind) for f in v.flags] == [((0, 0), "sign flip")]
    assert v.flags[0].severity == pytest.approx(0.1) and v.flags[0].level == "low"
    assert "AtP -0.1 (-5%)" in v.flags[0].reason


def test_severity_is_continuous_across_the_old_ratio_band():
    """An estimate of 0.507 and one of 0.499 against an exact 1.0 (units of the gap) get nearly
    the same severity and are both flagged; severity has no jump anywhere as the ratio moves."""
    t = Thresholds()
    assert severity(0.499, 1.0) == pytest.approx(0.501)
    assert severity(0.507, 1.0) == pytest.approx(0.483, abs=1e-3)
    assert abs(severity(0.499, 1.0) - severity(0.507, 1.0)) < 0.02
    exact = np.array([[2.0, 2.0]])  # gap 2: exact = 1.0 of the gap
    v = validate(results("atp", {"z": [[0.998, 1.014]]}), results("exact", {"z": exact}))
    sev = {f.index: f.severity for f in v.flags}
    assert [f.kind for f in v.flags] == ["magnitude error"] * 2
    assert sev[(0, 0)] == pytest.approx(0.501) and sev[(0, 1)] == pytest.approx(0.483, abs=1e-3)
    # a fine sweep of the estimate (same sign, through ratio 2 and down to a sign change):
    # the largest step in severity is of the order of the step in the estimate
    grid = np.linspace(-0.5, 2.5, 30001)
    s = severity(grid, 1.0, t)
    assert np.abs(np.diff(s)).max() < 5 * (grid[1] - grid[0])
    assert severity(1.0, 1.0) == 0.0 and severity(0.9, 1.0) < severity(0.7, 1.0) < severity(0.5, 1.0)
    # far from ratio 1 it is the absolute error (every kind of flag under the defaults)
    assert severity(-0.3, 0.3) == pytest.approx(0.6) and severity(0.01, 1.0) == pytest.approx(0.99)


def test_unreliable_family_without_flags_names_its_drivers():
    """No flag rule fires (every effect below `large`), Pearson is poor: the verdict still names
    the component behind it, by leave-one-out, and it is in the JSON."""
    exact = np.array([[0.15, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07]])  # gap 2: large = 0.2
    est = exact.copy()
    est[0, 0] = 0.0
    v = validate(results("atp", {"z": est}), results("exact", {"z": exact}))
    assert v.flags == [] and v.verdicts["heads"] == "unreliable"
    first = v.drivers["heads"][0]
    assert first["label"] == "z:L0H0" and first["flag"] == "" and first["index"] == [0, 0]
    assert (first["estimate"], first["exact"]) == (0.0, 0.15)
    assert "without it Pearson" in first["why"] and first["pearson_without"] == pytest.approx(1.0)
    assert v.to_json()["drivers"]["heads"][0]["label"] == "z:L0H0"
    # leave-one-out Pearson matches a recomputation for every driver
    for d in v.drivers["heads"]:
        if "pearson_without" in d:
            keep = [i for i in range(8) if i != d["index"][1]]
            assert d["pearson_without"] == pytest.approx(pearson(exact[0, keep], est[0, keep]))
    # top-K recall moves too: with K = 5 of 8, removing the missed component fixes it
    v5 = validate(results("atp", {"z": est}), results("exact", {"z": exact}),
                  thresholds=Thresholds(top_k=(3,)))
    assert "recall@3 0.67 -> 1.00" in v5.drivers["heads"][0]["why"]
    # a reliable family names none
    same = validate(results("atp", {"z": exact}), results("exact", {"z": exact}))
    assert same.verdicts["heads"] == "reliable" and same.drivers == {}


def test_drivers_list_flagged_components_first():
    exact = np.array([[1.0, 0.0, 0.5, 0.4], [0.6, 0.7, 0.01, -0.5]])
    atp = np.array([[0.01, 0.0, 0.5, 1.2], [-0.6, 0.7, 0.9, -0.5]])
    v = validate(results("atp", {"z": atp}), results("exact", {"z": exact}))
    drivers = v.drivers["heads"]
    assert [d["flag"] for d in drivers[:4]] == [f.kind for f in v.flags]
    assert drivers[0]["label"] == v.flags[0].label == "z:L1H0"


def test_causes_and_better_estimators_from_other_estimators():
    """q components (gap 2, unit 2): (0,0) AtP misses what AtP*'s QK fix gets; (0,1) every
    signed estimate misses it but GradDrop is large (cancellation) and IG is right."""
    exact = np.array([[2.0, 2.0, 0.0]])
    atp = results("atp", {"q": [[0.1, 0.02, 0.0]]})
    # (0,0)'s GradDrop is large next to AtP but not next to AtP*'s QK-fixed estimate: saturation,
    # not cancellation
    star = results("atp_star", {"q": [[1.8, 0.02, 0.0]]}, graddrop={"q": np.array([[1.5, 1.6, 0.0]])})
    ig = results("ig", {"q": [[0.3, 1.9, 0.0]]})
    ex = results("exact", {"q": exact})
    v = validate(atp, ex, estimators={"atp_star": star, "ig": ig})
    flags = {f.index: f for f in v.flags}
    assert set(flags) == {(0, 0), (0, 1)} and all(f.kind == "false negative" for f in v.flags)
    f0, f1 = flags[(0, 0)], flags[(0, 1)]
    assert f0.causes == ["attention saturation or softmax nonlinearity"]
    assert f0.better == ["atp_star"] and f0.estimator == "atp"
    assert "AtP* (QK fix) agrees with exact (+1.8)" in f0.reason
    assert f0.others == {"atp_star": 1.8, "ig": pytest.approx(0.3)}
    assert f1.causes == ["cancellation"] and f1.better == ["ig"]
    assert "GradDrop magnitude 1.6 against AtP* +0.02" in f1.reason
    assert "IG agrees with exact (+1.9)" in f1.reason
    # the same without other estimators: no such causes
    plain = validate(atp, ex)
    assert all(f.causes == [] and f.better == [] for f in plain.flags)
    # AtP* as the validated estimator: its own flags, named AtP*, with AtP's value for the QK cause
    vs = validate(star, ex, estimators={"atp": atp, "ig": ig})
    assert vs.estimator == "atp_star" and [f.index for f in vs.flags] == [(0, 1)]
    assert vs.flags[0].reason.startswith("false negative: exact +2 (+100% of |gap|), AtP* +0.02")
    assert vs.flags[0].causes == ["cancellation"] and vs.flags[0].better == ["ig"]
    assert vs.to_json()["flags"][0]["estimator"] == "atp_star"
    # IG validated: labelled IG; AtP* named as the better one on (0,0)
    vi = validate(ig, ex, estimators={"atp": atp, "atp_star": star})
    assert [f.index for f in vi.flags] == [(0, 0)] and " IG +0.3 " in vi.flags[0].reason
    assert vi.flags[0].better == ["atp_star"]
    # the QK cause is for q/k only: on z the same numbers give no saturation cause
    vz = validate(results("atp", {"z": [[0.1, 0.02, 0.0]]}), results("exact", {"z": exact}),
                  estimators={"atp_star": results("atp_star", {"z": [[1.8, 0.02, 0.0]]})})
    fz = {f.index: f for f in vz.flags}[(0, 0)]
    assert "attention saturation or softmax nonlinearity" not in fz.causes
    assert "AtP* agrees with exact (+1.8)" in fz.reason  # no "(QK fix)" off q/k
    # other estimators must be comparable
    noisy = PatchResults("ig", "noise", "logit_diff", 0.0, 2.0, {"q": Scores("q", np.zeros((1, 3)))})
    with pytest.raises(ValueError, match=r"estimators\['ig'\] \(IG\) is noise"):
        validate(atp, ex, estimators={"ig": noisy})
    with pytest.raises(ValueError, match="shape"):
        validate(atp, ex, estimators={"ig": results("ig", {"q": np.zeros((2, 3))})})
    assert [estimator_label(m) for m in ("atp", "atp_star", "ig", "ig_inputs", "other")] == [
        "AtP", "AtP*", "IG", "IG (inputs)", "other"]


def test_family_without_verified_components_is_na():
    atp = {"z": np.ones((2, 2)), "attn_out": np.ones((2, 3))}
    exact = {"z": np.full((2, 2), np.nan), "attn_out": np.ones((2, 3))}
    v = validate(results("atp", atp), results("exact", exact))
    assert v.by_family["heads"]["n"] == 0 and v.verdicts["heads"] == "n/a"
    assert v.verdicts["attention outputs"] == "reliable"


def test_validate_refuses_incomparable_results():
    a = {"z": np.ones((2, 2))}
    noise = PatchResults("exact", "noise", "logit_diff", 0.0, 2.0, {"z": Scores("z", np.ones((2, 2)))})
    with pytest.raises(ValueError, match="denoise but exact is noise"):
        validate(results("atp", a), noise)
    other_metric = PatchResults("exact", "denoise", "prob", 0.0, 2.0, {"z": Scores("z", np.ones((2, 2)))})
    with pytest.raises(ValueError, match="metric"):
        validate(results("atp", a), other_metric)
    with pytest.raises(ValueError, match="different tasks or models"):
        validate(results("atp", a, base=0.0), results("exact", a, base=0.7, source=2.7))
    validate(results("atp", a, base=0.0), results("exact", a, base=1e-4))  # float noise is fine
    ablation = results("exact", a)
    ablation.source = "zero"  # PatchResults.source: what exact patching patched in
    with pytest.raises(ValueError, match="ablation"):
        validate(results("atp", a), ablation)


def test_families_pool_granularities_and_mismatch_errors():
    a = {"resid_pre": np.ones((2, 3)), "resid_post": np.ones((2, 3)), "z": np.zeros((2, 2))}
    v = validate(results("atp", a), results("exact", a))
    assert v.by_family["residual stream"]["n"] == 12
    assert set(v.by_family) == {"residual stream", "heads"}
    with pytest.raises(ValueError, match="no granularity in common"):
        validate(results("atp", {"z": np.ones((2, 2))}), results("exact", {"k": np.ones((2, 2))}))
    with pytest.raises(ValueError, match="shape"):
        validate(results("atp", {"z": np.ones((2, 2))}), results("exact", {"z": np.ones((2, 3))}))


def test_budget_report_estimate():
    atp = np.arange(100.0).reshape(10, 10)
    top, rand = budget_sample(atp, 10, 9, seed=3)
    assert {tuple(i) for i in top} == {(9, j) for j in range(10)}  # the 10 largest |AtP|
    assert len(rand) == 9 and not {tuple(i) for i in rand} & {tuple(i) for i in top}
    exact = np.zeros((10, 10))
    for i in rand[:3]:
        exact[tuple(i)] = 1.0
    r = budget_report("z", atp, exact, top, rand, threshold=0.5)
    assert r.random_above == 3 and r.n_rest == 90
    assert r.missed_estimate == pytest.approx(3 / 9 * 90)
    assert r.missed_estimate < r.missed_upper <= 90
    assert r.max_random_abs == 1.0


# ----------------------------------------------------------------------------------------------
# Real models: planted saturation, linear paths, budgeted verification


def _with_blocks(model: Model, fn, **config_changes) -> Model:
    params = jax.tree.map(lambda x: x, model.params)
    params["blocks"] = fn(dict(params["blocks"]))
    return Model(dataclasses.replace(model.config, **config_changes), params)


def _task(model, seed=0, batch=4, n_pos=8, diff_pos=3):
    """Random prompts differing at one position; answers where clean and corrupt differ most."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(1, model.config.d_vocab, (batch, n_pos))
    corrupt = clean.copy()
    corrupt[:, diff_pos] = rng.integers(1, model.config.d_vocab, batch)
    d = np.asarray(model(clean))[:, -1] - np.asarray(model(corrupt))[:, -1]
    return Task(clean, corrupt, d.argmax(1), d.argmin(1))


def _saturate(model, layer, head, qk_scale=6.0, out_scale=4.0):
    def fn(b):
        for k in ("W_Q", "W_K"):
            b[k] = b[k].at[layer, :, head].multiply(qk_scale)
        for k in ("b_Q", "b_K"):
            b[k] = b[k].at[layer, head].multiply(qk_scale)
        b["W_O"] = b["W_O"].at[layer, head].multiply(out_scale)
        return b

    return _with_blocks(model, fn)


def test_planted_attention_saturation_is_flagged_with_cause(tiny_model):
    from attrpatch.attribution import attribute
    from attrpatch.patching import patch

    layer, head = 1, 2
    model = _saturate(tiny_model[0], layer, head)
    task = _task(model)
    grans = ("q", "k")
    atp = attribute(model, task, granularities=grans)
    exact = patch(model, task, granularities=grans, progress=False)
    diag = diagnose(model, task, grans)
    for g in grans:  # the diagnostics' base-gradient estimate is AtP, computed independently
        np.testing.assert_allclose(diag.estimate_base[g], atp[g], rtol=1e-3, atol=1e-5)
    sat = diag.attn_saturation["k"][layer]
    assert sat[head] >= 0.95 and np.all(np.delete(sat, head) < 0.95)
    v = validate(atp, exact, diag)
    planted = [f for f in v.flags if f.index == (layer, head)]
    assert planted, "the saturated head's q/k patch should be flagged"
    for f in planted:
        assert f.kind == "false negative"
        assert f.causes[0] == "attention saturation"
        assert "near one-hot" in f.reason
    # no other component gets the saturation cause
    assert all(f.index == (layer, head) for f in v.flags if "attention saturation" in f.causes)
    # the unplanted model: that head agrees
    base = tiny_model[0]
    task0 = _task(base)
    v0 = validate(attribute(base, task0, granularities=grans),
                  patch(base, task0, granularities=grans, progress=False), diagnose(base, task0, grans))
    assert not [f for f in v0.flags if f.index == (layer, head)]


def test_linear_path_not_flagged(tiny_model):
    """With LayerNorm made linear (huge eps, weights rescaled) and the last MLP's input cut,
    every last-layer site feeds the logit difference linearly: AtP is exact there and validation
    must not flag it (earlier layers stay nonlinear through attention and GELU)."""
    from attrpatch.attribution import attribute
    from attrpatch.patching import patch

    base = tiny_model[0]
    eps = 1e8

    def fn(b):
        for k in ("ln1_w", "ln2_w"):
            b[k] = b[k] * np.sqrt(eps)
        b["W_in"] = b["W_in"].at[-1].set(0.0)
        return b

    model = _with_blocks(base, fn, norm_eps=eps)
    model = Model(model.config, dict(model.params, ln_f_w=model.params["ln_f_w"] * np.sqrt(eps)))
    task = _task(model)
    grans = ("z", "attn_out", "resid_post")
    atp = attribute(model, task, granularities=grans)
    exact = patch(model, task, granularities=grans, progress=False)
    diag = diagnose(model, task, grans)
    v = validate(atp, exact, diag)
    last = model.config.n_layers - 1
    for g in grans:
        np.testing.assert_allclose(atp[g][last], exact[g][last], atol=1e-4 * abs(exact.gap) + 1e-6)
        assert np.all(diag.nonlinearity[g][last] < 0.05)
        assert np.abs(exact[g][last]).max() > 0.01 * abs(exact.gap)  # not trivially zero
    assert not [f for f in v.flags if f.index[0] == last]


def test_budgeted_verification_matches_full_exact(tiny_model):
    from attrpatch.attribution import attribute
    from attrpatch.patching import patch

    model = tiny_model[0]
    task = _task(model, seed=2)
    atp = attribute(model, task, granularities=("z", "resid_pre"))
    exact_b, reports = verify_budgeted(model, task, atp, top_k=3, n_random=2, seed=0)
    full = patch(model, task, granularities=("z", "resid_pre"), progress=False)
    for g in ("z", "resid_pre"):
        done = np.isfinite(exact_b[g])
        assert done.sum() == 5
        np.testing.assert_allclose(exact_b[g][done], full[g][done], atol=1e-4)
        top = {tuple(i) for i in reports[g].top}
        assert top == {tuple(i) for i in np.argwhere(done)} - {tuple(i) for i in reports[g].random}
    assert exact_b.base_metric == pytest.approx(full.base_metric, abs=1e-5)
    v = validate(atp, exact_b)
    assert v.by_granularity["z"]["n"] == 5


def test_diagnostics_ignore_padding_and_k_by_pos_uses_answer_row(tiny_model):
    """Padded positions do not count: changing the padding tokens of the corrupted prompts
    (padding the model never reads) leaves every diagnostic unchanged. `k_by_pos` saturation is
    the answer row's, over prompts whose answer row sees the key."""
    model = tiny_model[0]
    rng = np.random.default_rng(5)
    clean = rng.integers(1, model.config.d_vocab, (3, 7))
    corrupt = clean.copy()
    corrupt[:, 2] = rng.integers(1, model.config.d_vocab, 3)
    mask = np.ones((3, 7), int)
    mask[0, 5:] = 0  # prompt 0 has 5 real tokens
    clean[0, 5:] = corrupt[0, 5:] = 0
    task = Task(clean, corrupt, [3, 4, 5], [6, 7, 8], attention_mask=mask)
    corrupt2 = corrupt.copy()
    corrupt2[0, 5:] = [11, 12]  # other padding tokens in the corrupted (base) run
    task2 = Task(clean, corrupt2, [3, 4, 5], [6, 7, 8], attention_mask=mask)
    grans = ("resid_pre", "z", "q_by_pos", "k_by_pos", "k")
    d, d2 = diagnose(model, task, grans), diagnose(model, task2, grans)
    for s in ("big_patch", "attn_saturation", "estimate_base", "estimate_mid", "estimate_source"):
        for g, v in getattr(d, s).items():
            np.testing.assert_allclose(getattr(d2, s)[g], v, rtol=1e-5, atol=1e-7, err_msg=f"{s} {g}")
    # k_by_pos: keys 0..4 are seen by every answer row, keys 5, 6 only by prompts 1 and 2
    np.testing.assert_allclose(d.attn_saturation["k_by_pos"][:, 3], d.attn_saturation["k"], rtol=1e-6)
    assert not np.allclose(d.attn_saturation["k_by_pos"][:, 6], d.attn_saturation["k"])
    assert np.all(d.attn_saturation["k_by_pos"] <= 1.0)


def test_revalidation_recomputes_threshold_dependent_diagnostics(tiny_model):
    model = tiny_model[0]
    task = _task(model, seed=4)
    other = Thresholds(small=0.3, prob_saturation=0.6)
    d0 = diagnose(model, task, ("z",), metric="prob")
    d1 = diagnose(model, task, ("z",), metric="prob", thresholds=other)
    assert not np.allclose(d0.nonlinearity["z"], d1.nonlinearity["z"])
    r = d0.rethreshold(other)
    np.testing.assert_allclose(r.nonlinearity["z"], d1.nonlinearity["z"], rtol=1e-6)
    assert (r.metric_saturation, r.metric_saturation_reason) == (
        d1.metric_saturation, d1.metric_saturation_reason)


def test_custom_metric_and_direction_checks_in_exact_paths(tiny_model):
    from attrpatch.attribution import attribute
    from attrpatch.patching import patch
    from attrpatch.task import logit_diff

    def doubled(logits, task, reference):
        return 2.0 * logit_diff(logits, task, reference)

    model = tiny_model[0]
    task = _task(model, seed=2)
    atp = attribute(model, task, granularities=("z",), metric=doubled)
    exact_b, _ = verify_budgeted(model, task, atp, top_k=2, n_random=1, metric=doubled)
    full = patch(model, task, granularities=("z",), metric=doubled, progress=False)
    done = np.isfinite(exact_b["z"])
    assert done.sum() == 3
    np.testing.assert_allclose(exact_b["z"][done], full["z"][done], atol=1e-4)
    with pytest.raises(ValueError, match="direction"):
        exact_components(model, task, "z", [(0, 0)], direction="sideways")


def test_diagnostics_roundtrip_and_metric_saturation(tiny_model):
    model = tiny_model[0]
    task = _task(model)
    d = diagnose(model, task, ("z",), metric="kl", direction="noise")
    assert d.metric_saturation == 1.0  # KL from clean on the clean base run: zero gradient
    np.testing.assert_allclose(d.estimate_base["z"], 0.0, atol=1e-6)
    back = Diagnostics.from_arrays(d.to_arrays(), d.meta())
    np.testing.assert_array_equal(back.nonlinearity["z"], d.nonlinearity["z"])
    assert back.metric_saturation == 1.0


def test_exact_components_interrupted_raises(tiny_model, monkeypatch):
    """Ctrl-C inside the engine must not hand back NaN effects as verified ones."""
    import attrpatch.patching as P

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "_run_layers", interrupted)
    model = tiny_model[0]
    task = _task(model)
    with pytest.warns(UserWarning, match="interrupted"), pytest.raises(KeyboardInterrupt):
        exact_components(model, task, "z", [(0, 0), (1, 2)])
