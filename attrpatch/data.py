"""Load a patching task from a data file, checking everything before any compute.

Accepted formats (chosen by content, not only by suffix):

- **token ids**: ``.npz``, or ``.json`` with keys ``clean_tokens``, ``corrupt_tokens`` (int
  ``[batch, pos]``), ``correct_tokens``, ``incorrect_tokens`` (``[batch]`` or ``[batch, n]``), and
  optionally ``attention_mask`` ``[batch, pos]``.
- **text**: ``.json`` (a list of objects, or ``{"prompts": [...]}``), ``.jsonl``, ``.csv`` or
  ``.tsv`` (tab-separated) with fields ``clean``, ``corrupt``, ``answer``, ``wrong_answer``;
  tokenised with the model directory's ``tokenizer.json``.
- **auto-circuit** prompts: ``{"prompts": [{"clean", "corrupt", "answers", "wrong_answers"}]}``
  (lists of answer strings; every prompt must have the same number of each).
- a shipped model's **task description**, ``<model>/attrpatch_task.json`` (the task the model's
  card and `attrpatch demo` use).

Each answer must be exactly one token; clean and corrupt prompts must tokenise to the same
length (prompts of different lengths are right-padded with an attention mask).
"""

from __future__ import annotations

import csv
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from attrpatch.task import Task
from attrpatch.tasks import default_bos_id, pad_rows

TOKEN_KEYS = ("clean_tokens", "corrupt_tokens", "correct_tokens", "incorrect_tokens")


class DataError(ValueError):
    """A data file that cannot become a task; the message names the file and the problem."""


def load_task(path: str | os.PathLike, model=None, model_dir: str | os.PathLike | None = None,
              metric: str = "logit_diff", tokenizer=None, prepend_bos: bool = False) -> Task:
    """Read a data file into a :class:`attrpatch.Task` and check it against `model`.

    **Arguments:**

    - `path`: the data file (formats in the module docstring).
    - `model`: if given, token ids and lengths are checked against it (`Task.check_for`).
    - `model_dir` / `tokenizer`: where text prompts get their tokenizer (a `tokenizers.Tokenizer`,
      or the directory holding ``tokenizer.json``).
    - `metric`: the task's default metric.
    - `prepend_bos`: put the tokenizer's ``<|endoftext|>`` / ``<bos>`` / ``<s>`` before every
      text prompt (as TransformerLens does by default); token-id files are used as they are.

    Raises :class:`DataError` naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as f:
                    arrays = {k: f[k] for k in f.files}
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                raise DataError(f"{path}: not a readable .npz file (empty, truncated or another "
                                f"format): {e or type(e).__name__}") from e
            task = _from_arrays(arrays, path, metric)
        elif suffix in (".json", ".jsonl", ".csv", ".tsv"):
            records = _read_records(path, suffix)
            if isinstance(records, dict) and {"task", "args"} <= set(records):
                task = _from_task_spec(path, metric)
            elif isinstance(records, dict) and "prompts" not in records:
                task = _from_arrays(records, path, metric)
            else:
                prompts = records["prompts"] if isinstance(records, dict) else records
                tok = tokenizer if tokenizer is not None else _tokenizer(model_dir, path)
                task = _from_text(prompts, tok, path, metric, prepend_bos)
        else:
            raise DataError(f"{path}: unknown data file type {suffix!r}; use .npz, .json, "
                            ".jsonl, .csv or .tsv")
    except DataError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: {e}") from e
    if model is not None:
        try:
            task.check_for(model)
        except ValueError as e:
            raise DataError(f"{path}: {e}") from e
    return task


def _from_task_spec(path: Path, metric: str) -> Task:
    """A shipped model's task file (``attrpatch_task.json``, with its ``tokenizer.json`` beside)."""
    from attrpatch.tasks import TASK_FILE, task_for_model

    if path.name != TASK_FILE:
        raise DataError(f"{path}: a task description ({{'task', 'args'}}) must be named {TASK_FILE} "
                        "and sit in its model's directory")
    t = task_for_model(path.parent)
    return Task(t.clean_tokens, t.corrupt_tokens, t.correct_tokens, t.incorrect_tokens,
                t.attention_mask, metric)


def _read_records(path: Path, suffix: str):
    text = path.read_text()
    try:
        if suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if suffix in (".csv", ".tsv"):
            rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
            return rows
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e


def _from_arrays(arrays: dict, path: Path, metric: str) -> Task:
    missing = [k for k in TOKEN_KEYS if k not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing key(s) {', '.join(missing)}; a token-id file needs "
            f"{', '.join(TOKEN_KEYS)} (and optionally attention_mask); a text file needs "
            "'prompts' or a list of {clean, corrupt, answer, wrong_answer}"
        )
    out = {}
    for k in (*TOKEN_KEYS, "attention_mask"):
        if k not in arrays:
            continue
        try:
            a = np.asarray(arrays[k])
        except ValueError as e:
            raise DataError(f"{path}: {k} is ragged (rows of different lengths): {e}") from e
        if k == "attention_mask" and a.dtype == bool:
            a = a.astype(np.int32)
        if not np.issubdtype(a.dtype, np.integer):  # bool or float token ids are a mistake
            raise DataError(f"{path}: {k} must be an integer array of "
                            f"{'0/1' if k == 'attention_mask' else 'token ids'}, got dtype {a.dtype}")
        out[k] = a
    if out["clean_tokens"].ndim != 2 or out["clean_tokens"].shape[0] == 0:
        raise DataError(f"{path}: clean_tokens must be a non-empty [batch, pos] array, "
                        f"got shape {out['clean_tokens'].shape}")
    return Task(out["clean_tokens"], out["corrupt_tokens"], out["correct_tokens"],
                out["incorrect_tokens"], attention_mask=out.get("attention_mask"), metric=metric)


def _tokenizer(model_dir, path: Path):
    if model_dir is None:
        raise DataError(f"{path} holds text prompts; pass the model directory (with "
                        "tokenizer.json) to tokenise them")
    from attrpatch.tokenizer import load_tokenizer

    try:
        return load_tokenizer(model_dir)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path} holds text prompts, but: {e}") from e


def _encode(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False).ids)


def _single_token(tok, text, where: str) -> int:
    if not isinstance(text, str):
        raise DataError(f"{where}: expected a string, got {text!r}")
    ids = _encode(tok, text)
    if len(ids) != 1:
        pieces = [tok.id_to_token(i) for i in ids]
        raise DataError(f"{where}: answer {text!r} is {len(ids)} tokens {pieces}, not exactly "
                        "one (mind the leading space with GPT-2 style tokenizers)")
    unk = _unk_id(tok)
    if unk is not None and ids[0] == unk and text.strip() != tok.id_to_token(unk):
        raise DataError(f"{where}: answer {text!r} is not in the tokenizer's vocabulary")
    return ids[0]


def _unk_id(tok):
    model = getattr(tok, "model", None)
    unk = getattr(model, "unk_token", None)
    return tok.token_to_id(unk) if isinstance(unk, str) else None


def _from_text(prompts, tok, path: Path, metric: str, prepend_bos: bool = False) -> Task:
    if not isinstance(prompts, list) or not prompts:
        raise DataError(f"{path}: expected a non-empty list of prompts")
    bos = []
    if prepend_bos:
        bos_id = default_bos_id(tok)
        if bos_id is None:
            raise DataError(f"{path}: prepend_bos, but the tokenizer has no <|endoftext|>, <bos> "
                            "or <s> token")
        bos = [bos_id]
    clean, corrupt, correct, incorrect = [], [], [], []
    for i, p in enumerate(prompts):
        where = f"{path}: prompt {i}"
        if not isinstance(p, dict):
            raise DataError(f"{where}: expected an object, got {type(p).__name__}")
        if "answers" in p or "wrong_answers" in p:
            need = ("clean", "corrupt", "answers", "wrong_answers")
        else:
            need = ("clean", "corrupt", "answer", "wrong_answer")
        missing = [k for k in need if k not in p or p[k] is None or p[k] == "" or p[k] == []]
        if missing:
            raise DataError(f"{where}: missing or empty field(s) {', '.join(missing)} (needs "
                            f"{', '.join(need)})")
        for k in need:
            texts = p[k] if isinstance(p[k], list) and "answer" in k else [p[k]]
            if not all(isinstance(t, str) for t in texts):
                kind = "a string or a list of strings" if "answer" in k else "a string"
                raise DataError(f"{where}: {k} must be {kind}, got {p[k]!r}")
        c, x = _encode(tok, p["clean"]), _encode(tok, p["corrupt"])
        if len(c) != len(x):
            raise DataError(f"{where}: clean tokenises to {len(c)} tokens but corrupt to "
                            f"{len(x)}; they must have the same length")
        if not c:
            raise DataError(f"{where}: the clean prompt is empty")
        unk = _unk_id(tok)
        for name, ids, text in (("clean", c, p["clean"]), ("corrupt", x, p["corrupt"])):
            if unk is not None and unk in ids and tok.id_to_token(unk) not in text:
                raise DataError(f"{where}: the {name} prompt has words outside the tokenizer's "
                                f"vocabulary: {text!r}")
        ans = p.get("answers", p.get("answer"))
        wrong = p.get("wrong_answers", p.get("wrong_answer"))
        ans = [ans] if isinstance(ans, str) else list(ans)
        wrong = [wrong] if isinstance(wrong, str) else list(wrong)
        correct.append([_single_token(tok, a, f"{where} answers") for a in ans])
        incorrect.append([_single_token(tok, a, f"{where} wrong_answers") for a in wrong])
        clean.append(bos + c)
        corrupt.append(bos + x)
    for name, lists in (("answers", correct), ("wrong_answers", incorrect)):
        if len({len(a) for a in lists}) != 1:
            raise DataError(f"{path}: every prompt needs the same number of {name}; got "
                            f"{sorted({len(a) for a in lists})}")
    clean_tokens, mask = pad_rows(clean)
    corrupt_tokens, _ = pad_rows(corrupt)
    return Task(clean_tokens, corrupt_tokens, np.asarray(correct), np.asarray(incorrect),
                attention_mask=mask, metric=metric)

