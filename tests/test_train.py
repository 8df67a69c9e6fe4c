"""The trainer learns, deterministically; the shipped models do their tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attrpatch import load_model, load_tokenizer, tasks, train
from attrpatch.arch import ModelConfig

MODELS = Path(__file__).resolve().parent.parent / "models"
INDUCTION = MODELS / "attn-only-2l-induction"
IOI = MODELS / "ioi-gpt2-4l"
IOI_LLAMA = MODELS / "ioi-llama-4l"


def test_training_reduces_loss_and_is_deterministic():
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, n_ctx=16,
                     d_vocab=len(tasks.TOY_IOI_WORDS))
    runs = [train.train(cfg, train.ioi_batches(32), steps=40, lr=1e-2, seed=0, warmup=5,
                        log_every=10, log=None) for _ in range(2)]
    (model, losses), (model2, losses2) = runs
    assert losses == losses2
    assert np.array_equal(np.asarray(model.params["W_E"]), np.asarray(model2.params["W_E"]))
    first, last = losses[0][1], losses[-1][1]
    assert last < 0.7 * first, losses
    other = train.train(cfg, train.ioi_batches(32), steps=3, seed=1, log=None)[1]
    assert other[0][1] != losses[0][1]  # the seed matters


def test_induction_batches_repeat_where_weighted():
    tokens, targets, weights = train.induction_batches(30, 24, batch=16)(np.random.default_rng(0))
    assert tokens.shape == targets.shape == weights.shape == (16, 24)
    assert (tokens[:, 0] == 0).all() and (tokens[:, 1:] >= 2).all()
    assert (tokens[:, 1:] == targets[:, :-1]).all()
    for b in range(16):
        w = np.flatnonzero(weights[b])
        assert len(w) >= 3
        n = len(w) + 1  # the repeated segment's length
        for p in w:  # each weighted target repeats the token n positions earlier
            assert targets[b, p] == tokens[b, p + 1 - n]


def test_ioi_batches_are_training_prompts():
    tokens, targets, weights = train.ioi_batches(64)(np.random.default_rng(0))
    tok = tasks.toy_ioi_tokenizer()
    train_templates = set(tasks.toy_ioi_templates("train"))
    for row, tgt in zip(tokens, targets, strict=True):
        w = [tok.id_to_token(int(i)) for i in row]
        io = tok.id_to_token(int(tgt[-1]))
        s = w[10]
        assert {w[2], w[4]} == {io, s} and io != s
        assert not tasks.toy_name_pair_held_out(io, s)
        template = " ".join([w[1], "{N1}", "and", "{N2}", *w[5:8], "{PLACE}", ",", "{S}", w[11],
                             "a", "{OBJECT}", "to"])
        assert template in train_templates
    assert weights[0, -1] > weights[0, 0]


def _answer_stats(model, task):
    logits = np.asarray(model.run(task.clean_tokens, task.attention_mask,
                                  logit_positions=task.answer_positions)[0])
    acc = (logits.argmax(-1) == np.asarray(task.correct_tokens[:, 0])).mean()
    take = lambda a: np.take_along_axis(logits, np.asarray(a), -1).mean(-1)
    return acc, take(task.correct_tokens) - take(task.incorrect_tokens)


@pytest.mark.parametrize("path", [INDUCTION, IOI, IOI_LLAMA], ids=lambda p: p.name)
def test_shipped_model_files(path):
    for name in ("config.json", "model.safetensors", "README.md", "tokenizer.json",
                 tasks.TASK_FILE):
        assert (path / name).is_file(), name
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 5_000_000
    model = load_model(path)
    assert load_tokenizer(path).get_vocab_size() == model.config.d_vocab


def test_shipped_induction_model():
    model = load_model(INDUCTION)
    assert model.config.attn_only and model.config.n_layers == 2
    task = tasks.task_for_model(INDUCTION, n_prompts=200, seed=123)  # unseen prompts
    acc, ld = _answer_stats(model, task)
    assert acc > 0.8 and ld.mean() > 3 and (ld > 0).mean() > 0.9
    _, ld_corrupt = _answer_stats(model, tasks.Task(task.corrupt_tokens, task.clean_tokens,
                                                    task.correct_tokens, task.incorrect_tokens))
    assert ld_corrupt.mean() < -1  # induction follows the corrupted first occurrence
    ind, prev = train.induction_scores(model, seed=7)
    assert ind[1].max() > 0.3 and ind[0].max() < 0.2  # induction heads only in layer 1
    assert prev[0].max() > 0.3  # a previous-token head in layer 0


@pytest.mark.parametrize("path, architecture", [(IOI, "gpt2"), (IOI_LLAMA, "llama")],
                         ids=lambda p: getattr(p, "name", p))
def test_shipped_ioi_model(path, architecture):
    model = load_model(path)
    assert model.config.architecture == architecture
    assert not model.config.attn_only and model.config.n_layers == 4
    heldout = tasks.toy_ioi_task(500, seed=321, split="test")
    acc, ld = _answer_stats(model, heldout)
    assert acc > 0.9 and ld.mean() > 2
    default = tasks.task_for_model(path, n_prompts=64)
    assert default.clean_tokens.shape == (64, 15)
    _, ld_clean = _answer_stats(model, default)
    _, ld_corrupt = _answer_stats(model, tasks.Task(default.corrupt_tokens, default.clean_tokens,
                                                    default.correct_tokens,
                                                    default.incorrect_tokens))
    assert ld_clean.mean() - abs(ld_corrupt.mean()) > 2  # ABC corruption removes the signal


@pytest.mark.parametrize("path", [IOI, IOI_LLAMA], ids=lambda p: p.name)
def test_shipped_card_numbers_match_the_weights(path):
    """The card's head-patching table is what the library's exact patching gives today."""
    import json

    metrics = json.loads((path / "metrics.json").read_text())
    z = train.exact_patching(load_model(path), tasks.task_for_model(path), ("z",)).normalized("z")
    np.testing.assert_allclose(z, metrics["head_patching_abc"], atol=6e-4)
    for direction in ("denoise", "noise"):
        v = metrics["atp_vs_exact"][direction]
        assert set(v["verdicts"]) >= {"residual stream", "heads", "MLP outputs"}
        assert set(v["verdicts"].values()) <= {"reliable", "caution", "unreliable"}


def test_card_from_checkpoint_matches_training(tmp_path):
    """`card DIR` recomputes the evidence from the weights, keeps the training facts, leaves
    the weights alone and writes the same card as training did."""
    import json

    cfg = ModelConfig(n_layers=2, d_model=16, n_heads=2, d_mlp=32, n_ctx=48, d_vocab=24,
                     attn_only=True)
    out = tmp_path / "tiny-induction"
    metrics = train.build("induction", out, steps=3, config=cfg, log=None, batch=4)
    card = (out / "README.md").read_text()
    weights = (out / "model.safetensors").read_bytes()
    assert "## AtP vs exact patching" in card and "### Noising" in card
    assert "mlp_out" not in card  # attention-only: no MLP granularity
    for direction in ("denoise", "noise"):
        assert metrics["atp_vs_exact"][direction]["verdicts"]["heads"] in (
            "reliable", "caution", "unreliable")

    (out / "README.md").write_text("stale")
    train.main(["card", str(out)])
    assert (out / "README.md").read_text() == card
    assert (out / "model.safetensors").read_bytes() == weights
    again = json.loads((out / "metrics.json").read_text())
    assert again["recipe"] == metrics["recipe"] and again["recipe"]["batch"] == 4
    assert again["train_seconds"] == metrics["train_seconds"]
    assert again["head_patching"] == metrics["head_patching"]
