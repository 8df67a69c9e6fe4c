"""The edge engine: one forward in which every destination reads its own copy of the residual
stream (exact edge patching; the gradient estimates use the ordinary forward).

Destination ``d`` reads ``resid + sum_s patched[s, d] * (source_value_s - current_s)``: the
residual stream of this run, with the listed edges carrying the source run's value of their
source instead of this run's. Every unlisted edge carries what its source computes in this run,
so all edges listed reproduce the source run, none the base run, and all edges leaving one node
equal patching that node. Shapes below: ``S`` sources, ``Dst`` destinations (layout in
:mod:`attrpatch.circuits.graph`), ``B`` prompts, ``T`` positions, ``D`` d_model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from attrpatch.arch import transformer as T
from attrpatch.circuits.graph import EdgeGraph


class EdgeEdit(NamedTuple):
    """How a run departs from the plain forward (None: not at all).

    - `patched` ``[S, Dst, T]`` (0/1 per edge and position) with `source_values` ``[S, B, T, D]``
      (the source run's source outputs): the listed edges carry the source run's value.
    - `one_destination` (int scalar) with `one_delta` ``[B, T, D]``: added to that destination's
      input only (one edge patched; cheaper than a `patched` mask).
    """

    patched: Float[Array, "S Dst T"] | None = None
    source_values: Float[Array, "S B T D"] | None = None
    one_destination: Int[Array, ""] | None = None
    one_delta: Float[Array, "B T D"] | None = None


NO_EDIT = EdgeEdit()


def edge_forward(params: dict, cfg, tokens: Int[Array, "B T"],
                 attention_mask: Int[Array, "B T"] | None, answer_positions: Int[Array, " B"],
                 edit: EdgeEdit = NO_EDIT) -> Float[Array, "B vocab"]:
    """Run the model with per-destination inputs; returns the answer logits.

    Layers are unrolled (each has its own destination slices); attention, the MLP and the norms
    are the phases of :mod:`attrpatch.arch.transformer`, so every family runs here.
    """
    graph = EdgeGraph(cfg)
    batch, n_pos = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(n_pos), (batch, n_pos))
    real = None if attention_mask is None else attention_mask > 0
    consts = T.layer_constants(cfg)
    untouched = lambda name, x: x  # noqa: E731  (no site interventions in the edge engine)
    outputs: list[Array] = []  # each [n, B, T, D], in source order

    def inputs(resid: Array, first: int, stop: int) -> Array:
        """Destinations ``first..stop``'s inputs ``[n, B, T, D]``."""
        x = jnp.broadcast_to(resid, (stop - first, *resid.shape))
        if edit.patched is not None:
            current = jnp.concatenate(outputs)
            n = current.shape[0]
            change = edit.source_values[:n].astype(current.dtype) - current
            weights = edit.patched[:n, first:stop].astype(current.dtype)
            x = x + jnp.einsum("sdt,sbtm->dbtm", weights, change)
        if edit.one_destination is not None:
            hit = (jnp.arange(first, stop) == edit.one_destination).astype(x.dtype)
            x = x + hit[:, None, None, None] * edit.one_delta.astype(x.dtype)
        return x

    embedded = T.embed(params, cfg, tokens, untouched)[None]
    outputs.append(embedded)
    resid = embedded[0]
    for layer in range(cfg.n_layers):
        p = jax.tree.map(lambda a, layer=layer: a[layer], params["blocks"])
        qs, ks, vs = graph.qkv_destination_slices(layer)
        own = tuple(inputs(resid, s.start, s.stop) for s in (qs, ks, vs))
        q, k, v = T.attention_inputs(p, cfg, own, positions, untouched, inv_freq=consts["inv_freq"][layer])
        keep = T.keep_mask(positions, positions, consts["window"][layer], real)
        z = T.mix(q, k, v, keep, consts["scale"][layer], cfg, untouched)
        heads = jnp.einsum("bqhe,hed->hbqd", z, p["W_O"])
        bias = p["b_O"] if cfg.attn_out_bias else 0.0
        if graph.head_sources:
            attn = heads
            attn_write = attn.sum(0) + bias
        else:  # sandwich norm: the layer's normed output is the source
            attn = T.norm(heads.sum(0) + bias, p["ln1_post_w"], None, cfg)[None]
            attn_write = attn[0]
        outputs.append(attn)
        if cfg.attn_only:
            resid = resid + attn_write
            continue
        read = resid if cfg.parallel_attn_mlp else resid + attn_write
        d = graph.mlp_destination_index(layer)
        mlp_out = T.mlp(p, cfg, inputs(read, d, d + 1)[0], untouched)[None]
        outputs.append(mlp_out)
        resid = resid + attn_write + mlp_out[0]
    last = len(graph.destinations) - 1
    final = inputs(resid, last, last + 1)[0][jnp.arange(batch), answer_positions]
    return T.unembed(params, cfg, T.final_norm(params, cfg, final))
