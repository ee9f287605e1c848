"""Corpora as model inputs: text files and folders, token files, Python source, storyworld.

Every corpus becomes fixed-size windows of token ids with `pack(...)`: documents are taken
in a seeded order, each tokenized with the model's tokenizer and followed by EOS, then the
stream is cut into windows of `context_size` tokens, each starting with BOS (so window
position 0 is always BOS). Same corpus + tokenizer + seed -> same windows. The packed
windows carry a content hash (sha256 of the token ids), which activation caches record.
"""

from __future__ import annotations

import hashlib
import importlib
from typing import Any

from interplab.data.corpus.sources import (
    Corpus,
    PackedTokens,
    PythonSourceCorpus,
    TextCorpus,
    TokenFileCorpus,
    pack,
    resolve_corpus,
)

__all__ = [
    "Corpus",
    "PackedTokens",
    "PythonSourceCorpus",
    "TextCorpus",
    "TokenFileCorpus",
    "pack",
    "resolve_corpus",
    "tokens_hash",
]


def tokens_hash(ids: Any) -> str:
    """sha256 of a token tensor's int64 bytes (identifies exactly what a model was fed)."""
    import numpy as np

    array = np.ascontiguousarray(ids.cpu().numpy() if hasattr(ids, "cpu") else ids, dtype=np.int64)
    return hashlib.sha256(array.tobytes()).hexdigest()


def __getattr__(name: str) -> Any:
    # storyworld and tokenizer building are heavier; import on first use
    if name in ("storyworld", "tokenizer"):
        return importlib.import_module(f"interplab.data.corpus.{name}")
    raise AttributeError(f"module 'interplab.data.corpus' has no attribute {name!r}")
