"""Validation learns RelP's cause: where RelP is right and AtP wrong, the flag names the rule whose
removal moves RelP most.

Checked on a hand-built model whose only nonlinearity is a GELU at its flat point (the identity
rule must be named, and the effects are computed by hand), on the shipped IOI demo's residual
false negatives (big patches through the norms: the LN rule), and on synthetic numbers for the
thresholds.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrpatch import Model, Task, attribute, load_model
from attrpatch.arch import ModelConfig
from attrpatch.arch.transformer import init_params
from attrpatch.patching import patch
from attrpatch.results import PatchResults, Scores
from attrpatch.validation import RELP_WITHOUT, Thresholds, relp_rule_effects, validate

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "ioi-gpt2-4l"
RULE_CAUSE = "RelP's {} rule fixes it"


def rule_causes(flag) -> list[str]:
    return [c for c in flag.causes if "rule fixes it" in c]


# ----------------------------------------------------------------------------------------------
# Synthetic numbers: which rule, and when none


def results(method, values, base=0.0, source=2.0):
    return PatchResults(method, "denoise", "logit_diff", base, source,
                        {"resid_pre": Scores("resid_pre", np.asarray([values], float))})


def test_rule_is_named_only_where_relp_is_right_and_atp_wrong():
    """Gap 2 (unit 2). (0,0): AtP misses, RelP right, without "attention" RelP falls back to
    AtP's value, without "ln" it barely moves: the attention rule. (0,1): RelP wrong too: no
    rule. (0,2): RelP right, but no single rule moves it by half of |RelP - AtP|: no rule."""
    exact = results("exact", [2.0, 2.0, 2.0])
    atp = results("atp", [0.1, 0.1, 0.1])
    relp = results("relp", [1.9, 0.4, 1.9])
    without = {RELP_WITHOUT + "ln": results("relp", [1.8, 0.1, 1.5]),
               RELP_WITHOUT + "attention": results("relp", [0.2, 0.1, 1.2]),
               RELP_WITHOUT + "identity": results("relp", [1.9, 0.1, 1.9])}
    v = validate(atp, exact, estimators={"relp": relp} | without)
    flags = {f.index: f for f in v.flags}
    assert set(flags) == {(0, 0), (0, 1), (0, 2)}
    f0 = flags[(0, 0)]
    assert rule_causes(f0) == ["nonlinearity in the attention pattern (RelP's attention rule "
                               "fixes it)"]
    assert "RelP without its attention rule gives +0.2 instead of +1.9 (AtP +0.1)" in f0.reason
    assert f0.better == ["relp"] and f0.others == {"relp": 1.9}  # the runs are no estimators
    assert rule_causes(flags[(0, 1)]) == [] and flags[(0, 1)].better == []
    assert rule_causes(flags[(0, 2)]) == [] and flags[(0, 2)].better == ["relp"]
    # a looser `nonlinearity` credits (0,2)'s largest mover, the attention rule (0.7 of 1.8)
    loose = validate(atp, exact, thresholds=Thresholds(nonlinearity=0.3),
                     estimators={"relp": relp} | without)
    assert rule_causes(next(f for f in loose.flags if f.index == (0, 2))) == [
        "nonlinearity in the attention pattern (RelP's attention rule fixes it)"]
    # without AtP's value there is no disagreement to explain; RelP's own flags credit nothing
    assert all(rule_causes(f) == [] for f in validate(
        results("ig", [0.1, 0.1, 0.1]), exact, estimators={"relp": relp} | without).flags)
    assert all(rule_causes(f) == [] for f in validate(
        relp, exact, estimators={"atp": atp} | without).flags)
    # the rule runs must be RelP with a known rule left out
    with pytest.raises(ValueError, match="relp_without_softmax.*relp_rule_effects"):
        validate(atp, exact, estimators={RELP_WITHOUT + "softmax": relp})
    with pytest.raises(ValueError, match="relp_without_ln.*method='atp'"):
        validate(atp, exact, estimators={RELP_WITHOUT + "ln": atp})


# ----------------------------------------------------------------------------------------------
# A planted flat activation: the identity rule


def gelu(x: float) -> float:
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


X_BASE = -0.75  # near GELU's minimum: the gradient is ~0 there, GELU(x) / x is not


def flat_gelu_model(x_source: float) -> Model:
    """One layer whose only nonlinearity is one GELU neuron: norms made linear (huge eps, weights
    to match: each norm only centres), attention writes nothing, the last token's embedding sets
    the neuron's pre-activation (``X_BASE`` for token 2, `x_source` for token 1), and the logit
    difference of answers 0 and 1 is ``2 * gelu(pre-activation)``."""
    eps = 1e8
    cfg = ModelConfig(n_layers=1, d_model=4, n_heads=1, d_mlp=2, n_ctx=4, d_vocab=4, act_fn="gelu",
                      norm_eps=eps, tie_word_embeddings=False)
    p = jax.tree.map(jnp.zeros_like, init_params(cfg, jax.random.PRNGKey(0)))
    u = np.array([1.0, -1.0, 0.0, 0.0]) / math.sqrt(2)  # centred: the norms keep it
    v = np.array([0.0, 0.0, 1.0, -1.0])  # centred, orthogonal to u
    b = dict(p["blocks"])
    b["ln1_w"] = b["ln2_w"] = jnp.full((1, 4), math.sqrt(eps))
    b["W_in"] = b["W_in"].at[0, :, 0].set(u)
    b["W_out"] = b["W_out"].at[0, 0].set(v)
    p = dict(p, blocks=b, ln_f_w=jnp.full(4, math.sqrt(eps)),
             W_E=p["W_E"].at[1].set(x_source * u).at[2].set(X_BASE * u),
             W_U=p["W_U"].at[2, 0].set(1.0).at[3, 1].set(1.0))
    return Model(cfg, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p))


FLAT_TASK = Task(np.array([[3, 3, 1]]), np.array([[3, 3, 2]]), np.array([0]), np.array([1]))


def flat_validation(x_source: float):
    """AtP, RelP, exact (by hand: only the last position's residual differs, and it moves the
    logit difference from ``2 gelu(X_BASE)`` to ``2 gelu(x_source)``), the rule runs, validation."""
    model = flat_gelu_model(x_source)
    grans = ("resid_pre",)
    atp = attribute(model, FLAT_TASK, grans, progress=False)
    relp = attribute(model, FLAT_TASK, grans, method="relp", progress=False)
    without = relp_rule_effects(model, FLAT_TASK, grans, progress=False)
    base, source = 2 * gelu(X_BASE), 2 * gelu(x_source)
    np.testing.assert_allclose([atp.base_metric, atp.source_metric], [base, source], rtol=1e-4)
    exact = PatchResults("exact", "denoise", "logit_diff", base, source,
                         {"resid_pre": Scores("resid_pre", np.array([[0.0, 0.0, source - base]]))})
    return atp, relp, exact, without, validate(atp, exact, estimators={"relp": relp} | without)


def test_planted_flat_activation_credits_the_identity_rule():
    atp, relp, exact, without, v = flat_validation(x_source=0.0)
    assert sorted(without) == [RELP_WITHOUT + r for r in ("attention", "identity", "ln")]  # no gate
    # the premise, by hand: AtP is 2 * 0.75 * gelu'(X_BASE) ~ 0; the identity rule's slope
    # gelu(x) / x over the move of x to 0 is exact
    slope = (0.5 * (1 + math.erf(X_BASE / math.sqrt(2)))
             + X_BASE * math.exp(-X_BASE**2 / 2) / math.sqrt(2 * math.pi))
    np.testing.assert_allclose(atp["resid_pre"], [[0, 0, 2 * -X_BASE * slope]], atol=1e-5)
    np.testing.assert_allclose(relp["resid_pre"], exact["resid_pre"], rtol=1e-3, atol=1e-6)
    (flag,) = v.flags
    assert (flag.granularity, flag.index, flag.kind) == ("resid_pre", (0, 2), "false negative")
    assert rule_causes(flag) == ["nonlinearity in the activation (RelP's identity rule fixes it)"]
    assert flag.better == ["relp"] and "RelP without its identity rule" in flag.reason


def test_planted_flat_activation_credits_nothing_where_relp_is_wrong():
    """The source moves the pre-activation to +3: RelP's X_BASE slope gets 27% of the effect."""
    atp, relp, exact, without, v = flat_validation(x_source=3.0)
    np.testing.assert_allclose(relp["resid_pre"][0, 2], 2 * 3.75 * gelu(X_BASE) / X_BASE, rtol=1e-3)
    (flag,) = v.flags
    assert flag.kind == "false negative" and flag.better == [] and rule_causes(flag) == []
    # RelP validated: its own miss is flagged, no rule credited
    (own,) = validate(relp, exact, estimators={"atp": atp} | without).flags
    assert own.estimator == "relp" and rule_causes(own) == []


# ----------------------------------------------------------------------------------------------
# The shipped demo's residual false negatives: big patches through the norms, the LN rule


def test_shipped_demo_residual_misses_credit_the_ln_rule():
    from attrpatch.tasks import task_for_model

    model, task = load_model(SHIPPED), task_for_model(SHIPPED)
    grans = ("resid_pre",)
    kw = dict(direction="noise", progress=False)
    atp = attribute(model, task, grans, **kw)
    relp = attribute(model, task, grans, method="relp", **kw)
    without = relp_rule_effects(model, task, grans, **kw)
    exact = patch(model, task, grans, **kw)
    v = validate(atp, exact, estimators={"relp": relp} | without)
    credited = [f for f in v.flags if "relp" in f.better]
    # the name token's residual stream, every layer: AtP ~0, RelP and exact ~ -|gap|
    assert {f.index for f in credited} >= {(layer, 10) for layer in range(4)}
    for f in credited:
        assert rule_causes(f) == ["nonlinearity in the norm scale (RelP's LN rule fixes it)"]
        # the LN rule carries it: without it RelP falls most of the way back to AtP
        rest = without[RELP_WITHOUT + "ln"]["resid_pre"][f.index]
        assert abs(rest - f.atp) < 0.2 * abs(f.others["relp"] - f.atp)
    others = [f for f in v.flags if "relp" not in f.better]
    assert others and all(rule_causes(f) == [] for f in others)
