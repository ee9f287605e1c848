"""Factual recall from storyworld's fictional knowledge base (cf. Meng et al. 2022, ROME).

"The capital of Quelmar is" -> " Zorvath"; "The Blenn river flows through" -> " Quelmar".
The facts (`storyworld_vocab.KB`: twenty countries with a capital, language, river and
national animal) are fixed; `split="heldout"` asks them in phrasings that never occur in
training text, so a correct answer there is recall, not memorised phrasing. The corrupted
prompt asks the same question about another country, so its answer is another entity of
the same type (the `wrong_answers`).
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
    render,
    task_rng,
)
from interplab.errors import unknown

Relation = Literal["capital", "language", "river", "animal"]


def _answer_slot(template: T.Template) -> str:
    """The entity slot that comes last: the one a prompt cut before it asks for."""
    return [s for s in template.slots if s in ("x", "country")][-1]


def usable_templates(split: Split, relation: str) -> list[T.Template]:
    """Phrasings of `relation` in `split` that can end a prompt: they open with a word, not an
    entity (a sentence-initial entity has no leading space and would be another token)."""
    return [t for t in T.for_split(T.FACTS[relation], split) if not t.starts_with_slot]


def facts(
    tokenizer: Any,
    n: int = 256,
    seed: int = 0,
    split: Split = "heldout",
    prepend_bos: bool = True,
    *,
    relation: Relation | None = None,
    device: str | torch.device | None = None,
) -> TaskDataset:
    """Knowledge-base questions, cut before the entity that answers them.

    `relation` restricts to one relation (default: all four, mixed). Each prompt uses a
    random phrasing from `usable_templates(split, relation)`; the answer is whichever entity
    slot comes last (the country in "The Blenn river flows through", the capital in "The
    capital of Quelmar is"). Metadata: relation, country, subject (the entity in the prompt),
    answer, corrupted country, template (its index in `storyworld_templates.FACTS[relation]`),
    `subject_pos` (token position of the subject).
    """
    task = "facts"
    check_args(task, n, split)
    if relation is not None and relation not in V.KB_RELATIONS:
        raise unknown("relation", str(relation), V.KB_RELATIONS, show_all=True)
    relations = list(V.KB_RELATIONS) if relation is None else [relation]
    view = TokenizerView(tokenizer)
    rng = task_rng(task, seed, split, relation)
    pairs = Pairs(task, view, prepend_bos)
    for _ in range(n):
        rel = rng.choice(relations)
        templates = usable_templates(split, rel)
        k = rng.randrange(len(templates))
        template = templates[k]
        slot = _answer_slot(template)
        subject_slot = "country" if slot == "x" else "x"
        text = template.prefix(slot)
        country, other = rng.sample(V.KB, 2)
        name = rng.choice(V.TRAIN_NAMES)

        clean_values = {"country": country.name, "x": getattr(country, rel), "name": name}
        other_values = {"country": other.name, "x": getattr(other, rel), "name": name}
        prompt, starts = render(text, clean_values)
        corrupted, _ = render(text, other_values)
        answer, wrong = clean_values[slot], other_values[slot]
        subject = clean_values[subject_slot]
        answer_id = view.single(" " + answer, "entity", task)
        wrong_id = view.single(" " + wrong, "entity", task)
        subject_id = view.single(" " + subject, "entity", task)
        view.single(" " + other_values[subject_slot], "entity", task)
        meta = {
            "relation": rel,
            "template": T.FACTS[rel].index(template),
            "template_text": text,
            "country": country.name,
            "subject": subject,
            "answer": answer,
            "corrupted_country": other.name,
            "subject_pos": pairs.position(prompt, starts[subject_slot][0]),
            "_expect": {"subject_pos": subject_id},
        }
        pairs.add(prompt, corrupted, answer_id, wrong_id, meta)
    return pairs.build(split, device)
