"""Edge scores and exact edge patching.

| function | what | cost (forwards; a backward counts 2) |
| --- | --- | --- |
| :func:`attribute_edges` ``"eap"`` | (a_source - a_base)[src] . dMetric/d(input of dst) | 5 |
| ``"eap_ig_inputs"`` | that gradient averaged along the line between the inputs | 2 + 3 steps |
| ``"eap_ig_activations"`` | each source's gradient averaged as its layer moves | 2 + 3 steps (2L + 1) |
| :func:`patch_edges` | the metric with exactly the listed edges patched | 1 per set (after 2) |
| :func:`patch_edges_each` | each listed edge's exact effect (path patching) | 1 per edge (after 2) |

Edge scores take every destination's gradient from one backward (each destination has its own
copy of its residual input, :mod:`attrpatch.circuits.engine`), not one backward per edge.
Summed over a source's outgoing edges, EAP is exactly the node AtP of that source.

EAP: Syed, Rager, Conmy 2023 (arXiv 2310.10348). EAP-IG: Hanna, Pezzelle, Belinkov 2024 (arXiv
2403.17806), midpoint rule with ``steps`` points. ``eap_ig_activations`` here is integrated
gradients proper for each source: its layer's outputs (every head of the layer, or the MLP, or
the input) move from the base to the source run while the rest of the model computes freely,
and the gradient at each destination is averaged along that path (EAP-IG's own code instead
averages the gradients of all layers' paths into every edge's score).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from attrpatch.attribution import _reference_logits
from attrpatch.circuits.engine import EdgeEdit, edge_forward
from attrpatch.circuits.graph import EdgeGraph
from attrpatch.interrupts import raise_if_interrupted
from attrpatch.model import Model
from attrpatch.results import DIRECTIONS
from attrpatch.task import MetricFn, Task, check_finite_metrics, resolve_metric

EDGE_METHODS = ("eap", "eap_ig_inputs", "eap_ig_activations")


def edge_method_cost(method: str, n_layers: int, steps: int = 5) -> float:
    """Nominal cost of an edge estimator in forward passes (a backward counts as two): the two
    runs whose outputs are differenced, then one forward and backward per gradient."""
    return {"eap": 5.0, "eap_ig_inputs": 2.0 + 3.0 * steps,
            "eap_ig_activations": 2.0 + 3.0 * steps * (2 * n_layers + 1)}[method]


@dataclasses.dataclass
class EdgeResults:
    """Edge scores of one method (an estimator of :data:`EDGE_METHODS`, or ``"exact"``).

    - `scores`: ``[n_sources, n_destinations]`` (``by_pos``: ``[..., pos]``), the batch-mean
      effect of patching each edge alone, in metric units (estimated, or exact); NaN where the
      graph has no edge (and, for exact results, where the edge was not patched).
    - `per_prompt`: ``[prompt, *scores axes]`` or None.
    - `base_metric`, `source_metric`: the unpatched runs' batch metrics; `gap` their difference.
    """

    method: str
    direction: str
    metric: str
    sources: tuple[str, ...]
    destinations: tuple[str, ...]
    scores: np.ndarray
    base_metric: float
    source_metric: float
    per_prompt: np.ndarray | None = None
    seconds: float | None = None
    cost_forwards: float | None = None

    @property
    def gap(self) -> float:
        return self.source_metric - self.base_metric

    @property
    def by_pos(self) -> bool:
        return self.scores.ndim == 3

    def score(self, source: str, destination: str, position: int | None = None) -> float:
        s, d = self.sources.index(source), self.destinations.index(destination)
        return float(self.scores[s, d] if position is None else self.scores[s, d, position])

    def edges(self, n: int | None = None) -> list[tuple]:
        """Edges with a finite score, largest |score| first: ``(source, destination, score)``
        (``by_pos``: ``(source, destination, position, score)``); the first `n` if given."""
        idx = np.argwhere(np.isfinite(self.scores))
        values = self.scores[tuple(idx.T)]
        order = np.argsort(-np.abs(values), kind="stable")[:n]
        return [(self.sources[i[0]], self.destinations[i[1]], *(int(p) for p in i[2:]),
                 float(values[j])) for j in order for i in [idx[j]]]


# ----------------------------------------------------------------------------------------------
# The runs every edge computation starts from


@partial(jax.jit, static_argnames="metric_fn")
def _outputs(model, task, reference, tokens, metric_fn):
    """(metric ``[B]``, every source's output ``[S, B, T, D]``) of the plain run of `tokens`."""
    logits, outputs = edge_forward(model.params, model.config, tokens, task.attention_mask,
                                   task.answer_positions)
    return metric_fn(logits, task, reference), outputs


@dataclasses.dataclass
class _Runs:
    """The base and source runs of one task and direction, and the metric's reference."""

    model: Model
    task: Task
    direction: str
    metric_name: str
    metric_fn: MetricFn
    graph: EdgeGraph
    reference: object
    base_tokens: jax.Array
    base_metric: np.ndarray
    source_metric: np.ndarray
    base_outputs: jax.Array
    source_outputs: jax.Array

    @classmethod
    def of(cls, model: Model, task: Task, direction: str, metric) -> _Runs:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        task.check_for(model)
        name, fn = resolve_metric(metric, task)
        reference = _reference_logits(model, task)
        base, source = task.runs(direction)
        base_metric, base_out = _outputs(model, task, reference, base, fn)
        source_metric, source_out = _outputs(model, task, reference, source, fn)
        base_metric, source_metric = np.asarray(base_metric), np.asarray(source_metric)
        check_finite_metrics(base_metric, source_metric)
        return cls(model, task, direction, name, fn, EdgeGraph(model.config), reference, base,
                   base_metric, source_metric, base_out, source_out)

    def results(self, method: str, scores, per_prompt=None, seconds=None, cost=None) -> EdgeResults:
        return EdgeResults(method, self.direction, self.metric_name, self.graph.sources,
                           self.graph.destinations, scores, float(self.base_metric.mean()),
                           float(self.source_metric.mean()), per_prompt, seconds, cost)

    def metric_with(self, mask: np.ndarray) -> np.ndarray:
        """Per-prompt metric ``[B]`` with the edges of `mask` ``[S, Dst, 1 or T]`` patched."""
        mask = np.broadcast_to(mask, (*mask.shape[:2], self.task.n_pos))
        return np.asarray(_patched_metric(self.model, self.task, self.reference, self.base_tokens,
                                          jnp.asarray(mask), self.source_outputs, self.metric_fn))


# ----------------------------------------------------------------------------------------------
# Estimated edge scores


@partial(jax.jit, static_argnames=("metric_fn", "by_pos"))
def _gradient_scores(model, task, reference, tokens, base_outputs, change, frozen, alphas,
                     metric_fn, by_pos):
    """Per-prompt ``change[s] . mean_alpha dMetric/d(input of d)`` ``[B, S, Dst(, T)]``, the
    gradient taken with the `frozen` sources ``[S]`` at ``base + alpha * change`` for each
    alpha (EAP: none frozen, one alpha)."""
    n_dst = len(EdgeGraph(model.config).destinations)
    zeros = jnp.zeros((n_dst, *base_outputs.shape[1:]), base_outputs.dtype)

    def gradient(total, alpha):
        edit = EdgeEdit(frozen=frozen, frozen_values=base_outputs + alpha * change)

        def metric_sum(offsets):
            logits, _ = edge_forward(model.params, model.config, tokens, task.attention_mask,
                                     task.answer_positions, edit._replace(offsets=offsets))
            return metric_fn(logits, task, reference).sum()

        return total + jax.grad(metric_sum)(zeros), None

    grads = jax.lax.scan(gradient, zeros, alphas)[0] / alphas.shape[0]
    spec = "sbtm,dbtm->bsdt" if by_pos else "sbtm,dbtm->bsd"
    return jnp.einsum(spec, change, grads.astype(change.dtype))


def _source_groups(graph: EdgeGraph) -> list[np.ndarray]:
    """Sources that move together under ``eap_ig_activations``: the input, each layer's
    attention sources, each MLP (bool masks ``[S]``)."""
    groups = [[0]]
    for layer in range(graph.config.n_layers):
        groups.append(list(range(len(graph.sources)))[graph.attn_source_slice(layer)])
        if not graph.config.attn_only:
            groups.append([graph.mlp_source_index(layer)])
    return [np.isin(np.arange(len(graph.sources)), g) for g in groups]


def attribute_edges(model: Model, task: Task, method: str = "eap", steps: int = 5,
                    direction: str = "denoise", metric: str | MetricFn | None = None,
                    by_pos: bool = False, per_prompt: bool = False) -> EdgeResults:
    """Estimated effect of patching each edge alone, for every edge of the model's graph.

    **Arguments:**

    - `method`: ``"eap"``, ``"eap_ig_inputs"`` or ``"eap_ig_activations"`` (see the module
      docstring for what each computes and costs).
    - `steps`: integration points of the EAP-IG methods (midpoint rule).
    - `direction`: ``"denoise"`` (base run corrupted, clean values patched in) or ``"noise"``.
    - `metric`: a name from :data:`attrpatch.METRICS`, a function, or None (the task's).
    - `by_pos`: one score per (source, destination, position): the edge at one position only.
    - `per_prompt`: also return per-prompt scores.

    **Returns:** :class:`EdgeResults`, ``scores`` ``[n_sources, n_destinations]`` (NaN where
    there is no edge).
    """
    if method not in EDGE_METHODS:
        raise ValueError(f"unknown edge method {method!r}; choose from {', '.join(EDGE_METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    start = time.perf_counter()
    runs = _Runs.of(model, task, direction, metric)
    change = runs.source_outputs - runs.base_outputs
    n_src = len(runs.graph.sources)
    midpoints = jnp.asarray((np.arange(steps) + 0.5) / steps, change.dtype)

    def scores(frozen, alphas):
        raise_if_interrupted()
        return np.asarray(_gradient_scores(
            model, task, runs.reference, runs.base_tokens, runs.base_outputs, change,
            jnp.asarray(frozen, change.dtype), alphas, runs.metric_fn, bool(by_pos)))

    if method == "eap":
        prompts = scores(np.zeros(n_src), jnp.zeros(1, change.dtype))
    elif method == "eap_ig_inputs":
        prompts = scores(np.arange(n_src) == 0, midpoints)
    else:
        prompts = sum(scores(group, midpoints) * group[None, :, None, *((None,) if by_pos else ())]
                      for group in _source_groups(runs.graph))
    exists = runs.graph.exists[..., None] if by_pos else runs.graph.exists
    prompts = np.where(exists[None], prompts, np.nan)
    return runs.results(method, prompts.mean(0), prompts if per_prompt else None,
                        time.perf_counter() - start,
                        edge_method_cost(method, model.config.n_layers, int(steps)))


# ----------------------------------------------------------------------------------------------
# Exact edge patching


@partial(jax.jit, static_argnames="metric_fn")
def _patched_metric(model, task, reference, tokens, mask, source_outputs, metric_fn):
    logits, _ = edge_forward(model.params, model.config, tokens, task.attention_mask,
                             task.answer_positions, EdgeEdit(patched=mask, source_values=source_outputs))
    return metric_fn(logits, task, reference)


def patch_edges(model: Model, task: Task, edges: Iterable[Sequence], direction: str = "denoise",
                metric: str | MetricFn | None = None) -> float:
    """The batch-mean metric after patching exactly the listed `edges` into the base run.

    `edges`: (source, destination) name pairs, or (source, destination, position) triples for
    one position. Each listed edge carries the source run's value of its source into its
    destination; every other edge carries what its source computes in this run. So all edges
    give the source run's metric, none the base run's, and all edges leaving one head give
    patching that head's output. One forward per call (after the two unpatched runs).
    """
    runs = _Runs.of(model, task, direction, metric)
    mask = runs.graph.mask_of(edges, task.n_pos)
    return float(runs.metric_with(mask).mean())


@partial(jax.jit, static_argnames="metric_fn")
def _single_edge_metrics(model, task, reference, tokens, destinations, deltas, metric_fn):
    """Per-prompt metric ``[E, B]`` with one destination's input moved by one delta per row."""
    def one(destination, delta):
        edit = EdgeEdit(one_destination=destination, one_delta=delta)
        logits, _ = edge_forward(model.params, model.config, tokens, task.attention_mask,
                                 task.answer_positions, edit)
        return metric_fn(logits, task, reference)
    return jax.vmap(one)(destinations, deltas)


def patch_edges_each(model: Model, task: Task, edges: Iterable[Sequence] | None = None,
                     direction: str = "denoise", metric: str | MetricFn | None = None,
                     by_pos: bool = False, chunk_size: int = 16) -> EdgeResults:
    """Exact effect of patching each edge alone (path patching), batched `chunk_size` edges per
    compiled call.

    `edges`: (source, destination) pairs or, with `by_pos`, (source, destination, position)
    triples; None for every edge of the graph (every position too, with `by_pos`). An edge's
    effect is the patched batch metric minus the base run's.

    **Returns:** :class:`EdgeResults` with ``method="exact"``, NaN where not patched.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    start = time.perf_counter()
    runs = _Runs.of(model, task, direction, metric)
    graph, n_pos = runs.graph, task.n_pos
    if edges is None:
        pairs = np.argwhere(graph.exists)
        listed = ([(s, d, p) for s, d in pairs for p in range(n_pos)] if by_pos
                  else [(s, d, None) for s, d in pairs])
    else:
        listed = []
        for edge in edges:
            if len(tuple(edge)) != (3 if by_pos else 2):
                raise ValueError(f"edge {tuple(edge)!r}: give (source, destination"
                                 f"{', position' if by_pos else ''}) with by_pos={by_pos}")
            graph.mask_of([edge], n_pos)  # checks names, existence, position
            listed.append((graph.source_index(edge[0]), graph.destination_index(edge[1]),
                           edge[2] if by_pos else None))
    shape = (len(graph.sources), len(graph.destinations)) + ((n_pos,) if by_pos else ())
    scores = np.full(shape, np.nan)
    prompts = np.full((task.batch, *shape), np.nan)
    change = runs.source_outputs - runs.base_outputs
    for first in range(0, len(listed), chunk_size):
        raise_if_interrupted()
        chunk = listed[first:first + chunk_size]
        padded = chunk + [chunk[-1]] * (chunk_size - len(chunk))  # one compiled shape
        src = np.array([s for s, _, _ in padded])
        at = np.ones((len(padded), n_pos), np.float32)
        for i, (_, _, p) in enumerate(padded):
            if p is not None:
                at[i] = np.arange(n_pos) == p
        deltas = change[src] * jnp.asarray(at, change.dtype)[:, None, :, None]
        metrics = np.asarray(_single_edge_metrics(
            model, task, runs.reference, runs.base_tokens, jnp.asarray([d for _, d, _ in padded]),
            deltas, runs.metric_fn))[: len(chunk)]
        for (s, d, p), m in zip(chunk, metrics, strict=True):
            idx = (s, d) if p is None else (s, d, p)
            prompts[(slice(None), *idx)] = m - runs.base_metric
            scores[idx] = float((m - runs.base_metric).mean())
    return runs.results("exact", scores, prompts, time.perf_counter() - start,
                        2.0 + len(listed))
