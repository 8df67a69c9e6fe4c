"""Standard tasks as ready :class:`attrpatch.Task` values: IOI, induction, greater-than.

Every builder is deterministic given `seed`. Tokens are ``[batch, pos]`` int32; prompts of
different token lengths are right-padded (pad id 0) with an ``attention_mask``, and the answer
position is each prompt's last real token.

- :func:`ioi_task` (any tokenizer) and :func:`toy_ioi_task` (the shipped vocabulary):
  "When Mary and John went to the store, John gave a drink to"; corrupted ``abc`` (three fresh
  names) or ``name_swap`` (S2 -> IO); correct IO, incorrect S.
- :func:`induction_task`: ``[bos] R R[:k]`` (R random, no repeats); corrupted: the first
  occurrence of the answer ``R[k]`` replaced by ``c``; correct ``R[k]``, incorrect ``c``.
- :func:`greater_than_task`: "The war lasted from the year 17YY to the year 17"; corrupted start
  year 1701; correct: year tokens > YY, incorrect: <= YY.

:func:`task_for_model` builds the task a checkpoint directory names in ``attrpatch_task.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from attrpatch.task import Task
from attrpatch.tokenizer import load_tokenizer, word_level_tokenizer

# ----------------------------------------------------------------------------------------------
# IOI for any tokenizer

IOI_TEMPLATES = (
    "When {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {N1} and {N2} went to the {PLACE}. {S} gave a {OBJECT} to",
    "After {N1} and {N2} went to the {PLACE}, {S} gave a {OBJECT} to",
    "While {N1} and {N2} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {N1} and {N2} had a long argument, and afterwards {S} said to",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "Friends {N1} and {N2} found a {OBJECT} at the {PLACE}. {S} gave it to",
    "The {PLACE} {N1} and {N2} went to had a {OBJECT}. {S} gave it to",
)
IOI_NAMES = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Paul", "Kate", "Anna",
    "Lisa", "Mark", "Emma", "Jack", "Sarah", "David", "Laura", "Peter", "Alice", "Michael",
    "Rose", "Adam", "Jane", "Eric", "Grace", "Carl", "Helen", "Ben", "Ruth", "Sam", "Joe",
)
IOI_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
IOI_OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
IOI_CORRUPTIONS = ("abc", "name_swap")


def single_token_id(tokenizer: Tokenizer, word: str, prefix_space: bool = True) -> int | None:
    """The id of `word` if it is one token (after a space when `prefix_space`), else None."""
    ids = tokenizer.encode((" " if prefix_space else "") + word, add_special_tokens=False).ids
    return ids[0] if len(ids) == 1 else None


def single_token_names(tokenizer: Tokenizer, names: Sequence[str] = IOI_NAMES) -> list[str]:
    """The names that are one token after a space (as they appear mid-sentence)."""
    return [n for n in names if single_token_id(tokenizer, n) is not None]


def default_bos_id(tokenizer: Tokenizer) -> int | None:
    """The id of ``<|endoftext|>``, ``<bos>`` or ``<s>`` if the vocabulary has one."""
    for tok in ("<|endoftext|>", "<bos>", "<s>"):
        i = tokenizer.token_to_id(tok)
        if i is not None:
            return i
    return None


def _encode(tokenizer: Tokenizer, text: str, bos_id: int | None) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return ([bos_id] if bos_id is not None else []) + ids


def pad_rows(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray | None]:
    """Right-pad with id 0: ``(tokens [batch, pos], mask [batch, pos] or None)``."""
    n = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), n), np.int32)
    mask = np.zeros((len(rows), n), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return tokens, (None if mask.all() else mask)


def _ioi(
    tokenizer: Tokenizer,
    n_prompts: int,
    seed: int,
    templates: Sequence[str],
    names: Sequence[str],
    places: Sequence[str],
    objects: Sequence[str],
    corruption: str,
    order: str,
    bos_id: int | None,
    pair_ok=None,
) -> Task:
    if corruption not in IOI_CORRUPTIONS:
        raise ValueError(f"unknown IOI corruption {corruption!r}; choose from {IOI_CORRUPTIONS}")
    if order not in ("ABBA", "BABA", "both"):
        raise ValueError(f"order must be 'ABBA', 'BABA' or 'both', got {order!r}")
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be positive, got {n_prompts}")
    names = single_token_names(tokenizer, names)
    if len(names) < 5:
        raise ValueError(
            f"IOI needs at least 5 names that are single tokens in this tokenizer (after a "
            f"space); found {len(names)}: {names}. Pass more `names`."
        )
    name_id = {n: single_token_id(tokenizer, n) for n in names}
    rng = np.random.default_rng(seed)
    clean_rows, corrupt_rows, correct, incorrect = [], [], [], []
    for i in range(n_prompts):
        template = templates[rng.integers(len(templates))]
        while True:
            a, b = rng.choice(len(names), 2, replace=False)
            if pair_ok is None or pair_ok(names[a], names[b]):
                break
        io, s = names[a], names[b]
        fill = {"PLACE": places[rng.integers(len(places))],
                "OBJECT": objects[rng.integers(len(objects))]}
        abba = order == "ABBA" or (order == "both" and i % 2 == 0)
        n1, n2 = (io, s) if abba else (s, io)
        clean = template.format(N1=n1, N2=n2, S=s, **fill)
        if corruption == "abc":
            others = [n for n in names if n not in (io, s)]
            c1, c2, c3 = (others[j] for j in rng.choice(len(others), 3, replace=False))
            corrupt = template.format(N1=c1, N2=c2, S=c3, **fill)
        else:
            corrupt = template.format(N1=n1, N2=n2, S=io, **fill)
        clean_ids, corrupt_ids = _encode(tokenizer, clean, bos_id), _encode(tokenizer, corrupt, bos_id)
        if len(clean_ids) != len(corrupt_ids) or clean_ids.count(name_id[s]) != 2 or (
            clean_ids.count(name_id[io]) != 1
        ):
            raise ValueError(
                f"IOI prompt {clean!r} / {corrupt!r} does not tokenize with each name as its "
                "single-token form; is the template's spacing unusual for this tokenizer?"
            )
        clean_rows.append(clean_ids)
        corrupt_rows.append(corrupt_ids)
        correct.append(name_id[io])
        incorrect.append(name_id[s])
    clean_tokens, mask = pad_rows(clean_rows)
    corrupt_tokens, _ = pad_rows(corrupt_rows)
    return Task(clean_tokens, corrupt_tokens, np.array(correct), np.array(incorrect),
                attention_mask=mask)


def ioi_task(
    tokenizer: Tokenizer,
    n_prompts: int = 64,
    seed: int = 0,
    corruption: str = "abc",
    order: str = "both",
    templates: Sequence[str] = IOI_TEMPLATES,
    names: Sequence[str] = IOI_NAMES,
    places: Sequence[str] = IOI_PLACES,
    objects: Sequence[str] = IOI_OBJECTS,
    bos_id: int | None | str = "auto",
) -> Task:
    """Indirect-object identification prompts for any `tokenizers.Tokenizer`.

    **Arguments:**

    - `corruption`: ``"abc"`` (the three name slots get three fresh names, distinct from IO and
      S) or ``"name_swap"`` (the second S becomes the IO name, so the answer flips).
    - `order`: ``"ABBA"`` (IO named first), ``"BABA"``, or ``"both"`` (alternating).
    - `names`: candidates; only those that are one token after a space are used (at least 5).
    - `bos_id`: prepended id; ``"auto"`` uses ``<|endoftext|>``/``<bos>``/``<s>`` if present.

    **Returns:** a :class:`Task`: tokens ``[n_prompts, pos]`` (right-padded with a mask where
    templates differ in length), correct = IO id ``[n_prompts, 1]``, incorrect = S id.
    """
    bos = default_bos_id(tokenizer) if bos_id == "auto" else bos_id
    return _ioi(tokenizer, n_prompts, seed, templates, names, places, objects, corruption, order,
                bos)


# ----------------------------------------------------------------------------------------------
# The shipped word-level IOI world (model `ioi-gpt2-4l`)

TOY_SPECIAL = ("<bos>", "<pad>", "<unk>")
TOY_NAMES = IOI_NAMES  # the toy world uses the same 32 names
TOY_PLACES = ("store", "park", "school", "house", "garden", "office", "station", "market",
              "beach", "library", "cafe", "hospital")
TOY_OBJECTS = ("drink", "ring", "book", "kiss", "letter", "ball", "gift", "key", "bone",
               "basket", "snack", "coin")
TOY_OPENERS = ("When", "After", "While", "Once", "As", "Since", "Then", "Before")
TOY_MOVES = ("went to the", "arrived at the", "were at the", "walked into the", "waited in the",
             "stayed at the", "met at the", "got to the", "sat in the", "ran to the")
TOY_VERBS = ("gave", "handed", "passed", "threw", "showed", "sold", "offered", "brought",
             "lent", "mailed")


def _toy_words() -> list[str]:
    words = list(TOY_SPECIAL) + ["and", ",", "a"]
    for group in (TOY_OPENERS, TOY_MOVES, TOY_VERBS, TOY_PLACES, TOY_OBJECTS, TOY_NAMES):
        for phrase in group:
            for w in phrase.split():
                if w not in words:
                    words.append(w)
    return words


TOY_IOI_WORDS: tuple[str, ...] = tuple(_toy_words())


def toy_ioi_tokenizer() -> Tokenizer:
    """The word-level tokenizer of the shipped IOI model (id 0 = ``<bos>``, 1 = ``<pad>``)."""
    return word_level_tokenizer(TOY_IOI_WORDS)


def toy_ioi_templates(split: str = "all") -> list[str]:
    """Toy IOI templates: opener x movement phrase x giving verb (800), all 15 tokens with bos.

    ``split="train"`` is the 640 used in training, ``"test"`` the 160 held out (every word in
    them is seen in training, the combination is not), ``"all"`` both.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    out = []
    for i, op in enumerate(TOY_OPENERS):
        for j, mv in enumerate(TOY_MOVES):
            for k, vb in enumerate(TOY_VERBS):
                held_out = (i + 3 * j + 7 * k) % 5 == 0
                if split == "all" or held_out == (split == "test"):
                    out.append(f"{op} {{N1}} and {{N2}} {mv} {{PLACE}} , {{S}} {vb} a {{OBJECT}} to")
    return out


def toy_name_pair_held_out(a: str, b: str) -> bool:
    """Whether the (unordered) name pair is held out of training (about 1 pair in 6)."""
    i, j = sorted((TOY_NAMES.index(a), TOY_NAMES.index(b)))
    return (i * 5 + j * 3) % 6 == 0


def toy_ioi_task(
    n_prompts: int = 64,
    seed: int = 0,
    split: str = "test",
    corruption: str = "abc",
    order: str = "both",
) -> Task:
    """IOI over the shipped word-level vocabulary; every prompt is 15 tokens (no padding).

    Positions: 0 bos, 1 opener, 2 N1, 3 "and", 4 N2, 5-7 movement, 8 place, 9 ",", 10 S2,
    11 verb, 12 "a", 13 object, 14 "to" (the answer position).

    **Arguments:**

    - `split`: ``"test"`` uses held-out templates and held-out name pairs (never trained on),
      ``"train"`` the training ones, ``"all"`` any. With ``"abc"`` the fresh names are any.
    - `corruption`, `order`: as in :func:`ioi_task`.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    pair_ok = None
    if split != "all":
        pair_ok = lambda a, b: toy_name_pair_held_out(a, b) == (split == "test")
    return _ioi(toy_ioi_tokenizer(), n_prompts, seed, toy_ioi_templates(split), TOY_NAMES,
                TOY_PLACES, TOY_OBJECTS, corruption, order, bos_id=0, pair_ok=pair_ok)


# ----------------------------------------------------------------------------------------------
# Induction


def induction_task(
    n_prompts: int = 64,
    seq_len: int = 10,
    vocab: int | Sequence[int] = 64,
    bos_id: int | None = 0,
    seed: int = 0,
    n_repeated: int | None = None,
    corrupt: str = "answer",
) -> Task:
    """Repeated random tokens: ``[bos] R R[:k]``, answer ``R[k]`` (``k = n_repeated``).

    `R` is `seq_len` distinct ids drawn from `vocab` (an int ``n`` means ids ``1..n-1`` when
    `bos_id` is 0, else ``0..n-1``; or an explicit list of ids). The corrupted prompt replaces
    a token of the *first* occurrence by a fresh id ``c`` not in `R`: with
    ``corrupt="answer"`` the answer ``R[k]`` itself (the value an induction head copies, so
    induction predicts ``c``); with ``corrupt="previous"`` the token before it, ``R[k-1]`` (the
    key it matches, so induction finds nothing). Correct = ``R[k]``, incorrect = ``c``.

    **Returns:** a :class:`Task` with tokens ``[n_prompts, 1 + seq_len + k]`` (no bos: one less).
    """
    if isinstance(vocab, int):
        ids = np.array([i for i in range(vocab) if i != bos_id])
    else:
        ids = np.asarray(list(vocab))
    k = seq_len - 1 if n_repeated is None else n_repeated
    if not 1 <= k < seq_len:
        raise ValueError(f"n_repeated must be in [1, seq_len), got {k} with seq_len={seq_len}")
    if corrupt not in ("answer", "previous"):
        raise ValueError(f"corrupt must be 'answer' or 'previous', got {corrupt!r}")
    if len(ids) < seq_len + 1:
        raise ValueError(f"vocab has {len(ids)} ids; need at least seq_len + 1 = {seq_len + 1}")
    rng = np.random.default_rng(seed)
    prefix = [] if bos_id is None else [bos_id]
    clean_rows, corrupt_rows, correct, incorrect = [], [], [], []
    for _ in range(n_prompts):
        draw = ids[rng.choice(len(ids), seq_len + 1, replace=False)]
        r, c = list(draw[:seq_len]), int(draw[seq_len])
        clean_rows.append(prefix + r + r[:k])
        r_bad = list(r)
        r_bad[k if corrupt == "answer" else k - 1] = c
        corrupt_rows.append(prefix + r_bad + r[:k])
        correct.append(int(r[k]))
        incorrect.append(c)
    return Task(np.array(clean_rows), np.array(corrupt_rows), np.array(correct), np.array(incorrect))


# ----------------------------------------------------------------------------------------------
# Greater-than (Hanna, Liu & Variengien 2023)

GT_TEMPLATE = "The {NOUN} lasted from the year {CENTURY}{YY} to the year {CENTURY}"
GT_NOUNS = ("war", "dispute", "conflict", "expedition", "siege", "famine", "drought", "reign")


def greater_than_task(
    tokenizer: Tokenizer,
    n_prompts: int = 64,
    seed: int = 0,
    n_answers: int = 8,
    century: str = "17",
    nouns: Sequence[str] = GT_NOUNS,
    template: str = GT_TEMPLATE,
    bos_id: int | None | str = "auto",
) -> Task:
    """"The war lasted from the year 17YY to the year 17" -> a two-digit year token > YY.

    The tokenizer must split a year as ``century`` + a two-digit token (GPT-2 does: " 17" "32");
    years where it does not are skipped. The corrupted prompt has start year ``{century}01``.
    Correct answers: `n_answers` year tokens > YY, evenly spread over (YY, 99]; incorrect:
    `n_answers` evenly spread over [00, YY] (so YY is drawn from [max(2, n_answers-1), 99-n_answers]).

    **Returns:** a :class:`Task`: tokens ``[n_prompts, pos]``, correct/incorrect
    ``[n_prompts, n_answers]``.
    """
    bos = default_bos_id(tokenizer) if bos_id == "auto" else bos_id
    yy_id = {}
    for y in range(100):
        i = single_token_id(tokenizer, f"{y:02d}", prefix_space=False)
        if i is not None:
            yy_id[y] = i
    if 1 not in yy_id:
        raise ValueError("greater-than: '01' is not a single token in this tokenizer")
    valid = []
    for y in range(max(2, n_answers - 1), 100 - n_answers):
        if y not in yy_id:
            continue
        below = [v for v in range(0, y + 1) if v in yy_id]
        above = [v for v in range(y + 1, 100) if v in yy_id]
        if len(below) >= n_answers and len(above) >= n_answers:
            valid.append(y)
    if not valid:
        raise ValueError(
            f"greater-than: this tokenizer has too few two-digit year tokens for {n_answers} "
            "answers on each side"
        )

    def spread(vals):
        return [vals[j] for j in np.linspace(0, len(vals) - 1, n_answers).round().astype(int)]

    rng = np.random.default_rng(seed)
    clean_rows, corrupt_rows, correct, incorrect = [], [], [], []
    tries = 0
    while len(clean_rows) < n_prompts:
        tries += 1
        if tries > 50 * n_prompts:
            raise ValueError(
                f"greater-than: this tokenizer does not split '{century}YY' as '{century}' + 'YY'"
            )
        y = valid[rng.integers(len(valid))]
        noun = nouns[rng.integers(len(nouns))]
        clean = _encode(tokenizer, template.format(NOUN=noun, CENTURY=century, YY=f"{y:02d}"), bos)
        corrupt = _encode(tokenizer, template.format(NOUN=noun, CENTURY=century, YY="01"), bos)
        diff = [p for p in range(min(len(clean), len(corrupt))) if clean[p] != corrupt[p]]
        if (len(clean) != len(corrupt) or len(diff) != 1 or clean[diff[0]] != yy_id[y]
                or corrupt[diff[0]] != yy_id[1]):
            continue
        clean_rows.append(clean)
        corrupt_rows.append(corrupt)
        correct.append([yy_id[v] for v in spread([v for v in range(y + 1, 100) if v in yy_id])])
        incorrect.append([yy_id[v] for v in spread([v for v in range(0, y + 1) if v in yy_id])])
    clean_tokens, mask = pad_rows(clean_rows)
    corrupt_tokens, _ = pad_rows(corrupt_rows)
    return Task(clean_tokens, corrupt_tokens, np.array(correct), np.array(incorrect),
                attention_mask=mask)


# ----------------------------------------------------------------------------------------------
# The task a checkpoint directory names

TASK_FILE = "attrpatch_task.json"
# name -> (builder, needs the directory's tokenizer)
TASK_BUILDERS = {
    "toy_ioi": (toy_ioi_task, False),
    "induction": (induction_task, False),
    "ioi": (ioi_task, True),
    "greater_than": (greater_than_task, True),
}


def task_spec(model_dir: str | os.PathLike) -> dict:
    """The parsed ``attrpatch_task.json`` of a checkpoint directory: ``{"task", "args"}``."""
    file = Path(model_dir) / TASK_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{model_dir} has no {TASK_FILE} naming its task; build one with attrpatch.tasks "
            f"({', '.join(TASK_BUILDERS)}) or write {{\"task\": ..., \"args\": {{...}}}} there"
        )
    spec = json.loads(file.read_text())
    if spec.get("task") not in TASK_BUILDERS:
        raise ValueError(
            f"{file}: unknown task {spec.get('task')!r}; choose from {', '.join(TASK_BUILDERS)}"
        )
    return {"task": spec["task"], "args": dict(spec.get("args", {}))}


def task_for_model(
    model_dir: str | os.PathLike, n_prompts: int | None = None, seed: int | None = None, **overrides
) -> Task:
    """Build the task named by ``<model_dir>/attrpatch_task.json`` (with its ``tokenizer.json``
    for tokenizer tasks). `n_prompts`, `seed` and `overrides` replace the stored arguments."""
    spec = task_spec(model_dir)
    builder, needs_tokenizer = TASK_BUILDERS[spec["task"]]
    args = spec["args"] | overrides
    if n_prompts is not None:
        args["n_prompts"] = n_prompts
    if seed is not None:
        args["seed"] = seed
    if needs_tokenizer:
        return builder(load_tokenizer(model_dir), **args)
    return builder(**args)


def task_spec_json(task: str, **args) -> str:
    """The JSON text for ``attrpatch_task.json`` (checked against the builders)."""
    if task not in TASK_BUILDERS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASK_BUILDERS)}")
    return json.dumps({"task": task, "args": args}, indent=2) + "\n"
