"""The Llama family (``model_type: llama``, ``mistral``, ``qwen2``, ``qwen3``, ``olmo2``) and Gemma
(``gemma``, ``gemma2``, ``gemma3_text``): Hugging Face config and tensors in and out.

HF layout: ``model.embed_tokens``, per layer ``model.layers.{i}.{input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``model.norm``,
``lm_head`` when untied. Gemma 2 adds ``pre_feedforward_layernorm`` and
``post_feedforward_layernorm``, and its ``post_attention_layernorm`` is the post-norm of the
attention output; Gemma 3 too. OLMo 2 has no ``input_layernorm``: its
``post_attention_layernorm`` and ``post_feedforward_layernorm`` are post-norms. Qwen3, Gemma 3
and OLMo 2 add ``self_attn.{q,k}_norm`` (OLMo 2's over the whole projection). Gemma's RMSNorm
multiplies by ``1 + w`` and its embeddings by ``sqrt(d_model)``: both are folded into our weights
at load and unfolded on save.
"""

from __future__ import annotations

import math

import numpy as np

from attrpatch.arch.config import ACTIVATIONS, ModelConfig
from attrpatch.arch.convert import (
    HFConfig,
    Tensors,
    heads_in,
    heads_out,
    read_rope,
    read_windows,
    to_numpy,
    to_params,
    write_rope,
    write_windows,
)

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
            "olmo2": "OLMo 2", "gemma": "Gemma", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3"}
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
               "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
               "gemma3_text": "Gemma3ForCausalLM"}
# q/k norms (`ModelConfig.qk_norm`) by family
_QK_NORMS = {"qwen3": "head", "gemma3_text": "head", "olmo2": "projection"}
_LAYER_TYPES = ("full_attention", "sliding_attention")
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# (the field the MLP activation is read from, the other name transformers ignores), where not
# ("hidden_act", "hidden_activation")
_ACTIVATION_KEYS = {"gemma2": ("hidden_activation", "hidden_act"),
                    "gemma3_text": ("hidden_activation", "hidden_act")}


def _is_gemma(model_type: str) -> bool:
    return model_type.startswith("gemma")


def config_from_hf(raw: dict) -> ModelConfig:
    model_type = raw.get("model_type")
    c = HFConfig(raw, FAMILIES[model_type], model_type)
    d_model, n_heads = c.int("hidden_size"), c.int("num_attention_heads")
    n_layers = c.int("num_hidden_layers")
    n_kv = c.int("num_key_value_heads", n_heads)
    if n_heads % n_kv:
        raise ValueError(f"num_attention_heads={n_heads} is not a multiple of "
                         f"num_key_value_heads={n_kv}")
    head_dim = c.int("head_dim", d_model // n_heads)
    # Gemma 2 and 3 read the MLP activation from `hidden_activation`, the others from `hidden_act`;
    # transformers ignores the other name (Gemma 2 configs carry both)
    act_key, unused_key = _ACTIVATION_KEYS.get(model_type, ("hidden_act", "hidden_activation"))
    act = c.get(act_key, "silu")
    c.get(unused_key)
    if act not in ACTIVATIONS:
        c.refuse(act_key, f"supported: {', '.join(ACTIVATIONS)}")
    n_ctx = c.int("max_position_embeddings")
    rope = _gemma3_rope(c, n_ctx) if model_type == "gemma3_text" else read_rope(c, n_ctx)
    rotary_dim = int(head_dim * rope.pop("partial_rotary_factor"))
    fields = {}
    if model_type in ("qwen2", "qwen3"):
        use_window = c.bool("use_sliding_window", False)
        window = c.int("sliding_window", required=False)  # checked even when unused: Qwen2 configs keep it
        first = c.int("max_window_layers", n_layers, minimum=0)
        default = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        fields["windows"] = read_windows(c, n_layers, window if use_window else None, default)
        fields |= dict(qkv_bias=True, attn_out_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        every = ["sliding_attention"] * n_layers
        fields["windows"] = read_windows(c, n_layers, c.int("sliding_window", required=False), every)
        fields |= dict(qkv_bias=False, attn_out_bias=False, mlp_bias=False)
    elif model_type in ("gemma2", "gemma3_text"):
        every = c.int("sliding_window_pattern") if model_type == "gemma3_text" else 2
        default = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)]
        fields["windows"] = read_windows(c, n_layers, c.int("sliding_window", required=False), default)
        fields |= dict(attn_scale=math.sqrt(c.float("query_pre_attn_scalar", head_dim, positive=True)),
                       attn_softcap=c.float("attn_logit_softcapping", positive=True, required=False),
                       final_softcap=c.float("final_logit_softcapping", positive=True, required=False),
                       post_norms=True)
    if model_type in ("llama", "gemma", "gemma2"):
        bias = c.bool("attention_bias", False)
        mlp_bias = c.bool("mlp_bias", False)
        if mlp_bias and model_type != "llama":  # transformers' Gemma MLPs never have biases
            c.refuse("mlp_bias", "Gemma's MLP has no biases")
        fields |= dict(qkv_bias=bias, attn_out_bias=bias, mlp_bias=mlp_bias)
    if model_type in _QK_NORMS:  # `attention_bias` on q, k, v and o; MLPs without biases
        bias = c.bool("attention_bias", False)
        fields |= dict(qkv_bias=bias, attn_out_bias=bias, mlp_bias=False, qk_norm=_QK_NORMS[model_type])
    if model_type == "gemma3_text":  # sliding-window layers rotate with their own base
        local_theta = rope.pop("rope_local_theta")
        types = c.get("layer_types", default)
        if fields["windows"] is None and isinstance(types, list) and "sliding_attention" in types:
            c.refuse("sliding_window", "Gemma 3's sliding_attention layers need a window")
        fields["rope_local_theta"] = None if fields["windows"] is None else local_theta
    if model_type == "olmo2":
        fields |= dict(pre_norms=False, post_norms=True)
    cfg = ModelConfig(
        architecture=model_type, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, d_mlp=c.int("intermediate_size"),
        n_ctx=n_ctx, d_vocab=c.int("vocab_size"), norm="rmsnorm",
        norm_eps=c.float("rms_norm_eps", 1e-6, positive=True), positions="rotary", rotary_dim=rotary_dim,
        **rope, gated_mlp=True, act_fn=act,
        tie_word_embeddings=c.bool("tie_word_embeddings", _is_gemma(model_type)), **fields,
    )
    c.finish()
    return cfg


def _gemma3_rope(c: HFConfig, n_ctx: int) -> dict:
    """Gemma 3's rotary settings, as `read_rope` returns them plus ``rope_local_theta``: one
    ``rope_parameters`` object per layer type (``full_attention``: base and scaling;
    ``sliding_attention``: the base of sliding-window layers, which rotate unscaled), or the older
    ``rope_theta`` + ``rope_scaling`` (full attention) and ``rope_local_base_freq``."""
    per_type = c.get("rope_parameters", {})
    if (not isinstance(per_type, dict) or set(per_type) - set(_LAYER_TYPES)
            or not all(isinstance(v, dict) for v in per_type.values())):
        c.refuse("rope_parameters", "Gemma 3 gives one object per layer type, "
                 "{'full_attention': {...}, 'sliding_attention': {...}}")
    scaling = c.get("rope_scaling", {})
    if not isinstance(scaling, dict):
        c.refuse("rope_scaling", "expected an object")

    def read(params: dict, theta: float) -> dict:  # `theta`: the base where `params` has none
        return read_rope(HFConfig({"rope_parameters": params, "rope_theta": theta}, c.family, ""), n_ctx)

    full = read(per_type.get("full_attention", {}) | scaling, c.float("rope_theta", positive=True))
    local = read(per_type.get("sliding_attention", {}), c.float("rope_local_base_freq", positive=True))
    if local["rope_type"] != "default":
        c.refuse("rope_parameters", f"sliding_attention rope_type {local['rope_type']!r} is not "
                 "implemented (sliding-window layers rotate unscaled)")
    if full["partial_rotary_factor"] != 1 or local["partial_rotary_factor"] != 1:
        c.refuse("rope_parameters", "partial_rotary_factor is not implemented for Gemma 3")
    return full | {"rope_local_theta": local["rope_theta"]}


def _gemma3_rope_out(cfg: ModelConfig) -> dict:
    """``rope_parameters`` per layer type for a Gemma 3 config.json."""
    if cfg.rope_local_theta is None and cfg.windows is not None and cfg.rope_type != "default":
        raise ValueError("Gemma 3 configs rotate sliding-window layers unscaled; this model scales "
                         "them (set rope_local_theta)")
    local = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
    return {"full_attention": write_rope(cfg),
            "sliding_attention": {"rope_type": "default", "rope_theta": local}}


def config_to_hf(cfg: ModelConfig) -> dict:
    mt = cfg.architecture
    fixed = {"qk_norm": _QK_NORMS.get(mt), "pre_norms": mt != "olmo2",
             "post_norms": mt in ("gemma2", "gemma3_text", "olmo2")}  # what each family has
    wrong = [f"{k}={getattr(cfg, k)!r}" for k, v in fixed.items() if getattr(cfg, k) != v]
    if cfg.rope_local_theta is not None and mt != "gemma3_text":
        wrong.append(f"rope_local_theta={cfg.rope_local_theta!r}")
    if wrong:
        raise ValueError(f"a {FAMILIES[mt]} config.json cannot express {', '.join(wrong)}")
    out = {
        "model_type": mt, "architectures": [_HF_CLASSES[mt]],
        "num_hidden_layers": cfg.n_layers, "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.d_head, "intermediate_size": cfg.d_mlp,
        "max_position_embeddings": cfg.n_ctx, "vocab_size": cfg.d_vocab,
        "rms_norm_eps": cfg.norm_eps, "rope_parameters": write_rope(cfg),
        "hidden_activation" if mt in ("gemma2", "gemma3_text") else "hidden_act": cfg.act_fn,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    if mt in ("llama", "gemma", "gemma2", *_QK_NORMS):
        out["attention_bias"] = cfg.qkv_bias
    if mt == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if mt in ("mistral", "gemma2", "gemma3_text"):
        out |= write_windows(cfg)
    if mt == "mistral" and cfg.windows is not None and None not in cfg.windows:
        del out["layer_types"]  # one window on every layer: Mistral's own form (with layer_types
        # transformers reads the config as Ministral's, and says so)
    if mt in ("qwen2", "qwen3"):
        out |= write_windows(cfg) | {"use_sliding_window": cfg.windows is not None}
    if mt == "gemma3_text":
        out["rope_parameters"] = _gemma3_rope_out(cfg)
        if cfg.windows is None:  # every layer full; transformers still needs a (then unused) window
            out |= {"layer_types": ["full_attention"] * cfg.n_layers, "sliding_window": cfg.n_ctx}
    if mt in ("gemma2", "gemma3_text"):
        out |= {"query_pre_attn_scalar": _integral(cfg.attn_scale ** 2),
                "attn_logit_softcapping": cfg.attn_softcap,
                "final_logit_softcapping": cfg.final_softcap}
    return out


def _integral(x: float) -> int | float:
    """`x` as an int when it is one up to rounding (HF's config classes insist on ints)."""
    return int(round(x)) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else x


def _norm_in(w: np.ndarray, gemma: bool) -> np.ndarray:
    return w.astype(np.float32) + 1 if gemma else w


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, dtype) -> dict:
    gemma = _is_gemma(cfg.architecture)
    t = Tensors(tensors, FAMILIES[cfg.architecture], _IGNORED_SUFFIXES)
    L, d, H, K, dh, dm = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.d_mlp
    stack = lambda suffix, shape: t.stack("model.layers.{}." + suffix, L, shape)
    norm = lambda suffix: _norm_in(stack(suffix + ".weight", (d,)), gemma)
    attn = "self_attn.{}_proj."
    blocks = {
        "W_Q": heads_in(stack(attn.format("q") + "weight", (H * dh, d)), H),
        "W_K": heads_in(stack(attn.format("k") + "weight", (K * dh, d)), K),
        "W_V": heads_in(stack(attn.format("v") + "weight", (K * dh, d)), K),
        "W_O": stack(attn.format("o") + "weight", (d, H * dh)).reshape(L, d, H, dh).transpose(0, 2, 3, 1),
        "W_gate": stack("mlp.gate_proj.weight", (dm, d)).transpose(0, 2, 1),
        "W_in": stack("mlp.up_proj.weight", (dm, d)).transpose(0, 2, 1),
        "W_out": stack("mlp.down_proj.weight", (d, dm)).transpose(0, 2, 1),
    }
    if cfg.pre_norms:
        blocks["ln1_w"] = norm("input_layernorm")
    if cfg.post_norms:
        blocks |= {"ln1_post_w": norm("post_attention_layernorm"),
                   "ln2_post_w": norm("post_feedforward_layernorm")}
        if cfg.pre_norms:
            blocks["ln2_w"] = norm("pre_feedforward_layernorm")
    else:
        blocks["ln2_w"] = norm("post_attention_layernorm")
    if cfg.qk_norm is not None:  # [d_head] per layer, or [heads * d_head] (whole projection)
        for n, h in (("q", H), ("k", K)):
            shape = (dh,) if cfg.qk_norm == "head" else (h, dh)
            w = stack(f"self_attn.{n}_norm.weight", (math.prod(shape),)).reshape(L, *shape)
            blocks[f"{n}_norm_w"] = _norm_in(w, gemma)
    if cfg.qkv_bias:
        blocks |= {f"b_{n}": stack(attn.format(n.lower()) + "bias", (h * dh,)).reshape(L, h, dh)
                   for n, h in (("Q", H), ("K", K), ("V", K))}
    if cfg.attn_out_bias:
        blocks["b_O"] = stack(attn.format("o") + "bias", (d,))
    if cfg.mlp_bias:
        blocks |= {"b_gate": stack("mlp.gate_proj.bias", (dm,)), "b_in": stack("mlp.up_proj.bias", (dm,)),
                   "b_out": stack("mlp.down_proj.bias", (d,))}
    embed = t.take("model.embed_tokens.weight", (cfg.d_vocab, d))
    W_U = t.unembedding(embed, "lm_head.weight", cfg)
    if gemma:  # HF multiplies by sqrt(d_model) rounded to the weights' dtype
        embed = embed * np.asarray(math.sqrt(d), embed.dtype)
    params = {"W_E": embed, "blocks": blocks, "ln_f_w": _norm_in(t.take("model.norm.weight", (d,)), gemma),
              "W_U": W_U}
    t.finish()
    return to_params(params, dtype)


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    gemma = _is_gemma(cfg.architecture)
    p = to_numpy(params)
    b, d = p["blocks"], cfg.d_model
    norm = (lambda w: w - 1) if gemma else (lambda w: w)
    embed = p["W_U"].T if cfg.tie_word_embeddings else (
        p["W_E"] / np.float32(math.sqrt(d)) if gemma else p["W_E"])
    out = {"model.embed_tokens.weight": embed, "model.norm.weight": norm(p["ln_f_w"])}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = p["W_U"].T
    for i in range(cfg.n_layers):
        h = f"model.layers.{i}."
        a = h + "self_attn."
        out |= {
            a + "q_proj.weight": heads_out(b["W_Q"][i]), a + "k_proj.weight": heads_out(b["W_K"][i]),
            a + "v_proj.weight": heads_out(b["W_V"][i]),
            a + "o_proj.weight": b["W_O"][i].reshape(-1, d).T,
            h + "mlp.gate_proj.weight": b["W_gate"][i].T, h + "mlp.up_proj.weight": b["W_in"][i].T,
            h + "mlp.down_proj.weight": b["W_out"][i].T,
        }
        if cfg.pre_norms:
            out[h + "input_layernorm.weight"] = norm(b["ln1_w"][i])
        if cfg.post_norms:
            out |= {h + "post_attention_layernorm.weight": norm(b["ln1_post_w"][i]),
                    h + "post_feedforward_layernorm.weight": norm(b["ln2_post_w"][i])}
            if cfg.pre_norms:
                out[h + "pre_feedforward_layernorm.weight"] = norm(b["ln2_w"][i])
        else:
            out[h + "post_attention_layernorm.weight"] = norm(b["ln2_w"][i])
        if cfg.qk_norm is not None:
            out |= {a + f"{n}_norm.weight": norm(b[f"{n}_norm_w"][i]).reshape(-1) for n in "qk"}
        if cfg.qkv_bias:
            out |= {a + f"{n.lower()}_proj.bias": b[f"b_{n}"][i].reshape(-1) for n in "QKV"}
        if cfg.attn_out_bias:
            out[a + "o_proj.bias"] = b["b_O"][i]
        if cfg.mlp_bias:
            out |= {h + "mlp.gate_proj.bias": b["b_gate"][i], h + "mlp.up_proj.bias": b["b_in"][i],
                    h + "mlp.down_proj.bias": b["b_out"][i]}
    return out
