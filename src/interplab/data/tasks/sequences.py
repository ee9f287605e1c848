"""Successor and offset tasks over cyclic and linear sequences (days, months, numbers, letters).

`successor`: "The days were Monday, Tuesday, Wednesday," -> " Thursday" (the successor-head
setting of Gould et al. 2023). `day_offset` / `month_offset`: modular arithmetic in words,
"So three days after Friday is" -> " Monday", "... two months before January is" ->
" November" (the "days of the week" circle of Engels et al. 2024). Corruptions keep the
structure and change the start, so the right answer changes.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from interplab.data.corpus import storyworld_templates as T
from interplab.data.corpus import storyworld_vocab as V
from interplab.data.tasks.base import (
    Pairs,
    Split,
    TaskDataset,
    TokenizerView,
    check_args,
    pick_template,
    render,
    task_rng,
)
from interplab.errors import InterplabError, unknown

SuccessorKind = Literal["days", "months", "numbers", "digits", "letters"]

# kind -> (items, wraps around, lead-in as storyworld writes it)
_SEQUENCES: dict[str, tuple[tuple[str, ...], bool, str]] = {
    "days": (V.DAYS, True, "The days were"),
    "months": (V.MONTHS, True, "The months were"),
    "numbers": (V.NUMBER_WORDS, False, "The children counted:"),
    "digits": (tuple(str(i) for i in range(101)), False, "The rooms were numbered"),
    "letters": (V.LETTERS, False, "The letters"),
}


def _listing(head: str, items: tuple[str, ...], idx: list[int]) -> str:
    """ "The days were Monday, Tuesday," """
    return head + " " + ", ".join(items[i] for i in idx) + ","


def successor(
    tokenizer: Any,
    n: int = 256,
    seed: int = 0,
    split: Split = "heldout",
    prepend_bos: bool = True,
    *,
    kind: SuccessorKind = "days",
    length: int = 3,
    device: str | torch.device | None = None,
) -> TaskDataset:
    """A comma list of `length` consecutive items; the answer is the next item.

    Kinds: "days" and "months" (wrapping: Sunday -> Monday), "numbers" (zero..twenty in
    words), "digits" (0..100), "letters" (A..Z). The corrupted prompt starts elsewhere in the
    same sequence; `wrong_answers` is its next item. All prompts of one kind have one token
    length. `split` has no effect (no held-out resources are involved).
    Metadata: kind, start index, items, answer, item_pos (token position of each item).
    """
    task = "successor"
    check_args(task, n, split)
    if kind not in _SEQUENCES:
        raise unknown("successor kind", str(kind), _SEQUENCES, show_all=True)
    items, wraps, lead = _SEQUENCES[kind]
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length < len(items):
        raise InterplabError(
            f"task {task!r}: length must be an int in [1, {len(items) - 1}] for kind {kind!r}, "
            f"got {length!r}"
        )
    view = TokenizerView(tokenizer)
    ids = [view.single(" " + item, kind[:-1], task) for item in items]
    n_starts = len(items) if wraps else len(items) - length
    rng = task_rng(task, seed, split, kind, length)
    pairs = Pairs(task, view, prepend_bos)
    for _ in range(n):
        start, other = rng.sample(range(n_starts), 2)
        head = lead

        idx = [(start + i) % len(items) for i in range(length + 1)]
        other_idx = [(other + i) % len(items) for i in range(length + 1)]
        prompt = _listing(head, items, idx[:-1])
        corrupted = _listing(head, items, other_idx[:-1])
        positions = [len(view.encode(head)) + int(prepend_bos) + 2 * i for i in range(length)]
        meta = {
            "kind": kind,
            "start": start,
            "items": [items[i] for i in idx[:-1]],
            "answer": items[idx[-1]],
            "corrupted_start": other,
            "item_pos": positions,
        }
        pairs.add(prompt, corrupted, ids[idx[-1]], ids[other_idx[-1]], meta)
    dataset = pairs.build(split, device)
    for row, meta in enumerate(dataset.metadata):  # positions assume one token per item and comma
        if [int(dataset.clean_tokens[row, p]) for p in meta["item_pos"]] != [
            ids[items.index(w)] for w in meta["items"]
        ]:
            raise InterplabError(
                f"task {task!r}: the tokenizer does not split {dataset.prompts[row]!r} into one "
                "token per item and per comma"
            )
    return dataset


def _offset(
    task: str,
    unit: Literal["day", "month"],
    tokenizer: Any,
    n: int,
    seed: int,
    split: Split,
    prepend_bos: bool,
    direction: str,
    template: int | None,
    device: str | torch.device | None,
) -> TaskDataset:
    check_args(task, n, split)
    if direction not in ("after", "before", "both"):
        raise unknown("direction", str(direction), ("after", "before", "both"), show_all=True)
    items = V.DAYS if unit == "day" else V.MONTHS
    most = len(items) - 1
    view = TokenizerView(tokenizer)
    ids = [view.single(" " + item, unit, task) for item in items]
    heldout = split == "heldout"
    templates = pick_template(task, [p for p in T.OFFSET if p[0].heldout == heldout], template)
    offset = 0 if template is None else template
    rng = task_rng(task, seed, split, direction, template)
    pairs = Pairs(task, view, prepend_bos)
    for _ in range(n):
        k = rng.randrange(len(templates))
        forward = direction == "after" or (direction == "both" and rng.random() < 0.5)
        text = templates[k][0 if forward else 1].prefix("a")
        steps = rng.randint(1, most)
        start, other = rng.sample(range(len(items)), 2)
        sign = 1 if forward else -1
        answer, wrong = (start + sign * steps) % len(items), (other + sign * steps) % len(items)
        values = {
            "n": V.NUMBER_WORDS[steps],
            "unit": unit if steps == 1 else unit + "s",
            "now": "today" if unit == "day" else "this month",
        }
        prompt, starts = render(text, {**values, "d": items[start]})
        corrupted, _ = render(text, {**values, "d": items[other]})
        meta = {
            "template": offset + k,
            "template_text": text,
            "direction": "after" if forward else "before",
            "offset": steps,
            "start": items[start],
            "answer": items[answer],
            "corrupted_start": items[other],
            "start_pos": pairs.position(prompt, starts["d"][0]),
            "_expect": {"start_pos": ids[start]},
        }
        pairs.add(prompt, corrupted, ids[answer], ids[wrong], meta)
    return pairs.build(split, device)


def day_offset(
    tokenizer: Any,
    n: int = 256,
    seed: int = 0,
    split: Split = "heldout",
    prepend_bos: bool = True,
    *,
    direction: Literal["after", "before", "both"] = "both",
    template: int | None = None,
    device: str | torch.device | None = None,
) -> TaskDataset:
    """ "So three days after Friday is" -> " Monday": offsets of 1..6 days, forwards or back.

    `split` picks training or held-out phrasings (`storyworld_templates.OFFSET`); `template`
    one phrasing of that split. The corrupted prompt has another start day and the same
    offset; `wrong_answers` is its answer. Metadata: direction, offset, start, answer,
    `start_pos` (token position of the start day).
    """
    return _offset(
        "day_offset", "day", tokenizer, n, seed, split, prepend_bos, direction, template, device
    )


def month_offset(
    tokenizer: Any,
    n: int = 256,
    seed: int = 0,
    split: Split = "heldout",
    prepend_bos: bool = True,
    *,
    direction: Literal["after", "before", "both"] = "both",
    template: int | None = None,
    device: str | torch.device | None = None,
) -> TaskDataset:
    """ "So two months before January is" -> " November": offsets of 1..11 months.

    Same construction as `day_offset`, over the twelve months.
    """
    return _offset(
        "month_offset", "month", tokenizer, n, seed, split, prepend_bos, direction, template, device
    )
