"""The standard tasks: shapes, single-token names, where corruptions differ, answer sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from attrpatch import tasks
from attrpatch.tokenizer import load_tokenizer, word_level_tokenizer

RARE = ("Bartholomew", "Xiomara")


@pytest.fixture(scope="module")
def bpe():
    """A small GPT-2-like byte-level BPE: frequent names become one token (" John"), the
    unseen ones in `RARE` stay split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = []
    for t in tasks.IOI_TEMPLATES:
        for i, a in enumerate(tasks.IOI_NAMES[:12]):
            b = tasks.IOI_NAMES[(i + 1) % 12]
            for p, o in zip(tasks.IOI_PLACES, tasks.IOI_OBJECTS, strict=True):
                corpus.append(t.format(N1=a, N2=b, S=b, PLACE=p, OBJECT=o) + " " + a + ".")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def test_single_token_names_is_prefix_space_aware(bpe):
    names = tasks.single_token_names(bpe, tasks.IOI_NAMES[:12] + RARE)
    assert set(names) == set(tasks.IOI_NAMES[:12])
    for n in names:
        [i] = bpe.encode(" " + n).ids
        assert bpe.id_to_token(i) == "Ġ" + n  # the mid-sentence (space-prefixed) form
    assert all(len(bpe.encode(" " + r).ids) > 1 for r in RARE)


@pytest.mark.parametrize("corruption", ["abc", "name_swap"])
def test_ioi_on_bpe(bpe, corruption):
    task = tasks.ioi_task(bpe, 24, seed=3, corruption=corruption,
                          names=tasks.IOI_NAMES[:12] + RARE)
    assert task.clean_tokens.shape == task.corrupt_tokens.shape
    assert task.correct_tokens.shape == task.incorrect_tokens.shape == (24, 1)
    clean, corrupt = np.asarray(task.clean_tokens), np.asarray(task.corrupt_tokens)
    io, s = np.asarray(task.correct_tokens[:, 0]), np.asarray(task.incorrect_tokens[:, 0])
    name_ids = {bpe.encode(" " + n).ids[0] for n in tasks.IOI_NAMES[:12]}
    assert set(io) | set(s) <= name_ids
    bos = bpe.token_to_id("<|endoftext|>")
    mask = np.ones_like(clean) if task.attention_mask is None else np.asarray(task.attention_mask)
    for b in range(24):
        row, crow = clean[b][mask[b] == 1], corrupt[b][mask[b] == 1]
        assert row[0] == bos and io[b] != s[b]
        assert (row == io[b]).sum() == 1 and (row == s[b]).sum() == 2
        differ = np.flatnonzero(row != crow)
        if corruption == "abc":
            # exactly the three name slots change, to three fresh, distinct names
            assert len(differ) == 3
            assert len(set(crow[differ])) == 3 and not set(crow[differ]) & {io[b], s[b]}
        else:
            # only the second S changes, to the IO name
            assert len(differ) == 1 and row[differ[0]] == s[b] and crow[differ[0]] == io[b]
    text = bpe.decode(clean[0][mask[0] == 1].tolist())
    assert bpe.decode([int(io[0])]).strip() in text


def test_ioi_orders_and_determinism(bpe):
    a = tasks.ioi_task(bpe, 8, seed=1, order="ABBA", names=tasks.IOI_NAMES[:12])
    b = tasks.ioi_task(bpe, 8, seed=1, order="ABBA", names=tasks.IOI_NAMES[:12])
    c = tasks.ioi_task(bpe, 8, seed=2, order="ABBA", names=tasks.IOI_NAMES[:12])
    assert (np.asarray(a.clean_tokens) == np.asarray(b.clean_tokens)).all()
    assert not np.array_equal(np.asarray(a.clean_tokens), np.asarray(c.clean_tokens))
    for order, io_first in (("ABBA", True), ("BABA", False)):
        t = tasks.ioi_task(bpe, 6, seed=0, order=order, names=tasks.IOI_NAMES[:12])
        for row, io, s in zip(np.asarray(t.clean_tokens), np.asarray(t.correct_tokens[:, 0]),
                              np.asarray(t.incorrect_tokens[:, 0]), strict=True):
            first_io, first_s = list(row).index(io), list(row).index(s)
            assert (first_io < first_s) == io_first


def test_ioi_needs_five_single_token_names(bpe):
    with pytest.raises(ValueError, match="single tokens"):
        tasks.ioi_task(bpe, 4, names=tasks.IOI_NAMES[:3] + RARE)
    with pytest.raises(ValueError, match="corruption"):
        tasks.ioi_task(bpe, 4, corruption="shuffle")


def test_toy_ioi_split_is_held_out():
    tok = tasks.toy_ioi_tokenizer()
    train_t, test_t = set(tasks.toy_ioi_templates("train")), set(tasks.toy_ioi_templates("test"))
    assert len(train_t) + len(test_t) == 800 and not train_t & test_t
    task = tasks.toy_ioi_task(200, seed=0, split="test")
    assert task.clean_tokens.shape == (200, 15) and task.attention_mask is None
    words = [[tok.id_to_token(int(i)) for i in row] for row in np.asarray(task.clean_tokens)]
    for w, io, s in zip(words, np.asarray(task.correct_tokens[:, 0]),
                        np.asarray(task.incorrect_tokens[:, 0]), strict=True):
        assert w[0] == "<bos>" and w[-1] == "to" and w[3] == "and" and w[9] == ","
        template = " ".join([w[1], "{N1}", "and", "{N2}", *w[5:8], "{PLACE}", ",", "{S}", w[11],
                             "a", "{OBJECT}", "to"])
        assert template in test_t
        assert tasks.toy_name_pair_held_out(tok.id_to_token(int(io)), tok.id_to_token(int(s)))
        assert w[10] == tok.id_to_token(int(s))
    train = tasks.toy_ioi_task(100, seed=0, split="train")
    for io, s in zip(np.asarray(train.correct_tokens[:, 0]), np.asarray(train.incorrect_tokens[:, 0]),
                     strict=True):
        assert not tasks.toy_name_pair_held_out(tok.id_to_token(int(io)), tok.id_to_token(int(s)))


def test_induction_task():
    t = tasks.induction_task(16, seq_len=7, vocab=30, bos_id=0, seed=5)
    clean, corrupt = np.asarray(t.clean_tokens), np.asarray(t.corrupt_tokens)
    assert clean.shape == (16, 1 + 7 + 6)
    assert (clean[:, 0] == 0).all() and (clean[:, 1:] > 0).all() and (clean < 30).all()
    assert (clean[:, 1:7] == clean[:, 8:]).all()  # R[:6] repeated
    assert (np.asarray(t.correct_tokens[:, 0]) == clean[:, 7]).all()  # answer R[6]
    differ = clean != corrupt
    assert (differ.sum(1) == 1).all() and differ[:, 7].all()  # only the first occurrence
    c = np.asarray(t.incorrect_tokens[:, 0])
    assert (corrupt[:, 7] == c).all()
    assert not any(c[b] in clean[b] for b in range(16))
    with pytest.raises(ValueError, match="n_repeated"):
        tasks.induction_task(2, seq_len=5, n_repeated=5)


@pytest.fixture(scope="module")
def year_tokenizer():
    """Word-level, but splitting each 4-digit year into two 2-digit tokens like GPT-2."""
    words = ["<unk>", "<|endoftext|>", "The", "lasted", "from", "the", "year", "to", "17",
             *tasks.GT_NOUNS] + [f"{y:02d}" for y in range(100) if y != 17]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"),
    ])
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def test_greater_than(year_tokenizer):
    tok = year_tokenizer
    t = tasks.greater_than_task(tok, 20, seed=0, n_answers=6)
    clean, corrupt = np.asarray(t.clean_tokens), np.asarray(t.corrupt_tokens)
    assert clean.shape == corrupt.shape and t.correct_tokens.shape == (20, 6)
    year = lambda i: int(tok.id_to_token(int(i)))
    for b in range(20):
        differ = np.flatnonzero(clean[b] != corrupt[b])
        assert len(differ) == 1 and tok.id_to_token(int(corrupt[b, differ[0]])) == "01"
        yy = year(clean[b, differ[0]])
        assert 2 <= yy <= 93
        assert tok.id_to_token(int(clean[b, -1])) == "17" and tok.id_to_token(int(clean[b, 0])) \
            == "<|endoftext|>"
        good = [year(i) for i in np.asarray(t.correct_tokens[b])]
        bad = [year(i) for i in np.asarray(t.incorrect_tokens[b])]
        assert all(y > yy for y in good) and all(y <= yy for y in bad)
        assert len(set(good)) == 6 and len(set(bad)) == 6
        assert max(good) == 99 and min(bad) == 0  # spread over the whole range


def test_greater_than_rejects_unsplit_years():
    words = ["<unk>", "The", "lasted", "from", "the", "year", "to", "17", "war"] + [
        f"{y:02d}" for y in range(100) if y != 17] + [f"17{y:02d}" for y in range(100)]
    tok = word_level_tokenizer(words)
    with pytest.raises(ValueError, match="split"):
        tasks.greater_than_task(tok, 4, nouns=["war"])


def test_load_tokenizer_and_task_for_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    tok = tasks.toy_ioi_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    back = load_tokenizer(tmp_path)
    assert back.encode("<bos> When Mary and John").ids == tok.encode("<bos> When Mary and John").ids
    assert back.encode("<bos> When").ids[0] == 0
    with pytest.raises(FileNotFoundError, match="attrpatch_task.json"):
        tasks.task_for_model(tmp_path)
    (tmp_path / tasks.TASK_FILE).write_text(tasks.task_spec_json("ioi", n_prompts=10, seed=4))
    t = tasks.task_for_model(tmp_path, n_prompts=6)
    ref = tasks.ioi_task(tok, 6, seed=4)
    assert np.array_equal(np.asarray(t.clean_tokens), np.asarray(ref.clean_tokens))
    (tmp_path / tasks.TASK_FILE).write_text(json.dumps({"task": "sorting"}))
    with pytest.raises(ValueError, match="unknown task"):
        tasks.task_for_model(tmp_path)
