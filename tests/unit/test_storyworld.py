"""storyworld corpus and tokenizer: determinism, held-out separation, planted rules, round trip."""

from __future__ import annotations

import hashlib
import json
import re
import string

import pytest

from interplab.data.corpus import storyworld_templates as T
from interplab.data.corpus import storyworld_vocab as V
from interplab.data.corpus.storyworld import (
    PHENOMENA,
    VERSION,
    StoryworldConfig,
    StoryworldCorpus,
    corpus_from_spec,
    count_tokens_approx,
    generate_document,
    generate_documents,
    read_corpus,
    write_corpus,
)
from interplab.data.corpus.tokenizer import (
    EOT,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    split_words,
    to_hf_tokenizer,
)
from interplab.errors import InterplabError

GOLDEN_SHA256 = "a212248e197832c33bb6c14a101724a75762c522913ee5aa1df71e1e55d3eb2b"
"""sha256 of the first 50 documents of StoryworldConfig(seed=1), joined by newlines."""

ALL_HELDOUT = (
    [t for t in T.IOI + T.PRONOUN + T.GREATER_THAN if t.heldout]
    + [t for family in T.FACTS.values() for t in family if t.heldout]
    + [t for pair in T.OFFSET for t in pair if t.heldout]
)
ALL_TRAIN = (
    [t for t in T.IOI + T.PRONOUN + T.GREATER_THAN if not t.heldout]
    + [t for family in T.FACTS.values() for t in family if not t.heldout]
    + [t for pair in T.OFFSET for t in pair if not t.heldout]
)


@pytest.fixture(scope="module")
def train_text() -> str:
    return "\n".join(generate_documents(StoryworldConfig(seed=3), 2000))


@pytest.fixture(scope="module")
def heldout_text() -> str:
    return "\n".join(generate_documents(StoryworldConfig(seed=3, split="heldout"), 300))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(generate_documents(StoryworldConfig(seed=1), 100))


def only(phenomenon: str, n: int = 150, split: str = "train") -> list[str]:
    """Sentences of documents made of one phenomenon."""
    config = StoryworldConfig(seed=7, split=split, mix={phenomenon: 1.0})  # type: ignore[arg-type]
    return [s for doc in generate_documents(config, n) for s in re.split(r"(?<=\.)\s", doc)]


# ---------------------------------------------------------------- determinism and config
def test_same_seed_same_text_and_documents_are_independent_of_position():
    a = list(generate_documents(StoryworldConfig(seed=11), 40))
    b = list(generate_documents(StoryworldConfig(seed=11), 40))
    assert a == b
    assert list(generate_documents(StoryworldConfig(seed=11), 5, start=30)) == a[30:35]
    assert generate_document(StoryworldConfig(seed=11), 7) == a[7]
    assert a != list(generate_documents(StoryworldConfig(seed=12), 40))
    assert len(set(a)) == len(a)


def test_text_is_pinned_to_the_generator_version():
    # Same seed -> same text in every process and on every machine (this would also catch set
    # iteration order, which changes with PYTHONHASHSEED). If the generator changes on purpose,
    # bump storyworld.VERSION and update the hash.
    text = "\n".join(generate_documents(StoryworldConfig(seed=1), 50))
    assert (VERSION, hashlib.sha256(text.encode()).hexdigest()) == (VERSION, GOLDEN_SHA256)


def test_corpus_id_names_version_split_seed_and_mix():
    config = StoryworldConfig(seed=4)
    assert re.fullmatch(r"storyworld-v\d+-train-[0-9a-f]{8}-s4", config.corpus_id)
    assert config.corpus_id == StoryworldConfig(seed=4).corpus_id
    assert StoryworldConfig(seed=4, split="heldout").corpus_id != config.corpus_id
    assert StoryworldConfig(seed=4, mix={"ioi": 1.0}).corpus_id != config.corpus_id


def test_corpus_specs():
    corpus = corpus_from_spec("storyworld")
    assert isinstance(corpus, StoryworldCorpus) and corpus.config.split == "train"
    assert StoryworldConfig(seed=3).corpus_id.startswith(corpus.corpus_id + "-")
    docs = corpus.documents(3)
    assert [next(docs) for _ in range(3)] == list(generate_documents(StoryworldConfig(seed=3), 3))
    held = corpus_from_spec("storyworld:heldout:ioi,facts")
    assert held.config.split == "heldout" and set(held.config.mix) == {"ioi", "facts"}
    with pytest.raises(InterplabError, match="unknown phenomenon 'iox'"):
        corpus_from_spec("storyworld:iox")
    with pytest.raises(InterplabError, match="starts with 'storyworld'"):
        corpus_from_spec("storyland")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mix": {"iol": 1.0}}, "unknown phenomenon 'iol'"),
        ({"mix": {"ioi": -1.0}}, "mix weight for 'ioi'"),
        ({"mix": {"ioi": 0.0}}, "positive weight"),
        ({"split": "test"}, "unknown split 'test'"),
        ({"min_blocks": 5, "max_blocks": 2}, "min_blocks <= max_blocks"),
        ({"seed": 1.5}, "seed must be an int"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(InterplabError, match=match):
        StoryworldConfig(**kwargs)


def test_generate_documents_rejects_negative_counts():
    with pytest.raises(InterplabError, match="n_docs must be >= 0"):
        generate_documents(StoryworldConfig(), -1)
    with pytest.raises(InterplabError, match="start must be >= 0"):
        generate_documents(StoryworldConfig(), 1, start=-2)


def test_documents_are_a_few_hundred_tokens_and_mix_every_phenomenon():
    docs = list(generate_documents(StoryworldConfig(seed=3), 300))
    lengths = [count_tokens_approx(d) for d in docs]
    assert 150 < sum(lengths) / len(lengths) < 400
    # each phenomenon leaves a fingerprint in a good share of documents
    ioi_frames = [t.regex() for t in T.for_split(T.IOI, "train")]
    successor_pairs = [
        rf"\b{a}(?:, | and | is | comes ){b}\b"
        for items in (V.DAYS, V.MONTHS, V.NUMBER_WORDS, V.LETTERS)
        for a, b in zip(items[:-1], items[1:], strict=True)
    ]
    fingerprints = {
        "ioi": lambda d: any(p.search(d) for p in ioi_frames),
        "successor": re.compile("|".join(successor_pairs)).search,
        "greater_than": re.compile(r"\b1\d\d\d\b.*\b1\d\d\d\b").search,
        "brackets": re.compile(r" [(\[{]\w").search,
        "facts": re.compile("|".join(c.name for c in V.KB)).search,
        "counting": re.compile(r"\btwo (\w+), three \1|\b2 (\w+), 3 \2").search,
    }
    for name, found in fingerprints.items():
        share = sum(bool(found(d)) for d in docs) / len(docs)
        assert share > 0.3, (name, share)
    assert set(PHENOMENA) >= set(fingerprints)


# ---------------------------------------------------------------- held-out separation
def test_train_text_never_contains_heldout_names_or_frames(train_text):
    names = re.compile(r"\b(?:" + "|".join(V.HELDOUT_NAMES) + r")\b")
    assert names.search(train_text) is None
    for template in ALL_HELDOUT:
        assert template.regex().search(train_text) is None, template.text
    # the check can see a frame when it is there: every training frame occurs
    for template in ALL_TRAIN:
        assert template.regex().search(train_text), template.text


def test_heldout_text_uses_only_heldout_names_and_frames(heldout_text):
    train_names = re.compile(r"\b(?:" + "|".join(V.TRAIN_NAMES) + r")\b")
    assert train_names.search(heldout_text) is None
    for template in ALL_TRAIN:
        assert template.regex().search(heldout_text) is None, template.text
    for template in ALL_HELDOUT:
        assert template.regex().search(heldout_text), template.text


def test_every_word_of_a_heldout_frame_occurs_in_training_text(train_text):
    words = set(re.findall(r"[A-Za-z]+", train_text))
    for template in ALL_HELDOUT:
        literal = " ".join(lit for lit, _, _, _ in string.Formatter().parse(template.text))
        missing = [w for w in re.findall(r"[A-Za-z]+", literal) if w not in words]
        assert not missing, (template.text, missing)


def test_name_pools_are_disjoint_and_gendered():
    assert not set(V.TRAIN_NAMES) & set(V.HELDOUT_NAMES)
    assert set(V.GENDER) == set(V.TRAIN_NAMES) | set(V.HELDOUT_NAMES)
    assert len(T.for_split(T.IOI, "train")) >= 15


# ---------------------------------------------------------------- planted rules hold
def _matches(templates, sentences):
    for sentence in sentences:
        for template in templates:
            m = template.regex().fullmatch(sentence)
            if m:
                yield template, m


def _alternatives(parts):
    """A regex alternation of template parts, their slots matching any filler."""
    slot = re.compile(r"\\\{(\w+)\\\}")
    pattern = {"a_obj": r"an? [\w']+"}
    return "|".join(slot.sub(lambda m: pattern.get(m[1], r"[\w']+"), re.escape(p)) for p in parts)


def _composed_ioi():
    """Any single-sentence frame `compose_ioi` can build, slots as named groups."""
    joints = [j for j in T.IOI_JOINTS if "." not in j]
    return re.compile(
        rf"(?:{_alternatives(T.IOI_OPENERS)}) (?P<A>\w+) and (?P<B>\w+) "
        rf"(?:{_alternatives(T.IOI_EVENTS)})(?:{_alternatives(joints)})"
        rf"(?P<S>\w+) (?:{_alternatives(T.IOI_ACTIONS)}) (?P<IO>\w+)\."
    )


def test_ioi_sentences_repeat_the_subject_and_end_on_the_other_name():
    sentences = only("ioi", 40)
    found = list(_matches(T.for_split(T.IOI, "train"), sentences))
    assert len(found) > 20
    composed = [m for m in map(_composed_ioi().fullmatch, sentences) if m]
    assert len(composed) > 100
    found += [(None, m) for m in composed]
    orders = set()
    for _, m in found:
        assert {m["A"], m["B"]} == {m["S"], m["IO"]} and m["S"] != m["IO"]
        orders.add("ABBA" if m["A"] == m["IO"] else "BABA")
    assert orders == {"ABBA", "BABA"}


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_pronouns_agree_with_the_gender_of_the_name(split):
    found = list(_matches(T.for_split(T.PRONOUN, split), only("pronouns", 60, split)))
    assert len(found) > 50
    for _, m in found:
        assert m["pron"] == {"f": "she", "m": "he"}[V.GENDER[m["name"]]]


def test_fact_sentences_agree_with_the_knowledge_base():
    by_name = {c.name: c for c in V.KB}
    sentences = only("facts", 40)
    count = 0
    for relation, family in T.FACTS.items():
        for _, m in _matches(T.for_split(family, "train"), sentences):
            assert getattr(by_name[m["country"]], relation) == m["x"]
            count += 1
    assert count > 100


def test_offset_sentences_do_the_arithmetic_right():
    count = 0
    for template, m in _matches([t for p in T.OFFSET for t in p], only("offsets", 60)):
        items = V.DAYS if m["d"] in V.DAYS else V.MONTHS
        steps = V.NUMBER_WORDS.index(m["n"])
        forward = any(template is pair[0] for pair in T.OFFSET)
        expected = items[(items.index(m["d"]) + (steps if forward else -steps)) % len(items)]
        assert m["a"] == expected, m.group()
        assert m["unit"] == ("day" if items is V.DAYS else "month") + ("s" if steps > 1 else "")
        count += 1
    assert count > 100


def test_year_spans_end_later_in_the_same_century():
    count = 0
    for template, m in _matches(T.for_split(T.GREATER_THAN, "train"), only("greater_than", 60)):
        y1, y2 = int(m["y1"]), int(m["y2"])
        assert y1 // 100 == y2 // 100 and y2 > y1, template.text
        count += 1
    assert count > 100


def test_brackets_close_in_the_order_they_opened():
    closers = {c: o for o, c in V.BRACKETS.values() if o != c}
    for sentence in only("brackets", 60):
        stack: list[str] = []
        for token in re.findall(r"</?[a-z]>|[(\[{)\]}\"]", sentence):
            if token == '"' and '"' in stack:
                assert stack.pop() == '"', sentence
            elif token in closers:
                assert stack and stack.pop() == closers[token], sentence
            else:
                stack.append(token)
        assert not stack, sentence


def test_successor_runs_are_consecutive():
    runs = 0
    for sentence in only("successor", 80):
        for items in (V.DAYS, V.MONTHS):
            pattern = r"\b(?:" + "|".join(items) + r")(?:(?:, | and )(?:" + "|".join(items) + "))+"
            for run in re.finditer(pattern, sentence):
                words = re.split(r", | and ", run.group())
                steps = {
                    (items.index(b) - items.index(a)) % len(items)
                    for a, b in zip(words[:-1], words[1:], strict=True)
                }
                assert steps == {1}, run.group()
                runs += 1
    assert runs > 40


def test_counted_lists_agree_in_number():
    for sentence in only("counting", 40):
        for count, noun in re.findall(r"\b(\w+) (\w+)(?=,| and|\.)", sentence):
            if count in V.NUMBER_WORDS[1:] or count.isdigit():
                plural = count not in ("one", "1")
                nouns = {o.plural if plural else o.singular for o in V.OBJECTS}
                assert noun in nouns, sentence


def test_induction_spans_reappear_later_in_the_document():
    docs = list(generate_documents(StoryworldConfig(seed=2, mix={"induction": 1.0}), 100))
    lists = [
        (m.group(1), doc) for doc in docs for m in re.finditer(r"strange list: ([^.]+)\.", doc)
    ]
    assert len(lists) > 20
    for words, doc in lists:
        assert f"read the list again: {words}." in doc


# ---------------------------------------------------------------- files
def test_write_and_read_corpus_round_trip(tmp_path):
    config = StoryworldConfig(seed=5)
    info = write_corpus(tmp_path / "c.jsonl", config, n_docs=20)
    assert list(read_corpus(info.path)) == list(generate_documents(config, 20))
    manifest = json.loads((tmp_path / "c.jsonl.manifest.json").read_text())
    assert manifest["corpus_id"] == config.corpus_id and manifest["n_docs"] == 20
    by_tokens = write_corpus(tmp_path / "t.jsonl", config, n_tokens=1000)
    lengths = [count_tokens_approx(d) for d in read_corpus(by_tokens.path)]
    assert sum(lengths) >= 1000 > sum(lengths[:-1]) and by_tokens.n_tokens_approx == sum(lengths)


def test_corpus_file_errors(tmp_path):
    with pytest.raises(InterplabError, match="exactly one of n_docs or n_tokens"):
        write_corpus(tmp_path / "x.jsonl", n_docs=3, n_tokens=3)
    with pytest.raises(InterplabError, match="must be > 0"):
        write_corpus(tmp_path / "x.jsonl", n_docs=0)
    with pytest.raises(InterplabError, match="does not exist"):
        next(read_corpus(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(InterplabError, match="bad.jsonl:1"):
        next(read_corpus(tmp_path / "bad.jsonl"))


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_corpus_text(tokenizer):
    hf = to_hf_tokenizer(tokenizer)
    docs = list(generate_documents(StoryworldConfig(seed=9), 100))
    docs += list(generate_documents(StoryworldConfig(seed=9, split="heldout"), 30))
    encoded = tokenizer.encode_batch(docs)
    assert tokenizer.decode_batch([e.ids for e in encoded]) == docs
    for doc, enc in zip(docs, encoded, strict=True):
        assert len(enc.ids) >= count_tokens_approx(doc)  # tokens never cross a pre-token
    for doc in docs[::10]:
        assert hf.decode(hf.encode(doc)) == doc
    joined = EOT.join(docs[:3])
    assert tokenizer.decode(tokenizer.encode(joined).ids, skip_special_tokens=False) == joined
    assert tokenizer.encode("café 漢字 ~").ids  # any text encodes (byte level)


def test_required_words_are_single_tokens(tokenizer):
    words = (
        [" " + n for n in V.TRAIN_NAMES + V.HELDOUT_NAMES + V.DAYS + V.MONTHS]
        + [f" {i}" for i in range(101)]
        + [f"{i:02d}" for i in range(100)]
        + [" " + c.capital for c in V.KB]
    )
    assert split_words(tokenizer, words) == {}
    assert split_words(tokenizer, [" Xylophonequest"])  # and an unknown word is not


def test_years_split_into_century_and_two_digits(tokenizer):
    def pieces(text):
        return [tokenizer.decode([i]) for i in tokenizer.encode(text).ids]

    assert pieces(" 1732") == [" 17", "32"]
    assert pieces("to the year 1805") == ["to", " the", " year", " 18", "05"]
    assert pieces(" 100 days") == [" 100", " days"]
    assert pieces("(see [the map]).") == ["(", "see", " [", "the", " map", "]", ")", "."]
    assert pieces(" <b>old</b>") == [" <b>", "old", "</b>"]


def test_hf_wrapper_and_save_load(tokenizer, tmp_path):
    hf = to_hf_tokenizer(tokenizer)
    eot = tokenizer.token_to_id(EOT)
    assert eot == 0 and hf.bos_token_id == hf.eos_token_id == hf.pad_token_id == eot
    assert hf.encode("When Mary") == tokenizer.encode("When Mary").ids  # no BOS added
    path = save_tokenizer(tokenizer, tmp_path / "tok")
    assert path.name == "tokenizer.json"
    loaded = load_tokenizer(tmp_path / "tok")
    text = generate_document(StoryworldConfig(), 0)
    assert loaded.encode(text).ids == tokenizer.encode(text).ids
    with pytest.raises(InterplabError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")


def test_tokenizer_errors():
    texts = ["a small text about Mary and John"] * 3
    with pytest.raises(InterplabError, match="vocab_size must be >= 300"):
        build_tokenizer(texts, 100)
    with pytest.raises(InterplabError, match="too small: .* required strings"):
        build_tokenizer(texts, 300)


def test_composed_ioi_frames_share_no_opener_or_action_with_heldout_frames():
    for template in T.for_split(T.IOI, "heldout"):
        assert not any(template.text.startswith(o + " {A}") for o in T.IOI_OPENERS), template
        action = template.text.split("{S} ")[-1].removesuffix(" {IO}.")
        assert action not in T.IOI_ACTIONS, template
