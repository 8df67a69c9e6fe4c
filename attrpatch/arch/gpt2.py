"""GPT-2 (``model_type: gpt2``): Hugging Face config and tensors in and out.

HF layout: ``transformer.{wte,wpe,ln_f}``, per block ``transformer.h.{i}.{ln_1, attn.c_attn,
attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}`` as Conv1D (``[in, out]``) weights; the hub's older
checkpoints omit the ``transformer.`` prefix. ``lm_head.weight`` only when untied.
"""

from __future__ import annotations

import numpy as np

from attrpatch.arch.config import ACTIVATIONS, ModelConfig
from attrpatch.arch.convert import HFConfig, Tensors, to_numpy, to_params

# Buffers some GPT-2 checkpoints store that are not parameters (causal-mask constants).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


# GPT2Config's `attribute_map`: the generic names some tools write instead of GPT-2's own.
_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
            "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}


def config_from_hf(raw: dict) -> ModelConfig:
    c = HFConfig(raw, "GPT-2", "gpt2", aliases=_ALIASES)
    d_model, n_heads = c.int("n_embd"), c.int("n_head")
    act = c.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        c.refuse("activation_function", f"supported: {', '.join(ACTIVATIONS)}")
    if not c.bool("scale_attn_weights", True):
        c.refuse("scale_attn_weights", "unscaled attention logits are not implemented")
    c.get("n_ctx")  # GPT-1's name for the context; transformers ignores it and so do we (n_positions counts)
    c.bool("reorder_and_upcast_attn", False)  # a numerical-precision option: we compute logits in float32
    cfg = ModelConfig(
        architecture="gpt2",
        n_layers=c.int("n_layer"), d_model=d_model, n_heads=n_heads,
        d_mlp=c.int("n_inner", 4 * d_model), n_ctx=c.int("n_positions", 1024),
        d_vocab=c.int("vocab_size"), norm_eps=c.float("layer_norm_epsilon", 1e-5, positive=True), act_fn=act,
        tie_word_embeddings=c.bool("tie_word_embeddings", True),
        scale_attn_by_inverse_layer_idx=c.bool("scale_attn_by_inverse_layer_idx", False),
        attn_only=c.bool("attrpatch_attn_only", False),
    )
    c.finish()
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict:
    out = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "n_layer": cfg.n_layers, "n_embd": cfg.d_model, "n_head": cfg.n_heads, "n_inner": cfg.d_mlp,
        "n_positions": cfg.n_ctx, "vocab_size": cfg.d_vocab, "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": cfg.act_fn, "tie_word_embeddings": cfg.tie_word_embeddings,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
    }
    if cfg.attn_only:
        out["attrpatch_attn_only"] = True
    return out


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, dtype) -> dict:
    """Our stacked params from HF GPT-2 tensors (either key layout)."""
    t = Tensors({k.removeprefix("transformer."): v for k, v in tensors.items()}, "GPT-2",
                _IGNORED_SUFFIXES)
    L, d, H, dh, dm = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    stack = lambda suffix, shape: t.stack("h.{}." + suffix, L, shape)
    c_attn_w = stack("attn.c_attn.weight", (d, 3 * d))  # [L, d, 3d]
    c_attn_b = stack("attn.c_attn.bias", (3 * d,))
    W_Q, W_K, W_V = (w.reshape(L, d, H, dh) for w in np.split(c_attn_w, 3, axis=-1))
    b_Q, b_K, b_V = (b.reshape(L, H, dh) for b in np.split(c_attn_b, 3, axis=-1))
    blocks = {
        "ln1_w": stack("ln_1.weight", (d,)), "ln1_b": stack("ln_1.bias", (d,)),
        "W_Q": W_Q, "W_K": W_K, "W_V": W_V, "b_Q": b_Q, "b_K": b_K, "b_V": b_V,
        "W_O": stack("attn.c_proj.weight", (d, d)).reshape(L, H, dh, d),
        "b_O": stack("attn.c_proj.bias", (d,)),
    }
    if not cfg.attn_only:
        blocks |= {
            "ln2_w": stack("ln_2.weight", (d,)), "ln2_b": stack("ln_2.bias", (d,)),
            "W_in": stack("mlp.c_fc.weight", (d, dm)), "b_in": stack("mlp.c_fc.bias", (dm,)),
            "W_out": stack("mlp.c_proj.weight", (dm, d)), "b_out": stack("mlp.c_proj.bias", (d,)),
        }
    W_E = t.take("wte.weight", (cfg.d_vocab, d))
    params = {"W_E": W_E, "W_pos": t.take("wpe.weight", (cfg.n_ctx, d)), "blocks": blocks,
              "ln_f_w": t.take("ln_f.weight", (d,)), "ln_f_b": t.take("ln_f.bias", (d,))}
    params["W_U"] = t.unembedding(W_E, "lm_head.weight", cfg)
    t.finish()
    return to_params(params, dtype)


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our params as HF `save_pretrained` tensors (prefix ``transformer.``)."""
    p = to_numpy(params)
    b, d = p["blocks"], cfg.d_model
    out = {"transformer.wte.weight": p["W_E"], "transformer.wpe.weight": p["W_pos"],
           "transformer.ln_f.weight": p["ln_f_w"], "transformer.ln_f.bias": p["ln_f_b"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = p["W_U"].T
    for i in range(cfg.n_layers):
        h = f"transformer.h.{i}."
        out |= {
            h + "ln_1.weight": b["ln1_w"][i], h + "ln_1.bias": b["ln1_b"][i],
            h + "attn.c_attn.weight": np.concatenate([b[k][i].reshape(d, d) for k in ("W_Q", "W_K", "W_V")],
                                                     -1),
            h + "attn.c_attn.bias": np.concatenate([b[k][i].reshape(d) for k in ("b_Q", "b_K", "b_V")], -1),
            h + "attn.c_proj.weight": b["W_O"][i].reshape(d, d), h + "attn.c_proj.bias": b["b_O"][i],
        }
        if not cfg.attn_only:
            out |= {
                h + "ln_2.weight": b["ln2_w"][i], h + "ln_2.bias": b["ln2_b"][i],
                h + "mlp.c_fc.weight": b["W_in"][i], h + "mlp.c_fc.bias": b["b_in"][i],
                h + "mlp.c_proj.weight": b["W_out"][i], h + "mlp.c_proj.bias": b["b_out"][i],
            }
    return out
