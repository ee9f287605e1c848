"""Tokenization with the BOS convention stated once.

interplab's convention: a prompt is tokenized with exactly one BOS token in front
(`prepend_bos=True`), whether or not the tokenizer adds one itself; continuation text is
tokenized with `prepend_bos=False`. Batches of unequal length are padded on the right by
default (`padding_side="right"`), so position i is the i-th token of every prompt;
pass `padding_side="left"` to align the last tokens instead. The pad positions get the
tokenizer's pad token; `tokenize` also returns the attention mask and real lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from interplab.errors import InterplabError


@dataclass
class Tokens:
    """Token ids of a batch of prompts, with what padding was added."""

    ids: Int[Tensor, "batch pos"]
    """Token ids, padded."""
    mask: Int[Tensor, "batch pos"]
    """1 for real tokens, 0 for padding."""
    lengths: Int[Tensor, " batch"]
    """Number of real tokens in each prompt (BOS included)."""
    padding_side: Literal["left", "right"]
    """Where the padding went."""

    @property
    def last_pos(self) -> Int[Tensor, " batch"]:
        """Index of each prompt's last real token."""
        if self.padding_side == "left":
            return torch.full_like(self.lengths, self.ids.shape[1] - 1)
        return self.lengths - 1


def tokenize(
    model: Any,
    text: str | list[str],
    *,
    prepend_bos: bool = True,
    padding_side: Literal["left", "right"] = "right",
) -> Tokens:
    """Tokenize `text` with `model`'s tokenizer following the convention in the module docstring."""
    if padding_side not in ("left", "right"):
        raise InterplabError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InterplabError("this model has no tokenizer; pass token ids instead of text.")
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise InterplabError("nothing to tokenize: got an empty list of prompts.")
    rows = []
    for t in texts:
        ids = tokenizer.encode(t, add_special_tokens=False)
        if prepend_bos:
            bos = tokenizer.bos_token_id
            if bos is None:
                raise InterplabError(
                    "prepend_bos=True but the tokenizer has no BOS token; use prepend_bos=False."
                )
            ids = [bos, *ids]
        if not ids:
            raise InterplabError(f"prompt {t!r} tokenized to zero tokens.")
        rows.append(ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    lengths = torch.tensor([len(r) for r in rows])
    return Tokens(ids=ids, mask=mask, lengths=lengths, padding_side=padding_side)
