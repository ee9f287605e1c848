"""Greater-than (Hanna et al. 2023, "How does GPT-2 compute greater-than?").

"The war lasted from the year 1732 to the year 17" -> a two-digit year greater than 32.
Years tokenize as century + two digits (" 17", "32"), so the prompt ends on the century
token and every candidate answer is one of the 100 tokens "00".."99". The metric is the
probability mass on valid years (`valid_mask` over `candidate_ids`), e.g. the probability
difference sum_{y > YY} p(y) - sum_{y <= YY} p(y). The corruption is the paper's "01" one:
the start year becomes XX01, so (almost) every year is valid and the start carries no signal.
"""

from __future__ import annotations

from typing import Any

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


def greater_than(
    tokenizer: Any,
    n: int = 256,
    seed: int = 0,
    split: Split = "heldout",
    prepend_bos: bool = True,
    *,
    template: int | None = None,
    device: str | torch.device | None = None,
) -> TaskDataset:
    """Year-span prompts ending on the end year's century token.

    Start years are XXYY with century XX in 11..19 and YY in 02..98 (as in the paper).
    `candidate_ids` are the ids of "00".."99"; `valid_mask[i, y]` is y > YY_i. `answers` is
    a valid end year drawn as storyworld draws it (uniform over YY+1..99), `wrong_answers`
    the start year's own two digits YY (the most tempting invalid answer). `split` picks the
    training or held-out frames. Metadata: century, start_yy, event, `yy_pos` (token position
    of the start year's two digits), `century_pos` (= answer_pos).
    """
    task = "greater_than"
    check_args(task, n, split)
    view = TokenizerView(tokenizer)
    suffix_ids = [view.single(f"{y:02d}", "two-digit year", task) for y in range(100)]
    century_ids = {c: view.single(f" {c}", "century", task) for c in range(11, 20)}
    templates = pick_template(task, T.for_split(T.GREATER_THAN, split), template)
    offset = 0 if template is None else template
    rng = task_rng(task, seed, split, template)
    pairs = Pairs(task, view, prepend_bos)
    starts: list[int] = []
    for _ in range(n):
        k = rng.randrange(len(templates))
        text = templates[k].prefix("y2")
        century, yy = rng.randint(11, 19), rng.randint(2, 98)
        event = rng.choice(V.EVENTS)
        prompt, slots = render(text, {"event": event, "y1": f"{century}{yy:02d}"})
        corrupted, _ = render(text, {"event": event, "y1": f"{century}01"})
        prompt, corrupted = f"{prompt} {century}", f"{corrupted} {century}"
        year_pos = pairs.position(prompt, slots["y1"][0])
        end = rng.randint(yy + 1, 99)
        meta = {
            "template": offset + k,
            "template_text": text,
            "event": event,
            "century": century,
            "start_yy": yy,
            "answer_yy": end,
            "century_pos": len(view.encode(prompt)) - 1 + int(prepend_bos),
            "yy_pos": year_pos + 1,
            "_expect": {"yy_pos": suffix_ids[yy], "century_pos": century_ids[century]},
        }
        pairs.add(prompt, corrupted, suffix_ids[end], suffix_ids[yy], meta)
        starts.append(yy)
    valid = torch.arange(100)[None, :] > torch.tensor(starts)[:, None]
    return pairs.build(
        split, device, candidate_ids=torch.tensor(suffix_ids, dtype=torch.long), valid_mask=valid
    )
