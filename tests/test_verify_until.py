"""verify_until: exact patching in the estimator's order until the unverified components are
bounded. The statistics are checked on oracles (no model), the bound's coverage on complete
exact grids of the tiny model (computed once, then thousands of simulated runs), and the
wiring end to end."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats
from test_validation import _task

from attrpatch.results import PatchResults
from attrpatch.validation import (
    default_n_random,
    exact_components,
    exceptions_bound,
    sample_size_for,
    sequential_verification,
    verify_until,
)


class Oracle:
    """`effects_of` over a precomputed grid, recording every call."""

    def __init__(self, effects):
        self.effects = np.asarray(effects, float)
        self.calls: list[np.ndarray] = []

    def __call__(self, idx):
        self.calls.append(np.asarray(idx))
        return self.effects[idx]

    @property
    def asked(self) -> np.ndarray:
        return np.concatenate(self.calls) if self.calls else np.zeros(0, int)


def _coverage(ranking, effects, threshold, seeds, **kwargs):
    """Share of seeded runs where the statement holds: (all but `exceptions` of the unverified
    have |effect| <= bound, every unverified has |effect| <= bound), and the mean share verified."""
    held = every = 0
    verified = []
    for seed in seeds:
        res = sequential_verification(ranking, Oracle(effects), threshold, seed=seed, **kwargs)
        left = np.abs(effects[~np.isfinite(res.effects)])
        held += (left > res.bound).sum() <= res.exceptions
        every += left.max(initial=0.0) <= res.bound
        verified.append(res.n_verified / len(effects))
    return held / len(seeds), every / len(seeds), float(np.mean(verified))


# ----------------------------------------------------------------------------------------------
# The statistics, on oracles


def test_exceptions_bound_is_the_hypergeometric_quantile():
    assert default_n_random() == 59 and default_n_random(0.99, 0.01) == 459
    for population, m, alpha in [(10, 9, 0.05), (300, 59, 0.025), (200, 20, 0.05), (50, 50, 0.01),
                                 (1000, 59, 0.05), (7, 1, 0.5)]:
        k = exceptions_bound(population, m, alpha)
        # P(a sample of m misses all of k + 1 given items) <= alpha, and k is the smallest such
        assert stats.hypergeom.pmf(0, population, k + 1, m) <= alpha + 1e-12
        assert k == 0 or stats.hypergeom.pmf(0, population, k, m) > alpha
    assert exceptions_bound(10, 9, 0.05) == 1 and exceptions_bound(10, 10, 0.05) == 0
    # every item certified (k = 0) takes a sample of (1 - alpha) of them
    assert sample_size_for(200, 0, 0.05) == 190
    m = sample_size_for(500, 10, 0.025)
    assert exceptions_bound(500, m, 0.025) <= 10 < exceptions_bound(500, m - 1, 0.025)
    with pytest.raises(ValueError):
        exceptions_bound(5, 6, 0.05)


def test_perfect_estimator_stops_after_its_top_components():
    """Effects equal to the ranking: verified in ranking order until the largest ranking left is
    below the threshold, then one certification sample (no underestimate) and stop."""
    rng = np.random.default_rng(0)
    ranking = 0.9 ** np.arange(300.0)
    perm = rng.permutation(300)
    ranking, effects = ranking[perm], -ranking[perm]  # the sign does not matter
    oracle = Oracle(effects)
    res = sequential_verification(ranking, oracle, threshold=0.05, batch=8, n_random=20, seed=1)
    assert res.stopped == "bound" and res.attempts == 1 and res.excess == 0.0
    order = np.argsort(-ranking)
    assert list(res.ranked) == list(order[: len(res.ranked)]) and len(res.ranked) % 8 == 0
    assert ranking[order[len(res.ranked)]] < 0.05 <= ranking[order[len(res.ranked) - 8]] + 1e-12
    assert len(res.random) == 20 and res.bound == pytest.approx(res.rank_max) and res.bound < 0.05
    # every component asked for once, the effects known exactly there and NaN elsewhere
    asked = oracle.asked
    assert len(asked) == len(set(asked.tolist())) == res.n_verified
    assert set(asked.tolist()) == set(np.flatnonzero(np.isfinite(res.effects)).tolist())
    np.testing.assert_array_equal(res.effects[asked], effects[asked])
    assert res.n_unverified == 300 - res.n_verified
    assert res.exceptions == exceptions_bound(res.n_unverified + 20, 20, 0.05 / 2)


def test_budget_exhaustion_and_bad_arguments():
    ranking = np.linspace(1.0, 0.0, 50)
    effects = ranking + 0.3  # every component underestimated by 0.3
    res = sequential_verification(ranking, Oracle(effects), threshold=0.0)
    assert res.stopped == "exhausted" and res.n_verified == 50 and res.bound == 0.0
    oracle = Oracle(effects)
    res = sequential_verification(ranking, oracle, threshold=0.1, max_verified=30, n_random=10,
                                  batch=4)
    assert res.stopped == "budget" and len(oracle.asked) == 30 and res.bound >= 0.3
    res = sequential_verification(ranking, Oracle(effects), threshold=0.1, max_verified=0)
    assert res.stopped == "budget" and res.bound == np.inf and res.n_verified == 0
    with pytest.raises(ValueError, match="confidence"):
        sequential_verification(ranking, Oracle(effects), 0.1, confidence=1.0)
    with pytest.raises(ValueError, match="effects_of"):
        sequential_verification(ranking, lambda idx: np.full(len(idx), np.nan), 0.1)


def test_statement_holds_against_needles_the_estimator_ranks_last():
    """Five components the estimator ranks at zero carry effects above everything it leaves
    unverified: "every unverified component <= bound" fails whenever the sample misses them
    (that is why it is not the statement), while "all but at most k" holds, and with
    `max_exceptions=0` the statement covers every component."""
    n = 400
    ranking = 0.2 * 0.97 ** np.arange(n, dtype=float)
    effects = ranking.copy()
    needles = np.arange(n - 5, n)
    ranking[needles], effects[needles] = 0.0, 0.03
    seeds = range(300)
    held, every, verified = _coverage(ranking, effects, 0.05, seeds)
    assert held >= 0.95
    assert every < 0.8  # the needles are missed often: the assumption-free statement is tested
    assert verified < 0.5
    held0, every0, verified0 = _coverage(ranking, effects, 0.05, range(100), max_exceptions=0)
    assert every0 >= 0.95 and verified0 > 0.9  # every component certified, at nearly full cost


# ----------------------------------------------------------------------------------------------
# Coverage on complete exact grids of the tiny model


@pytest.fixture(scope="module")
def tiny_grids(tiny_model):
    """AtP rankings and complete exact grids on one task: ``post`` (256 neurons) and
    ``z_by_pos`` (128 heads at positions)."""
    from attrpatch.attribution import attribute
    from attrpatch.patching import patch

    model = tiny_model[0]
    task = _task(model, seed=5, n_pos=16)
    atp = attribute(model, task, granularities=("post", "z_by_pos"))
    idx = np.stack(np.unravel_index(np.arange(atp["post"].size), atp["post"].shape), -1)
    post, base, source = exact_components(model, task, "post", idx)
    z = patch(model, task, granularities=("z_by_pos",), progress=False)
    assert source - base == pytest.approx(atp.gap, rel=1e-3)
    return {"post": (atp.ranking("post").ravel(), np.asarray(post, float), abs(atp.gap)),
            "z_by_pos": (atp.ranking("z_by_pos").ravel(), z["z_by_pos"].ravel(), abs(atp.gap))}


@pytest.mark.parametrize("name", ["post", "z_by_pos"])
def test_bound_covers_the_truth_on_tiny_model_grids(tiny_grids, name):
    """Seeded runs of the sequential procedure on a complete exact grid: the stated bound covers
    the truth in at least 95% of them, at 5% and 2% of the gap; with `max_exceptions=0` the truth
    is the largest unverified |effect| itself."""
    ranking, effects, gap = tiny_grids[name]
    for share in (0.05, 0.02):
        held, _, verified = _coverage(ranking, effects, share * gap, range(200))
        assert held >= 0.95, (name, share, held)
        if name == "post":
            assert verified < 0.7  # a real saving, not exhaustive verification
        held0, every0, _ = _coverage(ranking, effects, share * gap, range(100), max_exceptions=0)
        assert held0 >= 0.95 and every0 >= 0.95, (name, share, every0)


# ----------------------------------------------------------------------------------------------
# End to end


def test_verify_until_end_to_end(tiny_model):
    from attrpatch.attribution import attribute
    from attrpatch.patching import patch

    model = tiny_model[0]
    task = _task(model, seed=2)
    atp = attribute(model, task, granularities=("z",))
    full = patch(model, task, granularities=("z",), progress=False)
    exact, reports = verify_until(model, task, atp, threshold=0.05, batch=2, n_random=3)
    r = reports["z"]
    done = np.isfinite(exact["z"])
    assert exact.method == "exact" and done.sum() == r.n_verified == len(r.ranked) + len(r.random)
    np.testing.assert_allclose(exact["z"][done], full["z"][done], atol=1e-4)
    assert exact.base_metric == pytest.approx(full.base_metric, abs=1e-5)
    order = np.argsort(-np.abs(atp["z"]).ravel(), kind="stable")
    ranked_flat = np.ravel_multi_index(tuple(r.ranked.T), atp["z"].shape)
    assert list(ranked_flat) == list(order[: len(ranked_flat)])  # the estimator's order
    assert r.stopped in ("bound", "exhausted") and r.gap == pytest.approx(atp.gap)
    left = np.abs(full["z"][~done])
    if r.n_unverified:
        assert r.bound < 0.05 * abs(atp.gap) and r.sentence.startswith("z: ")
        assert "with 95% confidence" in r.sentence
    assert (left > r.bound).sum() <= r.exceptions
    assert r.to_json()["sentence"] == r.sentence
    # AtP*'s ranking (GradDrop) decides the order: a component it boosts is verified first
    boost = np.zeros(atp["z"].shape)
    boost[tuple(np.unravel_index(order[-1], boost.shape))] = 1e3
    star = dataclasses.replace(atp, method="atp_star", graddrop={"z": boost})
    _, reports = verify_until(model, task, star, threshold=0.05, batch=2, n_random=3,
                              max_verified=5)
    assert tuple(reports["z"].ranked[0]) == tuple(np.unravel_index(order[-1], boost.shape))
    assert isinstance(star, PatchResults) and reports["z"].n_verified <= 5
