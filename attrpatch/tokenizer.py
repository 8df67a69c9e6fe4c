"""Local tokenizers: read a checkpoint's `tokenizer.json`, build the word-level toy ones."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read ``tokenizer.json`` from a directory (or the file itself) with `tokenizers`.

    Raises `FileNotFoundError` naming the path when there is none, `ValueError` when it does not
    parse.
    """
    path = Path(path)
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
