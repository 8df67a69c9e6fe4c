"""Gradient estimators of every patch at once: AtP, AtP*, RelP and integrated gradients.

For a patch that moves site activation ``a`` from the base run's value to the source run's, each
estimator gives ``(a_source - a_base) . w``, summed over the component, for some weight ``w``:

| method | ``w`` | cost (forwards; a backward counts 2) |
| --- | --- | --- |
| ``atp`` | dMetric/da at the base run (Nanda 2023) | 4 |
| ``atp_star`` | as ``atp``; q/k by the QK fix; GradDrop magnitudes beside | 4 + 3 n_layers |
| ``relp`` | as ``atp``, the backward with LRP rules in place of local gradients | 4 |
| ``ig`` | dMetric/da averaged along a_base -> a_source, one layer's site moved | 2 + 3 steps layers sites |
| ``ig_inputs`` | dMetric/da averaged along the line between the input embeddings | 2 + 3 steps |

**AtP*** (Kramár, Lieberum, Shah, Nanda 2024, arXiv 2403.00745):

- *QK fix* (section 3.1.1). A query or key only acts through its head's attention pattern, which
  is a softmax: linearising through it misses saturation. For ``q``, ``q_by_pos``, ``k`` and
  ``k_by_pos`` the patched head's attention logits are recomputed exactly (the source run's
  queries against the base run's keys, or the reverse), the softmax taken, and only the rest is
  linearised: ``sum (A_patched - A_base) * dMetric/dA``. A key patched at one position changes
  one logit per query row, so every row's new softmax follows from the base row's in O(1), and
  all positions of a head cost O(T^2), not a rerun per position. Grouped-query models: a key
  head's estimate sums over the query heads that read it.
- *GradDrop* (section 3.1.2). Cancelling paths make a gradient small even where a patch matters.
  For each layer ``l`` the backward is rerun with the gradient through that layer's writes to the
  residual stream (``hook_attn_out`` and ``hook_mlp_out``) zeroed; the GradDrop estimate is
  ``sum_l |estimate_l| / (n_layers - 1)``, as the paper defines it (here |.| of each layer's
  batch-mean estimate): an *unsigned* magnitude (`PatchResults.graddrop`), a ranking signal meant
  to catch false negatives, not an effect. A single cancelling path shows at about
  1/(n_layers - 1) of its size; on 143 planted cancellations (``benchmarks/bench_estimators.py``)
  it catches 7 of the 20 sources AtP misses. The signed ``atp_star`` scores are the QK-fixed AtP.
  Cost: ``n_layers`` extra forwards and backwards.

**RelP** (relevance patching; Jafari et al. 2025, arXiv 2508.21258) keeps AtP's cost and replaces
local gradients in the backward by layer-wise relevance propagation rules, each a
``stop_gradient`` at a named point of the one forward (`ModelConfig.backward_rules`, a subset of
:data:`attrpatch.arch.config.RELP_RULES`, all four by default; `relp_rules=` picks some, to see
which rule moves an estimate): ``"ln"`` holds every norm's scale (LN rule), ``"attention"`` holds
the attention pattern (the AH rule: gradient reaches the values only, so queries, keys and scores
get exactly zero; use ``atp_star`` for them), ``"identity"`` passes ``act(x) / x`` through the MLP
activation, ``"half"`` gives each factor of a gated product half the gradient. Final-logit
soft-caps keep their gradient. In a bias-free model under all four rules relevance is conserved
exactly: ``sum(resid_pre[l] * gradient)`` over positions and features is the metric of the base
run, at every layer (tests/test_relp.py).

**Integrated gradients** (Sundararajan et al. 2017) use the midpoint rule with ``steps`` points
``alpha = (i + 1/2) / steps``, whose error falls as 1/steps^2 along a smooth path. ``ig``
("IG-activations", Marks et al. 2024) moves one layer's site at a time, so its cost grows as
sites x layers x steps; ``ig_inputs`` (as EAP-IG, Hanna et al. 2024) interpolates only the input
embeddings and reads every site's gradient from the same ``steps`` backwards.

Every estimator: one jitted computation, only the answer positions unembedded, activation
differences before a prompt's first differing token exactly zero (by causality). Compare with
`attrpatch.patch` (exact patching) through `attrpatch.validate` before trusting a small score.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from attrpatch.arch import transformer as T
from attrpatch.arch.config import RELP_RULES
from attrpatch.interrupts import raise_if_interrupted
from attrpatch.interventions import Interventions
from attrpatch.model import Model
from attrpatch.progress import progress_bar
from attrpatch.results import (
    DIRECTIONS,
    ESTIMATORS,
    GRANULARITIES,
    QK_GRANULARITIES,
    PatchResults,
    Scores,
    check_granularities,
    reduce_to_grid,
)
from attrpatch.sharding import (
    check_mesh,
    constrain,
    leading_sharding,
    out_of_memory_advice,
    replicate,
    shard_leading,
    shard_model,
    to_host,
)
from attrpatch.sites import attention_qk_keys, block_keys, site_axes
from attrpatch.task import (
    MetricFn,
    MetricReference,
    Task,
    check_finite_metrics,
    check_reference,
    resolve_metric,
)

# The sites that write a layer's output into the residual stream (GradDrop cuts them).
_WRITES = ("hook_attn_out", "hook_mlp_out")


def estimator_cost(method: str, n_layers: int, steps: int = 5, n_sites: int = 1) -> float:
    """Nominal cost of an estimator in forward passes (a backward counts as two), for a model of
    `n_layers` and `n_sites` distinct sites (``ig`` only). The QK fix's recomputed attention
    logits are not counted (one head's logits, far less than a forward)."""
    return {"atp": 4.0, "atp_star": 4.0 + 3.0 * n_layers, "relp": 4.0,
            "ig": 2.0 + 3.0 * steps * n_layers * n_sites,
            "ig_inputs": 2.0 + 3.0 * steps}[method]


def _qk_fix_keys(cfg) -> tuple[str, ...]:
    """The sites the QK fix reads: those the attention logits are computed from, and with a
    whole-projection q/k norm also the raw queries and keys it normalises."""
    whole = ("attn.hook_q", "attn.hook_k") if cfg.qk_norm == "projection" else ()
    return attention_qk_keys(cfg) + whole


def _group_heads(x, cfg, axis: int):
    """Sum query heads ``[..., head, ...]`` (at `axis`) into the kv heads they read."""
    shape = x.shape[:axis] + (cfg.kv_heads, cfg.n_heads // cfg.kv_heads) + x.shape[axis + 1:]
    return x.reshape(shape).sum(axis + 1)


def qk_fixed(cfg, base: dict, source: dict, pattern_grad, changed, attention_mask,
             granularities: Sequence[str], params: dict) -> dict:
    """QK-fixed estimates (AtP* section 3.1.1) of the q/k granularities, per prompt.

    **Arguments:** `base`, `source`: caches with the sites of :func:`_qk_fix_keys`
    (``[layer, batch, pos, head, d_head]``); `pattern_grad`: dMetric/dA
    ``[layer, batch, head, query_pos, key_pos]`` at the base run; `changed` ``[batch, pos]``:
    positions at or after the prompt's first differing token; `attention_mask`: ``[batch, pos]``
    or None; `granularities`: which of :data:`attrpatch.results.QK_GRANULARITIES` to return;
    `params`: the model's (read for a whole-projection q/k norm, where patching one head's raw
    query or key moves every head's at that position: those are recomputed one patched head at
    a time).

    **Returns:** granularity -> ``[batch, *axes]``.
    """
    qkey, kkey = attention_qk_keys(cfg)
    whole = cfg.qk_norm == "projection"
    batch, n_pos = changed.shape
    positions = jnp.broadcast_to(jnp.arange(n_pos), (batch, n_pos))
    real = None if attention_mask is None else attention_mask > 0
    consts = T.layer_constants(cfg)
    keep = jax.vmap(lambda w: T.keep_mask(positions, positions, w, real))(consts["window"])

    def logits(q, k):  # [layer, batch, head, query_pos, key_pos]
        return jax.vmap(lambda q, k, keep, s: T.attention_scores(q, k, keep, s, cfg))(
            q, k, keep, consts["scale"])

    def one_head_patched(which: str, head, where):
        """Whole-projection q/k norm: queries (`which` "q") or keys ("k") as attention reads
        them, with head `head`'s raw projection taken from the source run `where` it is True."""
        raw = f"attn.hook_{which}"
        heads = (jnp.arange(base[raw].shape[3]) == head)[:, None]  # [heads, 1]
        mixed = jnp.where(where & heads, source[raw], base[raw])
        x = jax.vmap(lambda r, w: T.qk_normalize(r, w, cfg))(mixed, params["blocks"][f"{which}_norm_w"])
        if cfg.positions == "rotary":
            x = jax.vmap(lambda r, f: T.rotate(r, positions, f))(x, consts["inv_freq"])
        return x.astype(base[qkey].dtype)

    def each_head(fn, n_heads):  # fn(head) for every head, stacked on a new axis 0
        return jax.lax.map(fn, jnp.arange(n_heads))

    at_changed = changed[None, :, :, None, None]
    q_base, k_base = base[qkey], base[kkey]
    s_base = logits(q_base, k_base)
    a_base = jax.nn.softmax(s_base, -1)
    g = pattern_grad.astype(a_base.dtype)
    row_base = (a_base * g).sum(-1)  # [layer, batch, head, query_pos]
    out = {}
    if {"q", "q_by_pos"} & set(granularities):
        # Each query row is recomputed with the source query: the rows change independently.
        if whole:  # head h's query patched: every head's row at that position moves
            def rows_moved(h):  # [layer, batch, query_pos], summed over the heads
                a_q = jax.nn.softmax(logits(one_head_patched("q", h, at_changed), k_base), -1)
                return ((a_q * g).sum(-1) - row_base).sum(2)
            per_row = jnp.moveaxis(each_head(rows_moved, cfg.n_heads), 0, 2)
        else:
            a_q = jax.nn.softmax(logits(jnp.where(at_changed, source[qkey], q_base), k_base), -1)
            per_row = (a_q * g).sum(-1) - row_base
        per_row = per_row * changed[None, :, None, :]
        out["q_by_pos"] = jnp.moveaxis(per_row, (0, 2), (1, 3))  # [batch, layer, pos, head]
        out["q"] = per_row.sum(-1).swapaxes(0, 1)  # [batch, layer, head]
    if "k" in granularities and whole:  # kv head j's key patched: every head's logits move
        def k_effect(j):  # [layer, batch]
            a_k = jax.nn.softmax(logits(q_base, one_head_patched("k", j, at_changed)), -1)
            return ((a_k * g).sum(-1) - row_base).sum((2, 3))
        out["k"] = jnp.moveaxis(each_head(k_effect, cfg.kv_heads), 0, 2).swapaxes(0, 1)
    elif "k" in granularities:
        a_k = jax.nn.softmax(logits(q_base, jnp.where(at_changed, source[kkey], k_base)), -1)
        per_head = ((a_k * g).sum(-1) - row_base).sum(-1)  # [layer, batch, head]
        out["k"] = _group_heads(per_head, cfg, 2).swapaxes(0, 1)
    if "k_by_pos" in granularities:
        # Key s patched alone: row t's logit at s moves to s_new and the other entries keep
        # theirs, so the new row is the old one's other entries, reweighted, plus the new entry:
        # with R = log-sum-exp of the others and m_rest their normalised mean of g,
        # new . g = sigmoid(R - s_new) m_rest + sigmoid(s_new - R) g[s]. For s not the row's
        # largest entry, A[s] <= 1/2 and R, m_rest follow from the row's totals stably; for the
        # largest (A[s] may round to 1 in a saturated row) they are summed directly. With a
        # whole-projection k norm, kv head j's key at s moves every head's logit at s (still
        # one entry per row): recomputed for each j.
        lse = jax.scipy.special.logsumexp(s_base, -1, keepdims=True)
        top = jax.nn.one_hot(jnp.argmax(s_base, -1), n_pos, dtype=bool)
        others_of_top = jnp.where(top, -jnp.inf, s_base)
        rest_top = jax.scipy.special.logsumexp(others_of_top, -1, keepdims=True)
        mean_top = (jax.nn.softmax(others_of_top, -1) * g).sum(-1, keepdims=True)
        rest = jnp.where(top, rest_top, lse + jnp.log1p(-jnp.where(top, 0, a_base)))
        mean = jnp.where(top, mean_top,
                         (row_base[..., None] - a_base * g) / (1 - jnp.where(top, 0, a_base)))
        mean = jnp.where(jnp.isneginf(rest), 0, mean)  # a one-position prompt: no other keys

        def entry_effects(s_new):  # [layer, batch, head, key_pos], summed over the query rows
            new_row = jax.nn.sigmoid(rest - s_new) * mean + jax.nn.sigmoid(s_new - rest) * g
            return jnp.where(keep & changed[None, :, None, None, :], new_row - row_base[..., None],
                             0).sum(-2)

        if whole:
            per_key = jnp.moveaxis(each_head(lambda j: entry_effects(
                logits(q_base, one_head_patched("k", j, True))).sum(2), cfg.kv_heads), 0, 2)
        else:
            per_key = _group_heads(entry_effects(logits(q_base, source[kkey])), cfg, 2)
        # per_key: [layer, batch, kv_head, key_pos]
        out["k_by_pos"] = jnp.moveaxis(per_key, (0, 2), (1, 3))  # [batch, layer, pos, kv_head]
    return {g_: out[g_] for g_ in granularities}


def _changed_like(key: str, x, changed):
    """`changed` ``[batch, pos]`` shaped to broadcast against site `key`'s array `x`
    (``[layer, batch, ...]`` for block sites, ``[batch, pos, d]`` for ``hook_embed``)."""
    if key == "hook_embed":
        return changed[:, :, None]
    axes = site_axes(key)  # the array has a leading layer axis before these
    shape = [1] * x.ndim
    shape[1], shape[1 + axes.index("pos" if "pos" in axes else "query_pos")] = changed.shape
    return changed.reshape(shape)


@partial(
    jax.jit,
    static_argnames=("keys", "granularities", "direction", "metric_fn", "per_prompt", "remat",
                     "method", "steps", "batch_sharding"),
)
def _estimate(model, task, rows, reference, first_diff, keys, granularities, direction, metric_fn,
              per_prompt, remat, method, steps, batch_sharding):
    """The jitted body of :func:`attribute` for the prompts `rows` ``[micro_batch]`` of `task`
    (an index ``>= task.batch`` is padding: weight 0, no gradient). Every method forms
    gradient-like `weights` (site key -> ``[layer, micro_batch, *site dims]``, the activation's
    shape) and contracts them with the activation differences.

    `reference`: the whole batch's :class:`MetricReference`, or None where `rows` is the whole
    batch in order (it is then this run's own). `batch_sharding`: where the prompt axis goes on a
    mesh (None: one device).

    Returns sums over the real prompts of the grids ``[*axes]``, per-prompt grids
    ``[micro_batch, *axes]`` (if asked), per-layer GradDrop sums ``[layer, *axes]`` (``atp_star``),
    per-prompt base and source metrics ``[micro_batch]``, and the reference."""
    cfg = model.config
    valid = rows < task.batch  # [micro_batch]
    prompts = jnp.minimum(rows, task.batch - 1)  # padding rows rerun the last prompt
    base_tokens, source_tokens = (constrain(t[prompts], batch_sharding)
                                  for t in task.runs(direction))
    mask = None if task.attention_mask is None else task.attention_mask[prompts]
    positions = task.answer_positions[prompts]
    qk = tuple(g for g in granularities if g in QK_GRANULARITIES) if method == "atp_star" else ()
    grad_keys = tuple(sorted(set(keys) | ({"attn.hook_pattern"} if qk else set())))
    extra = set(_qk_fix_keys(cfg)) if qk else set()
    if method == "ig_inputs":
        extra.add("hook_embed")
    cache_keys = tuple(sorted(set(grad_keys) | extra))

    source_logits, source_cache = model.run(
        source_tokens, mask, cache_keys=cache_keys, logit_positions=positions
    )
    # Deltas (hence gradients) in at least float32, float64 for a float64 model.
    dtypes = {k: jnp.promote_types(source_cache[k].dtype, jnp.float32) for k in cache_keys}
    zeros = {k: jnp.zeros(source_cache[k].shape, dtypes[k]) for k in grad_keys}

    def base_run(deltas, grad_scale=None):
        return model.run(
            base_tokens, mask, Interventions(delta=deltas, grad_scale=grad_scale), cache_keys=cache_keys,
            logit_positions=positions, remat=remat,
        )

    base_logits, pullback, base_cache = jax.vjp(base_run, zeros, has_aux=True)
    if reference is None:
        if direction == "denoise":
            reference = MetricReference(source_logits, base_logits)
        else:
            reference = MetricReference(base_logits, source_logits)

        def per_prompt_metric(logits):
            return metric_fn(logits, task, reference)
    else:
        # These prompts' logits in place of theirs in a whole batch: metrics are per prompt
        # given the fixed reference, so the gradient is this batch's. Padding rows: 0, no gradient.
        def per_prompt_metric(logits):
            whole = reference.clean_logits.at[rows].set(
                logits.astype(reference.clean_logits.dtype), mode="drop")
            return jnp.where(valid, metric_fn(whole, task, reference)[prompts], 0)
    # The reference is held fixed (as in exact patching): differentiate w.r.t. the logits only.

    def grads_at(deltas, grad_scale=None):
        """dMetric/d(deltas) (per prompt, summed: prompts do not interact) at the given deltas."""
        return jax.grad(lambda d: per_prompt_metric(base_run(d, grad_scale)[0]).sum())(deltas)

    # Causality: before a prompt's first differing token both runs are the same computation, so
    # their activations differ only by compilation (the base run is differentiated, the source
    # run not): the difference there is exactly zero, as in exact patching.
    changed = jnp.arange(base_tokens.shape[1])[None] >= first_diff[prompts][:, None]  # [batch, pos]
    diffs = {}
    for key in cache_keys:
        d = source_cache[key].astype(dtypes[key]) - base_cache[key].astype(dtypes[key])
        diffs[key] = jnp.where(_changed_like(key, d, changed), d, 0)

    def grids(weights):
        """Per-prompt grids ``[batch, *axes]`` of every granularity from gradient-like weights."""
        out = qk_fixed(cfg, base_cache, source_cache, weights["attn.hook_pattern"], changed, mask,
                       qk, model.params) if qk else {}
        for g in granularities:
            if g not in out:
                key = GRANULARITIES[g][0]
                out[g] = reduce_to_grid(diffs[key] * weights[key], key, g)
        return out

    def real_sum(x):  # [batch, ...] -> [...], padding rows left out
        return jnp.where(valid.reshape(-1, *[1] * (x.ndim - 1)), x, 0).sum(0)

    graddrop = None
    if method in ("atp", "atp_star", "relp"):  # relp: the model carries its backward rules
        logit_grad = jax.grad(lambda logits: per_prompt_metric(logits).sum())(base_logits)
        (weights,) = pullback(logit_grad)
    elif method == "ig":
        alphas = (jnp.arange(steps) + 0.5) / steps
        weights = {}
        for key in grad_keys:  # one site, one layer at a time: the rest of the model recomputed
            n_layers = diffs[key].shape[0]

            def step(acc, layer_alpha, key=key):
                layer, alpha = layer_alpha
                moved = zeros[key].at[layer].set(alpha * diffs[key][layer])
                return acc.at[layer].add(grads_at({key: moved})[key][layer] / steps), None

            pairs = (jnp.repeat(jnp.arange(n_layers), steps), jnp.tile(alphas, n_layers))
            weights[key], _ = jax.lax.scan(step, zeros[key], pairs)
    else:  # ig_inputs: interpolate the input embeddings; every site's gradient from one pass
        alphas = (jnp.arange(steps) + 0.5) / steps

        def step(acc, alpha):
            g = grads_at(dict(zeros, hook_embed=alpha * diffs["hook_embed"]))
            return {k: acc[k] + g[k] / steps for k in grad_keys}, None

        weights, _ = jax.lax.scan(step, zeros, alphas)

    per = grids(weights)
    if method == "atp_star":
        writes = tuple(k for k in _WRITES if k in block_keys(cfg))

        def dropped(layer):  # this layer's writes cut: signed sums over the prompts
            cut = (jnp.arange(cfg.n_layers) != layer).astype(jnp.float32)
            w = grads_at(zeros, {k: cut for k in writes})
            return {g: real_sum(v) for g, v in grids(w).items()}

        graddrop = jax.lax.map(dropped, jnp.arange(cfg.n_layers))
    return dict(
        sums={g: real_sum(v) for g, v in per.items()},
        per_prompt=per if per_prompt else {},
        graddrop=graddrop,
        base=per_prompt_metric(base_logits),
        source=per_prompt_metric(source_logits),
        reference=reference,
    )


def _check_options(direction, method, steps, batch_size) -> None:
    """`ValueError` for a bad direction, method, `steps` or `batch_size` of :func:`attribute`."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if method not in ESTIMATORS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(ESTIMATORS)} "
                         "(exact effects come from attrpatch.patch)")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if value is None and name == "batch_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def with_relp_rules(model: Model, method: str, rules: Sequence[str] | None) -> Model:
    """`model` whose backward applies RelP's `rules` (all of them by default) for
    ``method="relp"``; `model` itself for other methods, which take no rules."""
    if method != "relp":
        if rules is not None:
            raise ValueError(f"relp_rules apply to method='relp', not method={method!r}")
        return model
    rules = RELP_RULES if rules is None else tuple(rules)
    unknown = [r for r in rules if r not in RELP_RULES]
    if unknown or isinstance(rules, str):
        raise ValueError(f"relp_rules: {', '.join(map(repr, unknown or [rules]))} not known; "
                         f"choose from {', '.join(RELP_RULES)}")
    config = dataclasses.replace(model.config, backward_rules=frozenset(rules))
    return Model(config, model.params)


def _micro_batches(n_prompts: int, batch_size: int | None, mesh) -> tuple[int, int]:
    """(prompts per micro-batch, micro-batches): at most `batch_size` prompts, rounded up to a
    multiple of the mesh's ``data`` axis (the excess is padding)."""
    n_data = 1 if mesh is None else mesh.shape["data"]
    micro = -(-min(batch_size or n_prompts, n_prompts) // n_data) * n_data
    return micro, -(-n_prompts // micro)


@jax.jit
def _reference_logits(model, task) -> MetricReference:
    """Answer logits ``[batch, d_vocab]`` of the clean and corrupted runs (the metric's reference)."""
    def run(tokens):
        return model.run(tokens, task.attention_mask, logit_positions=task.answer_positions)[0]
    return MetricReference(run(task.clean_tokens), run(task.corrupt_tokens))


def attribute(
    model: Model,
    task: Task,
    granularities: Sequence[str] | str | None = None,
    direction: str = "denoise",
    metric: str | MetricFn | None = None,
    per_prompt: bool = False,
    remat: bool = False,
    method: str = "atp",
    steps: int = 5,
    batch_size: int | None = None,
    mesh=None,
    progress: bool = True,
    relp_rules: Sequence[str] | None = None,
) -> PatchResults:
    """Estimated patching effects of every component of the requested granularities.

    **Arguments:**

    - `model`: the :class:`attrpatch.Model`.
    - `task`: the :class:`attrpatch.Task` (clean and corrupted prompts, answers).
    - `granularities`: names from :data:`attrpatch.results.GRANULARITIES` (default:
      :data:`attrpatch.results.DEFAULT_GRANULARITIES`). Granularities on the same site share one
      delta and one backward.
    - `direction`: ``"denoise"`` (base run corrupted, clean activations patched in) or
      ``"noise"`` (base run clean, corrupted activations patched in).
    - `metric`: a name from :data:`attrpatch.METRICS`, a function
      ``fn(answer_logits [batch, d_vocab], task, reference) -> [batch]``, or None for the
      task's default. A function is a static argument of the jitted computation: pass the same
      function object to reuse the compilation.
    - `per_prompt`: also return ``[prompt, *axes]`` scores (from the same backward).
    - `remat`: rematerialise each block in the backward (less memory, about one more forward).
    - `method`: the estimator, one of :data:`attrpatch.results.ESTIMATORS` (see the module
      docstring for what each computes and costs): ``"atp"``, ``"atp_star"`` (costs
      ``n_layers`` more forwards and backwards than ``atp``), ``"relp"`` (AtP's cost),
      ``"ig"`` (cost linear in `steps` x layers x sites), ``"ig_inputs"`` (cost linear in
      `steps`).
    - `relp_rules`: ``method="relp"`` only: which of RelP's rules to apply (default all of
      :data:`attrpatch.arch.config.RELP_RULES`); fewer shows which rule moves an estimate.
    - `steps`: integration points of ``ig`` and ``ig_inputs`` (midpoint rule).
    - `batch_size`: prompts per micro-batch (None: all at once). Memory falls with it; results
      equal one batch's (sums of per-prompt gradients), at the cost of two extra forwards for
      the metric's reference.
    - `mesh`: a ``(data, model)`` `jax.sharding.Mesh` (:func:`attrpatch.make_mesh`) or None
      for one device. Prompts are split over ``data`` (a micro-batch is padded to a multiple of
      it), parameters over ``model`` (:mod:`attrpatch.sharding`).
    - `progress`: a progress bar over the micro-batches (:mod:`attrpatch.progress`).

    **Returns:** :class:`attrpatch.PatchResults` with ``method`` set; ``scores[g].values`` has
    the granularity's axes (e.g. ``[layer, head]`` for ``z``) and is the batch mean of the
    per-prompt scores; ``graddrop`` (``atp_star``) the unsigned GradDrop magnitudes;
    ``cost_forwards`` the nominal cost (:func:`estimator_cost`).

    Raises `ValueError` for an unknown granularity, direction, method or metric, a bad `steps`
    or `batch_size`, a mesh without ``data``/``model`` axes, or a task the model cannot run;
    `MemoryError`, saying what to lower, where the device runs out of memory.
    """
    _check_options(direction, method, steps, batch_size)
    model = with_relp_rules(model, method, relp_rules)
    mesh = check_mesh(mesh)
    granularities = check_granularities(granularities, model.config)
    task.check_for(model)
    metric_name, metric_fn = resolve_metric(metric, task)
    if metric_name == "kl" and direction == "noise" and method in ("atp", "atp_star"):
        warnings.warn(
            f"{method} with metric='kl' and direction='noise' is zero everywhere: the KL divergence "
            "from the clean distribution is at its minimum on the clean run, so its gradient there "
            "vanishes. Use method='ig', exact patching, direction='denoise', or another metric.",
            stacklevel=2,
        )
    keys = tuple(sorted({GRANULARITIES[g][0] for g in granularities}))

    model, task = shard_model(model, mesh), replicate(task, mesh)
    micro, n_micro = _micro_batches(task.batch, batch_size, mesh)
    start = time.perf_counter()
    reference = None
    if micro != task.batch:  # split or padded: one reference for all micro-batches
        reference = _reference_logits(model, task)
    first_diff = jnp.asarray(task.first_diff_positions)
    parts = []
    advice = (f"{micro} prompts per micro-batch. Lower batch_size=, pass remat=True, or split the "
              "parameters over more devices (mesh=attrpatch.make_mesh(model=M)); "
              "attrpatch.attribution.attribute_memory says what a setting needs per device")
    with out_of_memory_advice(advice), progress_bar(n_micro, progress, method, "batch") as bar:
        for i in range(n_micro):
            raise_if_interrupted()
            rows = shard_leading(np.arange(i * micro, (i + 1) * micro, dtype=np.int32), mesh)
            parts.append(_estimate(model, task, rows, reference, first_diff, keys, granularities,
                                   direction, metric_fn, bool(per_prompt), bool(remat), method,
                                   int(steps), leading_sharding(mesh)))
            if not bar.disable:  # a bar that means something: wait for this micro-batch
                jax.block_until_ready(parts[-1])
            bar.update(1)
        parts = to_host(parts)
    seconds = time.perf_counter() - start
    check_reference(metric_name, task, to_host(parts[0]["reference"]))

    def whole(get):  # per-prompt arrays of the micro-batches, joined, padding dropped
        return np.concatenate([get(p) for p in parts])[: task.batch]

    n = task.batch
    scores = {
        g: Scores(g, sum(p["sums"][g] for p in parts) / n,
                  whole(lambda p, g=g: p["per_prompt"][g]) if per_prompt else None)
        for g in granularities
    }
    base, source = whole(lambda p: p["base"]), whole(lambda p: p["source"])
    check_finite_metrics(base, source)
    graddrop = None
    if method == "atp_star":  # sum over layers of |batch-mean estimate with the layer cut|
        per_layer = {g: sum(p["graddrop"][g] for p in parts) / n for g in granularities}
        graddrop = {g: np.abs(v).sum(0) / max(model.config.n_layers - 1, 1)
                    for g, v in per_layer.items()}
    return PatchResults(
        method=method,
        direction=direction,
        metric=metric_name,
        base_metric=float(base.mean()),
        source_metric=float(source.mean()),
        scores=scores,
        base_metric_per_prompt=base,
        source_metric_per_prompt=source,
        seconds=seconds,
        graddrop=graddrop,
        cost_forwards=estimator_cost(method, model.config.n_layers, int(steps), len(keys)),
    )


def attribute_memory(model: Model, task: Task, granularities: Sequence[str] | str | None = None,
                     direction: str = "denoise", metric: str | MetricFn | None = None,
                     method: str = "atp", steps: int = 5, batch_size: int | None = None,
                     remat: bool = False, mesh=None) -> dict[str, int]:
    """Bytes per device that :func:`attribute` with these arguments needs for one micro-batch,
    from XLA's analysis of the compiled computation (one compile; nothing runs): ``arguments``
    (parameters, tokens), ``temporaries`` (activations, gradients), ``outputs`` and ``total``.
    What to lower when it does not fit: `batch_size`, ``remat=True``, or a larger ``model`` axis.
    """
    _check_options(direction, method, steps, batch_size)
    mesh = check_mesh(mesh)
    granularities = check_granularities(granularities, model.config)
    _, metric_fn = resolve_metric(metric, task)
    keys = tuple(sorted({GRANULARITIES[g][0] for g in granularities}))
    model, task = shard_model(model, mesh), replicate(task, mesh)
    micro, _ = _micro_batches(task.batch, batch_size, mesh)
    reference = None
    if micro != task.batch:
        reference = jax.eval_shape(_reference_logits, model, task)
    rows = shard_leading(np.arange(micro, dtype=np.int32), mesh)
    compiled = _estimate.lower(
        model, task, rows, reference, jnp.asarray(task.first_diff_positions), keys,
        granularities, direction, metric_fn, False, bool(remat), method, int(steps),
        leading_sharding(mesh)).compile()
    stats = compiled.memory_analysis()
    out = {"arguments": int(stats.argument_size_in_bytes),
           "temporaries": int(stats.temp_size_in_bytes),
           "outputs": int(stats.output_size_in_bytes)}
    return out | {"total": sum(out.values())}
