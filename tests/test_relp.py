"""RelP (relevance patching): AtP with the backward's local gradients replaced by LRP rules.

Checked against a hand-written torch forward with ``.detach()`` at the same points (tiny GPT-2 and
tiny Llama), against AtP where a rule is a no-op, and against LRP's conservation identity.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from attrpatch import Model, Task, attribute
from attrpatch.arch import ModelConfig
from attrpatch.arch.transformer import init_params

RULES = ("ln", "attention", "identity", "half")
GRANS = ("resid_pre", "attn_out", "mlp_out", "z", "post")

GPT2 = ModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=24, n_ctx=16, d_vocab=23)
LLAMA = ModelConfig(n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, d_mlp=24, n_ctx=16, d_vocab=23,
                    architecture="llama", norm="rmsnorm", positions="rotary", gated_mlp=True,
                    act_fn="silu", qkv_bias=False, attn_out_bias=False, mlp_bias=False,
                    tie_word_embeddings=False)


def random_model(cfg: ModelConfig, seed: int = 0, scale: float = 0.5, biases: bool = True) -> Model:
    """Random weights big enough that every nonlinearity matters; norms and biases non-trivial."""
    params = init_params(cfg, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        name = jax.tree_util.keystr(path)
        if "ln" in name and "_w" in name:
            return x + 0.3 * rng.standard_normal(x.shape).astype(np.float32)
        if "b_" in name or "ln" in name:
            return 0.2 * rng.standard_normal(x.shape).astype(np.float32) if biases else 0 * x
        fan_in = x.shape[-1] if x.ndim > 1 else 1
        return scale * rng.standard_normal(x.shape).astype(np.float32) / math.sqrt(fan_in)

    return Model(cfg, jax.tree_util.tree_map_with_path(perturb, params))


def random_task(vocab: int = 23, batch: int = 3, n_pos: int = 7, seed: int = 0) -> Task:
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, vocab, (batch, n_pos))
    corrupt = clean.copy()
    corrupt[:, 2] = (clean[:, 2] + 1 + rng.integers(0, vocab - 1, batch)) % vocab
    corrupt[:, 4] = (clean[:, 4] + 1 + rng.integers(0, vocab - 1, batch)) % vocab
    return Task(clean, corrupt, rng.integers(0, vocab, (batch, 1)), rng.integers(0, vocab, (batch, 1)))


# ----------------------------------------------------------------------------------------------
# The independent reference: the same model written plainly in torch (float64), the rules as
# .detach() at the points the RelP paper names.


def torch_forward(model: Model, tokens, rules, taps: dict):
    """Logits at the last position ``[batch, d_vocab]``; `taps` gets every layer's resid_pre,
    attn_out, mlp_out, z and mlp post (tensors that keep their gradient)."""
    import torch

    cfg = model.config
    p = jax.tree.map(lambda x: torch.tensor(np.asarray(x, np.float64)), model.params)
    b, n = tokens.shape
    H, K, dh = cfg.n_heads, cfg.kv_heads, cfg.d_head

    def norm(x, w, bias):
        if cfg.norm == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
        if "ln" in rules:
            scale = scale.detach()
        out = x * scale * w
        return out if bias is None else out + bias

    def act(x):
        if cfg.act_fn == "silu":
            y = x * torch.sigmoid(x)
        else:  # gelu_new
            y = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))
        return x * (y / x).detach() if "identity" in rules else y

    def rotate(x):
        r = cfg.rotary_width
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
        half = torch.cat([-x[..., r // 2:], x[..., : r // 2]], -1)
        return x * cos + half * sin

    x = p["W_E"][torch.as_tensor(tokens)]
    if cfg.positions == "learned":
        x = x + p["W_pos"][:n]
    x = x.detach().requires_grad_(torch.is_grad_enabled())

    def tap(name, t):
        taps.setdefault(name, []).append(t)
        if t.requires_grad:
            t.retain_grad()
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for layer in range(cfg.n_layers):
        w = {k: v[layer] for k, v in p["blocks"].items()}
        tap("resid_pre", x)
        h = norm(x, w["ln1_w"], w.get("ln1_b"))
        q, k, v = (torch.einsum("bpd,dhe->bphe", h, w[f"W_{s}"]) + (w[f"b_{s}"] if cfg.qkv_bias else 0)
                   for s in "QKV")
        if cfg.positions == "rotary":
            q, k = rotate(q), rotate(k)
        k, v = (t.repeat_interleave(H // K, dim=2) for t in (k, v))
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(dh)
        pattern = torch.softmax(scores.masked_fill(~causal, -torch.inf), -1)
        if "attention" in rules:
            pattern = pattern.detach()
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        tap("z", z)
        attn_out = torch.einsum("bqhe,hed->bqd", z, w["W_O"]) + (w["b_O"] if cfg.attn_out_bias else 0)
        tap("attn_out", attn_out)
        x = x + attn_out
        h = norm(x, w["ln2_w"], w.get("ln2_b"))
        up = h @ w["W_in"] + (w["b_in"] if cfg.mlp_bias else 0)
        if cfg.gated_mlp:
            gate = act(h @ w["W_gate"] + (w["b_gate"] if cfg.mlp_bias else 0))
            post = 0.5 * (gate * up.detach() + gate.detach() * up) if "half" in rules else gate * up
        else:
            post = act(up)
        tap("post", post)
        mlp_out = post @ w["W_out"] + (w["b_out"] if cfg.mlp_bias else 0)
        tap("mlp_out", mlp_out)
        x = x + mlp_out
    return norm(x[:, -1], p["ln_f_w"], p.get("ln_f_b")) @ p["W_U"]


def torch_relp(model: Model, task: Task, direction: str, rules) -> dict[str, np.ndarray]:
    """RelP grids (batch mean): (a_source - a_base) . gradient-with-rules at the base run."""
    import torch

    base, source = task.runs(direction)
    src_taps, base_taps = {}, {}
    with torch.no_grad():
        torch_forward(model, np.asarray(source), rules, src_taps)
    logits = torch_forward(model, np.asarray(base), rules, base_taps)
    rows = torch.arange(task.batch)
    correct, incorrect = (torch.as_tensor(np.asarray(t)[:, 0]) for t in (task.correct_tokens,
                                                                          task.incorrect_tokens))
    (logits[rows, correct] - logits[rows, incorrect]).sum().backward()  # per-prompt gradients
    out = {}
    for g, key in (("resid_pre", "resid_pre"), ("attn_out", "attn_out"), ("mlp_out", "mlp_out"),
                   ("z", "z"), ("post", "post")):
        per_layer = []
        for a_base, a_src in zip(base_taps[key], src_taps[key], strict=True):
            contrib = ((a_src - a_base) * a_base.grad).detach().numpy()
            if g == "z":  # [batch, pos, head, d_head] -> [head]: every position
                per_layer.append(contrib.sum(axis=(1, 3)).mean(0))
            elif g == "post":  # [batch, pos, neuron] -> [neuron]
                per_layer.append(contrib.sum(axis=1).mean(0))
            else:  # [batch, pos, d_model] -> [pos]
                per_layer.append(contrib.sum(-1).mean(0))
        out[g] = np.stack(per_layer)
    return out


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_relp_equals_a_torch_implementation_of_the_same_rules(cfg, direction):
    model, task = random_model(cfg), random_task()
    ours = attribute(model, task, list(GRANS), direction=direction, method="relp", progress=False)
    want = torch_relp(model, task, direction, RULES)
    atp = attribute(model, task, list(GRANS), direction=direction, method="atp", progress=False)
    for g in GRANS:
        scale = np.abs(want[g]).max()
        np.testing.assert_allclose(ours[g], want[g], atol=2e-5 * scale + 1e-7, err_msg=g)
    # the rules matter on this model: RelP is not AtP
    assert max(np.abs(ours[g] - atp[g]).max() for g in GRANS) > 1e-2
    assert ours.cost_forwards == atp.cost_forwards


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_alone_matches_torch(rule):
    model, task = random_model(LLAMA, seed=1), random_task(seed=1)
    ours = attribute(model, task, list(GRANS), direction="denoise", method="relp", relp_rules=(rule,),
                     progress=False)
    want = torch_relp(model, task, "denoise", (rule,))
    for g in GRANS:
        np.testing.assert_allclose(ours[g], want[g], atol=2e-5 * np.abs(want[g]).max() + 1e-7,
                                   err_msg=f"{rule}: {g}")


def test_relp_equals_atp_where_its_rules_are_no_ops():
    """ReLU's identity rule is its gradient (relu(x)/x = relu'(x)), and attention with zero query
    and key weights has a pattern that does not depend on the input: there the identity and
    attention rules change nothing, and RelP with them equals AtP exactly."""
    cfg = dataclasses.replace(GPT2, act_fn="relu")
    model = random_model(cfg)
    blocks = dict(model.params["blocks"], W_Q=0 * model.params["blocks"]["W_Q"],
                  W_K=0 * model.params["blocks"]["W_K"], b_Q=0 * model.params["blocks"]["b_Q"],
                  b_K=0 * model.params["blocks"]["b_K"])
    model = Model(cfg, dict(model.params, blocks=blocks))
    task = random_task()
    for direction in ("denoise", "noise"):
        relp = attribute(model, task, list(GRANS), direction=direction, method="relp",
                         relp_rules=("identity", "attention"), progress=False)
        atp = attribute(model, task, list(GRANS), direction=direction, progress=False)
        for g in GRANS:
            np.testing.assert_allclose(relp[g], atp[g], atol=1e-6 * np.abs(atp[g]).max(), err_msg=g)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_relevance_is_conserved_layer_by_layer(cfg):
    """LRP's conservation, exactly: in a bias-free model under all four rules, the backward is the
    gradient of a function that is homogeneous of degree one in the residual stream (norm scales,
    activation ratios and patterns held, each gated product split in half), so for every layer l
        sum over positions and features of  resid_pre[l] * relevance-gradient[l]  =  metric(base)
    (Euler's identity; the logit difference is linear in the logits). Attribution's grids give the
    left side as RelP's `resid_pre` scores of patching from an all-zero residual stream; here it is
    read off the torch reference, which `test_relp_equals_a_torch_implementation_of_the_same_rules`
    ties to ours."""
    import torch

    model, task = random_model(cfg, biases=False), random_task()
    taps = {}
    logits = torch_forward(model, np.asarray(task.clean_tokens), RULES, taps)
    rows = torch.arange(task.batch)
    metric = (logits[rows, torch.as_tensor(np.asarray(task.correct_tokens)[:, 0])]
              - logits[rows, torch.as_tensor(np.asarray(task.incorrect_tokens)[:, 0])]).sum()
    metric.backward()
    for layer, resid in enumerate(taps["resid_pre"]):
        relevance = float((resid * resid.grad).sum())
        assert relevance == pytest.approx(float(metric), rel=1e-9, abs=1e-9), layer


def test_relp_in_micro_batches_equals_one_batch():
    """(On a mesh: tests/test_sharding.py runs every estimator, RelP included.)"""
    model, task = random_model(LLAMA), random_task(batch=4)
    one = attribute(model, task, list(GRANS), method="relp", progress=False)
    micro = attribute(model, task, list(GRANS), method="relp", batch_size=3, progress=False)
    for g in GRANS:
        np.testing.assert_allclose(micro[g], one[g], atol=1e-6 * np.abs(one[g]).max())


def test_unknown_rule_is_refused_by_name():
    model, task = random_model(GPT2), random_task()
    with pytest.raises(ValueError, match="relp_rules.*'lnn'.*ln, attention, identity, half"):
        attribute(model, task, ["z"], method="relp", relp_rules=("lnn",), progress=False)
    with pytest.raises(ValueError, match="relp_rules apply to method='relp'"):
        attribute(model, task, ["z"], method="atp", relp_rules=("ln",), progress=False)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_relp_edges_sum_to_relp_nodes(cfg):
    """Edge RelP (EAP's decomposition with RelP's backward; each destination's own norm pulled back
    with the scale held) summed over a source's edges is that source's node RelP, as EAP's is AtP's."""
    from attrpatch.circuits import EdgeGraph, attribute_edges

    model, task = random_model(cfg), random_task()
    edges = attribute_edges(model, task, "relp", progress=False)
    nodes = attribute(model, task, ["z", "mlp_out"], method="relp", progress=False)
    eap = attribute_edges(model, task, "eap", progress=False)
    graph = EdgeGraph(cfg)
    per_source = np.nansum(edges.scores, axis=1)
    scale = np.abs(per_source).max()
    for layer in range(cfg.n_layers):
        np.testing.assert_allclose(per_source[graph.attn_source_slice(layer)], nodes["z"][layer],
                                   atol=1e-5 * scale)
        np.testing.assert_allclose(per_source[graph.mlp_source_index(layer)],
                                   nodes["mlp_out"][layer].sum(), atol=1e-5 * scale)
    assert np.nanmax(np.abs(edges.scores - eap.scores)) > 1e-3 * scale  # the rules did something
    assert edges.cost_forwards == eap.cost_forwards


@pytest.mark.parametrize("name", ["qwen3-qknorm-window", "gemma3_text-qknorm-local-rope",
                                  "olmo2-postnorm-qknorm"])
def test_relp_runs_on_the_2025_families(family, name):
    """Q/k norms, post-norms and local rotary under RelP's rules: same shapes as AtP, finite,
    q/k exactly zero (the attention rule), the rules change the other estimates."""
    model = family(name)[0]
    task = random_task(vocab=model.config.d_vocab)
    grans = ["resid_pre", "attn_out", "mlp_out", "z", "q", "k"]
    relp = attribute(model, task, grans, method="relp", progress=False)
    atp = attribute(model, task, grans, progress=False)
    for g in grans:
        assert relp[g].shape == atp[g].shape and np.all(np.isfinite(relp[g])), g
    assert np.all(relp["q"] == 0) and np.all(relp["k"] == 0)
    assert max(np.abs(relp[g] - atp[g]).max() for g in grans[:4]) > 1e-4
