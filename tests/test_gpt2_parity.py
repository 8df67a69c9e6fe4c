"""GPT-2 against Hugging Face `transformers` (PyTorch): logits and every cached site.

Models are random-initialised in torch, saved with `save_pretrained`, and loaded through
`attrpatch.load_model` (the real path).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from attrpatch import load_model
from attrpatch.model import _forward

ATOL = 1e-4


def torch_sites(model, tokens, attention_mask=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every site, read from the torch model with forward hooks, in TransformerLens names."""
    cfg = model.config
    H, dh = cfg.n_head, cfg.n_embd // cfg.n_head
    b, n = tokens.shape
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def heads(x):
        return x.reshape(b, n, H, dh)

    def on_output(name, fn=lambda out: out[0] if isinstance(out, tuple) else out):
        return lambda mod, args, out: acts.__setitem__(name, fn(out))

    def on_input(name, fn=lambda x: x):
        return lambda mod, args, kwargs: acts.__setitem__(
            name, fn(args[0] if args else next(iter(kwargs.values())))
        )

    tr = model.transformer
    handles.append(tr.wte.register_forward_hook(on_output("hook_embed")))
    handles.append(tr.wpe.register_forward_hook(on_output("hook_pos_embed")))
    handles.append(tr.ln_f.register_forward_hook(on_output("ln_final.hook_normalized")))
    for layer, blk in enumerate(tr.h):
        p = f"blocks.{layer}."
        handles.append(blk.register_forward_pre_hook(on_input(p + "hook_resid_pre"), with_kwargs=True))
        for i, name in enumerate("qkv"):
            handles.append(blk.attn.c_attn.register_forward_hook(on_output(
                p + f"attn.hook_{name}",
                lambda out, i=i: heads(out.split(cfg.n_embd, dim=-1)[i]),
            )))
        handles.append(blk.attn.c_proj.register_forward_pre_hook(
            on_input(p + "attn.hook_z", heads), with_kwargs=True))
        handles.append(blk.attn.register_forward_hook(on_output(p + "hook_attn_out")))
        handles.append(blk.ln_2.register_forward_pre_hook(
            on_input(p + "hook_resid_mid"), with_kwargs=True))
        handles.append(blk.mlp.c_fc.register_forward_hook(on_output(p + "mlp.hook_pre")))
        handles.append(blk.mlp.c_proj.register_forward_pre_hook(
            on_input(p + "mlp.hook_post"), with_kwargs=True))
        handles.append(blk.mlp.register_forward_hook(on_output(p + "hook_mlp_out")))
        handles.append(blk.register_forward_hook(on_output(p + "hook_resid_post")))
    try:
        with torch.no_grad():
            out = model(
                torch.tensor(tokens),
                attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
                output_attentions=True,
            )
    finally:
        for h in handles:
            h.remove()
    result = {k: v.detach().numpy() for k, v in acts.items()}
    # TransformerLens (and we) give the position embedding a batch axis.
    result["hook_pos_embed"] = np.broadcast_to(result["hook_pos_embed"], (b, n, cfg.n_embd))
    for layer, pattern in enumerate(out.attentions):
        result[f"blocks.{layer}.attn.hook_pattern"] = pattern.numpy()
        q = result[f"blocks.{layer}.attn.hook_q"]
        k = result[f"blocks.{layer}.attn.hook_k"]
        scale = np.sqrt(dh) * ((layer + 1) if cfg.scale_attn_by_inverse_layer_idx else 1)
        result[f"blocks.{layer}.attn.hook_attn_scores"] = np.einsum("bqhe,bkhe->bhqk", q, k) / scale
    return out.logits.numpy(), result


def assert_cache_matches(cache, ref, attention_mask=None):
    """Every site of `ref` in `cache`, to ATOL; masked attention entries and padding skipped."""
    assert set(ref) == set(cache), set(ref) ^ set(cache)
    for name, expected in ref.items():
        got = np.asarray(cache[name])
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        if name.endswith(("hook_attn_scores", "hook_pattern")):
            n = got.shape[-1]
            keep = np.tril(np.ones((n, n), bool))[None, None]
            if attention_mask is not None:
                keep = keep & attention_mask.astype(bool)[:, None, None, :]
                keep = keep & attention_mask.astype(bool)[:, None, :, None]
            keep = np.broadcast_to(keep, got.shape)
            got, expected = got[keep], expected[keep]
        elif attention_mask is not None:
            real = attention_mask.astype(bool)
            got, expected = got[real], expected[real]
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=name)


CONFIGS = {
    "default": {},
    "untied-n_inner-eps": dict(tie_word_embeddings=False, n_inner=48, layer_norm_epsilon=1e-3),
    "three-layers-long-ctx": dict(n_layer=3, n_positions=40, n_head=2, activation_function="gelu"),
    "scale-by-layer-relu": dict(scale_attn_by_inverse_layer_idx=True, activation_function="relu"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_every_site_match_transformers(hf_checkpoint, name):
    path, torch_model = hf_checkpoint(seed=3, attn_implementation="eager", **CONFIGS[name])
    model = load_model(path)
    tokens = np.random.default_rng(0).integers(0, 61, size=(3, 12))
    ref_logits, ref = torch_sites(torch_model, tokens)
    logits, cache = model.run_with_cache(tokens)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=ATOL, rtol=0)
    assert_cache_matches(cache, ref)


def test_padded_batch_matches_transformers(hf_checkpoint):
    path, torch_model = hf_checkpoint(seed=4, attn_implementation="eager")
    model = load_model(path)
    tokens = np.random.default_rng(1).integers(0, 61, size=(3, 10))
    mask = np.ones_like(tokens)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    ref_logits, ref = torch_sites(torch_model, tokens, mask)
    logits, cache = model.run_with_cache(tokens, attention_mask=mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], ref_logits[real], atol=ATOL, rtol=0)
    assert_cache_matches(cache, ref, mask)


def test_subset_of_names_is_all_that_is_cached(tiny_model):
    model, _ = tiny_model
    tokens = np.arange(8).reshape(1, 8)
    names = ["blocks.1.attn.hook_z", "hook_embed", "blocks.0.hook_resid_post"]
    logits, cache = model.run_with_cache(tokens, names=names)
    assert list(cache) == names
    _, full = model.run_with_cache(tokens)
    for n in names:
        np.testing.assert_array_equal(np.asarray(cache[n]), np.asarray(full[n]))


def test_repeat_call_does_not_recompile(tiny_model):
    model, _ = tiny_model
    tokens = np.arange(10).reshape(2, 5)
    model(tokens)
    size = _forward._cache_size()
    model(tokens + 1)
    model.run_with_cache(tokens + 2, names=["blocks.0.hook_resid_pre"])
    after_first = _forward._cache_size()
    model.run_with_cache(tokens + 3, names=["blocks.1.hook_resid_pre"])
    assert _forward._cache_size() == after_first == size + 1


def test_bfloat16_checkpoint_loads(hf_checkpoint, tmp_path):
    path, torch_model = hf_checkpoint(seed=5)
    bf16 = tmp_path / "bf16"
    torch_model.to(torch.bfloat16).save_pretrained(bf16)
    assert "BF16" in (bf16 / "model.safetensors").read_bytes()[:4096].decode("latin-1")
    model = load_model(bf16)
    tokens = np.random.default_rng(2).integers(0, 61, size=(2, 9))
    with torch.no_grad():  # the same bf16 weights, computed in float32 by torch
        ref = torch_model.float()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(tokens)), ref, atol=ATOL, rtol=0)


def test_float16_on_disk_and_bfloat16_compute(hf_checkpoint, tmp_path):
    path, torch_model = hf_checkpoint(seed=6)
    fp16 = tmp_path / "fp16"
    torch_model.half().save_pretrained(fp16)
    torch_model.float()
    tokens = np.random.default_rng(3).integers(0, 61, size=(2, 9))
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(load_model(fp16)(tokens)), ref, atol=ATOL, rtol=0)
    # bf16 compute: documented tolerance 5e-2 relative to the logits' scale.
    import jax.numpy as jnp

    low = np.asarray(load_model(fp16, dtype=jnp.bfloat16)(tokens))
    assert np.abs(low - ref).max() < 5e-2 * np.abs(ref).max()


def test_sharded_checkpoint(hf_checkpoint):
    path, torch_model = hf_checkpoint(seed=7, save_kwargs=dict(max_shard_size="20KB"))
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    tokens = np.random.default_rng(4).integers(0, 61, size=(2, 9))
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(load_model(path)(tokens)), ref, atol=ATOL, rtol=0)


def test_hub_layout_without_prefix_and_with_mask_buffers(hf_checkpoint):
    path, torch_model = hf_checkpoint(seed=8)
    tensors = load_file(path / "model.safetensors")
    old = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    old["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
    save_file(old, path / "model.safetensors")
    tokens = np.random.default_rng(5).integers(0, 61, size=(2, 9))
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(load_model(path)(tokens)), ref, atol=ATOL, rtol=0)


def test_save_model_round_trips_through_transformers(tiny_model, tmp_path):
    import transformers

    from attrpatch import save_model

    model, torch_model = tiny_model
    save_model(model, tmp_path / "copy", extra_files={"README.md": "card\n"})
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "copy").eval()
    tokens = np.random.default_rng(6).integers(0, 61, size=(2, 9))
    with torch.no_grad():
        ref = torch_model(torch.tensor(tokens)).logits.numpy()
        theirs = again(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ref, atol=ATOL, rtol=0)
    assert (tmp_path / "copy" / "README.md").read_text() == "card\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the problem


def test_refuses_pickled_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1,
                                                      "n_embd": 8, "n_head": 2, "vocab_size": 5}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="pickle"):
        load_model(tmp_path)


def test_missing_tensor_is_named(hf_checkpoint):
    path, _ = hf_checkpoint(seed=9)
    tensors = load_file(path / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor 'h\.1\.mlp\.c_fc\.bias'"):
        load_model(path)


def test_unexpected_tensor_is_named(hf_checkpoint):
    path, _ = hf_checkpoint(seed=10)
    tensors = load_file(path / "model.safetensors")
    tensors["transformer.h.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"h\.0\.extra\.weight"):
        load_model(path)


def test_shape_mismatch_is_named(hf_checkpoint):
    path, _ = hf_checkpoint(seed=11)
    config = json.loads((path / "config.json").read_text())
    config["n_positions"] = 20
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'wpe\.weight' has shape \(16, 32\).*\(20, 32\)"):
        load_model(path)


def test_unsupported_config_is_named(hf_checkpoint):
    path, _ = hf_checkpoint(seed=12)
    config = json.loads((path / "config.json").read_text())
    config["activation_function"] = "swishy"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="activation_function='swishy'"):
        load_model(path)
    config["model_type"] = "bert"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type='bert'"):
        load_model(path)


def test_bad_tokens_and_site_names(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(np.array([[1, 2, 61]]))
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        model(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="exceed the model's context"):
        model(np.zeros((1, 17), int))
    with pytest.raises(ValueError, match="unknown site 'blocks.0.hook_nope'"):
        model.run_with_cache(np.zeros((1, 3), int), names=["blocks.0.hook_nope"])
    with pytest.raises(ValueError, match="names layer 5"):
        model.run_with_cache(np.zeros((1, 3), int), names=["blocks.5.hook_resid_pre"])
