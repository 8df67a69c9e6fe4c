"""Patching granularities and the result container shared by attribution and exact patching.

A *granularity* names what one component is (TransformerLens's patching grids). An AtP score and
an exact effect for the same granularity have the same shape and line up one to one.

| granularity | site | axes | one component is |
| --- | --- | --- | --- |
| ``resid_pre/mid/post``, ``attn_out``, ``mlp_out`` | ``hook_<name>`` | ``layer pos`` | one position |
| ``z``, ``q``, ``k``, ``v`` | ``attn.hook_<name>`` | ``layer head`` | one head at every position (*) |
| ``z_by_pos``, ``q_by_pos``, ... | ``attn.hook_<name>`` | ``layer pos head`` | one head at one position |
| ``pattern`` | ``attn.hook_pattern`` | ``layer head`` | one head's whole pattern |
| ``pattern_by_query`` | ``attn.hook_pattern`` | ``layer head query_pos`` | one row of a pattern |
| ``pattern_by_entry`` | ``attn.hook_pattern`` | ``layer head query_pos key_pos`` | one entry of a pattern |
| ``post`` | ``mlp.hook_post`` | ``layer neuron`` | one neuron at every position |
| ``post_by_pos`` | ``mlp.hook_post`` | ``layer pos neuron`` | one neuron at one position |

(*) For ``k`` and ``v`` grids the ``head`` axis counts key/value heads (grouped-query models).

Effects are in metric units: metric(base run with the patch) - metric(base run), where the base
run is the corrupted one for ``denoise`` (clean activations patched in) and the clean one for
``noise``. Components a method did not compute are NaN.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attrpatch.sites import block_keys, site_axes

# granularity -> (site key, axes)
GRANULARITIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "resid_pre": ("hook_resid_pre", ("layer", "pos")),
    "resid_mid": ("hook_resid_mid", ("layer", "pos")),
    "resid_post": ("hook_resid_post", ("layer", "pos")),
    "attn_out": ("hook_attn_out", ("layer", "pos")),
    "mlp_out": ("hook_mlp_out", ("layer", "pos")),
    "z": ("attn.hook_z", ("layer", "head")),
    "q": ("attn.hook_q", ("layer", "head")),
    "k": ("attn.hook_k", ("layer", "head")),
    "v": ("attn.hook_v", ("layer", "head")),
    "z_by_pos": ("attn.hook_z", ("layer", "pos", "head")),
    "q_by_pos": ("attn.hook_q", ("layer", "pos", "head")),
    "k_by_pos": ("attn.hook_k", ("layer", "pos", "head")),
    "v_by_pos": ("attn.hook_v", ("layer", "pos", "head")),
    "pattern": ("attn.hook_pattern", ("layer", "head")),
    "pattern_by_query": ("attn.hook_pattern", ("layer", "head", "query_pos")),
    "pattern_by_entry": ("attn.hook_pattern", ("layer", "head", "query_pos", "key_pos")),
    "post": ("mlp.hook_post", ("layer", "neuron")),
    "post_by_pos": ("mlp.hook_post", ("layer", "pos", "neuron")),
}
DIRECTIONS = ("denoise", "noise")

# Estimators of patch effects (`attrpatch.attribute(method=...)`); "exact" is `attrpatch.patch`.
ESTIMATORS = ("atp", "atp_star", "relp", "ig", "ig_inputs")
# Granularities whose components act only through their head's attention pattern (AtP*'s QK fix).
QK_GRANULARITIES = ("q", "k", "q_by_pos", "k_by_pos")

# Site families, for validation and reports.
FAMILIES: dict[str, tuple[str, ...]] = {
    "residual stream": ("resid_pre", "resid_mid", "resid_post"),
    "attention outputs": ("attn_out",),
    "MLP outputs": ("mlp_out",),
    "heads": ("z", "z_by_pos"),
    "q/k/v": ("q", "k", "v", "q_by_pos", "k_by_pos", "v_by_pos"),
    "patterns": ("pattern", "pattern_by_query", "pattern_by_entry"),
    "neurons": ("post", "post_by_pos"),
}


# What `attribute` and `patch` compute when no granularities are named: the node grids a first
# scan wants, none of them huge (no per-entry patterns, no neurons).
DEFAULT_GRANULARITIES = ("resid_pre", "attn_out", "mlp_out", "z")


def available_granularities(cfg, names=None) -> tuple[str, ...]:
    """`names` (default: every granularity) less those whose site a model with config `cfg`
    lacks (MLP grids of attention-only models, ``resid_mid`` of parallel blocks)."""
    names = GRANULARITIES if names is None else names
    return tuple(g for g in names if GRANULARITIES[g][0] in block_keys(cfg))


def check_granularities(names, cfg) -> tuple[str, ...]:
    """Validate granularity names for a model with config `cfg` (None: the defaults it has);
    clear error naming the bad one. Returns the names as a tuple, duplicates dropped, order kept."""
    if names is None:
        names = available_granularities(cfg, DEFAULT_GRANULARITIES)
    names = (names,) if isinstance(names, str) else tuple(dict.fromkeys(names))
    if not names:
        raise ValueError("the granularity list is empty; name at least one of " + ", ".join(GRANULARITIES))
    for name in names:
        if name not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {name!r}; choose from {', '.join(GRANULARITIES)}"
            )
        if name not in available_granularities(cfg, (name,)):
            why = ("this model is attention-only" if cfg.attn_only
                   else "its attention and MLP run in parallel, so there is no resid_mid")
            raise ValueError(f"granularity {name!r} needs site {GRANULARITIES[name][0]!r}, which "
                             f"this {cfg.architecture} model lacks: {why}")
    return names


def reduce_to_grid(x, key: str, granularity: str):
    """Sum a per-prompt site array ``[layer, batch, *site dims]`` (numpy or jax) to the
    granularity's per-prompt grid ``[batch, layer, *other axes]``."""
    dims = site_axes(key)[1:]
    keep = GRANULARITIES[granularity][1][1:]  # the granularity's axes after "layer"
    if tuple(d for d in dims if d in keep) != keep:
        raise ValueError(f"granularity {granularity!r} is not a grid of site {key!r}")
    summed = tuple(2 + i for i, d in enumerate(dims) if d not in keep)
    return x.sum(summed).swapaxes(0, 1)


def grid_shape(name: str, cfg, n_pos: int) -> tuple[int, ...]:
    """Shape of granularity `name`'s grid for a model config and prompt length (the ``head``
    axis of ``k``/``v`` grids counts kv heads)."""
    key = GRANULARITIES[name][0]
    sizes = {"layer": cfg.n_layers, "pos": n_pos, "query_pos": n_pos, "key_pos": n_pos,
             "head": cfg.heads_of(key), "neuron": cfg.d_mlp}
    return tuple(sizes[a] for a in GRANULARITIES[name][1])


@dataclasses.dataclass
class Scores:
    """One method's numbers for one granularity.

    - `values`: batch-mean effect per component, shape = the granularity's axes.
    - `per_prompt`: ``[prompt, *axes]`` or None.
    """

    granularity: str
    values: np.ndarray
    per_prompt: np.ndarray | None = None

    @property
    def axes(self) -> tuple[str, ...]:
        return GRANULARITIES[self.granularity][1]


@dataclasses.dataclass
class PatchResults:
    """Everything one method (an estimator of :data:`ESTIMATORS`, or ``"exact"``) measured on
    one task.

    `base_metric` is the unpatched base run's batch metric (corrupted for denoise, clean for noise)
    and `source_metric` the run the patched activations come from (for ablations, which have
    no such run, the corrupted run's); `gap = source - base` is what a patch that moved the base
    run all the way would change. `source` is ``"default"`` (the other run's activations) or
    the ablation (``"zero"``, ``"mean"``, ``"resample"``); `complete` is False when a sweep was
    interrupted (NaN where not computed).

    `graddrop` (``atp_star`` only): granularity -> unsigned GradDrop magnitude estimate per
    component (AtP* section 3.1.2), the cancellation-proof ranking signal beside the signed
    `scores`. `cost_forwards`: the estimator's cost in forward-pass equivalents (a backward
    counts as two forwards).
    """

    method: str
    direction: str
    metric: str
    base_metric: float
    source_metric: float
    scores: dict[str, Scores]
    base_metric_per_prompt: np.ndarray | None = None
    source_metric_per_prompt: np.ndarray | None = None
    seconds: float | None = None
    source: str = "default"
    complete: bool = True
    graddrop: dict[str, np.ndarray] | None = None
    cost_forwards: float | None = None

    @property
    def gap(self) -> float:
        return self.source_metric - self.base_metric

    def normalized(self, granularity: str) -> np.ndarray:
        """`values / gap`: 1 means the patch alone moves the metric all the way to the source."""
        return self.scores[granularity].values / self.gap

    def __getitem__(self, granularity: str) -> np.ndarray:
        return self.scores[granularity].values

    def ranking(self, granularity: str) -> np.ndarray:
        """How much each component may matter, ``[*axes]`` (>= 0): |estimate|, or for AtP*
        the larger of |estimate| and GradDrop's magnitude (what verification orders by)."""
        score = np.abs(np.nan_to_num(np.asarray(self[granularity], float)))
        if self.graddrop is not None and granularity in self.graddrop:
            score = np.maximum(score, np.asarray(self.graddrop[granularity], float))
        return score
