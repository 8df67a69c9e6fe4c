"""Edge scores and exact edge patching.

| function | what | cost (forwards; a backward counts 2) |
| --- | --- | --- |
| :func:`attribute_edges` ``"eap"`` | (a_source - a_base)[src] . dMetric/d(input of dst) | 5 |
| ``"relp"`` | EAP with RelP's backward (norm scales, patterns, activations held) | 5 |
| ``"eap_ig_inputs"`` | that gradient averaged along the line between the inputs | 2 + 3 steps |
| ``"eap_ig_activations"`` | each source's gradient averaged as its layer moves | 2 + 3 steps (2L + 1) |
| :func:`patch_edges` | the metric with exactly the listed edges patched | 1 per set (after 2) |
| :func:`patch_edges_each` | each listed edge's exact effect (path patching) | 1 per edge (after 2) |

Edge scores take every destination's gradient from one ordinary forward and backward: the
gradient at each destination's own first site (its query, key or value head, the MLP's first
projection, the final norm's output) is pulled back through its own norm to its own copy of the
residual stream. That is the gradient with a separate residual input per destination, without
one backward per edge. Summed over a source's outgoing edges, EAP is exactly the node AtP of
that source. Exact edge patching runs the edge engine (:mod:`attrpatch.circuits.engine`).

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

from attrpatch.arch import transformer as T
from attrpatch.attribution import _reference_logits, with_relp_rules
from attrpatch.circuits.engine import EdgeEdit, edge_forward
from attrpatch.circuits.graph import EdgeGraph
from attrpatch.interrupts import raise_if_interrupted
from attrpatch.interventions import Interventions, Patch
from attrpatch.model import Model
from attrpatch.progress import progress_bar
from attrpatch.results import DIRECTIONS
from attrpatch.task import MetricFn, Task, check_finite_metrics, resolve_metric

EDGE_METHODS = ("eap", "relp", "eap_ig_inputs", "eap_ig_activations")


def edge_method_cost(method: str, n_layers: int, steps: int = 5) -> float:
    """Nominal cost of an edge estimator in forward passes (a backward counts as two): the two
    runs whose outputs are differenced, then one forward and backward per gradient."""
    return {"eap": 5.0, "relp": 5.0, "eap_ig_inputs": 2.0 + 3.0 * steps,
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
    logits, cache = model.run(tokens, task.attention_mask, cache_keys=_source_sites(model.config),
                              logit_positions=task.answer_positions)
    return metric_fn(logits, task, reference), _sources_from_cache(model.params, model.config, cache)


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


def _destination_sites(cfg) -> tuple[str, ...]:
    """The sites just after each destination's own read of the residual stream (its norm and
    projection): queries, keys, values, the MLP's first projections. A whole-projection q/k norm
    mixes the heads, so there a query or key head's read ends after it."""
    keys = ["attn.hook_q", "attn.hook_k", "attn.hook_v"]
    if cfg.qk_norm == "projection":
        keys[:2] = ["attn.q_norm.hook_normalized", "attn.k_norm.hook_normalized"]
    if not cfg.attn_only:
        keys += ["mlp.hook_pre", "mlp.hook_pre_linear"] if cfg.gated_mlp else ["mlp.hook_pre"]
    return tuple(keys)


def _source_sites(cfg) -> tuple[str, ...]:
    """The sites the sources' outputs are read from (and moved at, for integrated gradients)."""
    keys = ["hook_embed", "attn.hook_z" if EdgeGraph(cfg).head_sources else "hook_attn_out"]
    keys += [] if cfg.attn_only else ["hook_mlp_out"]
    return tuple(keys + (["hook_pos_embed"] if cfg.positions == "learned" else []))


def _sources_from_cache(params, cfg, cache) -> jax.Array:
    """Every source's output ``[S, B, T, D]`` in graph order, from a forward's cache."""
    embedded = cache["hook_embed"] + cache.get("hook_pos_embed", 0.0)
    if EdgeGraph(cfg).head_sources:  # each head's z times its slice of W_O
        attn = jnp.einsum("lbqhe,lhed->lhbqd", cache["attn.hook_z"], params["blocks"]["W_O"])
    else:
        attn = cache["hook_attn_out"][:, None]
    per_layer = attn if cfg.attn_only else jnp.concatenate([attn, cache["hook_mlp_out"][:, None]], 1)
    return jnp.concatenate([embedded[None], per_layer.reshape(-1, *per_layer.shape[2:])])


def _input_gradients(params, cfg, cache, grads, answer_positions) -> jax.Array:
    """dMetric/d(each destination's own copy of its input) ``[Dst, B, T, D]``, in graph order,
    from the gradients at the destination sites (`grads`, by site key): each destination's
    read (norm, then its projection, then a whole-projection q/k norm) is pulled back from its
    own residual input."""
    blocks = params["blocks"]

    def pull(x, w, cotangent):  # the norm's VJP at x, for cotangents [n, B, T, D]
        return T.norm_vjp(x, w, cotangent, cfg)

    def heads_back(g, raw, w):
        """Whole-projection q/k norm: head h's cotangent ``[B, T, head, d_head]`` alone, pulled
        back through the norm at the raw projection: ``[head, B, T, head, d_head]``."""
        n_heads, width = raw.shape[2], raw.shape[2] * raw.shape[3]
        own = jnp.eye(n_heads, dtype=g.dtype)[:, None, None, :, None] * g[None]
        pulled = pull(raw.reshape(*raw.shape[:2], width), w.reshape(width),
                      own.reshape(*own.shape[:3], width))
        return pulled.reshape(own.shape)

    def layer(p, resid_pre, resid_mid, g, raw):
        def pull_in(x, name, cotangent):  # through the input norm `name` (ln1_w, ln2_w), if any
            return pull(x, p[name], cotangent) if cfg.pre_norms else cotangent

        back = {}
        for n in "QKV":
            if cfg.qk_norm == "projection" and n != "V":
                per_head = heads_back(g[f"attn.{n.lower()}_norm.hook_normalized"], raw[n],
                                      p[f"{n.lower()}_norm_w"])
                back[n] = jnp.einsum("hbtge,dge->hbtd", per_head, p[f"W_{n}"])
            else:
                back[n] = jnp.einsum("bthe,dhe->hbtd", g[f"attn.hook_{n.lower()}"], p[f"W_{n}"])
        out = [pull_in(resid_pre, "ln1_w", back[n]) for n in "QKV"]
        if not cfg.attn_only:
            read = resid_pre if cfg.parallel_attn_mlp else resid_mid
            up = g["mlp.hook_pre"] @ p["W_gate" if cfg.gated_mlp else "W_in"].T
            if cfg.gated_mlp:
                up = up + g["mlp.hook_pre_linear"] @ p["W_in"].T
            out.append(pull_in(read, "ln2_w", up[None]))
        return jnp.concatenate(out)

    mid = cache.get("hook_resid_mid", cache["hook_resid_pre"])
    raw = {n: cache.get(f"attn.hook_{n.lower()}") for n in "QK"}  # whole-projection q/k norms
    per_layer = jnp.stack([
        layer(jax.tree.map(lambda a, i=i: a[i], blocks), cache["hook_resid_pre"][i], mid[i],
              {k: grads[k][i] for k in _destination_sites(cfg)},
              {n: None if x is None else x[i] for n, x in raw.items()}) for i in range(cfg.n_layers)])
    final = cache["hook_resid_post"][-1]
    batch = jnp.arange(final.shape[0])
    at_answer = pull(final[batch, answer_positions], params["ln_f_w"],
                     grads["ln_final.hook_normalized"][None])[0]
    logits = jnp.zeros_like(final).at[batch, answer_positions].set(at_answer)
    return jnp.concatenate([per_layer.reshape(-1, *per_layer.shape[2:]), logits[None]])


@partial(jax.jit, static_argnames=("metric_fn", "moved", "by_pos", "per_prompt"))
def _gradient_scores(model, task, reference, tokens, base_cache, source_cache, layer, alphas,
                     metric_fn, moved, by_pos, per_prompt):
    """``(a_source - a_base)[s] . mean_alpha dMetric/d(input of d)``: ``[S, Dst(, T)]`` summed
    over prompts, or per prompt ``[B, S, Dst(, T)]``.

    The gradients come from the ordinary forward and one backward: zero deltas at every
    destination site, pulled back to each destination's own input (:func:`_input_gradients`).
    With `moved` (a source site key) that site is replaced, at `layer` (``[n_layers]`` bool; the
    input is global), by ``base + alpha * (source - base)`` for each alpha (integrated
    gradients); EAP moves nothing and has one alpha.
    """
    cfg = model.config
    dest = _destination_sites(cfg)
    need = ("hook_resid_pre", "hook_resid_post") + (
        () if cfg.attn_only or cfg.parallel_attn_mlp else ("hook_resid_mid",)) + (
        ("attn.hook_q", "attn.hook_k") if cfg.qk_norm == "projection" else ())
    positions = task.answer_positions

    def gradients(alpha):
        patch = {}
        if moved is not None:
            value = base_cache[moved] + alpha * (source_cache[moved] - base_cache[moved])
            where = True if moved == "hook_embed" else layer.reshape(-1, *[1] * (value.ndim - 1))
            patch[moved] = Patch(jnp.asarray(where), value)

        def metric_sum(deltas):
            iv = Interventions(delta=deltas, patch=patch)
            logits, cache = model.run(tokens, task.attention_mask, iv, need, positions)
            return metric_fn(logits, task, reference).sum(), cache

        zeros = {k: jnp.zeros_like(base_cache[k]) for k in dest}
        zeros["ln_final.hook_normalized"] = jnp.zeros_like(base_cache["ln_final.hook_normalized"])
        grads, cache = jax.grad(metric_sum, has_aux=True)(zeros)
        return _input_gradients(model.params, cfg, cache, grads, positions)

    total = sum(gradients(alphas[i]) for i in range(alphas.shape[0])) / alphas.shape[0]
    change = (_sources_from_cache(model.params, cfg, source_cache)
              - _sources_from_cache(model.params, cfg, base_cache)).astype(jnp.float32)
    spec = "sbtm,dbtm->" + ("b" if per_prompt else "") + ("sdt" if by_pos else "sd")
    return jnp.einsum(spec, change, total)


@partial(jax.jit, static_argnames="keys")
def _cache(model, task, tokens, keys):
    return model.run(tokens, task.attention_mask, cache_keys=keys,
                     logit_positions=task.answer_positions)[1]


def _moves(cfg) -> list[tuple[str, int | None, list[int]]]:
    """What ``eap_ig_activations`` moves, one at a time: (site, layer, the sources it holds):
    the input, each layer's attention, each MLP."""
    graph = EdgeGraph(cfg)
    attn, mlp = _source_sites(cfg)[1], "hook_mlp_out"
    out = [("hook_embed", None, [0])]
    for layer in range(cfg.n_layers):
        out.append((attn, layer, list(range(len(graph.sources)))[graph.attn_source_slice(layer)]))
        if not cfg.attn_only:
            out.append((mlp, layer, [graph.mlp_source_index(layer)]))
    return out


def attribute_edges(model: Model, task: Task, method: str = "eap", steps: int = 5,
                    direction: str = "denoise", metric: str | MetricFn | None = None,
                    by_pos: bool = False, per_prompt: bool = False, progress: bool = True
                    ) -> EdgeResults:
    """Estimated effect of patching each edge alone, for every edge of the model's graph.

    **Arguments:**

    - `method`: ``"eap"``, ``"relp"`` (EAP's scores with every RelP rule in the backward:
      :func:`attrpatch.attribute`), ``"eap_ig_inputs"`` or ``"eap_ig_activations"`` (see the
      module docstring for what each computes and costs).
    - `steps`: integration points of the EAP-IG methods (midpoint rule).
    - `direction`: ``"denoise"`` (base run corrupted, clean values patched in) or ``"noise"``.
    - `metric`: a name from :data:`attrpatch.METRICS`, a function, or None (the task's).
    - `by_pos`: one score per (source, destination, position): the edge at one position only.
    - `per_prompt`: also return per-prompt scores.
    - `progress`: a progress bar over the backwards (:mod:`attrpatch.progress`).

    **Returns:** :class:`EdgeResults`, ``scores`` ``[n_sources, n_destinations]`` (NaN where
    there is no edge).
    """
    if method not in EDGE_METHODS:
        raise ValueError(f"unknown edge method {method!r}; choose from {', '.join(EDGE_METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    start = time.perf_counter()
    model = with_relp_rules(model, method, None)
    task.check_for(model)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    metric_name, metric_fn = resolve_metric(metric, task)
    cfg, graph = model.config, EdgeGraph(model.config)
    reference = _reference_logits(model, task)
    base, source = task.runs(direction)
    keys = tuple(sorted({*_destination_sites(cfg), *_source_sites(cfg), "ln_final.hook_normalized"}))
    base_cache, source_cache = _cache(model, task, base, keys), _cache(model, task, source, keys)
    midpoints = jnp.asarray((np.arange(steps) + 0.5) / steps, jnp.float32)

    moves = (_moves(cfg) if method == "eap_ig_activations" else
             [("hook_embed" if method == "eap_ig_inputs" else None, None, range(len(graph.sources)))])
    alphas = jnp.zeros(1, jnp.float32) if method in ("eap", "relp") else midpoints
    values = 0.0
    with progress_bar(len(moves) * len(alphas), progress, method, unit="backward") as bar:
        for site, layer, rows in moves:
            raise_if_interrupted()
            at = np.zeros(cfg.n_layers, bool) if layer is None else np.arange(cfg.n_layers) == layer
            part = np.asarray(_gradient_scores(
                model, task, reference, base, base_cache, source_cache, jnp.asarray(at), alphas,
                metric_fn, site, bool(by_pos), bool(per_prompt)))
            keep = np.isin(np.arange(len(graph.sources)), list(rows))  # this move's sources
            keep = keep[None] if per_prompt else keep
            values = values + part * keep.reshape(keep.shape + (1,) * (2 if by_pos else 1))
            bar.update(len(alphas))
    exists = graph.exists[..., None] if by_pos else graph.exists
    values = np.where(exists[None] if per_prompt else exists, values, np.nan)
    mean = values.mean(0) if per_prompt else values / task.batch
    base_metric = np.asarray(metric_fn(_reference_answer(reference, direction), task, reference))
    source_metric = np.asarray(metric_fn(_reference_answer(reference, _other(direction)), task,
                                         reference))
    check_finite_metrics(base_metric, source_metric)
    return EdgeResults(method, direction, metric_name, graph.sources, graph.destinations, mean,
                       float(base_metric.mean()), float(source_metric.mean()),
                       values if per_prompt else None, time.perf_counter() - start,
                       edge_method_cost(method, cfg.n_layers, int(steps)))


def _reference_answer(reference, direction: str):
    """The unpatched base run's answer logits (corrupted for denoise, clean for noise)."""
    return reference.corrupt_logits if direction == "denoise" else reference.clean_logits


def _other(direction: str) -> str:
    return "noise" if direction == "denoise" else "denoise"


# ----------------------------------------------------------------------------------------------
# Exact edge patching


@partial(jax.jit, static_argnames="metric_fn")
def _patched_metric(model, task, reference, tokens, mask, source_outputs, metric_fn):
    logits = edge_forward(model.params, model.config, tokens, task.attention_mask,
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
        logits = edge_forward(model.params, model.config, tokens, task.attention_mask,
                              task.answer_positions, edit)
        return metric_fn(logits, task, reference)
    return jax.vmap(one)(destinations, deltas)


def patch_edges_each(model: Model, task: Task, edges: Iterable[Sequence] | None = None,
                     direction: str = "denoise", metric: str | MetricFn | None = None,
                     by_pos: bool = False, chunk_size: int = 16, progress: bool = True
                     ) -> EdgeResults:
    """Exact effect of patching each edge alone (path patching), batched `chunk_size` edges per
    compiled call.

    `edges`: (source, destination) pairs or, with `by_pos`, (source, destination, position)
    triples; None for every edge of the graph (every position too, with `by_pos`). An edge's
    effect is the patched batch metric minus the base run's. `progress`: a progress bar.

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
    with progress_bar(len(listed), progress, "exact edges", unit="edge") as bar:
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
            bar.update(len(chunk))
    return runs.results("exact", scores, prompts, time.perf_counter() - start,
                        2.0 + len(listed))
