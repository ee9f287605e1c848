"""Behaviour metrics read at each prompt's answer position, with honest error bars.

Every metric returns one value per example (shape `[..., batch]`: leading dims such as
"patched copy" or "layer" pass through), so aggregates can carry a spread. `Estimate` is the
aggregate: mean, standard deviation, standard error and the per-example values it came from.

Metrics (logits are `[..., batch, pos, vocab]`, scored at `answer_pos[b]` of row b):
  logit_diff  logit(answer) - mean_j logit(wrong_j)           (Wang et al. 2022, IOI)
  prob        p(answer)
  logprob     log p(answer)
  kl          KL(p_clean || p) at the answer position         (Conmy et al. 2023, ACDC)
  accuracy    1 where the top-1 token is the answer, else 0

Normalised forms put the corrupted run at 0 and the clean run at 1:
`(value - corrupted) / (clean - corrupted)`, computed from the aggregate means, so
the endpoints are exactly 0 and 1 (and per-example values are scaled by the same affine map).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.errors import InterplabError, unknown

MetricKind = Literal["logit_diff", "prob", "logprob", "kl", "accuracy"]
METRIC_KINDS: tuple[str, ...] = get_args(MetricKind)


# ------------------------------------------------------------------ aggregates
@dataclass(frozen=True)
class Estimate:
    """A mean over examples with its spread. `std` is the sample standard deviation (n - 1);
    `std` and `sem` are NaN when n = 1 (a spread cannot be estimated from one example)."""

    mean: float
    """Mean over examples."""
    std: float
    """Sample standard deviation over examples."""
    sem: float
    """Standard error of the mean, std / sqrt(n)."""
    n: int
    """Number of examples."""
    per_example: Float[Tensor, " n"] = field(repr=False)
    """The values the aggregate was computed from."""

    @classmethod
    def of(cls, values: Float[Tensor, " n"] | Sequence[float]) -> Estimate:
        """Aggregate a 1-D set of per-example values."""
        values = torch.as_tensor(values).detach().flatten().float().cpu()
        n = values.numel()
        if n == 0:
            raise InterplabError(
                "cannot aggregate an empty set of values; expected at least one example."
            )
        # float64 accumulation: the mean does not depend on summation order, so equal
        # per-example values always give bitwise-equal means (normalisation endpoints exact)
        wide = values.double()
        std = wide.std().item() if n > 1 else math.nan
        return cls(
            mean=wide.mean().item(), std=std, sem=std / math.sqrt(n), n=n, per_example=values
        )

    def normalized(self, clean: float, corrupted: float) -> Estimate:
        """The same estimate on the scale where `corrupted` is 0 and `clean` is 1."""
        span = _span(clean, corrupted)
        return Estimate(
            mean=(self.mean - corrupted) / span,
            std=self.std / abs(span),
            sem=self.sem / abs(span),
            n=self.n,
            per_example=(self.per_example - corrupted) / span,
        )

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.sem:.2g} (sem, n={self.n})"


@dataclass(frozen=True)
class MetricResult:
    """A metric on the clean and the corrupted prompts of a task."""

    metric: str
    """Metric name, e.g. 'logit_diff'."""
    clean: Estimate
    """The metric on the clean prompts."""
    corrupted: Estimate
    """The metric on the corrupted prompts."""

    def normalize(self, value: float | Tensor) -> float | Tensor:
        """Map a raw metric value onto the scale 0 = corrupted, 1 = clean."""
        return normalize(value, self.clean.mean, self.corrupted.mean)


def normalize(value: float | Tensor, clean: float, corrupted: float) -> float | Tensor:
    """`(value - corrupted) / (clean - corrupted)`: 0 at the corrupted run, 1 at the clean run.
    Exact at both ends (x - x = 0 and x / x = 1 in floating point)."""
    return (value - corrupted) / _span(clean, corrupted)


def _span(clean: float, corrupted: float) -> float:
    span = clean - corrupted
    if span == 0 or not math.isfinite(span):
        raise InterplabError(
            f"cannot normalise: the clean ({clean!r}) and corrupted ({corrupted!r}) metric values "
            "must be finite and different; the corruption does not change this metric."
        )
    return span


# ------------------------------------------------------------------ answer tokens
def answer_ids(
    answers: Tensor | Sequence[int | str] | int | str, tokenizer: Any = None
) -> Int[Tensor, " n"]:
    """Token ids of `answers`: ints pass through; each string must be exactly one token of
    `tokenizer` (a transformers/tokenizers tokenizer or a model with `.tokenizer`)."""
    if isinstance(answers, Tensor):
        if answers.is_floating_point():
            raise InterplabError(f"answer ids must be integers, got a {answers.dtype} tensor.")
        return answers.long()
    items = [answers] if isinstance(answers, int | str) else list(answers)
    ids: list[Any] = []
    view = None
    for item in items:
        if isinstance(item, str):
            if view is None:
                if tokenizer is None:
                    raise InterplabError(
                        f"answer {item!r} is a string; pass tokenizer= (or a model) to turn it "
                        "into a token id, or pass token ids."
                    )
                from interplab.data.tasks.base import TokenizerView

                view = TokenizerView(tokenizer)
            pieces = view.encode(item)
            if len(pieces) != 1:
                raise InterplabError(
                    f"answer {item!r} is {len(pieces)} tokens {[view.piece(i) for i in pieces]}; "
                    "metrics score a single next token, so each answer must be exactly one token."
                )
            ids.append(pieces[0])
        elif isinstance(item, Sequence):
            ids.append(answer_ids(item, tokenizer).tolist())
        else:
            ids.append(int(item))
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------ closed forms
def answer_logits(
    logits: Float[Tensor, "... batch pos vocab"], answer_pos: Int[Tensor, " batch"]
) -> Float[Tensor, "... batch vocab"]:
    """The logits at each row's answer position."""
    batch = logits.shape[-3]
    if answer_pos.shape != (batch,):
        raise InterplabError(
            f"answer_pos must have shape [batch={batch}], got {tuple(answer_pos.shape)}."
        )
    rows = torch.arange(batch, device=logits.device)
    return logits[..., rows, answer_pos.to(logits.device), :]


def _pick(scores: Float[Tensor, "... batch vocab"], ids: Int[Tensor, "batch ..."]) -> Tensor:
    """scores[..., b, ids[b]] for ids [batch] -> [..., batch]; ids [batch, k] -> [..., batch, k]."""
    ids = ids.to(scores.device)
    flat = ids.reshape(ids.shape[0], -1)
    index = flat.expand(*scores.shape[:-1], flat.shape[-1])
    out = scores.gather(-1, index)
    return out.squeeze(-1) if ids.ndim == 1 else out


def logit_diff_at(
    answer_logits_: Float[Tensor, "... batch vocab"],
    answers: Int[Tensor, " batch"],
    wrong_answers: Int[Tensor, "batch ..."],
) -> Float[Tensor, "... batch"]:
    """logit(answer) - mean over wrong answers of logit(wrong), from answer-position logits."""
    right = _pick(answer_logits_, answers)
    wrong = _pick(answer_logits_, wrong_answers)
    if wrong_answers.ndim == 2:
        wrong = wrong.mean(-1)
    return right - wrong


def logit_diff(
    logits: Float[Tensor, "... batch pos vocab"],
    answers: Tensor | Sequence[int | str],
    wrong_answers: Tensor | Sequence[int | str],
    answer_pos: Int[Tensor, " batch"],
    tokenizer: Any = None,
) -> Float[Tensor, "... batch"]:
    """Logit difference between the correct and the incorrect answer(s) at `answer_pos`
    (Wang et al. 2022). `wrong_answers` may be [batch] or [batch, n_wrong] (their mean)."""
    return logit_diff_at(
        answer_logits(logits, answer_pos),
        answer_ids(answers, tokenizer),
        answer_ids(wrong_answers, tokenizer),
    )


def answer_prob(
    logits: Float[Tensor, "... batch pos vocab"],
    answers: Tensor | Sequence[int | str],
    answer_pos: Int[Tensor, " batch"],
    tokenizer: Any = None,
) -> Float[Tensor, "... batch"]:
    """Probability of the correct answer at `answer_pos`."""
    return answer_logprob(logits, answers, answer_pos, tokenizer).exp()


def answer_logprob(
    logits: Float[Tensor, "... batch pos vocab"],
    answers: Tensor | Sequence[int | str],
    answer_pos: Int[Tensor, " batch"],
    tokenizer: Any = None,
) -> Float[Tensor, "... batch"]:
    """Log-probability of the correct answer at `answer_pos`."""
    scores = answer_logits(logits, answer_pos).float().log_softmax(-1)
    return _pick(scores, answer_ids(answers, tokenizer))


def kl_div(
    logits: Float[Tensor, "... batch pos vocab"],
    reference: Float[Tensor, "batch vocab"],
    answer_pos: Int[Tensor, " batch"],
) -> Float[Tensor, "... batch"]:
    """KL(p_reference || p) at the answer position, in nats; `reference` holds the clean run's
    logits at the answer positions (Conmy et al. 2023 score circuits this way)."""
    return kl_at(answer_logits(logits, answer_pos), reference)


def kl_at(
    answer_logits_: Float[Tensor, "... batch vocab"], reference: Float[Tensor, "batch vocab"]
) -> Float[Tensor, "... batch"]:
    """KL(p_reference || p) from answer-position logits."""
    ref = reference.to(answer_logits_.device).float().log_softmax(-1)
    own = answer_logits_.float().log_softmax(-1)
    return (ref.exp() * (ref - own)).sum(-1)


def accuracy(
    logits: Float[Tensor, "... batch pos vocab"],
    answers: Tensor | Sequence[int | str],
    answer_pos: Int[Tensor, " batch"],
    tokenizer: Any = None,
) -> Float[Tensor, "... batch"]:
    """1.0 where the model's top-1 next token at `answer_pos` is the answer, else 0.0."""
    top = answer_logits(logits, answer_pos).argmax(-1)
    return (top == answer_ids(answers, tokenizer).to(top.device)).float()


# ------------------------------------------------------------------ a metric bound to a task
@dataclass
class TaskMetric:
    """One metric bound to one task's answers: `metric(logits) -> [..., batch]`.

    Because it only reads the answer positions, patching sweeps evaluate the unembedding
    at those positions alone (`from_answer_logits`), which is most of a small model's cost.
    """

    kind: MetricKind
    """Which metric (see module docstring)."""
    answers: Int[Tensor, " batch"]
    """Correct next token per example."""
    wrong_answers: Int[Tensor, "batch ..."]
    """Contrast token(s) per example: [batch] or [batch, n_wrong]."""
    answer_pos: Int[Tensor, " batch"]
    """Position whose next-token prediction is scored."""
    reference: Float[Tensor, "batch vocab"] | None = None
    """Clean answer-position logits; needed by 'kl' only."""

    def __post_init__(self) -> None:
        if self.kind not in METRIC_KINDS:
            raise unknown("metric", str(self.kind), METRIC_KINDS, show_all=True)
        batch = self.answers.shape[0] if self.answers.ndim else -1
        if batch <= 0:
            raise InterplabError(
                "the metric has no examples; expected a non-empty batch of answers."
            )
        for name in ("wrong_answers", "answer_pos"):
            value = getattr(self, name)
            if value.ndim == 0 or value.shape[0] != batch:
                raise InterplabError(
                    f"{name} has shape {tuple(value.shape)}; expected batch size {batch} in dim 0."
                )
        if self.kind == "kl" and self.reference is None:
            raise InterplabError(
                "metric 'kl' needs reference= (the clean run's answer-position logits)."
            )

    @property
    def name(self) -> str:
        return self.kind

    def from_answer_logits(
        self, answer_logits_: Float[Tensor, "... batch vocab"]
    ) -> Float[Tensor, "... batch"]:
        """The metric from logits already taken at the answer positions."""
        x = answer_logits_
        if self.kind == "logit_diff":
            return logit_diff_at(x, self.answers, self.wrong_answers)
        if self.kind == "prob":
            return _pick(x.float().log_softmax(-1), self.answers).exp()
        if self.kind == "logprob":
            return _pick(x.float().log_softmax(-1), self.answers)
        if self.kind == "kl":
            assert self.reference is not None
            return kl_at(x, self.reference)
        return (x.argmax(-1) == self.answers.to(x.device)).float()

    def __call__(self, logits: Float[Tensor, "... batch pos vocab"]) -> Float[Tensor, "... batch"]:
        return self.from_answer_logits(answer_logits(logits, self.answer_pos))


def task_metric(
    kind: MetricKind, task: Any, clean_logits: Float[Tensor, "batch pos vocab"] | None = None
) -> TaskMetric:
    """Bind metric `kind` to a `TaskDataset`'s answers. 'kl' needs the clean run's logits."""
    check_task(task)
    reference = None
    if kind == "kl":
        if clean_logits is None:
            raise InterplabError(
                "metric 'kl' needs clean_logits (the model's logits on the clean prompts)."
            )
        reference = answer_logits(clean_logits, task.answer_pos).detach()
    return TaskMetric(
        kind=kind,
        answers=task.answers,
        wrong_answers=task.wrong_answers,
        answer_pos=task.answer_pos,
        reference=reference,
    )


def check_task(task: Any) -> None:
    """Refuse an empty task (or anything that is not a TaskDataset-like object)."""
    tokens = getattr(task, "clean_tokens", None)
    if tokens is None or not hasattr(task, "answers"):
        raise InterplabError(
            f"expected a TaskDataset (interplab.tasks.ioi(...), ...), got {type(task).__name__}."
        )
    if tokens.shape[0] == 0:
        raise InterplabError(
            f"task {getattr(task, 'name', '?')!r} has no examples; expected at least one prompt."
        )


def check_pair(
    clean_tokens: Int[Tensor, "batch pos"], corrupted_tokens: Int[Tensor, "batch pos"]
) -> None:
    """Clean and corrupted token rows must align position by position."""
    if clean_tokens.ndim != 2:
        raise InterplabError(
            f"clean tokens must be [batch, pos], got shape {tuple(clean_tokens.shape)}."
        )
    if clean_tokens.shape != corrupted_tokens.shape:
        raise InterplabError(
            f"clean tokens {tuple(clean_tokens.shape)} and corrupted tokens "
            f"{tuple(corrupted_tokens.shape)} differ in shape; patching needs token-aligned pairs "
            "of equal length."
        )
    if clean_tokens.shape[0] == 0:
        raise InterplabError("no prompts given; expected at least one clean/corrupted pair.")


def score(
    model: Any,
    task: Any,
    metric: MetricKind = "logit_diff",
    *,
    device: str | torch.device | None = None,
) -> MetricResult:
    """The metric on the task's clean and corrupted prompts (one forward pass each)."""
    check_task(task)
    device = model_device(model, device)
    with torch.inference_mode():
        clean_logits = model(task.clean_tokens.to(device))
        corrupted_logits = model(task.corrupted_tokens.to(device))
    bound = task_metric(metric, task.to(device), clean_logits)
    return MetricResult(
        metric=metric,
        clean=Estimate.of(bound(clean_logits)),
        corrupted=Estimate.of(bound(corrupted_logits)),
    )


def model_device(model: Any, device: str | torch.device | None) -> torch.device:
    """`device`, or the device the model's weights are on."""
    if device is not None:
        from interplab.models.loading import resolve_device

        return resolve_device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
