"""The one parameterised transformer: every family's forward pass, in phases, with named sites.

Parameters are a plain dict pytree; block weights are stacked over a leading layer axis ``L`` so
the forward is one `lax.scan`. Which keys exist follows from the config (biases, gated MLP,
LayerNorm biases, pre- and post-norms, q/k norms, learned positions):

| key | shape | present (blank: as the row above) |
|---|---|---|
| ``W_E`` | ``[d_vocab, d_model]`` | always (Gemma's ``sqrt(d_model)`` folded in) |
| ``W_pos`` | ``[n_ctx, d_model]`` | learned positions |
| ``blocks.ln1_w`` / ``ln1_b`` | ``[L, d_model]`` | `pre_norms` / and LayerNorm |
| ``blocks.W_Q`` / ``b_Q`` | ``[L, d_model, head, d_head]`` / ``[L, head, d_head]`` | always / `qkv_bias` |
| ``blocks.W_K``, ``W_V`` / ``b_K, b_V`` | ``[L, d_model, kv_head, d_head]`` / ``[L, kv_head, d_head]`` | |
| ``blocks.q_norm_w``, ``k_norm_w`` | ``[L, d_head]`` each | `qk_norm` ``"head"`` |
| ``blocks.q_norm_w`` / ``k_norm_w`` | ``[L, head, d_head]`` / ``[L, kv_head, d_head]`` | ``"projection"`` |
| ``blocks.W_O`` / ``b_O`` | ``[L, head, d_head, d_model]`` / ``[L, d_model]`` | always / `attn_out_bias` |
| ``blocks.ln1_post_w``, ``ln2_post_w`` | ``[L, d_model]`` | `post_norms` |
| ``blocks.ln2_w`` / ``ln2_b`` | ``[L, d_model]`` | MLPs and `pre_norms` / and LayerNorm |
| ``blocks.W_in`` / ``b_in`` | ``[L, d_model, d_mlp]`` / ``[L, d_mlp]`` | MLPs / `mlp_bias` (up, if gated) |
| ``blocks.W_gate`` / ``b_gate`` | ``[L, d_model, d_mlp]`` / ``[L, d_mlp]`` | `gated_mlp` / and `mlp_bias` |
| ``blocks.W_out`` / ``b_out`` | ``[L, d_mlp, d_model]`` / ``[L, d_model]`` | MLPs / `mlp_bias` |
| ``ln_f_w`` / ``ln_f_b`` | ``[d_model]`` | always / LayerNorm |
| ``W_U`` | ``[d_model, d_vocab]`` | always |

The phases (the exact-patching engine calls them on packed rows, each row with its position):
:func:`embed`; :func:`attention_inputs` (hooks q, k, v, then q_norm, k_norm, then rot_q, rot_k,
with the layer's rotary frequencies from :func:`layer_constants`); :func:`mix` (grouped
query heads, soft-cap, masks, scores and pattern hooks); :func:`block_output` (W_O, post-norm,
MLP, sequential or parallel, with :func:`mlp`); :func:`final_norm` and :func:`unembed` (soft-cap).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from attrpatch.arch.config import ModelConfig
from attrpatch.interventions import NO_INTERVENTIONS, Interventions, site
from attrpatch.sites import block_keys

Hook = Callable[[str, Array], Array]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
_NO_WINDOW = np.iinfo(np.int32).max


# ----------------------------------------------------------------------------------------------
# Small pure pieces


def norm(x: Float[Array, "... d"], w, b, cfg: ModelConfig) -> Float[Array, "... d"]:
    """LayerNorm (`b` given) or RMSNorm over the last axis, computed in at least float32. RelP's
    ``"ln"`` rule: the scale ``1 / rms`` is a constant of the backward."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if cfg.norm == "layernorm":
        x32 = x32 - x32.mean(-1, keepdims=True)
    scale = jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + cfg.norm_eps)
    if "ln" in cfg.backward_rules:
        scale = jax.lax.stop_gradient(scale)
    normed = x32 * scale
    out = normed.astype(x.dtype) * w
    return out if b is None else out + b


def norm_vjp(x: Float[Array, "... d"], w, cotangents: Float[Array, "n ... d"], cfg: ModelConfig
             ) -> Float[Array, "n ... d"]:
    """The gradient of :func:`norm` at `x` pulled back from each of `n` cotangents, float32:
    ``r * (v - mean(v) - x_hat * mean(v * x_hat))`` with ``v = cotangent * w`` and
    ``x_hat = norm(x) / w`` (RMSNorm: without ``- mean(v)``; RelP's ``"ln"`` rule: without the
    ``x_hat`` term, the scale ``r`` held)."""
    x32 = x.astype(jnp.float32)
    if cfg.norm == "layernorm":
        x32 = x32 - x32.mean(-1, keepdims=True)
    r = jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + cfg.norm_eps)
    x_hat = x32 * r
    v = cotangents.astype(jnp.float32) * w.astype(jnp.float32)
    centred = v - v.mean(-1, keepdims=True) if cfg.norm == "layernorm" else v
    if "ln" in cfg.backward_rules:
        return r * centred
    return r * (centred - x_hat * (v * x_hat).mean(-1, keepdims=True))


def qk_normalize(x: Float[Array, "batch pos head d_head"], w, cfg: ModelConfig
                 ) -> Float[Array, "batch pos head d_head"]:
    """The q/k norm (`cfg.qk_norm`) of queries or keys with weight `w`: over each head's
    features (``"head"``, `w` ``[d_head]``) or over all heads' at once (``"projection"``, `w`
    ``[head, d_head]``). Leading axes are free."""
    if cfg.qk_norm == "head":
        return norm(x, w, None, cfg)
    flat = x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
    return norm(flat, w.reshape(-1), None, cfg).reshape(x.shape)


def softcap(x: Array, cap: float | None) -> Array:
    """``cap * tanh(x / cap)`` (identity for None)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def rotary_inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse frequencies ``[rotary_width // 2]`` (float32) as Hugging Face computes them
    (`modeling_rope_utils`): from `rope_theta` with the config's scaling, or for a `local`
    (sliding-window) layer from `rope_local_theta`, unscaled."""
    dim = cfg.rotary_width
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)))
    inv = inv.astype(np.float32)
    if local:
        return inv
    scaling = dict(cfg.rope_scaling)
    if cfg.rope_type == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif cfg.rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rotate(x: Float[Array, "batch pos head d_head"], positions: Int[Array, "batch pos"],
           inv_freq: Float[Array, " half"]) -> Float[Array, "batch pos head d_head"]:
    """Rotary embedding of the first ``2 * half`` features of each head at explicit positions,
    with inverse frequencies `inv_freq` (a layer's, from :func:`layer_constants`; rotate-half
    layout; the rest pass through)."""
    r = 2 * inv_freq.shape[-1]
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], -1)[:, :, None]  # [batch, pos, 1, r]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    xr, rest = x[..., :r], x[..., r:]
    half = jnp.concatenate([-xr[..., r // 2:], xr[..., : r // 2]], -1)
    return jnp.concatenate([xr * cos + half * sin, rest], -1)


def keep_mask(query_pos: Int[Array, "batch q"], key_pos: Int[Array, "batch k"], window,
              key_real: Bool[Array, "batch k"] | None = None) -> Bool[Array, "batch 1 q k"]:
    """Which keys each query may attend to: causal, within the sliding `window` (a query at p
    sees keys p - window < k <= p; pass a huge window for none), padded keys dropped."""
    gap = query_pos[:, None, :, None] - key_pos[:, None, None, :]
    keep = (gap >= 0) & (gap < window)
    return keep if key_real is None else keep & key_real[:, None, None, :]


def layer_constants(cfg: ModelConfig) -> dict[str, Array]:
    """Per-layer attention constants, scanned with the blocks: ``scale`` (the logits' divisor)
    and ``window`` (sliding-window length; int32 max for none), each ``[n_layers]``, and
    ``inv_freq`` ``[n_layers, rotary_width // 2]`` (the rotary frequencies: sliding-window layers
    have their own where `rope_local_theta` is set; zero-width without rotary)."""
    scale = cfg.attn_scale if cfg.attn_scale is not None else math.sqrt(cfg.d_head)
    scales = np.full(cfg.n_layers, scale, np.float32)
    if cfg.scale_attn_by_inverse_layer_idx:
        scales = scales * np.arange(1, cfg.n_layers + 1, dtype=np.float32)
    layer_windows = cfg.windows or (None,) * cfg.n_layers
    windows = [_NO_WINDOW if w is None else w for w in layer_windows]
    local = [w is not None and cfg.rope_local_theta is not None for w in layer_windows]
    inv_freq = np.stack([rotary_inv_freq(cfg, is_local) for is_local in local])
    return {"scale": jnp.asarray(scales), "window": jnp.asarray(windows, jnp.int32),
            "inv_freq": jnp.asarray(inv_freq)}


# ----------------------------------------------------------------------------------------------
# Phases


def embed(params: dict, cfg: ModelConfig, tokens: Int[Array, "batch pos"], hook: Hook
          ) -> Float[Array, "batch pos d_model"]:
    """Token (and learned position) embeddings: the first block's ``resid_pre``."""
    x = hook("hook_embed", params["W_E"][tokens])
    if cfg.positions == "learned":
        x = x + hook("hook_pos_embed", jnp.broadcast_to(params["W_pos"][: tokens.shape[1]], x.shape))
    return x


def attention_inputs(p: dict, cfg: ModelConfig, resid: Float[Array, "batch pos d_model"] | tuple,
                     positions: Int[Array, "batch pos"], hook: Hook, *, inv_freq: Float[Array, " half"]
                     ) -> tuple[Array, Array, Array]:
    """Queries ``[batch, pos, head, d_head]``, keys and values ``[batch, pos, kv_head, d_head]``
    of one block (`p` its slice): the input norm, projections and biases (hooks q, k, v), the
    q/k norms (hooks q_norm, k_norm), rotary at `positions` with the layer's `inv_freq`
    (``layer_constants(cfg)["inv_freq"][layer]``; hooks rot_q, rot_k).

    `resid` is the residual stream the block reads, or (the edge engine) each head's own copy:
    a tuple ``([head, batch, pos, d_model], [kv_head, ...], [kv_head, ...])`` for q, k and v.
    Each head's query (key, value) is then what the block computes from its own copy: with a
    whole-projection q/k norm (``"projection"``), the copy's whole projection is normalised and
    the head's slice kept (the q and k hooks observe the heads' raw slices there).
    """
    def read(x):  # the input norm
        return norm(x, p["ln1_w"], p.get("ln1_b"), cfg) if cfg.pre_norms else x

    def project(name, x, spec):
        out = jnp.einsum(spec, x, p[f"W_{name}"])
        return out + p[f"b_{name}"] if cfg.qkv_bias else out

    per_copy = isinstance(resid, tuple)
    if per_copy:
        copies = [read(x) for x in resid]
        q, k, v = (project(n, x, "hbpd,dhe->bphe") for n, x in zip("QKV", copies, strict=True))
    else:
        x = read(resid)
        q, k, v = (project(n, x, "bpd,dhe->bphe") for n in "QKV")
    q, k, v = hook("attn.hook_q", q), hook("attn.hook_k", k), hook("attn.hook_v", v)
    if cfg.qk_norm is not None:
        if per_copy and cfg.qk_norm == "projection":  # copy c's whole projection, head c kept
            q, k = (jnp.einsum("hbphe->bphe", qk_normalize(project(n, x, "cbpd,dhe->cbphe"),
                                                           p[f"{n.lower()}_norm_w"], cfg))
                    for n, x in zip("QK", copies[:2], strict=True))
        else:
            q, k = qk_normalize(q, p["q_norm_w"], cfg), qk_normalize(k, p["k_norm_w"], cfg)
        q = hook("attn.q_norm.hook_normalized", q)
        k = hook("attn.k_norm.hook_normalized", k)
    if cfg.positions == "rotary":
        q = hook("attn.hook_rot_q", rotate(q, positions, inv_freq))
        k = hook("attn.hook_rot_k", rotate(k, positions, inv_freq))
    return q, k, v


def attention_scores(q: Float[Array, "batch q head d_head"], k: Float[Array, "batch k kv_head d_head"],
                     keep: Bool[Array, "batch 1 q k"], scale, cfg: ModelConfig
                     ) -> Float[Array, "batch head q k"]:
    """Attention logits (at least float32): query head ``h`` against kv head ``h // group``,
    divided by `scale`, soft-capped, entries outside `keep` at the dtype's minimum.

    Both operands are laid out kv-head-major first (a kv head's query heads and positions as one
    matrix), so each kv head is one plain matmul; on XLA:CPU that is about 20% faster than letting
    the einsum choose its own transposes."""
    b, nq, H, dh = q.shape
    K = k.shape[2]
    grouped = q.reshape(b, nq, K, H // K, dh).transpose(0, 2, 3, 1, 4).reshape(b, K, -1, dh)
    scores = jnp.einsum("bkqe,bkse->bkqs", grouped, k.swapaxes(1, 2),
                        preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    scores = softcap(scores.reshape(b, H, nq, k.shape[1]) / scale, cfg.attn_softcap)
    return jnp.where(keep, scores, jnp.finfo(scores.dtype).min)


def mix(q: Float[Array, "batch q head d_head"], k: Float[Array, "batch k kv_head d_head"],
        v: Float[Array, "batch k kv_head d_head"], keep: Bool[Array, "batch 1 q k"], scale,
        cfg: ModelConfig, hook: Hook) -> Float[Array, "batch q head d_head"]:
    """Attention mixing: head outputs z. Query head ``h`` reads kv head ``h // group``; logits
    are divided by `scale`, soft-capped, masked by `keep`, then pass the scores and pattern hooks.
    RelP's ``"attention"`` rule: the pattern is a constant of the backward, so gradient reaches
    the values (and the pattern site itself) but not the scores, queries or keys."""
    b, nq, H, dh = q.shape
    K = k.shape[2]
    scores = hook("attn.hook_attn_scores", attention_scores(q, k, keep, scale, cfg))
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    if "attention" in cfg.backward_rules:
        probs = jax.lax.stop_gradient(probs)
    pattern = hook("attn.hook_pattern", probs)
    z = jnp.einsum("bkqs,bkse->bkqe", pattern.reshape(b, K, -1, k.shape[1]), v.swapaxes(1, 2))
    return z.reshape(b, K, H // K, nq, dh).transpose(0, 3, 1, 2, 4).reshape(b, nq, H, dh)


def block_output(p: dict, cfg: ModelConfig, resid: Float[Array, "batch pos d_model"],
                 z: Float[Array, "batch pos head d_head"], hook: Hook
                 ) -> Float[Array, "batch pos d_model"]:
    """The rest of a block after attention mixing: ``resid_post`` from ``resid_pre`` and z."""
    attn_out = jnp.einsum("bqhe,hed->bqd", z, p["W_O"])
    if cfg.attn_out_bias:
        attn_out = attn_out + p["b_O"]
    if cfg.post_norms:
        attn_out = norm(attn_out, p["ln1_post_w"], None, cfg)
    attn_out = hook("hook_attn_out", attn_out)
    if cfg.attn_only:
        return hook("hook_resid_post", resid + attn_out)
    if cfg.parallel_attn_mlp:
        mlp_in = resid
    else:
        resid = mlp_in = hook("hook_resid_mid", resid + attn_out)
    mlp_out = mlp(p, cfg, mlp_in, hook)
    if cfg.parallel_attn_mlp:
        return hook("hook_resid_post", resid + attn_out + mlp_out)
    return hook("hook_resid_post", resid + mlp_out)


def activation(cfg: ModelConfig) -> Callable[[Array], Array]:
    """The MLP's elementwise activation. RelP's ``"identity"`` rule: the same values, with the
    backward passing ``act(x) / x`` (``act'(0)`` at 0), so relevance flows through unchanged."""
    act = ACTIVATIONS[cfg.act_fn]
    if "identity" not in cfg.backward_rules:
        return act
    slope_at_zero = 0.0 if cfg.act_fn == "relu" else 0.5  # act'(0): GELUs and SiLU have 1/2

    def identity_rule(x):
        y = act(x)
        ratio = jnp.where(x == 0, slope_at_zero, y / jnp.where(x == 0, 1, x))
        return jax.lax.stop_gradient(y) + (x - jax.lax.stop_gradient(x)) * jax.lax.stop_gradient(ratio)

    return identity_rule


def gated_product(a: Array, b: Array, cfg: ModelConfig) -> Array:
    """``a * b`` (a gated MLP's activated gate times its up projection). RelP's ``"half"`` rule:
    the same values, each factor getting half the gradient, ``0.5 * (a * sg(b) + sg(a) * b)``
    (exact: both terms are ``a * b``), so the relevance of the product splits evenly."""
    if "half" not in cfg.backward_rules:
        return a * b
    return 0.5 * (a * jax.lax.stop_gradient(b) + jax.lax.stop_gradient(a) * b)


def mlp(p: dict, cfg: ModelConfig, mlp_in: Float[Array, "... d_model"], hook: Hook
        ) -> Float[Array, "... d_model"]:
    """A block's MLP on the residual stream it reads: norm (`pre_norms`), (gated) MLP, post-norm;
    what it writes to the residual stream (``hook_mlp_out``)."""
    x = norm(mlp_in, p["ln2_w"], p.get("ln2_b"), cfg) if cfg.pre_norms else mlp_in

    def linear(name: str) -> Array:
        out = x @ p[f"W_{name}"]
        return out + p[f"b_{name}"] if cfg.mlp_bias else out

    act = activation(cfg)
    if cfg.gated_mlp:
        gate = hook("mlp.hook_pre", linear("gate"))
        post = gated_product(act(gate), hook("mlp.hook_pre_linear", linear("in")), cfg)
    else:
        post = act(hook("mlp.hook_pre", linear("in")))
    post = hook("mlp.hook_post", post)
    mlp_out = post @ p["W_out"]
    if cfg.mlp_bias:
        mlp_out = mlp_out + p["b_out"]
    if cfg.post_norms:
        mlp_out = norm(mlp_out, p["ln2_post_w"], None, cfg)
    return hook("hook_mlp_out", mlp_out)


def block(p: dict, cfg: ModelConfig, resid: Float[Array, "batch pos d_model"],
          positions: Int[Array, "batch pos"], iv: Interventions, attend: Callable, *,
          inv_freq: Float[Array, " half"]) -> tuple[Float[Array, "batch pos d_model"], dict[str, Array]]:
    """One transformer block on rows at `positions`; `p`, `iv` and `inv_freq` (the rotary
    frequencies, :func:`layer_constants`) are this layer's slices.

    `attend(q, k, v, hook) -> z` does the attention mixing (the forward passes :func:`mix` with
    the layer's masks; the patching engine, whose rows are packed from many patched runs, passes
    its own). Returns ``(resid_post, acts)``, `acts` every site's activation by key.
    """
    acts = {}

    def hook(name, x):
        x = site(name, x, iv)
        acts[name] = x
        return x

    resid = hook("hook_resid_pre", resid)
    q, k, v = attention_inputs(p, cfg, resid, positions, hook, inv_freq=inv_freq)
    z = hook("attn.hook_z", attend(q, k, v, hook))
    return block_output(p, cfg, resid, z, hook), acts


def final_norm(params: dict, cfg: ModelConfig, resid: Float[Array, "... d_model"]) -> Array:
    return norm(resid, params["ln_f_w"], params.get("ln_f_b"), cfg)


def unembed(params: dict, cfg: ModelConfig, normalized: Float[Array, "... d_model"],
            cols: Int[Array, "batch k"] | None = None) -> Float[Array, "... d_vocab"]:
    """Logits ``[..., d_vocab]`` (float32, or float64 for a float64 model), soft-capped. With
    `cols` (for `normalized` ``[batch, d_model]``), only those columns of each row: ``[batch, k]``."""
    dt = jnp.promote_types(normalized.dtype, jnp.float32)
    W_U = params["W_U"].astype(dt)
    if cols is None:
        return softcap(normalized.astype(dt) @ W_U, cfg.final_softcap)
    return softcap(jnp.einsum("bd,dbk->bk", normalized.astype(dt), W_U[:, cols]), cfg.final_softcap)


def forward(
    params: dict,
    cfg: ModelConfig,
    tokens: Int[Array, "batch pos"],
    attention_mask: Int[Array, "batch pos"] | None = None,
    interventions: Interventions = NO_INTERVENTIONS,
    cache_keys: tuple[str, ...] = (),
    logit_positions: Int[Array, " batch"] | None = None,
    remat: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """Run the model.

    **Arguments:**

    - `tokens`: int ``[batch, pos]``.
    - `attention_mask`: optional ``[batch, pos]``, 1 for real tokens, 0 for padding (right
      padding: positions count from 0 in every row).
    - `interventions`: see :mod:`attrpatch.interventions`.
    - `cache_keys`: site keys to return (block keys come back stacked ``[n_layers, ...]``).
    - `logit_positions`: if given, unembed only these positions (``[batch]``), giving
      logits ``[batch, d_vocab]`` instead of ``[batch, pos, d_vocab]`` (and
      ``ln_final.hook_normalized`` of shape ``[batch, d_model]``).
    - `remat`: rematerialise each block in the backward pass (`jax.checkpoint`).

    **Returns:** `(logits, cache)`.
    """
    batch, n_pos = tokens.shape
    cache = {}

    def global_hook(name, x):
        x = site(name, x, interventions)
        if name in cache_keys:
            cache[name] = x
        return x

    resid = embed(params, cfg, tokens, global_hook)
    positions = jnp.broadcast_to(jnp.arange(n_pos), (batch, n_pos))
    real = None if attention_mask is None else attention_mask > 0
    keys = block_keys(cfg)
    layer_iv = interventions.layer_slice(frozenset(keys))
    wanted = tuple(k for k in keys if k in cache_keys)

    def step(resid, xs):
        p, consts, iv = xs
        keep = keep_mask(positions, positions, consts["window"], real)
        attend = lambda q, k, v, hook: mix(q, k, v, keep, consts["scale"], cfg, hook)
        resid, acts = block(p, cfg, resid, positions, iv, attend, inv_freq=consts["inv_freq"])
        return resid, {k: acts[k] for k in wanted}

    if remat:
        step = jax.checkpoint(step)
    resid, stacked = jax.lax.scan(step, resid, (params["blocks"], layer_constants(cfg), layer_iv))
    cache |= stacked
    if logit_positions is not None:
        resid = resid[jnp.arange(batch), logit_positions]
    normalized = global_hook("ln_final.hook_normalized", final_norm(params, cfg, resid))
    return unembed(params, cfg, normalized), cache


# ----------------------------------------------------------------------------------------------
# Random initialisation (training and benchmarks)


def init_params(cfg: ModelConfig, key: Array, dtype=jnp.float32) -> dict:
    """GPT-2-style random initialisation: normal(0, 0.02) weights (outputs scaled by
    ``1/sqrt(2 L)``), zero biases, unit norm weights; only the keys `cfg` implies."""
    L, d, H, K, dh, dm = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_mlp
    keys = iter(jax.random.split(key, 12))
    normal = lambda shape, std=0.02: std * jax.random.normal(next(keys), shape, dtype)
    ones, zeros = (lambda *s: jnp.ones(s, dtype)), (lambda *s: jnp.zeros(s, dtype))
    out_std = 0.02 / math.sqrt(2 * L)
    layernorm = cfg.norm == "layernorm"
    blocks = {"W_Q": normal((L, d, H, dh)), "W_K": normal((L, d, K, dh)),
              "W_V": normal((L, d, K, dh)), "W_O": normal((L, H, dh, d), out_std)}
    if cfg.pre_norms:
        blocks["ln1_w"] = ones(L, d)
        if layernorm:
            blocks["ln1_b"] = zeros(L, d)
    if cfg.qk_norm == "head":
        blocks |= {"q_norm_w": ones(L, dh), "k_norm_w": ones(L, dh)}
    elif cfg.qk_norm == "projection":
        blocks |= {"q_norm_w": ones(L, H, dh), "k_norm_w": ones(L, K, dh)}
    if cfg.qkv_bias:
        blocks |= {"b_Q": zeros(L, H, dh), "b_K": zeros(L, K, dh), "b_V": zeros(L, K, dh)}
    if cfg.attn_out_bias:
        blocks["b_O"] = zeros(L, d)
    if cfg.post_norms:
        blocks["ln1_post_w"] = ones(L, d)
    if not cfg.attn_only:
        blocks |= {"W_in": normal((L, d, dm)), "W_out": normal((L, dm, d), out_std)}
        if cfg.pre_norms:
            blocks["ln2_w"] = ones(L, d)
            if layernorm:
                blocks["ln2_b"] = zeros(L, d)
        if cfg.gated_mlp:
            blocks["W_gate"] = normal((L, d, dm))
        if cfg.mlp_bias:
            blocks |= {"b_in": zeros(L, dm), "b_out": zeros(L, d)}
            if cfg.gated_mlp:
                blocks["b_gate"] = zeros(L, dm)
        if cfg.post_norms:
            blocks["ln2_post_w"] = ones(L, d)
    W_E = normal((cfg.d_vocab, d))
    params = {"W_E": W_E, "blocks": blocks, "ln_f_w": ones(d),
              "W_U": W_E.T if cfg.tie_word_embeddings else normal((d, cfg.d_vocab))}
    if cfg.positions == "learned":
        params["W_pos"] = normal((cfg.n_ctx, d), 0.01)
    if layernorm:
        params["ln_f_b"] = zeros(d)
    return params
