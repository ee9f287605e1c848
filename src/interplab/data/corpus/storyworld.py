"""storyworld: a seeded, streaming generator of English-like text with known phenomena.

Model organisms are trained on this text so that interpretability methods can be checked
against ground truth: every phenomenon below is planted by a known rule, in many surface
forms, and the task datasets (`interplab.data.tasks`) probe the same rules.

A document is a few hundred tokens: a small cast of named people (two to four, each of
known gender) and eight to sixteen "blocks", each drawn from the phenomenon mix, joined
into paragraphs. Phenomena and their surface forms:

- ``ioi`` (indirect object identification): two names, one repeated as the subject, the
  other is the recipient ("When Mary and John went to the store, John gave a drink to Mary.").
  Training text uses 18 fixed frames a quarter of the time and otherwise frames composed from
  parts (20 openers x 25 events x 6 joints x 30 actions, `storyworld_templates.compose_ioi`);
  6 held-out frames share no opener or action with them; ABBA and BABA orders; 30 places,
  59 objects.
- ``induction`` (repeated spans): 60% of the time a span of 3-40 random words (drawn with
  replacement) written two or three times in a row with no cue, as sentences or as one
  run-on stream; otherwise a random word list written down and read out again one
  to three blocks later; a letter/number code typed again later; a chant repeated two or
  three times in a row; an earlier sentence of the document quoted verbatim; a roll call of
  names called out twice.
- ``successor``: runs of days, months, number words (zero..twenty), numbers 0..100 as digits
  and capital letters ("Monday, Tuesday, Wednesday"), countdowns, diaries ("On Monday ...
  On Tuesday ..."), and "The day after Monday is Tuesday" / "After March comes April".
- ``offsets``: arithmetic on the week and the year in words, forwards and backwards
  ("So three days after Friday is Monday.", "If this month is January, then two months ago
  it was November.").
- ``greater_than``: spans of years in one century ("The war lasted from the year 1732 to
  the year 1745.") whose end is always later than the start.
- ``brackets``: nested (), [], {}, double quotes and <b>/<i> tags, up to three deep, closed
  in the right order ("The note said (see [the map {page two}])."). Quotes never nest.
- ``facts``: a fixed knowledge base of twenty fictional countries (capital, language, river,
  national animal; `storyworld_vocab.KB`), stated in 4-7 training phrasings per relation and
  2 held-out ones ("Zorvath is the capital of Quelmar.", "The Blenn river flows through ...").
- ``pronouns``: a name followed by a pronoun of the matching gender (10 training frames,
  3 held-out), and pronoun-continued narrative.
- ``counting``: counted lists with plural agreement ("one apple, two apples, three apples",
  "1 cup, 2 cups, 3 cups").
- ``narrative``: glue sentences about the cast (pronouns refer to the last person named);
  sentences always start with a capital letter after a full stop.

Held-out split: `split="heldout"` text uses only `HELDOUT_NAMES` and the held-out frames of
IOI, pronouns, facts, offsets and greater-than; `split="train"` text never contains any of
them (tested on a large sample). Every word of a held-out frame does occur in training text,
in other frames, so only the phrasing (and, for held-out names, the name) is new.

Determinism: document `i` is a pure function of (VERSION, split, seed, i, mix, block range),
identical across processes and machines, so the stream can be resumed or sharded without
generating the documents before it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from interplab.data.corpus.storyworld_blocks import BLOCKS, Doc, resources
from interplab.errors import InterplabError, unknown

VERSION = "3"
"""Bumped whenever any document for a given config changes."""

PHENOMENA: tuple[str, ...] = (
    "narrative",
    "ioi",
    "induction",
    "successor",
    "offsets",
    "greater_than",
    "brackets",
    "facts",
    "pronouns",
    "counting",
)


def default_mix() -> dict[str, float]:
    """Relative block weights that give each phenomenon a decent share of documents."""
    return {
        "narrative": 1.0,
        "ioi": 1.5,
        "induction": 1.5,
        "successor": 1.0,
        "offsets": 0.6,
        "greater_than": 0.8,
        "brackets": 0.8,
        "facts": 1.0,
        "pronouns": 0.8,
        "counting": 0.5,
    }


@dataclass
class StoryworldConfig:
    """What text the generator writes."""

    seed: int = 0
    """Base seed. Document i depends only on (seed, split, i, mix, blocks)."""
    split: Literal["train", "heldout"] = "train"
    """"train" text never contains held-out names or frames; "heldout" text uses only those."""
    mix: dict[str, float] = field(default_factory=default_mix)
    """Relative weight of each phenomenon per block (keys from PHENOMENA; missing keys weigh 0)."""
    min_blocks: int = 8
    """Fewest phenomenon blocks in one document."""
    max_blocks: int = 16
    """Most phenomenon blocks in one document."""

    def __post_init__(self) -> None:
        if self.split not in ("train", "heldout"):
            raise unknown("split", str(self.split), ("train", "heldout"), show_all=True)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InterplabError(f"seed must be an int, got {self.seed!r}")
        for name, weight in self.mix.items():
            if name not in PHENOMENA:
                raise unknown("phenomenon", name, PHENOMENA, show_all=True)
            if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
                raise InterplabError(
                    f"mix weight for {name!r} must be a finite number >= 0, got {weight!r}"
                )
        if sum(self.mix.values()) <= 0:
            raise InterplabError(f"mix must give some phenomenon a positive weight, got {self.mix}")
        if not 1 <= self.min_blocks <= self.max_blocks:
            raise InterplabError(
                f"need 1 <= min_blocks <= max_blocks, got min_blocks={self.min_blocks}, "
                f"max_blocks={self.max_blocks}"
            )

    @property
    def corpus_id(self) -> str:
        """Stable id of the text this config generates, e.g. "storyworld-v1-train-521382ae-s0"."""
        return corpus_id(self)


def _family_id(config: StoryworldConfig) -> str:
    shape = {
        "mix": {k: float(config.mix.get(k, 0.0)) for k in PHENOMENA},
        "blocks": [config.min_blocks, config.max_blocks],
    }
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:8]
    return f"storyworld-v{VERSION}-{config.split}-{digest}"


def corpus_id(config: StoryworldConfig) -> str:
    """Stable id: generator version, split, a hash of the mix and block range, then the seed."""
    return f"{_family_id(config)}-s{config.seed}"


@dataclass
class StoryworldCorpus:
    """storyworld as an `interplab.data.corpus.Corpus`: `documents(seed)` is the stream of
    `StoryworldConfig(seed=seed)` with this corpus's split, mix and block range (its `seed`
    field is ignored), so the packing seed picks fresh text from the same distribution."""

    config: StoryworldConfig = field(default_factory=StoryworldConfig)
    """Split, mix and block range of the text."""

    @property
    def corpus_id(self) -> str:
        """`corpus_id` of the config without its seed (callers append the packing seed)."""
        return _family_id(self.config)

    def documents(self, seed: int) -> Iterator[str]:
        """Endless stream of documents for `seed`."""
        return generate_documents(replace(self.config, seed=seed))


def corpus_from_spec(spec: str) -> StoryworldCorpus:
    """Parse "storyworld[:split][:phenomenon,phenomenon,...]", e.g. "storyworld:heldout" or
    "storyworld:train:ioi,induction" (only those phenomena, at their default weights)."""
    head, *parts = spec.split(":")
    if head != "storyworld":
        raise InterplabError(f"a storyworld spec starts with 'storyworld', got {spec!r}")
    split, mix = "train", default_mix()
    for part in parts:
        if part in ("train", "heldout"):
            split = part
            continue
        chosen = [p.strip() for p in part.split(",") if p.strip()]
        for name in chosen:
            if name not in PHENOMENA:
                raise unknown("phenomenon", name, PHENOMENA, show_all=True)
        if not chosen:
            raise InterplabError(f"empty part in storyworld spec {spec!r}")
        mix = {k: w for k, w in default_mix().items() if k in chosen}
    return StoryworldCorpus(StoryworldConfig(split=split, mix=mix))  # type: ignore[arg-type]


# ---------------------------------------------------------------- documents
def generate_document(config: StoryworldConfig, index: int) -> str:
    """Document number `index` (>= 0) of the stream that `config` describes."""
    rng = random.Random(f"storyworld-v{VERSION}/{config.split}/{config.seed}/{index}")
    names = [k for k in PHENOMENA if config.mix.get(k, 0.0) > 0]
    weights = [config.mix[k] for k in names]
    doc = Doc(rng, resources(config.split))
    paragraphs: list[list[str]] = [[]]
    n_blocks = rng.randint(config.min_blocks, config.max_blocks)
    for b in range(n_blocks):
        phenomenon = rng.choices(names, weights)[0]
        sentences = BLOCKS[phenomenon](doc)
        for entry in doc.pending:
            entry[0] -= 1
        sentences += [s for wait, s in doc.pending if wait <= 0]
        doc.pending = [e for e in doc.pending if e[0] > 0]
        paragraphs[-1] += sentences
        doc.history += sentences
        if b < n_blocks - 1 and rng.random() < 0.3:
            paragraphs.append([])
    paragraphs[-1] += [s for _, s in doc.pending]
    return "\n".join(" ".join(p) for p in paragraphs if p)


def generate_documents(
    config: StoryworldConfig | None = None, n_docs: int | None = None, *, start: int = 0
) -> Iterator[str]:
    """Yield documents `start, start+1, ...` (`n_docs` of them, or forever when None).

    Same config -> identical text; each document depends only on its index, so shards
    (`start=k * n`) can be generated independently.
    """
    config = config or StoryworldConfig()
    if n_docs is not None and n_docs < 0:
        raise InterplabError(f"n_docs must be >= 0 (or None for an endless stream), got {n_docs}")
    if start < 0:
        raise InterplabError(f"start must be >= 0, got {start}")
    indices = itertools.islice(itertools.count(start), n_docs)  # n_docs=None: endless
    return (generate_document(config, i) for i in indices)


# ASCII version of the tokenizer's pre-tokenization (see tokenizer.PRETOKEN_PATTERN): storyworld
# text is ASCII and the storyworld tokenizer keeps nearly every pre-token whole, so this count
# is within a few percent of the true token count without loading a tokenizer.
_PRETOKEN_ASCII = re.compile(
    r" ?100(?![0-9])| ?[0-9]{1,2}| ?</?[A-Za-z]+>| ?[A-Za-z]+| ?[^\sA-Za-z0-9]|\s+(?!\S)|\s+"
)


def count_tokens_approx(text: str) -> int:
    """Number of pre-tokens in `text`: the storyworld tokenizer's token count, approximately."""
    return sum(1 for _ in _PRETOKEN_ASCII.finditer(text))


@dataclass
class CorpusInfo:
    """What `write_corpus` wrote."""

    path: str
    """The JSONL file: one {"text": document} object per line."""
    corpus_id: str
    """`corpus_id(config)` of the generating config."""
    n_docs: int
    """Documents written."""
    n_tokens_approx: int
    """Sum of `count_tokens_approx` over the documents (excluding separators)."""
    sha256: str
    """Hash of the file's bytes."""
    config: dict
    """The generating `StoryworldConfig` as a dict."""


def write_corpus(
    path: str | os.PathLike,
    config: StoryworldConfig | None = None,
    *,
    n_docs: int | None = None,
    n_tokens: int | None = None,
) -> CorpusInfo:
    """Write documents as JSONL to `path` (atomically) and a `<path>.manifest.json` beside it.

    Give exactly one of `n_docs` (that many documents) or `n_tokens` (documents until the
    approximate token count reaches it).
    """
    config = config or StoryworldConfig()
    if (n_docs is None) == (n_tokens is None):
        raise InterplabError(
            f"give exactly one of n_docs or n_tokens, got n_docs={n_docs}, n_tokens={n_tokens}"
        )
    limit = n_docs if n_docs is not None else n_tokens
    if limit is None or limit <= 0:
        raise InterplabError(f"n_docs / n_tokens must be > 0, got {limit}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    docs = tokens = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for text in generate_documents(config):
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            digest.update(line.encode("utf-8"))
            docs += 1
            tokens += count_tokens_approx(text)
            if (n_docs is not None and docs >= n_docs) or (
                n_tokens is not None and tokens >= n_tokens
            ):
                break
    os.replace(tmp, path)
    info = CorpusInfo(
        str(path), corpus_id(config), docs, tokens, digest.hexdigest(), asdict(config)
    )
    manifest = path.with_name(path.name + ".manifest.json")
    tmp_manifest = manifest.with_name(manifest.name + ".tmp")
    tmp_manifest.write_text(json.dumps(asdict(info), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_manifest, manifest)
    return info


def read_corpus(path: str | os.PathLike) -> Iterator[str]:
    """Yield the documents of a JSONL corpus written by `write_corpus`."""
    path = Path(path)
    if not path.is_file():
        raise InterplabError(f"corpus file {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise InterplabError(
                    f"{path}:{number} is not a storyworld JSONL line ({{'text': ...}}): {error}"
                ) from None
