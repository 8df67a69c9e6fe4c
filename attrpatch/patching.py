"""Exact activation patching: really replace one component's activation and rerun, for every component.

Effect of a component = metric(base run with the patch) - metric(unpatched base run), in metric
units, per prompt and batch mean (:mod:`attrpatch.results` defines granularities, axes, base and
source). The engine gives the same numbers as a naive "one full forward per patch" loop, faster:

- a patch in layer ``l`` starts from the base run's cached input of layer ``l``;
- a patch at position ``p`` (or at positions before a prompt's first clean/corrupt difference,
  or after its answer position) leaves earlier positions unchanged, so only the suffix from a
  start ``s <= p`` is recomputed, attending over the cached keys and values of the prefix
  (``s`` is one of a few static *buckets*, one compile each); provably inert patches (before the
  first difference, after the answer, or writing the value already there) are written as exact
  zeros and not run;
- a patch of one position of a site after attention mixing (z, q, attn_out, mlp, resid_mid/post:
  "row-local") changes only that row in its layer: that layer runs as a one-row block over the
  cached keys and values, and in the last layer only the answer position is run;
- the variants of one layer run batched (`vmap`, in calls of one fixed chunk size per
  granularity and start); the layers after the patched one run in a loop with a traced start,
  so one compile serves every layer; the last block (unless patched) and the unembedding run
  only at the answer positions, and for the logit-difference metrics only the logit columns
  they read are computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attrpatch import gpt2
from attrpatch.atomic import atomic_write
from attrpatch.interventions import NO_INTERVENTIONS, Interventions, Patch
from attrpatch.results import (
    DIRECTIONS,
    GRANULARITIES,
    PatchResults,
    Scores,
    check_granularities,
    grid_shape,
)
from attrpatch.sites import site_axes
from attrpatch.task import METRICS, MetricReference, Task, check_reference, resolve_metric

SOURCES = ("default", "zero", "mean", "resample")
ABLATIONS = ("zero", "mean", "resample")
_HEAD_SITES = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")
_PATTERN = "attn.hook_pattern"
# Sites after attention mixing that change only their own row: patching one position of one of
# these in layer l leaves every other position of layer l as in the base run.
_ROW_LOCAL = ("attn.hook_q", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre",
              "mlp.hook_post", "hook_mlp_out", "hook_resid_post")

__all__ = ["ABLATIONS", "SOURCES", "gaussian_noise_corruption", "patch", "resample_permutation",
           "top_neurons"]


# ----------------------------------------------------------------------------------------------
# Components: which variants a granularity has in one layer


def _components(gran: str, n_pos: int, n_heads: int, neurons: Sequence[int]):
    """Components of one layer: grid index ``[C, k]``, variant index ``[C, 4]``
    (pos, head, neuron, key_pos) and causal position ``[C]`` (-1: all positions)."""
    axes = GRANULARITIES[gran][1][1:]
    sizes = {"pos": range(n_pos), "query_pos": range(n_pos), "key_pos": range(n_pos),
             "head": range(n_heads), "neuron": neurons}
    grids = np.stack(np.meshgrid(*[np.asarray(sizes[a]) for a in axes], indexing="ij"), -1)
    grids = grids.reshape(-1, len(axes)).astype(np.int32)
    idx = np.zeros((len(grids), 4), np.int32)
    cpos = np.full(len(grids), -1, np.int32)
    for j, a in enumerate(axes):
        if a in ("pos", "query_pos"):
            idx[:, 0] = cpos[:] = grids[:, j]
        elif a == "head":
            idx[:, 1] = grids[:, j]
        elif a == "neuron":
            idx[:, 2] = grids[:, j]
        elif a == "key_pos":
            idx[:, 3] = grids[:, j]
    return grids, idx, cpos


def _mask(gran: str, ix, start: int, n_suffix: int, n_pos: int, cfg) -> jax.Array:
    """Patch mask for variant `ix` (pos, head, neuron, key_pos), broadcastable to the site's
    suffix activation (``[batch, suffix, ...]``, or ``[batch, head, suffix, key_pos]`` for patterns)."""
    key, axes = GRANULARITIES[gran]
    pos_hit = (start + jnp.arange(n_suffix)) == ix[0]  # [S]
    head_hit = jnp.arange(cfg.n_heads) == ix[1]  # [H]
    if key == _PATTERN:
        m = head_hit[:, None, None]
        if "query_pos" in axes:
            m = m & pos_hit[None, :, None]
        if "key_pos" in axes:
            m = m & (jnp.arange(n_pos) == ix[3])[None, None, :]
        return m[None]
    if key in _HEAD_SITES:
        m = head_hit[None, :, None]
        if "pos" in axes:
            m = m & pos_hit[:, None, None]
        return m[None]
    if "neuron" in axes:
        m = (jnp.arange(cfg.d_mlp) == ix[2])[None, :]
        if "pos" in axes:
            m = m & pos_hit[:, None]
        return m[None]
    return pos_hit[None, :, None]


def _suffix(x: jax.Array, key: str, start: int) -> jax.Array:
    """A site activation ``[batch, ...]`` restricted to positions >= start (query rows for patterns)."""
    return x[:, :, start:] if key == _PATTERN else x[:, start:]


# ----------------------------------------------------------------------------------------------
# The compiled sweep: all variants of one (granularity, layer, start)


@partial(jax.jit, static_argnames=("cfg", "gran", "start", "batch_size", "metric_fn", "row_local"))
def _sweep(params, layer, resid, source, prefix_kv, keep, answer_idx, idx, task, reference,
           resid_next=None, layer_kv=None, keep_rows=None, cols=None, *,
           cfg, gran, start, batch_size, metric_fn, row_local=False):
    """Metric ``[n_variants, batch]``: each variant `idx[i]` patched into layer `layer`.

    - `resid`: the base run's input of `layer`, positions >= start ``[batch, S, d_model]``.
    - `source`: the site's source activation of `layer` in suffix coordinates.
    - `prefix_kv`: the base run's keys and values ``[n_layers, batch, start, head, d_head]``
      (None when start is 0).
    - `keep`: attention keep-mask ``[batch, 1, S, pos]``; `answer_idx`: ``[batch]`` in suffix coords.
    - `row_local`: the site sits after attention mixing and each variant patches one position
      ``p``: layer `layer` then changes only row ``p`` (run as a one-row block attending over the
      base run's keys and values `layer_kv` ``[batch, pos, head, d_head]`` x 2, with `keep_rows`
      ``[batch, pos, pos]``), and the next layer's input is the base run's (`resid_next`, suffix)
      with that row replaced.
    - `cols`: ``[batch, k]`` the only logit columns the metric reads (None: all).
    """
    blocks = params["blocks"]
    scales = gpt2.attention_scales(cfg)
    site_key = GRANULARITIES[gran][0]
    n_suffix, n_pos = resid.shape[1], keep.shape[-1]
    last = cfg.n_layers - 1
    b = resid.shape[0]
    rows = jnp.arange(b)

    def at(tree, j):
        return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, j, keepdims=False), tree)

    def kv(j):
        return None if prefix_kv is None else at(prefix_kv, j)

    p_layer, kv_layer = at(blocks, layer), kv(layer)

    def body(j, x):
        return gpt2.block(at(blocks, j), cfg, x, keep, scales[j], NO_INTERVENTIONS, kv(j))[0]

    def answer_metric(x):
        normed = gpt2.layer_norm(x, params["ln_f_w"], params["ln_f_b"], cfg.layer_norm_eps)
        dt = jnp.promote_types(normed.dtype, jnp.float32)  # as in `gpt2.forward`
        if cols is None:
            logits = normed.astype(dt) @ params["W_U"].astype(dt)
        else:  # only the columns the metric reads; the others are never looked at
            sel = jnp.einsum("bd,dbk->bk", normed.astype(dt), params["W_U"].astype(dt)[:, cols])
            logits = jnp.zeros((b, params["W_U"].shape[1]), dt).at[rows[:, None], cols].set(sel)
        return metric_fn(logits, task, reference)

    def one(ix):
        if row_local:
            r = ix[0] - start  # the patched row, in suffix coordinates
            mask = _mask(gran, ix, ix[0], 1, n_pos, cfg)  # the one row is position ix[0]
            src_row = lax.dynamic_slice_in_dim(source, r, 1, axis=1)
            iv = Interventions(patch={site_key: Patch(mask, src_row)})
            row = _row_block(p_layer, cfg, lax.dynamic_index_in_dim(resid, r, 1), keep_rows,
                             ix[0], scales[layer], layer_kv, iv)  # [batch, d]
            x = lax.dynamic_update_index_in_dim(resid_next, row, r, 1)
            x = lax.fori_loop(layer + 1, last, body, x)
            final = lax.cond(layer < last, lambda x: _last_block_at_answer(
                at(blocks, last), cfg, x, keep, scales[last], kv(last), answer_idx),
                lambda x: row, x)
            return answer_metric(final)
        mask = _mask(gran, ix, start, n_suffix, n_pos, cfg)
        iv = Interventions(patch={site_key: Patch(mask, source)})
        x, _ = gpt2.block(p_layer, cfg, resid, keep, scales[layer], iv, kv_layer)
        x = lax.fori_loop(layer + 1, last, body, x)
        # The last block matters only at the answer rows (unless it is the patched one).
        x = lax.cond(layer < last, lambda x: _last_block_at_answer(
            at(blocks, last), cfg, x, keep, scales[last], kv(last), answer_idx),
            lambda x: x[rows, answer_idx], x)
        return answer_metric(x)

    return lax.map(one, idx, batch_size=batch_size)


def _row_block(p, cfg, x_row, keep_rows, pos, scale, layer_kv, iv):
    """`gpt2.block` output ``[batch, d]`` at the one position `pos` (input `x_row` ``[batch, 1, d]``),
    attending over the base run's keys and values `layer_kv` of every position (the row's own
    cached copy masked out: the block appends its own)."""
    k, v = layer_kv
    own = jnp.arange(k.shape[1]) == pos
    row_keep = lax.dynamic_index_in_dim(keep_rows, pos, 1, keepdims=False) & ~own[None]
    row_keep = jnp.concatenate([row_keep, jnp.ones((row_keep.shape[0], 1), bool)], axis=1)
    out, _ = gpt2.block(p, cfg, x_row, row_keep[:, None, None, :], scale, iv, (k, v))
    return out[:, 0]


def _last_block_at_answer(p, cfg, x, keep, scale, prefix_kv, answer_idx):
    """`gpt2.block` output at one row per prompt: ``x [batch, S, d] -> [batch, d]``.

    Keys and values of every position (cached prefix + suffix) become the prefix of a one-row
    block; the answer row's own copy in that prefix is masked out (the block appends it again).
    """
    b, n_suffix, _ = x.shape
    rows = jnp.arange(b)
    h = gpt2.layer_norm(x, p["ln1_w"], p["ln1_b"], cfg.layer_norm_eps)  # as in `gpt2.block`
    k = jnp.einsum("bpd,dhe->bphe", h, p["W_K"]) + p["b_K"]
    v = jnp.einsum("bpd,dhe->bphe", h, p["W_V"]) + p["b_V"]
    if prefix_kv is not None:
        k = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=1)
        v = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=1)
    n_keys = k.shape[1]
    own = jnp.arange(n_keys)[None, :] == (n_keys - n_suffix + answer_idx)[:, None]  # [b, keys]
    row_keep = keep[rows, 0, answer_idx] & ~own
    row_keep = jnp.concatenate([row_keep, jnp.ones((b, 1), bool)], axis=1)[:, None, None, :]
    out, _ = gpt2.block(p, cfg, x[rows, answer_idx][:, None], row_keep, scale, NO_INTERVENTIONS,
                        (k, v))
    return out[:, 0]


# ----------------------------------------------------------------------------------------------
# Helpers users call


def gaussian_noise_corruption(model, task: Task, scale: float = 3.0, seed: int = 0,
                              positions: Sequence[int] | None = None) -> Interventions:
    """A corrupted run for tasks without corrupted prompts: Gaussian noise on ``hook_embed``.

    Noise std is `scale` times the std of the clean prompts' token embeddings (3x, as in ROME and
    Heimersheim & Nanda 2024). Pass the result as ``patch(..., corrupt_interventions=...)``; the
    corrupted run is then the clean tokens with this noise.

    - `positions`: positions to noise (default all).

    **Returns:** `Interventions` with ``delta["hook_embed"]`` of shape ``[batch, pos, d_model]``.
    """
    embed = np.asarray(model.params["W_E"])[np.asarray(task.clean_tokens)]
    std = float(embed.std()) * scale
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(embed.shape).astype(np.float32) * std
    if positions is not None:
        keep = np.zeros(task.n_pos, bool)
        keep[np.asarray(positions)] = True
        noise = noise * keep[None, :, None]
    return Interventions(delta={"hook_embed": jnp.asarray(noise)})


def resample_permutation(batch: int, seed: int) -> np.ndarray:
    """The prompt order ``[batch]`` resample ablation takes activations from: a seeded
    derangement (no prompt gets its own activation)."""
    if batch < 2:
        raise ValueError("resample ablation needs at least 2 prompts")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(batch)
        if (perm != np.arange(batch)).all():
            return perm


def top_neurons(results: PatchResults, k: int) -> list[tuple[int, int]]:
    """The `k` (layer, neuron) pairs with the largest |score| in `results` ("post", else the
    largest |score| over positions of "post_by_pos")."""
    if "post" in results.scores:
        vals = np.abs(results["post"])
    elif "post_by_pos" in results.scores:
        vals = np.nanmax(np.abs(results["post_by_pos"]), axis=1)
    else:
        raise ValueError("top_neurons: results have no 'post' or 'post_by_pos' scores")
    vals = np.where(np.isnan(vals), -np.inf, vals)
    order = np.argsort(-vals, axis=None, kind="stable")[:k]
    return [tuple(int(i) for i in np.unravel_index(o, vals.shape)) for o in order]


# ----------------------------------------------------------------------------------------------
# Progress and checkpoints


class _Progress:
    """Plain one-line progress bar with ETA on stderr, shown only once a sweep passes `delay` s."""

    def __init__(self, total: float, enabled: bool, delay: float = 2.0):
        self.total, self.delay = max(total, 1e-9), delay
        self.enabled = enabled and sys.stderr.isatty()  # a log would fill with carriage returns
        self.done, self.t0, self.last, self.shown = 0.0, time.perf_counter(), 0.0, False

    def update(self, amount: float, label: str) -> None:
        self.done += amount
        now = time.perf_counter()
        elapsed = now - self.t0
        if not self.enabled or elapsed < self.delay or (now - self.last < 0.2 and self.done < self.total):
            return
        self.last, self.shown = now, True
        frac = min(self.done / self.total, 1.0)
        eta = elapsed * (1 - frac) / max(frac, 1e-9)
        bar = "#" * int(30 * frac)
        sys.stderr.write(
            f"\rpatch [{bar:<30}] {100 * frac:5.1f}% {elapsed:6.1f}s ETA {eta:6.1f}s {label:<24}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _fingerprint(model, task, direction, source, metric_name, seed, neurons, corrupt_iv) -> str:
    """Hash of everything the effects depend on (model, prompts, options)."""
    h = hashlib.sha256()
    h.update(repr((model.config, direction, source, metric_name, seed, neurons)).encode())
    for leaf in jax.tree.leaves((model.params, task, corrupt_iv)):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# The engine


def _check_neurons(neurons, cfg) -> dict[int, list[int]]:
    if isinstance(neurons, PatchResults):
        neurons = top_neurons(neurons, 64)
    out: dict[int, set[int]] = {}
    for item in neurons:
        if not isinstance(item, Sequence | np.ndarray) or len(item) != 2:
            raise ValueError(f"neurons: expected (layer, neuron) pairs, got {item!r}")
        layer, n = int(item[0]), int(item[1])
        if not (0 <= layer < cfg.n_layers and 0 <= n < cfg.d_mlp):
            raise ValueError(
                f"neurons: ({layer}, {n}) is outside the model's {cfg.n_layers} layers x {cfg.d_mlp} neurons"
            )
        out.setdefault(layer, set()).add(n)
    if not out:
        raise ValueError("neurons: empty selection")
    return {k: sorted(v) for k, v in sorted(out.items())}


def _row_local(gran: str) -> bool:
    """Whether each variant of `gran` patches one position of a row-local site."""
    key, axes = GRANULARITIES[gran]
    return key in _ROW_LOCAL and "pos" in axes


def _unchanged(gran: str, base: np.ndarray, src: np.ndarray, grids: np.ndarray) -> np.ndarray:
    """``[C, batch]``: the patch would write exactly the value already there (a no-op)."""
    key, axes = GRANULARITIES[gran]
    diff = np.asarray(base != src)
    diff = np.broadcast_to(diff, np.broadcast_shapes(diff.shape, base.shape))
    names = site_axes(key)[1:]  # after batch
    keep = [a for a in names if a in axes]
    red = tuple(1 + i for i, a in enumerate(names) if a not in axes)
    diff = diff.any(axis=red) if red else diff  # [batch, *keep]
    order = [keep.index(a) for a in axes[1:]]
    diff = np.transpose(diff, (0, *(1 + o for o in order)))
    return ~diff[(slice(None), *grids.T)].T


def _bucket_starts(positions: np.ndarray, n_buckets: int) -> np.ndarray:
    """Up to `n_buckets` static suffix starts covering the sorted unique `positions`."""
    ps = np.unique(positions)
    if n_buckets <= 0 or len(ps) == 0:
        return np.zeros(1, np.int64)
    if len(ps) <= n_buckets:
        return ps
    return np.unique(ps[(np.arange(n_buckets) * len(ps)) // n_buckets])


def patch(
    model,
    task: Task,
    granularities: Sequence[str] | str | None = None,
    direction: str | None = None,
    metric=None,
    source: str = "default",
    neurons=None,
    batch_size: int = 32,
    per_prompt: bool = False,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    corrupt_interventions: Interventions | None = None,
    suffix_buckets: int = 4,
    layers: Sequence[int] | None = None,
) -> PatchResults:
    """Exact activation patching of every component of each granularity.

    **Arguments:**

    - `granularities`: names from :data:`attrpatch.results.GRANULARITIES` (default:
      :data:`attrpatch.results.DEFAULT_GRANULARITIES`, less MLP sites on attention-only models).
    - `direction`: ``"denoise"`` (clean activations into the corrupted run) or ``"noise"``
      (corrupted into clean). Default: denoise; ablations are always noise (on the clean run).
    - `metric`: a name from :data:`attrpatch.task.METRICS`, a function
      ``(answer_logits [batch, d_vocab], task, reference) -> [batch]``, or None (task's default).
    - `source`: ``"default"`` (the other run), or an ablation of the clean run: ``"zero"``,
      ``"mean"`` (over the batch's real tokens, per position) or ``"resample"`` (another prompt's activation,
      a `seed`-ed derangement of the batch). For ablations `source_metric` is the corrupted run's.
    - `neurons`: for ``post``/``post_by_pos``: (layer, neuron) pairs, or a `PatchResults` with
      ``post`` scores (its top 64 by |score|, see :func:`top_neurons`). Other neurons are NaN.
    - `batch_size`: variants run at once (memory ~ batch_size x one forward).
    - `per_prompt`: also return ``[prompt, *axes]`` effects.
    - `progress`: progress bar with ETA on stderr (for sweeps longer than 2 s).
    - `checkpoint_dir`: save each finished (granularity, layer) atomically; resume from them.
    - `corrupt_interventions`: the corrupted run is the clean tokens with these interventions
      (see :func:`gaussian_noise_corruption`) instead of `task.corrupt_tokens`.
    - `layers`: patch only these layers (others NaN); default all.
    - `suffix_buckets`: number of static suffix starts (compiles) per granularity; 0 recomputes
      every position (no suffix trick).

    Ctrl-C returns what has been computed (NaN elsewhere) with a warning.

    **Returns:** :class:`attrpatch.results.PatchResults` with ``method="exact"``.
    """
    t_start = time.perf_counter()
    cfg = model.config
    task.check_for(model)
    grans = check_granularities(granularities, cfg.attn_only)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    ablation = source in ABLATIONS
    if direction is None:
        direction = "noise" if ablation else "denoise"
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose from {', '.join(DIRECTIONS)}")
    if ablation and direction != "noise":
        raise ValueError(f"source={source!r} ablates the clean run: use direction='noise'")
    if ablation and corrupt_interventions is not None:
        raise ValueError("corrupt_interventions only apply to source='default'")
    if corrupt_interventions is not None:
        later = set(corrupt_interventions.delta) | set(corrupt_interventions.patch)
        later -= {"hook_embed", "hook_pos_embed"}
        if later:
            raise ValueError(
                f"corrupt_interventions at {sorted(later)}: only hook_embed / hook_pos_embed are "
                "supported (patches restart from cached layer inputs and rerun later layers "
                "without the corrupting interventions)"
            )
    if source == "resample" and task.batch < 2:
        raise ValueError("source='resample' needs at least 2 prompts")
    if not (isinstance(batch_size, int | np.integer) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    needs_neurons = [g for g in grans if "neuron" in GRANULARITIES[g][1]]
    if needs_neurons and neurons is None:
        raise ValueError(f"{', '.join(needs_neurons)}: pass neurons= ((layer, neuron) pairs or AtP results)")
    layer_neurons = _check_neurons(neurons, cfg) if needs_neurons else {}
    layer_list = list(range(cfg.n_layers)) if layers is None else sorted({int(i) for i in layers})
    if any(not 0 <= i < cfg.n_layers for i in layer_list):
        raise ValueError(f"layers {layer_list} outside the model's 0..{cfg.n_layers - 1}")
    layer_neurons = {i: v for i, v in layer_neurons.items() if i in layer_list}
    metric_name, metric_fn = resolve_metric(metric, task)

    # Unpatched runs: clean, corrupted, and the caches the engine needs.
    keys = sorted({GRANULARITIES[g][0] for g in grans})
    base_keys = tuple(sorted({"hook_resid_pre", "attn.hook_k", "attn.hook_v", *keys}))
    am, ans = task.attention_mask, task.answer_positions
    clean_logits, clean_cache = model.run(task.clean_tokens, am, NO_INTERVENTIONS, base_keys, ans)
    if corrupt_interventions is not None:
        corrupt_logits, corrupt_cache = model.run(
            task.clean_tokens, am, corrupt_interventions, base_keys, ans)
        first_diff = np.zeros(task.batch, np.int64)
    else:
        corrupt_logits, corrupt_cache = model.run(task.corrupt_tokens, am, NO_INTERVENTIONS, base_keys, ans)
        first_diff = task.first_diff_positions
    reference = MetricReference(clean_logits, corrupt_logits)
    check_reference(metric_name, task, reference)
    clean_pp = np.asarray(metric_fn(clean_logits, task, reference))
    corrupt_pp = np.asarray(metric_fn(corrupt_logits, task, reference))
    if direction == "denoise":
        base_cache, src_cache, base_pp, source_pp = corrupt_cache, clean_cache, corrupt_pp, clean_pp
    else:
        base_cache, src_cache, base_pp, source_pp = clean_cache, corrupt_cache, clean_pp, corrupt_pp
    if ablation:
        first_diff = np.zeros(task.batch, np.int64)
        src_cache = _ablation_sources(clean_cache, keys, source, seed, am)

    ans_np = np.asarray(ans)
    cols = None
    if metric_fn in (METRICS["logit_diff"], METRICS["normalized_logit_diff"]):
        cols = jnp.concatenate([jnp.asarray(task.correct_tokens).reshape(task.batch, -1),
                                jnp.asarray(task.incorrect_tokens).reshape(task.batch, -1)], axis=1)
    n_pos, L = task.n_pos, cfg.n_layers
    keep_full = gpt2.attention_bias(am, n_pos, task.batch)
    out = {g: np.full((task.batch, *grid_shape(g, L, n_pos, cfg.n_heads, cfg.d_mlp)), np.nan)
           for g in grans}

    # Plan: per (granularity, layer) the components, which are inert, and their suffix starts.
    plan = []
    total = 0.0
    most: dict[tuple[str, int], int] = {}
    for g in grans:
        g_layers = sorted(layer_neurons) if g in needs_neurons else layer_list
        if not g_layers:
            continue
        comps = {i: _components(g, n_pos, cfg.n_heads, layer_neurons.get(i, ())) for i in g_layers}
        cpos_all = np.concatenate([c[2] for c in comps.values()])
        cpos_all = cpos_all[cpos_all >= 0]
        starts = _bucket_starts(cpos_all[cpos_all >= first_diff.min()], suffix_buckets)
        s_all = int(min(first_diff.min(), n_pos - 1)) if suffix_buckets > 0 else 0
        key = GRANULARITIES[g][0]
        base_np, src_np = np.asarray(base_cache[key]), np.asarray(src_cache[key])
        for layer in g_layers:
            grids, idx, cpos = comps[layer]
            inert = np.where(
                (cpos >= 0)[:, None],
                (cpos[:, None] < first_diff[None]) | (cpos[:, None] > ans_np[None]),
                (first_diff > ans_np)[None],
            )  # [C, batch]
            # a patch writing the value already there changes nothing
            inert |= _unchanged(g, base_np[layer], src_np[layer], grids)
            if _row_local(g) and layer == L - 1:  # only the answer row reaches the logits
                inert |= cpos[:, None] != ans_np[None]
            active = ~inert.all(1)
            bucket = np.searchsorted(starts, cpos, side="right") - 1  # largest start <= cpos
            start = np.where(cpos < 0, s_all, np.where(bucket >= 0, starts[np.maximum(bucket, 0)], 0))
            plan.append((g, layer, grids, idx, inert, active, start))
            total += float(active.sum() * (L - layer))
        # One chunk size per (granularity, start) for all layers: one compile each, equal chunks.
        for g_, _, _, _, _, active, start in plan:
            if g_ != g:
                continue
            for s_ in np.unique(start[active]):
                most[g, int(s_)] = max(most.get((g, int(s_)), 0), int((active & (start == s_)).sum()))
    chunk = {k: -(-n // -(-n // batch_size)) for k, n in most.items()}

    fp = None
    if checkpoint_dir is not None:
        os.makedirs(checkpoint_dir, exist_ok=True)
        fp = _fingerprint(model, task, direction, source, metric_name, seed,
                          repr(layer_neurons), corrupt_interventions)
        meta_path = os.path.join(checkpoint_dir, "meta.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                if json.load(f).get("fingerprint") != fp:
                    raise ValueError(
                        f"checkpoint_dir {os.fspath(checkpoint_dir)!r} holds results of a different "
                        "model, task or options; use an empty folder"
                    )
        else:
            atomic_write(meta_path, lambda f: f.write(json.dumps({"fingerprint": fp}).encode()))

    bar = _Progress(total, progress)
    interrupted = False
    try:
        for g, layer, grids, idx, inert, active, start in plan:
            ckpt = None if fp is None else os.path.join(checkpoint_dir, f"{g}.layer{layer}.npy")
            if ckpt is not None and os.path.exists(ckpt):
                _fill(out[g], layer, grids, np.load(ckpt))
                bar.update(float(active.sum() * (L - layer)), f"{g} L{layer} (resumed)")
                continue
            layer_pp = np.zeros((len(grids), task.batch))
            for s in np.unique(start[active]):
                sel = np.flatnonzero(active & (start == s))
                metric_vals = _run_bucket(model, task, reference, metric_fn, g, layer, int(s), idx[sel],
                                          base_cache, src_cache, keep_full, ans,
                                          chunk[g, int(s)], cols)
                layer_pp[sel] = metric_vals - base_pp[None]
                bar.update(float(len(sel) * (L - layer)), f"{g} L{layer}")
            layer_pp[inert] = 0.0
            _fill(out[g], layer, grids, layer_pp)
            if ckpt is not None:
                atomic_write(ckpt, lambda f, a=layer_pp: np.save(f, a))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    if interrupted:
        warnings.warn("patch: interrupted; returning partial results (NaN where not computed)",
                      stacklevel=2)

    scores = {g: Scores(g, out[g].mean(0), out[g] if per_prompt else None) for g in grans}
    return PatchResults(
        method="exact", direction=direction, metric=metric_name,
        base_metric=float(base_pp.mean()), source_metric=float(source_pp.mean()), scores=scores,
        base_metric_per_prompt=base_pp, source_metric_per_prompt=source_pp,
        seconds=time.perf_counter() - t_start, source=source, complete=not interrupted,
    )


def _fill(grid: np.ndarray, layer: int, grids: np.ndarray, layer_pp: np.ndarray) -> None:
    """Write per-prompt effects ``[C, batch]`` of one layer into ``grid [batch, layer, ...]``."""
    grid[(slice(None), layer, *grids.T)] = layer_pp.T


def _batch_mean(x, key: str, attention_mask) -> jax.Array:
    """Mean of ``x [n_layers, batch, ...]`` over prompts, at each position over the prompts where
    it is a real token (0 where none is): ``[n_layers, 1, ...]``."""
    if attention_mask is None:
        return x.mean(1, keepdims=True)
    axes = site_axes(key)  # ("batch", "pos", ...) or ("batch", "head", "query_pos", "key_pos")
    pos_axis = 1 + axes.index("pos" if "pos" in axes else "query_pos")
    shape = [1] * x.ndim
    shape[1], shape[pos_axis] = attention_mask.shape
    w = attention_mask.reshape(shape).astype(x.dtype)
    return (x * w).sum(1, keepdims=True) / jnp.maximum(w.sum(1, keepdims=True), 1)


def _ablation_sources(clean_cache: dict, keys, source: str, seed: int, attention_mask) -> dict:
    """Ablation source activations ``[n_layers, batch or 1, ...]`` per site key."""
    out = {}
    b = clean_cache["hook_resid_pre"].shape[1]
    perm = resample_permutation(b, seed) if source == "resample" else None
    for k in keys:
        x = clean_cache[k]
        if source == "zero":
            out[k] = jnp.zeros_like(x[:, :1])
        elif source == "mean":
            out[k] = _batch_mean(x, k, attention_mask)
        else:
            out[k] = x[:, perm]
    return out


def _run_bucket(model, task, reference, metric_fn, gran, layer, start, idx, base_cache, src_cache,
                keep_full, answers, chunk, cols=None) -> np.ndarray:
    """Metric ``[len(idx), batch]`` for the variants `idx` of `gran` at `layer`, from `start`,
    run in calls of exactly `chunk` variants (the last one padded), dispatched before any is read."""
    key = GRANULARITIES[gran][0]
    n = len(idx)
    pad = (-n) % chunk
    idx = np.concatenate([idx, np.repeat(idx[:1], pad, 0)]) if pad else idx
    prefix_kv = None
    if start > 0:
        prefix_kv = (base_cache["attn.hook_k"][:, :, :start], base_cache["attn.hook_v"][:, :, :start])
    row_local = _row_local(gran)
    extra = {}
    if row_local:
        nxt = min(layer + 1, model.config.n_layers - 1)  # unused for the last layer
        extra = dict(resid_next=base_cache["hook_resid_pre"][nxt][:, start:],
                     layer_kv=(base_cache["attn.hook_k"][layer], base_cache["attn.hook_v"][layer]),
                     keep_rows=keep_full[:, 0])
    args = (model.params, jnp.int32(layer), base_cache["hook_resid_pre"][layer][:, start:],
            _suffix(src_cache[key][layer], key, start), prefix_kv, keep_full[:, :, start:],
            jnp.maximum(answers - start, 0))
    pending = [
        _sweep(*args, jnp.asarray(idx[i:i + chunk]), task, reference, cols=cols, cfg=model.config,
               gran=gran, start=start, batch_size=chunk, metric_fn=metric_fn, row_local=row_local,
               **extra)
        for i in range(0, len(idx), chunk)
    ]
    return np.concatenate([np.asarray(v) for v in pending])[:n]
