"""Attribution patching (AtP): the first-order estimate of every patch at once.

For a patch that moves site activation ``a`` from the base run's value to the source run's,
AtP estimates the metric change as ``(a_source - a_base) . dMetric/da``, the gradient taken at
the base run (Nanda 2023). One jitted computation does everything: a source forward caching
the requested sites, and one base forward + backward with respect to zero-valued deltas added
at every requested site (`Interventions(delta=...)`), never one backward per site. Only the
answer positions are unembedded. Activation differences before a prompt's first differing token
are exactly zero by causality and are set so (not left to rounding).

Numerical notes: AtP is exact for sites whose path to the metric is linear (and for a model made
linear); elsewhere it is a tangent-line estimate that can miss saturation (softmax, LayerNorm,
GELU) and cancellation. Compare with `attrpatch` exact patching before trusting a small score.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from attrpatch.interventions import Interventions
from attrpatch.model import Model
from attrpatch.results import (
    DIRECTIONS,
    GRANULARITIES,
    PatchResults,
    Scores,
    check_granularities,
    reduce_to_grid,
)
from attrpatch.sites import site_axes
from attrpatch.task import MetricFn, MetricReference, Task, check_reference, resolve_metric


@partial(
    jax.jit,
    static_argnames=("keys", "granularities", "direction", "metric_fn", "per_prompt", "remat"),
)
def _atp(model, task, first_diff, keys, granularities, direction, metric_fn, per_prompt, remat):
    base_tokens, source_tokens = task.runs(direction)
    mask, positions = task.attention_mask, task.answer_positions

    source_logits, source_cache = model.run(
        source_tokens, mask, cache_keys=keys, logit_positions=positions
    )
    # Deltas (hence gradients) in at least float32, float64 for a float64 model.
    dtypes = {k: jnp.promote_types(source_cache[k].dtype, jnp.float32) for k in keys}
    deltas = {k: jnp.zeros(source_cache[k].shape, dtypes[k]) for k in keys}

    def base_run(deltas):
        return model.run(
            base_tokens, mask, Interventions(delta=deltas), cache_keys=keys,
            logit_positions=positions, remat=remat,
        )

    base_logits, pullback, base_cache = jax.vjp(base_run, deltas, has_aux=True)
    if direction == "denoise":
        reference = MetricReference(source_logits, base_logits)
    else:
        reference = MetricReference(base_logits, source_logits)
    # The reference is held fixed (as in exact patching): differentiate w.r.t. the logits only.
    per_prompt_metric = lambda logits: metric_fn(logits, task, reference)
    logit_grad = jax.grad(lambda logits: per_prompt_metric(logits).sum())(base_logits)
    (grads,) = pullback(logit_grad)

    values, prompts = {}, {}
    # Causality: before a prompt's first differing token both runs are the same computation, so
    # their activations differ only by compilation (the base run is differentiated, the source
    # run not): the difference there is exactly zero, as in exact patching.
    changed = jnp.arange(base_tokens.shape[1])[None] >= first_diff[:, None]  # [batch, pos]
    for key in keys:
        diff = source_cache[key].astype(dtypes[key]) - base_cache[key].astype(dtypes[key])
        axes = site_axes(key)  # the cache adds a leading layer axis
        shape = [1] * diff.ndim
        shape[1], shape[1 + axes.index("pos" if "pos" in axes else "query_pos")] = changed.shape
        diff = jnp.where(changed.reshape(shape), diff, 0)
        product = diff * grads[key]
        for g in granularities:
            if GRANULARITIES[g][0] == key:
                grid = reduce_to_grid(product, key, g)  # [batch, *axes]
                values[g] = grid.mean(0)
                if per_prompt:
                    prompts[g] = grid
    return dict(
        values=values,
        per_prompt=prompts,
        base=per_prompt_metric(base_logits),
        source=per_prompt_metric(source_logits),
        reference=reference,
    )


def attribute(
    model: Model,
    task: Task,
    granularities: Sequence[str] | str | None = None,
    direction: str = "denoise",
    metric: str | MetricFn | None = None,
    per_prompt: bool = False,
    remat: bool = False,
) -> PatchResults:
    """Attribution-patching scores for every component of the requested granularities.

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

    **Returns:** :class:`attrpatch.PatchResults` with ``method="atp"``; ``scores[g].values`` has
    the granularity's axes (e.g. ``[layer, head]`` for ``z``) and is the batch mean of the
    per-prompt scores.

    Raises `ValueError` for an unknown granularity, direction or metric, or a task the model
    cannot run.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    granularities = check_granularities(granularities, model.config)
    task.check_for(model)
    metric_name, metric_fn = resolve_metric(metric, task)
    if metric_name == "kl" and direction == "noise":
        warnings.warn(
            "AtP with metric='kl' and direction='noise' is zero everywhere: the KL divergence from "
            "the clean distribution is at its minimum on the clean run, so its gradient there "
            "vanishes. Use exact patching, direction='denoise', or another metric.",
            stacklevel=2,
        )
    keys = tuple(sorted({GRANULARITIES[g][0] for g in granularities}))

    start = time.perf_counter()
    out = _atp(model, task, jnp.asarray(task.first_diff_positions), keys, granularities, direction,
               metric_fn, bool(per_prompt), bool(remat))
    out = jax.device_get(out)
    seconds = time.perf_counter() - start
    check_reference(metric_name, task, out["reference"])

    scores = {
        g: Scores(
            g,
            np.asarray(out["values"][g]),
            np.asarray(out["per_prompt"][g]) if per_prompt else None,
        )
        for g in granularities
    }
    base, source = np.asarray(out["base"]), np.asarray(out["source"])
    return PatchResults(
        method="atp",
        direction=direction,
        metric=metric_name,
        base_metric=float(base.mean()),
        source_metric=float(source.mean()),
        scores=scores,
        base_metric_per_prompt=base,
        source_metric_per_prompt=source,
        seconds=seconds,
    )
