"""`Model`: a config plus a params pytree, with a jitted forward, a cache, and interventions."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Float, Int

from attrpatch.arch import transformer
from attrpatch.arch.config import ModelConfig
from attrpatch.interventions import NO_INTERVENTIONS, Interventions
from attrpatch.sites import all_site_names, parse_site_name


@partial(jax.jit, static_argnames=("cfg", "cache_keys", "remat"))
def _forward(params, cfg, tokens, attention_mask, interventions, cache_keys, logit_positions,
             remat=False):
    return transformer.forward(
        params, cfg, tokens, attention_mask, interventions, cache_keys, logit_positions, remat
    )


def compilation_cache_dir() -> Path:
    """Where compiled computations are kept across runs: ``$ATTRPATCH_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/attrpatch``, else ``~/.cache/attrpatch`` (a ``jax`` folder inside)."""
    root = os.environ.get("ATTRPATCH_CACHE_DIR") or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "attrpatch")
    return Path(root) / "jax"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Keep JAX's compiled computations on disk (`path`, default :func:`compilation_cache_dir`),
    so later processes skip compiling what an earlier one compiled. Changes JAX's global settings
    for this process; importing attrpatch never does. Returns the directory."""
    path = Path(path) if path is not None else compilation_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class Model(eqx.Module):
    """A transformer language model: `config` (static) and `params` (a pytree of arrays).

    Compiles once per input shape and set of requested sites.
    """

    config: ModelConfig = eqx.field(static=True)
    params: dict

    @property
    def site_names(self) -> list[str]:
        """Every hook name this model has, in forward order."""
        return all_site_names(self.config)

    def check_tokens(self, tokens, attention_mask=None) -> None:
        """Raise a clear `ValueError` for tokens the model cannot take."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
        if tokens.shape[1] > self.config.n_ctx:
            raise ValueError(
                f"{tokens.shape[1]} positions exceed the model's context of {self.config.n_ctx}"
            )
        bad = (tokens < 0) | (tokens >= self.config.d_vocab)
        if bad.any():
            b, p = np.argwhere(bad)[0]
            raise ValueError(
                f"token id {tokens[b, p]} at [{b}, {p}] is outside the vocabulary "
                f"[0, {self.config.d_vocab})"
            )
        if attention_mask is not None and np.shape(attention_mask) != tokens.shape:
            raise ValueError(
                f"attention_mask shape {np.shape(attention_mask)} differs from tokens {tokens.shape}"
            )

    def run(
        self,
        tokens: Int[Array, "batch pos"],
        attention_mask: Int[Array, "batch pos"] | None = None,
        interventions: Interventions = NO_INTERVENTIONS,
        cache_keys: tuple[str, ...] = (),
        logit_positions: Int[Array, " batch"] | None = None,
        remat: bool = False,
    ) -> tuple[Array, dict[str, Array]]:
        """The raw forward (see `attrpatch.arch.transformer.forward`); traceable, for the engines."""
        return _forward(
            self.params, self.config, tokens, attention_mask, interventions, tuple(cache_keys),
            logit_positions, remat,
        )

    def __call__(
        self,
        tokens: Int[Array, "batch pos"],
        attention_mask: Int[Array, "batch pos"] | None = None,
        interventions: Interventions = NO_INTERVENTIONS,
    ) -> Float[Array, "batch pos d_vocab"]:
        """Logits ``[batch, pos, d_vocab]`` (float32, or float64 for a float64 model)."""
        self.check_tokens(tokens, attention_mask)
        return self.run(tokens, attention_mask, interventions)[0]

    def run_with_cache(
        self,
        tokens: Int[Array, "batch pos"],
        names: Sequence[str] | None = None,
        attention_mask: Int[Array, "batch pos"] | None = None,
        interventions: Interventions = NO_INTERVENTIONS,
    ) -> tuple[Float[Array, "batch pos d_vocab"], dict[str, Array]]:
        """Logits and a cache mapping TransformerLens hook names to activations.

        **Arguments:**

        - `names`: the hook names to cache (default: all). Only these are returned; sites of
          the same kind in other layers are computed but not kept.

        **Returns:** `(logits, cache)`; shapes in `attrpatch.sites.BLOCK_SITE_TABLE`.
        """
        self.check_tokens(tokens, attention_mask)
        names = self.site_names if names is None else list(names)
        parsed = [parse_site_name(n, self.config) for n in names]
        keys = tuple(sorted({key for _, key in parsed}))
        logits, raw = self.run(tokens, attention_mask, interventions, keys)
        cache = {
            name: raw[key] if layer is None else raw[key][layer]
            for name, (layer, key) in zip(names, parsed, strict=True)
        }
        return logits, cache
