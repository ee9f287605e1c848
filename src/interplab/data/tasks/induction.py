"""Induction: a random sequence followed by its exact repeat (Olsson et al. 2022).

On the repeated half a model with induction heads predicts each token from its previous
occurrence, so its loss there drops far below the loss on the random first half. Two forms:
`repeated_tokens` draws uniformly random token ids (the classic test), `induction` draws
random storyworld words, so its prompts are also text.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interplab.data.corpus import storyworld_vocab as V
from interplab.data.tasks.base import Pairs, Split, TaskDataset, TokenizerView, check_args, task_rng
from interplab.errors import InterplabError


def _check_seq_len(task: str, seq_len: int, most: int | None = None) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise InterplabError(f"task {task!r}: seq_len must be a positive int, got {seq_len!r}")
    if most is not None and seq_len > most:
        raise InterplabError(f"task {task!r}: seq_len must be <= {most}, got {seq_len}")


def repeated_tokens(
    tokenizer_or_vocab_size: Any,
    n: int = 64,
    seq_len: int = 50,
    seed: int = 0,
    prepend_bos: bool = True,
    *,
    bos_token_id: int | None = None,
    device: str | torch.device | None = None,
) -> Int[Tensor, "n pos"]:
    """[BOS] + r + r for `n` random sequences r of `seq_len` token ids: shape [n, 2*seq_len (+1)].

    Tokens are uniform over the vocabulary minus special tokens. With a vocab size (an int)
    instead of a tokenizer, ids are drawn from [0, vocab) and `bos_token_id` must be given
    when `prepend_bos`. Score the loss on positions `seq_len + bos .. 2*seq_len + bos - 1`
    (the repeated half; each is predicted from the position before it).
    """
    task = "repeated_tokens"
    check_args(task, n, "heldout")
    _check_seq_len(task, seq_len)
    if isinstance(tokenizer_or_vocab_size, int):
        vocab, special = tokenizer_or_vocab_size, set()
        if vocab < 2:
            raise InterplabError(f"vocab size must be >= 2, got {vocab}")
        if prepend_bos and bos_token_id is None:
            raise InterplabError(
                "repeated_tokens with a vocab size and prepend_bos=True needs bos_token_id"
            )
        bos = [bos_token_id] if prepend_bos else []
    else:
        view = TokenizerView(tokenizer_or_vocab_size)
        vocab, special = view.vocab_size, view.special_ids
        bos = view.bos_prefix(prepend_bos, task) if bos_token_id is None else [bos_token_id]
        if bos_token_id is not None:
            special = special | {bos_token_id}
    allowed = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    half = allowed[torch.randint(len(allowed), (n, seq_len), generator=generator)]
    body = torch.cat([half, half], dim=1)
    if bos:
        body = torch.cat([torch.full((n, 1), bos[0], dtype=torch.long), body], dim=1)
    return body if device is None else body.to(device)


def induction(
    tokenizer: Any,
    n: int = 256,
    seed: int = 0,
    split: Split = "heldout",
    prepend_bos: bool = True,
    *,
    seq_len: int = 20,
    device: str | torch.device | None = None,
) -> TaskDataset:
    """Random storyworld words, then the same words again; the corrupted twin repeats nothing.

    Clean: w_1 .. w_L w_1 .. w_L (each word one token, " lamp"); corrupted: w_1 .. w_L v_1 .. v_L
    with fresh words v, so no token of the second half is predictable. Unlike the other tasks
    the prompt contains its scored tokens: every position from `metadata["repeat_start"] - 1`
    to the second-to-last predicts a repeated token; `answers` / `answer_pos` are the last of
    them (logit difference: `answers` vs the corrupted last token `wrong_answers`).
    `split` has no effect (no held-out resources are involved).
    """
    task = "induction"
    check_args(task, n, split)
    pool = V.INDUCTION_WORDS
    _check_seq_len(task, seq_len, len(pool) // 2)
    view = TokenizerView(tokenizer)
    ids = {w: view.single(" " + w, "word", task) for w in pool}
    rng = task_rng(task, seed, split, seq_len)
    bos = int(prepend_bos)
    pairs = Pairs(task, view, prepend_bos)
    for _ in range(n):
        words = rng.sample(pool, 2 * seq_len)
        first, fresh = words[:seq_len], words[seq_len:]
        prompt = "".join(" " + w for w in first + first)
        corrupted = "".join(" " + w for w in first + fresh)
        meta = {"words": first, "seq_len": seq_len, "repeat_start": bos + seq_len}
        pairs.add(prompt, corrupted, ids[first[-1]], ids[fresh[-1]], meta)
    answer_pos = torch.full((n,), bos + 2 * seq_len - 2, dtype=torch.long)
    return pairs.build(split, device, answer_pos=answer_pos)
