"""Validation: compare an estimator (AtP, AtP*, IG) with exact patching, flag where it is wrong,
and say why.

Five pieces:

- :func:`validate` ``(estimate, exact, diagnostics=None, thresholds=Thresholds(), tokens=None,
  estimators=None) -> Validation``: agreement numbers per granularity and per site family
  (:data:`attrpatch.results.FAMILIES`), per-component flags (false negative, false positive, sign
  flip, magnitude error), each with a severity, a reason and, where :func:`diagnose` signals or
  other estimators' results are given, a diagnosed cause and the estimators that got it right;
  for every family rated "caution" or "unreliable", the components that drive the verdict.
- :func:`diagnose` ``(model, task, granularities) -> Diagnostics``: cheap per-component signals
  (relative size of the patch, attention saturation at the answer row, disagreement of the AtP
  estimates with gradients taken at the base and at the source run, metric saturation).
- :func:`relp_rule_effects` ``(model, task, granularities) -> {key: PatchResults}``: RelP with
  each of its rules left out in turn; passed to :func:`validate` with the other estimators, a flag
  where RelP is right and AtP wrong names the rule that fixes it (the nonlinearity AtP misses).
- :func:`verify_budgeted`: an estimate on everything, exact patching only on the top K components
  plus R random others, and from the random sample an estimate of how much the estimate missed.
- :func:`verify_until`: exact patching in the estimator's order until a bound on every
  unverified component's effect is below a threshold (:func:`sequential_verification`, the
  statistics).

All thresholds live in :class:`Thresholds`. Effects are compared in units of ``|gap|``
(``PatchResults.gap``: what a patch moving the base run all the way to the source would change);
when the gap is tiny (``< Thresholds.min_gap``) the largest |exact| effect is the unit instead.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from attrpatch.arch.config import RELP_RULES
from attrpatch.interrupts import raise_if_interrupted
from attrpatch.interventions import Interventions
from attrpatch.patching import patch
from attrpatch.progress import progress_bar
from attrpatch.results import (
    DIRECTIONS,
    ESTIMATORS,
    FAMILIES,
    GRANULARITIES,
    QK_GRANULARITIES,
    PatchResults,
    Scores,
    check_granularities,
    reduce_to_grid,
)
from attrpatch.sharding import shard_leading, shard_model, to_host
from attrpatch.sites import site_axes
from attrpatch.task import METRICS, MetricReference, resolve_metric

# Largest |estimate.base_metric - exact.base_metric| that `validate` accepts, as a share of
# max(1, |base metric|, |gap|): beyond it the two results come from different tasks or models.
BASE_METRIC_RTOL = 1e-2

# How each estimator is named in flags, reasons and messages.
ESTIMATOR_LABELS = {"atp": "AtP", "atp_star": "AtP*", "relp": "RelP", "ig": "IG",
                    "ig_inputs": "IG (inputs)", "exact": "exact"}
assert set(ESTIMATORS) <= set(ESTIMATOR_LABELS)

# Most components `Validation.drivers` names per family.
MAX_DRIVERS = 5

# `relp_rule_effects` keys RelP without rule r as RELP_WITHOUT + r in `validate(estimators=...)`.
RELP_WITHOUT = "relp_without_"
# Each RelP rule: its name in messages, and the nonlinearity it holds fixed (what AtP linearises).
RELP_RULE_CAUSES = {"ln": ("LN", "norm scale"), "attention": ("attention", "attention pattern"),
                    "identity": ("identity", "activation"), "half": ("half", "gated product")}
assert set(RELP_RULE_CAUSES) == set(RELP_RULES)


def estimator_label(method: str) -> str:
    """How a method is named in messages: ``"atp"`` -> ``"AtP"``, ``"atp_star"`` -> ``"AtP*"``,
    ``"ig"`` -> ``"IG"``, ``"ig_inputs"`` -> ``"IG (inputs)"``; other names as they are."""
    return ESTIMATOR_LABELS.get(method, method)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Every threshold validation uses. Effects are in units of ``|gap|`` unless stated; below,
    `est` is the estimator's value (AtP, AtP*, IG, ...), `exact` the exact effect, both in units.

    Severity of a disagreement (continuous in both numbers, no band edge)::

        d        = |est - exact|
        rho      = |asinh(est / small) - asinh(exact / small)|
        severity = d * min(1, rho / ln(magnitude_ratio))

    `rho` is a smoothed log ratio: ``|ln(est / exact)|`` when both have the same sign and are well
    above `small`, large when the signs differ, finite at zero. So severity is the absolute error
    |est - exact| once the two differ by a factor of `magnitude_ratio` or more (every false
    negative, false positive and sign flip under the defaults), and shrinks smoothly towards 0 as
    their ratio approaches 1: an estimate of 0.499 and one of 0.507 against an exact 1.0 get
    severities 0.501 and 0.483.

    Flags (on each component where both methods have a finite number), in this order:

    - `sign flip`: |exact| >= `small`, |est| >= `small`, opposite signs.
    - `miss_ratio`: a false negative is a large exact effect (>= `large`) where
      |est| < miss_ratio * |exact| (or est is negligible, < `small`); a false positive is a large
      estimate where |exact| < miss_ratio * |est| (or exact is negligible) (default 0.3).
    - magnitude error: any other pair with d >= `large` and severity >= `magnitude_severity`
      (default 0.1). At d = `large` that takes a ratio of about `magnitude_ratio` (default 2;
      a little more near `small`, where `rho` is smoothed); a bigger error is flagged at a
      smaller ratio (d = 0.2: ratio 1.41; d = 0.5: 1.15).
    - `large`: an effect at least this share of |gap| is large (default 0.1).
    - `small`: below this share of |gap| an effect is negligible (default 0.02).
    - `severity_high`, `severity_medium`: at least these are "high" / "medium", else "low"
      (defaults 0.5, 0.2).

    Causes (from :class:`Diagnostics`):

    - `big_patch`: ||a_source - a_base|| / ||a_base|| over the component (default 0.5).
    - `attn_saturation`: the head's largest attention probability at the answer row of the base
      run (batch mean) at least this (default 0.95); applies to q/k components (``q_by_pos``:
      the row of the patched query position instead).
    - `nonlinearity`: spread of the estimates with gradients at the base run, the midpoint and
      the source run, over max(|estimate|, small * |gap|) (default 0.5).
    - `prob_saturation`: the answer probability is within this of 0 or 1 (default 0.02); the
      metric is saturated when at least `metric_saturation_share` of prompts are (default 0.5).

    Re-validating with other thresholds is exact: :func:`validate` recomputes the
    threshold-dependent diagnostics (`nonlinearity`, `metric_saturation`) from the raw estimates
    and answer probabilities that :class:`Diagnostics` stores (:meth:`Diagnostics.rethreshold`).

    Causes from other estimators (``validate(..., estimators=...)``):

    - attention saturation or softmax nonlinearity (q/k granularities): AtP* (QK fix) and plain
      AtP differ by at least `small` and by at least `nonlinearity` of max(|AtP|, |AtP*|, small).
    - cancellation: AtP*'s GradDrop magnitude is at least `large` and either |AtP*| < `small`
      or GradDrop >= `cancellation_ratio` * |AtP*| (default 3): paths whose contributions cancel
      in the gradient. (AtP*'s signed estimate is AtP's off q/k; on q/k it is the QK-fixed one,
      so a saturated head is not mistaken for cancellation.)
    - `agrees`: an estimator agrees with exact where |value - exact| <= max(agrees * |exact|,
      `small`) (default 0.3); a flag names the estimators that agree when the flagged one does
      not (`Flag.better`).
    - RelP's rules (with :func:`relp_rule_effects`' runs among the estimators): where RelP agrees
      with exact and neither AtP nor the flagged estimator does, the rule whose removal moves
      RelP's estimate most, if it moves it by at least `small` and by at least `nonlinearity` of
      |RelP - AtP|: "nonlinearity in the norm scale (RelP's LN rule fixes it)" (attention
      pattern: attention rule; activation: identity rule; gated product: half rule).

    Agreement: `top_k` (5, 10) and `top_share` (0.05) give the top-K recalls; the verdict per
    family is "reliable" with Pearson >= `reliable_pearson` (0.95) and no high-severity flag, or
    when every |est - exact| is below `small` and nothing is flagged; "caution" with Pearson >=
    `caution_pearson` (0.8); else "unreliable"; "n/a" when no component of the family has both
    numbers (nothing verified).

    `min_gap`: below this |gap| (metric units) the unit is max |exact| instead (default 1e-6).
    """

    large: float = 0.1
    small: float = 0.02
    miss_ratio: float = 0.3
    magnitude_ratio: float = 2.0
    magnitude_severity: float = 0.1
    severity_high: float = 0.5
    severity_medium: float = 0.2
    big_patch: float = 0.5
    attn_saturation: float = 0.95
    nonlinearity: float = 0.5
    cancellation_ratio: float = 3.0
    agrees: float = 0.3
    prob_saturation: float = 0.02
    metric_saturation_share: float = 0.5
    top_k: tuple[int, ...] = (5, 10)
    top_share: float = 0.05
    reliable_pearson: float = 0.95
    caution_pearson: float = 0.8
    min_gap: float = 1e-6

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "top_k":
                if not value or any(isinstance(k, bool) or not isinstance(k, int) or k < 1
                                    for k in value):
                    raise ValueError(f"threshold top_k={value!r} must be one or more positive integers")
                continue
            lowest, highest = {"reliable_pearson": (-1, 1), "caution_pearson": (-1, 1),
                               "magnitude_ratio": (1, math.inf)}.get(f.name, (0, math.inf))
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) and lowest <= value <= highest):
                raise ValueError(f"threshold {f.name}={value!r} must be a finite number in "
                                 f"[{lowest}, {highest}]")

    def replace(self, **changes) -> Thresholds:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown threshold(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# Agreement statistics


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (`scipy.stats.rankdata`)."""
    return stats.rankdata(np.asarray(x, float)).astype(float)


def _correlation(fn, x, y) -> float:
    """`fn(x, y).statistic`, NaN when n < 2 or either input is constant (no warning)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.min() == x.max() or y.min() == y.max():
        return float("nan")
    with warnings.catch_warnings():  # near-constant input: scipy's number, without its warning
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", stats.NearConstantInputWarning)
        return float(fn(x, y).statistic)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays (`scipy.stats.pearsonr`; NaN if either is constant
    or n < 2)."""
    return _correlation(stats.pearsonr, x, y)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (`scipy.stats.spearmanr`: Pearson of average ranks; NaN if
    either is constant or n < 2)."""
    return _correlation(stats.spearmanr, x, y)


def top_k_recall(exact: np.ndarray, atp: np.ndarray, k: int) -> float:
    """Of exact's top `k` components by |effect|, the share that are also in AtP's top `k`."""
    exact, atp = np.ravel(exact), np.ravel(atp)
    k = min(k, len(exact))
    if k == 0:
        return float("nan")
    top_exact = set(np.argsort(-np.abs(exact), kind="stable")[:k].tolist())
    top_atp = set(np.argsort(-np.abs(atp), kind="stable")[:k].tolist())
    return len(top_exact & top_atp) / k


def recall_keys(thresholds: Thresholds = Thresholds()) -> list[str]:
    """Names of the recall entries :func:`agreement` returns: ``recall@K`` for each K in
    ``top_k``, then the share one (``recall@5%`` by default)."""
    return [f"recall@{k}" for k in thresholds.top_k] + [f"recall@{thresholds.top_share:.0%}"]


def agreement(atp: np.ndarray, exact: np.ndarray, gap: float,
              thresholds: Thresholds = Thresholds()) -> dict:
    """Agreement numbers for paired 1-D arrays of AtP scores and exact effects (finite entries).

    **Returns:** a dict with ``n``, ``pearson``, ``spearman``, ``slope`` and ``intercept`` (least
    squares of AtP on exact), ``sign_agreement`` (share of components with |exact| >=
    ``small * unit`` where the signs agree; NaN if none), ``recall@K`` for each K in
    ``top_k`` and ``recall@5%`` (K = ceil(top_share * n)), ``median_abs_error``,
    ``max_abs_error`` (metric units) and the same divided by ``|gap|`` (``*_share``), ``unit``.
    """
    atp, exact = np.ravel(np.asarray(atp, float)), np.ravel(np.asarray(exact, float))
    ok = np.isfinite(atp) & np.isfinite(exact)
    atp, exact = atp[ok], exact[ok]
    n = len(exact)
    out: dict = {"n": n}
    unit = _unit(gap, exact, thresholds)
    out["unit"] = unit
    out["pearson"] = pearson(exact, atp)
    out["spearman"] = spearman(exact, atp)
    var = float(((exact - exact.mean()) ** 2).sum()) if n else 0.0
    if n >= 2 and var > 0:
        slope = float(((exact - exact.mean()) * (atp - atp.mean())).sum() / var)
        out["slope"], out["intercept"] = slope, float(atp.mean() - slope * exact.mean())
    else:
        out["slope"] = out["intercept"] = float("nan")
    big = np.abs(exact) >= thresholds.small * unit
    out["sign_agreement"] = (
        float((np.sign(atp[big]) == np.sign(exact[big])).mean()) if big.any() else float("nan")
    )
    *k_keys, share_key = recall_keys(thresholds)
    for k, name in zip(thresholds.top_k, k_keys, strict=True):
        out[name] = top_k_recall(exact, atp, k)
    share_k = max(1, math.ceil(thresholds.top_share * n))
    out[share_key] = top_k_recall(exact, atp, share_k) if n else math.nan
    err = np.abs(atp - exact)
    out["median_abs_error"] = float(np.median(err)) if n else float("nan")
    out["max_abs_error"] = float(err.max()) if n else float("nan")
    gap_abs = abs(gap) if abs(gap) >= thresholds.min_gap else float("nan")
    out["median_abs_error_share"] = out["median_abs_error"] / gap_abs
    out["max_abs_error_share"] = out["max_abs_error"] / gap_abs
    return out


def _unit(gap: float, exact: np.ndarray, thresholds: Thresholds) -> float:
    if abs(gap) >= thresholds.min_gap:
        return abs(gap)
    finite = np.abs(exact[np.isfinite(exact)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


# ----------------------------------------------------------------------------------------------
# Diagnostics


@dataclasses.dataclass
class Diagnostics:
    """Cheap per-component signals behind AtP's failures, each ``[*granularity axes]``.

    - `big_patch[g]`: ||a_source - a_base|| / ||a_base|| over the component (batch included,
      padded positions excluded).
    - `attn_saturation[g]` (q/k granularities only), base run, batch mean over real prompts:
      ``q``, ``k``: the head's largest attention probability at the answer row (for a key/value
      head shared by a group of query heads, the largest over the group); ``q_by_pos``:
      the largest probability of query row ``pos`` (prompts where ``pos`` is padding skipped);
      ``k_by_pos``: the answer row's largest probability, over prompts whose answer row sees key
      ``pos`` (0 where none does): a saturated answer row hides the effect of any key it reads.
    - `estimate_base[g]`, `estimate_mid[g]`, `estimate_source[g]`: (a_source - a_base) . grad with
      the gradient taken at the base run (= AtP), at the "midpoint", and at the source run.
      The midpoint gradient is taken with the *whole layer's site* (every component of that
      layer at once) moved halfway to the source, not the one component, so it is a probe of
      curvature along the path, not the midpoint of that component's own patch (and
      ``(base + 4 mid + source) / 6`` is not a Simpson's-rule estimate of a single component's
      patch). For the source estimate the whole site is at the source, likewise.
      `nonlinearity[g]` = the spread (max - min) of the three over
      max(|estimate|, ``small * |gap|``).
    - `answer_prob_base`, `answer_prob_source`: ``[batch]`` probability of the first correct
      answer; `metric_saturation` the share of prompts where the metric is saturated.

    `nonlinearity` and `metric_saturation` depend on thresholds (``small``, ``min_gap``,
    ``prob_saturation``): :meth:`rethreshold` recomputes them from the stored raw numbers.
    """

    direction: str
    metric: str
    gap: float
    big_patch: dict[str, np.ndarray]
    attn_saturation: dict[str, np.ndarray]
    estimate_base: dict[str, np.ndarray]
    estimate_mid: dict[str, np.ndarray]
    estimate_source: dict[str, np.ndarray]
    nonlinearity: dict[str, np.ndarray]
    answer_prob_base: np.ndarray
    answer_prob_source: np.ndarray
    metric_saturation: float
    metric_saturation_reason: str = ""

    SIGNALS = ("big_patch", "attn_saturation", "estimate_base", "estimate_mid", "estimate_source",
               "nonlinearity")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat ``{"<signal>/<granularity>": array}`` for `np.savez` (see `from_arrays`)."""
        out = {f"{s}/{g}": v for s in self.SIGNALS for g, v in getattr(self, s).items()}
        out["answer_prob_base"] = self.answer_prob_base
        out["answer_prob_source"] = self.answer_prob_source
        return out

    def meta(self) -> dict:
        return {"direction": self.direction, "metric": self.metric, "gap": self.gap,
                "metric_saturation": self.metric_saturation,
                "metric_saturation_reason": self.metric_saturation_reason}

    def rethreshold(self, thresholds: Thresholds) -> Diagnostics:
        """A copy with `nonlinearity` and `metric_saturation` recomputed under `thresholds`."""
        nonlin = {g: _nonlinearity(self.estimate_base[g], self.estimate_mid[g],
                                   self.estimate_source[g], self.gap, thresholds)
                  for g in self.estimate_base}
        share, reason = _metric_saturation(self.metric, self.direction, self.answer_prob_base,
                                           self.answer_prob_source, thresholds)
        return dataclasses.replace(self, nonlinearity=nonlin, metric_saturation=share,
                                   metric_saturation_reason=reason)

    @classmethod
    def from_arrays(cls, arrays, meta: dict) -> Diagnostics:
        signals = {s: {} for s in cls.SIGNALS}
        for key in arrays:
            if "/" in key:
                s, g = key.split("/", 1)
                signals[s][g] = np.asarray(arrays[key])
        return cls(**meta, **signals, answer_prob_base=np.asarray(arrays["answer_prob_base"]),
                   answer_prob_source=np.asarray(arrays["answer_prob_source"]))


def _reduce(x: np.ndarray, key: str, granularity: str) -> np.ndarray:
    """``[layer, batch, *site dims]`` -> ``[*granularity axes]``, summing the other axes."""
    return reduce_to_grid(x, key, granularity).sum(0)


def _position_mask(key: str, mask: np.ndarray) -> np.ndarray:
    """``[1, batch, *site dims]`` (broadcastable): 1 where every position axis of the site is a
    real token of `mask` ``[batch, pos]``, else 0."""
    dims = site_axes(key)[1:]
    out = np.ones((1, mask.shape[0]) + (1,) * len(dims))
    for i, d in enumerate(dims):
        if d in ("pos", "query_pos", "key_pos"):
            shape = [1, mask.shape[0]] + [1] * len(dims)
            shape[2 + i] = mask.shape[1]
            out = out * mask.reshape(shape)
    return out


def _nonlinearity(est_b, est_m, est_s, gap: float, t: Thresholds) -> np.ndarray:
    floor_unit = abs(gap) if abs(gap) >= t.min_gap else 1.0
    ests = np.stack([est_b, est_m, est_s])
    scale = np.maximum(np.abs(ests).max(0), t.small * floor_unit)
    return (ests.max(0) - ests.min(0)) / scale


def _metric_saturation(metric: str, direction: str, p_base, p_source, t: Thresholds):
    """(share of prompts where the metric is flat at both runs, reason)."""
    p_base, p_source = np.asarray(p_base, float), np.asarray(p_source, float)
    eps = t.prob_saturation
    if metric == "prob":
        saturated = (np.minimum(p_base, 1 - p_base) < eps) & (np.minimum(p_source, 1 - p_source) < eps)
        reason = f"answer probability within {eps} of 0 or 1 in both runs (prob is flat there)"
    elif metric == "logprob":
        saturated = (p_base > 1 - eps) & (p_source > 1 - eps)
        reason = f"answer probability above {1 - eps} in both runs (log-prob is flat there)"
    elif metric == "kl" and direction == "noise":
        saturated = np.ones(len(p_base), bool)
        reason = "KL from clean is at its minimum on the clean base run: its gradient is zero"
    else:
        saturated, reason = np.zeros(len(p_base), bool), ""
    return float(saturated.mean()) if len(saturated) else 0.0, reason


def diagnose(model, task, granularities: Sequence[str], direction: str = "denoise",
             metric=None, thresholds: Thresholds = Thresholds(), midpoint: bool = True,
             mesh=None, progress: bool = True) -> Diagnostics:
    """Signals that explain AtP failures: two forwards and two backwards, plus (with `midpoint`)
    one backward per (site, layer) with that layer's whole site moved halfway to the source.

    **Arguments:** as :func:`attrpatch.attribute` (`model`, `task`, `granularities`,
    `direction`, `metric`); `thresholds` for the metric-saturation test and the nonlinearity
    floor; `midpoint=False` skips the midpoint gradients (`estimate_mid` is then the mean of the
    base and source estimates); `mesh`: as :func:`attrpatch.attribute` (parameters split over
    ``model``; the prompts over ``data`` where it divides their number, else whole on each device);
    `progress`: a progress bar over the midpoint backwards (:mod:`attrpatch.progress`).

    **Returns:** :class:`Diagnostics`.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    granularities = check_granularities(granularities, model.config)
    task.check_for(model)
    metric_name, metric_fn = resolve_metric(metric, task)
    model, task = shard_model(model, mesh), shard_leading(task, mesh)
    keys = tuple(sorted({GRANULARITIES[g][0] for g in granularities} | {"attn.hook_pattern"}))
    mask, positions = task.attention_mask, task.answer_positions
    base_tokens, source_tokens = task.runs(direction)
    real = (np.ones(task.clean_tokens.shape) if mask is None
            else np.asarray(to_host(mask), np.float64))  # [batch, pos]

    clean_logits, clean_cache = model.run(task.clean_tokens, mask, cache_keys=keys,
                                          logit_positions=positions)
    corrupt_logits, corrupt_cache = model.run(task.corrupt_tokens, mask, cache_keys=keys,
                                              logit_positions=positions)
    reference = MetricReference(clean_logits, corrupt_logits)
    if direction == "denoise":
        base_cache, source_cache = corrupt_cache, clean_cache
        base_logits, source_logits = corrupt_logits, clean_logits
    else:
        base_cache, source_cache = clean_cache, corrupt_cache
        base_logits, source_logits = clean_logits, corrupt_logits
    grad_keys = tuple(k for k in keys if any(GRANULARITIES[g][0] == k for g in granularities))
    # Deltas (hence gradients) in at least float32, float64 for a float64 model (as AtP).
    dtypes = {k: jnp.promote_types(base_cache[k].dtype, jnp.float32) for k in grad_keys}

    def metric_of(deltas, tokens, model, task, reference):  # arrays as arguments (multi-host)
        logits, _ = model.run(tokens, task.attention_mask, Interventions(delta=deltas),
                              logit_positions=task.answer_positions)
        return metric_fn(logits, task, reference).mean()

    zeros = {k: jnp.zeros(base_cache[k].shape, dtypes[k]) for k in grad_keys}
    grad_fn = partial(jax.jit(jax.grad(metric_of)), model=model, task=task, reference=reference)
    g_base = to_host(grad_fn(zeros, base_tokens))
    g_source = to_host(grad_fn(zeros, source_tokens))
    base_np = {k: np.asarray(v, np.float64) for k, v in to_host(base_cache).items()}
    source_np = {k: np.asarray(v, np.float64) for k, v in to_host(source_cache).items()}
    # Midpoint gradients: the base run with one layer's whole site moved halfway to the source.
    # (Same pytree structure as `zeros`, so `grad_fn` compiles once for all of them.)
    g_mid = {}
    n_mid = len(grad_keys) * model.config.n_layers if midpoint else 0
    with progress_bar(n_mid, progress, "diagnose", unit="backward") as bar:
        for k in grad_keys if midpoint else ():
            half = 0.5 * (source_cache[k].astype(dtypes[k]) - base_cache[k].astype(dtypes[k]))
            layers = []
            for layer in range(half.shape[0]):
                raise_if_interrupted()
                deltas = dict(zeros, **{k: zeros[k].at[layer].set(half[layer])})
                layers.append(np.asarray(to_host(grad_fn(deltas, base_tokens)[k][layer]),
                                         np.float64))
                bar.update(1)
            g_mid[k] = np.stack(layers)
    base_metric = float(to_host(metric_fn(base_logits, task, reference)).mean())
    gap = float(to_host(metric_fn(source_logits, task, reference)).mean()) - base_metric

    big, sat, est_b, est_m, est_s, nonlin = {}, {}, {}, {}, {}, {}
    pattern = base_np["attn.hook_pattern"]  # [layer, batch, head, query, key]
    batch_idx, pos = np.arange(task.batch), to_host(positions)
    answer_row = pattern[:, batch_idx, :, pos, :]  # [batch, layer, head, key]
    answer_row_max = answer_row.max(-1)  # [batch, layer, head]
    cfg = model.config
    # a key/value head's saturation is that of the most saturated query head reading it
    kv_answer_row_max = answer_row_max.reshape(*answer_row_max.shape[:2], cfg.kv_heads, -1).max(-1)
    for g in granularities:
        key = GRANULARITIES[g][0]
        keep = _position_mask(key, real)  # padded positions (and pattern rows/cols) out
        diff = (source_np[key] - base_np[key]) * keep
        num = np.sqrt(_reduce(diff**2, key, g))
        den = np.sqrt(_reduce((base_np[key] * keep) ** 2, key, g))
        big[g] = np.where(den > 0, num / np.maximum(den, 1e-30), np.where(num > 0, np.inf, 0.0))
        est_b[g] = _reduce(diff * np.asarray(g_base[key], np.float64), key, g)
        est_s[g] = _reduce(diff * np.asarray(g_source[key], np.float64), key, g)
        est_m[g] = (_reduce(diff * g_mid[key], key, g) if midpoint
                    else 0.5 * (est_b[g] + est_s[g]))
        nonlin[g] = _nonlinearity(est_b[g], est_m[g], est_s[g], gap, thresholds)
        if g == "q":
            sat[g] = answer_row_max.mean(0)  # [layer, head]
        elif g == "k":
            sat[g] = kv_answer_row_max.mean(0)  # [layer, kv_head]
        elif g == "q_by_pos":  # query row p's own saturation, over prompts where p is real
            row_max = pattern.max(-1)  # [layer, batch, head, query]
            w = real[None, :, None, :]
            mean = (row_max * w).sum(1) / np.maximum(w.sum(1), 1)  # [layer, head, pos]
            sat[g] = np.transpose(mean, (0, 2, 1))  # [layer, pos, head]
        elif g == "k_by_pos":  # the answer row's saturation, over prompts whose answer sees p
            sees = (np.arange(task.n_pos)[None, :] <= pos[:, None]) * real  # [batch, pos]
            num_ = np.einsum("blh,bp->lph", kv_answer_row_max, sees)
            sat[g] = num_ / np.maximum(sees.sum(0), 1)[None, :, None]  # [layer, pos, kv_head]

    p_clean, p_corrupt = (to_host(METRICS["prob"](lg, task, reference))
                          for lg in (clean_logits, corrupt_logits))
    p_base, p_source = (p_corrupt, p_clean) if direction == "denoise" else (p_clean, p_corrupt)
    share, reason = _metric_saturation(metric_name, direction, p_base, p_source, thresholds)
    return Diagnostics(
        direction=direction, metric=metric_name, gap=gap, big_patch=big, attn_saturation=sat,
        estimate_base=est_b, estimate_mid=est_m, estimate_source=est_s, nonlinearity=nonlin,
        answer_prob_base=p_base, answer_prob_source=p_source,
        metric_saturation=share, metric_saturation_reason=reason,
    )


def relp_rule_effects(model, task, granularities: Sequence[str], direction: str = "denoise",
                      metric=None, batch_size: int | None = None, mesh=None,
                      progress: bool = True) -> dict[str, PatchResults]:
    """RelP with each of its rules left out in turn (:func:`attrpatch.attribute` with
    ``method="relp"`` and ``relp_rules`` all of :data:`attrpatch.arch.config.RELP_RULES` but one),
    each at AtP's cost. Rules that are no-ops on the model's architecture are skipped
    (``"half"`` without a gated MLP; ``"identity"`` and ``"half"`` on an attention-only model).

    **Arguments:** as :func:`attrpatch.attribute`.

    **Returns:** ``{RELP_WITHOUT + rule: PatchResults}`` (e.g. ``"relp_without_ln"``), for
    :func:`validate`'s `estimators` beside the full RelP and AtP results: a flag where RelP
    agrees with exact and AtP does not names the rule whose removal moves RelP most
    (:class:`Thresholds`).
    """
    from attrpatch.attribution import attribute

    cfg = model.config
    no_ops = ({"identity", "half"} if cfg.attn_only else set()) | (
        set() if cfg.gated_mlp else {"half"})
    return {RELP_WITHOUT + rule: attribute(model, task, granularities, direction, metric,
                                           method="relp", batch_size=batch_size, mesh=mesh,
                                           progress=progress,
                                           relp_rules=[r for r in RELP_RULES if r != rule])
            for rule in RELP_RULES if rule not in no_ops}


# ----------------------------------------------------------------------------------------------
# Flags and validation


def component_label(granularity: str, index: Sequence[int], tokens: Sequence[str] | None = None) -> str:
    """Short name of one component, e.g. ``L1H3``, ``L0 p5 'Mary'``, ``L2 N17``."""
    parts = dict(zip(GRANULARITIES[granularity][1], index, strict=True))
    out = f"L{parts['layer']}"
    if "head" in parts:
        out += f"H{parts['head']}"
    if "neuron" in parts:
        out += f" N{parts['neuron']}"
    for axis, short in (("pos", "p"), ("query_pos", "q"), ("key_pos", "k")):
        if axis in parts:
            p = parts[axis]
            tok = f" {tokens[p]!r}" if tokens is not None and p < len(tokens) else ""
            out += f" {short}{p}{tok}"
    return f"{granularity}:{out}"


@dataclasses.dataclass
class Flag:
    """One component where an estimator and exact patching disagree.

    - `atp`: the flagged estimator's value (metric units; the field keeps AtP's name, the first
      estimator: `estimator` says which one it is, `estimate` reads the same number);
      `exact`: the exact effect.
    - `severity`: units of |gap|, as :class:`Thresholds` defines it; `level`: "high" | "medium" |
      "low".
    - `causes`: diagnosed causes (from :class:`Diagnostics` and from other estimators' results).
    - `better`: the other estimators whose value here agrees with exact
      (:attr:`Thresholds.agrees`) where the flagged one does not; `others`: every other
      estimator's value here.
    """

    granularity: str
    index: tuple[int, ...]
    kind: str
    severity: float
    level: str
    atp: float
    exact: float
    causes: list[str]
    reason: str
    label: str = ""
    estimator: str = "atp"
    better: list[str] = dataclasses.field(default_factory=list)
    others: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def estimate(self) -> float:
        return self.atp

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"index": list(self.index)}


def severity(estimate, exact, thresholds: Thresholds = Thresholds()):
    """Severity of the disagreement between an estimate and an exact effect, both in units of
    |gap| (numbers or arrays): ``|est - exact| * min(1, rho / ln(magnitude_ratio))`` with the
    smoothed log ratio ``rho = |asinh(est / small) - asinh(exact / small)|`` (see
    :class:`Thresholds`). Continuous in both arguments."""
    a, e = np.asarray(estimate, float), np.asarray(exact, float)
    s = max(thresholds.small, 1e-12)
    rho = np.abs(np.arcsinh(a / s) - np.arcsinh(e / s))
    scale = math.log(thresholds.magnitude_ratio)
    factor = np.minimum(1.0, rho / scale) if scale > 0 else (rho > 0).astype(float)
    out = np.abs(a - e) * factor
    return float(out) if out.ndim == 0 else out


def _classify(a: float, e: float, t: Thresholds) -> tuple[str | None, float]:
    """(flag kind or None, severity) for one (estimate, exact) pair in units of |gap|."""
    sev = severity(a, e, t)
    if abs(e) >= t.small and abs(a) >= t.small and np.sign(a) * np.sign(e) < 0:
        return "sign flip", sev
    if abs(e) >= t.large and (abs(a) < t.small or abs(a) < t.miss_ratio * abs(e)):
        return "false negative", sev
    if abs(a) >= t.large and (abs(e) < t.small or abs(e) < t.miss_ratio * abs(a)):
        return "false positive", sev
    if abs(a - e) >= t.large and sev >= t.magnitude_severity:
        return "magnitude error", sev
    return None, sev


def _causes(g: str, idx: tuple, diag: Diagnostics | None, t: Thresholds) -> tuple[list[str], list[str]]:
    """Diagnosed causes and their one-line explanations (attention saturation, metric
    saturation, big patch, nonlinearity along the path, in that order)."""
    if diag is None:
        return [], []
    causes, notes = [], []
    if g in diag.attn_saturation and diag.attn_saturation[g][idx] >= t.attn_saturation:
        causes.append("attention saturation")
        notes.append(f"the head's attention is near one-hot (max prob "
                     f"{diag.attn_saturation[g][idx]:.3f}) where the gradient is taken")
    if diag.metric_saturation >= t.metric_saturation_share:
        causes.append("metric saturation")
        notes.append(f"metric saturated on {diag.metric_saturation:.0%} of prompts: "
                     f"{diag.metric_saturation_reason}")
    if g in diag.big_patch and diag.big_patch[g][idx] >= t.big_patch:
        causes.append("big patch")
        notes.append(f"the patch changes the activation by {diag.big_patch[g][idx]:.2f}x its norm")
    if g in diag.nonlinearity and diag.nonlinearity[g][idx] >= t.nonlinearity:
        causes.append("nonlinearity along the path")
        notes.append(f"gradients along the patch disagree (estimates with the gradient at base / "
                     f"midpoint / source: {diag.estimate_base[g][idx]:+.3g} / "
                     f"{diag.estimate_mid[g][idx]:+.3g} / {diag.estimate_source[g][idx]:+.3g})")
    return causes, notes


def _estimator_causes(g: str, values: dict[str, float], graddrop: float | None, unit: float,
                      t: Thresholds) -> tuple[list[str], list[str]]:
    """Causes read off other estimators at one component (`values`: method -> value, metric
    units; `graddrop`: AtP*'s GradDrop magnitude there, or None)."""
    causes, notes = [], []
    plain, star = values.get("atp"), values.get("atp_star")
    if g in QK_GRANULARITIES and plain is not None and star is not None:
        diff = abs(star - plain)
        if diff >= t.small * unit and diff >= t.nonlinearity * max(abs(star), abs(plain),
                                                                   t.small * unit):
            causes.append("attention saturation or softmax nonlinearity")
            notes.append(f"AtP* (QK fix) changes the estimate from AtP's {plain:+.3g} to "
                         f"{star:+.3g}: the softmax is far from linear over this patch")
    # GradDrop against the signed estimate it accompanies: AtP*'s (the QK-fixed one on q/k,
    # where plain AtP is small because of the softmax, not of cancellation), else AtP's
    ref_name = "atp_star" if star is not None else "atp"
    ref = values.get(ref_name)
    if graddrop is not None and np.isfinite(graddrop) and ref is not None:
        if graddrop >= t.large * unit and (abs(ref) < t.small * unit
                                           or graddrop >= t.cancellation_ratio * abs(ref)):
            causes.append("cancellation")
            notes.append(f"AtP*'s GradDrop magnitude {graddrop:.3g} against "
                         f"{estimator_label(ref_name)} {ref:+.3g}: contributions along different "
                         "paths cancel in the gradient")
    return causes, notes


def _relp_rule_cause(relp: float, atp: float, without: dict[str, float], unit: float,
                     t: Thresholds) -> tuple[list[str], list[str]]:
    """The rule whose removal moves RelP's estimate `relp` most (`without`: rule -> RelP without
    it), if it moves it by at least `small` and `nonlinearity` of |RelP - AtP| (metric units)."""
    if not without:
        return [], []
    rule = max(without, key=lambda r: abs(without[r] - relp))  # first of equals: RELP_RULES order
    moved = abs(without[rule] - relp)
    if moved < t.small * unit or moved < t.nonlinearity * abs(relp - atp):
        return [], []
    name, what = RELP_RULE_CAUSES[rule]
    return ([f"nonlinearity in the {what} (RelP's {name} rule fixes it)"],
            [f"RelP without its {name} rule gives {without[rule]:+.3g} instead of {relp:+.3g} "
             f"(AtP {atp:+.3g}): AtP's gradient linearises the {what}"])


def _agrees(value: float, exact: float, unit: float, t: Thresholds) -> bool:
    return abs(value - exact) <= max(t.agrees * abs(exact), t.small * unit)


def _with_fix(name: str, g: str) -> str:
    """An estimator's label, with what it changes where it differs from AtP (AtP* on q/k)."""
    return estimator_label(name) + (" (QK fix)" if name == "atp_star" and g in QK_GRANULARITIES
                                    else "")


@dataclasses.dataclass
class Validation:
    """What :func:`validate` found.

    - `by_granularity[g]`, `by_family[family]`: :func:`agreement` dicts (families pool their
      granularities' components); `verdicts[family]`: "reliable" | "caution" | "unreliable"
      | "n/a" (no component of the family verified, or no gap: see `note`).
    - `flags`: sorted by severity, highest first. `flag_grids[g]`: ``[*axes]`` strings
      ("" where unflagged).
    - `note`: why every verdict is "n/a", if it is ("" otherwise).
    - `estimator`: the method validated (``"atp"``, ``"atp_star"``, ``"ig"``, ...).
    - `drivers[family]`, for each family rated "caution" or "unreliable": the components behind
      the verdict, each a dict with ``label``, ``granularity``, ``index``, ``estimate``,
      ``exact`` (metric units), ``flag`` (its kind, or "") and ``why``. The family's flagged
      components come first (by severity, at most :data:`MAX_DRIVERS`), then up to
      :data:`MAX_DRIVERS` unflagged ones whose removal (leave one out) raises the family's
      Pearson correlation or its top-K recall (K = max `top_k`) the most (``pearson_without``,
      ``recall_without``); where neither moves (e.g. constant numbers), the largest errors.
    """

    gap: float
    unit: float
    thresholds: Thresholds
    by_granularity: dict[str, dict]
    by_family: dict[str, dict]
    verdicts: dict[str, str]
    flags: list[Flag]
    flag_grids: dict[str, np.ndarray]
    note: str = ""
    estimator: str = "atp"
    drivers: dict[str, list[dict]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "gap": self.gap, "unit": self.unit, "note": self.note, "estimator": self.estimator,
            "thresholds": dataclasses.asdict(self.thresholds),
            "by_granularity": self.by_granularity, "by_family": self.by_family,
            "verdicts": self.verdicts, "flags": [f.to_json() for f in self.flags],
            "drivers": self.drivers,
        }


def verdict(stats_: dict, flagged: bool, unit: float, t: Thresholds) -> str:
    """A family's verdict from its :func:`agreement` numbers (with ``n_high``, the count of
    high-severity flags) and whether anything in it is flagged (rules in :class:`Thresholds`)."""
    r = stats_["pearson"]
    if stats_["n"] == 0:  # nothing verified
        return "n/a"
    if stats_["max_abs_error"] <= t.small * unit and not flagged:  # every error negligible
        return "reliable"
    if not np.isfinite(r):  # constant and not negligible
        return "caution"
    if r >= t.reliable_pearson and stats_["n_high"] == 0:
        return "reliable"
    return "caution" if r >= t.caution_pearson else "unreliable"


def level_of(sev: float, t: Thresholds) -> str:
    """"high" | "medium" | "low" for a severity (:class:`Thresholds`)."""
    return "high" if sev >= t.severity_high else "medium" if sev >= t.severity_medium else "low"


def family_of(granularity: str) -> str:
    """The site family (:data:`attrpatch.results.FAMILIES`) a granularity belongs to."""
    return next(f for f, gs in FAMILIES.items() if granularity in gs)


def _loo_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[n]``: Pearson correlation of `x`, `y` with component i left out (NaN where undefined)."""
    x, y = x - x.mean(), y - y.mean()  # centred: the sums below lose no precision
    m = len(x) - 1
    sx, sy = x.sum() - x, y.sum() - y
    sxx, syy, sxy = (x * x).sum() - x * x, (y * y).sum() - y * y, (x * y).sum() - x * y
    vx, vy = sxx - sx * sx / m, syy - sy * sy / m
    cov = sxy - sx * sy / m
    ok = (vx > 1e-12 * (x * x).sum()) & (vy > 1e-12 * (y * y).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, cov / np.sqrt(np.where(ok, vx * vy, 1.0)), np.nan)


def _drivers(a: np.ndarray, e: np.ndarray, where: list[tuple[str, tuple[int, ...], int]],
             flags: list[Flag], unit: float, t: Thresholds, tokens) -> list[dict]:
    """The components behind a family's verdict (see `Validation.drivers`). `a`, `e`: the
    family's finite estimate / exact pairs; `where[i]`: (granularity, grid shape, flat index)."""

    def entry(i: int, why: str, **extra) -> dict:
        g, shape, flat = where[i]
        index = tuple(int(j) for j in np.unravel_index(flat, shape))
        return {"label": component_label(g, index, tokens), "granularity": g, "index": list(index),
                "estimate": float(a[i]), "exact": float(e[i]), "flag": "", "why": why} | extra

    out = [{"label": f.label, "granularity": f.granularity, "index": list(f.index),
            "estimate": f.atp, "exact": f.exact, "flag": f.kind,
            "why": f"{f.kind} ({f.level}, severity {f.severity:.2f})"}
           for f in flags[:MAX_DRIVERS]]
    flagged = {(f.granularity, f.index) for f in flags}
    n = len(a)
    found: dict[int, dict] = {}
    r = pearson(e, a)
    if n >= 3 and np.isfinite(r):
        loo = _loo_pearson(e, a)
        gain = np.nan_to_num(loo - r, nan=-np.inf)
        for i in np.argsort(-gain, kind="stable")[:MAX_DRIVERS]:
            if gain[i] > 0 and gain[i] >= 0.1 * gain.max():
                found[int(i)] = entry(int(i), f"without it Pearson {r:.3f} -> {loo[i]:.3f}",
                                      pearson_without=float(loo[i]))
    k = min(max(t.top_k), n)
    if n - 1 > k:  # (with k >= n - 1 every recall without one component is trivially 1)
        rec = top_k_recall(e, a, k)
        cands = set(np.argsort(-np.abs(e), kind="stable")[:k].tolist()) | set(
            np.argsort(-np.abs(a), kind="stable")[:k].tolist())
        gains = []
        for i in cands:
            without = top_k_recall(np.delete(e, i), np.delete(a, i), k)
            if without > rec:
                gains.append((without - rec, i, without))
        for _, i, without in sorted(gains, key=lambda x: (-x[0], x[1]))[:MAX_DRIVERS]:
            why = f"without it recall@{k} {rec:.2f} -> {without:.2f}"
            if i in found:
                found[i]["why"] += "; " + why
                found[i]["recall_without"] = float(without)
            else:
                found[i] = entry(i, why, recall_without=float(without))
    if not found:  # nothing moves the agreement numbers: name the largest errors
        err = np.abs(a - e)
        for i in np.argsort(-err, kind="stable")[:MAX_DRIVERS]:
            if err[i] > 0:
                found[int(i)] = entry(int(i), f"largest error: |estimate - exact| = "
                                              f"{err[i] / unit:.1%} of |gap|")
    key = lambda d: (d["granularity"], tuple(d["index"]))  # noqa: E731
    for d in out:  # a flagged driver that also moves the agreement numbers says so
        also = next((f for f in found.values() if key(f) == key(d)), None)
        if also is not None:
            d["why"] += "; " + also["why"]
            d |= {k: v for k, v in also.items() if k.endswith("_without")}
    extra = [d for d in found.values() if key(d) not in flagged]
    return out + extra[:MAX_DRIVERS]


def _check_comparable(r: PatchResults, exact: PatchResults, label: str) -> None:
    """Raise `ValueError` when estimator results `r` cannot be compared with `exact`."""
    if r.direction != exact.direction:
        raise ValueError(f"cannot compare: {label} is {r.direction} but exact is {exact.direction}")
    if r.metric != exact.metric:
        raise ValueError(f"cannot compare: {label} used metric {r.metric!r} but exact used "
                         f"{exact.metric!r}")
    for res, name in ((r, label), (exact, "exact")):
        source = getattr(res, "source", "default")
        if source != "default":
            raise ValueError(f"cannot compare: {name} results patch from source={source!r} "
                             f"(an ablation); {label} estimates patching from the other run "
                             "(source='default')")
    scale = max(1.0, abs(exact.base_metric), abs(exact.gap))
    if not abs(r.base_metric - exact.base_metric) <= BASE_METRIC_RTOL * scale:
        raise ValueError(
            f"cannot compare: {label}'s base metric {r.base_metric:.6g} differs from exact's "
            f"{exact.base_metric:.6g}; the results come from different tasks or models"
        )


def validate(estimate: PatchResults, exact: PatchResults, diagnostics: Diagnostics | None = None,
             thresholds: Thresholds = Thresholds(), tokens: Sequence[str] | None = None,
             estimators: dict[str, PatchResults] | None = None) -> Validation:
    """Compare an estimator's scores with exact effects on every granularity both have.

    **Arguments:**

    - `estimate`: :class:`attrpatch.PatchResults` of any estimator (``method`` "atp", "atp_star",
      "ig", "ig_inputs"; flags and messages name it, :func:`estimator_label`).
    - `exact`: ``method="exact"`` results of the same task, model, direction and metric, patching
      the other run (not an ablation); NaN where not computed (budgeted verification): those are
      skipped.
    - `diagnostics`: optional :class:`Diagnostics` (from :func:`diagnose`) for causes; its
      threshold-dependent signals are recomputed under `thresholds` (:meth:`Diagnostics.rethreshold`).
    - `thresholds`: :class:`Thresholds`.
    - `tokens`: optional token strings ``[pos]`` for the component labels.
    - `estimators`: optional ``{method: PatchResults}`` of other estimators on the same task (say
      ``{"atp": ..., "atp_star": ..., "ig": ...}``). They add causes to flags (AtP* against AtP on
      q/k: attention saturation or softmax nonlinearity; AtP*'s GradDrop against AtP:
      cancellation; see :class:`Thresholds`) and say which estimators got a flagged component
      right (`Flag.better`, and in the reason). An entry with `estimate`'s own method is ignored.
      :func:`relp_rule_effects`' entries (RelP with one rule left out) are no estimators of their
      own: where RelP agrees with exact and AtP does not, they name the rule that fixes it
      (:class:`Thresholds`).

    **Returns:** :class:`Validation`.

    Raises `ValueError` when results cannot be compared: different direction or metric, base
    metrics that differ by more than :data:`BASE_METRIC_RTOL` (different tasks or models), an
    exact ablation (``source`` other than "default"), different grid shapes, or no granularity in
    common.
    """
    label = estimator_label(estimate.method)
    _check_comparable(estimate, exact, label)
    others = {name: r for name, r in (estimators or {}).items() if name != estimate.method}
    for name, r in others.items():
        rule = name.removeprefix(RELP_WITHOUT)
        if name.startswith(RELP_WITHOUT) and (rule not in RELP_RULES or r.method != "relp"):
            raise ValueError(f"estimators[{name!r}] must be RelP results with one of "
                             f"{', '.join(RELP_RULES)} left out (relp_rule_effects makes them), got "
                             f"method={r.method!r}")
        what = (f"RelP without its {rule} rule" if name.startswith(RELP_WITHOUT)
                else estimator_label(name))
        _check_comparable(r, exact, f"estimators[{name!r}] ({what})")
    if diagnostics is not None:
        diagnostics = diagnostics.rethreshold(thresholds)
    common = [g for g in GRANULARITIES if g in estimate.scores and g in exact.scores]
    if not common:
        raise ValueError(f"no granularity in common: {label} has {sorted(estimate.scores)}, "
                         f"exact {sorted(exact.scores)}")
    star = estimate if estimate.method == "atp_star" else others.get("atp_star")
    graddrop = (star.graddrop or {}) if star is not None else {}
    gap = exact.gap
    all_exact = np.concatenate([np.ravel(exact[g]) for g in common])
    unit = _unit(gap, all_exact, thresholds)
    t = thresholds
    by_g, flags, grids = {}, [], {}
    for g in common:
        a, e = np.asarray(estimate[g], float), np.asarray(exact[g], float)
        if a.shape != e.shape:
            raise ValueError(f"{g}: {label} shape {a.shape} differs from exact shape {e.shape}")
        other_g = {}
        for name, r in others.items():
            if g in r.scores:
                if np.shape(r[g]) != e.shape:
                    raise ValueError(f"{g}: estimators[{name!r}] shape {np.shape(r[g])} differs "
                                     f"from exact shape {e.shape}")
                other_g[name] = np.asarray(r[g], float)
        gd = np.asarray(graddrop[g], float) if g in graddrop else None
        by_g[g] = agreement(a, e, gap, t)
        grid = np.full(a.shape, "", dtype=object)
        for idx in zip(*np.nonzero(np.isfinite(a) & np.isfinite(e)), strict=True):
            idx = tuple(int(i) for i in idx)
            ra, re_ = a[idx] / unit, e[idx] / unit
            kind, sev = _classify(ra, re_, t)
            if kind is None:
                continue
            level = level_of(sev, t)
            values = {name: float(v[idx]) for name, v in other_g.items() if np.isfinite(v[idx])}
            without = {name.removeprefix(RELP_WITHOUT): values.pop(name) for name in list(values)
                       if name.startswith(RELP_WITHOUT)}
            causes, notes = _causes(g, idx, diagnostics, t)
            more_causes, more_notes = _estimator_causes(
                g, values | {estimate.method: float(a[idx])},
                None if gd is None else float(gd[idx]), unit, t)
            causes, notes = causes + more_causes, notes + more_notes
            if estimate.method == "atp_star" and g in QK_GRANULARITIES:  # the QK fix handled these
                kept = [i for i, c in enumerate(causes) if "attention saturation" not in c]
                causes, notes = [causes[i] for i in kept], [notes[i] for i in kept]
            better = ([] if _agrees(a[idx], e[idx], unit, t) else
                      [name for name, v in values.items() if _agrees(v, e[idx], unit, t)])
            atp = (values | {estimate.method: float(a[idx])}).get("atp")
            if "relp" in better and atp is not None and not _agrees(atp, e[idx], unit, t):
                rule_causes, rule_notes = _relp_rule_cause(values["relp"], atp, without, unit, t)
                causes, notes = causes + rule_causes, notes + rule_notes
            reason = (f"{kind}: exact {e[idx]:+.3g} ({re_:+.0%} of |gap|), {label} {a[idx]:+.3g} "
                      f"({ra:+.0%})")
            reason += "; " + "; ".join(notes) if notes else (
                "; no diagnosed cause" if diagnostics is not None or others else "")
            for name in better:
                reason += f"; {_with_fix(name, g)} agrees with exact ({values[name]:+.3g})"
            flags.append(Flag(g, idx, kind, float(sev), level, float(a[idx]), float(e[idx]),
                              causes, reason, component_label(g, idx, tokens), estimate.method,
                              better, values))
            grid[idx] = kind
        grids[g] = grid
    flags.sort(key=lambda f: -f.severity)
    by_family, verdicts, drivers = {}, {}, {}
    for fam, gs in FAMILIES.items():
        gs = [g for g in gs if g in common]
        if not gs:
            continue
        a_parts, e_parts, where = [], [], []
        for g in gs:
            a, e = np.asarray(estimate[g], float), np.asarray(exact[g], float)
            flat = np.flatnonzero(np.isfinite(a) & np.isfinite(e))
            a_parts.append(a.ravel()[flat])
            e_parts.append(e.ravel()[flat])
            where += [(g, a.shape, int(f)) for f in flat]
        a, e = np.concatenate(a_parts), np.concatenate(e_parts)
        stats_ = agreement(a, e, gap, t)
        fam_flags = [f for f in flags if f.granularity in gs]
        stats_["n_flags"] = len(fam_flags)
        stats_["n_high"] = sum(f.level == "high" for f in fam_flags)
        by_family[fam] = stats_
        verdicts[fam] = verdict(stats_, bool(fam_flags), unit, t)
        if verdicts[fam] in ("caution", "unreliable"):
            drivers[fam] = _drivers(a, e, where, fam_flags, unit, t, tokens)
    note = ""
    if not abs(gap) >= t.min_gap:  # agreement on effects of nothing proves nothing
        verdicts = dict.fromkeys(verdicts, "n/a")
        drivers = {}
        note = (f"no verdict: the base and source runs' metrics differ by {gap:.3g} (|gap| below "
                f"min_gap={t.min_gap:g}), so there is no effect to localise; check the prompts, "
                "the metric and the model's weights")
    return Validation(gap, unit, t, by_g, by_family, verdicts, flags, grids, note, estimate.method,
                      drivers)


# ----------------------------------------------------------------------------------------------
# Exact patching of chosen components and budgeted verification


def exact_components(model, task, granularity: str, indices: Sequence[Sequence[int]],
                     direction: str = "denoise", metric=None, mesh=None,
                     ) -> tuple[np.ndarray, float, float]:
    """Exact effects of patching the listed components of one granularity
    (:func:`attrpatch.patch` with ``components=``).

    **Arguments:** `indices`: ``[n, len(axes)]`` component indices; the rest (`mesh` too) as
    :func:`attrpatch.patch`.

    **Returns:** ``(effects [n], base_metric, source_metric)`` (batch means, metric units).
    Ctrl-C raises `KeyboardInterrupt` (no partial effects).
    """
    indices = [tuple(int(i) for i in index) for index in indices]
    res = patch(model, task, (granularity,), direction, metric, progress=False,
                components={granularity: indices}, mesh=mesh)
    if not res.complete:  # Ctrl-C: partial effects must not pass for verified ones
        raise KeyboardInterrupt
    effects = np.asarray([res[granularity][index] for index in indices], float)
    return effects, res.base_metric, res.source_metric


def _wilson_upper(k: int, n: int, z: float = 1.96) -> float:
    """Upper end of the Wilson score interval for a proportion k/n (95% by default)."""
    if n == 0:
        return 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


@dataclasses.dataclass
class BudgetReport:
    """Budgeted verification of one granularity.

    `top` / `random`: ``[n, len(axes)]`` indices verified; `n_rest` components outside AtP's top K;
    among the R random ones, `random_above` had |exact| >= `threshold` (metric units);
    `missed_estimate` = random_above / R * n_rest estimates how many large effects AtP's top K
    missed, `missed_upper` its 95% (Wilson) upper bound; `max_random_abs` the largest |exact|
    seen in the random sample.
    """

    granularity: str
    n_components: int
    top: np.ndarray
    random: np.ndarray
    n_rest: int
    threshold: float
    random_above: int
    missed_estimate: float
    missed_upper: float
    max_random_abs: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"top": self.top.tolist(), "random": self.random.tolist()}


def budget_sample(ranking: np.ndarray, k: int, r: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the top `k` components by |ranking| (an estimate, or
    `PatchResults.ranking`) and `r` random others (``[n, ndim]`` each)."""
    flat = np.abs(np.ravel(np.nan_to_num(ranking, nan=0.0)))
    order = np.argsort(-flat, kind="stable")
    top, rest = order[: min(k, len(flat))], order[min(k, len(flat)):]
    rng = np.random.default_rng(seed)
    rand = rng.choice(rest, size=min(r, len(rest)), replace=False) if len(rest) else rest
    as_idx = lambda flat_idx: np.stack(np.unravel_index(np.sort(flat_idx), np.shape(ranking)), -1)
    return as_idx(top), as_idx(rand)


def budget_report(granularity: str, atp_values: np.ndarray, exact_values: np.ndarray,
                  top: np.ndarray, rand: np.ndarray, threshold: float) -> BudgetReport:
    """Summarise a budgeted verification given exact effects at (at least) `top` and `rand`."""
    n = int(np.size(atp_values))
    n_rest = n - len(top)
    vals = np.abs(np.asarray([exact_values[tuple(i)] for i in rand], float))
    above = int((vals >= threshold).sum())
    r = len(rand)
    est = above / r * n_rest if r else float("nan")
    upper = _wilson_upper(above, r) * n_rest if r else float(n_rest)
    return BudgetReport(granularity, n, np.asarray(top), np.asarray(rand), n_rest, float(threshold),
                        above, float(est), float(upper), float(vals.max()) if r else float("nan"))


def verify_budgeted(model, task, atp: PatchResults, top_k: int = 10, n_random: int = 10,
                    seed: int = 0, thresholds: Thresholds = Thresholds(),
                    granularities: Sequence[str] | None = None, metric=None, mesh=None,
                    ) -> tuple[PatchResults, dict[str, BudgetReport]]:
    """Exact patching of an estimator's top `top_k` components (by `atp.ranking`: for AtP*, the
    larger of |estimate| and GradDrop) plus `n_random` random others.

    `metric`: the metric function when `atp` used a custom callable (its results hold only the
    name); None uses ``atp.metric`` (a name from :data:`attrpatch.METRICS`). `mesh`: as
    :func:`attrpatch.patch`.

    **Returns:** ``(exact, reports)``: a ``method="exact"`` :class:`attrpatch.PatchResults`,
    NaN except at the verified components, and a :class:`BudgetReport` per granularity. A large
    effect is one with |exact| >= ``thresholds.large * |gap|``.
    """
    granularities = list(granularities or atp.scores)
    scores, reports = {}, {}
    base = source = None
    for g in granularities:
        a = np.asarray(atp[g])
        top, rand = budget_sample(atp.ranking(g), top_k, n_random, seed)
        idx = np.concatenate([top, rand]) if len(rand) else top
        eff, base, source = exact_components(model, task, g, idx, atp.direction,
                                             atp.metric if metric is None else metric, mesh)
        values = np.full(a.shape, np.nan)
        for i, v in zip(idx, eff, strict=True):
            values[tuple(i)] = v
        scores[g] = Scores(g, values)
        threshold = thresholds.large * max(abs(source - base), thresholds.min_gap)
        reports[g] = budget_report(g, a, values, top, rand, threshold)
    exact = PatchResults("exact", atp.direction, atp.metric, base, source, scores)
    return exact, reports


def verify_random_rest(model, task, atp: PatchResults, exact: PatchResults, n_random: int = 32,
                       seed: int = 0, thresholds: Thresholds = Thresholds(), metric=None,
                       mesh=None) -> dict[str, BudgetReport]:
    """For granularities where `exact` covers only some components (e.g. neurons verified for
    AtP's top ones), exact-patch `n_random` random uncovered ones too and estimate what the
    uncovered rest hides. Fills those entries of `exact` in place.

    `metric`: the metric function when a custom callable was used (None: ``exact.metric``);
    `mesh`: as :func:`attrpatch.patch`.

    **Returns:** a :class:`BudgetReport` per granularity that had uncovered components (its
    `top` = the components `exact` already covered).
    """
    reports = {}
    rng = np.random.default_rng(seed)
    threshold = thresholds.large * max(abs(exact.gap), thresholds.min_gap)
    for g in exact.scores:
        if g not in atp.scores:
            continue
        values = np.array(exact[g], float)
        missing = np.flatnonzero(~np.isfinite(values))
        if not len(missing):
            continue
        covered = np.stack(np.unravel_index(np.flatnonzero(np.isfinite(values)), values.shape), -1)
        pick = np.sort(rng.choice(missing, size=min(n_random, len(missing)), replace=False))
        rand = np.stack(np.unravel_index(pick, values.shape), -1)
        eff, _, _ = exact_components(model, task, g, rand, exact.direction,
                                     exact.metric if metric is None else metric, mesh)
        for i, v in zip(rand, eff, strict=True):
            values[tuple(i)] = v
        exact.scores[g] = Scores(g, values, exact.scores[g].per_prompt)
        reports[g] = budget_report(g, atp[g], values, covered, rand, threshold)
    return reports


# ----------------------------------------------------------------------------------------------
# Verification until a bound: exact patching in the estimator's order, certified by random samples


def default_n_random(confidence: float = 0.95, share: float = 0.05) -> int:
    """Random sample size m with ``(1 - share) ** m <= 1 - confidence`` (59 for the defaults): a
    sample that misses every one of a `share` of the unverified components has probability at
    most ``1 - confidence`` (the "rule of three" order-statistics bound)."""
    return max(1, math.ceil(math.log(1 - confidence) / math.log(1 - share)))


def exceptions_bound(population: int, m: int, alpha: float) -> int:
    """Smallest k such that, for a uniform sample of `m` (without replacement) from `population`
    items, P(more than k unsampled items score above the sample's maximum) <= `alpha`, whatever
    the scores.

    More than k items above the sample's maximum means the k + 1 highest-scoring items (in a
    fixed order, ties broken arbitrarily) were all left out, which has probability
    ``C(population - k - 1, m) / C(population, m)`` (hypergeometric); k is the smallest value
    where that is at most `alpha`. ``0 <= k <= population - m``.
    """
    if not 0 <= m <= population:
        raise ValueError(f"sample size m={m} must be between 0 and the population {population}")
    log_alpha = math.log(alpha)
    lg = math.lgamma
    log_all = lg(population + 1) - lg(population - m + 1)
    for j in range(1, population - m + 2):
        if population - j < m:
            return j - 1
        log_p = lg(population - j + 1) - lg(population - j - m + 1) - log_all
        if log_p <= log_alpha + 1e-12:  # (rounding: 1 - 190/200 is 0.05)
            return j - 1
    return population - m


def sample_size_for(population: int, exceptions: int, alpha: float) -> int:
    """Smallest sample size m with ``exceptions_bound(population, m, alpha) <= exceptions``
    (``exceptions=0`` takes m >= (1 - alpha) * population: certifying *every* item needs
    nearly all of them)."""
    lo, hi = 0, population
    while lo < hi:
        mid = (lo + hi) // 2
        if exceptions_bound(population, mid, alpha) <= exceptions:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclasses.dataclass
class SequentialBound:
    """What :func:`sequential_verification` did and found; indices are flat component indices.

    - `effects` ``[n]``: exact effects where verified, NaN elsewhere.
    - `ranked`: components verified in the estimator's order (descending ranking); `random`:
      those verified as uniform random samples of the unverified ones (every certification
      sample); `certification`: the last such sample, the one the statement comes from.
    - `bound` (metric units) = `rank_max` (the largest ranking left unverified) + `excess` (the
      most the estimator underestimated any component of the certification sample,
      ``max(|effect| - ranking, 0)``); 0 when nothing is unverified, inf when the budget left no
      room for a certification sample.
    - The statement, with probability >= `confidence` (overall, across every certification
      attempt): all but at most `exceptions` of the `n_unverified` components have
      |effect| <= `bound`. No assumption about the effects or the estimator; `alpha` is the
      error probability spent on the reported attempt (``(1 - confidence) / 2**attempts``).
      ``exceptions == 0`` is the statement for *every* unverified component.
    - `stopped`: "bound" (bound < threshold, exceptions within `max_exceptions`), "exhausted"
      (nothing left unverified) or "budget" (`max_verified` reached).
    """

    effects: np.ndarray
    ranked: np.ndarray
    random: np.ndarray
    certification: np.ndarray
    threshold: float
    confidence: float
    bound: float
    rank_max: float
    excess: float
    exceptions: int
    n_unverified: int
    alpha: float
    attempts: int
    stopped: str

    @property
    def n_verified(self) -> int:
        return len(self.ranked) + len(self.random)


def sequential_verification(ranking: np.ndarray, effects_of: Callable[[np.ndarray], np.ndarray],
                            threshold: float, confidence: float = 0.95, batch: int = 16,
                            n_random: int | None = None, max_verified: int | None = None,
                            seed: int = 0, max_exceptions: int | None = None) -> SequentialBound:
    """Verify components in the estimator's order until a bound on the unverified components'
    |effect| is below `threshold`. Pure logic: `effects_of` is the oracle.

    **Arguments:**

    - `ranking` ``[n]``: how much each component may matter by the estimator (>= 0, e.g.
      ``PatchResults.ranking(g).ravel()``; absolute values are taken).
    - `effects_of(indices [k]) -> effects [k]`: exact effects of the listed components, metric
      units (called once per batch; never twice for one component).
    - `threshold`: target bound, metric units. `confidence`: of the statement (0.95).
    - `batch`: components verified per step in ranking order. `n_random`: certification sample
      size m (default :func:`default_n_random`: 59 at 95%). `max_verified`: most exact patches in
      all (None: no limit). `seed`: the random samples' generator.
    - `max_exceptions`: also require the statement to leave at most this many exceptions; the
      certification sample grows to what that takes (:func:`sample_size_for`). ``0`` makes the
      statement hold for *every* unverified component, at the price of sampling about
      `confidence` of them. None (default): any number, the sample stays m.

    **The procedure.** Verify the highest-ranked unverified components, `batch` at a time. When
    a *provisional* bound (largest unverified ranking + the largest underestimate
    ``max(|effect| - ranking, 0)`` seen on random samples still among the unverified-ranked, or
    on the last ranked batch before any) drops below `threshold`, *certify*: draw a fresh uniform
    sample S of m of the U unverified components, exact-patch it, and compute

        excess = max over S of max(|effect| - ranking, 0)
        bound  = largest ranking among the U - m still unverified + excess

    Stop when the bound is below `threshold` (or nothing is left, or the budget is spent);
    otherwise keep verifying in ranking order and certify again later.

    **The statistics.** For every component |effect| <= ranking + max(|effect| - ranking, 0), so
    every unverified component underestimated by at most `excess` has |effect| <= bound. S is
    uniform over the unverified components *given everything before it*, so whatever the
    effects, the number K of unverified components underestimated by more than S's largest
    underestimate obeys P(K > k) <= C(U - k - 1, m) / C(U, m) (the k + 1 worst were all
    missed; :func:`exceptions_bound`). Attempt i is stated at level
    alpha_i = (1 - confidence) / 2^i, and sum_i alpha_i <= 1 - confidence, so the reported
    statement "all but at most k unverified components have |effect| <= bound" holds with
    probability >= `confidence` however many attempts it took (stopping on the data included).
    The provisional bound only decides when to certify; it never enters a statement.

    **Why not "every component" by default.** No sample of m of U components bounds their
    maximum without an assumption: one component the estimator ranks low but whose effect is
    large is in the sample with probability m / U, so k = 0 needs m >= (1 - alpha) U
    (`max_exceptions=0`). Calibrating the estimator's error on the sample (the largest
    underestimate, a conformal quantile) bounds a *random* unverified component, not the worst
    one. On AtP's grids of the shipped models (the IOI GPT-2 and Llama and the induction model,
    both directions, 16 prompts, thresholds 2% and 5% of the gap, 200 seeds each), "every
    unverified component <= bound" failed in up to 96% of the runs of a grid (IOI GPT-2 neurons),
    and even "every unverified component <= threshold" in up to 75% (IOI GPT-2 z_by_pos,
    noising): AtP has false negatives that rank near the bottom. "All but at most k" held in at
    least 98% of the runs of every grid. The sentence of :class:`UntilReport` therefore says "all
    but at most k", and states "every" as the assumption it is.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch!r}")
    if max_exceptions is not None and max_exceptions < 0:
        raise ValueError(f"max_exceptions must be None or >= 0, got {max_exceptions!r}")
    ranking = np.abs(np.nan_to_num(np.ravel(np.asarray(ranking, float)), nan=0.0))
    n = len(ranking)
    alpha = 1 - confidence
    m = default_n_random(confidence) if n_random is None else int(n_random)
    if m < 1:
        raise ValueError(f"n_random must be at least 1, got {n_random!r}")
    budget = n if max_verified is None else max(0, int(max_verified))
    order = np.argsort(-ranking, kind="stable")
    rank_pos = np.empty(n, int)
    rank_pos[order] = np.arange(n)
    rng = np.random.default_rng(seed)
    effects = np.full(n, np.nan)
    verified = np.zeros(n, bool)
    ranked: list[int] = []
    randoms: list[int] = []
    last_batch = np.zeros(0, int)
    cert = np.zeros(0, int)
    attempts = 0

    def verify(idx: np.ndarray) -> None:
        values = np.asarray(effects_of(np.asarray(idx, int)), float).ravel()
        if values.shape != (len(idx),) or not np.all(np.isfinite(values)):
            raise ValueError(f"effects_of returned {values.shape} values (non-finite: "
                             f"{int((~np.isfinite(values)).sum())}) for {len(idx)} components")
        effects[idx] = values
        verified[idx] = True

    def excess_of(idx) -> float:
        idx = np.asarray(idx, int)
        return float(np.maximum(np.abs(effects[idx]) - ranking[idx], 0).max()) if len(idx) else 0.0

    def result(stopped, bound, rank_max, excess, k, n_unverified, level):
        return SequentialBound(effects, np.asarray(ranked, int), np.asarray(randoms, int), cert,
                               float(threshold), confidence, float(bound), float(rank_max),
                               float(excess), int(k), int(n_unverified), float(level), attempts,
                               stopped)

    pos = 0
    while True:
        while pos < n and verified[order[pos]]:
            pos += 1
        tail = order[pos:]
        unverified = tail[~verified[tail]]  # in ranking order
        left = budget - int(verified.sum())
        if len(unverified) == 0:
            return result("exhausted", 0.0, 0.0, 0.0, 0, 0, alpha)
        level = alpha / 2 ** (attempts + 1)
        size = min(m, len(unverified))
        if max_exceptions is not None:
            size = max(size, sample_size_for(len(unverified), max_exceptions, level))
        in_tail = [j for j in randoms if rank_pos[j] >= pos]
        provisional = ranking[unverified[0]] + excess_of(in_tail if in_tail else last_batch)
        if provisional >= threshold and left > size:  # keep going in ranking order
            take = unverified[: min(batch, left - size)]
            verify(take)
            ranked.extend(int(j) for j in take)
            last_batch = take
            continue
        # certify with a fresh uniform sample of the unverified components
        size = min(size, left)
        if size == 0:
            return result("budget", math.inf, ranking[unverified[0]], math.nan,
                          len(unverified), len(unverified), alpha)
        attempts += 1
        cert = np.sort(rng.choice(unverified, size=size, replace=False))
        verify(cert)
        randoms.extend(int(j) for j in cert)
        rest = unverified[~verified[unverified]]
        if len(rest) == 0:
            return result("exhausted", 0.0, 0.0, excess_of(cert), 0, 0, alpha)
        excess = excess_of(cert)
        bound = ranking[rest[0]] + excess
        k = exceptions_bound(len(unverified), size, level)
        if bound < threshold and (max_exceptions is None or k <= max_exceptions):
            return result("bound", bound, ranking[rest[0]], excess, k, len(rest), level)
        if left - size <= 0:
            return result("budget", bound, ranking[rest[0]], excess, k, len(rest), level)


@dataclasses.dataclass
class UntilReport:
    """:func:`verify_until` on one granularity: :class:`SequentialBound`'s numbers with
    component indices ``[n, len(axes)]`` (`ranked`, `random`), the gap, and `sentence`."""

    granularity: str
    estimator: str
    n_components: int
    gap: float
    threshold: float
    confidence: float
    ranked: np.ndarray
    random: np.ndarray
    bound: float
    rank_max: float
    excess: float
    exceptions: int
    n_unverified: int
    n_random: int
    alpha: float
    attempts: int
    stopped: str

    @property
    def n_verified(self) -> int:
        return len(self.ranked) + len(self.random)

    @property
    def sentence(self) -> str:
        """The bound in words, e.g. "z_by_pos: all but at most 6 of the 130 unverified
        components have |effect| <= 0.041 (1.9% of |gap|) with 95% confidence (110 verified);
        every one of them does if AtP underestimates none by more than it did the 59 random
        ones (at most 0.0062)." (with no exception: "every unverified component has ...")."""
        g, nv, conf = self.granularity, self.n_verified, f"{self.confidence:.0%}"
        if self.n_unverified == 0:
            return f"{g}: all {self.n_components} components verified; nothing is left unverified."
        if not math.isfinite(self.bound):
            return (f"{g}: no bound: the budget ({nv} verified) left no room for a random sample "
                    f"of the {self.n_unverified} unverified components.")
        share = f" ({self.bound / abs(self.gap):.1%} of |gap|)" if abs(self.gap) > 0 else ""
        x = f"|effect| <= {self.bound:.3g}{share} with {conf} confidence ({nv} verified)"
        if self.exceptions == 0:
            out = f"{g}: every unverified component has {x}."
        else:
            out = (f"{g}: all but at most {self.exceptions} of the {self.n_unverified} unverified "
                   f"components have {x}; every one of them does if "
                   f"{estimator_label(self.estimator)} underestimates none by more than it did the "
                   f"{self.n_random} random ones (at most {self.excess:.3g}).")
        if self.stopped == "budget" and self.bound >= self.threshold:
            out += f" The budget ran out before the bound reached {self.threshold:.3g}."
        return out

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"ranked": self.ranked.tolist(),
                                           "random": self.random.tolist(),
                                           "sentence": self.sentence}


def verify_until(model, task, estimate: PatchResults, threshold: float = 0.05,
                 confidence: float = 0.95, granularities: Sequence[str] | None = None,
                 metric=None, batch: int = 16, max_verified: int | None = None, seed: int = 0,
                 n_random: int | None = None, max_exceptions: int | None = None, mesh=None,
                 progress: bool = True) -> tuple[PatchResults, dict[str, UntilReport]]:
    """Exact-patch components in the estimator's order until the unverified ones are bounded.

    Per granularity (each is its own population of components, with its own statement,
    confidence and budget), :func:`sequential_verification` orders the components by
    ``estimate.ranking(g)`` (|estimate|; AtP*: the larger of it and GradDrop), verifies them
    `batch` at a time with :func:`exact_components`, and certifies with uniform random samples of
    the unverified ones until the bound on their |effect| is below ``threshold * |gap|`` (`gap`
    from `estimate`), the budget `max_verified` (exact patches per granularity) is spent, or
    nothing is left. The statement: with probability >= `confidence`, all but at most k of the
    unverified components have |effect| <= bound, k from the hypergeometric distribution (no
    assumption); `max_exceptions=0` buys k = 0 (every component) by sampling nearly all of them.
    See :func:`sequential_verification` for the statistics.

    `metric`: the metric function when `estimate` used a custom callable (None: its name);
    `mesh`: as :func:`attrpatch.patch`; `progress`: a bar counting the exact patches.

    **Returns:** ``(exact, reports)``: ``method="exact"`` :class:`attrpatch.PatchResults`, NaN
    where unverified, and an :class:`UntilReport` per granularity, whose `sentence` states the
    bound.
    """
    granularities = list(granularities or estimate.scores)
    gap = estimate.gap
    limit = threshold * max(abs(gap), Thresholds().min_gap)
    metric = estimate.metric if metric is None else metric
    scores, reports = {}, {}
    base, source = estimate.base_metric, estimate.source_metric
    for g in granularities:
        shape = np.shape(estimate[g])
        runs = []
        bar = progress_bar(max_verified or int(np.prod(shape)), progress, f"verify {g}",
                           unit="patch")

        def effects_of(flat, g=g, shape=shape, runs=runs, bar=bar):
            idx = np.stack(np.unravel_index(np.asarray(flat, int), shape), -1)
            eff, b, s = exact_components(model, task, g, idx, estimate.direction, metric, mesh)
            runs.append((b, s))
            bar.update(len(idx))
            return eff

        with bar:
            res = sequential_verification(estimate.ranking(g).ravel(), effects_of, limit,
                                          confidence, batch, n_random, max_verified, seed,
                                          max_exceptions)
        if runs:
            base, source = runs[-1]
        scores[g] = Scores(g, res.effects.reshape(shape))
        as_idx = lambda flat, shape=shape: np.stack(  # noqa: E731
            np.unravel_index(np.asarray(flat, int), shape), -1).reshape(-1, len(shape))
        reports[g] = UntilReport(
            g, estimate.method, int(np.prod(shape)), float(gap), float(limit), confidence,
            as_idx(res.ranked), as_idx(res.random), res.bound, res.rank_max, res.excess,
            res.exceptions, res.n_unverified, len(res.certification), res.alpha, res.attempts,
            res.stopped)
    exact = PatchResults("exact", estimate.direction, estimate.metric, base, source, scores)
    return exact, reports
