"""Interventions as data: the one place where a forward pass can be edited.

Every site of every architecture passes its activation through :func:`site`. The forward takes an
:class:`Interventions` value as an ordinary argument, so `jax.grad`, `jax.vmap`, `jax.checkpoint`,
`jit` and sharding all work without hook machinery, and sites nobody asked for compile away (the
set of names is part of the pytree structure, hence static).

Keys are TransformerLens hook names *without* the ``blocks.{l}.`` prefix. Block sites
(``hook_resid_pre``, ``attn.hook_z``, ``mlp.hook_post``, ...) carry a leading layer axis of length
``n_layers`` (the layer scan slices it); global sites (``hook_embed``, ``hook_pos_embed``,
``ln_final.hook_normalized``) carry none. Shapes after that axis are the site's shape from
:data:`attrpatch.sites.BLOCK_SITE_TABLE` / ``GLOBAL_SITE_TABLE``, with broadcasting
allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array


class Patch(NamedTuple):
    """Masked replacement: where ``mask`` is true the activation becomes ``source``.

    Both broadcast against the site's activation (after the layer axis, for block sites).
    """

    mask: Array
    source: Array


class Interventions(eqx.Module):
    """Edits applied inside the forward pass (a pytree; the dicts are copied on construction).

    **Arguments:**

    - `delta`: site key -> array added to the activation. Attribution differentiates with
      respect to zero-valued deltas.
    - `patch`: site key -> :class:`Patch`, a masked replacement (exact patching, ablations).
    - `grad_scale`: site key -> array (broadcast against the activation) by which the gradient
      flowing back through the site is multiplied; the forward value is unchanged. 0 drops
      the gradient there (AtP*'s GradDrop).

    Deltas are applied before patches, gradient scaling last.
    """

    delta: dict[str, Array]
    patch: dict[str, Patch]
    grad_scale: dict[str, Array]

    def __init__(self, delta: Mapping[str, Array] | None = None,
                 patch: Mapping[str, Patch] | None = None,
                 grad_scale: Mapping[str, Array] | None = None):
        self.delta = dict(delta or {})
        self.patch = dict(patch or {})
        self.grad_scale = dict(grad_scale or {})

    def layer_slice(self, keys: frozenset[str]) -> Interventions:
        """The block-site part (still stacked over layers), for the layer scan."""
        return Interventions(
            {k: v for k, v in self.delta.items() if k in keys},
            {k: v for k, v in self.patch.items() if k in keys},
            {k: v for k, v in self.grad_scale.items() if k in keys},
        )


NO_INTERVENTIONS = Interventions()


def site(name: str, x: Array, iv: Interventions) -> Array:
    """Pass activation `x` of site `name` through the interventions `iv` (one layer's slice)."""
    if name in iv.delta:
        x = x + iv.delta[name].astype(x.dtype)
    if name in iv.patch:
        p = iv.patch[name]
        x = jnp.where(p.mask, p.source.astype(x.dtype), x)
    if name in iv.grad_scale:
        scale = iv.grad_scale[name].astype(x.dtype)
        x = scale * x + jax.lax.stop_gradient((1 - scale) * x)
    return x
