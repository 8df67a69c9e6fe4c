"""Small random Hugging Face checkpoints of every supported family, and every site read off the
torch model with forward hooks (TransformerLens names), for the family tests.

Each config exercises what makes its family different (see `FAMILIES`); weights are random and
non-trivial (norm weights away from 1, random biases), attention is eager so soft-caps and
windows are really applied by the reference.
"""

from __future__ import annotations

import numpy as np

VOCAB = 61
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
               pad_token_id=None)
_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

# name -> (HF config class, model class, config overrides)
FAMILIES = {
    "gpt_neox-parallel-partial-rotary": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        use_parallel_residual=True, hidden_act="gelu",
        rope_parameters=_ROPE | {"partial_rotary_factor": 0.5})),
    "gpt_neox-sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        use_parallel_residual=False, hidden_act="gelu_new", tie_word_embeddings=True,
        rope_parameters=_ROPE | {"partial_rotary_factor": 0.25})),
    "llama-gqa-llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8})),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(
        num_key_value_heads=2, sliding_window=3, head_dim=8, rope_parameters=_ROPE)),
    "qwen2-biases-window": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=4, max_window_layers=1, rope_parameters=_ROPE)),
    "gemma-mqa": ("GemmaConfig", "GemmaForCausalLM", dict(
        num_key_value_heads=1, head_dim=16, hidden_act="gelu_pytorch_tanh", rope_parameters=_ROPE)),
    "gemma2-softcap-window": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=8, attn_logit_softcapping=1.0, final_logit_softcapping=1.5,
        sliding_window=3, rope_parameters=_ROPE)),
    "qwen3-qknorm-window": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, use_sliding_window=True, sliding_window=3,
        max_window_layers=1, rope_parameters=_ROPE)),
    "gemma3_text-qknorm-local-rope": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=8, sliding_window=3,
        sliding_window_pattern=2,  # layer 0 sliding (local rotary), layer 1 full (global, scaled)
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}})),
    "olmo2-postnorm-qknorm": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        num_key_value_heads=2, attention_bias=True, rope_parameters=_ROPE)),
}


def build_hf(name: str, seed: int = 0):
    """A random-initialised `transformers` model of family `name`, eval mode, eager attention."""
    import torch
    import transformers

    config_cls, model_cls, overrides = FAMILIES[name]
    config = getattr(transformers, config_cls)(**(_COMMON | overrides))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "norm" in pname:  # every norm, the q/k norms included
                base = 0.0 if name.startswith("gemma") else 1.0  # Gemma's norms scale by 1 + w
                p.copy_(base + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def hf_sites(model, tokens, attention_mask=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and every site with a Hugging Face counterpart, in TransformerLens names."""
    import torch

    cfg = model.config
    b, n = tokens.shape
    H = cfg.num_attention_heads
    K = getattr(cfg, "num_key_value_heads", None) or H
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    acts, handles = {}, []

    def out_hook(module, name, fn=lambda x: x):
        def hook(mod, args, out):
            acts[name] = fn(out[0] if isinstance(out, tuple) else out)
        handles.append(module.register_forward_hook(hook))

    def in_hook(module, name, fn=lambda x: x):
        def hook(mod, args, kwargs):
            acts[name] = fn(args[0] if args else kwargs["hidden_states"])
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    heads = lambda h: (lambda x: x.reshape(b, n, h, dh))
    if cfg.model_type == "gpt_neox":
        base = model.gpt_neox
        out_hook(base.embed_in, "hook_embed")
        out_hook(base.final_layer_norm, "ln_final.hook_normalized")
        for i, layer in enumerate(base.layers):
            p = f"blocks.{i}."
            in_hook(layer, p + "hook_resid_pre")
            out_hook(layer, p + "hook_resid_post")
            for j, s in enumerate("qkv"):
                out_hook(layer.attention.query_key_value, p + f"attn.hook_{s}",
                         lambda x, j=j: x.reshape(b, n, H, 3, dh)[:, :, :, j])
            in_hook(layer.attention.dense, p + "attn.hook_z", heads(H))
            out_hook(layer.attention, p + "hook_attn_out")
            if not cfg.use_parallel_residual:
                in_hook(layer.post_attention_layernorm, p + "hook_resid_mid")
            out_hook(layer.mlp.dense_h_to_4h, p + "mlp.hook_pre")
            in_hook(layer.mlp.dense_4h_to_h, p + "mlp.hook_post")
            out_hook(layer.mlp, p + "hook_mlp_out")
    else:
        base = model.model
        sandwich = cfg.model_type in ("gemma2", "gemma3_text")  # pre- and post-norms
        post_only = cfg.model_type == "olmo2"  # post-norms only
        # the q/k norms' outputs as [batch, pos, head, d_head]
        qk_layout = {"qwen3": lambda h: (lambda x: x),
                     "gemma3_text": lambda h: (lambda x: x.transpose(1, 2)),
                     "olmo2": heads}.get(cfg.model_type)
        out_hook(base.embed_tokens, "hook_embed")
        out_hook(base.norm, "ln_final.hook_normalized")
        for i, layer in enumerate(base.layers):
            p, attn, mlp = f"blocks.{i}.", layer.self_attn, layer.mlp
            in_hook(layer, p + "hook_resid_pre")
            out_hook(layer, p + "hook_resid_post")
            out_hook(attn.q_proj, p + "attn.hook_q", heads(H))
            out_hook(attn.k_proj, p + "attn.hook_k", heads(K))
            out_hook(attn.v_proj, p + "attn.hook_v", heads(K))
            in_hook(attn.o_proj, p + "attn.hook_z", heads(H))
            if qk_layout is not None:
                out_hook(attn.q_norm, p + "attn.q_norm.hook_normalized", qk_layout(H))
                out_hook(attn.k_norm, p + "attn.k_norm.hook_normalized", qk_layout(K))
            if sandwich:
                out_hook(layer.post_attention_layernorm, p + "hook_attn_out")
                in_hook(layer.pre_feedforward_layernorm, p + "hook_resid_mid")
                out_hook(layer.post_feedforward_layernorm, p + "hook_mlp_out")
            elif post_only:
                out_hook(layer.post_attention_layernorm, p + "hook_attn_out")
                in_hook(mlp, p + "hook_resid_mid")
                out_hook(layer.post_feedforward_layernorm, p + "hook_mlp_out")
            else:
                out_hook(attn, p + "hook_attn_out")
                in_hook(layer.post_attention_layernorm, p + "hook_resid_mid")
                out_hook(mlp, p + "hook_mlp_out")
            out_hook(mlp.gate_proj, p + "mlp.hook_pre")
            out_hook(mlp.up_proj, p + "mlp.hook_pre_linear")
            in_hook(mlp.down_proj, p + "mlp.hook_post")
    try:
        with torch.no_grad():
            out = model(torch.tensor(tokens),
                        attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
                        output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    result = {k: v.detach().numpy() for k, v in acts.items()}
    for i, pattern in enumerate(out.attentions):
        result[f"blocks.{i}.attn.hook_pattern"] = pattern.numpy()
    return out.logits.numpy(), result
