"""Site names and shapes: the one table.

Names follow TransformerLens hook names. Axis letters: ``batch`` prompts, ``pos`` token position,
``head`` attention head, ``d_head`` per-head feature, ``query_pos``/``key_pos`` attention axes,
``kv_head`` key/value head (grouped-query attention: fewer than ``head``), ``d_model`` residual
width, ``d_mlp`` MLP width, ``d_vocab`` vocabulary.

Which sites a model has follows from its config (:func:`block_keys`): rotary models add
``attn.hook_rot_q`` / ``attn.hook_rot_k`` and have no ``hook_pos_embed``; models with q/k norms
(Qwen3, Gemma 3, OLMo 2) add ``attn.q_norm.hook_normalized`` / ``attn.k_norm.hook_normalized``
(TransformerLens's names and place: after ``hook_q`` / ``hook_k``, before rotary); parallel blocks
(GPT-NeoX) have no ``hook_resid_mid``; gated MLPs add ``mlp.hook_pre_linear``; attention-only
models have no MLP sites.
"""

from __future__ import annotations

import re

# key (without the "blocks.{l}." prefix) -> (shape, meaning). Block sites first, in forward order.
BLOCK_SITE_TABLE: dict[str, tuple[str, str]] = {
    "hook_resid_pre": ("batch pos d_model", "residual stream entering the block"),
    "attn.hook_q": ("batch pos head d_head", "queries, after the bias (before any q norm, and rotary)"),
    "attn.hook_k": ("batch pos kv_head d_head", "keys, after the bias (before any k norm, and rotary)"),
    "attn.hook_v": ("batch pos kv_head d_head", "values, after the bias"),
    "attn.q_norm.hook_normalized": (
        "batch pos head d_head",
        "queries after the q norm, its weight included (models with q/k norms; before rotary)"),
    "attn.k_norm.hook_normalized": (
        "batch pos kv_head d_head",
        "keys after the k norm, its weight included (models with q/k norms; before rotary)"),
    "attn.hook_rot_q": ("batch pos head d_head", "queries after rotary (rotary models)"),
    "attn.hook_rot_k": ("batch pos kv_head d_head", "keys after rotary (rotary models)"),
    "attn.hook_attn_scores": (
        "batch head query_pos key_pos",
        "scaled (and soft-capped) attention logits, causal and window masks applied (masked "
        "entries at the dtype's minimum)",
    ),
    "attn.hook_pattern": ("batch head query_pos key_pos", "attention probabilities"),
    "attn.hook_z": ("batch pos head d_head", "per-head mix of values (the head's output before W_O)"),
    "hook_attn_out": ("batch pos d_model",
                      "attention layer output as it enters the residual stream (bias, post-norm included)"),
    "hook_resid_mid": ("batch pos d_model", "residual stream after attention (sequential blocks)"),
    "mlp.hook_pre": ("batch pos d_mlp", "MLP neuron pre-activations (the gate, in gated MLPs)"),
    "mlp.hook_pre_linear": ("batch pos d_mlp", "gated MLPs: the up projection the activation multiplies"),
    "mlp.hook_post": ("batch pos d_mlp", "MLP neuron activations (act(gate) * up, in gated MLPs)"),
    "hook_mlp_out": ("batch pos d_model",
                     "MLP output as it enters the residual stream (bias, post-norm included)"),
    "hook_resid_post": ("batch pos d_model", "residual stream leaving the block"),
}
GLOBAL_SITE_TABLE: dict[str, tuple[str, str]] = {
    "hook_embed": ("batch pos d_model", "token embedding"),
    "hook_pos_embed": ("batch pos d_model", "position embedding (learned positions only)"),
    "ln_final.hook_normalized": ("batch pos d_model", "final norm output, before unembedding"),
}
# Sites that exist only in models with MLPs.
MLP_SITES = frozenset({"hook_resid_mid", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post",
                       "hook_mlp_out"})

# TransformerLens short names (`transformer_lens.utils.get_act_name`) -> block key.
SHORT_NAMES: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "z": "attn.hook_z",
    "attn_scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern",
    "pre": "mlp.hook_pre",
    "pre_linear": "mlp.hook_pre_linear",
    "post": "mlp.hook_post",
}

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def site_axes(key: str) -> tuple[str, ...]:
    """Axis names of a block site (from the table), ``d_mlp`` spelled ``neuron`` and ``kv_head``
    spelled ``head`` (a key/value site's heads are its kv heads: `ModelConfig.heads_of`).

    E.g. ``site_axes("mlp.hook_post") == ("batch", "pos", "neuron")``.
    """
    names = {"d_mlp": "neuron", "kv_head": "head"}
    return tuple(names.get(a, a) for a in BLOCK_SITE_TABLE[key][0].split())


def block_keys(cfg) -> tuple[str, ...]:
    """The block site keys a model with config `cfg` has, in forward order."""

    def has(key: str) -> bool:
        if key in MLP_SITES and cfg.attn_only:
            return False
        if key in ("attn.hook_rot_q", "attn.hook_rot_k"):
            return cfg.positions == "rotary"
        if key in ("attn.q_norm.hook_normalized", "attn.k_norm.hook_normalized"):
            return cfg.qk_norm is not None
        if key == "hook_resid_mid":
            return cfg.has_resid_mid
        if key == "mlp.hook_pre_linear":
            return cfg.gated_mlp
        return True

    return tuple(k for k in BLOCK_SITE_TABLE if has(k))


def attention_qk_keys(cfg) -> tuple[str, str]:
    """The query and key sites attention scores are computed from: after rotary, else after the
    q/k norms, else the projections."""
    if cfg.positions == "rotary":
        return "attn.hook_rot_q", "attn.hook_rot_k"
    if cfg.qk_norm is not None:
        return "attn.q_norm.hook_normalized", "attn.k_norm.hook_normalized"
    return "attn.hook_q", "attn.hook_k"


def global_keys(cfg) -> tuple[str, ...]:
    """The global (layer-less) site keys of a model, in forward order."""
    return tuple(k for k in GLOBAL_SITE_TABLE if not (k == "hook_pos_embed" and cfg.positions != "learned"))


def all_site_names(cfg) -> list[str]:
    """Every full hook name of a model, in forward order."""
    first, last = global_keys(cfg)[:-1], global_keys(cfg)[-1]
    names = list(first)
    for layer in range(cfg.n_layers):
        names += [f"blocks.{layer}.{k}" for k in block_keys(cfg)]
    return names + [last]


def parse_site_name(name: str, cfg) -> tuple[int | None, str]:
    """Split a full hook name into (layer or None for global sites, key); clear error if the
    model has no such site."""
    m = _BLOCK_NAME.match(name)
    if m:
        layer, key = int(m.group(1)), m.group(2)
        if key not in block_keys(cfg):
            raise ValueError(
                f"unknown site {name!r}: a block of this {cfg.architecture} model has "
                f"{', '.join(block_keys(cfg))}"
            )
        if not 0 <= layer < cfg.n_layers:
            raise ValueError(f"site {name!r} names layer {layer}, but the model has {cfg.n_layers}")
        return layer, key
    if name in global_keys(cfg):
        return None, name
    raise ValueError(
        f"unknown site {name!r}: expected 'blocks.<layer>.<hook>' (e.g. 'blocks.0.hook_resid_pre') "
        f"or one of {', '.join(global_keys(cfg))}"
    )


def site_table_markdown() -> str:
    """The site table as Markdown (name, shape, meaning), for the README and reports."""
    rows = ["| site | shape | meaning |", "| --- | --- | --- |"]
    for k, (shape, meaning) in GLOBAL_SITE_TABLE.items():
        if k != "ln_final.hook_normalized":
            rows.append(f"| `{k}` | `[{shape}]` | {meaning} |")
    for k, (shape, meaning) in BLOCK_SITE_TABLE.items():
        rows.append(f"| `blocks.{{l}}.{k}` | `[{shape}]` | {meaning} |")
    shape, meaning = GLOBAL_SITE_TABLE["ln_final.hook_normalized"]
    rows.append(f"| `ln_final.hook_normalized` | `[{shape}]` | {meaning} |")
    return "\n".join(rows)


def family_sites_markdown(configs: dict) -> str:
    """Which of the sites that differ between architectures each config has, as Markdown
    (`configs`: column label -> model config), for the README."""
    keys = [*GLOBAL_SITE_TABLE, *BLOCK_SITE_TABLE]
    has = {label: set(global_keys(cfg)) | set(block_keys(cfg)) for label, cfg in configs.items()}
    varying = [k for k in keys if len({k in h for h in has.values()}) > 1]
    rows = ["| site | " + " | ".join(configs) + " |", "|" + " --- |" * (len(configs) + 1)]
    for k in varying:
        name = k if k in GLOBAL_SITE_TABLE else f"blocks.{{l}}.{k}"
        rows.append(f"| `{name}` | " + " | ".join("yes" if k in has[c] else "-" for c in configs) + " |")
    return "\n".join(rows)
