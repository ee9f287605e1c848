"""Task datasets: aligned clean/corrupted prompts, correct single-token answers, errors."""

from __future__ import annotations

import re

import pytest
import torch

from interplab.data import tasks
from interplab.data.corpus import storyworld_templates as T
from interplab.data.corpus import storyworld_vocab as V
from interplab.data.corpus.storyworld import StoryworldConfig, generate_documents
from interplab.data.corpus.tokenizer import build_tokenizer, to_hf_tokenizer
from interplab.data.tasks import TASKS, TaskDataset, get_task, repeated_tokens
from interplab.errors import InterplabError

N = 24


@pytest.fixture(scope="module")
def raw_tokenizer():
    return build_tokenizer(generate_documents(StoryworldConfig(seed=1), 100))


@pytest.fixture(scope="module")
def tok(raw_tokenizer):
    return to_hf_tokenizer(raw_tokenizer)


CODE_TASKS = ("code_brackets", "code_quotes")
CODE = [
    "def f(self, x):\n    return d['key'] + g(x, [1, 2], {3: 4}) + e[\"a\"]\n",
    "    if x == 'a':\n        y = (x, [x]) or {x} or \"b\"\n",
]


@pytest.fixture(scope="module")
def code_tok():
    spaced = [" (", " [", " {", " '", ' "']
    return to_hf_tokenizer(build_tokenizer(CODE * 20, 400, required=spaced))


@pytest.fixture(scope="module")
def toks(tok, code_tok):
    """Task name -> the tokenizer it is built with (code tasks need a code tokenizer)."""
    return {name: code_tok if name in CODE_TASKS else tok for name in TASKS}


@pytest.fixture(scope="module")
def datasets(toks):
    return {
        (name, split): fn(toks[name], n=N, seed=0, split=split)
        for name, fn in TASKS.items()
        for split in ("train", "heldout")
    }


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids])


@pytest.mark.parametrize("split", ["train", "heldout"])
@pytest.mark.parametrize("name", sorted(TASKS))
def test_prompts_align_and_decode(name, split, datasets, toks):
    tok = toks[name]
    ds = datasets[(name, split)]
    assert isinstance(ds, TaskDataset) and len(ds) == N and ds.name == name
    assert ds.clean_tokens.shape == ds.corrupted_tokens.shape
    assert (ds.clean_tokens[:, 0] == tok.bos_token_id).all()
    for i in range(N):
        # answer_pos is the last real token (induction: the one before it); then padding
        end = int(ds.answer_pos[i]) + 1 + (name == "induction")
        assert (ds.clean_tokens[i, end:] == ds.pad_token_id).all()
        assert (ds.corrupted_tokens[i, end:] == ds.pad_token_id).all()
        if name != "induction":  # induction's prompt holds its scored tokens
            assert decode(tok, ds.clean_tokens[i, 1:end]) == ds.prompts[i]
            assert decode(tok, ds.corrupted_tokens[i, 1:end]) == ds.corrupted_prompts[i]
        assert ds.prompts[i] != ds.corrupted_prompts[i]
    assert (ds.answers != ds.wrong_answers.reshape(N, -1)[:, 0]).all()
    for ids in (ds.answers, ds.wrong_answers.flatten()):  # answers are single tokens
        assert all(tok.encode(decode(tok, [i])) == [int(i)] for i in ids)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_seeded_and_deterministic(name, toks, datasets):
    tok = toks[name]
    again = TASKS[name](tok, n=N, seed=0, split="heldout")
    assert again.prompts == datasets[(name, "heldout")].prompts
    assert torch.equal(again.clean_tokens, datasets[(name, "heldout")].clean_tokens)
    assert TASKS[name](tok, n=N, seed=1, split="heldout").prompts != again.prompts


def test_ioi_answer_is_the_name_that_is_not_repeated(datasets, tok):
    for split in ("train", "heldout"):
        ds = datasets[("ioi", split)]
        frames = [t.regex() for t in T.for_split(T.IOI, split)]
        for i, meta in enumerate(ds.metadata):
            names = re.findall(r"\b[A-Z][a-z]+\b", ds.prompts[i])
            once = [n for n in V.TRAIN_NAMES if names.count(n) == 1]
            twice = [n for n in V.TRAIN_NAMES if names.count(n) == 2]
            assert once == [meta["io"]] and twice == [meta["s"]]
            assert decode(tok, [ds.answers[i]]) == " " + meta["io"]
            assert decode(tok, [ds.wrong_answers[i]]) == " " + meta["s"]
            row = ds.clean_tokens[i]
            assert decode(tok, [row[meta["io_pos"]]]) == " " + meta["io"]
            assert decode(tok, [row[meta["s1_pos"]]]) == decode(tok, [row[meta["s2_pos"]]])
            assert meta["s1_pos"] < meta["s2_pos"] < meta["end_pos"] == ds.answer_pos[i]
            # ABC corruption: three fresh, distinct names in the same places
            fresh = re.findall(r"\b[A-Z][a-z]+\b", ds.corrupted_prompts[i])
            fresh = [n for n in fresh if n in V.GENDER]
            assert fresh == meta["corrupted_names"] and len(set(fresh)) == 3
            assert not {meta["io"], meta["s"]} & set(fresh)
            # the prompt is the frame of its split cut before the IO
            assert any(f.fullmatch(ds.prompts[i] + " " + meta["io"] + ".") for f in frames)
        assert {m["order"] for m in ds.metadata} == {"ABBA", "BABA"}


def test_successor_answer_is_the_next_item(tok):
    for kind, items in [
        ("days", V.DAYS),
        ("months", V.MONTHS),
        ("numbers", V.NUMBER_WORDS),
        ("letters", V.LETTERS),
        ("digits", [str(i) for i in range(101)]),
    ]:
        ds = tasks.successor(tok, n=N, kind=kind, length=3)
        assert (
            len(set(ds.clean_tokens.shape[1:])) == 1 and (ds.answer_pos == ds.answer_pos[0]).all()
        )
        for i in range(N):
            last = ds.prompts[i].rstrip(",").split(" ")[-1]
            wraps = kind in ("days", "months")
            index = list(items).index(last) + 1
            expected = items[index % len(items)] if wraps else items[index]
            assert decode(tok, [ds.answers[i]]) == " " + expected
            corrupted_last = ds.corrupted_prompts[i].rstrip(",").split(" ")[-1]
            assert corrupted_last != last


@pytest.mark.parametrize("task, items", [("day_offset", V.DAYS), ("month_offset", V.MONTHS)])
def test_offsets_compute_the_right_day(task, items, tok):
    for split in ("train", "heldout"):
        ds = get_task(task, tok, n=N, split=split)
        for i, meta in enumerate(ds.metadata):
            words = re.findall(r"[A-Za-z]+", ds.prompts[i])
            start = next(w for w in words if w in items)
            steps = next(V.NUMBER_WORDS.index(w) for w in words if w in V.NUMBER_WORDS)
            sign = 1 if meta["direction"] == "after" else -1
            expected = items[(items.index(start) + sign * steps) % len(items)]
            assert decode(tok, [ds.answers[i]]) == " " + expected
            assert decode(tok, [ds.clean_tokens[i, meta["start_pos"]]]) == " " + start


def test_greater_than_masks_later_years(datasets, tok):
    ds = datasets[("greater_than", "heldout")]
    assert [decode(tok, [i]) for i in ds.candidate_ids] == [f"{y:02d}" for y in range(100)]
    for i, meta in enumerate(ds.metadata):
        century, yy = re.search(r"\b(1\d)(\d\d)\b", ds.prompts[i]).groups()
        assert ds.prompts[i].endswith(" " + century)
        assert ds.valid_mask[i].tolist() == [y > int(yy) for y in range(100)]
        assert ds.valid_mask[i, int(decode(tok, [ds.answers[i]]))]
        assert decode(tok, [ds.wrong_answers[i]]) == yy
        assert (
            f" {century}01," in ds.corrupted_prompts[i]
            or f" {century}01 " in ds.corrupted_prompts[i]
        )
        assert (
            decode(tok, ds.clean_tokens[i, meta["yy_pos"] - 1 : meta["yy_pos"] + 1])
            == f" {century}{yy}"
        )


def test_brackets_answer_closes_the_innermost_bracket(datasets, tok):
    closer_of = dict(V.BRACKETS.values())
    for i in range(N):
        ds = datasets[("brackets", "heldout")]
        stack = re.findall(r" (<[a-z]>|[(\[{\"])", ds.prompts[i])
        assert decode(tok, [ds.answers[i]]) == closer_of[stack[-1]]
        wrong = {decode(tok, [w]) for w in ds.wrong_answers[i]}
        assert wrong == set(closer_of.values()) - {closer_of[stack[-1]]}
        assert ds.wrong_answers.shape == (N, len(V.BRACKETS) - 1)
    deep = tasks.brackets(tok, n=N, depth=3, kinds=["paren", "quote"])
    for meta in deep.metadata:
        assert meta["kinds"].count("quote") <= 1


def test_code_brackets_answer_closes_the_innermost_bracket(datasets, code_tok):
    closer_of = {"(": ")", "[": "]", "{": "}"}
    for split in ("train", "heldout"):
        ds = datasets[("code_brackets", split)]
        for i in range(N):
            prompt, corrupted = ds.prompts[i], ds.corrupted_prompts[i]
            stack = []  # the open brackets of the scored line, by parsing it
            for char in prompt.split("\n")[-1]:
                if char in closer_of:
                    stack.append(char)
            assert len(stack) == 2 and decode(code_tok, [ds.answers[i]]) == closer_of[stack[-1]]
            wrong = {decode(code_tok, [w]) for w in ds.wrong_answers[i]}
            assert wrong == set(closer_of.values()) - {closer_of[stack[-1]]}
            # only the innermost opener changes, and the answer changes with it
            diff = [j for j, (a, b) in enumerate(zip(prompt, corrupted, strict=True)) if a != b]
            assert len(diff) == 1 and prompt[diff[0]] == stack[-1]
            assert corrupted[diff[0]] in closer_of and corrupted[diff[0]] != stack[-1]
            # each opener sits at the position the metadata claims
            for k, pos in zip(ds.metadata[i]["kinds"], ds.metadata[i]["open_pos"], strict=True):
                opener = {"paren": "(", "square": "[", "curly": "{"}[k]
                assert decode(code_tok, [ds.clean_tokens[i, pos]]).strip() == opener
            # the line is valid Python once its brackets are closed
            line = prompt.split("\n")[-1].strip()
            closing = "".join(closer_of[c] for c in reversed(stack))
            compile(f"def _():\n    {line}{closing}\n", "<task>", "exec")
    deep = tasks.code_brackets(code_tok, n=N, depth=4)
    assert all(len(meta["kinds"]) == 4 for meta in deep.metadata)
    with pytest.raises(InterplabError, match="depth must be an int in"):
        tasks.code_brackets(code_tok, depth=0)


def test_code_quotes_answer_repeats_the_opening_quote(datasets, code_tok):
    ds = datasets[("code_quotes", "heldout")]
    for i in range(N):
        quote = decode(code_tok, [ds.answers[i]])
        assert quote in ("'", '"') and decode(code_tok, [ds.wrong_answers[i]]) != quote
        pos = ds.metadata[i]["open_pos"]
        assert decode(code_tok, [ds.clean_tokens[i, pos]]).strip() == quote
        line = ds.prompts[i].split("\n")[-1].strip()
        closing = "".join({"(": ")", "[": "]"}.get(c, "") for c in line)
        colon = ": pass" if line.startswith("if") else ""
        compile(f"def _():\n    {line}{quote}{closing}{colon}\n", "<task>", "exec")
        assert ds.corrupted_prompts[i].count(quote) == ds.prompts[i].count(quote) - 1
    assert {m["quote"] for m in ds.metadata} == {"single", "double"}


def test_code_tasks_name_the_token_a_storyworld_tokenizer_splits(tok):
    with pytest.raises(InterplabError, match=r"code_tokenizer\(\)"):
        tasks.code_quotes(tok, n=4)


def test_facts_answers_agree_with_the_knowledge_base(datasets, tok):
    entities = {
        rel: {getattr(c, rel): c for c in V.KB}
        for rel in ("capital", "language", "river", "animal")
    }
    countries = {c.name: c for c in V.KB}
    for split in ("train", "heldout"):
        ds = datasets[("facts", split)]
        for i, meta in enumerate(ds.metadata):
            answer = decode(tok, [ds.answers[i]]).strip()
            words = re.findall(r"[A-Za-z]+", ds.prompts[i])
            country = next((countries[w] for w in words if w in countries), None)
            if country is not None:  # asked for an attribute of a named country
                assert getattr(country, meta["relation"]) == answer
            else:  # asked for the country of a named attribute
                subject = next(w for w in words if w in entities[meta["relation"]])
                assert entities[meta["relation"]][subject].name == answer
        held = {t.prefix("x") for f in T.FACTS.values() for t in f if t.heldout}
        held |= {t.prefix("country") for f in T.FACTS.values() for t in f if t.heldout}
        assert all((m["template_text"] in held) == (split == "heldout") for m in ds.metadata)


def test_pronouns_match_gender_and_flip_when_corrupted(datasets, tok):
    ds = datasets[("pronouns", "heldout")]
    for i, meta in enumerate(ds.metadata):
        name = next(w for w in re.findall(r"[A-Z][a-z]+", ds.prompts[i]) if w in V.GENDER)
        expected = " she" if V.GENDER[name] == "f" else " he"
        assert decode(tok, [ds.answers[i]]) == expected
        corrupted = next(
            w for w in re.findall(r"[A-Z][a-z]+", ds.corrupted_prompts[i]) if w in V.GENDER
        )
        assert V.GENDER[corrupted] != V.GENDER[name]
        assert decode(tok, [ds.clean_tokens[i, meta["name_pos"]]]) == " " + name


def test_induction_second_half_repeats_the_first(datasets, tok):
    ds = datasets[("induction", "heldout")]
    L = ds.metadata[0]["seq_len"]
    first, second = ds.clean_tokens[:, 1 : 1 + L], ds.clean_tokens[:, 1 + L :]
    assert torch.equal(first, second)
    corrupted = ds.corrupted_tokens[:, 1 + L :]
    assert (corrupted != second).all()  # no word of the fresh half repeats the first
    assert torch.equal(ds.answers, ds.clean_tokens[:, -1])
    assert (ds.answer_pos == 2 * L - 1).all()


def test_repeated_tokens(tok):
    x = repeated_tokens(tok, n=5, seq_len=7, seed=3)
    assert x.shape == (5, 15) and (x[:, 0] == tok.bos_token_id).all()
    assert torch.equal(x[:, 1:8], x[:, 8:])
    assert not (x[:, 1:] == tok.bos_token_id).any()
    assert torch.equal(x, repeated_tokens(tok, n=5, seq_len=7, seed=3))
    y = repeated_tokens(100, n=4, seq_len=3, seed=0, prepend_bos=False)
    assert y.shape == (4, 6) and int(y.max()) < 100
    with pytest.raises(InterplabError, match="needs bos_token_id"):
        repeated_tokens(100, n=4, seq_len=3)
    with pytest.raises(InterplabError, match="seq_len must be a positive int"):
        repeated_tokens(tok, n=4, seq_len=0)


def test_prepend_bos_false_shifts_every_position_by_one(tok):
    with_bos = tasks.ioi(tok, n=8, seed=2)
    without = tasks.ioi(tok, n=8, seed=2, prepend_bos=False)
    assert with_bos.prompts == without.prompts
    assert torch.equal(with_bos.answer_pos - 1, without.answer_pos)
    assert [m["io_pos"] - 1 for m in with_bos.metadata] == [m["io_pos"] for m in without.metadata]


def test_one_template_gives_equal_lengths_and_select_trims(tok):
    ds = tasks.ioi(tok, n=N, template=2, split="train")
    assert (ds.answer_pos == ds.answer_pos[0]).all()
    assert {m["template"] for m in ds.metadata} == {2}
    mixed = tasks.ioi(tok, n=N, split="train")
    keep = [
        i for i, m in enumerate(mixed.metadata) if m["template"] == mixed.metadata[0]["template"]
    ]
    sub = mixed.select(keep)
    assert len(sub) == len(keep) and sub.clean_tokens.shape[1] == int(sub.answer_pos.max()) + 1
    assert sub.prompts == [mixed.prompts[i] for i in keep]
    assert sub.to("cpu").clean_tokens.device.type == "cpu"


def test_raw_tokenizers_and_models_are_accepted(raw_tokenizer, tok):
    class Model:
        tokenizer = tok

    a = tasks.facts(raw_tokenizer, n=8)
    b = tasks.facts(Model(), n=8)
    assert torch.equal(a.clean_tokens, b.clean_tokens) and torch.equal(a.answers, b.answers)


# ---------------------------------------------------------------- errors
def test_unknown_task_and_options(tok):
    with pytest.raises(InterplabError, match="unknown task 'iio'"):
        get_task("iio", tok)
    with pytest.raises(InterplabError, match="unknown successor kind 'weeks'"):
        tasks.successor(tok, kind="weeks")
    with pytest.raises(InterplabError, match="unknown split 'test'"):
        tasks.ioi(tok, split="test")
    with pytest.raises(InterplabError, match="unknown relation"):
        tasks.facts(tok, relation="currency")
    with pytest.raises(InterplabError, match="unknown bracket kind"):
        tasks.brackets(tok, kinds=["paren", "angle"])
    with pytest.raises(InterplabError, match="template must be an index"):
        tasks.ioi(tok, split="heldout", template=99)
    with pytest.raises(InterplabError, match="unknown direction"):
        tasks.day_offset(tok, direction="sideways")


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("n", [0, -3])
def test_n_must_be_positive(name, n, toks):
    with pytest.raises(InterplabError, match="n must be a positive int"):
        get_task(name, toks[name], n=n)


def test_a_tokenizer_that_splits_a_needed_word_is_rejected():
    small = build_tokenizer(["When Mary and John went to the store."] * 5, 300, required=[])
    with pytest.raises(
        InterplabError,
        match=r"needs the name ' \w+' as a single token, but this tokenizer splits it into \[",
    ):
        tasks.ioi(small, n=4)
    with pytest.raises(InterplabError, match="single token"):
        tasks.greater_than(small, n=4)


def test_a_tokenizer_without_bos_needs_prepend_bos_false(tok):
    class Bare:
        def encode(self, text):
            return tok.encode(text)

    with pytest.raises(InterplabError, match="no BOS"):
        tasks.pronouns(Bare(), n=4)
    ds = tasks.pronouns(Bare(), n=4, prepend_bos=False)
    assert not ds.prepend_bos and ds.clean_tokens.shape[0] == 4


def test_task_dataset_validates_shapes():
    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(InterplabError, match="corrupted_tokens"):
        TaskDataset("x", ["a", "b"], ["a", "b"], t, t[:, :2], t[:, 0], t[:, 0], t[:, 0], [{}, {}])
    with pytest.raises(InterplabError, match="answer_pos points past"):
        TaskDataset("x", ["a", "b"], ["a", "b"], t, t, t[:, 0], t[:, 0], t[:, 0] + 3, [{}, {}])
