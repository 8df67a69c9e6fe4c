"""GPT-NeoX / Pythia (``model_type: gpt_neox``): Hugging Face config and tensors in and out.

HF layout: ``gpt_neox.embed_in``, per layer ``gpt_neox.layers.{i}.{input_layernorm,
post_attention_layernorm, attention.query_key_value, attention.dense, mlp.dense_h_to_4h,
mlp.dense_4h_to_h}``, ``gpt_neox.final_layer_norm``, untied ``embed_out``. The fused
``query_key_value`` output is interleaved per head: ``[head, (q, k, v), d_head]``.
"""

from __future__ import annotations

import numpy as np

from attrpatch.arch.config import ACTIVATIONS, ModelConfig
from attrpatch.arch.convert import HFConfig, Tensors, read_rope, to_numpy, to_params, write_rope

# Buffers older checkpoints store (causal-mask constants, rotary frequencies).
_IGNORED_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


def config_from_hf(raw: dict) -> ModelConfig:
    c = HFConfig(raw, "GPT-NeoX", "gpt_neox")
    d_model, n_heads = c.int("hidden_size"), c.int("num_attention_heads")
    act = c.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        c.refuse("hidden_act", f"supported: {', '.join(ACTIVATIONS)}")
    n_ctx = c.int("max_position_embeddings")
    rope = read_rope(c, n_ctx)
    head_dim = d_model // n_heads
    bias = c.bool("attention_bias", True)
    cfg = ModelConfig(
        architecture="gpt_neox", n_layers=c.int("num_hidden_layers"), d_model=d_model,
        n_heads=n_heads, d_mlp=c.int("intermediate_size"), n_ctx=n_ctx,
        d_vocab=c.int("vocab_size"), norm_eps=c.float("layer_norm_eps", 1e-5, positive=True),
        positions="rotary", rotary_dim=int(head_dim * rope.pop("partial_rotary_factor")), **rope,
        parallel_attn_mlp=c.bool("use_parallel_residual", True), act_fn=act,
        qkv_bias=bias, attn_out_bias=bias, mlp_bias=True,
        tie_word_embeddings=c.bool("tie_word_embeddings", False),
    )
    c.finish()
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"],
        "num_hidden_layers": cfg.n_layers, "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_mlp,
        "max_position_embeddings": cfg.n_ctx, "vocab_size": cfg.d_vocab,
        "layer_norm_eps": cfg.norm_eps, "hidden_act": cfg.act_fn,
        "use_parallel_residual": cfg.parallel_attn_mlp, "attention_bias": cfg.qkv_bias,
        "rope_parameters": write_rope(cfg) | {"partial_rotary_factor": cfg.rotary_width / cfg.d_head},
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, dtype) -> dict:
    t = Tensors(tensors, "GPT-NeoX", _IGNORED_SUFFIXES)
    L, d, H, dh, dm = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    stack = lambda suffix, shape: t.stack("gpt_neox.layers.{}." + suffix, L, shape)
    qkv = stack("attention.query_key_value.weight", (3 * d, d)).reshape(L, H, 3, dh, d)
    W_Q, W_K, W_V = (np.moveaxis(qkv[:, :, j], -1, 1) for j in range(3))  # [L, d, H, dh]
    blocks = {
        "ln1_w": stack("input_layernorm.weight", (d,)), "ln1_b": stack("input_layernorm.bias", (d,)),
        "W_Q": W_Q, "W_K": W_K, "W_V": W_V,
        "W_O": stack("attention.dense.weight", (d, d)).reshape(L, d, H, dh).transpose(0, 2, 3, 1),
        "ln2_w": stack("post_attention_layernorm.weight", (d,)),
        "ln2_b": stack("post_attention_layernorm.bias", (d,)),
        "W_in": stack("mlp.dense_h_to_4h.weight", (dm, d)).transpose(0, 2, 1),
        "b_in": stack("mlp.dense_h_to_4h.bias", (dm,)),
        "W_out": stack("mlp.dense_4h_to_h.weight", (d, dm)).transpose(0, 2, 1),
        "b_out": stack("mlp.dense_4h_to_h.bias", (d,)),
    }
    if cfg.qkv_bias:
        qkv_b = stack("attention.query_key_value.bias", (3 * d,)).reshape(L, H, 3, dh)
        blocks |= {"b_Q": qkv_b[:, :, 0], "b_K": qkv_b[:, :, 1], "b_V": qkv_b[:, :, 2],
                   "b_O": stack("attention.dense.bias", (d,))}
    W_E = t.take("gpt_neox.embed_in.weight", (cfg.d_vocab, d))
    params = {"W_E": W_E, "blocks": blocks,
              "ln_f_w": t.take("gpt_neox.final_layer_norm.weight", (d,)),
              "ln_f_b": t.take("gpt_neox.final_layer_norm.bias", (d,))}
    params["W_U"] = t.unembedding(W_E, "embed_out.weight", cfg)
    t.finish()
    return to_params(params, dtype)


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    p = to_numpy(params)
    b, d = p["blocks"], cfg.d_model
    out = {"gpt_neox.embed_in.weight": p["W_E"], "gpt_neox.final_layer_norm.weight": p["ln_f_w"],
           "gpt_neox.final_layer_norm.bias": p["ln_f_b"]}
    if not cfg.tie_word_embeddings:
        out["embed_out.weight"] = p["W_U"].T
    for i in range(cfg.n_layers):
        h = f"gpt_neox.layers.{i}."
        qkv = np.stack([np.moveaxis(b[k][i], 0, -1) for k in ("W_Q", "W_K", "W_V")], 1)  # [H, 3, dh, d]
        out |= {
            h + "input_layernorm.weight": b["ln1_w"][i], h + "input_layernorm.bias": b["ln1_b"][i],
            h + "attention.query_key_value.weight": qkv.reshape(3 * d, d),
            h + "attention.dense.weight": b["W_O"][i].reshape(d, d).T,
            h + "post_attention_layernorm.weight": b["ln2_w"][i],
            h + "post_attention_layernorm.bias": b["ln2_b"][i],
            h + "mlp.dense_h_to_4h.weight": b["W_in"][i].T, h + "mlp.dense_h_to_4h.bias": b["b_in"][i],
            h + "mlp.dense_4h_to_h.weight": b["W_out"][i].T, h + "mlp.dense_4h_to_h.bias": b["b_out"][i],
        }
        if cfg.qkv_bias:
            qkv_b = np.stack([b[k][i] for k in ("b_Q", "b_K", "b_V")], 1)  # [H, 3, dh]
            out |= {h + "attention.query_key_value.bias": qkv_b.reshape(3 * d),
                    h + "attention.dense.bias": b["b_O"][i]}
    return out
