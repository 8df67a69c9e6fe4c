"""Planted failures: small edits of a model that make gradient estimates fail in a known way.

For testing estimators and validation (and for learning where AtP breaks), each function returns
an edited copy of a :class:`attrpatch.Model`; the original is unchanged.

- :func:`saturate_head`: scale one head's W_Q and W_K so its attention is near one-hot. Plain
  AtP then misjudges that head's query and key patches (AtP* section 3.1.1); the QK fix does not.
- :func:`plant_cancellation`: make a later head undo an earlier head's direct effect, so the
  gradient at the earlier head nearly cancels (AtP* section 3.1.2), the case GradDrop is meant
  to catch.
"""

from __future__ import annotations

import numpy as np

from attrpatch.model import Model


def _with_blocks(model: Model, **changes) -> Model:
    return Model(model.config, dict(model.params, blocks=dict(model.params["blocks"], **changes)))


def saturate_head(model: Model, layer: int, head: int, factor: float) -> Model:
    """Multiply query head `head`'s W_Q (and b_Q) and its kv head's W_K (and b_K) in `layer` by
    `factor`: the attention logits grow by factor**2 (for grouped-query models, the other query
    heads reading that kv head sharpen too)."""
    cfg, blocks = model.config, model.params["blocks"]
    kv = head // (cfg.n_heads // cfg.kv_heads)
    changes = {"W_Q": blocks["W_Q"].at[layer, :, head].multiply(factor),
               "W_K": blocks["W_K"].at[layer, :, kv].multiply(factor)}
    if cfg.qkv_bias:
        changes |= {"b_Q": blocks["b_Q"].at[layer, head].multiply(factor),
                    "b_K": blocks["b_K"].at[layer, kv].multiply(factor)}
    return _with_blocks(model, **changes)


def plant_cancellation(model: Model, task, source: tuple[int, int], reader: tuple[int, int],
                       direction: str = "denoise", iterations: int = 8) -> tuple[Model, float]:
    """Make head `reader` ``(layer, head)`` cancel head `source`'s effect on the metric.

    The reader's value-output circuit is set to read the source head's output directions and
    write them back (W_V = c W_O[source]^T, W_O = W_O[source], no value bias), and the scale
    ``c`` is solved (secant steps on AtP of ``z``) so that the AtP score of the source head is
    zero (within 1% of its score with c = 0): its direct effect and its effect through the reader
    cancel at the base run. The reader must sit in a later layer; a model with grouped kv heads
    is refused (its value heads are shared). Raises `ValueError` where the secant steps do not
    get there.

    **Returns:** ``(edited model, c)``.
    """
    from attrpatch.attribution import attribute  # planted models are built for the estimators

    (la, ha), (lb, hb) = source, reader
    cfg = model.config
    if not la < lb:
        raise ValueError(f"the reader head's layer ({lb}) must come after the source's ({la})")
    if cfg.kv_heads != cfg.n_heads:
        raise ValueError("plant_cancellation edits one head's values: it needs n_kv_heads == n_heads")
    blocks = model.params["blocks"]
    w_o = blocks["W_O"][la, ha]  # [d_head, d_model]

    def edited(c: float) -> Model:
        changes = {"W_V": blocks["W_V"].at[lb, :, hb].set(c * w_o.T),
                   "W_O": blocks["W_O"].at[lb, hb].set(w_o)}
        if cfg.qkv_bias:
            changes["b_V"] = blocks["b_V"].at[lb, hb].set(0.0)
        return _with_blocks(model, **changes)

    def score(c: float) -> float:
        return float(attribute(edited(c), task, ("z",), direction=direction)["z"][la, ha])

    c0, c1 = 0.0, 1.0
    s0, s1 = score(c0), score(c1)
    for _ in range(iterations):
        if s1 == s0:
            break
        c0, c1, s0 = c1, c1 - s1 * (c1 - c0) / (s1 - s0), s1
        s1 = score(c1)
    if not (np.isfinite(c1) and abs(s1) <= 0.01 * abs(score(0.0))):
        raise ValueError(f"could not plant the cancellation: AtP of head {source} is still {s1:+.3g} "
                         f"after {iterations} secant steps (the reader head {reader} barely responds "
                         "to the source head's output, or not linearly); try another reader")
    return edited(c1), float(c1)
