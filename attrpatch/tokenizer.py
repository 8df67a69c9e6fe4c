"""Local tokenizers: read a checkpoint's `tokenizer.json`, build the word-level toy ones."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read ``tokenizer.json`` from a directory (or the file itself) with `tokenizers`, or the
    tokenizer in a llama.cpp ``.gguf`` file's metadata (:func:`attrpatch.gguf.load_gguf_tokenizer`).

    Raises `FileNotFoundError` naming the path when there is none, `ValueError` when it does not
    parse.
    """
    path = Path(path)
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        from attrpatch.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no tokenizer.json" if path.is_dir() else f"{file} does not exist"
        raise FileNotFoundError(
            f"{where}; attrpatch reads a local Hugging Face `tokenizers` file "
            "(`tokenizer.json`, e.g. from `AutoTokenizer.save_pretrained`)"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{file}: not a `tokenizers` tokenizer.json: {e}") from e


def word_level_tokenizer(words: Sequence[str], unk: str = "<unk>") -> Tokenizer:
    """A `WordLevel` tokenizer over `words` (id = index; `unk` must be among them) that splits
    on whitespace and punctuation."""
    words = list(words)
    if len(set(words)) != len(words):
        raise ValueError("word_level_tokenizer: words must be distinct")
    if unk not in words:
        raise ValueError(f"word_level_tokenizer: the unknown token {unk!r} must be in `words`")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([w for w in words if w.startswith("<") and w.endswith(">")])
    return tok


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def display_token(token: str) -> str:
    """A vocabulary entry as text for labels: GPT-2's byte-level space ``Ġ`` and newline ``Ċ``,
    SentencePiece's word boundary ``▁`` and byte-fallback tokens (``<0x0A>``) made readable."""
    byte = _BYTE_TOKEN.match(token)
    if byte:
        return repr(chr(int(byte.group(1), 16)))[1:-1]
    return token.replace("\u0120", " ").replace("\u2581", " ").replace("\u010a", "\\n")
