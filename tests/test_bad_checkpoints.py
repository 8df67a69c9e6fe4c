"""Bad checkpoints get a ValueError or FileNotFoundError naming the file and the problem, and
Hugging Face repo ids resolve from the local hub cache without touching the network.

Configs come from `transformers`' own config classes (tests/families.py sizes); weights are numpy
random arrays in each family's Hugging Face layout, so nothing here compiles except the one
forward that compares logits.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import shutil
import socket

import jax
import numpy as np
import pytest
from families import _COMMON, FAMILIES
from safetensors.numpy import save_file

from attrpatch import Model, load_model, save_model
from attrpatch.arch import CONVERTERS
from attrpatch.arch.transformer import init_params
from attrpatch.loading import hub_cache_dir, resolve_checkpoint

GPT2 = ("GPT2Config", None, dict(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                 bos_token_id=0, eos_token_id=0))
CONFIGS = {"gpt2": GPT2} | {name: (cls, None, _COMMON | overrides)
                            for name, (cls, _, overrides) in FAMILIES.items()}
NAMES = list(CONFIGS)


@functools.cache
def _hf_config(name: str) -> dict:
    import transformers

    cls, _, kwargs = CONFIGS[name]
    return json.loads(getattr(transformers, cls)(**kwargs).to_json_string(use_diff=True))


def hf_config(name: str) -> dict:
    """The `config.json` `save_pretrained` writes for family `name` (a fresh copy)."""
    return copy.deepcopy(_hf_config(name))


def hf_tensors(raw: dict) -> dict[str, np.ndarray]:
    """Random float32 tensors named and shaped as the Hugging Face checkpoint of config `raw`."""
    convert = CONVERTERS[raw["model_type"]]
    cfg = convert.config_from_hf(raw)
    shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.ShapeDtypeStruct((2,), np.uint32))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    return convert.params_to_hf(params, cfg)


def write(path, raw: dict | str, tensors: dict[str, np.ndarray] | None = None):
    """A checkpoint directory: `raw` as config.json (text as is), `tensors` as model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(raw if isinstance(raw, str) else json.dumps(raw))
    if tensors is not None:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def refused(path, match: str, error=ValueError):
    """`load_model(path)` raises `error` whose message names `path` and matches `match`."""
    with pytest.raises(error) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message, message
    assert re.search(match, message), message
    return message


# ----------------------------------------------------------------------------------------------
# config.json


@pytest.mark.parametrize("name", NAMES)
def test_real_configs_of_every_family_still_load(name, tmp_path):
    """The checks refuse nothing `transformers` writes (diff and full dicts), so the tensors load."""
    raw = hf_config(name)
    load_model(write(tmp_path / "diff", raw, hf_tensors(raw)))
    import transformers

    full = getattr(transformers, CONFIGS[name][0])(**CONFIGS[name][2]).to_dict()
    CONVERTERS[full["model_type"]].config_from_hf(full)


def test_qwen2_config_keeps_an_unused_sliding_window(tmp_path):
    """Qwen2 checkpoints on the hub carry `sliding_window` with `use_sliding_window: false`."""
    raw = hf_config("qwen2-biases-window") | {"use_sliding_window": False, "sliding_window": 32768}
    assert CONVERTERS["qwen2"].config_from_hf(raw).windows is None


@pytest.mark.parametrize("legacy", [
    dict(rope_theta=1000.0, rope_local_base_freq=10.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    {},  # every rotary field absent: transformers' defaults
])
def test_gemma3_older_rope_fields_are_read_as_transformers_reads_them(legacy):
    """Gemma 3 configs from before per-layer-type ``rope_parameters``: the same model as the
    per-type form `transformers` converts them to."""
    import transformers

    raw = {k: v for k, v in hf_config("gemma3_text-qknorm-local-rope").items() if k != "rope_parameters"}
    raw |= legacy
    theirs = transformers.Gemma3TextConfig(**raw).to_dict()
    assert set(theirs["rope_parameters"]) == {"full_attention", "sliding_attention"}
    convert = CONVERTERS["gemma3_text"]
    ours = convert.config_from_hf(raw)
    assert ours == convert.config_from_hf(theirs)
    assert ours.rope_local_theta == theirs["rope_parameters"]["sliding_attention"]["rope_theta"]


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[]", "expected a JSON object, got list"),
    ('"gpt2"', "expected a JSON object, got str"),
    ('{"model_type": ["gpt2"]}', r"model_type=\['gpt2'\] is not supported"),
    ("{}", "model_type=None is not supported"),
])
def test_config_json_that_is_not_a_config(tmp_path, text, match):
    refused(write(tmp_path / "ckpt", text), match)


def test_config_json_not_utf8(tmp_path):
    path = write(tmp_path / "ckpt", "{}")
    (path / "config.json").write_bytes(b'{"model_type": "gpt2\xff"}')
    refused(path, "not valid JSON")


_HEADS_AND_SIZES = {
    "gpt2": ["n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "n_inner"],
    "gpt_neox": ["num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "vocab_size"],
    "llama": ["num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "vocab_size", "num_key_value_heads", "head_dim"],
}
_INTEGERS = _HEADS_AND_SIZES | {
    "mistral": _HEADS_AND_SIZES["llama"] + ["sliding_window"],
    "qwen2": _HEADS_AND_SIZES["llama"] + ["sliding_window"],
    "gemma": _HEADS_AND_SIZES["llama"],
    "gemma2": _HEADS_AND_SIZES["llama"] + ["sliding_window"],
    "qwen3": _HEADS_AND_SIZES["llama"] + ["sliding_window"],
    "gemma3_text": _HEADS_AND_SIZES["llama"] + ["sliding_window", "sliding_window_pattern"],
    "olmo2": _HEADS_AND_SIZES["llama"],
}
_POSITIVE_NUMBERS = {"gpt2": ["layer_norm_epsilon"], "gpt_neox": ["layer_norm_eps"],
                     "llama": ["rms_norm_eps"], "mistral": ["rms_norm_eps"], "qwen2": ["rms_norm_eps"],
                     "gemma": ["rms_norm_eps"],
                     "gemma2": ["rms_norm_eps", "query_pre_attn_scalar", "attn_logit_softcapping",
                                "final_logit_softcapping"],
                     "qwen3": ["rms_norm_eps"], "olmo2": ["rms_norm_eps"],
                     "gemma3_text": ["rms_norm_eps", "query_pre_attn_scalar", "attn_logit_softcapping",
                                     "final_logit_softcapping", "rope_theta", "rope_local_base_freq"]}
_BOOLEANS = {"gpt2": ["tie_word_embeddings", "scale_attn_by_inverse_layer_idx", "scale_attn_weights",
                      "reorder_and_upcast_attn"],
             "gpt_neox": ["tie_word_embeddings", "use_parallel_residual", "attention_bias"],
             "llama": ["tie_word_embeddings", "attention_bias", "mlp_bias"],
             "mistral": ["tie_word_embeddings"],
             "qwen2": ["tie_word_embeddings", "use_sliding_window"],
             "gemma": ["tie_word_embeddings", "attention_bias", "mlp_bias"],
             "gemma2": ["tie_word_embeddings", "attention_bias", "mlp_bias"],
             "qwen3": ["tie_word_embeddings", "use_sliding_window", "attention_bias"],
             "gemma3_text": ["tie_word_embeddings", "attention_bias"],
             "olmo2": ["tie_word_embeddings", "attention_bias"]}
_NOT_POSITIVE_INTEGERS = [0, -1, 2.5, "4", True, False, [], {}, math.nan, math.inf]
_NOT_POSITIVE_NUMBERS = [0, -1, -1e-5, "1e-5", True, [], math.nan, math.inf, -math.inf]
_NOT_BOOLEANS = [0, 1, "false", "true", [], 2.5]


def _cases(fields: dict[str, list[str]]):
    """(family, field) pairs; each family's name starts with its model_type."""
    return [(name, field) for name in NAMES for field in fields[name.split("-")[0]]]


def _refused_values(tmp_path, name, field, values, wanted):
    for i, value in enumerate(values):
        raw = hf_config(name) | {field: value}
        refused(write(tmp_path / str(i), raw), rf"{field}={re.escape(repr(value))} must be {wanted}")


@pytest.mark.parametrize("name, field", _cases(_INTEGERS))
def test_integer_fields_must_be_positive_integers(tmp_path, name, field):
    """Zero heads, layers or widths, strings, booleans, fractions, NaN: refused by field name."""
    _refused_values(tmp_path, name, field, _NOT_POSITIVE_INTEGERS, "a positive integer")


@pytest.mark.parametrize("name, field", _cases(_POSITIVE_NUMBERS))
def test_eps_and_scale_fields_must_be_positive_numbers(tmp_path, name, field):
    _refused_values(tmp_path, name, field, _NOT_POSITIVE_NUMBERS, "a positive number")


@pytest.mark.parametrize("name, field", _cases(_BOOLEANS))
def test_switches_must_be_booleans(tmp_path, name, field):
    """``"false"`` is truthy: a switch that is not a JSON boolean is refused, not guessed."""
    _refused_values(tmp_path, name, field, _NOT_BOOLEANS, "true or false")


@pytest.mark.parametrize("name, field", [(name, field) for name in NAMES if name != "gpt2"
                                         for field in ("num_hidden_layers", "hidden_size",
                                                       "num_attention_heads", "vocab_size")]
                         + [("gpt2", f) for f in ("n_layer", "n_embd", "n_head", "vocab_size")])
def test_required_fields_null_or_absent(tmp_path, name, field):
    for i, raw in enumerate((hf_config(name) | {field: None},
                             {k: v for k, v in hf_config(name).items() if k != field})):
        refused(write(tmp_path / str(i), raw), f"missing required .* field '{field}'")


@pytest.mark.parametrize("name, changes, match", [
    ("qwen2-biases-window", dict(max_window_layers=-1), r"max_window_layers=-1 must be an integer >= 0"),
    ("qwen2-biases-window", dict(max_window_layers="1"), r"max_window_layers='1' must be an integer >= 0"),
    ("llama-gqa-llama3-rope", dict(rope_parameters=3), r"rope_parameters=3 is not supported .* object"),
    ("llama-gqa-llama3-rope", dict(rope_parameters=[["rope_theta", 1.0]]), "rope_parameters=.* object"),
    ("llama-gqa-llama3-rope", dict(rope_scaling="linear"), "rope_scaling='linear' is not supported"),
    ("gemma-mqa", dict(rope_parameters={"rope_type": "default", "rope_theta": -1}),
     "rope_theta=-1 must be a positive number"),
    ("mistral-window", dict(rope_parameters={"rope_type": "default", "rope_theta": "1e4"}),
     "rope_theta='1e4' must be a positive number"),
    ("llama-gqa-llama3-rope", dict(rope_parameters={"rope_type": ["llama3"]}), "rope scaling type"),
    ("gpt_neox-sequential", dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0}),
     "partial_rotary_factor=0 must be a positive number"),
    ("gemma2-softcap-window", dict(layer_types=[{}, "full_attention"]), "layer type"),
    ("gemma2-softcap-window", dict(use_bidirectional_attention=0), "use_bidirectional_attention=0"),
    ("gpt_neox-sequential", dict(hidden_size=33), "not divisible"),
    ("gemma3_text-qknorm-local-rope", dict(sliding_window=None), "sliding_attention layers need a window"),
    ("gemma3_text-qknorm-local-rope", dict(rope_parameters={"full_attention": 3}), "one object per layer"),
    ("gemma3_text-qknorm-local-rope", dict(rope_parameters={"sliding_attention": {"rope_theta": 0}}),
     "rope_theta=0 must be a positive number"),
    ("gemma3_text-qknorm-local-rope",
     dict(rope_parameters={"full_attention": {"rope_type": "default", "partial_rotary_factor": 0.5}}),
     "partial_rotary_factor is not implemented for Gemma 3"),
])
def test_nested_and_derived_config_values(tmp_path, name, changes, match):
    refused(write(tmp_path / "ckpt", hf_config(name) | changes), match)


def test_bad_rope_scaling_values(tmp_path):
    rope = hf_config("llama-gqa-llama3-rope")["rope_parameters"]
    for i, (key, value) in enumerate([("factor", 0), ("low_freq_factor", "1"), ("high_freq_factor", math.nan),
                                      ("original_max_position_embeddings", 8.5)]):
        raw = hf_config("llama-gqa-llama3-rope") | {"rope_parameters": rope | {key: value}}
        refused(write(tmp_path / str(i), raw), rf"rope {key}={re.escape(repr(value))} must be")


# ----------------------------------------------------------------------------------------------
# Weight files


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    raw = hf_config("gpt2")
    return write(tmp_path_factory.mktemp("gpt2"), raw, hf_tensors(raw))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("corrupt", ["empty", "header cut", "data cut", "zeros", "bad header length"])
def test_corrupt_or_truncated_safetensors(gpt2_checkpoint, tmp_path, corrupt):
    path = _copy(gpt2_checkpoint, tmp_path / "ckpt")
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"empty": b"", "header cut": data[:5], "data cut": data[:len(data) // 2],
                      "zeros": bytes(len(data)), "bad header length": data[:8] + b"{" * 64}[corrupt])
    message = refused(path, "corrupt or truncated")
    assert str(file) in message


def _sharded(path, tensors: dict[str, np.ndarray], raw: dict):
    """`tensors` split over two shards with an index, as `save_pretrained` writes them."""
    write(path, raw)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: np.ascontiguousarray(tensors[k]) for k in keys}, str(path / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def test_corrupt_shard_is_named(tmp_path):
    raw = hf_config("llama-gqa-llama3-rope")
    path = _sharded(tmp_path / "ckpt", hf_tensors(raw), raw)
    load_model(path)
    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    message = refused(path, "corrupt or truncated")
    assert str(shard) in message


@pytest.mark.parametrize("index, match", [
    ("[]", "needs a non-empty 'weight_map' object"),
    ("{}", "needs a non-empty 'weight_map' object"),
    ('{"weight_map": {}}', "needs a non-empty 'weight_map' object"),
    ('{"weight_map": []}', "needs a non-empty 'weight_map' object"),
    ('{"weight_map": "model-1.safetensors"}', "needs a non-empty 'weight_map' object"),
    ("{", "not valid JSON"),
    ('{"weight_map": {"wte.weight": 3}}', "must be shard file names .* got 3"),
    ('{"weight_map": {"wte.weight": ["a"]}}', r"must be shard file names .* got \['a'\]"),
    ('{"weight_map": {"wte.weight": "../model.safetensors"}}', "must be shard file names"),
    ('{"weight_map": {"wte.weight": "/etc/passwd"}}', "must be shard file names"),
])
def test_bad_safetensors_index(gpt2_checkpoint, tmp_path, index, match):
    path = _copy(gpt2_checkpoint, tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(index)
    message = refused(path, match)
    assert "model.safetensors.index.json" in message


@pytest.mark.parametrize("name", NAMES)
def test_integer_weights_are_refused_for_every_family(tmp_path, name):
    """One tensor of each kind (weights, biases, norms, embeddings) in turn, as int32; the
    embedding also as the other non-float dtypes."""
    raw = hf_config(name)
    tensors = hf_tensors(raw)
    kinds = {}
    for key in tensors:
        kinds.setdefault(".".join(part for part in key.split(".") if not part.isdigit()), key)
    bad = [(key, np.int32) for key in kinds.values()]
    embed = next(k for k in tensors if "embed" in k or "wte" in k)
    bad += [(embed, dtype) for dtype in (np.int8, np.uint8, np.int64, np.bool_)]
    for i, (key, dtype) in enumerate(bad):
        path = write(tmp_path / str(i), raw, tensors | {key: tensors[key].astype(dtype)})
        shown = key.removeprefix("transformer.")  # GPT-2 keys are read without the prefix
        refused(path, rf"tensor '{re.escape(shown)}' has dtype {np.dtype(dtype)}; "
                      "weights must be floating point")


def test_wrong_shape_missing_and_unexpected_tensors(tmp_path):
    raw = hf_config("mistral-window")
    tensors = hf_tensors(raw)
    key = "model.layers.1.self_attn.k_proj.weight"
    refused(write(tmp_path / "shape", raw, tensors | {key: tensors[key][:-1]}),
            rf"tensor '{re.escape(key)}' has shape \(15, 32\), but the config implies \(16, 32\)")
    refused(write(tmp_path / "missing", raw, {k: v for k, v in tensors.items() if k != key}),
            f"missing tensor '{re.escape(key)}'")
    extra = "model.layers.1.self_attn.q_norm.weight"
    refused(write(tmp_path / "extra", raw, tensors | {extra: tensors[key]}),
            f"does not use: {re.escape(extra)}")


def test_non_finite_weights_still_load(tmp_path):
    """Refusing NaN/Inf is left to the metric checks before compute, not to loading."""
    raw = hf_config("gpt2")
    tensors = hf_tensors(raw)
    tensors["transformer.h.0.ln_1.weight"][0] = np.nan
    tensors["transformer.h.1.mlp.c_fc.bias"][0] = np.inf
    model = load_model(write(tmp_path / "ckpt", raw, tensors))
    assert np.isnan(np.asarray(model.params["blocks"]["ln1_w"])[0, 0])


# ----------------------------------------------------------------------------------------------
# Hugging Face repo ids

REPO_ID = "tiny-org/tiny-gpt2"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection or DNS look-up is recorded and refused; the list must stay empty."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test that must stay offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    yield attempts
    assert attempts == []


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    raw = hf_config("gpt2")
    tensors = hf_tensors(raw)
    cfg = CONVERTERS["gpt2"].config_from_hf(raw)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model = Model(cfg, CONVERTERS["gpt2"].params_from_hf(tensors, cfg, np.float32))
    save_model(model, path, extra_files={"tokenizer.json": "{}"})
    return path


def hub_layout(cache, repo_id, model_dir, commit=COMMIT, ref="main"):
    """`model_dir` cached as the hub caches it: files in blobs/, symlinked from snapshots/<commit>,
    refs/<ref> naming the commit. Returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(model_dir.iterdir())):
        blob = repo / "blobs" / f"{commit[:8]}{i:032x}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def test_repo_id_loads_from_hf_hub_cache_offline(tiny_gpt2, tmp_path, monkeypatch, no_network):
    snapshot = hub_layout(tmp_path / "hub", REPO_ID, tiny_gpt2)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_checkpoint(REPO_ID) == snapshot
    assert (resolve_checkpoint(REPO_ID) / "tokenizer.json").is_file()
    tokens = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(np.asarray(load_model(REPO_ID)(tokens)),
                                  np.asarray(load_model(snapshot)(tokens)))


def test_hf_home_and_revisions(tiny_gpt2, tmp_path, monkeypatch, no_network):
    """``HF_HOME`` set at call time is honoured; a revision is a ref or a commit."""
    other = "fedcba9876543210fedcba9876543210fedcba98"
    main = hub_layout(tmp_path / "home" / "hub", REPO_ID, tiny_gpt2)
    tagged = hub_layout(tmp_path / "home" / "hub", REPO_ID, tiny_gpt2, commit=other, ref="v1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    assert resolve_checkpoint(REPO_ID) == main
    assert resolve_checkpoint(REPO_ID, revision="v1") == tagged
    assert resolve_checkpoint(REPO_ID, revision=other) == tagged
    with pytest.raises(FileNotFoundError, match="revision 'v2'"):
        load_model(REPO_ID, revision="v2")


def test_missing_repo_id_names_the_cache_and_the_fix(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError) as info:
        load_model("EleutherAI/pythia-70m")
    message = str(info.value)
    expected = ("'EleutherAI/pythia-70m'", str(tmp_path / "empty-cache"), "hf download EleutherAI/pythia-70m",
                "allow_download=True", "HF_HUB_CACHE")
    for part in expected:
        assert part in message, (part, message)


def test_only_allow_download_reaches_the_hub(tiny_gpt2, tmp_path, monkeypatch, no_network):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        return str(tiny_gpt2)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve_checkpoint(REPO_ID, allow_download=True) == tiny_gpt2
    resolve_checkpoint(REPO_ID)
    assert [c["local_files_only"] for c in calls] == [False, True]
    assert all(c["cache_dir"] == tmp_path / "cache" and c["revision"] == "main" for c in calls)
    assert {"config.json", "model.safetensors", "tokenizer.json", "attrpatch_task.json"} <= set(
        calls[0]["allow_patterns"])


def test_local_paths_are_never_repo_ids(tiny_gpt2, tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    shutil.copytree(tiny_gpt2, tmp_path / "org" / "model")
    assert resolve_checkpoint("org/model").resolve() == tmp_path / "org" / "model"  # the directory wins
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "org" / "absent")  # a Path is always a path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint("./org/absent")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        resolve_checkpoint(tiny_gpt2 / "config.json")
    with pytest.raises(ValueError, match="revision='v1' applies to Hugging Face repo ids"):
        load_model(tiny_gpt2, revision="v1")


def test_cli_takes_a_repo_id_from_the_cache(tiny_gpt2, tmp_path, monkeypatch, no_network, capsys):
    """`attrpatch scan --model org/name` reads the local hub cache, offline; a missing id names
    the cache and the flag that would download it."""
    from attrpatch.cli import main

    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_gpt2 / name, plain / name)
    hub_layout(tmp_path / "hub", REPO_ID, plain)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    rng = np.random.default_rng(0)
    clean = rng.integers(1, 61, (2, 5))
    corrupt = clean.copy()
    corrupt[:, 2] = (clean[:, 2] + 1) % 61
    np.savez(tmp_path / "data.npz", clean_tokens=clean, corrupt_tokens=corrupt,
             correct_tokens=[1, 2], incorrect_tokens=[3, 4])
    args = ["scan", "--data", str(tmp_path / "data.npz"), "--sites", "z", "--methods", "atp",
            "--quiet"]
    assert main([*args, "--model", REPO_ID, "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["run"]["model"] == REPO_ID
    capsys.readouterr()
    assert main([*args, "--model", "other-org/missing", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "not in the local cache" in err and "--allow-download" in err, err
    assert not (tmp_path / "o2").exists()
