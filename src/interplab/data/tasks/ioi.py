"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild").

"When Mary and John went to the store, John gave a drink to" -> " Mary": two names are
introduced, one (the subject S) is repeated, and the model should predict the other (the
indirect object IO). Templates come from storyworld (`storyworld_templates.IOI`): 18 training
frames and 6 held-out frames that never occur in training text. Half the prompts are ABBA
(IO named first), half BABA. The corruption is the standard "ABC" one: all three name
occurrences are replaced by three other names, so the prompt no longer says who the IO is.
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


def ioi(
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
    """IOI prompts ending just before the IO name, with ABC-corrupted twins.

    `answers` is the IO name token (" Mary"), `wrong_answers` the subject name token
    (" John"): the metric is the logit difference IO - S at `answer_pos`. `split` picks the
    training or held-out frames; `template` restricts to one frame of that split (then all
    prompts have one length when places and objects are single tokens). `names` picks the
    name pool: "heldout" names never occur in storyworld training text, so a storyworld model
    has untrained embeddings for them; use them only to test name-generic copying.
    Metadata per prompt: template, order ("ABBA"/"BABA"), io, s, corrupted names, and token
    positions `io_pos`, `s1_pos` (first S), `s2_pos` (repeated S), `end_pos` (= answer_pos).
    """
    task = "ioi"
    check_args(task, n, split)
    if names not in ("train", "heldout"):
        raise unknown("name pool", str(names), ("train", "heldout"), show_all=True)
    view = TokenizerView(tokenizer)
    templates = pick_template(task, T.for_split(T.IOI, split), template)
    offset = 0 if template is None else template
    female, male = V.name_pool(names)
    pool = female + male
    rng = task_rng(task, seed, split, names, template)
    pairs = Pairs(task, view, prepend_bos)
    for _ in range(n):
        k = rng.randrange(len(templates))
        text = templates[k].prefix("IO")
        io, s, *fresh = rng.sample(pool, 5)
        abba = rng.random() < 0.5
        noun = rng.choice(V.OBJECTS)
        values = {
            "place": rng.choice(V.PLACES),
            "obj": noun.singular,
            "a_obj": noun.a,
            "day": rng.choice(V.DAYS),
        }
        a, b = (io, s) if abba else (s, io)
        prompt, starts = render(text, {**values, "A": a, "B": b, "S": s})
        corrupted, _ = render(text, {**values, "A": fresh[0], "B": fresh[1], "S": fresh[2]})
        io_id = view.single(" " + io, "name", task)
        s_id = view.single(" " + s, "name", task)
        for name in fresh:
            view.single(" " + name, "name", task)
        pos_a, pos_b = (
            pairs.position(prompt, starts["A"][0]),
            pairs.position(prompt, starts["B"][0]),
        )
        meta = {
            "template": offset + k,
            "template_text": text,
            "order": "ABBA" if abba else "BABA",
            "io": io,
            "s": s,
            "corrupted_names": list(fresh),
            **values,
            "io_pos": pos_a if abba else pos_b,
            "s1_pos": pos_b if abba else pos_a,
            "s2_pos": pairs.position(prompt, starts["S"][0]),
            "end_pos": len(view.encode(prompt)) - 1 + int(prepend_bos),
            "_expect": {"io_pos": io_id, "s1_pos": s_id, "s2_pos": s_id},
        }
        pairs.add(prompt, corrupted, io_id, s_id, meta)
    return pairs.build(split, device)
