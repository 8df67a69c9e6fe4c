"""Validation: compare AtP with exact patching, flag where the linear estimate is wrong, and say why.

Three pieces:

- :func:`validate` ``(atp, exact, diagnostics=None, thresholds=Thresholds()) -> Validation``:
  agreement numbers per granularity and per site family (:data:`attrpatch.results.FAMILIES`) and
  per-component flags (false negative, false positive, sign flip, magnitude error), each with a
  severity, a reason and, where :func:`diagnose` signals are given, a diagnosed cause.
- :func:`diagnose` ``(model, task, granularities) -> Diagnostics``: cheap per-component signals
  (relative size of the patch, attention saturation at the answer row, disagreement of the AtP
  estimates with gradients taken at the base and at the source run, metric saturation).
- :func:`verify_budgeted`: AtP on everything, exact patching only on the top K components by
  |AtP| plus R random others, and from the random sample an estimate of how much AtP missed.

All thresholds live in :class:`Thresholds`. Effects are compared in units of ``|gap|``
(``PatchResults.gap``: what a patch moving the base run all the way to the source would change);
when the gap is tiny (``< Thresholds.min_gap``) the largest |exact| effect is the unit instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attrpatch.interrupts import raise_if_interrupted
from attrpatch.interventions import Interventions
from attrpatch.patching import patch
from attrpatch.results import (
    DIRECTIONS,
    FAMILIES,
    GRANULARITIES,
    PatchResults,
    Scores,
    check_granularities,
    reduce_to_grid,
)
from attrpatch.sites import site_axes
from attrpatch.task import METRICS, MetricReference, resolve_metric

# Largest |atp.base_metric - exact.base_metric| that `validate` accepts, as a share of
# max(1, |base metric|, |gap|): beyond it the two results come from different tasks or models.
BASE_METRIC_RTOL = 1e-2


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Every threshold validation uses. Effects are in units of ``|gap|`` unless stated.

    Flags (on each component where both methods have a finite number):

    - `large`: an effect at least this share of |gap| is large (default 0.1).
    - `small`: below this share of |gap| an effect is negligible (default 0.02).
    - `miss_ratio`: a false negative is a large exact effect where |AtP| < miss_ratio * |exact|
      (or AtP is negligible); a false positive is a large AtP score where
      |exact| < miss_ratio * |AtP| (default 0.3).
    - `sign flip`: |exact| >= `large`, |AtP| >= `small`, opposite signs (checked first).
    - `magnitude_ratio`: same sign, |AtP - exact| >= `large`, and the ratio AtP/exact outside
      [1/magnitude_ratio, magnitude_ratio] (default 2): a magnitude error.
    - `severity_high`, `severity_medium`: severity is |AtP - exact| / |gap|; at least these
      are "high" / "medium", else "low" (defaults 0.5, 0.2).

    Causes (from :class:`Diagnostics`):

    - `big_patch`: ||a_source - a_base|| / ||a_base|| over the component (default 0.5).
    - `attn_saturation`: the head's largest attention probability at the answer row of the base
      run (batch mean) at least this (default 0.95); applies to q/k components (``q_by_pos``:
      the row of the patched query position instead).
    - `nonlinearity`: spread of the estimates with gradients at the base run, the midpoint and
      the source run, over max(|estimate|, small * |gap|) (default 0.5).

    Re-validating with other thresholds is exact: :func:`validate` recomputes the
    threshold-dependent diagnostics (`nonlinearity`, `metric_saturation`) from the raw estimates
    and answer probabilities that :class:`Diagnostics` stores (:meth:`Diagnostics.rethreshold`).
    - `prob_saturation`: the answer probability is within this of 0 or 1 (default 0.02); the
      metric is saturated when at least `metric_saturation_share` of prompts are (default 0.5).

    Agreement: `top_k` (5, 10) and `top_share` (0.05) give the top-K recalls; the verdict per
    family is "reliable" with Pearson >= `reliable_pearson` (0.95) and no high-severity flag, or
    when every |AtP - exact| is below `small` and nothing is flagged; "caution" with Pearson >=
    `caution_pearson` (0.8); else "unreliable"; "n/a" when no component of the family has both
    numbers (nothing verified).

    `min_gap`: below this |gap| (metric units) the unit is max |exact| instead (default 1e-6).
    """

    large: float = 0.1
    small: float = 0.02
    miss_ratio: float = 0.3
    magnitude_ratio: float = 2.0
    severity_high: float = 0.5
    severity_medium: float = 0.2
    big_patch: float = 0.5
    attn_saturation: float = 0.95
    nonlinearity: float = 0.5
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
# Agreement statistics (numpy only)


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (as `scipy.stats.rankdata`)."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), float)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = 0.5 * (s + e - 1) + 1
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays (NaN if either is constant or n < 2)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum() / denom) if denom > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(rankdata(x), rankdata(y)) if len(x) >= 2 else float("nan")


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
             ) -> Diagnostics:
    """Signals that explain AtP failures: two forwards and two backwards, plus (with `midpoint`)
    one backward per (site, layer) with that layer's whole site moved halfway to the source.

    **Arguments:** as :func:`attrpatch.attribute` (`model`, `task`, `granularities`,
    `direction`, `metric`); `thresholds` for the metric-saturation test and the nonlinearity
    floor; `midpoint=False` skips the midpoint gradients (`estimate_mid` is then the mean of the
    base and source estimates).

    **Returns:** :class:`Diagnostics`.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    granularities = check_granularities(granularities, model.config)
    task.check_for(model)
    metric_name, metric_fn = resolve_metric(metric, task)
    keys = tuple(sorted({GRANULARITIES[g][0] for g in granularities} | {"attn.hook_pattern"}))
    mask, positions = task.attention_mask, task.answer_positions
    base_tokens, source_tokens = task.runs(direction)
    real = (np.ones(task.clean_tokens.shape) if mask is None
            else np.asarray(mask, np.float64))  # [batch, pos]

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

    def metric_of(deltas, tokens):
        logits, _ = model.run(tokens, mask, Interventions(delta=deltas), logit_positions=positions)
        return metric_fn(logits, task, reference).mean()

    zeros = {k: jnp.zeros(base_cache[k].shape, dtypes[k]) for k in grad_keys}
    grad_fn = jax.jit(jax.grad(metric_of))
    g_base = jax.device_get(grad_fn(zeros, base_tokens))
    g_source = jax.device_get(grad_fn(zeros, source_tokens))
    base_np = {k: np.asarray(v, np.float64) for k, v in jax.device_get(base_cache).items()}
    source_np = {k: np.asarray(v, np.float64) for k, v in jax.device_get(source_cache).items()}
    # Midpoint gradients: the base run with one layer's whole site moved halfway to the source.
    # (Same pytree structure as `zeros`, so `grad_fn` compiles once for all of them.)
    g_mid = {}
    for k in grad_keys if midpoint else ():
        half = 0.5 * (source_cache[k].astype(dtypes[k]) - base_cache[k].astype(dtypes[k]))
        layers = []
        for layer in range(half.shape[0]):
            raise_if_interrupted()
            deltas = dict(zeros, **{k: zeros[k].at[layer].set(half[layer])})
            layers.append(np.asarray(grad_fn(deltas, base_tokens)[k][layer], np.float64))
        g_mid[k] = np.stack(layers)
    base_metric = float(metric_fn(base_logits, task, reference).mean())
    gap = float(metric_fn(source_logits, task, reference).mean()) - base_metric

    big, sat, est_b, est_m, est_s, nonlin = {}, {}, {}, {}, {}, {}
    pattern = base_np["attn.hook_pattern"]  # [layer, batch, head, query, key]
    batch_idx, pos = np.arange(task.batch), np.asarray(positions)
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

    p_clean, p_corrupt = (np.asarray(METRICS["prob"](lg, task, reference))
                          for lg in (clean_logits, corrupt_logits))
    p_base, p_source = (p_corrupt, p_clean) if direction == "denoise" else (p_clean, p_corrupt)
    share, reason = _metric_saturation(metric_name, direction, p_base, p_source, thresholds)
    return Diagnostics(
        direction=direction, metric=metric_name, gap=gap, big_patch=big, attn_saturation=sat,
        estimate_base=est_b, estimate_mid=est_m, estimate_source=est_s, nonlinearity=nonlin,
        answer_prob_base=p_base, answer_prob_source=p_source,
        metric_saturation=share, metric_saturation_reason=reason,
    )


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
    """One component where AtP and exact patching disagree."""

    granularity: str
    index: tuple[int, ...]
    kind: str
    severity: float  # |AtP - exact| / unit
    level: str  # "high" | "medium" | "low"
    atp: float
    exact: float
    causes: list[str]
    reason: str
    label: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"index": list(self.index)}


def _classify(a: float, e: float, t: Thresholds) -> str | None:
    """Flag kind for one (AtP, exact) pair in units of |gap|, or None."""
    if abs(e) >= t.large and abs(a) >= t.small and np.sign(a) != np.sign(e):
        return "sign flip"
    if abs(e) >= t.large and (abs(a) < t.small or abs(a) < t.miss_ratio * abs(e)):
        return "false negative"
    if abs(a) >= t.large and (abs(e) < t.small or abs(e) < t.miss_ratio * abs(a)):
        return "false positive"
    if abs(a - e) >= t.large and np.sign(a) == np.sign(e) and e != 0:
        ratio = a / e
        if ratio > t.magnitude_ratio or ratio < 1 / t.magnitude_ratio:
            return "magnitude error"
    return None


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


@dataclasses.dataclass
class Validation:
    """What :func:`validate` found.

    - `by_granularity[g]`, `by_family[family]`: :func:`agreement` dicts (families pool their
      granularities' components); `verdicts[family]`: "reliable" | "caution" | "unreliable"
      | "n/a" (no component of the family verified, or no gap: see `note`).
    - `flags`: sorted by severity, highest first. `flag_grids[g]`: ``[*axes]`` strings
      ("" where unflagged).
    - `note`: why every verdict is "n/a", if it is ("" otherwise).
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

    def to_json(self) -> dict:
        return {
            "gap": self.gap, "unit": self.unit, "note": self.note,
            "thresholds": dataclasses.asdict(self.thresholds),
            "by_granularity": self.by_granularity, "by_family": self.by_family,
            "verdicts": self.verdicts, "flags": [f.to_json() for f in self.flags],
        }


def family_of(granularity: str) -> str:
    """The site family (:data:`attrpatch.results.FAMILIES`) a granularity belongs to."""
    return next(f for f, gs in FAMILIES.items() if granularity in gs)


def validate(atp: PatchResults, exact: PatchResults, diagnostics: Diagnostics | None = None,
             thresholds: Thresholds = Thresholds(), tokens: Sequence[str] | None = None) -> Validation:
    """Compare AtP scores with exact effects on every granularity both have.

    **Arguments:**

    - `atp`, `exact`: :class:`attrpatch.PatchResults` (``method`` "atp" / "exact") of the same
      task, model, direction and metric, exact patching the other run (not an ablation); exact
      may be NaN where it was not computed (budgeted verification): those are skipped.
    - `diagnostics`: optional :class:`Diagnostics` (from :func:`diagnose`) for causes; its
      threshold-dependent signals are recomputed under `thresholds` (:meth:`Diagnostics.rethreshold`).
    - `thresholds`: :class:`Thresholds`.
    - `tokens`: optional token strings ``[pos]`` for the component labels.

    **Returns:** :class:`Validation`.

    Raises `ValueError` when the two results cannot be compared: different direction or metric,
    base metrics that differ by more than :data:`BASE_METRIC_RTOL` (different tasks or models),
    an exact ablation (``source`` other than "default"), or no granularity in common.
    """
    if atp.direction != exact.direction:
        raise ValueError(f"cannot compare: AtP is {atp.direction} but exact is {exact.direction}")
    if atp.metric != exact.metric:
        raise ValueError(f"cannot compare: AtP used metric {atp.metric!r} but exact used "
                         f"{exact.metric!r}")
    for r in (atp, exact):
        source = getattr(r, "source", "default")
        if source != "default":
            raise ValueError(f"cannot compare: {r.method} results patch from source={source!r} "
                             "(an ablation); AtP estimates patching from the other run "
                             "(source='default')")
    scale = max(1.0, abs(exact.base_metric), abs(exact.gap))
    if not abs(atp.base_metric - exact.base_metric) <= BASE_METRIC_RTOL * scale:
        raise ValueError(
            f"cannot compare: AtP's base metric {atp.base_metric:.6g} differs from exact's "
            f"{exact.base_metric:.6g}; the results come from different tasks or models"
        )
    if diagnostics is not None:
        diagnostics = diagnostics.rethreshold(thresholds)
    common = [g for g in GRANULARITIES if g in atp.scores and g in exact.scores]
    if not common:
        raise ValueError(
            f"no granularity in common: AtP has {sorted(atp.scores)}, exact {sorted(exact.scores)}"
        )
    gap = exact.gap
    all_exact = np.concatenate([np.ravel(exact[g]) for g in common])
    unit = _unit(gap, all_exact, thresholds)
    t = thresholds
    by_g, flags, grids = {}, [], {}
    for g in common:
        a, e = np.asarray(atp[g], float), np.asarray(exact[g], float)
        if a.shape != e.shape:
            raise ValueError(f"{g}: AtP shape {a.shape} differs from exact shape {e.shape}")
        by_g[g] = agreement(a, e, gap, t)
        grid = np.full(a.shape, "", dtype=object)
        for idx in zip(*np.nonzero(np.isfinite(a) & np.isfinite(e)), strict=True):
            idx = tuple(int(i) for i in idx)
            ra, re_ = a[idx] / unit, e[idx] / unit
            kind = _classify(ra, re_, t)
            if kind is None:
                continue
            sev = abs(ra - re_)
            level = "high" if sev >= t.severity_high else "medium" if sev >= t.severity_medium else "low"
            causes, notes = _causes(g, idx, diagnostics, t)
            reason = (f"{kind}: exact {e[idx]:+.3g} ({re_:+.0%} of |gap|), AtP {a[idx]:+.3g} "
                      f"({ra:+.0%})")
            reason += "; " + "; ".join(notes) if notes else (
                "; no diagnosed cause" if diagnostics is not None else "")
            flags.append(Flag(g, idx, kind, float(sev), level, float(a[idx]), float(e[idx]),
                              causes, reason, component_label(g, idx, tokens)))
            grid[idx] = kind
        grids[g] = grid
    flags.sort(key=lambda f: -f.severity)
    by_family, verdicts = {}, {}
    for fam, gs in FAMILIES.items():
        gs = [g for g in gs if g in common]
        if not gs:
            continue
        a = np.concatenate([np.ravel(atp[g]) for g in gs])
        e = np.concatenate([np.ravel(exact[g]) for g in gs])
        stats = agreement(a, e, gap, t)
        fam_flags = [f for f in flags if f.granularity in gs]
        stats["n_flags"] = len(fam_flags)
        stats["n_high"] = sum(f.level == "high" for f in fam_flags)
        by_family[fam] = stats
        r = stats["pearson"]
        negligible = stats["n"] and stats["max_abs_error"] <= t.small * unit
        if stats["n"] == 0:  # nothing verified in this family
            verdicts[fam] = "n/a"
        elif negligible and not fam_flags:  # every error is negligible next to the gap
            verdicts[fam] = "reliable"
        elif stats["n"] and not np.isfinite(r):  # constant and not negligible
            verdicts[fam] = "caution"
        elif r >= t.reliable_pearson and stats["n_high"] == 0:
            verdicts[fam] = "reliable"
        elif r >= t.caution_pearson:
            verdicts[fam] = "caution"
        else:
            verdicts[fam] = "unreliable"
    note = ""
    if not abs(gap) >= t.min_gap:  # agreement on effects of nothing proves nothing
        verdicts = dict.fromkeys(verdicts, "n/a")
        note = (f"no verdict: the base and source runs' metrics differ by {gap:.3g} (|gap| below "
                f"min_gap={t.min_gap:g}), so there is no effect to localise; check the prompts, "
                "the metric and the model's weights")
    return Validation(gap, unit, t, by_g, by_family, verdicts, flags, grids, note)


# ----------------------------------------------------------------------------------------------
# Exact patching of chosen components and budgeted verification


def exact_components(model, task, granularity: str, indices: Sequence[Sequence[int]],
                     direction: str = "denoise", metric=None) -> tuple[np.ndarray, float, float]:
    """Exact effects of patching the listed components of one granularity
    (:func:`attrpatch.patch` with ``components=``).

    **Arguments:** `indices`: ``[n, len(axes)]`` component indices; the rest as
    :func:`attrpatch.attribute`.

    **Returns:** ``(effects [n], base_metric, source_metric)`` (batch means, metric units).
    Ctrl-C raises `KeyboardInterrupt` (no partial effects).
    """
    indices = [tuple(int(i) for i in index) for index in indices]
    res = patch(model, task, (granularity,), direction, metric, progress=False,
                components={granularity: indices})
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


def budget_sample(atp_values: np.ndarray, k: int, r: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the top `k` components by |AtP| and `r` random others (``[n, ndim]`` each)."""
    flat = np.abs(np.ravel(np.nan_to_num(atp_values, nan=0.0)))
    order = np.argsort(-flat, kind="stable")
    top, rest = order[: min(k, len(flat))], order[min(k, len(flat)):]
    rng = np.random.default_rng(seed)
    rand = rng.choice(rest, size=min(r, len(rest)), replace=False) if len(rest) else rest
    as_idx = lambda flat_idx: np.stack(np.unravel_index(np.sort(flat_idx), atp_values.shape), -1)
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
                    granularities: Sequence[str] | None = None, metric=None,
                    ) -> tuple[PatchResults, dict[str, BudgetReport]]:
    """Exact patching of AtP's top `top_k` components plus `n_random` random others.

    `metric`: the metric function when `atp` used a custom callable (its results hold only the
    name); None uses ``atp.metric`` (a name from :data:`attrpatch.METRICS`).

    **Returns:** ``(exact, reports)``: a ``method="exact"`` :class:`attrpatch.PatchResults`,
    NaN except at the verified components, and a :class:`BudgetReport` per granularity. A large
    effect is one with |exact| >= ``thresholds.large * |gap|``.
    """
    granularities = list(granularities or atp.scores)
    scores, reports = {}, {}
    base = source = None
    for g in granularities:
        a = np.asarray(atp[g])
        top, rand = budget_sample(a, top_k, n_random, seed)
        idx = np.concatenate([top, rand]) if len(rand) else top
        eff, base, source = exact_components(model, task, g, idx, atp.direction,
                                             atp.metric if metric is None else metric)
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
                       ) -> dict[str, BudgetReport]:
    """For granularities where `exact` covers only some components (e.g. neurons verified for
    AtP's top ones), exact-patch `n_random` random uncovered ones too and estimate what the
    uncovered rest hides. Fills those entries of `exact` in place.

    `metric`: the metric function when a custom callable was used (None: ``exact.metric``).

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
                                     exact.metric if metric is None else metric)
        for i, v in zip(rand, eff, strict=True):
            values[tuple(i)] = v
        exact.scores[g] = Scores(g, values, exact.scores[g].per_prompt)
        reports[g] = budget_report(g, atp[g], values, covered, rand, threshold)
    return reports
