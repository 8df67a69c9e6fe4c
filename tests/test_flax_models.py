"""Bring your own Flax model: AtP and exact patching at module-output sites of a linen model,
checked against a jvp and a one-component-at-a-time patching loop written plainly here."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attrpatch.flax_models import attribute_flax, flax_sites, patch_flax, validate_flax

VOCAB, D_MODEL, SEQ, BATCH = 11, 16, 5, 3
SITES = ("embed", "blocks_0/attn", "blocks_0/mlp", "blocks_1/attn", "blocks_1/mlp")


class Attention(nn.Module):
    n_heads: int = 2

    @nn.compact
    def __call__(self, x):  # [batch, pos, d_model]
        b, p, d = x.shape
        qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, p, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.n_heads)
        scores = jnp.where(jnp.tril(jnp.ones((p, p), bool)), scores, -1e9)
        z = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(b, p, d)
        return nn.Dense(d, name="out")(z)


class MLP(nn.Module):
    d_mlp: int = 32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1], name="down")(nn.gelu(nn.Dense(self.d_mlp, name="up")(x)))


class Block(nn.Module):
    def setup(self):
        self.ln1, self.attn, self.ln2, self.mlp = nn.LayerNorm(), Attention(), nn.LayerNorm(), MLP()

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def setup(self):
        self.embed = nn.Embed(VOCAB, D_MODEL)
        self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.5), (SEQ, D_MODEL))
        self.blocks = [Block() for _ in range(2)]
        self.ln_f, self.unembed = nn.LayerNorm(), nn.Dense(VOCAB)

    def __call__(self, tokens):  # [batch, pos] -> logits [batch, pos, vocab]
        x = self.embed(tokens) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))


def logit_diff(logits):
    return logits[:, -1, 2] - logits[:, -1, 7]


MODEL = Transformer()
CLEAN = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, VOCAB)
CORRUPT = jax.random.randint(jax.random.key(2), (BATCH, SEQ), 0, VOCAB)
VARIABLES = MODEL.init(jax.random.key(0), CLEAN)


def run_plain(tokens, site=None, edit=None):
    """(logits, {path: output of every submodule __call__}), `edit` applied at `site`."""
    acts = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            path = "/".join(context.module.path)
            if path == site:
                out = edit(out)
            acts[path] = out
        return out

    with nn.intercept_methods(interceptor):
        logits = MODEL.apply(VARIABLES, tokens)
    return logits, acts


def runs(direction):
    return (CORRUPT, CLEAN) if direction == "denoise" else (CLEAN, CORRUPT)


@functools.cache
def results(direction):
    fm = flax_sites(MODEL, VARIABLES, SITES)
    return (attribute_flax(fm, CLEAN, CORRUPT, logit_diff, direction, per_prompt=True),
            patch_flax(fm, CLEAN, CORRUPT, logit_diff, direction, per_prompt=True))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_atp_equals_jvp_along_the_patch(direction):
    base, source = runs(direction)
    _, base_acts = run_plain(base)
    _, source_acts = run_plain(source)
    atp, _ = results(direction)
    assert set(atp.scores) == set(SITES)
    for site in SITES:
        diff = source_acts[site] - base_acts[site]  # [batch, pos, d_model]

        @jax.jit
        def directional(tangent, site=site):
            f = lambda delta: logit_diff(run_plain(base, site, lambda out: out + delta)[0])
            return jax.jvp(f, (jnp.zeros_like(tangent),), (tangent,))[1]  # [batch]

        expected = np.stack([np.asarray(directional(jnp.zeros_like(diff).at[:, p].set(diff[:, p])))
                             for p in range(SEQ)], -1)  # [batch, pos]
        assert atp.scores[site].values.shape == (SEQ,)
        np.testing.assert_allclose(atp.scores[site].per_prompt, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(atp.scores[site].values, expected.mean(0), rtol=1e-4, atol=1e-5)
    assert abs(atp.base_metric - float(logit_diff(run_plain(base)[0]).mean())) < 1e-5
    assert abs(atp.source_metric - float(logit_diff(run_plain(source)[0]).mean())) < 1e-5


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_exact_equals_one_patch_at_a_time(direction):
    base, source = runs(direction)
    base_logits, _ = run_plain(base)
    _, source_acts = run_plain(source)
    base_metric = logit_diff(base_logits)
    _, exact = results(direction)
    for site in SITES:
        expected = np.zeros((BATCH, SEQ))
        for p in range(SEQ):
            patched = lambda out, p=p, site=site: out.at[:, p].set(source_acts[site][:, p])
            expected[:, p] = logit_diff(run_plain(base, site, patched)[0]) - base_metric
        np.testing.assert_allclose(exact.scores[site].per_prompt, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(exact.scores[site].values, expected.mean(0), rtol=1e-4, atol=1e-5)
    assert exact.gap != 0
    chunked = patch_flax(flax_sites(MODEL, VARIABLES, "blocks_1/attn"), CLEAN, CORRUPT, logit_diff, direction,
                         batch_size=2)  # 5 components: two chunks of 2 and a remainder
    np.testing.assert_allclose(chunked["blocks_1/attn"], exact["blocks_1/attn"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exact.base_metric, float(base_metric.mean()), rtol=1e-6)


def test_whole_site_is_one_component():
    """A site output [batch, d] is one component: exact = patching all of it, AtP = the jvp."""
    mlp = MLP()
    x_clean, x_corrupt = jax.random.normal(jax.random.key(3), (2, BATCH, D_MODEL))
    variables = mlp.init(jax.random.key(4), x_clean)
    metric = lambda y: y[:, 0] * y[:, 1]
    fm = flax_sites(mlp, variables, "up")
    atp = attribute_flax(fm, x_clean, x_corrupt, metric)
    exact = patch_flax(fm, x_clean, x_corrupt, metric)
    up = lambda x: nn.Dense(32).apply({"params": variables["params"]["up"]}, x)
    down = lambda h: nn.Dense(D_MODEL).apply({"params": variables["params"]["down"]}, nn.gelu(h))
    f = lambda h: metric(down(h)).mean()
    diff = up(x_clean) - up(x_corrupt)
    assert atp["up"].shape == exact["up"].shape == ()
    np.testing.assert_allclose(atp["up"], jax.jvp(f, (up(x_corrupt),), (diff,))[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(exact["up"], f(up(x_clean)) - f(up(x_corrupt)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_validation_verdicts_and_a_planted_sign_flip(direction):
    atp, exact = results(direction)
    v = validate_flax(atp, exact)
    assert set(v.verdicts) == set(v.by_granularity) == set(v.flag_grids) == set(SITES)
    assert all(verdict in ("reliable", "caution", "unreliable") for verdict in v.verdicts.values())
    assert all(v.by_granularity[s]["n"] == SEQ and v.flag_grids[s].shape == (SEQ,) for s in SITES)

    # AtP with the sign of the largest exact effect flipped there: flagged, at that component.
    site = max(SITES, key=lambda s: np.abs(exact[s]).max())
    pos = int(np.abs(exact[site]).argmax())
    assert abs(exact[site][pos]) >= v.thresholds.large * abs(exact.gap)
    values = atp[site].copy()
    values[pos] = -exact[site][pos]
    bad = dataclasses.replace(atp, scores=dict(atp.scores, **{site: dataclasses.replace(
        atp.scores[site], values=values)}))
    flagged = validate_flax(bad, exact)
    flags = lambda val: {(f.granularity, f.index, f.label, f.kind) for f in val.flags}
    planted = (site, (pos,), f"{site}[{pos}]", "sign flip")
    assert flags(flagged) == {f for f in flags(v) if f[:2] != (site, (pos,))} | {planted}
    assert flagged.flag_grids[site][pos] == "sign flip"
    assert [f.severity for f in flagged.flags] == sorted((f.severity for f in flagged.flags), reverse=True)
    others = [s for s in SITES if s != site]
    assert {s: flagged.verdicts[s] for s in others} == {s: v.verdicts[s] for s in others}


def test_bad_site_names_the_available_paths():
    fm = flax_sites(MODEL, VARIABLES, ["blocks_0/atn"])
    for run in (attribute_flax, patch_flax):
        with pytest.raises(ValueError, match="blocks_0/atn") as info:
            run(fm, CLEAN, CORRUPT, logit_diff)
        for path in SITES + ("blocks_0/attn/qkv", "blocks_1/mlp/up", "unembed"):
            assert repr(path) in str(info.value)
    with pytest.raises(ValueError, match="no sites"):
        flax_sites(MODEL, VARIABLES, [])
    with pytest.raises(ValueError, match="direction"):
        attribute_flax(flax_sites(MODEL, VARIABLES, SITES), CLEAN, CORRUPT, logit_diff, "sideways")
