"""Every family against Hugging Face `transformers`, and every engine on every family.

Checkpoints are random `transformers` models (tests/families.py) saved with `save_pretrained`
and loaded through `attrpatch.load_model`. References: the torch model's logits and sites,
`transformers` loading what `save_model` wrote, a naive one-forward-per-patch loop
(tests/test_patching.py) and `jax.jvp` (tests/test_attribution.py).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from families import FAMILIES, VOCAB, hf_sites
from test_attribution import directional_derivatives
from test_patching import check, make_task, naive

from attrpatch import Task, attribute, diagnose, load_model, patch, save_model, validate
from attrpatch.results import GRANULARITIES, available_granularities

ATOL = 1e-4
NAMES = list(FAMILIES)
NEURONS = [(0, 3), (1, 5), (1, 40), (0, 47)]  # of d_mlp 48


def _padded(batch=2, n_pos=8, seed=0):
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (batch, n_pos))
    mask = np.ones((batch, n_pos), np.int32)
    mask[1, n_pos - 3:] = 0
    return tokens, mask


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_every_site_match_transformers(family, name):
    model, torch_model, _ = family(name)
    tokens, mask = _padded()
    for am in (None, mask):
        ref_logits, ref = hf_sites(torch_model, tokens, am)
        logits, cache = model.run_with_cache(tokens, attention_mask=am)
        real = np.ones(tokens.shape, bool) if am is None else am.astype(bool)
        np.testing.assert_allclose(np.asarray(logits)[real], ref_logits[real], atol=ATOL, rtol=0)
        # every site with a HF counterpart is compared (rotary q/k and scores have none)
        assert set(cache) - set(ref) <= {n for n in cache if n.endswith(("rot_q", "rot_k", "attn_scores"))}
        for site, expected in ref.items():
            got = np.asarray(cache[site])
            assert got.shape == expected.shape, (site, got.shape, expected.shape)
            if site.endswith("hook_pattern"):  # [batch, head, query, key]: rows of real queries
                rows = np.broadcast_to(real[:, None, :, None], got.shape)
                got, expected = got[rows], expected[rows]
            else:  # [batch, pos, ...]: real positions
                got, expected = got[real], expected[real]
            np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=f"{name} {site}")


def _without(model, **changes):
    from attrpatch import Model

    return Model(dataclasses.replace(model.config, **changes), model.params)


@pytest.mark.parametrize("name, feature", [
    ("mistral-window", dict(windows=None)),
    ("qwen2-biases-window", dict(windows=None)),
    ("gemma2-softcap-window", dict(windows=None)),
    ("gemma2-softcap-window", dict(attn_softcap=None)),
    ("gemma2-softcap-window", dict(final_softcap=None)),
    ("gemma2-softcap-window", dict(attn_scale=4.0)),  # sqrt(head_dim) instead of sqrt(8)
    ("llama-gqa-llama3-rope", dict(rope_type="default", rope_scaling=())),
    ("gpt_neox-parallel-partial-rotary", dict(rotary_dim=8)),
    ("qwen3-qknorm-window", dict(qk_norm=None)),
    ("qwen3-qknorm-window", dict(windows=None)),
    ("gemma3_text-qknorm-local-rope", dict(qk_norm=None)),
    ("gemma3_text-qknorm-local-rope", dict(rope_local_theta=None)),  # layer 0 with the global base
    ("olmo2-postnorm-qknorm", dict(qk_norm="head")),  # per head instead of the whole projection
    ("olmo2-postnorm-qknorm", dict(qk_norm=None)),
])
def test_each_family_feature_changes_the_logits(family, name, feature):
    """The parity test is not vacuous: dropping a feature moves the logits well beyond 1e-4."""
    model, _, _ = family(name)
    tokens, _ = _padded()
    gap = np.abs(np.asarray(model(tokens)) - np.asarray(_without(model, **feature)(tokens))).max()
    assert gap > 1e-2, (name, feature, gap)


def test_configs_describe_the_family(family):
    cfgs = {name: family(name)[0].config for name in NAMES}
    neox, seq = cfgs["gpt_neox-parallel-partial-rotary"], cfgs["gpt_neox-sequential"]
    assert neox.parallel_attn_mlp and not seq.parallel_attn_mlp and neox.rotary_width == 4
    assert cfgs["llama-gqa-llama3-rope"].kv_heads == 2 and cfgs["llama-gqa-llama3-rope"].rope_type == "llama3"
    assert cfgs["mistral-window"].windows == (3, 3)
    assert cfgs["qwen2-biases-window"].windows == (None, 4) and cfgs["qwen2-biases-window"].qkv_bias
    assert cfgs["gemma-mqa"].kv_heads == 1 and cfgs["gemma-mqa"].d_head == 16
    g2 = cfgs["gemma2-softcap-window"]
    assert g2.windows == (3, None) and g2.post_norms and g2.attn_softcap == 1.0
    q3 = cfgs["qwen3-qknorm-window"]
    assert q3.qk_norm == "head" and q3.d_head == 16 and q3.windows == (None, 3) and not q3.qkv_bias
    g3 = cfgs["gemma3_text-qknorm-local-rope"]
    assert g3.qk_norm == "head" and g3.post_norms and g3.pre_norms and g3.windows == (3, None)
    assert (g3.rope_local_theta, g3.rope_theta, g3.rope_type) == (10.0, 1000.0, "linear")
    assert g3.attn_softcap is None and g3.final_softcap is None and g3.attn_scale == 8 ** 0.5
    o2 = cfgs["olmo2-postnorm-qknorm"]
    assert o2.qk_norm == "projection" and o2.post_norms and not o2.pre_norms and o2.qkv_bias
    assert o2.norm_eps == 1e-5 and o2.kv_heads == 2
    sites = {name: set(family(name)[0].site_names) for name in NAMES}
    assert "blocks.0.hook_resid_mid" not in sites["gpt_neox-parallel-partial-rotary"]
    assert "blocks.0.hook_resid_mid" in sites["gpt_neox-sequential"]
    assert "hook_pos_embed" not in sites["llama-gqa-llama3-rope"]
    assert "blocks.1.mlp.hook_pre_linear" in sites["gemma-mqa"]
    assert "blocks.1.attn.hook_rot_k" in sites["qwen2-biases-window"]
    qk_sites = {f"blocks.1.attn.{n}_norm.hook_normalized" for n in "qk"}
    assert all(qk_sites <= sites[n] for n in ("qwen3-qknorm-window", "gemma3_text-qknorm-local-rope",
                                              "olmo2-postnorm-qknorm"))
    assert not qk_sites & sites["gemma2-softcap-window"]


@pytest.mark.parametrize("name", NAMES)
def test_save_model_round_trip_loads_in_transformers(family, name, tmp_path):
    import torch
    import transformers

    model, _, _ = family(name)
    save_model(model, tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                               attn_implementation="eager").eval()
    tokens, _ = _padded()
    with torch.no_grad():
        ref = theirs(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(tokens)), ref, atol=ATOL, rtol=0)
    again = load_model(tmp_path / "out")
    assert again.config == model.config


def test_bfloat16_checkpoint_stays_bfloat16_until_converted(family, tmp_path):
    import torch

    from attrpatch.loading import _weight_files, read_safetensors

    _, torch_model, _ = family("llama-gqa-llama3-rope")
    torch_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    torch_model.to(torch.float32)
    tensors = read_safetensors(_weight_files(tmp_path / "bf16"))
    assert {v.dtype.name for v in tensors.values()} == {"bfloat16"}
    model = load_model(tmp_path / "bf16")
    ref = load_model(family("llama-gqa-llama3-rope")[2])
    tokens, _ = _padded()
    scale = np.abs(np.asarray(ref(tokens))).max()
    assert np.abs(np.asarray(model(tokens)) - np.asarray(ref(tokens))).max() < 0.05 * scale


# ----------------------------------------------------------------------------------------------
# Engines on every family

# Exact patching compiles per granularity (about 3 s each here), so the default run covers every
# engine path on every family (recomputed layers, row-local patches, per-kv-head k/v, patterns,
# neurons) plus a rotation of the other granularities that puts each on at least two families.
# ATTRPATCH_FULL_MATRIX=1 runs every granularity on every family (about 15 minutes).
EVERY_FAMILY = ("resid_pre", "z_by_pos", "k", "pattern_by_query", "post_by_pos")
ROTATION = {
    "gpt_neox-parallel-partial-rotary": ("resid_post", "attn_out", "q_by_pos", "pattern"),
    "gpt_neox-sequential": ("resid_mid", "mlp_out", "z", "pattern_by_entry"),
    "llama-gqa-llama3-rope": ("q", "v", "k_by_pos", "v_by_pos"),
    "mistral-window": ("attn_out", "pattern_by_entry", "post", "resid_post"),
    "qwen2-biases-window": ("mlp_out", "q", "pattern", "z"),
    "gemma-mqa": ("q_by_pos", "v", "post", "k_by_pos"),
    "gemma2-softcap-window": ("resid_mid", "v_by_pos", "attn_out", "mlp_out"),
    "qwen3-qknorm-window": ("q_by_pos", "k_by_pos"),
    "gemma3_text-qknorm-local-rope": ("q", "k_by_pos", "resid_mid"),
    "olmo2-postnorm-qknorm": ("q", "q_by_pos", "k_by_pos", "mlp_out"),
}
FULL_MATRIX = os.environ.get("ATTRPATCH_FULL_MATRIX") == "1"
# Noising from the other run, and the ablations: one per family by default (each on >= 2 families).
SOURCES = ("default", "mean", "resample")


def test_rotation_covers_every_granularity_twice():
    from collections import Counter

    seen = Counter(g for grans in ROTATION.values() for g in grans)
    assert set(ROTATION) == set(NAMES)
    assert all(seen[g] >= 2 for g in GRANULARITIES if g not in EVERY_FAMILY), seen


@pytest.mark.parametrize("name", NAMES)
def test_exact_patching_matches_naive_loop(family, name):
    """Denoising on padded prompts longer than the windows; noising (or an ablation) on a
    recomputed and a row-local site."""
    model, _, _ = family(name)
    wanted = GRANULARITIES if FULL_MATRIX else EVERY_FAMILY + ROTATION[name]
    grans = available_granularities(model.config, wanted)
    task = make_task(seed=4, n_pos=7, mask=True)
    res = patch(model, task, grans, neurons=NEURONS, batch_size=7, per_prompt=True, progress=False)
    for g in grans:
        check(res, g, naive(model, task, g, neurons=NEURONS if g.startswith("post") else None))
        assert np.nanmax(np.abs(res.scores[g].per_prompt)) > 1e-4, g
    some = [g for g in grans if not g.startswith("post")] if FULL_MATRIX else ("resid_pre", "z_by_pos")
    sources = SOURCES if FULL_MATRIX else (SOURCES[NAMES.index(name) % len(SOURCES)],)
    for source in sources:
        res = patch(model, task, some, direction="noise", source=source, per_prompt=True,
                    progress=False)
        for g in some:
            check(res, g, naive(model, task, g, direction="noise", source=source))


@pytest.mark.parametrize("name", NAMES)
def test_atp_equals_directional_derivatives_and_zero_on_identical_prompts(family, name):
    model, _, _ = family(name)
    task = make_task(seed=5, n_pos=7, mask=True)
    grans = available_granularities(model.config, ("resid_mid", "z_by_pos", "k", "v_by_pos", "post"))
    res = attribute(model, task, grans, direction="noise")
    for g in grans:
        want = directional_derivatives(model, task, g, "noise", "logit_diff")
        scale = np.abs(want).max()
        assert scale > 1e-4, g
        np.testing.assert_allclose(res[g], want, rtol=1e-4, atol=2e-5 * scale, err_msg=f"{name} {g}")
    same = Task(task.clean_tokens, task.clean_tokens, task.correct_tokens, task.incorrect_tokens,
                attention_mask=task.attention_mask)
    plain = [g for g in grans if g != "post"]  # exact neuron grids need an index set
    for method in (attribute, patch):
        kw = {} if method is attribute else {"progress": False}
        zero = method(model, same, plain, **kw)
        assert all(np.all(zero[g] == 0) for g in plain), method


def test_diagnose_and_validate_run_on_a_gqa_family(family):
    model, _, _ = family("gemma2-softcap-window")
    task = make_task(seed=6, n_pos=7)
    grans = ("resid_pre", "z", "q", "k", "k_by_pos", "mlp_out")
    atp = attribute(model, task, grans)
    exact = patch(model, task, grans, progress=False)
    diag = diagnose(model, task, grans)
    checked = validate(atp, exact, diag)
    assert exact["k"].shape == atp["k"].shape == diag.attn_saturation["k"].shape == (2, 2)  # kv heads
    assert diag.attn_saturation["k_by_pos"].shape == (2, 7, 2)
    # a kv head is as saturated as the most saturated of the 2 query heads reading it (per
    # prompt, then averaged: at least the larger of the two heads' averages)
    group_max = diag.attn_saturation["q"].reshape(2, 2, 2).max(-1)
    assert np.all(diag.attn_saturation["k"] >= group_max - 1e-6) and np.all(diag.attn_saturation["k"] <= 1)
    assert set(checked.verdicts) >= {"heads", "q/k/v"}
    assert all(v in ("reliable", "caution", "unreliable") for v in checked.verdicts.values())


# ----------------------------------------------------------------------------------------------
# Bad input


def _rewrite_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("name, changes, match", [
    ("llama-gqa-llama3-rope", dict(model_type="t5"), "model_type='t5' is not supported"),
    ("llama-gqa-llama3-rope", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     "rope scaling type 'yarn'"),
    ("llama-gqa-llama3-rope", dict(use_qk_norm=True), "use_qk_norm=True is not supported"),
    ("llama-gqa-llama3-rope", dict(hidden_act="swish_glu"), "hidden_act='swish_glu'"),
    ("llama-gqa-llama3-rope", dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    ("gemma2-softcap-window", dict(layer_types=["chunked_attention", "full_attention"]), "chunked_attention"),
    ("gpt_neox-sequential", dict(hidden_size=None), "missing required GPT-NeoX field 'hidden_size'"),
    ("qwen2-biases-window", dict(quantization_config={"bits": 4}), "quantization_config"),
    ("gemma3_text-qknorm-local-rope",
     dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10.0},
                           "full_attention": {"rope_type": "default", "rope_theta": 1e3}}),
     "sliding_attention rope_type 'linear' is not implemented"),
    ("gemma3_text-qknorm-local-rope", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e3}),
     "one object per layer type"),
    ("olmo2-postnorm-qknorm", dict(clip_qkv=8.0), "'clip_qkv' are not implemented"),
])
def test_unsupported_configs_are_refused_by_name(family, tmp_path, name, changes, match):
    import shutil

    _, _, src = family(name)
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    _rewrite_config(path, **changes)
    with pytest.raises(ValueError, match=match):
        load_model(path)


def test_missing_shard_and_tensor_are_named(family, tmp_path):
    import shutil

    _, torch_model, _ = family("mistral-window")
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    assert np.allclose(np.asarray(load_model(tmp_path / "sharded").params["W_E"]),
                       np.asarray(family("mistral-window")[0].params["W_E"]))
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "sharded", broken)
    (broken / shards[-1].name).unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1].name):
        load_model(broken)
    _rewrite_config(tmp_path / "sharded", num_hidden_layers=3)
    with pytest.raises(ValueError, match="missing tensor 'model.layers.2"):
        load_model(tmp_path / "sharded")


def test_save_refuses_what_hugging_face_cannot_express_and_writes_nothing(family, tmp_path):
    model, _, _ = family("gemma2-softcap-window")
    odd = _without(model, windows=(3, 5))
    with pytest.raises(ValueError, match="one sliding_window"):
        save_model(odd, tmp_path / "out")
    per_head = _without(family("olmo2-postnorm-qknorm")[0], qk_norm="head")
    with pytest.raises(ValueError, match="OLMo 2 config.json cannot express qk_norm='head'"):
        save_model(per_head, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
