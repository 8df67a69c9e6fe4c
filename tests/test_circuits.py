"""Edges and circuits: EAP against node AtP, exact edge patching against its defining identities
and a naive implementation, linear models, and the shipped induction circuit."""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import FAMILIES
from test_attribution import linearized, make_task, reference_of, runs

from attrpatch import Interventions, Patch, attribute, load_model, patch, task_for_model
from attrpatch.circuits import (
    EdgeGraph,
    attribute_edges,
    faithfulness_curve,
    find_circuit,
    patch_edges,
    patch_edges_each,
    validate_edges,
    verify_edges,
)
from attrpatch.circuits.engine import EdgeEdit, edge_forward
from attrpatch.task import METRICS

INDUCTION = "models/attn-only-2l-induction"


def _model(name, tiny_model, family):
    return tiny_model[0] if name == "gpt2" else family(name)[0]


# ----------------------------------------------------------------------------------------------
# The graph


def test_graph_follows_eap_ig_conventions(family, tiny_model):
    gpt2 = EdgeGraph(tiny_model[0].config)  # 2 layers, 4 heads, sequential
    assert gpt2.sources[:3] == ("input", "a0.h0", "a0.h1") and gpt2.sources[-1] == "m1"
    assert gpt2.destinations[:5] == ("a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>", "a0.h0<k>")
    assert gpt2.destinations[-2:] == ("m1", "logits")
    edges = set(gpt2.edge_list())
    assert ("a0.h1", "m0") in edges and ("a0.h1", "a0.h2<q>") not in edges
    assert ("m1", "logits") in edges and ("m1", "a1.h0<q>") not in edges
    # 1 + 4 + 1 + 4 + 1 sources; every source reaches the logits and everything after it
    assert gpt2.n_edges == sum(gpt2.exists[i].sum() for i in range(len(gpt2.sources)))
    parallel = EdgeGraph(family("gpt_neox-parallel-partial-rotary")[0].config)
    assert ("a0.h1", "m0") not in set(parallel.edge_list())  # parallel block: the MLP reads resid_pre
    gqa = EdgeGraph(family("llama-gqa-llama3-rope")[0].config)  # 4 query heads, 2 kv heads
    assert "a1.h1<k>" in gqa.destinations and "a1.h2<k>" not in gqa.destinations
    sandwich = EdgeGraph(family("gemma2-softcap-window")[0].config)
    assert sandwich.sources == ("input", "a0", "m0", "a1", "m1")


def test_bad_edges_are_refused_by_name(tiny_model):
    graph = EdgeGraph(tiny_model[0].config)
    with pytest.raises(ValueError, match="unknown source 'a9.h0'"):
        graph.mask_of([("a9.h0", "logits")])
    with pytest.raises(ValueError, match="no edge m1 -> a0.h0<q>"):
        graph.mask_of([("m1", "a0.h0<q>")])
    with pytest.raises(ValueError, match="position must be an integer"):
        graph.mask_of([("input", "logits", 7)], n_pos=6)
    with pytest.raises(ValueError, match="unknown edge method"):
        attribute_edges(tiny_model[0], make_task(), method="acdc")


# ----------------------------------------------------------------------------------------------
# The identities, on every family


@pytest.mark.parametrize("name", ["gpt2", *FAMILIES])
def test_edge_patching_identities_and_eap_sums_to_node_atp(name, tiny_model, family):
    """All edges = the source run, none = the base run, all out-edges of a node = patching that
    node; EAP summed over a source's edges = the node's AtP (exactly, up to float rounding)."""
    model = _model(name, tiny_model, family)
    task = make_task(seed=2, padded=True)
    graph = EdgeGraph(model.config)
    eap = attribute_edges(model, task, "eap")
    np.testing.assert_allclose(patch_edges(model, task, graph.edge_list()), eap.source_metric,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(patch_edges(model, task, []), eap.base_metric, rtol=1e-6, atol=1e-6)

    node = "a1.h1" if graph.head_sources else "a1"
    leaving = [(s, d) for s, d in graph.edge_list() if s == node]
    granularity = "z" if graph.head_sources else "attn_out"
    exact = patch(model, task, (granularity,))[granularity][1]
    exact = exact[1] if graph.head_sources else exact.sum()  # attn_out is per position
    if not graph.head_sources:  # patching attn_out at all positions at once, by hand
        base, source = runs("denoise", task)
        src_out = model.run(source, task.attention_mask, cache_keys=("hook_attn_out",))[1]["hook_attn_out"]
        mask = np.zeros((model.config.n_layers, 1, 1, 1), bool)
        mask[1] = True
        iv = Interventions(patch={"hook_attn_out": Patch(jnp.asarray(mask), src_out)})
        logits = model.run(base, task.attention_mask, iv, logit_positions=task.answer_positions)[0]
        metric = METRICS["logit_diff"](logits, task, reference_of(model, task)).mean()
        exact = float(metric) - eap.base_metric
    np.testing.assert_allclose(patch_edges(model, task, leaving) - eap.base_metric, exact,
                               rtol=1e-4, atol=1e-5)

    atp = attribute(model, task, ("z", "attn_out", "mlp_out"))
    per_source = np.nansum(eap.scores, axis=1)
    scale = np.abs(per_source).max()
    for layer in range(model.config.n_layers):
        heads = per_source[graph.attn_source_slice(layer)]
        node_atp = atp["z"][layer] if graph.head_sources else atp["attn_out"][layer].sum()[None]
        np.testing.assert_allclose(heads, node_atp, atol=1e-5 * scale)
        np.testing.assert_allclose(per_source[graph.mlp_source_index(layer)],
                                   atp["mlp_out"][layer].sum(), atol=1e-5 * scale)


# ----------------------------------------------------------------------------------------------
# Single edges against a naive implementation: recompute the destination from its input moved by
# the source's difference, and patch that one site.


def _norm(x, w, b, cfg):
    x = x.astype(jnp.float32)
    if cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * w + (0 if b is None else b)


def _naive_single_edge(model, task, source, destination):
    cfg, p = model.config, model.params
    blocks = p["blocks"]
    base, src = runs("denoise", task)
    keys = ("hook_embed", "hook_pos_embed", "attn.hook_z", "hook_mlp_out", "hook_resid_pre",
            "hook_resid_mid", "hook_resid_post")
    keys = tuple(k for k in keys if k in model.site_names or f"blocks.0.{k}" in model.site_names)
    cache_base = model.run(base, task.attention_mask, cache_keys=keys)[1]
    cache_src = model.run(src, task.attention_mask, cache_keys=keys)[1]

    def output(cache):
        if source == "input":
            return cache["hook_embed"] + cache.get("hook_pos_embed", 0.0)
        layer = int(source[1:].split(".")[0])
        if source.startswith("m"):
            return cache["hook_mlp_out"][layer]
        head = int(source.split(".h")[1])
        return cache["attn.hook_z"][layer][:, :, head] @ blocks["W_O"][layer, head]

    delta = output(cache_src) - output(cache_base)
    L = cfg.n_layers
    if destination == "logits":
        resid = cache_base["hook_resid_post"][-1] + delta
        at_answer = resid[jnp.arange(task.batch), task.answer_positions]
        normalized = _norm(at_answer, p["ln_f_w"], p.get("ln_f_b"), cfg)
        iv = Interventions(patch={"ln_final.hook_normalized": Patch(jnp.asarray(True), normalized)})
    elif "<" in destination:
        layer = int(destination[1:].split(".")[0])
        head = int(destination.split(".h")[1].split("<")[0])
        kind = destination[-2].upper()
        x = _norm(cache_base["hook_resid_pre"][layer] + delta, blocks["ln1_w"][layer],
                  blocks.get("ln1_b", [None] * L)[layer], cfg)
        value = x @ blocks[f"W_{kind}"][layer][:, head]
        if cfg.qkv_bias:
            value = value + blocks[f"b_{kind}"][layer][head]
        n_heads = blocks[f"W_{kind}"].shape[2]
        full = jnp.zeros((L, task.batch, task.n_pos, n_heads, value.shape[-1]))
        full = full.at[layer, :, :, head].set(value)
        mask = np.zeros((L, 1, 1, n_heads, 1), bool)
        mask[layer, :, :, head] = True
        iv = Interventions(patch={f"attn.hook_{kind.lower()}": Patch(jnp.asarray(mask), full)})
    else:  # an MLP's input
        layer = int(destination[1:])
        read = "hook_resid_pre" if cfg.parallel_attn_mlp else "hook_resid_mid"
        x = _norm(cache_base[read][layer] + delta, blocks["ln2_w"][layer],
                  blocks.get("ln2_b", [None] * L)[layer], cfg)
        patches = {}
        for site, weight, bias in (("mlp.hook_pre", "W_gate" if cfg.gated_mlp else "W_in", "b_in"),
                                   ("mlp.hook_pre_linear", "W_in", "b_in")):
            if site == "mlp.hook_pre_linear" and not cfg.gated_mlp:
                continue
            value = x @ blocks[weight][layer]
            if cfg.mlp_bias:
                value = value + blocks[bias if weight == "W_in" else "b_gate"][layer]
            mask = np.zeros((L, 1, 1, 1), bool)
            mask[layer] = True
            patches[site] = Patch(jnp.asarray(mask), jnp.broadcast_to(value, (L, *value.shape)))
        iv = Interventions(patch=patches)
    logits = model.run(base, task.attention_mask, iv, logit_positions=task.answer_positions)[0]
    reference = reference_of(model, task)
    patched = METRICS["logit_diff"](logits, task, reference).mean()
    base_logits = model.run(base, task.attention_mask, logit_positions=task.answer_positions)[0]
    return float(patched - METRICS["logit_diff"](base_logits, task, reference).mean())


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-llama3-rope"])
def test_single_edge_effects_match_a_naive_implementation(name, tiny_model, family):
    model = _model(name, tiny_model, family)
    task = make_task(seed=3, padded=True)
    edges = [("input", "a0.h2<q>"), ("input", "a1.h1<k>"), ("a0.h3", "a1.h0<v>"),
             ("a0.h1", "m0"), ("m0", "a1.h3<q>"), ("a1.h2", "logits"), ("m1", "logits"),
             ("input", "m1")]
    exact = patch_edges_each(model, task, edges, chunk_size=3)
    got = np.array([exact.score(s, d) for s, d in edges])
    want = np.array([_naive_single_edge(model, task, s, d) for s, d in edges])
    assert np.abs(want).max() > 1e-2  # the edges really move the metric
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.isnan(exact.scores).sum() == exact.scores.size - len(edges)


@pytest.mark.parametrize("name, edges", [
    ("olmo2-postnorm-qknorm", [("input", "a0.h1<q>"), ("input", "a0.h1<k>"), ("a0", "a1.h3<q>"),
                               ("m0", "a1.h0<k>"), ("a0", "a1.h1<v>"), ("input", "m1"), ("a1", "logits")]),
    ("qwen3-qknorm-window", [("input", "a0.h3<q>"), ("a0.h2", "a1.h1<k>"), ("m0", "a1.h0<q>")]),
])
def test_eap_is_the_derivative_of_single_edge_patching(name, edges, family):
    """EAP of an edge = d/d(alpha) of the exact edge forward with alpha times the source's
    difference added to that destination's input alone (jax.jvp): each q/k head's share of a
    whole-projection q/k norm (OLMo 2, no input norms), and per-head q/k norms (Qwen3)."""
    model = family(name)[0]
    task = make_task(seed=2, padded=True)
    graph = EdgeGraph(model.config)
    base, src = runs("denoise", task)
    keys = ("hook_embed", "attn.hook_z", "hook_attn_out", "hook_mlp_out")
    caches = [model.run(t, task.attention_mask, cache_keys=[k for k in keys if any(
        n.endswith(k) for n in model.site_names)])[1] for t in (base, src)]
    reference = reference_of(model, task)

    def output(cache, source):
        if source == "input":
            return cache["hook_embed"]
        layer = int(source[1:].split(".")[0])
        if source.startswith("m"):
            return cache["hook_mlp_out"][layer]
        if "." not in source:
            return cache["hook_attn_out"][layer]
        head = int(source.split(".h")[1])
        return cache["attn.hook_z"][layer][:, :, head] @ model.params["blocks"]["W_O"][layer, head]

    @jax.jit
    def derivative(destination, delta):
        def metric(alpha):
            logits = edge_forward(model.params, model.config, base, task.attention_mask,
                                  task.answer_positions, EdgeEdit(one_destination=destination,
                                                                  one_delta=alpha * delta))
            return METRICS["logit_diff"](logits, task, reference).mean()
        return jax.jvp(metric, (0.0,), (1.0,))[1]

    want = np.array([derivative(graph.destination_index(d), output(caches[1], s) - output(caches[0], s))
                     for s, d in edges])
    eap = attribute_edges(model, task, "eap")
    got = np.array([eap.score(s, d) for s, d in edges])
    assert np.abs(want).min() > 1e-4
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_by_position_edges_sum_to_the_edge(tiny_model):
    model, task = tiny_model[0], make_task(seed=4)
    eap = attribute_edges(model, task, "eap")
    by_pos = attribute_edges(model, task, "eap", by_pos=True)
    np.testing.assert_allclose(np.nansum(by_pos.scores, -1)[np.isfinite(eap.scores)],
                               eap.scores[np.isfinite(eap.scores)], atol=1e-6)
    one = patch_edges_each(model, task, [("input", "a1.h0<v>", 3)], by_pos=True)
    plain = patch_edges(model, task, [("input", "a1.h0<v>", 3)])
    np.testing.assert_allclose(one.score("input", "a1.h0<v>", 3), plain - one.base_metric, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Where the model is linear, the estimates are exact


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_linear_model_eap_and_eap_ig_equal_exact_edge_patching(tiny_model, direction):
    model = linearized(tiny_model[0], attn_only=True, constant_attention=True)
    task = make_task(seed=5)
    exact = patch_edges_each(model, task, direction=direction, chunk_size=32)
    finite = np.isfinite(exact.scores)
    assert np.abs(exact.scores[finite]).max() > 1e-2
    for method in ("eap", "eap_ig_inputs", "eap_ig_activations"):
        est = attribute_edges(model, task, method, steps=2, direction=direction)
        assert (np.isfinite(est.scores) == finite).all()
        np.testing.assert_allclose(est.scores[finite], exact.scores[finite], rtol=1e-3,
                                   atol=1e-4 * np.abs(exact.scores[finite]).max(), err_msg=method)
    assert validate_edges(attribute_edges(model, task, direction=direction), exact).verdict == "reliable"


def test_eap_misses_what_exact_sees_on_a_nonlinear_model_and_validation_says_so(tiny_model):
    model, task = tiny_model[0], make_task(seed=6)
    exact = patch_edges_each(model, task, chunk_size=32)
    eap = attribute_edges(model, task)
    assert not np.allclose(eap.scores[np.isfinite(exact.scores)], exact.scores[np.isfinite(exact.scores)],
                           rtol=1e-2)
    flipped = attribute_edges(model, task)
    top = np.unravel_index(np.nanargmax(np.abs(exact.scores)), exact.scores.shape)
    flipped.scores[top] = -exact.scores[top]
    report = validate_edges(flipped, exact)
    assert report.flags[0].kind == "sign flip"
    assert (report.flags[0].source, report.flags[0].destination) == (
        exact.sources[top[0]], exact.destinations[top[1]])


# ----------------------------------------------------------------------------------------------
# Circuits


def test_find_circuit_top_and_greedy(tiny_model):
    model, task = tiny_model[0], make_task(seed=7)
    eap = attribute_edges(model, task)
    ranked = [e[:2] for e in eap.edges()]
    assert find_circuit(eap, n_edges=5) == ranked[:5]
    threshold = abs(eap.edges()[3][-1])
    assert find_circuit(eap, threshold=threshold) == ranked[:4]
    greedy = find_circuit(eap, n_edges=12, how="greedy")
    assert len(greedy) == 12 and greedy[0][1] == "logits"
    reached = {"logits"}
    for s, d in greedy:  # every edge's destination is read by a node already in the circuit
        owner = d if "<" not in d else d.split("<")[0]
        assert d == "logits" or owner in reached or d.split("<")[0] in reached, (s, d)
        reached.add(s)
    with pytest.raises(ValueError, match="exactly one of n_edges= and threshold="):
        find_circuit(eap)


def test_faithfulness_is_zero_for_no_edges_and_one_for_all(tiny_model):
    model, task = tiny_model[0], make_task(seed=8)
    eap = attribute_edges(model, task)
    n = EdgeGraph(model.config).n_edges
    points = faithfulness_curve(model, task, {"eap": eap}, [0, n])
    assert [p.n_edges for p in points] == [0, n]
    np.testing.assert_allclose([p.faithfulness for p in points], [0.0, 1.0], atol=1e-4)
    # EAP-IG's convention: the circuit runs live on the clean run, the rest gets corrupted values
    eap_ig_style = faithfulness_curve(model, task, {"eap": eap}, [0, n], direction="noise",
                                      complement=True)
    np.testing.assert_allclose([p.faithfulness for p in eap_ig_style], [1.0, 0.0], atol=1e-4)


def test_induction_circuit_previous_token_head_feeds_induction_keys():
    """Corrupting the token before the answer's first occurrence breaks the key the induction
    heads match: the previous-token head (L0H0) -> induction heads' keys edges carry it."""
    model = load_model(INDUCTION)
    task = task_for_model(INDUCTION, n_prompts=8, corrupt="previous")
    graph = EdgeGraph(model.config)
    for method in ("eap_ig_inputs", "exact"):
        scores = (patch_edges_each(model, task, chunk_size=32) if method == "exact"
                  else attribute_edges(model, task, method))
        between_heads = [(s, d) for s, d, _ in scores.edges() if s != "input" and d != "logits"]
        assert between_heads[0][0] == "a0.h0" and between_heads[0][1].endswith("<k>"), method
        assert between_heads[0][1].startswith("a1.h"), method
    exact = patch_edges_each(model, task, chunk_size=32)
    check = verify_edges(model, task, attribute_edges(model, task, "eap_ig_inputs"), n_top=5,
                         n_random=5)
    assert np.isfinite(check.scores).sum() == 10 and graph.n_edges > 10
    np.testing.assert_allclose(check.scores[np.isfinite(check.scores)],
                               exact.scores[np.isfinite(check.scores)], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The command line


def test_circuit_command_writes_every_file_and_refuses_bad_input(tmp_path, capsys):
    from attrpatch.cli import main

    out = tmp_path / "circ"
    assert main(["circuit", "--model", INDUCTION, "--n-prompts", "4", "--edges", "5,10",
                 "--method", "eap,eap_ig_inputs", "--out", str(out), "--no-compile-cache"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == summary["files"] == sorted(
        ["edges.csv", "faithfulness.csv", "circuit.png", "faithfulness.png", "report.html",
         "summary.json"])
    assert [(p["method"], p["n_edges"]) for p in summary["faithfulness"]] == [
        (m, n) for m in ("eap", "eap_ig_inputs", "exact") for n in (5, 10)]
    rows = list(csv.DictReader(open(out / "edges.csv")))
    assert len(rows) == EdgeGraph(load_model(INDUCTION).config).n_edges
    assert all(r["exact"] for r in rows)  # a graph this small is verified edge by edge
    assert "verdict" in (out / "report.html").read_text()
    assert main(["circuit", "--model", INDUCTION, "--method", "acdc", "--out",
                 str(tmp_path / "x")]) == 2
    assert "unknown edge method 'acdc'" in capsys.readouterr().err
    assert main(["circuit", "--model", INDUCTION, "--edges", "ten", "--out",
                 str(tmp_path / "x")]) == 2
    assert "--edges takes edge counts" in capsys.readouterr().err
    assert main(["circuit", "--model", INDUCTION, "--data", f"{INDUCTION}/attrpatch_task.json",
                 "--n-prompts", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--n-prompts applies to the model's own task" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
