"""GGUF files written the way llama.cpp's converter writes them, from random `transformers`
models, for tests/test_gguf.py.

Names and metadata keys come from the `gguf` package's own tables (`get_tensor_name_map`, the
`GGUFWriter.add_*` methods), not from attrpatch. What the converter changes is redone here: the
q/k rows of ``llama`` permuted into interleaved rotary pairs, Gemma's norm weights stored as
``1 + w``, Llama 3's rope scaling stored as a ``rope_freqs`` tensor of per-frequency divisors.
"""

from __future__ import annotations

import json
import math

import numpy as np

_ARCH = {"llama": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "olmo2": "OLMO2", "gemma": "GEMMA",
         "gemma2": "GEMMA2", "gemma3_text": "GEMMA3"}
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")


def random_hf(config_cls: str, model_cls: str, seed: int = 0, **config):
    """A random-initialised `transformers` model (eval, eager attention) with non-trivial norms
    and biases, as tests/families.py builds them."""
    import torch
    import transformers

    cfg = getattr(transformers, config_cls)(**config)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    gemma = cfg.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation: Hugging Face's rotate-half pairs (i, i + d/2) to adjacent rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_divisors(cfg) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp's converter writes for a Llama 3 rope scaling."""
    rope = cfg.rope_parameters
    dim = cfg.head_dim
    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    out = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * base ** (i / dim)
        if wavelength < original / high:
            out.append(1.0)
        elif wavelength > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def random_k_blocks(qtype: str, shape: tuple[int, int], rng) -> np.ndarray:
    """Random K-quant blocks (the `gguf` package cannot quantise to these) with scales chosen
    so the weights are of order 0.1: bytes ``[rows, row_bytes]``."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block, size), dtype=np.uint8)
    half = lambda x: np.full((len(blocks), 1), x, np.float16).view(np.uint8)
    if qtype in ("Q4_K", "Q5_K"):  # d, dmin (float16) first
        d = 2e-4 if qtype == "Q4_K" else 1e-4
        blocks[:, 0:2], blocks[:, 2:4] = half(d), half(7.5 * d if qtype == "Q4_K" else 15 * d)
    else:  # Q6_K: d (float16) last
        blocks[:, -2:] = half(5e-5)
    return blocks.reshape(shape[0], -1)


def _store(writer, name: str, w: np.ndarray, qtype: str, rng) -> None:
    import gguf

    if w.ndim == 1 or qtype == "F32":  # llama.cpp keeps vectors (norms, biases) in float32
        writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
    elif qtype == "F16":
        writer.add_tensor(name, w.astype(np.float16))
    elif qtype in K_QUANTS:
        kind = gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(name, random_k_blocks(qtype, w.shape, rng), raw_dtype=kind)
    else:
        kind = gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(name, gguf.quants.quantize(w.astype(np.float32), kind), raw_dtype=kind)


def add_tokenizer(writer, tokens, merges=None, pre: str = "default", token_types=None, bos=None,
                  eos=None, add_bos=None, model: str = "gpt2", scores=None, unk=None, pad=None,
                  add_eos=None, add_space_prefix=None) -> None:
    """Tokenizer metadata as llama.cpp's converter writes it: byte-level BPE (``"gpt2"``, with
    merges) or SentencePiece (``"llama"``, with scores)."""
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(token_types or [1] * len(tokens))
    if merges is not None:
        writer.add_token_merges(merges)
    for value, add in ((bos, writer.add_bos_token_id), (eos, writer.add_eos_token_id),
                       (unk, writer.add_unk_token_id), (pad, writer.add_pad_token_id),
                       (add_bos, writer.add_add_bos_token), (add_eos, writer.add_add_eos_token),
                       (add_space_prefix, writer.add_add_space_prefix)):
        if value is not None:
            add(value)


def write_gguf(path, model, qtype: str = "F32", seed: int = 0, extra=None, tokenizer=None) -> None:
    """`model` (a `transformers` Llama, Qwen2, Qwen3, OLMo 2, Gemma, 2 or 3) as llama.cpp writes
    it, its matrices stored as `qtype` (F32, F16, BF16, Q8_0, Q4_0, Q4_1; K-quants get random
    blocks). `extra(writer)` adds metadata or tensors; `tokenizer`: `add_tokenizer` arguments."""
    import gguf

    cfg = model.config
    arch = gguf.MODEL_ARCH[_ARCH[cfg.model_type]]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)  # Gemma 3: per layer type
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if cfg.model_type.startswith("gemma") or cfg.model_type == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    else:
        writer.add_rope_dimension_count(head_dim)
    if cfg.model_type == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if cfg.model_type in ("gemma2", "gemma3_text"):
        writer.add_sliding_window(cfg.sliding_window)
    if tokenizer is not None:
        add_tokenizer(writer, **tokenizer)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    rng = np.random.default_rng(seed)
    if cfg.model_type == "llama" and cfg.rope_parameters.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_divisors(cfg))
    for hf_name, tensor in model.state_dict().items():
        w = tensor.detach().float().numpy()
        stem, suffix = hf_name.rsplit(".", 1)
        if stem == "lm_head":
            if cfg.tie_word_embeddings:
                continue
            name = "output"
        else:
            name = names.get_name(stem)
        if cfg.model_type == "llama" and stem.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if stem.endswith("q_proj") else cfg.num_key_value_heads
            w = _permute(w, heads)
        if cfg.model_type.startswith("gemma") and hf_name.endswith("norm.weight"):
            w = w + 1
        _store(writer, f"{name}.{suffix}", w, qtype, rng)
    if extra is not None:
        extra(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def train_bpe(corpus: list[str], vocab_size: int, specials: list[str]) -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary (`tokenizers`' trainer) as GGUF stores one: the tokens in id
    order and the merges as ``"a b"`` strings."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def train_sentencepiece(corpus: list[str], vocab_size: int, gemma: bool) -> dict:
    """A SentencePiece BPE vocabulary as llama.cpp's converter stores one (`add_tokenizer`
    arguments): pieces learnt by `tokenizers`' trainer on ``▁``-escaped text, each scored minus
    its rank as SentencePiece scores BPE pieces (Gemma: reversed within blocks of 50, so that, as
    in Gemma's files, the scores do not give the merge order), after the layout of Llama 2
    (``<unk> <s> </s>``, the 256 ``<0xNN>`` byte tokens) or of Gemma (``<pad> <eos> <bos> <unk>
    <mask>``, chat control tokens, bytes, runs of spaces stored as real spaces, newlines, tabs)."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "\u2581") if gemma else normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    pieces = sorted(vocab, key=vocab.get)
    if gemma:
        head = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN),
                ("<mask>", CONTROL), ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL)]
        spaces = [(" " * n, USER_DEFINED) for n in (2, 3, 4)] + [("\n\n", USER_DEFINED), ("\t", USER_DEFINED)]
    else:
        head, spaces = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)], []
    head += [(f"<0x{b:02X}>", BYTE) for b in range(256)] + spaces
    taken = {t for t, _ in head} | {"\u2581" * n for n in (2, 3, 4)}  # Gemma's space runs are above
    pieces = [t for t in pieces if t not in taken]
    tokens = [t for t, _ in head] + pieces
    return dict(tokens=tokens, model="llama", token_types=[k for _, k in head] + [NORMAL] * len(pieces),
                scores=[0.0] * len(head) + [i % 50 / 100 - i // 50 if gemma else -float(i)
                                            for i in range(len(pieces))],
                bos=tokens.index("<bos>" if gemma else "<s>"),
                eos=tokens.index("<eos>" if gemma else "</s>"), unk=tokens.index("<unk>"),
                pad=0 if gemma else None)
