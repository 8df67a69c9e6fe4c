"""Attribution patching: exact zeros, directional derivatives, linear models, and a torch twin."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrpatch import Interventions, Model, Patch, Task, load_model
from attrpatch.attribution import _estimate, attribute
from attrpatch.results import GRANULARITIES, grid_shape
from attrpatch.task import METRICS, MetricReference

# Axes of each site's stacked activation, written out here independently of the library.
SITE_AXES = {
    "hook_resid_pre": ("layer", "batch", "pos", "d_model"),
    "hook_resid_mid": ("layer", "batch", "pos", "d_model"),
    "hook_resid_post": ("layer", "batch", "pos", "d_model"),
    "hook_attn_out": ("layer", "batch", "pos", "d_model"),
    "hook_mlp_out": ("layer", "batch", "pos", "d_model"),
    "attn.hook_q": ("layer", "batch", "pos", "head", "d_head"),
    "attn.hook_k": ("layer", "batch", "pos", "head", "d_head"),
    "attn.hook_v": ("layer", "batch", "pos", "head", "d_head"),
    "attn.hook_z": ("layer", "batch", "pos", "head", "d_head"),
    "attn.hook_pattern": ("layer", "batch", "head", "query_pos", "key_pos"),
    "mlp.hook_post": ("layer", "batch", "pos", "neuron"),
}
ALL = tuple(GRANULARITIES)


def make_task(vocab=61, batch=3, n_pos=6, seed=0, padded=False, metric="logit_diff"):
    """Random prompts; corrupt differs from clean at two positions per prompt."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, vocab, (batch, n_pos))
    corrupt = clean.copy()
    for b in range(batch):
        for p in rng.choice(np.arange(1, n_pos - 1), 2, replace=False):
            corrupt[b, p] = (clean[b, p] + 1 + rng.integers(0, vocab - 1)) % vocab
    mask = None
    if padded:  # right padding: prompt b has n_pos - b real tokens
        mask = (np.arange(n_pos)[None] < (n_pos - np.arange(batch))[:, None]).astype(np.int32)
    correct = rng.integers(0, vocab, (batch, 2))
    incorrect = rng.integers(0, vocab, (batch, 1))
    return Task(clean, corrupt, correct, incorrect, attention_mask=mask, metric=metric)


def runs(direction, task):
    base, source = (task.corrupt_tokens, task.clean_tokens)
    return (base, source) if direction == "denoise" else (source, base)


def reference_of(model, task):
    pos = task.answer_positions
    clean = model.run(task.clean_tokens, task.attention_mask, logit_positions=pos)[0]
    corrupt = model.run(task.corrupt_tokens, task.attention_mask, logit_positions=pos)[0]
    return MetricReference(clean, corrupt)


def component_masks(granularity, site_shape):
    """One-hot masks ``[n_components, *broadcastable site shape]``, in the grid's C order."""
    key, axes = GRANULARITIES[granularity]
    site_axes = SITE_AXES[key]
    grid = tuple(site_shape[site_axes.index(a)] for a in axes)
    n = int(np.prod(grid))
    shape = [n] + [site_shape[i] if a in axes else 1 for i, a in enumerate(site_axes)]
    return np.eye(n, dtype=bool).reshape(shape), grid


def site_acts(model, task, key, direction):
    base, source = runs(direction, task)
    kw = dict(cache_keys=(key,), logit_positions=task.answer_positions)
    return (model.run(base, task.attention_mask, **kw)[1][key],
            model.run(source, task.attention_mask, **kw)[1][key])


def metric_along(model, task, key, direction, metric, reference):
    """`eps_delta -> mean metric` of the base run with `eps_delta` added at site `key`."""
    base, _ = runs(direction, task)
    fn = METRICS[metric]

    def f(delta):
        logits = model.run(base, task.attention_mask, Interventions(delta={key: delta}),
                           logit_positions=task.answer_positions)[0]
        return fn(logits, task, reference).mean()

    return f


def directional_derivatives(model, task, granularity, direction, metric):
    """Forward-mode derivative of the metric along each component's (source - base) delta."""
    key = GRANULARITIES[granularity][0]
    a_base, a_source = site_acts(model, task, key, direction)
    diff = a_source - a_base
    masks, grid = component_masks(granularity, diff.shape)
    f = metric_along(model, task, key, direction, metric, reference_of(model, task))
    zero = jnp.zeros_like(diff)
    jvp = jax.jit(jax.vmap(lambda m: jax.jvp(f, (zero,), (diff * m,))[1]))
    return np.asarray(jvp(jnp.asarray(masks))).reshape(grid)


def naive_exact(model, task, granularity, direction, metric):
    """Exact patching, one forward per component with a masked `Patch` of the source run."""
    key = GRANULARITIES[granularity][0]
    base, _ = runs(direction, task)
    a_base, a_source = site_acts(model, task, key, direction)
    masks, grid = component_masks(granularity, a_base.shape)
    fn, ref = METRICS[metric], reference_of(model, task)
    run = jax.jit(lambda iv: fn(model.run(base, task.attention_mask, iv,
                                          logit_positions=task.answer_positions)[0], task, ref).mean())
    unpatched = run(Interventions())
    out = [float(run(Interventions(patch={key: Patch(jnp.asarray(m), a_source)})) - unpatched)
           for m in masks]
    return np.array(out).reshape(grid)


# ----------------------------------------------------------------------------------------------


def test_identical_runs_give_exact_zeros(tiny_model):
    model, _ = tiny_model
    t = make_task(padded=True)
    same = Task(t.clean_tokens, t.clean_tokens, t.correct_tokens, t.incorrect_tokens,
                attention_mask=t.attention_mask)
    for direction in ("denoise", "noise"):
        res = attribute(model, same, ALL, direction=direction, per_prompt=True)
        for g, s in res.scores.items():
            assert s.values.shape == grid_shape(g, model.config, 6)
            assert np.all(s.values == 0.0), g
            assert np.all(s.per_prompt == 0.0), g
        assert res.gap == 0.0


@pytest.mark.parametrize(
    "direction, metric, granularities, padded",
    [
        ("denoise", "logit_diff", ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
                                   "z", "q", "v_by_pos", "pattern", "post"), False),
        ("noise", "logprob", ("resid_mid", "z_by_pos", "k", "k_by_pos", "pattern_by_entry",
                              "post_by_pos"), True),
        ("denoise", "kl", ("resid_pre", "v", "q_by_pos", "pattern_by_query", "post"), True),
    ],
)
def test_scores_are_directional_derivatives(tiny_model, direction, metric, granularities, padded):
    """Each score equals the jvp of the batch metric along that component's delta."""
    model, _ = tiny_model
    task = make_task(seed=1, padded=padded)
    res = attribute(model, task, granularities, direction=direction, metric=metric)
    assert res.method == "atp" and res.metric == metric and res.direction == direction
    for g in granularities:
        want = directional_derivatives(model, task, g, direction, metric)
        scale = np.abs(want).max()
        assert scale > 1e-4, g  # the check is not vacuous
        np.testing.assert_allclose(res[g], want, rtol=1e-4, atol=2e-5 * scale, err_msg=g)


def central_differences(f, diff, masks, h):
    """``(f(h d_c) - f(-h d_c)) / 2h`` for each component's delta ``d_c = diff * mask_c``."""
    return jax.jit(jax.vmap(lambda m: (f(h * diff * m) - f(-h * diff * m)) / (2 * h)))(masks)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_float64_central_differences(hf_checkpoint, direction):
    """In float64, AtP matches central finite differences of the metric (no autodiff at all)."""
    path, _ = hf_checkpoint(seed=2)
    grans = ("resid_post", "z_by_pos", "v", "pattern_by_entry", "post_by_pos")
    h = 1e-5
    with jax.enable_x64(True):
        model = load_model(path, dtype=jnp.float64)
        task = make_task(seed=3, n_pos=5, padded=True)
        res = attribute(model, task, grans, direction=direction)
        ref = reference_of(model, task)
        for g in grans:
            key = GRANULARITIES[g][0]
            a_base, a_source = site_acts(model, task, key, direction)
            assert a_base.dtype == jnp.float64
            diff = a_source - a_base
            masks, grid = component_masks(g, diff.shape)
            f = metric_along(model, task, key, direction, "logit_diff", ref)
            want = np.asarray(central_differences(f, diff, jnp.asarray(masks), h)).reshape(grid)
            assert np.abs(want).max() > 1e-4, g
            np.testing.assert_allclose(res[g], want, rtol=1e-6, atol=1e-8, err_msg=g)


# ----------------------------------------------------------------------------------------------
# Models made linear. A LayerNorm with eps = 1e12 divides by the constant sqrt(1e12) in float32
# (the variance, << 1e12, rounds away), so it is exactly affine; its weight is scaled by 1e6 to
# keep magnitudes. The softmax stays nonlinear unless W_Q = W_K = 0 (uniform causal pattern).


def linearized(model: Model, attn_only=False, constant_attention=False) -> Model:
    cfg = dataclasses.replace(model.config, norm_eps=1e12, attn_only=attn_only)
    p = jax.tree.map(lambda x: x, model.params)
    blocks = dict(p["blocks"])
    for k in ("ln1_w", "ln2_w"):
        blocks[k] = blocks[k] * 1e6
    if attn_only:
        for k in ("ln2_w", "ln2_b", "W_in", "b_in", "W_out", "b_out"):
            del blocks[k]
    if constant_attention:
        blocks["W_Q"] = jnp.zeros_like(blocks["W_Q"])
        blocks["W_K"] = jnp.zeros_like(blocks["W_K"])
    p["blocks"] = blocks
    p["ln_f_w"] = p["ln_f_w"] * 1e6
    return Model(cfg, p)


def assert_close(atp, exact, name):
    scale = np.abs(exact).max()
    assert scale > 1e-3, name  # patches really move the metric
    np.testing.assert_allclose(atp, exact, rtol=1e-3, atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_fully_linear_model_atp_equals_exact(tiny_model, direction):
    """Attention-only, affine LayerNorms, constant patterns: every non-q/k site is linear."""
    model = linearized(tiny_model[0], attn_only=True, constant_attention=True)
    task = make_task(seed=4)
    grans = ("resid_pre", "resid_post", "attn_out", "z", "z_by_pos", "v_by_pos")
    res = attribute(model, task, grans, direction=direction)
    for g in grans:
        assert_close(res[g], naive_exact(model, task, g, direction, "logit_diff"), g)


@pytest.mark.parametrize(
    "attn_only, grans",
    [
        (True, ("pattern", "pattern_by_query", "pattern_by_entry", "z", "v_by_pos", "attn_out",
                "resid_post")),
        (False, ("post", "post_by_pos", "mlp_out", "resid_post")),
    ],
)
def test_last_layer_linear_paths_atp_equals_exact(tiny_model, attn_only, grans):
    """With affine LayerNorms, the last layer's sites after its softmax (and, with an MLP, after
    its activation) reach the logit difference linearly: AtP is exact there."""
    model = linearized(tiny_model[0], attn_only=attn_only)
    task = make_task(seed=5, padded=True)
    res = attribute(model, task, grans, direction="denoise")
    for g in grans:
        exact = naive_exact(model, task, g, "denoise", "logit_diff")
        assert_close(res[g][-1], exact[-1], g)
    # Sanity: the same comparison does detect the nonlinearity of an earlier-layer residual.
    if attn_only:
        exact = naive_exact(model, task, "resid_pre", "denoise", "logit_diff")
        atp = attribute(model, task, ("resid_pre",))["resid_pre"]
        assert not np.allclose(atp, exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())


# ----------------------------------------------------------------------------------------------
# An independent torch implementation of the recipe on the Hugging Face model.


def torch_atp(hf, task: Task, direction: str):
    """Per-granularity AtP (batch means) with torch hooks and autograd; logit-diff metric."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    n_layers, n_heads = hf.config.n_layer, hf.config.n_head
    state = {"acts": None, "deltas": None}

    def site(name, layer, x):
        state["acts"][name, layer] = x.detach().clone()
        if state["deltas"] is not None:
            d = state["deltas"].setdefault(
                (name, layer), torch.zeros_like(x, requires_grad=True))
            x = x + d
        return x

    def attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
        w = torch.matmul(q, k.transpose(-1, -2)) * scaling
        n = w.shape[-1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        w = w.masked_fill(~causal, torch.finfo(w.dtype).min)
        if attention_mask is not None:
            w = w + attention_mask[..., :n]
        w = site("pattern", module.layer_idx, torch.softmax(w, dim=-1))
        return torch.matmul(w, v).transpose(1, 2), w

    AttentionInterface.register("atp_test", attention)
    AttentionMaskInterface.register("atp_test", eager_mask)
    hf.set_attn_implementation("atp_test")

    hooks = []
    d = hf.config.n_embd
    for layer, blk in enumerate(hf.transformer.h):
        def pre_block(mod, args, kwargs, layer=layer):
            return (site("resid_pre", layer, args[0]), *args[1:]), kwargs

        def post_block(mod, args, out, layer=layer):
            return site("resid_post", layer, out)

        def qkv(mod, args, out, layer=layer):
            b, p, _ = out.shape
            parts = [site(n, layer, t.reshape(b, p, n_heads, -1)).reshape(b, p, d)
                     for n, t in zip("qkv", out.split(d, dim=-1), strict=True)]
            return torch.cat(parts, dim=-1)

        def z_in(mod, args, layer=layer):
            b, p, _ = args[0].shape
            return (site("z", layer, args[0].reshape(b, p, n_heads, -1)).reshape(b, p, d),)

        def attn_out(mod, args, out, layer=layer):
            return site("attn_out", layer, out)

        def ln2_in(mod, args, layer=layer):  # resid_mid's value; its gradient is attn_out's
            state["acts"]["resid_mid", layer] = args[0].detach().clone()

        def post_in(mod, args, layer=layer):
            return (site("post", layer, args[0]),)

        def mlp_out(mod, args, out, layer=layer):
            return site("mlp_out", layer, out)

        hooks += [
            blk.register_forward_pre_hook(pre_block, with_kwargs=True),
            blk.register_forward_hook(post_block),
            blk.attn.c_attn.register_forward_hook(qkv),
            blk.attn.c_proj.register_forward_pre_hook(z_in),
            blk.attn.c_proj.register_forward_hook(attn_out),
            blk.ln_2.register_forward_pre_hook(ln2_in),
            blk.mlp.c_proj.register_forward_pre_hook(post_in),
            blk.mlp.register_forward_hook(mlp_out),
        ]
    t = lambda x: torch.tensor(np.asarray(x), dtype=torch.long)
    mask = None if task.attention_mask is None else t(task.attention_mask)
    base_tokens, source_tokens = runs(direction, task)
    rows = torch.arange(task.batch)
    answer = t(task.answer_positions)
    try:
        with torch.no_grad():
            state["acts"] = {}
            hf(t(source_tokens), attention_mask=mask)
            source = state["acts"]
        state["acts"], state["deltas"] = {}, {}
        logits = hf(t(base_tokens), attention_mask=mask).logits[rows, answer]
        ld = (torch.gather(logits, 1, t(task.correct_tokens)).mean(1)
              - torch.gather(logits, 1, t(task.incorrect_tokens)).mean(1))
        ld.sum().backward()  # per-prompt gradients; the batch score is their mean
        base, deltas = state["acts"], state["deltas"]
    finally:
        for hk in hooks:
            hk.remove()

    def score(name, layer, grad_of=None):
        g = deltas[grad_of or name, layer].grad
        return ((source[name, layer] - base[name, layer]) * g).numpy()

    reductions = {  # granularity -> (torch site, axes of [batch, ...] to sum, besides batch mean)
        "resid_pre": ("resid_pre", (2,)), "resid_post": ("resid_post", (2,)),
        "attn_out": ("attn_out", (2,)), "mlp_out": ("mlp_out", (2,)),
        "resid_mid": ("resid_mid", (2,)),
        "z": ("z", (1, 3)), "z_by_pos": ("z", (3,)), "q": ("q", (1, 3)), "k_by_pos": ("k", (3,)),
        "v": ("v", (1, 3)), "v_by_pos": ("v", (3,)),
        "pattern": ("pattern", (2, 3)), "pattern_by_query": ("pattern", (3,)),
        "pattern_by_entry": ("pattern", ()),
        "post": ("post", (1,)), "post_by_pos": ("post", ()),
    }
    out = {}
    for g, (name, axes) in reductions.items():
        grad_of = "attn_out" if name == "resid_mid" else None
        out[g] = np.stack([score(name, layer, grad_of).sum(axis=axes).mean(0)
                           for layer in range(n_layers)])
    return out


@pytest.mark.parametrize("direction, padded", [("denoise", True), ("noise", False)])
def test_matches_torch_hooks(hf_checkpoint, direction, padded):
    path, hf = hf_checkpoint(seed=6)
    model = load_model(path)
    task = make_task(seed=7, n_pos=7, padded=padded)
    want = torch_atp(hf, task, direction)
    res = attribute(model, task, tuple(want), direction=direction)
    for g, w in want.items():
        assert np.abs(w).max() > 1e-3, g
        np.testing.assert_allclose(res[g], w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=g)


# ----------------------------------------------------------------------------------------------


def test_per_prompt_scores_are_each_prompts_own(tiny_model):
    """per_prompt[i] equals AtP on prompt i alone; the batch values are their mean."""
    model, _ = tiny_model
    task = make_task(seed=8, padded=True)
    grans = ("resid_pre", "z_by_pos", "pattern", "post")
    res = attribute(model, task, grans, direction="noise", per_prompt=True)
    for g in grans:
        s = res.scores[g]
        assert s.per_prompt.shape == (task.batch, *s.values.shape)
        np.testing.assert_allclose(s.per_prompt.mean(0), s.values, rtol=1e-5, atol=1e-7)
    for i in range(task.batch):
        one = Task(task.clean_tokens[i:i + 1], task.corrupt_tokens[i:i + 1],
                   task.correct_tokens[i:i + 1], task.incorrect_tokens[i:i + 1],
                   attention_mask=task.attention_mask[i:i + 1])
        alone = attribute(model, one, grans, direction="noise")
        for g in grans:
            np.testing.assert_allclose(res.scores[g].per_prompt[i], alone[g], rtol=1e-4,
                                       atol=1e-6, err_msg=g)
        np.testing.assert_allclose(res.base_metric_per_prompt[i], alone.base_metric, rtol=1e-5)
    assert np.abs(res.scores["z_by_pos"].per_prompt[2, :, -2:]).max() == 0  # padding: no effect


def test_base_and_source_metrics(tiny_model):
    model, _ = tiny_model
    task = make_task(seed=9, padded=True)
    ref = reference_of(model, task)
    clean = np.asarray(METRICS["logit_diff"](ref.clean_logits, task, ref))
    corrupt = np.asarray(METRICS["logit_diff"](ref.corrupt_logits, task, ref))
    den = attribute(model, task, ("z",))
    noi = attribute(model, task, ("z",), direction="noise")
    np.testing.assert_allclose(den.base_metric_per_prompt, corrupt, rtol=1e-5)
    np.testing.assert_allclose(den.source_metric_per_prompt, clean, rtol=1e-5)
    np.testing.assert_allclose(noi.base_metric, clean.mean(), rtol=1e-5)
    np.testing.assert_allclose(noi.source_metric, corrupt.mean(), rtol=1e-5)
    assert den.gap == pytest.approx(-noi.gap)
    assert den.seconds > 0
    norm = attribute(model, task, ("z",), metric="normalized_logit_diff")
    assert norm.base_metric == pytest.approx(0.0, abs=1e-5)
    assert norm.source_metric == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(norm["z"] * den.gap, den["z"], rtol=1e-3, atol=1e-6)


def test_remat_and_no_recompile(tiny_model):
    model, _ = tiny_model
    task = make_task(seed=10)
    grans = ("resid_mid", "z", "pattern_by_entry", "post_by_pos")

    def custom(logits, task, reference):
        return jax.nn.logsumexp(logits, -1)

    a = attribute(model, task, grans, metric=custom)
    b = attribute(model, task, grans, metric=custom, remat=True)
    for g in grans:
        np.testing.assert_allclose(a[g], b[g], rtol=1e-5, atol=1e-7)
        assert np.abs(a[g]).max() > 0
    assert a.metric == "custom"
    size = _estimate._cache_size()
    other = make_task(seed=11)  # same shapes, different tokens
    attribute(model, other, grans, metric=custom)
    attribute(model, task, grans, metric=custom, remat=True)
    assert _estimate._cache_size() == size


def test_bad_input(tiny_model):
    model, _ = tiny_model
    task = make_task()
    with pytest.raises(ValueError, match="unknown granularity 'heads'"):
        attribute(model, task, ("z", "heads"))
    with pytest.raises(ValueError, match="direction"):
        attribute(model, task, ("z",), direction="denoising")
    with pytest.raises(ValueError, match="unknown metric"):
        attribute(model, task, ("z",), metric="accuracy")
    with pytest.raises(ValueError, match="empty"):
        attribute(model, task, ())
    with pytest.raises(ValueError, match="attention-only"):
        attribute(linearized(model, attn_only=True), task, ("post",))
    big = Task(task.clean_tokens + 100, task.corrupt_tokens, task.correct_tokens,
               task.incorrect_tokens)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        attribute(model, big, ("z",))


def test_kl_noise_warns_that_atp_is_blind(tiny_model):
    model, _ = tiny_model
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 61, (2, 6))
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 1) % 61
    task = Task(clean, corrupt, [1, 2], [3, 4])
    with pytest.warns(UserWarning, match="gradient there vanishes"):
        out = attribute(model, task, ["resid_pre"], direction="noise", metric="kl")
    np.testing.assert_allclose(out["resid_pre"], 0.0, atol=1e-6)
