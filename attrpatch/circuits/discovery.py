"""Circuits from edge scores, their faithfulness, and edge scores checked against exact patching.

Faithfulness of a circuit (a set of edges) is ``(m_circuit - m_base) / (m_source - m_base)``,
with ``m_circuit`` the metric when exactly the circuit's edges are patched
(:func:`attrpatch.circuits.patch_edges`): under ``direction="denoise"``, how much of the clean
behaviour the circuit's edges restore to the corrupted run. EAP-IG's evaluation (the circuit runs
on the clean input while every other edge gets corrupted values) is ``complement=True`` with
``direction="noise"``.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence

import numpy as np

from attrpatch.circuits.edges import EdgeResults, _Runs, patch_edges_each
from attrpatch.interrupts import raise_if_interrupted
from attrpatch.model import Model
from attrpatch.progress import progress_bar
from attrpatch.task import MetricFn, Task
from attrpatch.validation import (
    Thresholds,
    _agrees,
    _classify,
    _unit,
    agreement,
    estimator_label,
    level_of,
    verdict,
)

HOW = ("top", "greedy")
DEFAULT_THRESHOLDS = Thresholds()


def find_circuit(scores: EdgeResults, n_edges: int | None = None, threshold: float | None = None,
                 how: str = "top") -> list[tuple]:
    """The edges of a circuit, chosen by |score|.

    - `n_edges`: how many edges, or `threshold`: every chosen edge has |score| >= it (metric
      units). Give exactly one.
    - `how`: ``"top"`` takes the largest |scores| anywhere; ``"greedy"`` (EAP-IG's) grows the
      circuit from the logits, each step adding the largest-|score| edge whose destination is
      read by a node already in it (the logits, or a head or MLP one of its edges leaves), so
      every edge lies on a path to the logits.

    **Returns:** edges as ``(source, destination)`` (``by_pos``: with the position), in the order
    chosen.
    """
    if how not in HOW:
        raise ValueError(f"how must be one of {HOW}, got {how!r}")
    if (n_edges is None) == (threshold is None):
        raise ValueError("give exactly one of n_edges= and threshold=")
    if n_edges is not None and (isinstance(n_edges, bool) or not isinstance(n_edges, int | np.integer)
                                or n_edges < 0):
        raise ValueError(f"n_edges must be a non-negative integer, got {n_edges!r}")
    if threshold is not None and not (isinstance(threshold, int | float) and threshold >= 0):
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    ranked = [e[:-1] for e in scores.edges() if threshold is None or abs(e[-1]) >= threshold]
    limit = len(ranked) if n_edges is None else min(n_edges, len(ranked))
    if how == "top":
        return ranked[:limit]
    return _greedy(scores, set(ranked), limit)


def _greedy(scores: EdgeResults, allowed: set, limit: int) -> list[tuple]:
    """EAP-IG's greedy growth from the logits over the `allowed` edges (a heap of candidates)."""
    by_owner: dict[str, list[tuple]] = {}
    into_logits = []
    graph_owners = destination_readers(scores)
    for e in allowed:
        owners = graph_owners[e[1]]
        if not owners:
            into_logits.append(e)
        for node in owners:
            by_owner.setdefault(node, []).append(e)
    value = {e[:-1]: abs(e[-1]) for e in scores.edges()}
    heap = [(-value[e], e) for e in into_logits]
    heapq.heapify(heap)
    chosen, seen, nodes = [], set(), set()
    while heap and len(chosen) < limit:
        _, e = heapq.heappop(heap)
        if e in seen:
            continue
        seen.add(e)
        chosen.append(e)
        if e[0] not in nodes:
            nodes.add(e[0])
            for f in by_owner.get(e[0], []):
                if f not in seen:
                    heapq.heappush(heap, (-value[f], f))
    return chosen


def destination_readers(scores: EdgeResults) -> dict[str, tuple[str, ...]]:
    """Destination name -> the nodes (sources) whose computation reads it: a query head's own
    head, a kv head's group of query heads (the layer, under sandwich norms), the MLP; none for
    the logits. Read off the names (:mod:`attrpatch.circuits.graph`)."""
    sources = set(scores.sources)
    table = {}
    for d in scores.destinations:
        if d == "logits":
            table[d] = ()
        elif "<" not in d:
            table[d] = (d,)
        else:
            layer, head = d[:d.index(".")], int(d[d.index(".h") + 2:d.index("<")])
            if layer in sources:  # sandwich norms: the layer is the node
                table[d] = (layer,)
            elif d.endswith("<q>"):
                table[d] = (f"{layer}.h{head}",)
            else:
                n_heads = sum(s.startswith(layer + ".h") for s in sources)
                n_kv = sum(x.startswith(layer + ".h") and x.endswith("<k>") for x in scores.destinations)
                group = n_heads // n_kv
                table[d] = tuple(f"{layer}.h{h}" for h in range(head * group, (head + 1) * group))
    return table


@dataclasses.dataclass
class FaithfulnessPoint:
    method: str
    n_edges: int
    faithfulness: float
    metric: float


def faithfulness_curve(model: Model, task: Task, scores: dict[str, EdgeResults],
                       sizes: Sequence[int], how: str = "top", direction: str | None = None,
                       metric: str | MetricFn | None = None, complement: bool = False,
                       progress: bool = True) -> list[FaithfulnessPoint]:
    """Faithfulness of each method's circuit at each size, by exact edge patching.

    `scores`: method name -> :class:`EdgeResults` (say EAP, EAP-IG and exact single-edge
    effects); `sizes`: numbers of edges; `direction` defaults to the scores' own. With
    `complement`, every edge *outside* the circuit is patched (EAP-IG's convention when
    `direction` is ``"noise"``). One forward per (method, size); `progress`: a bar over them.
    """
    if not scores:
        raise ValueError("scores is empty: give {method: EdgeResults}")
    first = next(iter(scores.values()))
    direction = direction or first.direction
    runs = _Runs.of(model, task, direction, metric if metric is not None else first.metric)
    base, source = float(runs.base_metric.mean()), float(runs.source_metric.mean())
    out = []
    with progress_bar(len(scores) * len(sizes), progress, "faithfulness", unit="circuit") as bar:
        for method, result in scores.items():
            for n in sizes:
                raise_if_interrupted()
                edges = find_circuit(result, n_edges=int(n), how=how)
                mask = runs.graph.mask_of(edges, task.n_pos if result.by_pos else None)
                if complement:
                    mask = np.where(runs.graph.exists[..., None], 1.0 - mask, 0.0).astype(np.float32)
                m = float(runs.metric_with(mask).mean())
                out.append(FaithfulnessPoint(method, int(n), (m - base) / (source - base), m))
                bar.update(1)
    return out


# ----------------------------------------------------------------------------------------------
# Edge scores against exact single-edge effects


@dataclasses.dataclass
class EdgeFlag:
    """One edge where an estimator and exact edge patching disagree (units: metric)."""

    source: str
    destination: str
    kind: str
    severity: float
    level: str
    estimate: float
    exact: float
    reason: str
    estimator: str
    better: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class EdgeValidation:
    """What :func:`validate_edges` found: `agreement` (:func:`attrpatch.validation.agreement`
    with ``n_flags``, ``n_high``), `verdict` ("reliable" | "caution" | "unreliable" | "n/a"),
    `flags` by severity, the `estimator` validated, `unit` (|gap|)."""

    estimator: str
    agreement: dict
    verdict: str
    flags: list[EdgeFlag]
    unit: float


def validate_edges(estimate: EdgeResults, exact: EdgeResults,
                   others: dict[str, EdgeResults] | None = None,
                   thresholds: Thresholds = DEFAULT_THRESHOLDS) -> EdgeValidation:
    """Compare an edge estimator with exact single-edge effects on every edge both have, with
    the node validation's rules (:class:`attrpatch.Thresholds`): agreement, a verdict, flags.

    `others`: more estimators on the same task; a flag names those that agree with exact there
    (for instance EAP-IG where EAP is wrong: "nonlinearity along the path", which integrating
    the gradient fixes).
    """
    if exact.method != "exact":
        raise ValueError(f"exact must be exact single-edge effects (patch_edges_each), got "
                         f"method {exact.method!r}")
    for r in [estimate, *(others or {}).values()]:
        if (r.direction, r.metric, r.scores.shape) != (exact.direction, exact.metric, exact.scores.shape):
            raise ValueError(f"{r.method} results ({r.direction}, {r.metric}, shape "
                             f"{r.scores.shape}) are not comparable with exact ({exact.direction}, "
                             f"{exact.metric}, shape {exact.scores.shape})")
    t = thresholds
    a, e = estimate.scores, exact.scores
    both = np.isfinite(a) & np.isfinite(e)
    stats_ = agreement(a[both], e[both], exact.gap, t)
    unit = _unit(exact.gap, e[both], t)
    label = estimator_label(estimate.method)
    flags = []
    for idx in map(tuple, np.argwhere(both)):
        kind, sev = _classify(a[idx] / unit, e[idx] / unit, t)
        if kind is None:
            continue
        better = [] if _agrees(a[idx], e[idx], unit, t) else [
            name for name, r in (others or {}).items()
            if np.isfinite(r.scores[idx]) and _agrees(r.scores[idx], e[idx], unit, t)]
        reason = (f"{kind}: exact {e[idx]:+.3g} ({e[idx] / unit:+.0%} of |gap|), {label} "
                  f"{a[idx]:+.3g} ({a[idx] / unit:+.0%})")
        for name in better:
            reason += f"; {name} agrees with exact ({others[name].scores[idx]:+.3g})"
        if better and any(n.startswith("eap_ig") for n in better):
            reason += "; cause: nonlinearity along the path (integrated gradients fix it)"
        flags.append(EdgeFlag(exact.sources[idx[0]], exact.destinations[idx[1]]
                              + (f"@{idx[2]}" if len(idx) == 3 else ""), kind, float(sev),
                              level_of(sev, t), float(a[idx]), float(e[idx]), reason,
                              estimate.method, better))
    flags.sort(key=lambda f: -f.severity)
    stats_["n_flags"] = len(flags)
    stats_["n_high"] = sum(f.level == "high" for f in flags)
    return EdgeValidation(estimate.method, stats_, verdict(stats_, bool(flags), unit, t), flags, unit)


def verify_edges(model: Model, task: Task, estimate: EdgeResults, n_top: int = 50,
                 n_random: int = 50, seed: int = 0, metric: str | MetricFn | None = None,
                 chunk_size: int = 16, progress: bool = True) -> EdgeResults:
    """Exact single-edge effects of the estimate's `n_top` edges by |score| and `n_random` more
    drawn uniformly from the rest (all edges when that is fewer): a verification worth its
    cost where the whole graph is too big to patch edge by edge."""
    ranked = [e[:-1] for e in estimate.edges()]
    top, rest = ranked[:n_top], ranked[n_top:]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(rest), min(n_random, len(rest)), replace=False) if rest else []
    edges = top + [rest[i] for i in sorted(pick)]
    return patch_edges_each(model, task, edges, estimate.direction,
                            estimate.metric if metric is None else metric,
                            by_pos=estimate.by_pos, chunk_size=chunk_size, progress=progress)

