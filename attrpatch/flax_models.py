"""Bring your own Flax model: AtP, exact patching and validation at module-output sites.

A site is a submodule of a Flax linen model, named by its path (``module.path`` joined by
"/", e.g. ``"blocks_0/attn"``); its patchable activation is the output of its ``__call__``,
reached with :func:`flax.linen.intercept_methods`, so the model needs no changes.

Components: a site output ``[batch, *component axes, feature]`` has one component per index of
the axes between the batch axis and the last (feature) axis, each covering every feature: one
per position for ``[batch, pos, d_model]``, one per (position, head) for ``[batch, pos, head,
d_head]``, the whole site for ``[batch, d]``. A site's scores have shape ``[*component axes]``.

- :func:`flax_sites` wraps a module, its variables and the site paths in a :class:`FlaxModel`.
- :func:`attribute_flax`: AtP, ``(a_source - a_base) . dMetric/da`` summed over the features,
  from one source forward and one base forward + backward with zero deltas added at every site.
- :func:`patch_flax`: exact patching, one rerun of the base inputs per component with that
  component's output replaced by the source run's, vmapped over a site's components.
- :func:`validate_flax`: :func:`attrpatch.validation.validate` for these site-keyed results.

Both return :class:`attrpatch.PatchResults` keyed by site path (``Scores.granularity`` is the
path, so ``Scores.axes``, which looks the name up in :data:`attrpatch.GRANULARITIES`, does not
apply). Effects are batch means of metric(base run with the patch) - metric(base run), the base
run being the corrupted inputs for ``denoise`` and the clean ones for ``noise``.

The model must be deterministic under ``module.apply(variables, inputs, method=method)`` (no
rngs, nothing mutable: pass a `method` such as ``lambda m, x: m(x, train=False)``), each site
called once per forward, returning one array whose leading axis is the batch. Unlike
:func:`attrpatch.attribute`, activation differences before the first differing token are not
zeroed (positions are unknown here), so they hold whatever rounding the two runs leave.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attrpatch.results import DIRECTIONS, PatchResults, Scores
from attrpatch.validation import Thresholds, Validation, validate

# metric(model outputs) -> [batch]
FlaxMetric = Callable[[Any], jax.Array]
# site output -> edited site output (same shape and dtype)
Edit = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class FlaxModel:
    """A linen `module` with its `variables` and the submodule paths whose outputs are sites.

    `method`: what ``module.apply`` runs (None: ``__call__``; a name or a function
    ``fn(module, inputs)``).
    """

    module: nn.Module
    variables: Any
    sites: tuple[str, ...]
    method: str | Callable | None = None

    def run(self, inputs, edits: Mapping[str, Edit] | None = None) -> tuple[Any, dict[str, jax.Array]]:
        """One forward of `inputs`, `edits[site]` applied to that site's output.

        **Returns:** ``(outputs, cache)``, ``cache[site]`` the site's output after its edit,
        ``[batch, *component axes, feature]``. Raises `ValueError` for a site the forward never
        calls (listing the submodule paths it does call), one called twice, or one whose output
        is not an array with a batch and a feature axis.
        """
        edits = {} if edits is None else edits
        cache: dict[str, jax.Array] = {}
        called: list[str] = []

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name != "__call__":
                return out
            name = "/".join(context.module.path)
            called.append(name)
            if name not in self.sites:
                return out
            if name in cache:
                raise ValueError(f"site {name!r} is called more than once in one forward; only "
                                 "submodules called once can be sites")
            if not isinstance(out, jax.Array) or out.ndim < 2:
                raise ValueError(f"site {name!r} must return one array [batch, ..., feature], got "
                                 f"{jax.tree.map(jnp.shape, out)}")
            if name in edits:
                out = edits[name](out)
            cache[name] = out
            return out

        with nn.intercept_methods(interceptor):
            outputs = self.module.apply(self.variables, inputs, method=self.method)
        missing = [s for s in self.sites if s not in cache]
        if missing:
            available = ", ".join(repr(p) for p in dict.fromkeys(called) if p)
            raise ValueError(f"unknown site(s) {missing}: this forward calls no submodule of that path; "
                             f"submodules it calls: {available}")
        return outputs, cache


def flax_sites(module: nn.Module, variables, sites: Sequence[str] | str,
               method: str | Callable | None = None) -> FlaxModel:
    """Wrap a linen `module` and its `variables` (as from ``module.init``) with the submodule
    paths (e.g. ``"blocks_0/attn"``) whose outputs become sites. Paths are checked against the
    model on its first run (a bad one raises `ValueError` listing the paths there are)."""
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    if not sites:
        raise ValueError("no sites: name at least one submodule path, e.g. 'blocks_0/attn'")
    for s in sites:
        if not isinstance(s, str) or not s:
            raise ValueError(f"a site is a non-empty submodule path such as 'blocks_0/attn', got {s!r}")
    if len(set(sites)) != len(sites):
        raise ValueError(f"duplicate sites in {list(sites)}")
    return FlaxModel(module, variables, sites, method)


def _runs(direction: str, clean_inputs, corrupt_inputs):
    """(base inputs, source inputs) for a direction."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return (corrupt_inputs, clean_inputs) if direction == "denoise" else (clean_inputs, corrupt_inputs)


def _per_prompt(metric: FlaxMetric, outputs) -> jax.Array:
    m = metric(outputs)
    if jnp.ndim(m) != 1:
        raise ValueError(f"metric(outputs) must be per prompt, shape [batch]; got shape {jnp.shape(m)}")
    return m


def _results(method, direction, metric, scores, base, source, per_prompt, seconds) -> PatchResults:
    """PatchResults from per-prompt site grids ``{site: [batch, *component axes]}``."""
    scores = jax.device_get(scores)
    base, source = np.asarray(base), np.asarray(source)
    return PatchResults(
        method=method,
        direction=direction,
        metric=getattr(metric, "__name__", "custom"),
        base_metric=float(base.mean()),
        source_metric=float(source.mean()),
        scores={s: Scores(s, np.asarray(g).mean(0), np.asarray(g) if per_prompt else None)
                for s, g in scores.items()},
        base_metric_per_prompt=base,
        source_metric_per_prompt=source,
        seconds=seconds,
    )


def attribute_flax(fm: FlaxModel, clean_inputs, corrupt_inputs, metric: FlaxMetric,
                   direction: str = "denoise", per_prompt: bool = False) -> PatchResults:
    """AtP scores of every component of every site of `fm`.

    **Arguments:**

    - `fm`: a :class:`FlaxModel` (:func:`flax_sites`).
    - `clean_inputs`, `corrupt_inputs`: what the module takes (e.g. tokens ``[batch, pos]``),
      same shapes.
    - `metric`: ``metric(outputs) -> [batch]``, differentiable.
    - `direction`: ``"denoise"`` (corrupted base run, clean activations patched in) or
      ``"noise"`` (clean base run, corrupted activations patched in).
    - `per_prompt`: also keep ``[batch, *component axes]`` scores.

    **Returns:** :class:`attrpatch.PatchResults` (``method="atp"``), ``scores[site].values``
    ``[*component axes]``: the batch mean of ``sum_features (a_source - a_base) * dMetric/da``,
    the gradient of each prompt's metric taken at the base run.
    """
    base_inputs, source_inputs = _runs(direction, clean_inputs, corrupt_inputs)

    @jax.jit
    def atp(variables, base_inputs, source_inputs):
        model = dataclasses.replace(fm, variables=variables)
        source_out, source_cache = model.run(source_inputs)
        # Deltas (hence gradients) in at least float32.
        dtypes = {s: jnp.promote_types(a.dtype, jnp.float32) for s, a in source_cache.items()}
        deltas = {s: jnp.zeros(a.shape, dtypes[s]) for s, a in source_cache.items()}

        def base_metric(deltas):
            edits = {s: (lambda out, d=d: (out + d).astype(out.dtype)) for s, d in deltas.items()}
            outputs, cache = model.run(base_inputs, edits)
            m = _per_prompt(metric, outputs)
            return m.sum(), (m, cache)

        grads, (base, base_cache) = jax.grad(base_metric, has_aux=True)(deltas)
        grids = {s: ((source_cache[s].astype(dtypes[s]) - base_cache[s].astype(dtypes[s]))
                     * grads[s]).sum(-1) for s in fm.sites}
        return grids, base, _per_prompt(metric, source_out)

    start = time.perf_counter()
    grids, base, source = jax.device_get(atp(fm.variables, base_inputs, source_inputs))
    return _results("atp", direction, metric, grids, base, source, per_prompt,
                    time.perf_counter() - start)


def patch_flax(fm: FlaxModel, clean_inputs, corrupt_inputs, metric: FlaxMetric,
               direction: str = "denoise", per_prompt: bool = False,
               batch_size: int | None = None) -> PatchResults:
    """Exact activation patching of every component of every site of `fm`.

    Each component is one rerun of the base inputs with that component of its site's output
    replaced by the source run's (every feature of it); a site's reruns are vmapped, `batch_size`
    at a time (None: all of the site's components at once). Arguments and returns as
    :func:`attribute_flax` (``method="exact"``); ``scores[site].values`` ``[*component axes]``
    is the batch mean of metric(patched base run) - metric(base run).
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    base_inputs, source_inputs = _runs(direction, clean_inputs, corrupt_inputs)

    @jax.jit
    def unpatched(variables, inputs):
        outputs, cache = dataclasses.replace(fm, variables=variables).run(inputs)
        return _per_prompt(metric, outputs), cache

    def site_effects(site, variables, base_inputs, source_act, base):
        """``[n_components, batch]`` effects of patching each component of `site`."""
        model = dataclasses.replace(fm, variables=variables)
        shape = source_act.shape[1:-1]

        def one(c):
            patched = (jnp.arange(math.prod(shape)) == c).reshape(1, *shape, 1)
            edit = lambda out: jnp.where(patched, source_act.astype(out.dtype), out)
            outputs, _ = model.run(base_inputs, {site: edit})
            return _per_prompt(metric, outputs) - base

        n = math.prod(shape)
        return jax.lax.map(one, jnp.arange(n), batch_size=min(batch_size or n, n))

    start = time.perf_counter()
    base, _ = unpatched(fm.variables, base_inputs)
    source, source_cache = unpatched(fm.variables, source_inputs)
    grids = {}
    for site in fm.sites:
        effects = jax.jit(site_effects, static_argnums=0)(site, fm.variables, base_inputs,
                                                          source_cache[site], base)
        grids[site] = effects.T.reshape(effects.shape[1], *source_cache[site].shape[1:-1])
    grids = jax.device_get(grids)
    return _results("exact", direction, metric, grids, base, source, per_prompt,
                    time.perf_counter() - start)


# The granularity whose name carries one site's flattened components through `validate`, which
# knows only the names in attrpatch.results.GRANULARITIES: any ("layer", "pos") grid works.
_CARRIER = "attn_out"


def _as_carrier(results: PatchResults, site: str) -> PatchResults:
    """`results` with only `site`'s values, flattened to a ``[1, n_components]`` carrier grid."""
    return dataclasses.replace(
        results, scores={_CARRIER: Scores(_CARRIER, np.reshape(results[site], (1, -1)))})


def _located(site: str, shape: tuple[int, ...], flat: int) -> tuple[tuple[int, ...], str]:
    """A carrier component's index in `site`'s grid and its label (``"blocks_0/attn[3]"``)."""
    index = tuple(int(i) for i in np.unravel_index(flat, shape))
    return index, f"{site}[{','.join(map(str, index))}]" if index else site


def validate_flax(atp: PatchResults, exact: PatchResults,
                  thresholds: Thresholds | None = None) -> Validation:
    """:func:`attrpatch.validation.validate` for site-keyed results (:func:`attribute_flax`,
    :func:`patch_flax`), every site its own family.

    **Returns:** :class:`attrpatch.Validation` whose `by_granularity`, `by_family`, `verdicts`
    and `flag_grids` are keyed by site (grids ``[*component axes]``) and whose flags name the site
    and the component index (label ``"blocks_0/attn[3]"``). Flags are in units of |gap|; when
    |gap| < ``thresholds.min_gap`` each site's unit is its own largest |exact| (every verdict is
    then "n/a" anyway). `thresholds`: :class:`attrpatch.Thresholds` (None: the defaults).
    Raises `ValueError` as `validate` does, or when no site is in both.
    """
    thresholds = Thresholds() if thresholds is None else thresholds
    sites = [s for s in atp.scores if s in exact.scores]
    if not sites:
        raise ValueError(f"no site in common: AtP has {sorted(atp.scores)}, exact {sorted(exact.scores)}")
    by_site, by_family, verdicts, flags, grids, drivers = {}, {}, {}, [], {}, {}
    for site in sites:
        shape = np.shape(exact[site])
        if np.shape(atp[site]) != shape:
            raise ValueError(f"{site}: AtP shape {np.shape(atp[site])} differs from exact shape {shape}")
        v = validate(_as_carrier(atp, site), _as_carrier(exact, site), thresholds=thresholds)
        (family,) = v.verdicts  # the carrier's one family
        by_site[site], by_family[site], verdicts[site] = (
            v.by_granularity[_CARRIER], v.by_family[family], v.verdicts[family])
        for f in v.flags:
            index, label = _located(site, shape, f.index[1])
            flags.append(dataclasses.replace(f, granularity=site, index=index, label=label))
        if family in v.drivers:
            drivers[site] = [d | dict(zip(("index", "label"), _located(site, shape, d["index"][1]),
                                          strict=True), granularity=site) for d in v.drivers[family]]
        grids[site] = v.flag_grids[_CARRIER].reshape(shape)
    flags.sort(key=lambda f: -f.severity)
    all_exact = np.abs(np.concatenate([np.ravel(exact[s]) for s in sites]))
    finite = all_exact[np.isfinite(all_exact)]
    unit = (abs(exact.gap) if abs(exact.gap) >= thresholds.min_gap
            else float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    return Validation(exact.gap, unit, thresholds, by_site, by_family, verdicts, flags, grids, v.note,
                      atp.method, drivers)
