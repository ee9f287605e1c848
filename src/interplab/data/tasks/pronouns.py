"""Pronoun agreement: after a named person, the pronoun of the name's gender.

"Yesterday Mary was tired, so" -> " she". Every storyworld name has a fixed gender
(`storyworld_vocab.GENDER`), and the corpus follows names with matching pronouns. The
corrupted prompt swaps in a name of the other gender, which flips the answer; the metric is
the logit difference between the right and the wrong pronoun.
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
from interplab.errors import unknown


def pronouns(
    tokenizer: Any,
    n: int = 256,
    seed: int = 0,
    split: Split = "heldout",
    prepend_bos: bool = True,
    *,
    names: Literal["train", "heldout"] = "train",
    template: int | None = None,
    device: str | torch.device | None = None,
) -> TaskDataset:
    """Pronoun frames (`storyworld_templates.PRONOUN`) cut before the pronoun.

    `answers` is " she" or " he" to match the name, `wrong_answers` the other one. `split`
    picks training or held-out frames, `template` one frame of that split, `names` the name
    pool ("heldout" names never occur in training text; see `ioi`). Half the prompts use a
    female name. Metadata: name, gender, corrupted name, template, `name_pos`.
    """
    task = "pronouns"
    check_args(task, n, split)
    if names not in ("train", "heldout"):
        raise unknown("name pool", str(names), ("train", "heldout"), show_all=True)
    view = TokenizerView(tokenizer)
    she, he = view.single(" she", "pronoun", task), view.single(" he", "pronoun", task)
    templates = pick_template(task, T.for_split(T.PRONOUN, split), template)
    offset = 0 if template is None else template
    female, male = V.name_pool(names)
    rng = task_rng(task, seed, split, names, template)
    pairs = Pairs(task, view, prepend_bos)
    for _ in range(n):
        k = rng.randrange(len(templates))
        text = templates[k].prefix("pron")
        is_female = rng.random() < 0.5
        name = rng.choice(female if is_female else male)
        other = rng.choice(male if is_female else female)
        noun = rng.choice(V.OBJECTS)
        values = {
            "obj": noun.singular,
            "a_obj": noun.a,
            "place": rng.choice(V.PLACES),
            "food": rng.choice(V.FOODS),
            "day": rng.choice(V.DAYS),
        }
        prompt, starts = render(text, {**values, "name": name})
        corrupted, _ = render(text, {**values, "name": other})
        name_id = view.single(" " + name, "name", task)
        view.single(" " + other, "name", task)
        meta = {
            "template": offset + k,
            "template_text": text,
            "name": name,
            "gender": V.GENDER[name],
            "corrupted_name": other,
            **values,
            "name_pos": pairs.position(prompt, starts["name"][0]),
            "_expect": {"name_pos": name_id},
        }
        right, wrong = (she, he) if is_female else (he, she)
        pairs.add(prompt, corrupted, right, wrong, meta)
    return pairs.build(split, device)
