"""`Task` (clean and corrupted prompts, answers) and the metrics patching measures.

A metric maps the logits at each prompt's answer position to one number per prompt:
``metric(answer_logits [batch, d_vocab], task, reference) -> [batch]``, where `reference` holds
the clean and corrupted runs' answer logits (for normalisation and KL). The batch metric is the
mean over prompts; per-prompt values are always available.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


class Task(eqx.Module):
    """Clean and corrupted prompts with their answers.

    **Arguments:**

    - `clean_tokens`, `corrupt_tokens`: int ``[batch, pos]``, the same shape.
    - `correct_tokens`, `incorrect_tokens`: int ``[batch, n]`` (a 1-D ``[batch]`` is taken as
      ``n = 1``); the logit difference is mean(correct) - mean(incorrect).
    - `attention_mask`: optional ``[batch, pos]`` (1 real, 0 padding; right padding). Each
      prompt's answer position is its last real token.
    - `metric`: the default metric's name (see :data:`METRICS`).
    """

    clean_tokens: Int[Array, "batch pos"]
    corrupt_tokens: Int[Array, "batch pos"]
    correct_tokens: Int[Array, "batch n_correct"]
    incorrect_tokens: Int[Array, "batch n_incorrect"]
    attention_mask: Int[Array, "batch pos"] | None = None
    metric: str = eqx.field(static=True, default="logit_diff")

    def __init__(self, clean_tokens, corrupt_tokens, correct_tokens, incorrect_tokens,
                 attention_mask=None, metric="logit_diff"):
        clean, corrupt = np.asarray(clean_tokens), np.asarray(corrupt_tokens)
        if clean.ndim != 2:
            raise ValueError(f"clean_tokens must be [batch, pos], got shape {clean.shape}")
        if 0 in clean.shape:
            raise ValueError(f"clean_tokens has shape {clean.shape}: a task needs at least one "
                             "prompt of at least one token")
        if clean.shape != corrupt.shape:
            raise ValueError(
                f"clean_tokens {clean.shape} and corrupt_tokens {corrupt.shape} must have the same "
                "shape (pad both to one length and pass attention_mask)"
            )
        for name, a in (("clean_tokens", clean), ("corrupt_tokens", corrupt)):
            _check_ids(name, a)
        answers = []
        for name, a in (("correct_tokens", correct_tokens), ("incorrect_tokens", incorrect_tokens)):
            a = np.asarray(a)
            _check_ids(name, a)
            a = a[:, None] if a.ndim == 1 else a
            if a.ndim != 2 or a.shape[0] != clean.shape[0]:
                raise ValueError(
                    f"{name} must be [batch] or [batch, n] with batch={clean.shape[0]}, "
                    f"got shape {a.shape}"
                )
            answers.append(jnp.asarray(a, jnp.int32))
        if attention_mask is not None:
            mask = np.asarray(attention_mask)
            if mask.shape != clean.shape:
                raise ValueError(f"attention_mask {mask.shape} must match tokens {clean.shape}")
            if not np.isin(mask, (0, 1)).all():
                bad = mask[~np.isin(mask, (0, 1))].flat[0]
                raise ValueError(f"attention_mask holds {bad}: only 1 (real token) and 0 "
                                 "(padding) are allowed")
            if (mask.sum(1) == 0).any():
                raise ValueError("attention_mask has a prompt with no real token")
            if (np.diff(mask.astype(int), axis=1) > 0).any():
                raise ValueError("attention_mask must be right-padded (1s then 0s in every row)")
            attention_mask = jnp.asarray(mask, jnp.int32)
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        self.clean_tokens = jnp.asarray(clean, jnp.int32)
        self.corrupt_tokens = jnp.asarray(corrupt, jnp.int32)
        self.correct_tokens, self.incorrect_tokens = answers
        self.attention_mask = attention_mask
        self.metric = metric

    @property
    def batch(self) -> int:
        return self.clean_tokens.shape[0]

    @property
    def n_pos(self) -> int:
        return self.clean_tokens.shape[1]

    @property
    def answer_positions(self) -> Int[Array, " batch"]:
        """Index of each prompt's last real token."""
        if self.attention_mask is None:
            return jnp.full((self.batch,), self.n_pos - 1, jnp.int32)
        return self.attention_mask.sum(1).astype(jnp.int32) - 1

    def runs(self, direction: str) -> tuple[Array, Array]:
        """(base tokens, source tokens): denoise patches clean into corrupt, noise the reverse."""
        if direction == "denoise":
            return self.corrupt_tokens, self.clean_tokens
        if direction == "noise":
            return self.clean_tokens, self.corrupt_tokens
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")

    def check_for(self, model) -> None:
        """Raise a clear `ValueError` if `model` cannot run this task (ids, lengths)."""
        model.check_tokens(self.clean_tokens, self.attention_mask)
        model.check_tokens(self.corrupt_tokens, self.attention_mask)
        for name in ("correct_tokens", "incorrect_tokens"):
            a = np.asarray(getattr(self, name))
            if ((a < 0) | (a >= model.config.d_vocab)).any():
                raise ValueError(
                    f"{name} has ids outside the vocabulary [0, {model.config.d_vocab})"
                )

    @property
    def first_diff_positions(self) -> np.ndarray:
        """Per prompt, the first position where clean and corrupt differ (``pos`` if none)."""
        differ = np.asarray(self.clean_tokens != self.corrupt_tokens)
        return np.where(differ.any(1), differ.argmax(1), self.n_pos)


def _check_ids(name: str, ids: np.ndarray) -> None:
    """`ValueError` unless `ids` are integers that fit int32 (checked before any cast wraps them)."""
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}")
    limits = np.iinfo(np.int32)
    if ids.size and (ids.min() < 0 or ids.max() > limits.max):
        bad = ids.min() if ids.min() < 0 else ids.max()
        raise ValueError(f"{name} holds {int(bad)}: token ids must be in 0..{limits.max}")


class MetricReference(NamedTuple):
    """Answer logits ``[batch, d_vocab]`` of the unpatched clean and corrupted runs."""

    clean_logits: Float[Array, "batch d_vocab"]
    corrupt_logits: Float[Array, "batch d_vocab"]


MetricFn = Callable[[Float[Array, "batch d_vocab"], Task, MetricReference], Float[Array, " batch"]]


def _gather_mean(logits, tokens):
    return jnp.take_along_axis(logits, tokens, axis=-1).mean(-1)


def logit_diff(logits, task: Task, reference: MetricReference):
    """mean(correct logits) - mean(incorrect logits), per prompt."""
    return _gather_mean(logits, task.correct_tokens) - _gather_mean(logits, task.incorrect_tokens)


def normalized_logit_diff(logits, task: Task, reference: MetricReference):
    """``(ld - mean ld_corrupt) / (mean ld_clean - mean ld_corrupt)``: 0 = corrupted, 1 = clean.

    Normalised by batch means, so the batch mean of this is the normalised batch logit diff.
    """
    clean = logit_diff(reference.clean_logits, task, reference).mean()
    corrupt = logit_diff(reference.corrupt_logits, task, reference).mean()
    return (logit_diff(logits, task, reference) - corrupt) / (clean - corrupt)


def logprob(logits, task: Task, reference: MetricReference):
    """Log-probability of the (first) correct answer."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits), task.correct_tokens[:, :1], -1)[:, 0]


def prob(logits, task: Task, reference: MetricReference):
    """Probability of the (first) correct answer."""
    return jnp.exp(logprob(logits, task, reference))


def kl_from_clean(logits, task: Task, reference: MetricReference):
    """KL(clean || this run) of the next-token distribution, in nats."""
    p_log = jax.nn.log_softmax(reference.clean_logits)
    return (jnp.exp(p_log) * (p_log - jax.nn.log_softmax(logits))).sum(-1)


METRICS: dict[str, MetricFn] = {
    "logit_diff": logit_diff,
    "normalized_logit_diff": normalized_logit_diff,
    "logprob": logprob,
    "prob": prob,
    "kl": kl_from_clean,
}


def resolve_metric(metric: str | MetricFn | None, task: Task) -> tuple[str, MetricFn]:
    """(name, function) for a metric given by name, as a function, or None (the task's default)."""
    metric = task.metric if metric is None else metric
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return metric, METRICS[metric]


def check_finite_metrics(base, source) -> None:
    """`ValueError` naming the run and prompts where the unpatched metric is NaN or infinite
    (``[batch]`` each): every effect would be meaningless, so nothing is computed from them."""
    for run, values in (("base", np.asarray(base)), ("source", np.asarray(source))):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise ValueError(
                f"the unpatched {run} run's metric is {values[bad[0]]} on prompt(s) "
                f"{bad[:5].tolist()}{' ...' if bad.size > 5 else ''}: the model gives non-finite "
                "logits there (NaN or infinite weights in the checkpoint, or a config value such "
                "as a negative norm epsilon). Check the checkpoint; nothing was computed from it")


def check_reference(name: str, task: Task, reference: MetricReference) -> None:
    """Warn where a metric is ill-conditioned on these prompts (tiny normalisation gap)."""
    if name == "normalized_logit_diff":
        gap = float(
            logit_diff(reference.clean_logits, task, reference).mean()
            - logit_diff(reference.corrupt_logits, task, reference).mean()
        )
        if abs(gap) < 1e-3:
            warnings.warn(
                f"normalized_logit_diff: clean and corrupted logit differences differ by only "
                f"{gap:.2e}; the normalised metric divides by this and is meaningless here. "
                "Use metric='logit_diff'.",
                stacklevel=3,
            )
