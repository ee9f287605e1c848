"""Bracket closing: predict the closer that matches the innermost open bracket.

"The note said (see the [map old" -> "]". Storyworld writes nested (), [], {}, double
quotes and <b>/<i> tags; here `depth` brackets are opened, each followed by two words, and
the prompt stops inside the innermost one. The model cannot know that the innermost span
ends here, so the metric compares closers: the right one (`answers`) against every other
kind's closer (`wrong_answers`, [batch, n_kinds - 1]). The corrupted prompt changes only the
innermost opener's kind, so the right closer changes and nothing else does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from interplab.data.corpus import storyworld_vocab as V
from interplab.data.tasks.base import Pairs, Split, TaskDataset, TokenizerView, check_args, task_rng
from interplab.errors import InterplabError, unknown

_LEAD = "The note said"


def _text(kinds: list[str], words: list[list[str]]) -> tuple[str, list[int]]:
    """The prompt and the character offset of each opener."""
    text, opens = _LEAD, []
    for kind, (first, second) in zip(kinds, words, strict=True):
        opens.append(len(text) + 1)
        text += f" {V.BRACKETS[kind][0]}{first} {second}"
    return text, opens


def brackets(
    tokenizer: Any,
    n: int = 256,
    seed: int = 0,
    split: Split = "heldout",
    prepend_bos: bool = True,
    *,
    depth: int = 2,
    kinds: Sequence[str] | None = None,
    device: str | torch.device | None = None,
) -> TaskDataset:
    """Prompts with `depth` nested open brackets; the answer closes the innermost one.

    `kinds` (default: all of `storyworld_vocab.BRACKETS`: paren, square, curly, quote,
    bold, italic) are drawn independently per level, except that a quote never opens inside
    a quote (storyworld never nests them). All prompts have one token length.
    `split` has no effect (no held-out resources are involved).
    Metadata: kinds (outer to inner), answer kind, corrupted kind, `open_pos` (token
    position of each opener), `wrong_kinds` (the kinds of `wrong_answers`, in order).
    """
    task = "brackets"
    check_args(task, n, split)
    kinds = list(V.BRACKETS) if kinds is None else list(kinds)
    for kind in kinds:
        if kind not in V.BRACKETS:
            raise unknown("bracket kind", str(kind), V.BRACKETS, show_all=True)
    if len(set(kinds)) < 2 or len(set(kinds)) != len(kinds):
        raise InterplabError(f"task {task!r}: kinds must be >= 2 distinct kinds, got {kinds}")
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 4:
        raise InterplabError(f"task {task!r}: depth must be an int in [1, 4], got {depth!r}")
    view = TokenizerView(tokenizer)
    closer_ids = {k: view.single(V.BRACKETS[k][1], "closer", task) for k in kinds}
    opener_ids = {k: view.single(" " + V.BRACKETS[k][0], "opener", task) for k in kinds}
    for word in V.BRACKET_WORDS:
        view.single(word, "word", task)
        view.single(" " + word, "word", task)
    rng = task_rng(task, seed, split, depth, ",".join(kinds))
    pairs = Pairs(task, view, prepend_bos)
    for _ in range(n):
        alternatives: list[str] = []
        while not alternatives:  # redraw the rare stack whose innermost kind has no substitute
            stack: list[str] = []
            for _level in range(depth):
                allowed = [k for k in kinds if not (k == "quote" and "quote" in stack)]
                stack.append(rng.choice(allowed))
            outer = stack[:-1]
            alternatives = [
                k for k in kinds if k != stack[-1] and not (k == "quote" and "quote" in outer)
            ]
        other = rng.choice(alternatives)
        words = [rng.sample(V.BRACKET_WORDS, 2) for _ in range(depth)]
        prompt, opens = _text(stack, words)
        corrupted, _ = _text(outer + [other], words)
        wrong_kinds = [k for k in kinds if k != stack[-1]]
        open_pos = [pairs.position(prompt, c) for c in opens]
        meta = {
            "kinds": list(stack),
            "answer_kind": stack[-1],
            "corrupted_kind": other,
            "wrong_kinds": wrong_kinds,
            "open_pos": open_pos,
            **{f"_open{i}": p for i, p in enumerate(open_pos)},
            "_expect": {f"_open{i}": opener_ids[k] for i, k in enumerate(stack)},
        }
        pairs.add(
            prompt, corrupted, closer_ids[stack[-1]], [closer_ids[k] for k in wrong_kinds], meta
        )
    dataset = pairs.build(split, device)
    for meta in dataset.metadata:  # the _open{i} keys only served the position check
        for i in range(depth):
            meta.pop(f"_open{i}")
    return dataset
