"""What every family's Hugging Face conversion shares: reading `config.json` fields so that none
is silently ignored, reading rotary settings in both config formats, and taking tensors by name
so that none is missing, mis-shaped or left over."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from attrpatch.arch.hub_audit import (
    BOOKKEEPING,
    DEFAULTS,
    HARMLESS_ONLY_AT,
    NULL_MEANS_OFF,
    REFUSED,
    reinterpret,
)


def check_int(key: str, value, minimum: int = 1) -> int:
    """`value` as an int, or a ValueError naming `key` (bools, strings, NaN and fractions refused)."""
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or value != int(value) or value < minimum):
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{key}={value!r} must be {wanted}")
    return int(value)


def check_float(key: str, value, positive: bool = False) -> float:
    """`value` as a float, or a ValueError naming `key` (bools, strings, NaN and infinities refused)."""
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or (positive and value <= 0)):
        raise ValueError(f"{key}={value!r} must be a {'positive' if positive else 'finite'} number")
    return float(value)


class HFConfig:
    """A `config.json` dict read field by field, each value checked for its type and range:
    :meth:`finish` refuses, by name, every field that was not read and is not known to be harmless
    (:mod:`attrpatch.arch.hub_audit`).

    Legacy values that `transformers` reinterprets at load are reinterpreted identically, with its
    warning (`hub_audit.reinterpret`). Messages name the field but not the file:
    `attrpatch.load_model` prefixes the file's path. An absent field takes `transformers`' default
    for `model_type` (`hub_audit.DEFAULTS`), else the `default` passed to the getter; a null
    field counts as absent, except those in `hub_audit.NULL_MEANS_OFF`, where null means None.
    `aliases` maps other names of a field to the name read (`transformers`' ``attribute_map``).
    """

    def __init__(self, raw: dict, family: str, model_type: str, aliases: dict[str, str] | None = None):
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        self.raw, self.family, self.read = reinterpret(model_type, raw), family, set()
        self.defaults = DEFAULTS.get(model_type, {})
        for alias, key in (aliases or {}).items():  # transformers' `attribute_map`
            if self.raw.get(alias) is None:
                continue
            if self.raw.get(key) not in (None, self.raw[alias]):
                raise ValueError(f"{alias}={self.raw[alias]!r} and {key}={self.raw[key]!r} are the same "
                                 f"field for {family} and disagree; keep one")
            self.raw[key] = self.raw.pop(alias)

    def get(self, key: str, default=None):
        self.read.add(key)
        value = self.raw.get(key)
        if value is not None:
            return value
        if key in self.raw and key in NULL_MEANS_OFF:
            return None
        return self.defaults.get(key, default)

    def given(self, key: str) -> bool:
        """Whether `key` is in the config at all (a null counts: it can mean "off")."""
        self.read.add(key)
        return key in self.raw

    def _required(self, key: str, default, required: bool):
        value = self.get(key, default)
        if value is None and required:
            raise ValueError(f"missing required {self.family} field {key!r}")
        return value

    def int(self, key: str, default=None, minimum: int = 1, required: bool = True) -> int | None:
        """An integer field (at least `minimum`); None when absent and not `required`."""
        value = self._required(key, default, required)
        return None if value is None else check_int(key, value, minimum)

    def float(self, key: str, default=None, positive: bool = False, required: bool = True) -> float | None:
        """A finite number (positive if `positive`); None when absent and not `required`."""
        value = self._required(key, default, required)
        return None if value is None else check_float(key, value, positive)

    def bool(self, key: str, default: bool) -> bool:
        """A JSON ``true`` / ``false`` field (``1``, ``"false"`` and the like are refused)."""
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r} must be true or false")
        return value

    def refuse(self, key: str, why: str):
        raise ValueError(f"{key}={self.raw.get(key)!r} is not supported for "
                         f"{self.family}: {why}")

    def finish(self) -> None:
        for key, why in REFUSED.items():
            if self.raw.get(key) is not None:
                self.refuse(key, why)
        for key, allowed in HARMLESS_ONLY_AT.items():
            value = self.raw.get(key)
            if key not in self.read and value is not None and value is not allowed:  # `is`: 0 is not False
                self.refuse(key, f"only {allowed!r} is implemented")
        unknown = sorted(k for k in set(self.raw) - self.read - BOOKKEEPING - set(HARMLESS_ONLY_AT)
                         if not k.startswith("_"))
        if unknown:
            raise ValueError(
                f"field(s) {', '.join(map(repr, unknown))} are not implemented by "
                f"attrpatch's {self.family} model, and may change the computation; refusing rather "
                "than ignoring them. Remove a field from config.json only if you know it does not "
                "affect the forward pass."
            )


_ROPE_KEYS = {"default": set(), "linear": {"factor"},
              "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}


def read_rope(c: HFConfig, max_positions: int) -> dict:
    """Rotary settings from either config format, as `transformers` resolves them: a non-empty
    ``rope_scaling`` (the older name) replaces ``rope_parameters``; ``rope_theta`` and
    ``partial_rotary_factor`` come from that dict, else from the top level (GPT-NeoX's
    ``rotary_emb_base`` / ``rotary_pct``), else the family's default; the legacy key ``type``
    means ``rope_type``; a ``llama3`` dict without ``original_max_position_embeddings`` uses
    `max_positions`. Returns `ModelConfig` fields plus ``partial_rotary_factor``. Unimplemented
    scaling types are refused."""
    chosen = {}
    for key in ("rope_parameters", "rope_scaling"):  # a non-empty rope_scaling wins, as in transformers
        value = c.get(key, {})
        if not isinstance(value, dict):
            c.refuse(key, "expected an object")
        chosen = value or chosen
    params = dict(chosen)

    def first(*keys, default):  # the dict's value, else the first top-level key given, else the default
        for key in keys:
            value = params.pop(key, None) if key == keys[0] else None
            value = c.raw.get(key) if value is None else value
            c.read.add(key)
            if value is not None:
                return value
        return c.defaults.get(keys[0], default)

    theta = first("rope_theta", "rotary_emb_base", default=10000.0)
    partial = first("partial_rotary_factor", "rotary_pct", default=1.0)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in _ROPE_KEYS:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; "
                         f"supported: {', '.join(_ROPE_KEYS)}")
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", max_positions)
    missing = _ROPE_KEYS[rope_type] - set(params)
    extra = set(params) - _ROPE_KEYS[rope_type]
    if missing or extra:
        raise ValueError(f"rope type {rope_type!r} needs exactly the fields "
                         f"{sorted(_ROPE_KEYS[rope_type])}; missing {sorted(missing)}, "
                         f"not implemented {sorted(extra)}")
    scaling = {k: check_int(f"rope {k}", v) if k == "original_max_position_embeddings"
               else check_float(f"rope {k}", v, positive=True) for k, v in params.items()}
    return {"rope_theta": check_float("rope_theta", theta, positive=True), "rope_type": rope_type,
            "rope_scaling": tuple(sorted((k, float(v)) for k, v in scaling.items())),
            "partial_rotary_factor": check_float("partial_rotary_factor", partial, positive=True)}


def write_rope(cfg) -> dict:
    """The ``rope_parameters`` entry of a config.json, for `ModelConfig` `cfg`."""
    out = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
    out |= {k: (int(v) if k == "original_max_position_embeddings" else v) for k, v in cfg.rope_scaling}
    if cfg.rotary_width != cfg.d_head:
        out["partial_rotary_factor"] = cfg.rotary_width / cfg.d_head
    return out


def read_windows(c: HFConfig, n_layers: int, sliding_window: int | None, default_types) -> tuple | None:
    """Per-layer windows of `sliding_window` tokens (checked by the caller) from ``layer_types``
    (``"sliding_attention"`` / ``"full_attention"``), or `default_types` when the config has none."""
    types = c.get("layer_types", default_types)
    if types is None or sliding_window is None:
        return None
    if not isinstance(types, list) or len(types) != n_layers:
        c.refuse("layer_types", f"expected a list of {n_layers} layer types")
    bad = [t for t in types if t not in ("sliding_attention", "full_attention")]
    if bad:
        c.refuse("layer_types", f"layer type(s) {bad} are not implemented")
    windows = tuple(sliding_window if t == "sliding_attention" else None for t in types)
    return windows if any(w is not None for w in windows) else None


def write_windows(cfg) -> dict:
    """``sliding_window`` and ``layer_types`` for a config.json."""
    if cfg.windows is None:
        return {"sliding_window": None}
    sizes = {w for w in cfg.windows if w is not None}
    if len(sizes) != 1:
        raise ValueError(f"Hugging Face configs have one sliding_window; this model has {sorted(sizes)}")
    types = ["sliding_attention" if w is not None else "full_attention" for w in cfg.windows]
    return {"sliding_window": sizes.pop(), "layer_types": types}


class Tensors:
    """Checkpoint tensors (numpy, in their stored dtype) taken by name, each at most once.

    :meth:`finish` refuses leftovers, so a tensor the architecture does not use is an error, not
    silently dropped. Values stay in their stored dtype (a bf16 checkpoint stays bf16) until
    :func:`to_params` casts each one.
    """

    def __init__(self, tensors: dict[str, np.ndarray], family: str, ignored_suffixes=()):
        self.plain = {k: v for k, v in tensors.items() if not k.endswith(tuple(ignored_suffixes))}
        self.family, self.used = family, set()

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.plain:
            raise ValueError(f"checkpoint is missing tensor {key!r}, which this {self.family} "
                             "config requires (is config.json from the same model?)")
        value = self.plain[key]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"tensor {key!r} has shape {tuple(value.shape)}, but the config implies "
                             f"{tuple(shape)}")
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            raise ValueError(f"tensor {key!r} has dtype {value.dtype}; weights must be floating point")
        self.used.add(key)
        return value

    def stack(self, pattern: str, n_layers: int, shape: tuple[int, ...]) -> np.ndarray:
        """``pattern.format(i)`` for every layer, stacked ``[n_layers, *shape]``."""
        return np.stack([self.take(pattern.format(i), shape) for i in range(n_layers)])

    def unembedding(self, embed: np.ndarray, head_key: str, cfg) -> np.ndarray:
        """``W_U [d_model, d_vocab]``: the embedding's transpose for a tied model (a redundant
        `head_key` copy some exports keep is accepted unused), else the `head_key` tensor's."""
        if cfg.tie_word_embeddings:
            self.plain.pop(head_key, None)
            return embed.T
        return self.take(head_key, (cfg.d_vocab, cfg.d_model)).T

    def finish(self) -> None:
        unexpected = sorted(set(self.plain) - self.used)
        if unexpected:
            shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
            raise ValueError(f"checkpoint has {len(unexpected)} tensor(s) a {self.family} with this "
                             f"config does not use: {shown}. Is config.json from the same model?")


def to_params(tree: dict, dtype) -> dict:
    """Cast every leaf to a JAX array of `dtype`, one at a time."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), tree)


def to_numpy(params: dict) -> dict:
    """Params as numpy arrays for writing: float32, but bfloat16 and float16 stay as they are
    (no float32 copy of a big half-precision model)."""
    half = (jnp.bfloat16, jnp.float16)
    return jax.tree.map(lambda x: np.asarray(x) if x.dtype in half else np.asarray(x, np.float32),
                        params)


def heads_in(w: np.ndarray, n_heads: int) -> np.ndarray:
    """A torch Linear weight ``[..., n_heads * d_head, d_model]`` as ``[..., d_model, n_heads, d_head]``."""
    *lead, out, d = w.shape
    return np.moveaxis(w.reshape(*lead, n_heads, out // n_heads, d), -1, -3)


def heads_out(w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`heads_in` for one layer: ``[d_model, head, d_head]`` ->
    ``[head * d_head, d_model]``."""
    d, h, e = w.shape
    return np.moveaxis(w, 0, -1).reshape(h * e, d)
