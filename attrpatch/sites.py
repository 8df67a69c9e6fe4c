"""Site names and shapes: the one table.

Names follow TransformerLens hook names. Axis letters: ``batch`` prompts, ``pos`` token position,
``head`` attention head, ``d_head`` per-head feature, ``query_pos``/``key_pos`` attention axes,
``d_model`` residual width, ``d_mlp`` MLP width, ``d_vocab`` vocabulary.
"""

from __future__ import annotations

import re

# key (without the "blocks.{l}." prefix) -> (shape, meaning). Block sites first, in forward order.
BLOCK_SITE_TABLE: dict[str, tuple[str, str]] = {
    "hook_resid_pre": ("batch pos d_model", "residual stream entering the block"),
    "attn.hook_q": ("batch pos head d_head", "queries, after the bias"),
    "attn.hook_k": ("batch pos head d_head", "keys, after the bias"),
    "attn.hook_v": ("batch pos head d_head", "values, after the bias"),
    "attn.hook_attn_scores": (
        "batch head query_pos key_pos",
        "scaled, causally masked attention logits (masked entries at the dtype's minimum)",
    ),
    "attn.hook_pattern": ("batch head query_pos key_pos", "attention probabilities"),
    "attn.hook_z": ("batch pos head d_head", "per-head mix of values (the head's output before W_O)"),
    "hook_attn_out": ("batch pos d_model", "attention layer output, biases included"),
    "hook_resid_mid": ("batch pos d_model", "residual stream after attention"),
    "mlp.hook_pre": ("batch pos d_mlp", "MLP neuron pre-activations"),
    "mlp.hook_post": ("batch pos d_mlp", "MLP neuron activations"),
    "hook_mlp_out": ("batch pos d_model", "MLP output, bias included"),
    "hook_resid_post": ("batch pos d_model", "residual stream leaving the block"),
}
GLOBAL_SITE_TABLE: dict[str, tuple[str, str]] = {
    "hook_embed": ("batch pos d_model", "token embedding"),
    "hook_pos_embed": ("batch pos d_model", "position embedding"),
    "ln_final.hook_normalized": ("batch pos d_model", "final LayerNorm output, before unembedding"),
}
# Sites that exist only in models with MLPs.
MLP_SITES = frozenset({"hook_resid_mid", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out"})

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
    "post": "mlp.hook_post",
}

_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


def site_axes(key: str) -> tuple[str, ...]:
    """Axis names of a block site (from the table), ``d_mlp`` spelled ``neuron``.

    E.g. ``site_axes("mlp.hook_post") == ("batch", "pos", "neuron")``.
    """
    shape = BLOCK_SITE_TABLE[key][0].split()
    return tuple("neuron" if a == "d_mlp" else a for a in shape)


def block_keys(attn_only: bool) -> tuple[str, ...]:
    """The block site keys a model has, in forward order."""
    return tuple(k for k in BLOCK_SITE_TABLE if not (attn_only and k in MLP_SITES))


def all_site_names(n_layers: int, attn_only: bool = False) -> list[str]:
    """Every full hook name of a model, in forward order."""
    names = ["hook_embed", "hook_pos_embed"]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{k}" for k in block_keys(attn_only)]
    return names + ["ln_final.hook_normalized"]


def parse_site_name(name: str, n_layers: int, attn_only: bool = False) -> tuple[int | None, str]:
    """Split a full hook name into (layer or None for global sites, key); clear error if unknown."""
    m = _BLOCK_NAME.match(name)
    if m:
        layer, key = int(m.group(1)), m.group(2)
        if key not in block_keys(attn_only):
            raise ValueError(
                f"unknown site {name!r}: a block has {', '.join(block_keys(attn_only))}"
            )
        if not 0 <= layer < n_layers:
            raise ValueError(f"site {name!r} names layer {layer}, but the model has {n_layers}")
        return layer, key
    if name in GLOBAL_SITE_TABLE:
        return None, name
    raise ValueError(
        f"unknown site {name!r}: expected 'blocks.<layer>.<hook>' (e.g. 'blocks.0.hook_resid_pre') "
        f"or one of {', '.join(GLOBAL_SITE_TABLE)}"
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
