"""The storyworld tokenizer: small byte-level BPE, GPT-2 style, with whole words and year halves.

Pre-tokenization (`PRETOKEN_PATTERN`) splits text into GPT-2-style pieces: a word with its
leading space (" Mary"), one punctuation mark with its leading space (" (", "."), an HTML-like
tag (" <b>", "</b>"), the number 100, and digits in pairs from the left, so " 1732" is " 17" +
"32" (the greater-than task needs the century and the two-digit year as separate tokens) and
every number 0..100 is one piece. BPE is trained on byte-level pieces (any text encodes, none
is unknown) and merges only inside a piece. Storyworld has a closed lexicon, so with a few
thousand merges every storyworld word becomes one token; `required_words()` (names, days,
months, numbers, year halves, entities, bracket tokens, ...) are guaranteed single tokens.

`<|endoftext|>` (id 0) is the only special token and serves as BOS, EOS and padding.
Encoding adds no special tokens; callers (and `interplab.data.tasks`) prepend BOS themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from interplab.errors import InterplabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOT = "<|endoftext|>"
"""Document separator; also the BOS, EOS and padding token."""

PRETOKEN_PATTERN = (
    r" ?100(?!\p{N})"  # 100 is one token, like 0..99
    r"| ?\p{N}{1,2}"  # digits in pairs from the left: " 1732" -> " 17", "32"
    r"| ?</?[A-Za-z]+>"  # <b>, </b>
    r"| ?\p{L}+"  # a word with its leading space
    r"| ?[^\s\p{L}\p{N}]"  # one punctuation mark with its leading space
    r"|\s+(?!\S)|\s+"  # whitespace runs leave their last space to the next word
)

_REPEATS = 64
"""How often each required word is shown to the BPE trainer; enough to rank its merges early."""


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _required_texts(required: list[str]) -> Iterator[str]:
    for word in required:
        # a newline in front keeps a word without a leading space (e.g. "32") its own piece
        yield (word if word[0].isspace() or not word[0].isalnum() else "\n" + word) * _REPEATS


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    *,
    required: Iterable[str] | None = None,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts` whose `required` strings are single tokens.

    `required` defaults to `storyworld_vocab.required_words()`. Raises InterplabError when
    `vocab_size` is too small to keep every required string whole. The result has fewer than
    `vocab_size` entries when the texts run out of merges (a closed lexicon fully merged).
    """
    if vocab_size < 300:
        raise InterplabError(f"vocab_size must be >= 300 (256 bytes + merges), got {vocab_size}")
    if required is None:
        from interplab.data.corpus.storyworld_vocab import required_words

        required = required_words()
    required = [w for w in required if w]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def corpus() -> Iterator[str]:
        yield from _required_texts(required)
        yield from texts

    tokenizer.train_from_iterator(corpus(), trainer)
    broken = split_words(tokenizer, required)
    if broken:
        shown = "; ".join(f"{w!r} -> {pieces}" for w, pieces in list(broken.items())[:5])
        raise InterplabError(
            f"vocab_size={vocab_size} is too small: {len(broken)} required strings are not single "
            f"tokens ({shown}). Raise vocab_size."
        )
    return tokenizer


def split_words(tokenizer: Tokenizer, words: Iterable[str]) -> dict[str, list[str]]:
    """The words of `words` that `tokenizer` does not encode as one token, with their pieces."""
    out = {}
    for word in words:
        ids = tokenizer.encode(word, add_special_tokens=False).ids
        if len(ids) != 1:
            out[word] = [tokenizer.decode([i]) for i in ids]
    return out


def storyworld_tokenizer(n_docs: int = 2000, vocab_size: int = 4096, seed: int = 0) -> Tokenizer:
    """A tokenizer trained on the first `n_docs` documents of the storyworld train split."""
    from interplab.data.corpus.storyworld import StoryworldConfig, generate_documents

    if n_docs <= 0:
        raise InterplabError(f"n_docs must be > 0, got {n_docs}")
    texts = generate_documents(StoryworldConfig(seed=seed, split="train"), n_docs)
    return build_tokenizer(texts, vocab_size)


def code_tokenizer(n_files: int | None = None, vocab_size: int = 4096, seed: int = 0) -> Tokenizer:
    """A tokenizer trained on the installed Python standard library (`PythonSourceCorpus`),
    or on its first `n_files` files in seeded order. Every bracket and quote is its own
    token (the pre-tokenizer isolates punctuation), which the code tasks rely on."""
    from itertools import islice

    from interplab.data.corpus.sources import PythonSourceCorpus

    if n_files is not None and n_files <= 0:
        raise InterplabError(f"n_files must be > 0 or None, got {n_files}")
    texts = PythonSourceCorpus().documents(seed=seed)
    return build_tokenizer(islice(texts, n_files), vocab_size, required=[])


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> Path:
    """Write `tokenizer.json` (atomically) into directory `path`, or to `path` if it ends in .json."""
    path = Path(path)
    target = path if path.suffix == ".json" else path / "tokenizer.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, target)
    return target


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer from a `tokenizer.json` file or a directory holding one."""
    path = Path(path)
    target = path / "tokenizer.json" if path.is_dir() else path
    if not target.is_file():
        raise InterplabError(f"no tokenizer.json at {str(path)!r}")
    return Tokenizer.from_file(str(target))


def to_hf_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap as a transformers fast tokenizer with BOS = EOS = PAD = UNK = `<|endoftext|>`.

    `clean_up_tokenization_spaces` is off so that `decode(encode(text)) == text`.
    """
    from transformers import PreTrainedTokenizerFast

    if tokenizer.token_to_id(EOT) is None:
        raise InterplabError(f"tokenizer has no {EOT!r} token; build it with build_tokenizer")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        clean_up_tokenization_spaces=False,
    )
