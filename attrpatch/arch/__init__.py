"""Architectures: the one parameterised transformer and each family's Hugging Face conversion.

- :mod:`attrpatch.arch.config`: `ModelConfig`, the switches that describe every family.
- :mod:`attrpatch.arch.transformer`: the forward, split into the phases the engines call.
- :mod:`attrpatch.arch.gpt2`, :mod:`~attrpatch.arch.neox`, :mod:`~attrpatch.arch.llama` (Llama,
  Mistral, Qwen2, Gemma, Gemma 2): config and tensors in (`config_from_hf`, `params_from_hf`)
  and out (`config_to_hf`, `params_to_hf`).
"""

from attrpatch.arch import gpt2, llama, neox
from attrpatch.arch.config import ModelConfig

# Hugging Face model_type -> its conversion module.
CONVERTERS = {"gpt2": gpt2, "gpt_neox": neox, **{model_type: llama for model_type in llama.FAMILIES}}

__all__ = ["CONVERTERS", "ModelConfig"]
