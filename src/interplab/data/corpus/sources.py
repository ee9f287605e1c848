"""Corpus sources and packing into fixed context windows (see package docstring)."""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from interplab.errors import InterplabError


class Corpus(Protocol):
    """Anything with an id and an iterator of documents (text) in a seeded order."""

    corpus_id: str

    def documents(self, seed: int) -> Iterator[str]: ...


@dataclass
class TextCorpus:
    """A plain-text file (one document) or a folder of `*.txt` files (one document each)."""

    path: Path
    suffixes: tuple[str, ...] = (".txt",)

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser()
        if not self.path.exists():
            raise InterplabError(f"corpus path {str(self.path)!r} does not exist.")
        self.files = (
            [self.path]
            if self.path.is_file()
            else sorted(
                p for p in self.path.rglob("*") if p.is_file() and p.suffix in self.suffixes
            )
        )
        if not self.files:
            raise InterplabError(
                f"corpus folder {str(self.path)!r} holds no files ending in {', '.join(self.suffixes)}."
            )

    @property
    def corpus_id(self) -> str:
        return f"text:{self.path.resolve()}"

    def documents(self, seed: int) -> Iterator[str]:
        order = list(self.files)
        random.Random(seed).shuffle(order)
        for file in order:
            text = file.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text


class PythonSourceCorpus(TextCorpus):
    """Real code on every machine: the `.py` files of the installed Python standard library
    (tests and `site-packages` excluded)."""

    def __init__(self) -> None:
        root = Path(sysconfig.get_paths()["stdlib"])
        self.path = root
        self.suffixes = (".py",)
        self.files = sorted(
            p
            for p in root.rglob("*.py")
            if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
        )
        if not self.files:
            raise InterplabError(f"found no Python files under the standard library at {root}.")

    @property
    def corpus_id(self) -> str:
        import platform

        return f"python-stdlib:{platform.python_version()}"


@dataclass
class TokenFileCorpus:
    """Token ids already computed: a `.npy` file or a `.safetensors` file with one tensor
    (key `tokens`, or its only key), 1-D (a stream) or 2-D (windows)."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path).expanduser()
        if not self.path.is_file():
            raise InterplabError(f"token file {str(self.path)!r} does not exist.")
        if self.path.suffix == ".npy":
            try:
                array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except ValueError as error:
                raise InterplabError(f"{self.path} is not a readable .npy file: {error}") from error
            self.ids = torch.from_numpy(np.array(array, dtype=np.int64))
        elif self.path.suffix == ".safetensors":
            from safetensors.torch import load_file

            try:
                tensors = load_file(self.path)
            except Exception as error:  # safetensors raises its own error types
                raise InterplabError(
                    f"{self.path} is not a readable safetensors file: {error}"
                ) from error
            key = "tokens" if "tokens" in tensors else next(iter(tensors), None)
            if key is None:
                raise InterplabError(f"{self.path} holds no tensors.")
            self.ids = tensors[key].long()
        else:
            raise InterplabError(
                f"token file {str(self.path)!r}: expected a .npy or .safetensors file."
            )
        if self.ids.ndim not in (1, 2) or self.ids.numel() == 0:
            raise InterplabError(
                f"token file {self.path} holds a tensor of shape {tuple(self.ids.shape)}; "
                "expected a non-empty 1-D stream or 2-D [windows, context] array."
            )

    @property
    def corpus_id(self) -> str:
        return f"tokens:{self.path.resolve()}"


@dataclass
class PackedTokens:
    """Token windows ready for a model, with where they came from."""

    ids: Int[Tensor, "window pos"]
    """Token ids; position 0 of each window is BOS unless the corpus was pre-tokenized."""
    corpus_id: str
    """Which corpus produced them."""
    content_hash: str
    """sha256 of the ids (see `interplab.data.corpus.tokens_hash`)."""

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()


def resolve_corpus(spec: Any) -> Any:
    """A corpus from a description: 'storyworld', 'python' / 'python-stdlib' / 'code', a path
    to a text file/folder or a token file, or a corpus object (returned as is)."""
    if not isinstance(spec, str | Path):
        if hasattr(spec, "documents") or isinstance(spec, TokenFileCorpus):
            return spec
        raise InterplabError(f"cannot use a {type(spec).__name__} as a corpus.")
    name = str(spec)
    if name in ("python", "python-stdlib", "code"):
        return PythonSourceCorpus()
    if name == "storyworld" or name.startswith("storyworld:"):
        from interplab.data.corpus import storyworld

        return storyworld.corpus_from_spec(name)
    path = Path(name).expanduser()
    if path.suffix in (".npy", ".safetensors"):
        return TokenFileCorpus(path)
    if path.exists():
        return TextCorpus(path)
    raise InterplabError(
        f"unknown corpus {name!r}: expected 'storyworld', 'python-stdlib', a text file or folder, "
        "or a .npy/.safetensors token file."
    )


def pack(
    corpus: Any,
    tokenizer: Any,
    context_size: int,
    n_windows: int,
    *,
    seed: int = 0,
    prepend_bos: bool = True,
) -> PackedTokens:
    """Pack `corpus` into `n_windows` windows of `context_size` tokens (see package docstring).

    Raises if the corpus runs out before `n_windows` windows are filled."""
    from interplab.data.corpus import tokens_hash

    if context_size < 2:
        raise InterplabError(f"context_size must be at least 2, got {context_size}.")
    if n_windows <= 0:
        raise InterplabError(f"the number of windows must be positive, got {n_windows}.")
    corpus = resolve_corpus(corpus)

    if isinstance(corpus, TokenFileCorpus):
        ids = _windows_from_token_file(corpus.ids, context_size, n_windows, corpus.path)
        return PackedTokens(ids, corpus.corpus_id, tokens_hash(ids))

    if tokenizer is None:
        raise InterplabError("packing a text corpus needs a tokenizer; this model has none.")
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if prepend_bos and bos is None:
        raise InterplabError("the tokenizer has no BOS token; pass prepend_bos=False.")
    body = context_size - 1 if prepend_bos else context_size
    needed = n_windows * body
    stream: list[int] = []
    for document in corpus.documents(seed):
        stream.extend(tokenizer.encode(document, add_special_tokens=False))
        if eos is not None:
            stream.append(eos)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        got = len(stream) // body
        raise InterplabError(
            f"corpus {corpus.corpus_id!r} is too short: it gives {len(stream):,} tokens, enough for "
            f"{got} windows of {context_size}, but {n_windows} were requested."
        )
    body_ids = torch.tensor(stream[:needed], dtype=torch.long).view(n_windows, body)
    if prepend_bos:
        body_ids = torch.cat([torch.full((n_windows, 1), bos, dtype=torch.long), body_ids], dim=1)
    return PackedTokens(body_ids, f"{corpus.corpus_id}#seed={seed}", tokens_hash(body_ids))


def _windows_from_token_file(ids: Tensor, context_size: int, n_windows: int, path: Path) -> Tensor:
    if ids.ndim == 2:
        if ids.shape[1] < context_size:
            raise InterplabError(
                f"token file {path} has windows of {ids.shape[1]} tokens; context_size {context_size} "
                "is longer."
            )
        if ids.shape[0] < n_windows:
            raise InterplabError(
                f"token file {path} has {ids.shape[0]} windows; {n_windows} were requested."
            )
        return ids[:n_windows, :context_size].contiguous()
    needed = n_windows * context_size
    if ids.numel() < needed:
        raise InterplabError(
            f"token file {path} has {ids.numel():,} tokens; {n_windows} windows of {context_size} "
            f"need {needed:,}."
        )
    return ids[:needed].view(n_windows, context_size).contiguous()
