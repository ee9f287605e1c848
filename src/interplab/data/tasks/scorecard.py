"""Scorecards: how well a model does each planted phenomenon, on held-out prompts.

For each phenomenon, the model's next-token prediction at `answer_pos` is scored on a task
dataset built from held-out templates/phrasings (`split="heldout"`):

- `ioi`, `pronouns`: accuracy = fraction with logit(correct) > logit(wrong); mean and std of
  that logit difference (the usual IOI metric, Wang et al. 2022).
- `successor:*`, `day_offset`, `month_offset`, `brackets`, `facts`: top-1 accuracy over the
  whole vocabulary, plus the logit difference against the task's contrast token.
- `code_brackets`, `code_quotes` (Python, for code models): closer accuracy = fraction
  whose right closer (or quote) out-scores every other closer; the logit difference against
  the best other closer; top-1 accuracy over the whole vocabulary as an extra. Other tokens
  (`,`, `.attr`) are legal continuations there, so top-1 is not the target.
- `greater_than`: probability mass (softmax over the whole vocabulary) on the valid later
  two-digit years, and the same mass normalised over the 100 year tokens (Hanna et al. 2023
  report the latter as probability difference).
- `induction`: mean loss on the first and on the repeated half of random token sequences
  ([BOS] r r); the score is their difference in nats (Olsson et al. 2022). For storyworld
  models the tokens are drawn from the single-token words of the storyworld lexicon (tokens
  the model has seen as words; a byte-level BPE vocabulary is otherwise mostly fragments
  that never occur alone); for other tokenizers, from the whole vocabulary.

Every number comes with its standard deviation over examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from interplab.data.tasks import TASKS, TaskDataset, repeated_tokens
from interplab.errors import unknown


@dataclass
class PhenomenonScore:
    """One scorecard row."""

    phenomenon: str
    metric: str
    """What `value` measures, e.g. 'accuracy' or 'valid-year probability'."""
    value: float
    n: int
    logit_diff_mean: float | None = None
    logit_diff_std: float | None = None
    extra: dict[str, float] | None = None


@dataclass
class Scorecard:
    """Every phenomenon's score for one model."""

    model: str
    rows: list[PhenomenonScore]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "rows": [asdict(r) for r in self.rows]}

    def value(self, phenomenon: str) -> float:
        for row in self.rows:
            if row.phenomenon == phenomenon:
                return row.value
        raise unknown("phenomenon", phenomenon, [r.phenomenon for r in self.rows])

    def table(self) -> list[dict[str, Any]]:
        """Rows for printing or a report table."""
        out = []
        for r in self.rows:
            diff = (
                ""
                if r.logit_diff_mean is None
                else f"{r.logit_diff_mean:.2f} ± {r.logit_diff_std:.2f}"
            )
            out.append(
                {
                    "phenomenon": r.phenomenon,
                    "metric": r.metric,
                    "value": round(r.value, 4),
                    "logit diff": diff,
                    "n": r.n,
                }
            )
        return out

    def format(self) -> str:
        rows = self.table()
        widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in rows[0]}
        lines = ["  ".join(f"{k:<{widths[k]}}" for k in widths)]
        lines += ["  ".join(f"{str(r[k]):<{widths[k]}}" for k in widths) for r in rows]
        return "\n".join(lines)


def _logits_at(model: Any, tokens: Tensor, positions: Tensor, batch_size: int) -> Tensor:
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, tokens.shape[0], batch_size):
            logits = model(tokens[i : i + batch_size].to(device))
            pos = positions[i : i + batch_size].to(device)
            out.append(logits[torch.arange(len(pos), device=device), pos].float().cpu())
    return torch.cat(out)


def _logit_diff(logits: Tensor, ds: TaskDataset) -> Tensor:
    wrong = ds.wrong_answers if ds.wrong_answers.ndim == 2 else ds.wrong_answers[:, None]
    correct = logits.gather(1, ds.answers[:, None]).squeeze(1)
    return correct - logits.gather(1, wrong).max(dim=1).values


def _score_pairwise(name: str, logits: Tensor, ds: TaskDataset) -> PhenomenonScore:
    diff = _logit_diff(logits, ds)
    return PhenomenonScore(
        name,
        "accuracy",
        (diff > 0).float().mean().item(),
        len(ds),
        diff.mean().item(),
        diff.std().item(),
    )


def _score_top1(name: str, logits: Tensor, ds: TaskDataset) -> PhenomenonScore:
    diff = _logit_diff(logits, ds)
    top1 = (logits.argmax(dim=1) == ds.answers).float().mean().item()
    return PhenomenonScore(
        name, "top-1 accuracy", top1, len(ds), diff.mean().item(), diff.std().item()
    )


def _score_greater_than(name: str, logits: Tensor, ds: TaskDataset) -> PhenomenonScore:
    probs = logits.softmax(dim=1)[:, ds.candidate_ids]  # [batch, 100 year tokens]
    valid = (probs * ds.valid_mask).sum(1)
    normalised = valid / probs.sum(1)
    return PhenomenonScore(
        name,
        "valid-year probability",
        valid.mean().item(),
        len(ds),
        extra={
            "valid_prob_std": valid.std().item(),
            "valid_prob_among_years": normalised.mean().item(),
        },
    )


def _score_closers(name: str, logits: Tensor, ds: TaskDataset) -> PhenomenonScore:
    score = _score_pairwise(name, logits, ds)
    score.metric = "closer accuracy"
    score.extra = {"top1_accuracy": (logits.argmax(dim=1) == ds.answers).float().mean().item()}
    return score


# phenomenon -> (task name, task options, scorer)
PHENOMENA: dict[str, tuple[str, dict[str, Any], Callable[..., PhenomenonScore]]] = {
    "ioi": ("ioi", {}, _score_pairwise),
    "successor:days": ("successor", {"kind": "days"}, _score_top1),
    "successor:months": ("successor", {"kind": "months"}, _score_top1),
    "successor:numbers": ("successor", {"kind": "numbers"}, _score_top1),
    "successor:letters": ("successor", {"kind": "letters"}, _score_top1),
    "day_offset": ("day_offset", {}, _score_top1),
    "month_offset": ("month_offset", {}, _score_top1),
    "greater_than": ("greater_than", {}, _score_greater_than),
    "brackets": ("brackets", {}, _score_top1),
    "facts": ("facts", {}, _score_top1),
    "pronouns": ("pronouns", {}, _score_pairwise),
    "code_brackets": ("code_brackets", {}, _score_closers),
    "code_quotes": ("code_quotes", {}, _score_closers),
}

CODE_PHENOMENA = ("code_brackets", "code_quotes")
"""Phenomena of Python code (for `code-4l`); the others are storyworld's."""

DEFAULT_PHENOMENA = [p for p in PHENOMENA if p not in CODE_PHENOMENA] + ["induction"]
"""What `scorecard` scores when not told: every storyworld phenomenon and induction."""


def word_repeats(model: Any, n: int, seq_len: int, seed: int) -> Tensor | None:
    """[BOS] r r with r drawn uniformly from single-token storyworld words, or None when the
    model's tokenizer does not hold most of them as single tokens."""
    from interplab.data.corpus.storyworld_vocab import INDUCTION_WORDS

    tokenizer = model.tokenizer
    pool = [tokenizer.encode(" " + w, add_special_tokens=False) for w in INDUCTION_WORDS]
    pool = sorted({ids[0] for ids in pool if len(ids) == 1})
    if len(pool) < len(INDUCTION_WORDS) // 2:
        return None
    generator = torch.Generator().manual_seed(seed)
    r = torch.tensor(pool)[torch.randint(len(pool), (n, seq_len), generator=generator)]
    bos = torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long)
    return torch.cat([bos, r, r], dim=1)


def induction_score(
    model: Any, n: int = 64, seq_len: int = 50, seed: int = 0, batch_size: int = 32
) -> PhenomenonScore:
    """Induction on [BOS] r r: mean loss on the first copy of r minus mean loss on the second
    (nats). The first token of each copy is left out (nothing can predict it)."""
    tokens = word_repeats(model, n, seq_len, seed)
    if tokens is None:
        tokens = repeated_tokens(model, n=n, seq_len=seq_len, seed=seed)
    device = next(model.parameters()).device
    losses = []
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            batch = tokens[i : i + batch_size].to(device)
            logits = model(batch)
            nll = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none"
            )
            losses.append(nll.view(batch.shape[0], -1).cpu())
    nll = torch.cat(losses)  # [n, 2*seq_len]: position t predicts token t+1
    first = nll[:, 1:seq_len].mean(1)  # predicts tokens 2..L: r[1:] of the first copy
    repeated = nll[:, seq_len + 1 :].mean(1)  # predicts r[1:] of the second copy
    gap = first - repeated
    return PhenomenonScore(
        "induction",
        "first-half minus repeated-half loss (nats)",
        gap.mean().item(),
        n,
        extra={
            "first_half_loss": first.mean().item(),
            "repeated_half_loss": repeated.mean().item(),
            "gap_std": gap.std().item(),
        },
    )


def scorecard(
    model: Any,
    phenomena: list[str] | None = None,
    *,
    n: int = 256,
    seed: int = 0,
    split: str = "heldout",
    batch_size: int = 64,
    name: str = "model",
) -> Scorecard:
    """Score `model` on each phenomenon (`DEFAULT_PHENOMENA`: the storyworld ones and
    'induction', by default)."""
    names = phenomena or DEFAULT_PHENOMENA
    rows = []
    for phenomenon in names:
        if phenomenon == "induction":
            rows.append(induction_score(model, n=min(n, 128), seed=seed, batch_size=batch_size))
            continue
        if phenomenon not in PHENOMENA:
            raise unknown("phenomenon", phenomenon, [*PHENOMENA, "induction"], show_all=True)
        task, options, scorer = PHENOMENA[phenomenon]
        ds = TASKS[task](model, n=n, seed=seed, split=split, **options)
        logits = _logits_at(model, ds.clean_tokens, ds.answer_pos, batch_size)
        rows.append(scorer(phenomenon, logits, ds))
    return Scorecard(name, rows)
