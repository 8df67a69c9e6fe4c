"""Exact activation patching: really replace one component's activation and rerun, for every component.

Effect of a component = metric(base run with the patch) - metric(unpatched base run), in metric
units, per prompt and batch mean (:mod:`attrpatch.results` defines granularities, axes, base and
source). The engine gives the same numbers as a naive "one full forward per patch" loop, faster:

- a patch in layer ``l`` starts from the base run's cached input of layer ``l``;
- causality: a patched run of prompt ``b`` recomputes only its positions ``start..answer``, where
  ``start`` is the patch position (or, for a patch at every position, the prompt's first
  clean/corrupt difference); earlier positions keep the base run's keys and values, later ones
  never reach the answer. Provably inert patches (before the first difference, after the answer,
  or writing the value already there) are written as exact zeros and not run;
- *row packing*: the recomputed rows of many patched runs (variants x prompts, each its own
  length) are packed into one ``[rows, d_model]`` matrix, so every weight matrix is read once per
  layer for all of them and no row is padding (but for rounding the row count up to one of a few
  sizes, one compile each). Only attention mixing sees positions: it runs on a
  ``[variant x prompt, pos]`` layout whose unpacked rows hold the base run's keys and values;
- a patch of one position of a site after attention mixing (z, q, attn_out, mlp, resid_mid/post:
  "row-local") changes only that row in its layer, which runs at that one row;
- the layers after the patched one run in a loop with a traced start, so one compile serves every
  layer, and one call runs the chunks of several layers in turn, reusing one set of buffers (on
  a CPU, fresh buffers for every call cost up to a fifth of the time in page faults); the
  last block (unless patched) runs attention inputs at every packed row but the rest
  only at the answer rows, and for the logit-difference metrics only the logit columns they read
  are computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attrpatch.arch import transformer as T
from attrpatch.atomic import atomic_write
from attrpatch.identity import UnidentifiableMetric, metric_identity
from attrpatch.interrupts import raise_if_interrupted
from attrpatch.interventions import NO_INTERVENTIONS, Interventions, Patch
from attrpatch.progress import progress_bar
from attrpatch.results import (
    DIRECTIONS,
    GRANULARITIES,
    PatchResults,
    Scores,
    check_granularities,
    grid_shape,
)
from attrpatch.sharding import (
    check_mesh,
    out_of_memory_advice,
    replicate,
    shard_leading,
    shard_model,
    to_host,
)
from attrpatch.sites import attention_qk_keys, site_axes
from attrpatch.task import (
    METRICS,
    MetricReference,
    Task,
    check_finite_metrics,
    check_reference,
    resolve_metric,
)

SOURCES = ("default", "zero", "mean", "resample")
ABLATIONS = ("zero", "mean", "resample")
_HEAD_SITES = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")
_PATTERN = "attn.hook_pattern"
# Sites at or after the attention output: a patch there leaves its layer's attention output z as
# in the base run, so the patched layer takes the cached z (its queries, keys and values are
# then dead code, which XLA drops).
_AFTER_ATTENTION = ("attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre",
                    "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")
# Sites that change only their own row: patching one position of one of these in layer l
# leaves every other position of layer l as in the base run.
_ROW_LOCAL = ("attn.hook_q", *_AFTER_ATTENTION)
# Packed row and variant counts are rounded up to one of these, so that few shapes compile: at
# most 25% more below 512, at most 1/16 more from 512 on (where padding rows cost real matmul time).
_SIZES = np.unique([int(2**k * (1 + i / steps)) for k in range(40)
                    for steps in [4 if k < 9 else 16] for i in range(steps)])

__all__ = ["ABLATIONS", "SOURCES", "gaussian_noise_corruption", "patch", "resample_permutation",
           "top_neurons"]


# ----------------------------------------------------------------------------------------------
# Components: which variants a granularity has in one layer


def _components(gran: str, n_pos: int, cfg, neurons: Sequence[int]):
    """Components of one layer: grid index ``[C, k]``, variant index ``[C, 4]``
    (pos, head, neuron, key_pos) and causal position ``[C]`` (-1: all positions)."""
    axes = GRANULARITIES[gran][1][1:]
    sizes = {"pos": range(n_pos), "query_pos": range(n_pos), "key_pos": range(n_pos),
             "head": range(cfg.heads_of(GRANULARITIES[gran][0])), "neuron": neurons}
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


def _row_mask(gran: str, ix, pos, cfg) -> jax.Array:
    """Patch mask of variant `ix` (pos, head, neuron, key_pos) at position `pos`, broadcastable to
    the site's activation at one position (``[head, d_head]``, ``[d_model]`` or ``[d_mlp]``)."""
    key, axes = GRANULARITIES[gran]
    hit = (pos == ix[0]) if "pos" in axes else jnp.bool_(True)
    if key in _HEAD_SITES:
        return hit & (jnp.arange(cfg.heads_of(key)) == ix[1])[:, None]
    if "neuron" in axes:
        return hit & (jnp.arange(cfg.d_mlp) == ix[2])
    return hit[None]


def _pattern_mask(gran: str, ix, n_pos: int, cfg) -> jax.Array:
    """Patch mask ``[head, query_pos, key_pos]`` of pattern variant `ix`."""
    axes = GRANULARITIES[gran][1]
    m = (jnp.arange(cfg.n_heads) == ix[1])[:, None, None]
    if "query_pos" in axes:
        m = m & (jnp.arange(n_pos) == ix[0])[None, :, None]
    if "key_pos" in axes:
        m = m & (jnp.arange(n_pos) == ix[3])[None, None, :]
    return jnp.broadcast_to(m, (cfg.n_heads, n_pos, n_pos))


# ----------------------------------------------------------------------------------------------
# Packed rows
#
# A chunk holds `V` variant slots of one (granularity, layer); run ``v * B + b`` is slot v patched
# into prompt b (B prompts). Its recomputed positions are packed rows; a row's *flat* index is
# ``run * n_pos + pos``, and ``V * B * n_pos`` marks padding (a dummy row that is never read).


def _padded(n: int) -> int:
    """The smallest of the few allowed sizes that is >= n."""
    return int(_SIZES[np.searchsorted(_SIZES, n)])


class _PackedRows(NamedTuple):
    """One compiled call's variant slots and packed rows (planned on the host)."""

    idx: np.ndarray  # [V, 4] variant index per slot (padding slots: zeros, no rows)
    flat: np.ndarray  # [R] flat index of each packed row
    first_row: np.ndarray  # [V * B] packed row of each run's first position (R: the run has none)
    answer_row: np.ndarray  # [V * B] packed row of each run's answer position (R: none)
    layout_row: np.ndarray  # [V * B * n_pos] packed row at each flat index (R: none)


def _chunks(idx: np.ndarray, cpos: np.ndarray, inert: np.ndarray, first_diff: np.ndarray,
            answers: np.ndarray, n_pos: int, max_variants: int, n_devices: int = 1
            ) -> list[tuple[np.ndarray, _PackedRows]]:
    """Split one layer's non-inert variants into chunks of at most `max_variants`, balanced in
    rows (so every chunk of the layer has the same padded shape): (which components, rows) each.
    With `n_devices` > 1 the chunk count is a multiple of it where there are enough variants.

    `idx` ``[C, 4]``, `cpos` ``[C]``, `inert` ``[C, batch]``; `first_diff`, `answers` ``[batch]``.
    """
    B = len(answers)
    starts = np.where(cpos[:, None] >= 0, cpos[:, None], first_diff[None])  # [C, B]
    n_rows = np.where(inert, 0, answers[None] - starts + 1)  # [C, B]
    active = np.flatnonzero(n_rows.sum(1) > 0)
    if len(active) == 0:
        return []
    n_chunks = -(-len(active) // max_variants)
    n_chunks = min(-(-n_chunks // n_devices) * n_devices, len(active))
    order = active[np.argsort(-n_rows[active].sum(1), kind="stable")]
    groups: list[list[int]] = [[] for _ in range(n_chunks)]
    for i, c in enumerate(order):  # snake order: each chunk gets long and short runs alike
        lap, k = divmod(i, n_chunks)
        groups[k if lap % 2 == 0 else n_chunks - 1 - k].append(int(c))
    V = min(_padded(max(len(g) for g in groups)), max_variants)
    R = _padded(max(int(n_rows[g].sum()) for g in groups))
    out = []
    for g in groups:
        g = np.sort(np.asarray(g))
        slot, prompt = np.nonzero(n_rows[g] > 0)  # runs with rows, in slot-major order
        lens = n_rows[g][slot, prompt]
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
        within = np.arange(lens.sum()) - np.repeat(offsets, lens)
        run = slot * B + prompt
        flat = np.full(R, V * B * n_pos, np.int32)
        flat[: lens.sum()] = np.repeat(run * n_pos + starts[g][slot, prompt], lens) + within
        first_row = np.full(V * B, R, np.int32)
        answer_row = np.full(V * B, R, np.int32)
        first_row[run], answer_row[run] = offsets, offsets + lens - 1
        layout_row = np.full(V * B * n_pos, R, np.int32)
        layout_row[flat[: lens.sum()]] = np.arange(lens.sum())
        slot_idx = np.zeros((V, 4), np.int32)
        slot_idx[: len(g)] = idx[g]
        out.append((g, _PackedRows(slot_idx, flat, first_row, answer_row, layout_row)))
    return out


def _chunk_metrics(params, layer, base, source, keep, chunk, task, reference, cols=None, *,
                   cfg, gran, metric_fn, row_local):
    """Metric ``[V, batch]``: each slot's variant patched into `layer`, for every prompt (traced
    inside :func:`_chunks_metrics`).

    - `base`: the base run's sites from :func:`_engine_keys` (layer inputs, the keys and values
      mixing reads, z; ``[n_layers, batch, pos, ...]``).
    - `source`: the site's source activation in `layer` (``[batch or 1, ...]``).
    - `keep`: attention keep-mask ``[batch, 1, pos, pos]``; `chunk`: :class:`_PackedRows`.
    - `row_local`: each variant patches one position of a site after attention mixing: the
      patched layer runs at that row only, and the next layer's input is the base run's with that
      row replaced.
    - `cols`: ``[batch, k]`` the only logit columns the metric reads (None: all); `task` and
      `reference` then index those columns (:func:`_answer_columns`).
    """
    blocks = params["blocks"]
    consts = T.layer_constants(cfg)
    resid_key, k_key, v_key, z_key = _engine_keys(cfg)
    key = GRANULARITIES[gran][0]
    idx, flat = chunk.idx, chunk.flat
    V, B, n = idx.shape[0], keep.shape[0], keep.shape[-1]
    R, runs, last = flat.shape[0], V * B, cfg.n_layers - 1
    dummy = runs * n
    row_run, row_pos = jnp.minimum(flat, dummy - 1) // n, flat % n  # (padding rows: any real one)
    row_prompt, row_slot = row_run % B, row_run // B
    source = jnp.broadcast_to(source, (B, *source.shape[1:]))

    def at(tree, j):
        return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, j, keepdims=False), tree)

    def with_dummy(x):  # one extra row, for padding indices to read from or write to
        return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])

    def layer_keep(j):
        """`keep` with layer `j`'s sliding window: ``[B, 1, pos, pos]``."""
        ar = jnp.arange(n)[None]
        return keep & T.keep_mask(ar, ar, consts["window"][j])

    def keep_runs(j):
        return jnp.broadcast_to(layer_keep(j)[None], (V, *keep.shape)).reshape(runs, 1, n, n)

    own = (chunk.layout_row < R)[:, None, None]
    answer_pos = with_dummy(flat)[chunk.answer_row] % n  # [runs] (runs without rows: 0)

    def runs_layout(base_j, rows):
        """Base values ``[B, pos, ...]`` -> ``[runs, pos, ...]`` with packed `rows` ``[R, ...]``
        at their positions."""
        full = jnp.broadcast_to(base_j[None], (V, *base_j.shape)).reshape(dummy, *base_j.shape[2:])
        mine = with_dummy(rows.astype(full.dtype))[chunk.layout_row]
        return jnp.where(own, mine, full).reshape(runs, n, *base_j.shape[2:])

    def attention(j, kv_rows=None):
        """`attend` for `T.block`: queries, keys and values at every packed row; or, given
        `kv_rows` (``(k, v)`` at every packed row), one query per run (its answer row)."""
        def attend(q, k, v, hook):
            base_k, base_v = at(base[k_key], j), at(base[v_key], j)
            scale = consts["scale"][j]
            if kv_rows is not None:
                k, v = kv_rows
                answer_keep = keep_runs(j)[jnp.arange(runs), :, answer_pos][:, :, None]  # [runs, 1, 1, pos]
                return T.mix(q, runs_layout(base_k, k[:, 0]), runs_layout(base_v, v[:, 0]), answer_keep,
                             scale, cfg, hook)
            z = T.mix(runs_layout(jnp.zeros_like(at(base[z_key], j)), q[:, 0]),
                      runs_layout(base_k, k[:, 0]), runs_layout(base_v, v[:, 0]),
                      keep_runs(j), scale, cfg, hook)  # [runs, pos, head, d_head]
            return with_dummy(z.reshape(dummy, *z.shape[2:]))[flat][:, None]
        return attend

    def run_block(j, x, pos, iv=NO_INTERVENTIONS, attend=None):
        """Block `j` on rows ``x [rows, d_model]`` at positions `pos` ``[rows]`` (default
        attention: every packed row)."""
        out, _ = T.block(at(blocks, j), cfg, x[:, None], pos[:, None], iv, attend or attention(j),
                         inv_freq=consts["inv_freq"][j])
        return out[:, 0]

    def rest(x):
        """Packed rows after `layer` -> answer-row outputs of the last block ``[runs, d_model]``."""
        x = lax.fori_loop(layer + 1, last, lambda j, x: run_block(j, x, row_pos), x)
        _, k, v = T.attention_inputs(at(blocks, last), cfg, x[:, None], row_pos[:, None],
                                     lambda name, a: a,  # every row's keys and values...
                                     inv_freq=consts["inv_freq"][last])
        return run_block(last, with_dummy(x)[chunk.answer_row], answer_pos,
                         attend=attention(last, (k, v)))

    def cached_z(prompt, pos):
        """`attend` giving the base run's z of `layer` at rows (`prompt`, `pos`)."""
        z = at(base[z_key], layer)[prompt, pos][:, None]
        return lambda q, k, v, hook: z

    resid = lax.dynamic_index_in_dim(base[resid_key], layer, keepdims=False)  # [B, pos, d]
    if row_local:
        run_pos = jnp.repeat(idx[:, 0], B)  # [runs]
        run_prompt = jnp.tile(jnp.arange(B), V)
        masks = jax.vmap(lambda ix: _row_mask(gran, ix, ix[0], cfg))(jnp.repeat(idx, B, 0))
        iv = Interventions(patch={key: Patch(masks[:, None], source[run_prompt, run_pos][:, None])})

        def base_attention(q, k, v, hook):
            """The patched rows (one per run, ``[runs, 1, head, d_head]`` queries) attend over the
            base run's keys and values (a query patch leaves this layer's as they were): each
            prompt is a batch row whose V query rows are its runs' patched positions."""
            qs = q[:, 0].reshape(V, B, *q.shape[2:]).swapaxes(0, 1)  # [B, V, head, d_head]
            rows = (jnp.arange(B)[:, None], 0, idx[None, :, 0])
            row_keep = layer_keep(layer)[rows][:, None]  # [B, 1, V, pos]
            z = T.mix(qs, at(base[k_key], layer), at(base[v_key], layer), row_keep,
                      consts["scale"][layer], cfg, hook)
            return z.swapaxes(0, 1).reshape(runs, 1, *z.shape[2:])

        attend = cached_z(run_prompt, run_pos) if key in _AFTER_ATTENTION else base_attention
        patched = run_block(layer, resid[run_prompt, run_pos], run_pos, iv, attend)  # [runs, d]

        def onward(patched):
            nxt = lax.dynamic_index_in_dim(base[resid_key], jnp.minimum(layer + 1, last),
                                           keepdims=False)
            x = with_dummy(nxt[row_prompt, row_pos]).at[chunk.first_row].set(patched)[:-1]
            return rest(x)

        final = lax.cond(layer < last, onward, lambda patched: patched, patched)
    else:
        if key == _PATTERN:
            masks = jax.vmap(lambda ix: _pattern_mask(gran, ix, n, cfg))(idx)  # [V, head, q, k]
            masks = jnp.repeat(masks, B, 0)
            src = jnp.broadcast_to(source[None], (V, *source.shape)).reshape(runs, *source.shape[1:])
        else:
            masks = jax.vmap(lambda ix, p: _row_mask(gran, ix, p, cfg))(idx[row_slot], row_pos)[:, None]
            src = source[row_prompt, row_pos][:, None]
        attend = cached_z(row_prompt, row_pos) if key in _AFTER_ATTENTION else None
        x = run_block(layer, resid[row_prompt, row_pos], row_pos,
                      Interventions(patch={key: Patch(masks, src)}), attend)
        final = lax.cond(layer < last, rest, lambda x: with_dummy(x)[chunk.answer_row], x)

    def answer_metric(x):  # [B, d] -> [B]
        logits = T.unembed(params, cfg, T.final_norm(params, cfg, x), cols)
        return metric_fn(logits, task, reference)

    return jax.vmap(answer_metric)(final.reshape(V, B, -1))


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
    largest |score| over positions of "post_by_pos"; for AtP*, its ranking signal
    `PatchResults.ranking`)."""
    if "post" in results.scores:
        vals = results.ranking("post")
    elif "post_by_pos" in results.scores:
        vals = np.max(results.ranking("post_by_pos"), axis=1)
    else:
        raise ValueError("top_neurons: results have no 'post' or 'post_by_pos' scores")
    order = np.argsort(-vals, axis=None, kind="stable")[:k]
    return [tuple(int(i) for i in np.unravel_index(o, vals.shape)) for o in order]


# ----------------------------------------------------------------------------------------------
# Progress and checkpoints


def _fingerprint(model, task, direction, source, metric_fn, seed, neurons, corrupt_iv) -> str:
    """Hash of everything the effects depend on (model, prompts, metric, options)."""
    try:
        metric_id = metric_identity(metric_fn)
    except UnidentifiableMetric as e:
        raise ValueError(f"checkpoint_dir: cannot tell on resume whether saved results used this "
                         f"metric: {e}") from e
    h = hashlib.sha256()
    h.update(repr((model.config, direction, source, metric_id, seed, neurons)).encode())
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


def _check_components(components, grans, cfg, n_pos: int) -> dict[str, dict[int, set[tuple]]]:
    """`components` as granularity -> layer -> set of the rest of each index; checked."""
    out: dict[str, dict[int, set[tuple]]] = {}
    for g, indices in components.items():
        if g not in grans:
            raise ValueError(f"components for {g!r}, which is not among the granularities {list(grans)}")
        shape = grid_shape(g, cfg, n_pos)
        axes = GRANULARITIES[g][1]
        by_layer: dict[int, set[tuple]] = {}
        for index in indices:
            index = tuple(int(i) for i in np.ravel(index))
            if len(index) != len(axes) or not all(0 <= i < n for i, n in zip(index, shape, strict=False)):
                raise ValueError(f"components[{g!r}]: {index} is not an index ({', '.join(axes)}) "
                                 f"into its grid of shape {shape}")
            by_layer.setdefault(index[0], set()).add(index[1:])
        if not by_layer:
            raise ValueError(f"components[{g!r}] is empty")
        out[g] = by_layer
    return out


def _engine_keys(cfg) -> tuple[str, ...]:
    """Base-run sites the engine restarts from: each layer's input, the keys and values attention
    mixing reads (after rotary and the k norm, where a model has them) and the head outputs z."""
    return ("hook_resid_pre", attention_qk_keys(cfg)[1], "attn.hook_v", "attn.hook_z")


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
    layers: Sequence[int] | None = None,
    components: Mapping[str, Sequence[Sequence[int]]] | None = None,
    mesh=None,
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
    - `batch_size`: variants run at once (memory ~ batch_size x one forward; at most
      ``ceil(variants / batch_size)`` calls per layer).
    - `per_prompt`: also return ``[prompt, *axes]`` effects.
    - `progress`: a progress bar with ETA on stderr (a terminal only; sweeps longer than 2 s).
    - `checkpoint_dir`: save each finished (granularity, layer) atomically; resume from them.
    - `corrupt_interventions`: the corrupted run is the clean tokens with these interventions
      (see :func:`gaussian_noise_corruption`) instead of `task.corrupt_tokens`.
    - `layers`: patch only these layers (others NaN); default all.
    - `components`: granularity -> grid indices ``(layer, ...)`` (as in the result's axes): patch
      only these components of those granularities (others NaN), e.g. to verify a few AtP scores.
      Neuron granularities listed here need no `neurons`.
    - `mesh`: a ``(data, model)`` `jax.sharding.Mesh` (:func:`attrpatch.make_mesh`) or None for
      one device. Each device of ``data`` runs its share of each layer's chunks of patched runs
      (at most `batch_size` variants each); parameters are split over ``model``.

    Ctrl-C returns what has been computed (NaN elsewhere) with a warning. A device out of
    memory raises `MemoryError` saying what to lower.

    **Returns:** :class:`attrpatch.results.PatchResults` with ``method="exact"``.
    """
    t_start = time.perf_counter()
    cfg = model.config
    task.check_for(model)
    mesh = check_mesh(mesh)
    grans = check_granularities(granularities, cfg)
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
    wanted = _check_components(components or {}, grans, cfg, task.n_pos)
    needs_neurons = [g for g in grans if "neuron" in GRANULARITIES[g][1] and g not in wanted]
    if needs_neurons and neurons is None:
        raise ValueError(f"{', '.join(needs_neurons)}: pass neurons= ((layer, neuron) pairs or AtP results)")
    layer_neurons = _check_neurons(neurons, cfg) if needs_neurons else {}
    layer_list = list(range(cfg.n_layers)) if layers is None else sorted({int(i) for i in layers})
    if any(not 0 <= i < cfg.n_layers for i in layer_list):
        raise ValueError(f"layers {layer_list} outside the model's 0..{cfg.n_layers - 1}")
    layer_neurons = {i: v for i, v in layer_neurons.items() if i in layer_list}
    metric_name, metric_fn = resolve_metric(metric, task)
    model, task = shard_model(model, mesh), replicate(task, mesh)
    n_data = 1 if mesh is None else mesh.shape["data"]

    # Unpatched runs: clean, corrupted, and the caches the engine needs.
    keys = sorted({GRANULARITIES[g][0] for g in grans})
    base_keys = tuple(sorted({*_engine_keys(cfg), *keys}))
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
    clean_pp = to_host(metric_fn(clean_logits, task, reference))
    corrupt_pp = to_host(metric_fn(corrupt_logits, task, reference))
    if direction == "denoise":
        base_cache, src_cache, base_pp, source_pp = corrupt_cache, clean_cache, corrupt_pp, clean_pp
    else:
        base_cache, src_cache, base_pp, source_pp = clean_cache, corrupt_cache, clean_pp, corrupt_pp
    check_finite_metrics(base_pp, source_pp)
    if ablation:
        first_diff = np.zeros(task.batch, np.int64)
        src_cache = _ablation_sources(clean_cache, keys, source, seed, am)

    ans_np = np.asarray(ans)
    cols, metric_task, metric_reference = None, task, reference
    if metric_fn in (METRICS["logit_diff"], METRICS["normalized_logit_diff"]):
        cols, metric_task, metric_reference = _answer_columns(task, reference, mesh)
    n_pos, L = task.n_pos, cfg.n_layers
    positions = np.broadcast_to(np.arange(n_pos), (task.batch, n_pos))
    keep_full = T.keep_mask(positions, positions, n_pos + 1, None if am is None else jnp.asarray(am) > 0)
    out = {g: np.full((task.batch, *grid_shape(g, cfg, n_pos)), np.nan)
           for g in grans}

    # Plan: per (granularity, layer) the components, which are inert, and the packed chunks.
    plan = []
    total = 0.0
    for g in grans:
        g_layers = sorted(layer_neurons) if g in needs_neurons else layer_list
        if g in wanted:
            g_layers = [i for i in g_layers if i in wanted[g]]
        key = GRANULARITIES[g][0]
        base_np, src_np = to_host((base_cache[key], src_cache[key]))
        for layer in g_layers:
            if g in wanted:  # only the listed components (their neurons, for neuron grids)
                grids, idx, cpos = _components(g, n_pos, cfg,
                                               sorted({c[-1] for c in wanted[g][layer]}))
                keep = np.array([tuple(row) in wanted[g][layer] for row in grids.tolist()], bool)
                grids, idx, cpos = grids[keep], idx[keep], cpos[keep]
            else:
                grids, idx, cpos = _components(g, n_pos, cfg, layer_neurons.get(layer, ()))
            inert = np.where(
                (cpos >= 0)[:, None],
                (cpos[:, None] < first_diff[None]) | (cpos[:, None] > ans_np[None]),
                (first_diff > ans_np)[None],
            )  # [C, batch]
            # a patch writing the value already there changes nothing
            inert |= _unchanged(g, base_np[layer], src_np[layer], grids)
            if _row_local(g) and layer == L - 1:  # only the answer row reaches the logits
                inert |= cpos[:, None] != ans_np[None]
            chunks = _chunks(idx, cpos, inert, first_diff, ans_np, n_pos, batch_size, n_data)
            work = float(sum(len(v) for v, _ in chunks) * (L - layer))  # progress units
            plan.append((g, layer, grids, inert, chunks, work))
            total += work

    fp = None
    if checkpoint_dir is not None:
        fp = _fingerprint(model, task, direction, source, metric_fn, seed,
                          repr((layer_neurons, wanted)), corrupt_interventions)
        os.makedirs(checkpoint_dir, exist_ok=True)
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

    bar = progress_bar(total, progress, "exact patching", unit="row-layer")
    interrupted = False
    try:
        todo = []
        for g, layer, grids, inert, chunks, work in plan:
            ckpt = None if fp is None else os.path.join(checkpoint_dir, f"{g}.layer{layer}.npy")
            if ckpt is not None and os.path.exists(ckpt):
                _fill(out[g], layer, grids, np.load(ckpt))
                bar.set_postfix_str(f"{g} L{layer} (resumed)")
                bar.update(work)
            else:
                todo.append((g, layer, grids, inert, chunks, work, ckpt))
        groups = [(_call_key(group), group) for group in _call_groups(todo, L)]
        # every call of one granularity and chunk shape gets one stack depth: one compile
        depth: dict[tuple, int] = {}
        for key, group in groups:
            n = sum(len(entry[4]) for entry in group)
            depth[key] = max(depth.get(key, 0), -(-n // n_data))
        for key, group in groups:
            raise_if_interrupted()
            runnable = [(layer, chunks) for _, layer, _, _, chunks, _, _ in group if chunks]
            results = {}
            if runnable:
                with out_of_memory_advice(f"batch_size={batch_size} variants at once; lower it, "
                                          "or split the parameters over more devices "
                                          "(mesh=attrpatch.make_mesh(model=M))"):
                    results = dict(zip([layer for layer, _ in runnable], _run_layers(
                        model, metric_task, metric_reference, metric_fn, group[0][0], runnable,
                        depth[key], base_cache, src_cache, keep_full, cols, mesh),
                        strict=True))
            for g, layer, grids, inert, _, work, ckpt in group:
                layer_pp = np.zeros((len(grids), task.batch))
                if layer in results:
                    variants, metric_vals = results[layer]
                    layer_pp[variants] = metric_vals - base_pp[None]
                layer_pp[inert] = 0.0
                _fill(out[g], layer, grids, layer_pp)
                if ckpt is not None:
                    atomic_write(ckpt, lambda f, a=layer_pp: np.save(f, a))
                bar.set_postfix_str(f"{g} L{layer}")
                bar.update(work)
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


def _answer_columns(task: Task, reference: MetricReference, mesh):
    """For the metrics that read only the answer logits (the logit differences): those columns
    ``[batch, k]``, and the task and reference over them alone (answers renumbered ``0..k-1``,
    reference logits ``[batch, k]``), so that patched runs unembed k columns, not the vocabulary."""
    cols = jnp.concatenate([task.correct_tokens, task.incorrect_tokens], axis=1)
    local = replicate(jnp.broadcast_to(jnp.arange(cols.shape[1], dtype=jnp.int32), cols.shape), mesh)
    n_correct = task.correct_tokens.shape[1]
    col_task = eqx.tree_at(lambda t: (t.correct_tokens, t.incorrect_tokens), task,
                           (local[:, :n_correct], local[:, n_correct:]))
    col_reference = MetricReference(*(jnp.take_along_axis(x, cols, axis=1) for x in reference))
    return cols, col_task, col_reference


def _chunk_shape(chunks) -> tuple | None:
    """The padded shape of a layer's chunks (all alike; None: it has none)."""
    return (chunks[0][1].idx.shape, chunks[0][1].flat.shape) if chunks else None


def _call_groups(todo: list[tuple], n_layers: int) -> list[list[tuple]]:
    """Split the plan's entries ``(gran, layer, grids, inert, chunks, ...)`` into runs of
    consecutive entries that go in one compiled call: one granularity, one chunk shape, closed
    once they hold ``2 * n_layers`` block runs of a chunk (so progress, checkpoints and Ctrl-C
    come at least every two full-depth passes' worth of work)."""
    groups: list[list[tuple]] = []
    shape, blocks = None, 0
    for entry in todo:
        gran, layer, chunks = entry[0], entry[1], entry[4]
        this = _chunk_shape(chunks)
        if (not groups or gran != groups[-1][0][0] or blocks >= 2 * n_layers
                or None not in (shape, this) and this != shape):
            groups.append([])
            shape, blocks = None, 0
        groups[-1].append(entry)
        shape = shape or this
        blocks += len(chunks) * (n_layers - layer)
    return groups


def _call_key(group: list[tuple]) -> tuple:
    """(granularity, chunk shape) of a group from :func:`_call_groups`."""
    return group[0][0], next((s for s in map(_chunk_shape, (e[4] for e in group)) if s), None)


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


def _run_layers(model, task, reference, metric_fn, gran, work, depth, base_cache, src_cache,
                keep, cols=None, mesh=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run the chunks of several layers of `gran` (`work`: ``[(layer, chunks)]``, at least one
    chunk each, all of one padded shape) in one compiled call, which reuses one set of buffers for
    all of them (fresh buffers per call cost page faults): per layer, the components run ``[n]``
    and their metric ``[n, batch]``. The chunks are stacked `depth` deep (padding is not run).
    On a mesh they are dealt out over the ``data`` axis's devices (`depth` each; where they do
    not divide evenly, some devices repeat a chunk)."""
    items = [(layer, rows) for layer, chunks in work for _, rows in chunks]
    n_data = 1 if mesh is None else mesh.shape["data"]
    n_turns = -(-len(items) // n_data)
    items += items[-1:] * (depth * n_data - len(items))
    layers = np.array([layer for layer, _ in items], np.int32)
    stack = jax.tree.map(lambda *a: np.stack(a), *[rows for _, rows in items])
    if mesh is not None:  # [device, turn, ...]: device d runs items d, d + n_data, ... in turn
        layers, stack = jax.tree.map(
            lambda a: shard_leading(a.reshape(-1, n_data, *a.shape[1:]).swapaxes(0, 1), mesh),
            (layers, stack))
    metrics = to_host(_chunks_metrics(
        model.params, jnp.int32(n_turns), layers,
        {k: base_cache[k] for k in _engine_keys(model.config)}, src_cache[GRANULARITIES[gran][0]],
        keep, stack, task, reference, cols, cfg=model.config, gran=gran, metric_fn=metric_fn,
        row_local=_row_local(gran), per_device=mesh is not None))
    if mesh is not None:
        metrics = metrics.swapaxes(0, 1).reshape(-1, *metrics.shape[2:])
    out, i = [], 0
    for _, chunks in work:
        mine = metrics[i: i + len(chunks)]
        out.append((np.concatenate([v for v, _ in chunks]),
                    np.concatenate([m[: len(v)] for m, (v, _) in zip(mine, chunks, strict=True)])))
        i += len(chunks)
    return out


@partial(jax.jit, static_argnames=("cfg", "gran", "metric_fn", "row_local", "per_device"))
def _chunks_metrics(params, n_turns, layers, base, sources, keep, stack, task, reference,
                    cols=None, *, cfg, gran, metric_fn, row_local, per_device):
    """:func:`_chunk_metrics` of the first `n_turns` chunks of `stack` (a leading axis on every
    array) patched into their layers (`layers`, that axis), in turn: ``[chunks, V, batch]`` (the
    rest zero). `sources`: the site's source activations ``[n_layers, batch or 1, ...]``.
    `per_device`: `layers` and `stack` have a leading axis split over the mesh's ``data`` axis
    first, each device running its own chunks in turn: ``[devices, chunks, V, batch]``."""
    def one(layer, chunk):
        source = lax.dynamic_index_in_dim(sources, layer, keepdims=False)
        return _chunk_metrics(params, layer, base, source, keep, chunk, task, reference, cols,
                              cfg=cfg, gran=gran, metric_fn=metric_fn, row_local=row_local)

    def in_turn(layers, stack):
        def turn(i, out):
            chunk = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), stack)
            return out.at[i].set(one(layers[i], chunk))
        first = jax.eval_shape(one, layers[0], jax.tree.map(lambda a: a[0], stack))
        out = jnp.zeros((layers.shape[0], *first.shape), first.dtype)
        return lax.fori_loop(0, n_turns, turn, out)

    return jax.vmap(in_turn)(layers, stack) if per_device else in_turn(layers, stack)
