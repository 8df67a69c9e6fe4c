"""AtP*, integrated gradients: against exact patching, naive recomputation and their own theory.

References are independent of the estimators' code: a naive loop that patches each component and
reads the patched attention pattern off a real forward (QK fix), exact patching by one forward
per component (tests/test_attribution.py), and the midpoint rule's known 1/steps^2 error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import FAMILIES
from test_attribution import (
    component_masks,
    linearized,
    make_task,
    naive_exact,
    reference_of,
    runs,
    site_acts,
)

from attrpatch import Interventions, Patch, Task, attribute, load_model, patch
from attrpatch.planted import plant_cancellation, saturate_head
from attrpatch.results import ESTIMATORS, GRANULARITIES, QK_GRANULARITIES
from attrpatch.task import METRICS

QK = ("q", "k", "q_by_pos", "k_by_pos")


def naive_qk_fixed(model, task, granularity, direction, metric="logit_diff"):
    """(A_patched - A_base) . dMetric/dA at the patched layer, one real forward per component:
    the component's query or key patched in, its layer's pattern read off the forward."""
    key = GRANULARITIES[granularity][0]
    base, _ = runs(direction, task)
    a_base, a_source = site_acts(model, task, key, direction)
    masks, grid = component_masks(granularity, a_base.shape)
    mask, pos = task.attention_mask, task.answer_positions
    fn, ref = METRICS[metric], reference_of(model, task)

    def pattern_of(iv):
        return model.run(base, mask, iv, cache_keys=("attn.hook_pattern",),
                         logit_positions=pos)[1]["attn.hook_pattern"]

    p_base = pattern_of(Interventions())
    grad = jax.grad(lambda d: fn(model.run(base, mask, Interventions(delta={"attn.hook_pattern": d}),
                                           logit_positions=pos)[0], task, ref).mean())(
        jnp.zeros_like(p_base))
    patched = jax.jit(lambda m: pattern_of(Interventions(patch={key: Patch(m, a_source)})))
    out = []
    for i, m in enumerate(masks):
        layer = np.unravel_index(i, grid)[0]
        out.append(float(((patched(jnp.asarray(m))[layer] - p_base[layer]) * grad[layer]).sum()))
    return np.array(out).reshape(grid)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_qk_fix_is_exact_where_the_model_is_linear_after_the_pattern(tiny_model, direction):
    """Attention-only with affine LayerNorms: after the last layer's softmax everything is linear,
    so the QK fix of the last layer's queries and keys is exact patching (plain AtP is not)."""
    model = linearized(tiny_model[0], attn_only=True)
    for head in range(model.config.n_heads):  # sharper patterns: a visibly nonlinear softmax
        model = saturate_head(model, layer=1, head=head, factor=3.0)
    task = make_task(seed=5, padded=True)
    star = attribute(model, task, QK, direction=direction, method="atp_star")
    atp = attribute(model, task, QK, direction=direction)
    for g in QK:
        exact = naive_exact(model, task, g, direction, "logit_diff")[-1]
        scale = np.abs(exact).max()
        assert scale > 1e-3, g
        np.testing.assert_allclose(star[g][-1], exact, rtol=1e-3, atol=1e-4 * scale, err_msg=g)
        assert np.abs(atp[g][-1] - exact).max() > 0.02 * scale, g  # plain AtP is not exact


def test_saturated_head_atp_star_fixes_the_sign(tiny_model):
    """A last-layer head with W_Q, W_K scaled 5x: plain AtP gets its key patch's sign wrong and
    AtP* is within 30% of exact."""
    model = saturate_head(tiny_model[0], layer=1, head=1, factor=5.0)
    task = make_task(seed=2)
    _, cache = model.run(task.corrupt_tokens, cache_keys=("attn.hook_pattern",))
    assert float(cache["attn.hook_pattern"][1, :, 1, -1].max(-1).mean()) > 0.9  # saturated
    exact = patch(model, task, ("k",), progress=False)["k"][1, 1]
    atp = attribute(model, task, ("k",))["k"][1, 1]
    star = attribute(model, task, ("k",), method="atp_star")["k"][1, 1]
    assert abs(exact) > 0.5 * abs(patch(model, task, ("k",), progress=False).gap)
    assert np.sign(atp) != np.sign(exact)
    assert abs(star - exact) <= 0.3 * abs(exact)


def test_qk_fix_of_keys_where_attention_rounds_to_one(tiny_model):
    """Heads so saturated that float32 attention probabilities are exactly 1: the one-key
    softmax update stays finite and equals the naive recomputation."""
    model = saturate_head(saturate_head(tiny_model[0], 1, 1, 30.0), 0, 2, 30.0)
    task = make_task(seed=2, padded=True)
    _, cache = model.run(task.corrupt_tokens, task.attention_mask, cache_keys=("attn.hook_pattern",))
    assert (np.asarray(cache["attn.hook_pattern"]) == 1.0).any()
    star = attribute(model, task, ("k_by_pos",), method="atp_star")
    want = naive_qk_fixed(model, task, "k_by_pos", "denoise")
    assert np.isfinite(star["k_by_pos"]).all() and np.isfinite(star.graddrop["k_by_pos"]).all()
    np.testing.assert_allclose(star["k_by_pos"], want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("name", ["gpt2", *FAMILIES])
def test_estimators_on_every_family(family, tiny_model, name):
    """The QK fix against naive recomputation (rotary, grouped kv heads, windows and soft-caps
    all enter the recomputed logits), and IG on the inputs against exact patching where the
    straight line is the patch (one differing token, layer 0)."""
    model = tiny_model[0] if name == "gpt2" else family(name)[0]
    vocab = model.config.d_vocab
    task = make_task(vocab=vocab, n_pos=7, seed=3, padded=True)
    direction = "noise" if name.startswith(("gemma", "mistral")) else "denoise"
    star = attribute(model, task, QK, direction=direction, method="atp_star")
    for g in QK:
        want = naive_qk_fixed(model, task, g, direction)
        assert star[g].shape == want.shape
        scale = np.abs(want).max()
        assert scale > 1e-5, g
        np.testing.assert_allclose(star[g], want, rtol=1e-3, atol=1e-4 * scale, err_msg=f"{name} {g}")
    one = one_token_task(vocab)
    exact = patch(model, one, ("resid_pre",), direction=direction, progress=False)["resid_pre"][0, 3]
    ig = attribute(model, one, ("resid_pre",), direction=direction, method="ig_inputs", steps=64)
    assert abs(exact) > 1e-3
    assert abs(ig["resid_pre"][0, 3] - exact) < 0.01 * abs(exact), (ig["resid_pre"][0, 3], exact)


def one_token_task(vocab=61, seed=0):
    """Clean and corrupt differ at position 3 only: layer 0's residual differs at one position,
    so moving the whole site (IG) is patching one component."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, vocab, (3, 6))
    corrupt = clean.copy()
    corrupt[:, 3] = (clean[:, 3] + 7) % vocab
    return Task(clean, corrupt, rng.integers(0, vocab, (3, 2)), rng.integers(0, vocab, (3, 1)))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_ig_converges_to_exact_as_one_over_steps_squared(hf_checkpoint, direction):
    """Float64: IG of the one patched component converges to exact patching, error ~ 1/steps^2
    (midpoint rule), and IG on the inputs is the same path there."""
    path, _ = hf_checkpoint(seed=4)
    with jax.enable_x64(True):
        model = load_model(path, dtype=jnp.float64)
        task = one_token_task()
        exact = patch(model, task, ("resid_pre",), direction=direction, progress=False)["resid_pre"]
        assert abs(exact[0, 3]) > 1e-3
        errors = {}
        for steps in (8, 16, 64):
            ig = attribute(model, task, ("resid_pre",), direction=direction, method="ig", steps=steps)
            errors[steps] = abs(ig["resid_pre"][0, 3] - exact[0, 3])
            assert np.all(ig["resid_pre"][0, :3] == 0)  # before the differing token
        inputs = attribute(model, task, ("resid_pre",), direction=direction, method="ig_inputs", steps=16)
        np.testing.assert_allclose(inputs["resid_pre"][0], attribute(
            model, task, ("resid_pre",), direction=direction, method="ig", steps=16)["resid_pre"][0],
            rtol=1e-9, atol=1e-12)
    assert errors[64] < 1e-3 * abs(exact[0, 3])
    assert 3.2 < errors[8] / errors[16] < 4.8, errors  # halving the step quarters the error
    assert 12.8 < errors[16] / errors[64] < 19.2, errors


def test_graddrop_exposes_a_planted_cancellation(tiny_model):
    """Head L1H1 made to undo L0H0 so that L0H0's gradient cancels: AtP scores it ~0 while
    patching it moves the metric by most of the gap; GradDrop's magnitude sees it."""
    model, _ = tiny_model
    task = make_task(seed=2)
    planted, _ = plant_cancellation(model, task, source=(0, 0), reader=(1, 1))
    star = attribute(planted, task, ("z", "z_by_pos"), method="atp_star")
    exact = patch(planted, task, ("z",), progress=False)
    gap = abs(exact.gap)
    assert abs(star["z"][0, 0]) < 0.01 * gap  # cancelled at the base run
    assert abs(exact["z"][0, 0]) > 0.3 * gap  # but the patch matters: a false negative
    assert star.graddrop["z"][0, 0] > 0.5 * abs(exact["z"][0, 0])
    assert star.ranking("z")[0, 0] == star.graddrop["z"][0, 0]
    # by-position grids sum to the head's (GradDrop per layer is linear before the |.|)
    np.testing.assert_allclose(star["z_by_pos"].sum(1), star["z"], atol=1e-6)
    assert star.cost_forwards == 4 + 3 * model.config.n_layers


@pytest.mark.parametrize("method", ESTIMATORS)
def test_identical_prompts_give_exact_zeros_and_shapes(tiny_model, method):
    model, _ = tiny_model
    task = make_task(seed=6, padded=True)
    same = Task(task.clean_tokens, task.clean_tokens, task.correct_tokens, task.incorrect_tokens,
                attention_mask=task.attention_mask)
    grans = ("resid_pre", "q_by_pos", "k", "pattern", "post")
    res = attribute(model, same, grans, method=method, steps=2, per_prompt=True)
    full = attribute(model, task, grans, method=method, steps=2)
    for g in grans:
        assert np.all(res[g] == 0), (method, g)
        assert res.scores[g].per_prompt.shape == (3, *full[g].shape)
        if method == "relp" and g in QK_GRANULARITIES:  # its attention rule: no gradient to q, k
            assert np.all(full[g] == 0), g
        else:
            assert np.abs(full[g]).max() > 0, (method, g)
    assert res.method == method


def test_estimator_arguments_are_checked(tiny_model):
    model, _ = tiny_model
    task = make_task()
    with pytest.raises(ValueError, match="unknown method 'atp\\*'"):
        attribute(model, task, ("z",), method="atp*")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        attribute(model, task, ("z",), method="ig", steps=0)
    with pytest.raises(ValueError, match="must come after"):
        plant_cancellation(model, task, source=(1, 0), reader=(0, 1))
