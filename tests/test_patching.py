"""Exact patching engine vs a plainly written naive loop (one full forward per component)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from attrpatch import Interventions, Patch, Task
from attrpatch.patching import (
    gaussian_noise_corruption,
    patch,
    resample_permutation,
    top_neurons,
)
from attrpatch.results import GRANULARITIES, PatchResults, Scores, grid_shape
from attrpatch.task import METRICS, MetricReference

ALL = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v",
       "z_by_pos", "q_by_pos", "k_by_pos", "v_by_pos", "pattern", "pattern_by_query",
       "pattern_by_entry")
NEURONS = [(0, 3), (1, 5), (1, 70), (0, 127)]
ATOL = 1e-5


def make_task(seed=0, batch=3, n_pos=7, first=2, same=False, mask=False, metric="logit_diff"):
    """Random prompts; corrupt differs from clean at positions >= `first` (per prompt shifted)."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(1, 61, (batch, n_pos))
    corrupt = clean.copy()
    if not same:
        for b in range(batch):
            f = min(first + b, n_pos - 1)
            corrupt[b, f:] = (clean[b, f:] + 1 + rng.integers(0, 59, n_pos - f)) % 61
    am = None
    if mask:
        am = np.ones((batch, n_pos), int)
        am[0, n_pos - 2:] = 0
    return Task(clean, corrupt, rng.integers(0, 61, (batch, 2)), rng.integers(0, 61, batch),
                attention_mask=am, metric=metric)


def site_mask(key, axes, comp, act_shape, neuron_ids=None):
    """Full ``[layer, batch, ...]`` boolean mask selecting one component."""
    named = dict(zip(axes, comp, strict=True))
    every = slice(None)
    sl = [named["layer"], every]
    if key == "attn.hook_pattern":
        sl += [named["head"], named.get("query_pos", every), named.get("key_pos", every)]
    elif key.startswith("attn."):
        sl += [named.get("pos", every), named["head"], every]
    elif "neuron" in named:
        sl += [named.get("pos", every), neuron_ids[named["neuron"]]]
    else:
        sl += [named["pos"], every]
    mask = np.zeros(act_shape, bool)
    mask[tuple(sl)] = True
    return mask


def naive(model, task, gran, direction="denoise", source="default", metric=None, seed=0,
          corrupt_iv=None, neurons=None):
    """Per-prompt effects ``[batch, *axes]`` by one full `model.run` per component."""
    key, axes = GRANULARITIES[gran]
    cfg = model.config
    am, ans = task.attention_mask, task.answer_positions
    corrupt_tokens = task.clean_tokens if corrupt_iv is not None else task.corrupt_tokens
    corrupt_iv = corrupt_iv or Interventions()
    clean_logits, clean_cache = model.run(task.clean_tokens, am, Interventions(), (key,), ans)
    corrupt_logits, corrupt_cache = model.run(corrupt_tokens, am, corrupt_iv, (key,), ans)
    ref = MetricReference(clean_logits, corrupt_logits)
    fn = METRICS[metric or task.metric]
    if source == "default" and direction == "denoise":
        base_tokens, base_iv, src = corrupt_tokens, corrupt_iv, clean_cache[key]
    elif source == "default":
        base_tokens, base_iv, src = task.clean_tokens, Interventions(), corrupt_cache[key]
    else:
        base_tokens, base_iv, act = task.clean_tokens, Interventions(), np.asarray(clean_cache[key])
        if source == "zero":
            src = np.zeros_like(act)
        elif source == "mean":  # over the prompts where the position is a real token
            real = np.ones((task.batch, task.n_pos)) if am is None else np.asarray(am)
            shape = [1] * act.ndim
            shape[1], shape[3 if key == "attn.hook_pattern" else 2] = real.shape
            w = real.reshape(shape)
            mean = (act * w).sum(1, keepdims=True) / np.maximum(w.sum(1, keepdims=True), 1)
            src = np.broadcast_to(mean, act.shape)
        else:
            src = act[:, resample_permutation(task.batch, seed)]
    src = jnp.asarray(src)
    base_logits, _ = model.run(base_tokens, am, base_iv, (), ans)
    base = np.asarray(fn(base_logits, task, ref))
    neuron_ids = None
    shape = grid_shape(gran, cfg, task.n_pos)
    out = np.full((task.batch, *shape), np.nan)
    comps = list(np.ndindex(shape))
    if neurons is not None:
        comps = [c for c in comps if (c[0], c[-1]) in set(neurons)]
        neuron_ids = np.arange(cfg.d_mlp)
    for comp in comps:
        mask = jnp.asarray(site_mask(key, axes, comp, src.shape, neuron_ids))
        iv = Interventions(dict(base_iv.delta), {key: Patch(mask, src)})
        logits, _ = model.run(base_tokens, am, iv, (), ans)
        out[(slice(None), *comp)] = np.asarray(fn(logits, task, ref)) - base
    return out


def check(res: PatchResults, gran, expected):
    got = res.scores[gran].per_prompt
    assert got.shape == expected.shape, gran
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=gran)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0, err_msg=gran)
    np.testing.assert_allclose(res[gran], np.mean(expected, 0), atol=ATOL, rtol=0, err_msg=gran)


def test_every_granularity_matches_naive_denoise(tiny_model):
    model, _ = tiny_model
    task = make_task(mask=True)
    grans = ALL + ("post", "post_by_pos")
    res = patch(model, task, grans, neurons=NEURONS, batch_size=5, per_prompt=True,
                progress=False)
    assert res.method == "exact" and res.direction == "denoise"
    for gran in grans:
        check(res, gran, naive(model, task, gran, neurons=NEURONS if gran.startswith("post") else None))
    assert np.isnan(res["post"][0, 0]) and not np.isnan(res["post"][0, 3])
    # patches before a prompt's first differing position are exactly zero, and some are not
    fd = task.first_diff_positions
    for gran in ("resid_pre", "z_by_pos", "post_by_pos"):
        pp = res.scores[gran].per_prompt
        for b in range(task.batch):
            assert (pp[b, :, : fd[b]][~np.isnan(pp[b, :, : fd[b]])] == 0).all()
        assert np.nanmax(np.abs(pp)) > 1e-3


def test_noise_direction_matches_naive(tiny_model):
    model, _ = tiny_model
    task = make_task(seed=1, first=1)
    grans = ("resid_post", "k_by_pos", "q", "pattern_by_query", "post_by_pos")
    res = patch(model, task, grans, direction="noise", neurons=NEURONS, batch_size=4,
                per_prompt=True, progress=False)
    assert res.direction == "noise"
    for gran in grans:
        check(res, gran, naive(model, task, gran, "noise",
                               neurons=NEURONS if gran.startswith("post") else None))


@pytest.mark.parametrize("source", ["zero", "mean", "resample"])
def test_ablations_match_naive(tiny_model, source):
    model, _ = tiny_model
    task = make_task(seed=2, mask=True)
    grans = ("resid_mid", "v_by_pos", "pattern")
    res = patch(model, task, grans, source=source, seed=3, batch_size=8, per_prompt=True,
                progress=False)
    assert res.direction == "noise" and res.source == source and res.complete
    for gran in grans:
        check(res, gran, naive(model, task, gran, "noise", source=source, seed=3))


def test_resample_permutation_is_seeded_derangement():
    for b in (2, 3, 8):
        p = resample_permutation(b, 5)
        assert sorted(p) == list(range(b)) and (p != np.arange(b)).all()
        np.testing.assert_array_equal(p, resample_permutation(b, 5))
    assert any((resample_permutation(8, s) != resample_permutation(8, 0)).any() for s in range(1, 5))


def test_gaussian_noise_corruption_and_metrics_match_naive(tiny_model):
    model, _ = tiny_model
    task = make_task(seed=4, same=True)
    iv = gaussian_noise_corruption(model, task, seed=1)
    embed = np.asarray(model.params["W_E"])[np.asarray(task.clean_tokens)]
    assert abs(np.asarray(iv.delta["hook_embed"]).std() / embed.std() - 3.0) < 0.5
    for metric in ("normalized_logit_diff", "kl"):
        res = patch(model, task, ("attn_out",), metric=metric, corrupt_interventions=iv,
                    per_prompt=True, progress=False)
        assert res.metric == metric
        check(res, "attn_out", naive(model, task, "attn_out", metric=metric, corrupt_iv=iv))


def test_identical_prompts_give_exact_zeros(tiny_model):
    model, _ = tiny_model
    task = make_task(same=True)
    for direction in ("denoise", "noise"):
        res = patch(model, task, ALL, direction=direction, per_prompt=True, progress=False)
        for gran in ALL:
            assert (res.scores[gran].per_prompt == 0).all(), gran
        assert res.gap == 0


def test_identical_runs_through_the_compute_path_give_zeros(tiny_model, monkeypatch):
    """With the inert-patch shortcuts disabled every patch really runs, and changes nothing (to
    float rounding: the engine recomputes in another order than the full forward)."""
    import attrpatch.patching as P

    model, _ = tiny_model
    task = make_task(seed=8, same=True)
    calls = []
    real = P._run_layers
    monkeypatch.setattr(P, "_unchanged", lambda gran, base, src, grids: np.zeros(
        (len(grids), base.shape[0]), bool))
    monkeypatch.setattr(P, "_run_layers", lambda *a, **k: calls.append(1) or real(*a, **k))
    same_iv = Interventions(delta={"hook_embed": jnp.zeros((task.batch, task.n_pos, 32))})
    grans = ("resid_pre", "z_by_pos", "pattern", "v")
    res = patch(model, task, grans, per_prompt=True, progress=False, corrupt_interventions=same_iv)
    assert calls
    for gran in grans:
        np.testing.assert_allclose(res.scores[gran].per_prompt, 0, atol=ATOL, err_msg=gran)


def test_batch_size_does_not_change_results(tiny_model):
    model, _ = tiny_model
    task = make_task(seed=5, mask=True)
    grans = ("resid_pre", "z_by_pos")
    runs = [patch(model, task, grans, batch_size=bs, per_prompt=True, progress=False)
            for bs in (1, 3, 64)]
    for r in runs[1:]:
        for gran in grans:
            np.testing.assert_allclose(r.scores[gran].per_prompt, runs[0].scores[gran].per_prompt,
                                       atol=1e-5, rtol=0)


def test_interrupt_keeps_partial_results_and_checkpoint_resumes(tiny_model, tmp_path, monkeypatch):
    import attrpatch.patching as P

    model, _ = tiny_model
    task = make_task(seed=6)
    grans = ("attn_out", "z")
    kw = dict(per_prompt=True, progress=False)
    real, calls = P._run_layers, []

    def spy(model_, task_, reference, metric_fn, gran, work, *args, **kwargs):
        calls.append((gran, [layer for layer, _ in work]))
        return real(model_, task_, reference, metric_fn, gran, work, *args, **kwargs)

    def flaky(*args, **kwargs):
        if len(calls) == 1:
            calls.append(None)
            raise KeyboardInterrupt
        return spy(*args, **kwargs)

    monkeypatch.setattr(P, "_run_layers", spy)
    full = patch(model, task, grans, **kw)
    # attn_out's two layers differ in chunk shape (only the answer row of the last layer runs):
    # two compiled calls; z's layers go in one
    assert calls == [("attn_out", [0]), ("attn_out", [1]), ("z", [0, 1])]
    calls.clear()
    monkeypatch.setattr(P, "_run_layers", flaky)
    with pytest.warns(UserWarning, match="interrupted"):
        part = patch(model, task, grans, checkpoint_dir=tmp_path, **kw)
    assert np.isnan(part["z"]).all() and np.isnan(part["attn_out"][1]).all()
    assert full.complete and not part.complete
    done = ~np.isnan(part["attn_out"])
    assert done[0].all()
    np.testing.assert_array_equal(part["attn_out"][done], full["attn_out"][done])
    saved = sorted(f.name for f in tmp_path.iterdir())
    assert "meta.json" in saved and not any(f.startswith(".tmp") for f in saved)
    resumed = patch(model, task, grans, checkpoint_dir=tmp_path, **kw)
    assert calls[2:] == [("attn_out", [1]), ("z", [0, 1])]  # layer 0 of attn_out from its file
    for gran in grans:
        np.testing.assert_array_equal(resumed.scores[gran].per_prompt, full.scores[gran].per_prompt)
    # a different task must not resume from these files
    with pytest.raises(ValueError, match="different"):
        patch(model, make_task(seed=7), grans, progress=False, checkpoint_dir=tmp_path)


def test_top_neurons_and_neurons_from_results(tiny_model):
    model, _ = tiny_model
    vals = np.zeros((2, 128))
    vals[1, 9], vals[0, 4] = -5.0, 2.0
    atp = PatchResults("atp", "denoise", "logit_diff", 0.0, 1.0, {"post": Scores("post", vals)})
    assert top_neurons(atp, 2) == [(1, 9), (0, 4)]
    res = patch(model, make_task(), ("post",), neurons=atp, progress=False)
    assert not np.isnan(res["post"][1, 9]) and (~np.isnan(res["post"])).sum() == 64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(granularities=("resid_prex",)), "unknown granularity"),
        (dict(direction="sideways"), "unknown direction"),
        (dict(source="ones"), "unknown source"),
        (dict(source="zero", direction="denoise"), "direction='noise'"),
        (dict(batch_size=0), "batch_size"),
        (dict(granularities=("post",)), "neurons="),
        (dict(granularities=("post",), neurons=[(2, 0)]), "outside"),
        (dict(granularities=("post",), neurons=[3, 5]), "pairs"),
        (dict(corrupt_interventions=Interventions(delta={"hook_resid_pre": np.zeros(1)})),
         "only hook_embed"),
        (dict(metric="accuracy"), "unknown metric"),
    ],
)
def test_bad_input_errors(tiny_model, kwargs, match):
    model, _ = tiny_model
    kwargs = dict(granularities=("resid_pre",)) | kwargs
    with pytest.raises(ValueError, match=match):
        patch(model, make_task(), progress=False, **kwargs)


def test_bad_tokens_error(tiny_model):
    model, _ = tiny_model
    task = Task(np.full((2, 5), 70), np.full((2, 5), 3), [1, 2], [3, 4])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        patch(model, task, progress=False)


def test_attention_only_model_defaults_match_naive():
    import jax

    from attrpatch import Model
    from attrpatch.arch import ModelConfig
    from attrpatch.arch.transformer import init_params

    cfg = ModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=64, n_ctx=8, d_vocab=61,
                     attn_only=True)
    params = init_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x + 0.1, params)  # non-trivial
    model = Model(cfg, params)
    task = make_task(seed=8, n_pos=5, first=1)
    res = patch(model, task, per_prompt=True, progress=False)
    assert set(res.scores) == {"resid_pre", "attn_out", "z"}
    assert np.nanmax(np.abs(res["resid_pre"])) > 1e-3
    for gran in res.scores:
        check(res, gran, naive(model, task, gran))
    with pytest.raises(ValueError, match="attention-only"):
        patch(model, task, ("mlp_out",), progress=False)


def test_no_op_patches_are_exact_zeros_and_not_run(tiny_model, monkeypatch):
    """Corrupt differs from clean at one middle token: resid_pre patches of layer 0 elsewhere write
    the value already there (exact zeros, never run); later layers differ there and match naive."""
    import attrpatch.patching as P

    model, _ = tiny_model
    rng = np.random.default_rng(9)
    clean = rng.integers(1, 61, (2, 6))
    corrupt = clean.copy()
    corrupt[:, 2] = (clean[:, 2] + 7) % 61
    task = Task(clean, corrupt, rng.integers(0, 61, 2), rng.integers(0, 61, 2))
    real, runs = P._run_layers, []

    def spy(model_, task_, reference, metric_fn, gran, work, *args, **kwargs):
        runs.extend((gran, layer, sorted(int(i) for _, rows in chunks
                                         for i in rows.idx[: len(_), 0])) for layer, chunks in work)
        return real(model_, task_, reference, metric_fn, gran, work, *args, **kwargs)

    monkeypatch.setattr(P, "_run_layers", spy)
    grans = ("resid_pre", "z_by_pos", "mlp_out")
    res = patch(model, task, grans, per_prompt=True, progress=False)
    for gran in grans:
        check(res, gran, naive(model, task, gran))
    pp = res.scores["resid_pre"].per_prompt
    assert (pp[:, 0, 3:] == 0).all() and np.abs(pp[:, 1, 3:]).max() > 1e-4
    assert [p for g, layer, ps in runs if g == "resid_pre" and layer == 0 for p in ps] == [2]
    # by-position patches of row-local sites in the last layer reach the logits only at the answer
    last = [set(ps) for g, layer, ps in runs if g in ("z_by_pos", "mlp_out") and layer == 1]
    assert len(last) == 2 and all(ps == {5} for ps in last)


def test_packed_rows_are_exactly_each_runs_start_to_answer():
    """Each non-inert (variant, prompt) run gets its positions start..answer once (start: the
    patch position, or the prompt's first difference for all-position patches); inert runs and
    padding slots get none; the chunks of a layer share one padded shape."""
    from attrpatch.patching import _chunks

    B, n = 3, 9
    cpos = np.array([-1, 0, 2, 4, 5, 8, 3])
    idx = np.zeros((len(cpos), 4), np.int32)
    idx[:, 0], idx[:, 1] = np.maximum(cpos, 0), np.arange(len(cpos))
    fd, ans = np.array([1, 3, 0]), np.array([8, 6, 4])
    inert = np.where(cpos[:, None] >= 0, (cpos[:, None] < fd) | (cpos[:, None] > ans), fd > ans)
    inert[3, 0] = True  # say, a patch writing the value already there
    active = np.flatnonzero(~inert.all(1))
    chunks = _chunks(idx, cpos, inert, fd, ans, n, max_variants=3)
    assert len(chunks) == -(-len(active) // 3)
    assert len({(rows.idx.shape, rows.flat.shape) for _, rows in chunks}) == 1
    np.testing.assert_array_equal(np.sort(np.concatenate([v for v, _ in chunks])), active)
    for variants, rows in chunks:
        V, R = rows.idx.shape[0], len(rows.flat)
        assert len(variants) <= 3 and V <= 3
        real = rows.flat[rows.flat < V * B * n]
        assert len(set(real.tolist())) == len(real)
        np.testing.assert_array_equal(rows.layout_row[real], np.arange(len(real)))
        assert (np.delete(rows.layout_row, real) == R).all()
        for v in range(V):
            for b in range(B):
                run = v * B + b
                got = sorted((real[real // n == run] % n).tolist())
                if v >= len(variants) or inert[variants[v], b]:
                    assert got == [] and rows.first_row[run] == rows.answer_row[run] == R
                    continue
                c = variants[v]
                np.testing.assert_array_equal(rows.idx[v], idx[c])
                start = cpos[c] if cpos[c] >= 0 else fd[b]
                assert got == list(range(start, ans[b] + 1))
                assert rows.flat[rows.first_row[run]] % n == start
                assert rows.flat[rows.answer_row[run]] % n == ans[b]


def test_any_grouping_of_layers_into_calls_matches_naive(tiny_model, monkeypatch):
    """One compiled call runs several layers' chunks in turn, and the calls of one shape share a
    stack depth (turns past a call's own chunks are not run). With batch_size=1 layer 0 has three
    chunks and layer 1 one, all of one shape: grouped in one call, or one call per layer (layer
    1's call then runs 1 of its 3 turns), the effects are the naive loop's."""
    import attrpatch.patching as P

    model, _ = tiny_model
    task = make_task(seed=11)
    picks = {"z": [(0, 0), (0, 1), (0, 2), (1, 3)]}
    expected = naive(model, task, "z")
    real, calls = P._run_layers, []

    def spy(model_, task_, reference, metric_fn, gran, work, depth, *args, **kwargs):
        calls.append(([layer for layer, _ in work], depth))
        return real(model_, task_, reference, metric_fn, gran, work, depth, *args, **kwargs)

    monkeypatch.setattr(P, "_run_layers", spy)
    for split in (lambda todo, n_layers: [todo], lambda todo, n_layers: [[e] for e in todo]):
        monkeypatch.setattr(P, "_call_groups", split)
        res = patch(model, task, ("z",), components=picks, batch_size=1, per_prompt=True,
                    progress=False)
        got = res.scores["z"].per_prompt
        for layer, head in picks["z"]:
            np.testing.assert_allclose(got[:, layer, head], expected[:, layer, head], atol=ATOL,
                                       rtol=0)
    assert calls == [([0, 1], 4), ([0], 3), ([1], 3)]


def test_components_patch_only_those(tiny_model):
    model, _ = tiny_model
    task = make_task(seed=10, mask=True)
    picks = {"resid_pre": [(0, 3), (1, 6)], "z_by_pos": [(1, 4, 2)], "post_by_pos": [(0, 5, 70)]}
    res = patch(model, task, tuple(picks), components=picks, per_prompt=True, progress=False)
    for gran, indices in picks.items():
        expected = naive(model, task, gran, neurons=[(0, 70)] if gran == "post_by_pos" else None)
        got = res.scores[gran].per_prompt
        assert np.isfinite(got).sum() == len(indices) * task.batch, gran
        for index in indices:
            np.testing.assert_allclose(got[(slice(None), *index)], expected[(slice(None), *index)],
                                       atol=ATOL, rtol=0, err_msg=gran)
    with pytest.raises(ValueError, match="not an index"):
        patch(model, task, ("z",), components={"z": [(0, 99)]}, progress=False)
    with pytest.raises(ValueError, match="not among the granularities"):
        patch(model, task, ("z",), components={"k": [(0, 1)]}, progress=False)


def test_bfloat16_model_matches_float32_within_stated_tolerance(tiny_model):
    """bf16 compute (float32 LayerNorm, attention logits and unembedding): effects within 5% of
    the largest float32 effect."""
    import jax

    from attrpatch import Model

    model, _ = tiny_model
    bf16 = Model(model.config, jax.tree.map(lambda a: a.astype(jnp.bfloat16), model.params))
    task = make_task(seed=11, mask=True)
    grans = ("resid_pre", "z_by_pos", "pattern")
    full, low = (patch(m, task, grans, progress=False) for m in (model, bf16))
    for gran in grans:
        scale = np.nanmax(np.abs(full[gran]))
        assert scale > 1e-3
        np.testing.assert_allclose(low[gran], full[gran], atol=0.05 * scale, rtol=0, err_msg=gran)
