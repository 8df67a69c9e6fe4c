"""`ModelConfig`: the one frozen description of every supported transformer family.

Families differ only in these switches (see the README's families table); the forward in
:mod:`attrpatch.arch.transformer` reads them and has no per-family code. Defaults describe GPT-2.
"""

from __future__ import annotations

import dataclasses
import math

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary")
ROPE_TYPES = ("default", "linear", "llama3")
QK_NORMS = (None, "head", "projection")
# Relevance patching's rules (Jafari et al. 2025): where the backward pass treats a factor as
# constant. "ln": the norm's scale; "attention": the attention pattern (gradient reaches the values
# only); "identity": an elementwise activation passes act(x)/x; "half": each factor of a gated
# product gets half its gradient.
RELP_RULES = ("ln", "attention", "identity", "half")
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters (hashable: a static argument of the jitted forward).

    - `architecture`: the Hugging Face ``model_type`` the weights convert from and to.
    - `n_kv_heads`: key/value heads (grouped-query attention; default `n_heads`). Query head
      ``h`` reads kv head ``h // (n_heads // n_kv_heads)``.
    - `head_dim`: per-head width (default ``d_model // n_heads``).
    - `norm`: ``"layernorm"`` (weight and bias) or ``"rmsnorm"`` (weight only; Gemma's ``1 + w``
      is folded into the weight at load); `norm_eps` its epsilon.
    - `pre_norms`: attention and MLP read the residual stream through a norm (``ln1``, ``ln2``);
      False: they read it as it is (OLMo 2, whose norms are all `post_norms`).
    - `positions`: ``"learned"`` (``W_pos``) or ``"rotary"`` (on the first `rotary_dim` features of
      each query and key head, HF's rotate-half layout, base `rope_theta`; `rope_type`
      ``"linear"`` / ``"llama3"`` scale the frequencies with `rope_scaling`, a tuple of
      (name, value) pairs as in the HF config). `rope_local_theta`: the base of the sliding-window
      layers (those with a `windows` entry), unscaled (Gemma 3's local rotary); None: every layer
      uses `rope_theta` and the scaling.
    - `parallel_attn_mlp`: attention and MLP both read ``resid_pre`` (GPT-NeoX); no ``resid_mid``.
    - `gated_mlp`: ``act(x W_gate) * (x W_in)`` (SwiGLU, GeGLU); `act_fn` the activation.
    - `qkv_bias`, `attn_out_bias`, `mlp_bias`: which projections have biases.
    - `qk_norm`: RMSNorm (`norm_eps`, weight only) on the queries and keys, after the biases and
      before rotary: ``"head"`` over each head's ``d_head`` features, one weight ``[d_head]``
      shared by the heads (Qwen3, Gemma 3); ``"projection"`` over all heads' features at once,
      weights ``[head, d_head]`` and ``[kv_head, d_head]`` (OLMo 2); None for none.
    - `attn_scale`: the divisor of attention logits (default ``sqrt(head_dim)``);
      `scale_attn_by_inverse_layer_idx` also divides layer ``l``'s by ``l + 1`` (GPT-2 option).
    - `attn_softcap` / `final_softcap`: ``c * tanh(x / c)`` on attention logits / final logits.
    - `windows`: per layer, the sliding-window length (a query sees keys ``q - window < k <= q``)
      or None for full causal attention; None for no windows anywhere.
    - `post_norms`: RMSNorm on the attention and MLP outputs before they enter the residual stream
      (Gemma 2's sandwich norms).
    - `tie_word_embeddings`: the unembedding is the embedding's transpose on disk.
    - `attn_only`: no MLPs (the shipped induction model).
    - `backward_rules`: RelP's rules (:data:`RELP_RULES`) the backward pass applies; the forward's
      values are unchanged (`attrpatch.attribute` sets them for ``method="relp"``).
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    n_ctx: int
    d_vocab: int
    architecture: str = "gpt2"
    n_kv_heads: int | None = None
    head_dim: int | None = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    positions: str = "learned"
    rotary_dim: int | None = None
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, float], ...] = ()
    rope_local_theta: float | None = None
    parallel_attn_mlp: bool = False
    gated_mlp: bool = False
    act_fn: str = "gelu_new"
    qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    qk_norm: str | None = None
    attn_scale: float | None = None
    scale_attn_by_inverse_layer_idx: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    windows: tuple[int | None, ...] | None = None
    pre_norms: bool = True
    post_norms: bool = False
    tie_word_embeddings: bool = True
    attn_only: bool = False
    backward_rules: frozenset[str] = frozenset()

    def __post_init__(self):
        for name in ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "d_vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"config: d_model={self.d_model} is not divisible by n_heads={self.n_heads} "
                             "(give head_dim explicitly if the model's heads are not d_model / n_heads wide)")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"config: n_heads={self.n_heads} is not a multiple of n_kv_heads="
                             f"{self.kv_heads} (each kv head must serve a whole group of query heads)")
        choices = {"norm": NORMS, "positions": POSITIONS, "rope_type": ROPE_TYPES, "act_fn": ACTIVATIONS,
                   "qk_norm": QK_NORMS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config: {name}={getattr(self, name)!r} is not supported; "
                                 f"supported: {', '.join(map(str, allowed))}")
        unknown = sorted(set(self.backward_rules) - set(RELP_RULES))
        if unknown:
            raise ValueError(f"config: backward_rules {unknown} are not RelP rules; "
                             f"choose from {', '.join(RELP_RULES)}")
        if self.qk_norm is not None and self.norm != "rmsnorm":
            raise ValueError(f"config: qk_norm={self.qk_norm!r} is an RMSNorm; it needs norm='rmsnorm', "
                             f"got {self.norm!r}")
        if self.positions == "rotary" and not (0 < self.rotary_width <= self.d_head
                                               and self.rotary_width % 2 == 0):
            raise ValueError(f"config: rotary_dim={self.rotary_width} must be even and in "
                             f"1..head_dim={self.d_head}")
        if self.windows is not None and len(self.windows) != self.n_layers:
            raise ValueError(f"config: windows has {len(self.windows)} entries for {self.n_layers} layers")
        if any(w is not None and w < 1 for w in self.windows or ()):
            raise ValueError(f"config: sliding windows must be positive, got {self.windows}")
        if self.rope_local_theta is not None and (self.positions != "rotary" or self.windows is None):
            raise ValueError("config: rope_local_theta is the rotary base of sliding-window layers; "
                             "it needs positions='rotary' and windows (set it to None otherwise)")
        for name in ("attn_softcap", "final_softcap", "attn_scale", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"config: {name} must be a positive number, got {value!r}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"config: norm_eps must be a positive number, got {self.norm_eps!r}")

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def rotary_width(self) -> int:
        """Features per head that rotary embeddings rotate (0 without rotary)."""
        if self.positions != "rotary":
            return 0
        return self.rotary_dim if self.rotary_dim is not None else self.d_head

    @property
    def has_resid_mid(self) -> bool:
        return not (self.attn_only or self.parallel_attn_mlp)

    def heads_of(self, site_key: str) -> int:
        """How many heads a site's ``head`` axis has (kv heads for keys and values)."""
        kv_sites = ("attn.hook_k", "attn.hook_v", "attn.k_norm.hook_normalized", "attn.hook_rot_k")
        return self.kv_heads if site_key in kv_sites else self.n_heads
