"""The audit of published `config.json` files, as data: which fields are bookkeeping, which
defaults `transformers` fills in when a field is absent, and which legacy values it reinterprets
at load (with a warning) so that attrpatch computes the same model and says so in the same words.

Audited against `transformers` 5.25's config classes and modelling code of every supported family
(``configuration_*.py``, ``modeling_rope_utils.py``, ``configuration_utils.py``).
`tests/test_hub_configs.py` loads the published configs of popular checkpoints through both and
compares logits; it also checks that every field those config classes declare is classified.
"""

from __future__ import annotations

import dataclasses
import warnings

# Fields that never change the forward computation: bookkeeping, token ids, label maps, training-only
# switches, generation settings older `transformers` versions saved into config.json, and markers left
# by training frameworks and export tools. Fields starting with "_" are bookkeeping too.
BOOKKEEPING = frozenset({
    # written by `transformers` itself
    "transformers_version", "architectures", "model_type", "dtype", "torch_dtype", "use_cache",
    "output_hidden_states", "output_attentions", "output_scores", "return_dict",
    "return_dict_in_generate", "use_return_dict", "torchscript", "chunk_size_feed_forward",
    "tie_encoder_decoder", "is_decoder", "cache_implementation", "auto_map", "base_model_tp_plan",
    "base_model_pp_plan",
    # token ids and tokenizer bookkeeping
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "unk_token_id",
    "decoder_start_token_id", "tokenizer_class", "prefix", "n_special", "predict_special_tokens",
    # fine-tuning heads and labels (the language-model head is what attrpatch loads)
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "task_specific_params",
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
    "summary_first_dropout", "pruned_heads",
    # training only: initialisation, dropout (inactive at inference), parallelism layouts
    "initializer_range", "initializer_factor", "attention_dropout", "hidden_dropout",
    "classifier_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_probs_dropout_prob",
    "hidden_dropout_prob", "pretraining_tp", "gradient_checkpointing", "use_flash_attn",
    # generation settings (older configs carry them; they only steer sampling)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "tf_legacy_loss", "use_bfloat16",
    # markers left by training frameworks and export tools
    "is_llama_config",  # nanotron (SmolLM, SmolLM2)
    "transformers.js_config",  # transformers.js export settings
    "model_name", "torch_compile",
    "max_sequence_length",  # early Llama conversions: a context hint, read by nothing
})

# Fields that are harmless only at the value given: another value changes the computation in a way
# attrpatch does not implement, and is refused by name.
HARMLESS_ONLY_AT = {
    "is_encoder_decoder": False,
    "add_cross_attention": False,
    "use_bidirectional_attention": False,
    "rope_interleaved": False,  # nanotron: true would rotate adjacent pairs, not halves
    "use_mrope": False,  # Qwen2-VL's multimodal rotary
    "use_qk_norm": False,  # QK norms, in families that have none
    "qk_layernorm": False,
    "use_parallel_residual": False,  # only GPT-NeoX has parallel blocks (read there)
}

# Fields refused whatever their value, with the reason.
REFUSED = {
    "quantization_config": "quantised weights (GPTQ, AWQ, bitsandbytes, ...) are not implemented; "
                           "load a float checkpoint, or a GGUF file (`load_model('model.gguf')`), "
                           "whose quantised tensors attrpatch dequantises",
}


@dataclasses.dataclass(frozen=True)
class Reinterpretation:
    """A legacy config value that `transformers` takes to mean something else at load.

    - `families`: the ``model_type`` values it applies to.
    - `field`: the config field; `legacy`: the value as published (`ANY` for every value).
    - `meaning`: the value `transformers` computes with (None: the field is ignored; `ANY`: the
      value is kept, and only its interpretation changes, as the message says).
    - `message`: what `transformers` logs, which attrpatch warns with word for word.
    """

    families: frozenset[str]
    field: str
    legacy: object
    meaning: object
    message: str


ANY = object()

REINTERPRETED = (
    Reinterpretation(
        frozenset({"gemma"}), "hidden_act", "gelu", "gelu_pytorch_tanh",
        'We found `hidden_act="gelu"` in this Gemma config. This is a legacy value of the official '
        'releases but it is meant to target the tanh approximation. Setting '
        '`hidden_act="gelu_pytorch_tanh"` instead.'),
    Reinterpretation(
        frozenset({"mistral"}), "layer_types", ANY, ANY,
        "Detected mistral model with layer_types, treating as ministral for alternating attention "
        "compatibility. (Windows apply to the layers marked sliding_attention only.)"),
)

# What `transformers` 5.25 uses when a field is absent, where that differs from the value a reader
# would guess (or from another family's): per model_type, field -> default.
DEFAULTS = {
    "gpt_neox": {"partial_rotary_factor": 0.25, "rope_theta": 10000.0},
    "llama": {"hidden_act": "silu", "tie_word_embeddings": False},
    "mistral": {"hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": 4096},
    "qwen2": {"hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": 4096,
              "max_window_layers": 28},
    "gemma": {"hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True, "head_dim": 256},
    "gemma2": {"hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "head_dim": 256,
               "sliding_window": 4096, "query_pre_attn_scalar": 256,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "qwen3": {"hidden_act": "silu", "tie_word_embeddings": False, "head_dim": 128, "sliding_window": 4096,
              "max_window_layers": 28},
    "gemma3_text": {"hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "head_dim": 256,
                    "sliding_window": 4096, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
                    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0},
    "olmo2": {"hidden_act": "silu", "tie_word_embeddings": False, "rms_norm_eps": 1e-5},
}


# Fields whose explicit null means "off" in `transformers` (absent means the family's default).
NULL_MEANS_OFF = frozenset({"sliding_window", "attn_logit_softcapping", "final_logit_softcapping"})


class LegacyConfigWarning(UserWarning):
    """A config value was reinterpreted as `transformers` reinterprets it (see `REINTERPRETED`)."""


def reinterpret(model_type: str, raw: dict) -> dict:
    """`raw` with every legacy value of `REINTERPRETED` replaced by its meaning (a field whose
    meaning is None is dropped), warning once per replacement in `transformers`' words."""
    out = dict(raw)
    for r in REINTERPRETED:
        if model_type not in r.families or r.field not in raw:
            continue
        if r.legacy is ANY or raw[r.field] == r.legacy:
            warnings.warn(f"config.json: {r.field}={raw[r.field]!r}: {r.message}", LegacyConfigWarning,
                          stacklevel=3)
            if r.meaning is None:
                del out[r.field]
            elif r.meaning is not ANY:
                out[r.field] = r.meaning
    return out
