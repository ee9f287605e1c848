"""Task datasets: prompts with known answers, paired with token-aligned corrupted prompts.

Every task function has the signature
`task(tokenizer, n=256, seed=0, split="heldout", prepend_bos=True, **options) -> TaskDataset`
where `tokenizer` is a transformers tokenizer, a `tokenizers.Tokenizer`, or a model with a
`.tokenizer`. Prompts are built from the storyworld lexicon and templates, so a model
trained on storyworld sees them in distribution; `split="heldout"` (the default) uses
phrasings that never occur in storyworld training text, where the task has them.
`code_brackets` and `code_quotes` are Python lines instead, for code models.
See `base` for the BOS and padding conventions.

    ds = interplab.tasks.ioi(model, n=256, seed=0)
    logits = model(ds.clean_tokens)[torch.arange(len(ds)), ds.answer_pos]
    logit_diff = logits.gather(1, ds.answers[:, None]) - logits.gather(1, ds.wrong_answers[:, None])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from interplab.data.tasks.base import TaskDataset, TokenizerView
from interplab.data.tasks.brackets import brackets
from interplab.data.tasks.code import code_brackets, code_quotes
from interplab.data.tasks.facts import facts
from interplab.data.tasks.greater_than import greater_than
from interplab.data.tasks.induction import induction, repeated_tokens
from interplab.data.tasks.ioi import ioi
from interplab.data.tasks.pronouns import pronouns
from interplab.data.tasks.sequences import day_offset, month_offset, successor
from interplab.errors import unknown

TASKS: dict[str, Callable[..., TaskDataset]] = {
    "ioi": ioi,
    "induction": induction,
    "successor": successor,
    "day_offset": day_offset,
    "month_offset": month_offset,
    "greater_than": greater_than,
    "brackets": brackets,
    "facts": facts,
    "pronouns": pronouns,
    "code_brackets": code_brackets,
    "code_quotes": code_quotes,
}
"""Task name -> dataset builder."""


def get_task(name: str, tokenizer: Any, **kwargs: Any) -> TaskDataset:
    """Build task `name` (a key of TASKS) with `tokenizer` and the task's keyword options."""
    if name not in TASKS:
        raise unknown("task", name, TASKS, show_all=True)
    return TASKS[name](tokenizer, **kwargs)


__all__ = [
    "TASKS",
    "TaskDataset",
    "TokenizerView",
    "brackets",
    "code_brackets",
    "code_quotes",
    "day_offset",
    "facts",
    "get_task",
    "greater_than",
    "induction",
    "ioi",
    "month_offset",
    "pronouns",
    "repeated_tokens",
    "successor",
]
