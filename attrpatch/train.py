"""Train the shipped default models from scratch, deterministically (optax AdamW).

    python -m attrpatch.train induction --out models/attn-only-2l-induction
    python -m attrpatch.train ioi --out models/ioi-gpt2-4l
    python -m attrpatch.train ioi-llama --out models/ioi-llama-4l
    python -m attrpatch.train card models/ioi-gpt2-4l   # recompute the card, no training

Each run writes a checkpoint `attrpatch.load_model` reads, plus ``tokenizer.json`` (word-level),
``attrpatch_task.json`` (the matching task, see `attrpatch.tasks.task_for_model`),
``metrics.json`` and a ``README.md`` model card with the measured behaviour, the mechanism found
by exact patching (`attrpatch.patch`) and how well AtP agrees with it (`attrpatch.validate`).
``card`` recomputes all of that from a saved checkpoint, keeping the training facts (time, final
loss, recipe) from its ``metrics.json``; training writes the card through the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attrpatch import tasks
from attrpatch.arch.config import ModelConfig
from attrpatch.arch.transformer import init_params
from attrpatch.atomic import UnsafeOutputError, atomic_write
from attrpatch.attribution import attribute
from attrpatch.interventions import Interventions
from attrpatch.loading import check_checkpoint_target, load_model, save_model
from attrpatch.model import Model, _forward
from attrpatch.patching import patch
from attrpatch.results import DIRECTIONS, PatchResults, available_granularities
from attrpatch.task import Task, logit_diff
from attrpatch.tokenizer import word_level_tokenizer
from attrpatch.validation import Thresholds, Validation, diagnose, family_of, validate

# A batch: (tokens int [batch, pos], targets int [batch, pos], weights float [batch, pos]).
Batch = tuple[np.ndarray, np.ndarray, np.ndarray]


def weighted_loss(params, cfg: ModelConfig, tokens, targets, weights):
    """Weighted mean next-token cross-entropy (weights ``[batch, pos]``, summing to the divisor)."""
    logits = _forward(params, cfg, tokens, None, Interventions(), (), None)[0]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (ce * weights).sum() / weights.sum()


def train(
    cfg: ModelConfig,
    batches: Callable[[np.random.Generator], Batch],
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    warmup: int = 100,
    weight_decay: float = 0.01,
    log_every: int = 100,
    log: Callable[[str], None] | None = print,
) -> tuple[Model, list[tuple[int, float]]]:
    """AdamW with linear warmup and cosine decay, gradient clipping at 1.

    **Arguments:**

    - `batches`: called with a `numpy` generator seeded from `seed`; returns a `Batch`.
    - `steps`, `lr`, `warmup`, `weight_decay`: the schedule.

    **Returns:** `(model, losses)` with `losses` the (step, loss) pairs logged every `log_every`.
    """
    params = init_params(cfg, jax.random.PRNGKey(seed))
    if cfg.tie_word_embeddings:
        params.pop("W_U")
    warmup = min(warmup, steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
    state = opt.init(params)

    def full(p):
        return p | {"W_U": p["W_E"].T} if cfg.tie_word_embeddings else p

    @jax.jit
    def step(params, state, tokens, targets, weights):
        loss, grads = jax.value_and_grad(lambda p: weighted_loss(full(p), cfg, tokens, targets,
                                                                 weights))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    losses, t0 = [], time.perf_counter()
    for i in range(steps):
        params, state, loss = step(params, state, *batches(rng))
        if (i + 1) % log_every == 0 or i == 0 or i == steps - 1:
            losses.append((i + 1, float(loss)))
            if log:
                log(f"step {i + 1:5d}  loss {float(loss):.4f}  {time.perf_counter() - t0:6.1f}s")
    return Model(cfg, full(params)), losses


# ----------------------------------------------------------------------------------------------
# Data


def induction_batches(d_vocab: int, n_ctx: int, batch: int = 64, first_id: int = 2,
                      min_len: int = 4, max_len: int | None = None):
    """Random tokens with one repeated segment at a random offset and length.

    Row: ``[bos] prefix R R suffix`` (ids from ``first_id..d_vocab-1``); loss only where the
    next token is predictable by induction (inside the second copy of ``R``).
    """
    max_len = max_len or (n_ctx - 1) // 2

    def make(rng: np.random.Generator) -> Batch:
        seq = rng.integers(first_id, d_vocab, (batch, n_ctx + 1))
        seq[:, 0] = 0
        weights = np.zeros((batch, n_ctx), np.float32)
        for b in range(batch):
            n = int(rng.integers(min_len, max_len + 1))
            start = 1 + int(rng.integers(0, n_ctx + 1 - 1 - 2 * n + 1))
            seq[b, start + n: start + 2 * n] = seq[b, start: start + n]
            # position p predicts p + 1; predictable targets are start+n+1 .. start+2n-1
            weights[b, start + n: start + 2 * n - 1] = 1.0
        return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32), weights

    return make


IOI_LEN = 15  # toy IOI prompt length with bos; the IO answer follows position 14


def _toy_arrays(split: str):
    tok = tasks.toy_ioi_tokenizer()
    rows = []
    for t in tasks.toy_ioi_templates(split):
        words = t.format(N1="Mary", N2="John", S="John", PLACE="store", OBJECT="drink").split()
        rows.append([0] + [tok.token_to_id(w) for w in words])
    templates = np.array(rows, np.int32)
    if templates.shape[1] != IOI_LEN:
        raise AssertionError("toy IOI templates must all be 15 tokens")
    ids = lambda words: np.array([tok.token_to_id(w) for w in words], np.int32)
    names = ids(tasks.TOY_NAMES)
    pairs = [(i, j) for i in range(len(names)) for j in range(len(names)) if i != j
             and tasks.toy_name_pair_held_out(tasks.TOY_NAMES[i], tasks.TOY_NAMES[j])
             == (split == "test")]
    return templates, names, np.array(pairs), ids(tasks.TOY_PLACES), ids(tasks.TOY_OBJECTS)


def ioi_batches(batch: int = 128, answer_weight: float = 1.0):
    """Training IOI sentences (training templates and name pairs) with the IO answer appended.

    Loss: next-token cross-entropy at every position, plus `answer_weight` times (the number of
    positions) extra weight on the IO answer, so half the loss is the IOI prediction.
    """
    templates, names, pairs, places, objects = _toy_arrays("train")
    n_pos = IOI_LEN

    def make(rng: np.random.Generator) -> Batch:
        seq = templates[rng.integers(len(templates), size=batch)].copy()
        pr = pairs[rng.integers(len(pairs), size=batch)]
        io, s = names[pr[:, 0]], names[pr[:, 1]]
        abba = rng.random(batch) < 0.5
        seq[:, 2] = np.where(abba, io, s)
        seq[:, 4] = np.where(abba, s, io)
        seq[:, 10] = s
        seq[:, 8] = places[rng.integers(len(places), size=batch)]
        seq[:, 13] = objects[rng.integers(len(objects), size=batch)]
        full = np.concatenate([seq, io[:, None]], axis=1)
        weights = np.ones((batch, n_pos), np.float32)
        weights[:, -1] += answer_weight * n_pos
        return full[:, :-1], full[:, 1:], weights

    return make


# ----------------------------------------------------------------------------------------------
# Evaluation and patching evidence


def answer_logit_diff(model: Model, task: Task, tokens=None) -> np.ndarray:
    """Per-prompt logit diff ``[batch]`` at the answer position."""
    tokens = task.clean_tokens if tokens is None else tokens
    logits = model.run(tokens, task.attention_mask, logit_positions=task.answer_positions)[0]
    return np.asarray(logit_diff(logits, task, None))


def accuracy(model: Model, task: Task) -> float:
    """Fraction of prompts whose top answer-position token is the (first) correct answer."""
    logits = model.run(task.clean_tokens, task.attention_mask,
                       logit_positions=task.answer_positions)[0]
    return float((np.asarray(logits.argmax(-1)) == np.asarray(task.correct_tokens[:, 0])).mean())


def exact_patching(model: Model, task: Task, granularities=("z", "resid_pre"),
                   direction: str = "denoise") -> PatchResults:
    """Exact patching of every component (the library engine, :func:`attrpatch.patch`) with the
    task's metric; ``.normalized(g)`` is the card's normalised logit diff (0 = base, 1 = source)."""
    return patch(model, task, granularities, direction=direction, progress=False)


def head_direct_logits(model: Model, task: Task) -> tuple[np.ndarray, np.ndarray]:
    """Direct logit attribution of each head at the answer position on the clean prompts:
    ``(to correct, to incorrect)``, each ``[n_layers, n_heads]`` (batch mean; the final
    LayerNorm's scale frozen at its clean value)."""
    cfg, p = model.config, model.params
    _, cache = model.run(task.clean_tokens, task.attention_mask,
                         cache_keys=("attn.hook_z", "hook_resid_post"))
    b = np.arange(task.batch)
    pos = np.asarray(task.answer_positions)
    z = np.asarray(cache["attn.hook_z"])[:, b, pos]  # [L, B, H, dh]
    out = np.einsum("lbhe,lhed->lbhd", z, np.asarray(p["blocks"]["W_O"]))
    final = np.asarray(cache["hook_resid_post"])[-1, b, pos]  # [B, d]
    if cfg.norm == "layernorm":  # the final norm is linear once its scale is frozen
        final = final - final.mean(-1, keepdims=True)
        out = out - out.mean(-1, keepdims=True)
    scale = np.sqrt(np.square(final).mean(-1) + cfg.norm_eps)  # [B]
    out = out / scale[None, :, None, None] * np.asarray(p["ln_f_w"])
    W_U = np.asarray(p["W_U"])

    def to(tokens):
        dirs = W_U[:, np.asarray(tokens)].mean(-1).T  # [B, d]
        return np.einsum("lbhd,bd->lh", out, dirs) / task.batch

    return to(task.correct_tokens), to(task.incorrect_tokens)


def patterns(model: Model, tokens) -> np.ndarray:
    """Attention patterns ``[n_layers, batch, head, query, key]``."""
    return np.asarray(model.run(tokens, cache_keys=("attn.hook_pattern",))[1]["attn.hook_pattern"])


def induction_scores(model: Model, seq_len: int = 20, n: int = 64, first_id: int = 2,
                     seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """On ``[bos] R R`` (``R`` of `seq_len` distinct random tokens): per head ``[L, H]``,
    (induction score, previous-token score): mean attention from each second-copy token to the
    token after its first occurrence, and mean attention from each token to the one before."""
    t = tasks.induction_task(n, seq_len, list(range(first_id, model.config.d_vocab)), 0, seed,
                             n_repeated=seq_len - 1)
    tokens = np.concatenate([np.asarray(t.clean_tokens), np.asarray(t.correct_tokens)], 1)
    pat = patterns(model, jnp.asarray(tokens))  # [L, B, H, q, k]
    q2 = np.arange(1 + seq_len, 1 + 2 * seq_len)
    induction = pat[:, :, :, q2, q2 - seq_len + 1].mean(axis=(1, 3))
    q = np.arange(2, tokens.shape[1])
    prev = pat[:, :, :, q, q - 1].mean(axis=(1, 3))
    return induction, prev


def _architecture_json(cfg: ModelConfig) -> str:
    """The config as the card shows it: every architecture field (RelP's per-run
    `backward_rules` is not part of the model)."""
    fields = dataclasses.asdict(cfg)
    del fields["backward_rules"]
    return json.dumps(fields)


def _n_params(model: Model) -> int:
    """Parameters, counting tied embeddings once."""
    n = sum(x.size for x in jax.tree.leaves(model.params))
    return n - model.params["W_U"].size if model.config.tie_word_embeddings else n


def _table(arr: np.ndarray, row: str, cols: list[str], row_names: list[str] | None = None) -> str:
    lines = ["| " + row + " | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for i, r in enumerate(arr):
        name = i if row_names is None else row_names[i]
        lines.append(f"| {name} | " + " | ".join(f"{v:+.2f}" for v in r) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# AtP vs exact patching (the validation step of each card)

VALIDATION_GRANULARITIES = ("resid_pre", "attn_out", "mlp_out", "z", "z_by_pos", "q", "k",
                            "pattern")
DIRECTION_TITLES = {"denoise": "Denoising (clean activations patched into the corrupted run)",
                    "noise": "Noising (corrupted activations patched into the clean run)"}


def validation_granularities(model: Model) -> tuple[str, ...]:
    """:data:`VALIDATION_GRANULARITIES` the model has (no ``mlp_out`` when attention-only)."""
    return available_granularities(model.config, VALIDATION_GRANULARITIES)


def atp_vs_exact(model: Model, task: Task, direction: str = "denoise",
                 tokens: list[str] | None = None) -> tuple[PatchResults, PatchResults, Validation]:
    """Exact patching, AtP and their validation (with diagnosed causes) on
    :func:`validation_granularities`: ``(exact, atp, validation)``."""
    grans = validation_granularities(model)
    exact = exact_patching(model, task, grans, direction)
    atp = attribute(model, task, grans, direction=direction)
    diag = diagnose(model, task, grans, direction=direction)
    return exact, atp, validate(atp, exact, diag, tokens=tokens)


def _num(x, fmt: str = "+.3f") -> str:
    return "n/a" if x is None or not np.isfinite(x) else format(x, fmt)


def _json_num(x):
    return None if not np.isfinite(x) else round(float(x), 4)


def circuit_section(model: Model, task: Task, task_text: str) -> tuple[str, dict]:
    """Markdown section "Circuit" and its metrics: EAP-IG (inputs, 5 steps) scores of every
    edge, checked against exact single-edge patching, and the faithfulness of the top-|score|
    circuits at 5%, 10% and 20% of the edges (exact edge patching, denoising)."""
    from attrpatch.circuits import (
        EdgeGraph,
        attribute_edges,
        faithfulness_curve,
        find_circuit,
        patch_edges_each,
        validate_edges,
    )

    n = EdgeGraph(model.config).n_edges
    sizes = sorted({max(1, round(n * share)) for share in (0.05, 0.1, 0.2)})
    ig = attribute_edges(model, task, "eap_ig_inputs")
    exact = patch_edges_each(model, task, chunk_size=32)
    check = validate_edges(ig, exact)
    curve = faithfulness_curve(model, task, {"eap_ig_inputs": ig, "exact": exact}, sizes)
    circuit = find_circuit(ig, n_edges=sizes[0])
    rows = [[f"`{s} -> {d}`", f"{ig.score(s, d) / ig.gap:+.2f}", f"{exact.score(s, d) / ig.gap:+.2f}"]
            for s, d in circuit]
    faith = {m: [p.faithfulness for p in curve if p.method == m] for m in ("eap_ig_inputs", "exact")}
    a = check.agreement
    faith_table = _table(np.array([faith["eap_ig_inputs"], faith["exact"]]), "circuit by",
                         [f"{k} edges" for k in sizes], ["EAP-IG", "exact single-edge effects"])
    text = f"""## Circuit

Edges scored by EAP-IG (inputs, 5 steps) on {task_text}, every one of the {n} edges checked by
exact single-edge patching (denoising; effects as shares of the gap): Pearson {a['pearson']:.3f},
Spearman {a['spearman']:.3f}, verdict **{check.verdict}**. The {sizes[0]} edges with the largest
|EAP-IG score| ({sizes[0] / n:.0%} of the graph):

| edge | EAP-IG | exact |
| --- | --- | --- |
""" + "\n".join("| " + " | ".join(r) + " |" for r in rows) + f"""

Faithfulness, (m_circuit - m_corrupted) / (m_clean - m_corrupted) with exactly the circuit's
edges patched into the corrupted run (`attrpatch.faithfulness_curve`):

{faith_table}
"""
    metrics = {"n_edges": n, "sizes": sizes, "circuit": [list(e) for e in circuit],
               "faithfulness": faith, "eap_ig_pearson": _json_num(a["pearson"]),
               "eap_ig_verdict": check.verdict}
    return text, metrics


def validation_section(runs: dict[str, tuple[PatchResults, PatchResults, Validation]],
                       task_text: str) -> tuple[str, dict]:
    """Markdown section "AtP vs exact patching" and its metrics from :func:`atp_vs_exact` runs
    keyed by direction."""
    t = Thresholds()
    grans = list(next(iter(runs.values()))[0].scores)
    intro = (
        f"Attribution patching (`attrpatch.attribute`: one forward and one backward per run, a "
        f"linear estimate) against exact patching (`attrpatch.patch`: every component patched "
        f"and the model rerun), both on {task_text}, for the granularities "
        f"{', '.join(f'`{g}`' for g in grans)}; compared by `attrpatch.validate` with causes "
        f"from `attrpatch.diagnose` (default `Thresholds`). Verdict per site family: *reliable* "
        f"with Pearson >= {t.reliable_pearson} and no high-severity flag, *caution* with Pearson "
        f">= {t.caution_pearson}, else *unreliable*. A flag is a component where the two disagree: "
        f"a false negative / positive (an effect of at least {t.large:.0%} of the gap the other "
        f"misses), a sign flip (both at least {t.small:.0%}), or a magnitude error (off by at "
        f"least {t.large:.0%} with severity at least {t.magnitude_severity:g}); severity is "
        f"|AtP - exact| / |gap|, shrunk smoothly as their ratio nears 1 (`attrpatch.Thresholds`), "
        f"high from {t.severity_high}. Errors are shares of the "
        f"gap, the logit-diff change a patch moving the base run all the way to the source would "
        f"make. Recomputed from the checkpoint by `python -m attrpatch.train card <dir>`.")
    parts = ["## AtP vs exact patching\n\n" + textwrap.fill(
        intro, 96, break_long_words=False, break_on_hyphens=False)]
    out = {}
    for direction, (exact, atp, v) in runs.items():
        lines = [f"### {DIRECTION_TITLES[direction]}", "",
                 f"Logit diff: base {exact.base_metric:+.2f}, source {exact.source_metric:+.2f} "
                 f"(gap {exact.gap:+.2f}).", "",
                 "| family | granularities | components | verdict | Pearson | Spearman | "
                 "recall@10 | max abs error / gap | flags (high) |",
                 "|" + " --- |" * 9]
        fams = {}
        for fam, s in v.by_family.items():
            gs = [g for g in grans if family_of(g) == fam]
            lines.append(f"| {fam} | {', '.join(gs)} | {s['n']} | **{v.verdicts[fam]}** | "
                         f"{_num(s['pearson'])} | {_num(s['spearman'])} | "
                         f"{_num(s['recall@10'], '.2f')} | {_num(s['max_abs_error_share'], '.3f')} | "
                         f"{s['n_flags']} ({s['n_high']}) |")
            fams[fam] = {"granularities": gs, "verdict": v.verdicts[fam], "n": s["n"]} | {
                k: _json_num(s[k]) for k in ("pearson", "spearman", "recall@10",
                                             "max_abs_error_share", "median_abs_error_share")
            } | {"n_flags": s["n_flags"], "n_high": s["n_high"]}
        z_ex, z_atp = exact.normalized("z"), atp.normalized("z")
        order = np.argsort(-np.abs(z_ex), axis=None, kind="stable")[:3]
        top = [np.unravel_index(i, z_ex.shape) for i in order]
        atp_best = np.unravel_index(np.argmax(np.abs(z_atp)), z_atp.shape)
        lines += ["", "Largest heads (`z`) by exact effect, as shares of the gap: " + ", ".join(
            f"L{l_}H{h} exact {z_ex[l_, h]:+.2f}, AtP {z_atp[l_, h]:+.2f}" for l_, h in top)
            + f"; AtP's largest is L{atp_best[0]}H{atp_best[1]}"
            + (" (the same head)." if tuple(atp_best) == tuple(top[0]) else
               f" (not exact's L{top[0][0]}H{top[0][1]}).")]
        levels = {lv: sum(f.level == lv for f in v.flags) for lv in ("high", "medium", "low")}
        if v.flags:
            lines += ["", f"{len(v.flags)} flags ({levels['high']} high, {levels['medium']} "
                          f"medium, {levels['low']} low); the most severe:", ""]
            lines += [f"- `{f.label}` ({f.level}, severity {f.severity:.2f}): {f.reason}"
                      for f in v.flags[:6]]
        else:
            lines += ["", "No component is flagged."]
        parts.append("\n".join(lines))
        out[direction] = {
            "base_metric": _json_num(exact.base_metric), "gap": _json_num(exact.gap),
            "verdicts": dict(v.verdicts), "by_family": fams, "n_flags": len(v.flags),
            "flags": [{"label": f.label, "kind": f.kind, "level": f.level,
                       "severity": _json_num(f.severity), "atp": _json_num(f.atp),
                       "exact": _json_num(f.exact), "causes": f.causes} for f in v.flags[:10]],
        }
    return "\n\n".join(parts) + "\n", out


# ----------------------------------------------------------------------------------------------
# Recipes and model cards
#
# Training gives `facts` (train_seconds, final_loss, recipe); everything else on a card is
# evidence computed from the weights. `write_checkpoint` is the one path that writes a card:
# `build` calls it after training, `card` with a saved checkpoint and its metrics.json.

INDUCTION_CFG = ModelConfig(n_layers=2, d_model=64, n_heads=4, d_mlp=256, n_ctx=48, d_vocab=66,
                           attn_only=True)
INDUCTION_RECIPE = dict(steps=3000, lr=1e-3, seed=0, warmup=100, batch=64)
IOI_CFG = ModelConfig(n_layers=4, d_model=128, n_heads=4, d_mlp=512, n_ctx=16,
                     d_vocab=len(tasks.TOY_IOI_WORDS))
IOI_RECIPE = dict(steps=1200, lr=1e-3, seed=0, warmup=100, batch=64)
# The same task on the Llama architecture: RMSNorm, rotary positions, grouped-query attention
# (4 query heads sharing 2 kv heads), SwiGLU MLP, no biases, untied unembedding. d_mlp 344 gives
# its three MLP matrices about the parameters of GPT-2's two at 512.
IOI_LLAMA_CFG = ModelConfig(n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_mlp=344, n_ctx=16,
                            d_vocab=len(tasks.TOY_IOI_WORDS), architecture="llama", norm="rmsnorm",
                            norm_eps=1e-6, positions="rotary", gated_mlp=True, act_fn="silu",
                            qkv_bias=False, attn_out_bias=False, mlp_bias=False,
                            tie_word_embeddings=False)
FACTS = ("train_seconds", "final_loss", "recipe")


def _induction_task_args(cfg: ModelConfig) -> dict:
    return dict(n_prompts=64, seq_len=10, vocab=list(range(2, cfg.d_vocab)), bos_id=0, seed=0)


def induction_files(model: Model, facts: dict) -> tuple[dict[str, str], dict]:
    """Evaluate the induction model: ``(files, metrics)``, files being the card
    (``README.md``), ``tokenizer.json``, the task file and ``metrics.json``."""
    cfg, rc = model.config, facts["recipe"]
    train_s, final_loss = facts["train_seconds"], facts["final_loss"]
    task_args = _induction_task_args(cfg)
    task = tasks.induction_task(**task_args)
    ld = answer_logit_diff(model, task)
    ld_corrupt = answer_logit_diff(model, task, task.corrupt_tokens)
    acc = accuracy(model, task)
    ind, prev = induction_scores(model)
    k = task.n_pos // 2
    roles = ["bos"] + [f"R{i}" for i in range(k)] + [f"R{i}'" for i in range(task.n_pos - 1 - k)]
    runs = {d: atp_vs_exact(model, task, d, roles) for d in DIRECTIONS}
    heads, resid = (runs["denoise"][0].normalized(g) for g in ("z", "resid_pre"))
    key_task = tasks.induction_task(**task_args, corrupt="previous")
    key = exact_patching(model, key_task)
    heads_key, resid_key = key.normalized("z"), key.normalized("resid_pre")
    words = ["<bos>", "<unk>"] + [f"t{i}" for i in range(2, cfg.d_vocab)]
    tok = word_level_tokenizer(words)
    H = cfg.n_heads
    pt = lambda a: (int(np.unravel_index(a.argmax(), a.shape)[0]),
                    int(np.unravel_index(a.argmax(), a.shape)[1]))
    best_ind, best_prev = pt(ind), pt(prev)
    shown_args = json.dumps({k: v for k, v in task_args.items() if k != "vocab"})
    section, validation = validation_section(
        runs, "the default task (`attrpatch_task.json`, positions named `bos`, `R0`..`R9` for "
              "the first copy, `R0'`..`R8'` for the second)")
    circuit_text, circuit = circuit_section(
        model, key_task, "the key-side task (`corrupt=\"previous\"`, where the previous-token "
                         "head's output is what the induction heads' keys need)")
    metrics = dict(train_seconds=train_s, final_loss=final_loss, recipe=rc,
                   accuracy=acc, logit_diff_clean=float(ld.mean()),
                   logit_diff_corrupt=float(ld_corrupt.mean()),
                   top_induction_head=best_ind, top_previous_token_head=best_prev,
                   induction_scores=ind.round(3).tolist(), previous_token_scores=prev.round(3).tolist(),
                   head_patching=heads.round(3).tolist(),
                   head_patching_previous=heads_key.round(3).tolist(),
                   atp_vs_exact=validation, circuit=circuit)
    card = f"""# attn-only-2l-induction

A 2-layer **attention-only** GPT-2-style transformer (LayerNorm before attention and at the end,
no MLPs) trained from scratch on repeated random tokens. It forms the classic two-head induction
circuit: a previous-token head in layer 0 and an induction head in layer 1 that composes with it.

## Architecture

`{_architecture_json(cfg)}` ({_n_params(model):,} parameters, tied embeddings).
Vocabulary: `<bos>` (0), `<unk>` (1), `t2` .. `t{cfg.d_vocab - 1}` (word-level `tokenizer.json`).

## Data and recipe

Each training row is `[bos] prefix R R suffix` of {cfg.n_ctx} tokens, all uniform random ids
2..{cfg.d_vocab - 1}, with one segment `R` (length 4..{(cfg.n_ctx - 1) // 2}, random offset)
repeated; the loss is next-token cross-entropy only where induction can predict the next token
(inside the second copy). AdamW (weight decay 0.01), lr {rc['lr']} with {rc['warmup']} warmup
steps and cosine decay, gradient clipping 1, batch {rc['batch']}, {rc['steps']} steps, seed
{rc['seed']}. Reproduce: `python -m attrpatch.train induction --out models/attn-only-2l-induction`
({train_s:.0f} s of training on this 2-core CPU shared with other jobs; final loss {final_loss:.3f}).

## Behaviour (task: `attrpatch_task.json`, `induction_task(**{shown_args}, vocab=2..{cfg.d_vocab - 1})`)

`[bos] R R[:9]` with `R` 10 distinct random tokens; answer `R[9]`; the corrupted prompt replaces
the first occurrence of `R[9]` with a fresh token `c` (incorrect answer `c`).

- top-1 accuracy on clean prompts: **{acc:.3f}**
- logit diff (correct - incorrect): clean **{ld.mean():+.2f}**, corrupted **{ld_corrupt.mean():+.2f}**

## Attention scores (on `[bos] R R`, `R` of 20 tokens)

Induction score (attention from each second-copy token to the token after its first occurrence):

{_table(ind, 'layer', [f'head {h}' for h in range(H)])}

Previous-token score (attention to the immediately preceding token):

{_table(prev, 'layer', [f'head {h}' for h in range(H)])}

Top previous-token head: L{best_prev[0]}H{best_prev[1]}; top induction head: L{best_ind[0]}H{best_ind[1]}.

## Exact patching evidence

Denoising (clean activation patched into the corrupted run), normalised logit diff
(0 = corrupted, 1 = clean), computed by exact patching on the task above.

Per head (`attn.hook_z`, all positions):

{_table(heads, 'layer', [f'head {h}' for h in range(H)])}

Residual stream (`hook_resid_pre`) per layer and position (position 0 is `bos`, the first
occurrence of the answer is at position 10, the answer position is {task.n_pos - 1}):

{_table(resid[:, 8:], 'layer', [f'pos {p}' for p in range(8, task.n_pos)])}

This corruption changes the *value* the induction head copies (the token at position 10), so
the layer-0 heads that matter are those writing the current token into position 10, not the
previous-token head (whose output at position 10 is the same in both runs). To test the *key*
side, corrupt the token before the first occurrence instead (`corrupt="previous"`: position 9);
the induction head then has nothing to match, and the previous-token head's output at
position 10 is what restores it:

{_table(heads_key, 'layer', [f'head {h}' for h in range(H)])}

{_table(resid_key[:, 8:], 'layer', [f'pos {p}' for p in range(8, task.n_pos)])}

{section}
{circuit_text}"""
    return {
        "README.md": card,
        "tokenizer.json": tok.to_str(pretty=True),
        tasks.TASK_FILE: tasks.task_spec_json("induction", **task_args),
        "metrics.json": json.dumps(metrics, indent=2) + "\n",
    }, metrics


def _ioi_loss_floor(rc: dict) -> float:
    """The training loss of a perfect model: entropy of the random choices per weighted token."""
    templates, _, pairs, places, objects = _toy_arrays("train")
    nats = np.log(len(templates)) + np.log(len(pairs)) + np.log(2) + np.log(len(places)) + np.log(
        len(objects))
    return float(nats / (IOI_LEN + rc.get("answer_weight", 1.0) * IOI_LEN))


IOI_POS = ["bos", "opener", "N1", "and", "N2", "move", "move", "move", "place", ",", "S2", "verb",
           "a", "object", "to"]
IOI_TASK_ARGS = dict(n_prompts=64, seed=0, split="test", corruption="abc")


_IOI_ARCHITECTURES = {
    "gpt2": "A 4-layer GPT-2 (attention + MLP blocks, pre-LayerNorm, GELU, learned positions, "
            "tied embeddings)",
    "llama": "A 4-layer Llama-architecture transformer (RMSNorm, rotary positions, grouped-query "
             "attention with 4 query heads sharing 2 key/value heads, SwiGLU MLP, no biases, "
             "untied unembedding)",
}


_IOI_ROLES = {
    "ioi": "It is the demo's default model.",
    "ioi-llama": "Same data and recipe as `ioi-gpt2-4l`, on another family: "
                 "`attrpatch demo --model models/ioi-llama-4l`.",
}


def ioi_files(model: Model, facts: dict) -> tuple[dict[str, str], dict]:
    """Evaluate an IOI model: ``(files, metrics)`` as :func:`induction_files`."""
    cfg, rc = model.config, facts["recipe"]
    which = _shipped_as("toy_ioi", cfg.architecture)
    name = MODELS[which].directory
    train_s, final_loss = facts["train_seconds"], facts["final_loss"]
    task_args = IOI_TASK_ARGS
    task = tasks.toy_ioi_task(**task_args)
    big = tasks.toy_ioi_task(1000, seed=1, split="test")
    train_task = tasks.toy_ioi_task(1000, seed=1, split="train")
    acc_test, acc_train = accuracy(model, big), accuracy(model, train_task)
    ld_test = answer_logit_diff(model, big)
    ld = answer_logit_diff(model, task)
    ld_corrupt = answer_logit_diff(model, task, task.corrupt_tokens)
    runs = {d: atp_vs_exact(model, task, d, IOI_POS) for d in DIRECTIONS}
    heads, resid = (runs["denoise"][0].normalized(g) for g in ("z", "resid_pre"))
    dla_io, dla_s = head_direct_logits(model, big)
    abba = tasks.toy_ioi_task(64, seed=0, split="test", order="ABBA")
    pat = patterns(model, abba.clean_tokens)[:, :, :, 14]  # [L, B, H, key] from "to"
    to_io, to_s1, to_s2 = pat[..., 2].mean(1), pat[..., 4].mean(1), pat[..., 10].mean(1)
    swap = tasks.toy_ioi_task(64, seed=0, split="test", corruption="name_swap")
    heads_swap = exact_patching(model, swap, ("z",)).normalized("z")
    H = cfg.n_heads
    cols = [f"head {h}" for h in range(H)]
    ranked = sorted(((abs(heads[l_, h]), l_, h) for l_ in range(cfg.n_layers) for h in range(H)),
                    reverse=True)
    top = [f"L{l_}H{h} ({heads[l_, h]:+.2f})" for _, l_, h in ranked[:5]]
    (_, l1, h1), (_, l2, h2) = ranked[:2]
    rest = float((dla_io - dla_s).sum() - (dla_io[l1, h1] - dla_s[l1, h1]))
    where = ["S2 (position 10)" if to_s2[l1, h1] > 0.5 else "IO" if to_io[l1, h1] > 0.5
             else "S1" if to_s1[l1, h1] > 0.5 else "no single name"][0]
    best_pos = [IOI_POS[int(np.argmax(r))] for r in resid]
    narrative = (
        f"The largest single head is L{l1}H{h1} (denoising {heads[l1, h1]:+.2f} with ABC, "
        f"{heads_swap[l1, h1]:+.2f} with name swap); from `to` it attends mostly to {where} "
        f"(IO {to_io[l1, h1]:.2f}, S1 {to_s1[l1, h1]:.2f}, S2 {to_s2[l1, h1]:.2f}) and writes "
        f"{dla_io[l1, h1]:+.2f} directly to the IO logit and {dla_s[l1, h1]:+.2f} to the S logit. "
        f"Next is L{l2}H{h2} ({heads[l2, h2]:+.2f}; direct IO {dla_io[l2, h2]:+.2f}, "
        f"S {dla_s[l2, h2]:+.2f}). The residual-stream patch that restores most, per layer, is at "
        f"{', '.join(f'L{i}: {w}' for i, w in enumerate(best_pos))}. Summed over all other "
        f"heads, the direct effect on IO - S is {rest:+.2f} (they raise both names about "
        f"equally), against {dla_io[l1, h1] - dla_s[l1, h1]:+.2f} from L{l1}H{h1}: "
        + ("the model decides mainly by suppressing the repeated name, not by boosting IO."
           if dla_io[l1, h1] - dla_s[l1, h1] > 2 * abs(rest) and dla_s[l1, h1] < 0
           else "the decision is spread over several heads.")
    )
    section, validation = validation_section(
        runs, "the default task (`attrpatch_task.json`, ABC corruption; positions named as in "
              "the residual-stream table)")
    circuit_text, circuit = circuit_section(model, task, "the default task (ABC corruption)")
    metrics = dict(train_seconds=train_s, final_loss=final_loss, recipe=rc,
                   heldout_accuracy=acc_test, train_accuracy=acc_train,
                   heldout_logit_diff=float(ld_test.mean()),
                   task_logit_diff_clean=float(ld.mean()),
                   task_logit_diff_corrupt=float(ld_corrupt.mean()),
                   head_patching_abc=heads.round(3).tolist(),
                   head_patching_name_swap=heads_swap.round(3).tolist(),
                   resid_patching_abc=resid.round(3).tolist(),
                   direct_logit_io=dla_io.round(3).tolist(),
                   direct_logit_s=dla_s.round(3).tolist(),
                   attention_to_io=to_io.round(3).tolist(), attention_to_s1=to_s1.round(3).tolist(),
                   attention_to_s2=to_s2.round(3).tolist(),
                   atp_vs_exact=validation, circuit=circuit)
    card = f"""# {name}

{_IOI_ARCHITECTURES[cfg.architecture]} trained from scratch on templated
indirect-object-identification (IOI) sentences over a small word-level vocabulary. {_IOI_ROLES[which]}
Small enough to patch exhaustively on a laptop, with a measurable circuit (not the same circuit
as GPT-2 small's; see the evidence below).

## Architecture

`{_architecture_json(cfg)}` ({_n_params(model):,} parameters).
Vocabulary ({cfg.d_vocab} words, `tokenizer.json`, WordLevel + whitespace pre-tokenizer):
`<bos>` `<pad>` `<unk>`, template words, {len(tasks.TOY_NAMES)} names, {len(tasks.TOY_PLACES)} places,
{len(tasks.TOY_OBJECTS)} objects (`attrpatch.tasks.TOY_IOI_WORDS`).

## Data

Sentences `<bos> OPENER N1 and N2 MOVE MOVE MOVE PLACE , S VERB a OBJECT to IO` (15 tokens + the
answer): `{len(tasks.TOY_OPENERS)}` openers x {len(tasks.TOY_MOVES)} three-word movement phrases x
{len(tasks.TOY_VERBS)} giving verbs = 800 templates, of which 160 combinations are **held out**
(`toy_ioi_templates("test")`), and about 1 in 6 unordered name pairs are **held out**
(`toy_name_pair_held_out`). ABBA and BABA orders equally often. Every word is seen in training;
held-out prompts combine them in ways never trained on.

## Recipe

Next-token cross-entropy over every position, plus the IO-answer position weighted so it is half
of the loss. AdamW (weight decay 0.01), lr {rc['lr']}, {rc['warmup']} warmup steps, cosine decay,
gradient clipping 1, batch {rc['batch']}, {rc['steps']} steps, seed {rc['seed']}. Reproduce:
`python -m attrpatch.train {which} --out models/{name}` ({train_s:.0f} s of training on this
2-core CPU shared with other jobs; final loss {final_loss:.3f}, against a floor of about
{_ioi_loss_floor(rc):.3f} set by the randomly drawn words: template, names, order, place, object).

## Behaviour

- held-out templates and name pairs (1000 prompts): top-1 accuracy **{acc_test:.3f}**, logit
  diff IO - S **{ld_test.mean():+.2f}**; training distribution: accuracy {acc_train:.3f}
- default task (`attrpatch_task.json`: `toy_ioi_task(**{json.dumps(task_args)})`, ABC corruption):
  logit diff clean **{ld.mean():+.2f}**, corrupted **{ld_corrupt.mean():+.2f}**

## Mechanism evidence (exact patching)

{narrative}

Denoising, normalised logit diff (0 = corrupted, 1 = clean), one head's `hook_z` at all
positions patched from clean into corrupted (ABC corruption: the three name slots get fresh
names). Largest: {', '.join(top)}.

{_table(heads, 'layer', cols)}

The same with the `name_swap` corruption (S2 replaced by the IO name, which flips the answer):

{_table(heads_swap, 'layer', cols)}

Residual stream `hook_resid_pre` per layer (rows) and position (ABC corruption; one position
patched at a time, so restoring one of the three changed names cannot restore everything):

| layer | {' | '.join(IOI_POS)} |
|{' --- |' * (len(IOI_POS) + 1)}
""" + "\n".join(f"| {i} | " + " | ".join(f"{v:+.2f}" for v in r) + " |"
                for i, r in enumerate(resid)) + f"""

Direct logit attribution per head at `to` (clean held-out prompts; final LayerNorm scale
frozen), to the IO logit

{_table(dla_io, 'layer', cols)}

and to the S logit

{_table(dla_s, 'layer', cols)}

Attention from the final `to` (ABBA prompts, IO at position 2, S1 at 4, S2 at 10): to IO

{_table(to_io, 'layer', cols)}

to S1

{_table(to_s1, 'layer', cols)}

to S2

{_table(to_s2, 'layer', cols)}

{section}
{circuit_text}"""
    return {
        "README.md": card,
        "tokenizer.json": tasks.toy_ioi_tokenizer().to_str(pretty=True),
        tasks.TASK_FILE: tasks.task_spec_json("toy_ioi", **task_args),
        "metrics.json": json.dumps(metrics, indent=2) + "\n",
    }, metrics


class ShippedModel(NamedTuple):
    """How one shipped model is made: its architecture, training recipe and data, the card
    writer, the task named in its ``attrpatch_task.json``, and its folder under ``models/``."""

    config: ModelConfig
    recipe: dict
    batches: Callable[[ModelConfig, dict], Callable[[np.random.Generator], Batch]]
    files: Callable[[Model, dict], tuple[dict[str, str], dict]]
    task: str
    directory: str


def _shipped_as(task: str, architecture: str) -> str | None:
    """The `MODELS` entry that trains `architecture` on `task` (None if none does)."""
    return next((w for w, m in MODELS.items() if m.task == task and m.config.architecture == architecture),
                None)


def _ioi_data(cfg: ModelConfig, rc: dict):
    return ioi_batches(rc["batch"], rc.get("answer_weight", 1.0))


MODELS = {
    "induction": ShippedModel(INDUCTION_CFG, INDUCTION_RECIPE,
                              lambda cfg, rc: induction_batches(cfg.d_vocab, cfg.n_ctx, rc["batch"]),
                              induction_files, "induction", "attn-only-2l-induction"),
    "ioi": ShippedModel(IOI_CFG, IOI_RECIPE, _ioi_data, ioi_files, "toy_ioi", "ioi-gpt2-4l"),
    "ioi-llama": ShippedModel(IOI_LLAMA_CFG, IOI_RECIPE, _ioi_data, ioi_files, "toy_ioi", "ioi-llama-4l"),
}


# The files besides the weights that training writes in a checkpoint (each model's `files`).
CARD_FILES = ("README.md", "tokenizer.json", tasks.TASK_FILE, "metrics.json")


def write_checkpoint(which: str, model: Model, out: Path, facts: dict,
                     weights: bool = True) -> dict:
    """Compute the evidence for `model` and write its card, metrics, tokenizer and task file
    (and, with `weights`, the whole checkpoint) to `out`; returns the metrics."""
    files, metrics = MODELS[which].files(model, facts)
    if weights:
        save_model(model, out, extra_files=files)
    else:
        for name, text in files.items():
            atomic_write(out / name, lambda f, t=text: f.write(t.encode()))
    return metrics


def build(which: str, out: Path, steps: int | None = None, config: ModelConfig | None = None,
          log: Callable[[str], None] | None = print, **recipe) -> dict:
    """Train model `which` ("induction" or "ioi") from scratch, evaluate and save it with its
    card to `out`; `steps`, `config` and `recipe` override the defaults. Returns the metrics.
    An `out` that `save_model` must not replace (one holding files other than a checkpoint and
    its card files) is refused before training (`attrpatch.atomic.UnsafeOutputError`)."""
    check_checkpoint_target(out, CARD_FILES, "out")
    shipped = MODELS[which]
    cfg, default, batches = config or shipped.config, shipped.recipe, shipped.batches
    rc = dict(default) | recipe
    rc["steps"] = steps or rc["steps"]
    t0 = time.perf_counter()
    model, losses = train(cfg, batches(cfg, rc), rc["steps"], rc["lr"], rc["seed"], rc["warmup"],
                          log=log)
    facts = dict(train_seconds=round(time.perf_counter() - t0, 1),
                 final_loss=round(losses[-1][1], 4), recipe=rc)
    return write_checkpoint(which, model, Path(out), facts)


def card(path: str | Path) -> dict:
    """Rewrite the card, metrics, tokenizer and task file of a checkpoint this module trained,
    recomputing all evidence from its weights (unchanged) and keeping the training facts
    (time, final loss, recipe) from its ``metrics.json``. Returns the metrics."""
    path = Path(path)
    name = tasks.task_spec(path)["task"]
    model = load_model(path)
    which = _shipped_as(name, model.config.architecture)
    if which is None:
        raise ValueError(f"{path}: a {model.config.architecture} model with task {name!r} is not one "
                         f"this module trains ({', '.join(sorted({m.task for m in MODELS.values()}))})")
    old = json.loads((path / "metrics.json").read_text())
    missing = [k for k in FACTS[:2] if k not in old]
    if missing:
        raise ValueError(f"{path}/metrics.json lacks the training facts {missing}")
    facts = {k: old[k] for k in FACTS[:2]} | {"recipe": old.get("recipe", dict(MODELS[which].recipe))}
    return write_checkpoint(which, model, path, facts, weights=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attrpatch.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="which", required=True)
    for which in MODELS:
        p = sub.add_parser(which, help=f"train the {which} model from scratch")
        p.add_argument("--out", required=True, help="checkpoint directory to write")
        p.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    p = sub.add_parser("card", help="recompute a trained checkpoint's card and metrics "
                                    "(weights unchanged, training facts from metrics.json)")
    p.add_argument("path", help="checkpoint directory, e.g. models/ioi-gpt2-4l")
    args = parser.parse_args(argv)
    try:
        metrics = card(args.path) if args.which == "card" else build(args.which, Path(args.out),
                                                                       args.steps)
    except UnsafeOutputError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list | dict)},
                     indent=2))


if __name__ == "__main__":
    main()
