"""Read and write Hugging Face checkpoint directories (`config.json` + safetensors), and find
them in the local Hugging Face hub cache by repo id."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from attrpatch.arch import CONVERTERS
from attrpatch.atomic import check_target, remove_staging, replace_dir, staging_dir
from attrpatch.model import Model

_PICKLED = ("pytorch_model*.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")
# What a checkpoint directory holds that attrpatch reads (the CLI reads the tokenizer and task).
HUB_FILES = ["config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "attrpatch_task.json"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e}); re-download or re-save the checkpoint") from e


def _shard_names(index: Path) -> list[str]:
    """The shard file names a ``model.safetensors.index.json`` maps tensors to."""
    raw = _read_json(index)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: not a safetensors index: needs a non-empty 'weight_map' object "
                         "mapping each tensor name to the shard file that holds it")
    names = list(weight_map.values())
    bad = [name for name in names if not isinstance(name, str) or name in ("", ".", "..")
           or Path(name).name != name]
    if bad:
        raise ValueError(f"{index}: weight_map values must be shard file names in {index.parent}, "
                         f"got {', '.join(map(repr, bad[:3]))}")
    return sorted(set(names))


def _weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        files = [path / name for name in _shard_names(index)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    pickled = sorted({p.name for pattern in _PICKLED for p in path.glob(pattern)})
    if pickled:
        raise ValueError(
            f"{path} holds only pickled weights ({', '.join(pickled)}). attrpatch does not load "
            "pickles: unpickling can run arbitrary code. Convert once, in an environment you "
            "trust: `AutoModelForCausalLM.from_pretrained(d).save_pretrained(d, "
            "safe_serialization=True)`."
        )
    shards = sorted(path.glob("model-*.safetensors"))
    if shards:
        raise FileNotFoundError(
            f"{path} has sharded weights but no model.safetensors.index.json to say which "
            "tensor is in which shard"
        )
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    """All tensors of the given files as numpy arrays in their stored dtype (bfloat16 stays
    bfloat16: the conversion casts one tensor at a time, so no float32 copy of the whole model)."""
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                for key in f.keys():
                    if key in tensors:
                        raise ValueError(f"tensor {key!r} appears in more than one shard ({file.name})")
                    tensors[key] = f.get_tensor(key)
        except SafetensorError as e:
            raise ValueError(f"{file} ({file.stat().st_size} bytes) is corrupt or truncated, not a readable "
                             f"safetensors file ({e}); re-download or re-save it") from e
    return tensors


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache directory, read from the environment now (``HF_HUB_CACHE``,
    else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), not when `huggingface_hub` was imported."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def resolve_checkpoint(name_or_path: str | os.PathLike, allow_download: bool = False,
                       revision: str | None = None) -> Path:
    """The local checkpoint directory for `name_or_path`.

    An existing directory is returned as is. A string of the form ``org/name`` that is not a
    directory is a Hugging Face repo id: its snapshot (at `revision`, default ``main``) in the
    local hub cache (:func:`hub_cache_dir`). Nothing is fetched over the network unless
    `allow_download`, which downloads the files attrpatch reads (:data:`HUB_FILES`) into that cache.
    """
    path = Path(name_or_path)
    if path.is_dir() or not (isinstance(name_or_path, str) and _REPO_ID.fullmatch(name_or_path)):
        if not path.is_dir():
            why = "is not a directory" if path.exists() else "does not exist"
            raise FileNotFoundError(f"checkpoint directory {path} {why}")
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hugging Face repo ids, not to the local "
                             f"directory {path}")
        return path
    return _hub_snapshot(name_or_path, allow_download, revision or "main")


def _hub_snapshot(repo_id: str, allow_download: bool, revision: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=HUB_FILES,
                                      local_files_only=not allow_download))
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is neither a local directory nor a valid Hugging Face repo id: "
                         f"{e}") from e
    except LocalEntryNotFoundError as e:
        if allow_download:
            raise FileNotFoundError(f"could not download Hugging Face repo {repo_id!r} (revision "
                                    f"{revision!r}) into {cache}: {e}") from e
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory, and Hugging Face repo {repo_id!r} (revision "
            f"{revision!r}) is not in the local cache {cache}. Download it first (`hf download "
            f"{repo_id}`, or `huggingface-cli download {repo_id}`), or allow downloading "
            "(`allow_download=True`). If it is cached elsewhere, set "
            "HF_HUB_CACHE or HF_HOME."
        ) from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"could not download Hugging Face repo {repo_id!r} (revision "
                                f"{revision!r}): {e}") from e


def load_model(path: str | os.PathLike, dtype=jnp.float32, *, allow_download: bool = False,
               revision: str | None = None) -> Model:
    """Load a Hugging Face checkpoint of any supported family (`model_type` in `config.json`:
    see :data:`attrpatch.arch.CONVERTERS`).

    **Arguments:**

    - `path`: a directory with `config.json` and `model.safetensors`, or sharded
      `model-*.safetensors` with `model.safetensors.index.json`. Tensors may be stored as
      float32, float16 or bfloat16 (GPT-2: keys with or without the ``transformer.`` prefix).
      Or a Hugging Face repo id (``"EleutherAI/pythia-70m"``), read from the local hub cache:
      see :func:`resolve_checkpoint`. Or a llama.cpp ``.gguf`` file (quantised or not): see
      :func:`attrpatch.gguf.load_gguf`.
    - `dtype`: the dtype to compute in (float32 by default). bfloat16 halves memory; LayerNorm,
      norms, attention logits and logits still accumulate in float32; logits differ from float32
      by a few percent of their largest magnitude, more in deeper models (measured: 0.7% on
      `models/ioi-gpt2-4l`, 6.9% on the 30-layer SmolLM2-135M, whose argmax still agreed).
    - `allow_download`: fetch a repo id missing from the cache from the Hub (offline otherwise).
    - `revision`: the branch, tag or commit of a repo id (default ``main``).

    **Returns:** a :class:`attrpatch.Model`.

    **Raises:** FileNotFoundError or ValueError, naming the file and the problem, for a missing,
    corrupt or unsupported checkpoint.
    """
    from attrpatch.gguf import is_gguf, load_gguf

    if is_gguf(path):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hugging Face repo ids, not to the GGUF "
                             f"file {path}")
        return load_gguf(path, dtype)
    path = resolve_checkpoint(path, allow_download, revision)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    raw = _read_json(config_file)
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONVERTERS:
        raise ValueError(
            f"{config_file}: model_type={model_type!r} is not supported; "
            f"supported: {', '.join(CONVERTERS)}"
        )
    convert = CONVERTERS[model_type]
    try:
        config = convert.config_from_hf(raw)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from e
    tensors = read_safetensors(_weight_files(path))
    try:
        params = convert.params_from_hf(tensors, config, dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return Model(config, params)


_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_CHECKPOINT_LABEL = "save_model path"
_RECORD = "attrpatch_files"  # safetensors metadata: the files save_model wrote with the weights


def checkpoint_files(path: str | os.PathLike, extra_names=()) -> set[str]:
    """The names in directory `path` that belong to a checkpoint as `save_model` writes it:
    ``config.json``, ``model.safetensors``, ``model.safetensors.index.json``, shards
    ``model-0000i-of-0000n.safetensors``, the files a `save_model` checkpoint records in its
    weights (its extra files) and `extra_names` (a card, a tokenizer), if present. None at all
    without a ``config.json``: then `path` is not a checkpoint."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return set()
    names = {"config.json", "model.safetensors", "model.safetensors.index.json", *extra_names}
    present = {p.name for p in path.iterdir() if p.name in names or _SHARD.fullmatch(p.name)}
    weights = sorted(path / name for name in present if name.endswith(".safetensors"))
    try:  # the record save_model keeps in the metadata of its (first) weights file
        with safe_open(str(weights[0]), framework="numpy") as f:
            recorded = json.loads((f.metadata() or {}).get(_RECORD, "[]"))
    except (IndexError, OSError, SafetensorError, ValueError):
        recorded = []
    recorded = set(recorded if isinstance(recorded, list) else []) - {""}
    return present | {p.name for p in path.iterdir() if p.name in recorded}


def check_checkpoint_target(path: str | os.PathLike, extra_names=(),
                            label: str = _CHECKPOINT_LABEL) -> Path:
    """Refuse (`attrpatch.atomic.UnsafeOutputError`) a `path` that `save_model` with extra files
    named `extra_names` must not replace: one holding anything but a checkpoint's own files
    (:func:`checkpoint_files`), the current, home or root directory, or one we cannot write.
    Returns `path` resolved; `label` names it in messages. `save_model` checks this itself;
    call it to refuse before long work (training, say)."""
    return check_target(path, lambda d: checkpoint_files(d, extra_names), label)


def save_model(model: Model, path: str | os.PathLike, extra_files: dict[str, str] | None = None,
               *, dtype=None, max_shard_bytes: int | None = None):
    """Write `model` as a checkpoint directory `load_model` (and `transformers`) reads.

    The directory is assembled next to `path` and moved into place, so a failure leaves no
    half-written checkpoint. An existing `path` is replaced only if it holds a checkpoint and
    nothing else (:func:`check_checkpoint_target`: ``config.json``, weights, index and files
    named like `extra_files`), checked before writing and again at the swap; otherwise
    `attrpatch.atomic.UnsafeOutputError` (the new checkpoint, if it was already written, is kept
    beside `path` as ``<name>.new``). `extra_files` maps file names to text (a model card, say);
    `dtype` stores the tensors in another dtype (``jnp.bfloat16`` halves the files);
    `max_shard_bytes` splits them into ``model-0000i-of-0000n.safetensors`` files of at most
    that size (a tensor larger than it gets a file of its own) with the
    ``model.safetensors.index.json`` that maps tensors to files, as `save_pretrained` does.
    """
    extra_files = extra_files or {}
    bad = [name for name in extra_files if name in ("", ".", "..") or Path(name).name != name]
    if bad:
        raise ValueError(f"save_model extra_files: names must be plain file names, got "
                         f"{', '.join(map(repr, bad[:3]))}")
    convert = CONVERTERS[model.config.architecture]
    target = check_checkpoint_target(path, extra_files)
    staging = staging_dir(target)
    try:
        config = convert.config_to_hf(model.config)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = convert.params_to_hf(model.params, model.config)
        store = np.dtype(dtype) if dtype is not None else None
        tensors = {k: np.ascontiguousarray(v if store is None else v.astype(store))
                   for k, v in tensors.items()}
        shards, size = [{}], 0
        for name, array in tensors.items():
            if max_shard_bytes is not None and shards[-1] and size + array.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = array
            size += array.nbytes
        files = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
                 + ["model.safetensors.index.json"])
        # which files this checkpoint is, so a later save may replace all of them (and no other)
        metadata = {"format": "pt", _RECORD: json.dumps(sorted(["config.json", *files, *extra_files]))}
        if len(shards) == 1:
            save_file(shards[0], str(staging / "model.safetensors"), metadata=metadata)
        else:
            weight_map = {}
            for file, shard in zip(files, shards, strict=False):
                save_file(shard, str(staging / file), metadata=metadata)
                weight_map |= dict.fromkeys(shard, file)
            index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                     "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for name, text in extra_files.items():
            (staging / name).write_text(text)
        replace_dir(staging, target, lambda d: checkpoint_files(d, extra_files), _CHECKPOINT_LABEL)
    finally:
        remove_staging(staging)  # nothing if it was moved into place or kept
