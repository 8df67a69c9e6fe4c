"""GPT-2 in JAX: config, Hugging Face weight conversion, and the forward pass with named sites.

Parameters are a plain dict pytree with the block weights stacked over a leading layer axis
(``L``) so the forward is one `lax.scan`:

| key | shape |
|---|---|
| ``W_E`` / ``W_pos`` | ``[d_vocab, d_model]`` / ``[n_ctx, d_model]`` |
| ``blocks.ln1_w``, ``ln1_b``, ``ln2_w``, ``ln2_b``, ``b_O``, ``b_out`` | ``[L, d_model]`` |
| ``blocks.W_Q``, ``W_K``, ``W_V`` | ``[L, d_model, head, d_head]`` |
| ``blocks.b_Q``, ``b_K``, ``b_V`` | ``[L, head, d_head]`` |
| ``blocks.W_O`` | ``[L, head, d_head, d_model]`` |
| ``blocks.W_in`` / ``W_out`` | ``[L, d_model, d_mlp]`` / ``[L, d_mlp, d_model]`` |
| ``blocks.b_in`` | ``[L, d_mlp]`` |
| ``ln_f_w``, ``ln_f_b`` | ``[d_model]`` |
| ``W_U`` | ``[d_model, d_vocab]`` |

Attention-only models (``attn_only=True``) have no ``ln2_*``, ``W_in``, ``b_in``, ``W_out``, ``b_out``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from attrpatch.interventions import NO_INTERVENTIONS, Interventions, site
from attrpatch.sites import block_keys

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture hyperparameters (hashable: it is a static argument of the jitted forward)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    n_ctx: int
    d_vocab: int
    layer_norm_eps: float = 1e-5
    act_fn: str = "gelu_new"
    tie_word_embeddings: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    attn_only: bool = False
    architecture: str = "gpt2"

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_hf_dict(self) -> dict:
        """The `config.json` content `transformers` reads (plus our `attn_only` flag)."""
        out = {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_layer": self.n_layers,
            "n_embd": self.d_model,
            "n_head": self.n_heads,
            "n_inner": self.d_mlp,
            "n_positions": self.n_ctx,
            "vocab_size": self.d_vocab,
            "layer_norm_epsilon": self.layer_norm_eps,
            "activation_function": self.act_fn,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
        }
        if self.attn_only:
            out["attrpatch_attn_only"] = True
        return out


def config_from_hf(raw: dict) -> GPT2Config:
    """Build a config from a Hugging Face GPT-2 `config.json` dict; refuse what we do not model."""

    def get(key, default=None):
        return raw[key] if key in raw and raw[key] is not None else default

    for key in ("n_layer", "n_embd", "n_head", "vocab_size"):
        if key not in raw:
            raise ValueError(f"config.json: missing required GPT-2 field {key!r}")
    d_model, n_heads = int(raw["n_embd"]), int(raw["n_head"])
    if d_model % n_heads:
        raise ValueError(f"config.json: n_embd={d_model} is not divisible by n_head={n_heads}")
    act = get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(
            f"config.json: activation_function={act!r} is not supported; "
            f"supported: {', '.join(ACTIVATIONS)}"
        )
    if get("scale_attn_weights", True) is False:
        raise ValueError("config.json: scale_attn_weights=false is not supported")
    if get("add_cross_attention", False):
        raise ValueError("config.json: add_cross_attention=true (an encoder-decoder) is not supported")
    return GPT2Config(
        n_layers=int(raw["n_layer"]),
        d_model=d_model,
        n_heads=n_heads,
        d_mlp=int(get("n_inner", 4 * d_model)),
        n_ctx=int(get("n_positions", get("n_ctx", 1024))),
        d_vocab=int(raw["vocab_size"]),
        layer_norm_eps=float(get("layer_norm_epsilon", 1e-5)),
        act_fn=act,
        tie_word_embeddings=bool(get("tie_word_embeddings", True)),
        scale_attn_by_inverse_layer_idx=bool(get("scale_attn_by_inverse_layer_idx", False)),
        attn_only=bool(get("attrpatch_attn_only", False)),
    )


# Buffers some GPT-2 checkpoints store that are not parameters (causal-mask constants).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def params_from_hf(tensors: dict[str, np.ndarray], cfg: GPT2Config, dtype) -> dict:
    """Convert Hugging Face GPT-2 tensors (either key layout) to our stacked params.

    Raises `ValueError` naming any missing, unexpected or mis-shaped tensor.
    """
    plain = {}
    for name, value in tensors.items():
        key = name.removeprefix("transformer.")
        if key.startswith("h.") and key.endswith(_IGNORED_SUFFIXES):
            continue
        plain[key] = value
    used: set[str] = set()
    L, d, H, dh, dm = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in plain:
            raise ValueError(
                f"checkpoint is missing tensor {key!r} (or 'transformer.{key}'), "
                f"which the config (n_layer={L}, n_embd={d}) requires"
            )
        value = plain[key]
        if tuple(value.shape) != shape:
            raise ValueError(
                f"tensor {key!r} has shape {tuple(value.shape)}, but the config implies {shape}"
            )
        used.add(key)
        return np.asarray(value, dtype=np.float32)

    def stack(suffix: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.stack([take(f"h.{i}.{suffix}", shape) for i in range(L)])

    c_attn_w = stack("attn.c_attn.weight", (d, 3 * d))  # [L, d, 3d] (Conv1D: in x out)
    c_attn_b = stack("attn.c_attn.bias", (3 * d,))
    W_Q, W_K, W_V = (w.reshape(L, d, H, dh) for w in np.split(c_attn_w, 3, axis=-1))
    b_Q, b_K, b_V = (b.reshape(L, H, dh) for b in np.split(c_attn_b, 3, axis=-1))
    blocks = {
        "ln1_w": stack("ln_1.weight", (d,)),
        "ln1_b": stack("ln_1.bias", (d,)),
        "W_Q": W_Q, "W_K": W_K, "W_V": W_V,
        "b_Q": b_Q, "b_K": b_K, "b_V": b_V,
        "W_O": stack("attn.c_proj.weight", (d, d)).reshape(L, H, dh, d),
        "b_O": stack("attn.c_proj.bias", (d,)),
    }
    if not cfg.attn_only:
        blocks |= {
            "ln2_w": stack("ln_2.weight", (d,)),
            "ln2_b": stack("ln_2.bias", (d,)),
            "W_in": stack("mlp.c_fc.weight", (d, dm)),
            "b_in": stack("mlp.c_fc.bias", (dm,)),
            "W_out": stack("mlp.c_proj.weight", (dm, d)),
            "b_out": stack("mlp.c_proj.bias", (d,)),
        }
    W_E = take("wte.weight", (cfg.d_vocab, d))
    params = {
        "W_E": W_E,
        "W_pos": take("wpe.weight", (cfg.n_ctx, d)),
        "blocks": blocks,
        "ln_f_w": take("ln_f.weight", (d,)),
        "ln_f_b": take("ln_f.bias", (d,)),
    }
    if cfg.tie_word_embeddings:
        params["W_U"] = W_E.T
        plain.pop("lm_head.weight", None)  # a redundant copy some exports keep
    else:
        params["W_U"] = take("lm_head.weight", (cfg.d_vocab, d)).T
    unexpected = sorted(set(plain) - used)
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise ValueError(
            f"checkpoint has {len(unexpected)} tensor(s) a GPT-2 with this config does not use: "
            f"{shown}. Is config.json from the same model?"
        )
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)


def params_to_hf(params: dict, cfg: GPT2Config) -> dict[str, np.ndarray]:
    """Our params as Hugging Face `save_pretrained` tensors (prefix ``transformer.``)."""
    b = jax.tree.map(np.asarray, params["blocks"])
    L, d = cfg.n_layers, cfg.d_model
    out = {
        "transformer.wte.weight": np.asarray(params["W_E"]),
        "transformer.wpe.weight": np.asarray(params["W_pos"]),
        "transformer.ln_f.weight": np.asarray(params["ln_f_w"]),
        "transformer.ln_f.bias": np.asarray(params["ln_f_b"]),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = np.asarray(params["W_U"]).T
    for i in range(L):
        p = f"transformer.h.{i}."
        qkv_w = [b[k][i].reshape(d, d) for k in ("W_Q", "W_K", "W_V")]
        qkv_b = [b[k][i].reshape(d) for k in ("b_Q", "b_K", "b_V")]
        out |= {
            p + "ln_1.weight": b["ln1_w"][i],
            p + "ln_1.bias": b["ln1_b"][i],
            p + "attn.c_attn.weight": np.concatenate(qkv_w, axis=-1),
            p + "attn.c_attn.bias": np.concatenate(qkv_b, axis=-1),
            p + "attn.c_proj.weight": b["W_O"][i].reshape(d, d),
            p + "attn.c_proj.bias": b["b_O"][i],
        }
        if not cfg.attn_only:
            out |= {
                p + "ln_2.weight": b["ln2_w"][i],
                p + "ln_2.bias": b["ln2_b"][i],
                p + "mlp.c_fc.weight": b["W_in"][i],
                p + "mlp.c_fc.bias": b["b_in"][i],
                p + "mlp.c_proj.weight": b["W_out"][i],
                p + "mlp.c_proj.bias": b["b_out"][i],
            }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def init_params(cfg: GPT2Config, key: Array, dtype=jnp.float32) -> dict:
    """GPT-2-style random initialisation (normal(0, 0.02) weights, zero biases, unit LayerNorm)."""
    L, d, H, dh, dm = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    keys = iter(jax.random.split(key, 8))
    normal = lambda shape, std=0.02: std * jax.random.normal(next(keys), shape, dtype)
    out_std = 0.02 / math.sqrt(2 * L)
    blocks = {
        "ln1_w": jnp.ones((L, d), dtype), "ln1_b": jnp.zeros((L, d), dtype),
        "W_Q": normal((L, d, H, dh)), "W_K": normal((L, d, H, dh)), "W_V": normal((L, d, H, dh)),
        "b_Q": jnp.zeros((L, H, dh), dtype), "b_K": jnp.zeros((L, H, dh), dtype),
        "b_V": jnp.zeros((L, H, dh), dtype),
        "W_O": normal((L, H, dh, d), out_std), "b_O": jnp.zeros((L, d), dtype),
    }
    if not cfg.attn_only:
        blocks |= {
            "ln2_w": jnp.ones((L, d), dtype), "ln2_b": jnp.zeros((L, d), dtype),
            "W_in": normal((L, d, dm)), "b_in": jnp.zeros((L, dm), dtype),
            "W_out": normal((L, dm, d), out_std), "b_out": jnp.zeros((L, d), dtype),
        }
    W_E = normal((cfg.d_vocab, d))
    return {
        "W_E": W_E,
        "W_pos": normal((cfg.n_ctx, d), 0.01),
        "blocks": blocks,
        "ln_f_w": jnp.ones((d,), dtype),
        "ln_f_b": jnp.zeros((d,), dtype),
        "W_U": W_E.T if cfg.tie_word_embeddings else normal((d, cfg.d_vocab)),
    }


# ----------------------------------------------------------------------------------------------
# Forward pass


def layer_norm(x: Float[Array, "... d"], w, b, eps: float) -> Float[Array, "... d"]:
    """LayerNorm over the last axis, computed in at least float32 whatever the input dtype."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * w + b


def attention_bias(
    attention_mask: Int[Array, "batch pos"] | None, n_pos: int, batch: int
) -> Array:
    """Boolean keep-mask ``[batch, 1, query_pos, key_pos]``: causal, padded keys dropped."""
    causal = jnp.tril(jnp.ones((n_pos, n_pos), bool))[None, None]
    if attention_mask is None:
        return jnp.broadcast_to(causal, (batch, 1, n_pos, n_pos))
    return causal & (attention_mask[:, None, None, :] > 0)


def qkv(p: dict, cfg: GPT2Config, resid: Float[Array, "batch pos d_model"]
        ) -> tuple[Array, Array, Array]:
    """Queries, keys and values ``[batch, pos, head, d_head]`` of one block (before any hook)."""
    x = layer_norm(resid, p["ln1_w"], p["ln1_b"], cfg.layer_norm_eps)
    return tuple(jnp.einsum("bpd,dhe->bphe", x, p[f"W_{n}"]) + p[f"b_{n}"] for n in "QKV")


def causal_attention(q, k, v, keep: Array, attn_scale: Array, hook: Callable) -> Array:
    """Head outputs z ``[batch, query_pos, head, d_head]`` from q ``[batch, query_pos, head,
    d_head]`` and k, v ``[batch, key_pos, head, d_head]``; `keep` ``[batch, 1, query_pos,
    key_pos]``; `hook(name, x)` passes the scores and pattern through the interventions."""
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k,
                        preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    scores = jnp.where(keep, scores / attn_scale, jnp.finfo(scores.dtype).min)
    scores = hook("attn.hook_attn_scores", scores)
    pattern = hook("attn.hook_pattern", jax.nn.softmax(scores, axis=-1).astype(q.dtype))
    return jnp.einsum("bhqk,bkhe->bqhe", pattern, v)


def block(
    p: dict,
    cfg: GPT2Config,
    resid: Float[Array, "batch pos d_model"],
    keep: Array,
    attn_scale: Array,
    iv: Interventions,
    attend: Callable | None = None,
) -> tuple[Float[Array, "batch pos d_model"], dict[str, Array]]:
    """One transformer block. `p` and `iv` are this layer's slices. Returns (resid_post, acts).

    `attend(q, k, v, hook) -> z` replaces the attention mixing (default: `causal_attention` with
    `keep`), for callers whose rows are not one contiguous sequence (the patching engine packs
    rows of many patched runs; position-wise computation does not care how rows are laid out).
    """
    acts = {}

    def hook(name, x):
        x = site(name, x, iv)
        acts[name] = x
        return x

    resid = hook("hook_resid_pre", resid)
    q, k, v = qkv(p, cfg, resid)
    q, k, v = hook("attn.hook_q", q), hook("attn.hook_k", k), hook("attn.hook_v", v)
    if attend is None:
        z = causal_attention(q, k, v, keep, attn_scale, hook)
    else:
        z = attend(q, k, v, hook)
    z = hook("attn.hook_z", z)
    attn_out = hook("hook_attn_out", jnp.einsum("bqhe,hed->bqd", z, p["W_O"]) + p["b_O"])
    if cfg.attn_only:
        resid = hook("hook_resid_post", resid + attn_out)
        return resid, acts
    resid = hook("hook_resid_mid", resid + attn_out)
    x = layer_norm(resid, p["ln2_w"], p["ln2_b"], cfg.layer_norm_eps)
    pre = hook("mlp.hook_pre", x @ p["W_in"] + p["b_in"])
    post = hook("mlp.hook_post", ACTIVATIONS[cfg.act_fn](pre))
    mlp_out = hook("hook_mlp_out", post @ p["W_out"] + p["b_out"])
    resid = hook("hook_resid_post", resid + mlp_out)
    return resid, acts


def attention_scales(cfg: GPT2Config) -> Float[Array, " n_layers"]:
    """Per-layer divisor of the attention logits: sqrt(d_head), times (layer + 1) if configured."""
    scale = jnp.full((cfg.n_layers,), math.sqrt(cfg.d_head), jnp.float32)
    if cfg.scale_attn_by_inverse_layer_idx:
        scale = scale * jnp.arange(1, cfg.n_layers + 1, dtype=jnp.float32)
    return scale


def forward(
    params: dict,
    cfg: GPT2Config,
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
    - `attention_mask`: optional ``[batch, pos]``, 1 for real tokens, 0 for padding.
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

    embed = global_hook("hook_embed", params["W_E"][tokens])
    pos_embed = jnp.broadcast_to(params["W_pos"][:n_pos], embed.shape)
    pos_embed = global_hook("hook_pos_embed", pos_embed)
    resid = embed + pos_embed
    keep = attention_bias(attention_mask, n_pos, batch)
    keys = block_keys(cfg.attn_only)
    layer_iv = interventions.layer_slice(frozenset(keys))
    wanted = tuple(k for k in keys if k in cache_keys)

    def step(resid, xs):
        p, scale, iv = xs
        resid, acts = block(p, cfg, resid, keep, scale, iv)
        return resid, {k: acts[k] for k in wanted}

    if remat:
        step = jax.checkpoint(step)
    resid, stacked = jax.lax.scan(step, resid, (params["blocks"], attention_scales(cfg), layer_iv))
    cache |= stacked
    if logit_positions is not None:
        resid = resid[jnp.arange(batch), logit_positions]
    normalized = global_hook(
        "ln_final.hook_normalized",
        layer_norm(resid, params["ln_f_w"], params["ln_f_b"], cfg.layer_norm_eps),
    )
    dt = jnp.promote_types(normalized.dtype, jnp.float32)  # float32, or float64 for a float64 model
    logits = normalized.astype(dt) @ params["W_U"].astype(dt)
    return logits, cache
