"""Induction heads: found by patching, checked against attention-pattern scores.

`interplab run induction` compares a model that should have induction heads (default
`storyworld-2l`) with a one-layer attention-only control (`storyworld-1l-attn`), which can
only learn skip-trigrams and so cannot form the two-layer induction circuit (Elhage et al.
2021; Olsson et al. 2022). For each model it
1. measures the induction loss gap: loss on the first copy of a random sequence minus loss
   on its repeat, [BOS] r r (the scorecard's `induction_score`), and the loss by position;
2. scores every head's attention pattern (`interplab.circuits.roles`): previous-token (on
   the repeated sequences and on storyworld text), induction and duplicate-token, and
   classifies heads with stated thresholds;
3. finds induction heads by activation patching each head's output (clean -> corrupted) on
   the induction task (`interplab.data.tasks.induction`: the corrupted twin has a fresh
   second half), metric: mean log-probability of the repeated tokens;
4. finds the heads that feed the induction heads' keys (K-composition, the mechanism of
   Olsson et al.) by path patching into the induction heads' key input, with an independent
   repeated sequence as the corruption (the task's own corruption leaves the first copy, which
   the keys read, unchanged);
5. states how well the heads found by patching agree with the attention classification,
   and shows the top induction head's mean attention pattern.
`study_model` (steps 1-4 for one model) is shared with the `universality` recipe.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from interplab.errors import InterplabError

DESCRIPTION = (
    "Induction heads by patching and by attention scores, on a model and a one-layer "
    "attention-only control; K-composition by path patching into the heads' keys."
)

VIAS_REPORTED = ("mlps", "direct")
"""K-composition path patching: through MLPs (the found set) and the direct path only."""


@dataclass
class Config:
    model: str = "storyworld-2l"
    """Model expected to have induction heads: organism name or local HF directory."""
    control: str = "storyworld-1l-attn"
    """Control model without induction (a one-layer attention-only organism)."""
    n: int = 64
    """Repeated sequences [BOS] r r for the loss gap, loss by position and attention scores."""
    seq_len: int = 20
    """Length of r (tokens); 2 * seq_len + 1 must fit the model's context."""
    n_text: int = 32
    """Storyworld text windows for the natural-text previous-token score (0 = skip)."""
    text_len: int = 64
    """Tokens per text window (BOS included)."""
    n_patch: int = 32
    """Induction-task prompts for activation and path patching."""
    patch_seq_len: int = 20
    """Words per half of each induction-task prompt."""
    previous_token_threshold: float = 0.2
    """Previous-token role: mean attention to the previous token at least this."""
    induction_threshold: float = 0.3
    """Induction role: mean attention from the second copy's token i to the first copy's
    token i+1 at least this."""
    duplicate_token_threshold: float = 0.3
    """Duplicate-token role: mean attention to the current token's first occurrence at least
    this."""
    patch_threshold: float = 0.1
    """A head is found by patching when |effect| >= this (normalised: 1 = the whole clean -
    corrupted difference) and |effect| > 2 sem."""
    min_gap: float = 0.5
    """Patching is read only when the clean prompts' repeated tokens get at least this much
    more log-probability (nats per token) than the corrupted prompts'."""
    seed: int = 0
    """Seed of the repeated sequences, text windows and task prompts."""
    fast: bool = False
    """Small settings (for tests)."""
    device: str | None = None
    """cpu, cuda, cuda:N; None = cuda when present."""

    def __post_init__(self) -> None:
        if self.fast:
            self.n = min(self.n, 16)
            self.seq_len = min(self.seq_len, 12)
            self.n_text = min(self.n_text, 8)
            self.text_len = min(self.text_len, 32)
            self.n_patch = min(self.n_patch, 12)
            self.patch_seq_len = min(self.patch_seq_len, 10)
        check_study_config(self)
        for name in ("model", "control"):
            if not getattr(self, name):
                raise InterplabError(f"{name} must name a model, got {getattr(self, name)!r}.")


def check_study_config(config: Any) -> None:
    """Validation shared with the universality recipe's Config."""
    for name in ("n", "n_patch"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise InterplabError(
                f"{name} must be an integer >= 2 (a standard error needs two), got {value!r}."
            )
    for name in ("seq_len", "patch_seq_len"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 3:
            raise InterplabError(f"{name} must be an integer >= 3, got {value!r}.")
    if isinstance(config.n_text, bool) or not isinstance(config.n_text, int) or config.n_text < 0:
        raise InterplabError(f"n_text must be an integer >= 0, got {config.n_text!r}.")
    if not isinstance(config.text_len, int) or config.text_len < 3:
        raise InterplabError(f"text_len must be an integer >= 3, got {config.text_len!r}.")
    for name in (
        "previous_token_threshold",
        "induction_threshold",
        "duplicate_token_threshold",
        "patch_threshold",
    ):
        value = getattr(config, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 1:
            raise InterplabError(f"{name} must be a number in (0, 1], got {value!r}.")
    if not isinstance(config.min_gap, int | float) or config.min_gap < 0:
        raise InterplabError(f"min_gap must be a number >= 0 (nats), got {config.min_gap!r}.")


def thresholds(config: Any) -> dict[str, float]:
    """Role -> threshold from a Config's three threshold fields."""
    return {
        "previous-token": config.previous_token_threshold,
        "induction": config.induction_threshold,
        "duplicate-token": config.duplicate_token_threshold,
    }


# ---------------------------------------------------------------------- models
def require_models(names: list[str]) -> None:
    """Raise before any work when a model is neither a bundled organism nor a local folder:
    organisms of the suite that are not trained yet name the command that trains them."""
    from pathlib import Path

    from interplab.models import organisms
    from interplab.models.organisms.suite import SUITE

    bundled = set(organisms.organism_names())
    for name in names:
        if name in bundled or Path(name).is_dir():
            continue
        if name in SUITE:
            raise InterplabError(
                f"model organism {name!r} is not trained yet (no folder in "
                f"{organisms.ROOT}); train it with `interplab train-organism {name}`."
            )
        known = sorted(bundled | set(SUITE))
        raise InterplabError(
            f"unknown model {name!r}: expected a bundled organism ({', '.join(sorted(bundled))}), "
            f"an organism of the suite (`interplab train-organism NAME`; {', '.join(known)}), "
            "or a local HuggingFace directory."
        )


# ---------------------------------------------------------------------- one model
@dataclass
class ModelStudy:
    """Everything the induction recipe measures on one model."""

    name: str
    """Model name as given."""
    shape: tuple[int, int]
    """(n_layers, n_heads)."""
    gap: Any
    """Scorecard `induction_score`: first-copy minus repeated-copy loss (nats)."""
    position_loss: Any
    """[n, 2 * seq_len] next-token loss at each position of the repeated sequences."""
    scores: Any
    """`RoleScores` of every head."""
    roles: Any
    """`HeadRoles` from the attention scores."""
    patching: Any
    """`PatchingResult`: each head's output patched clean -> corrupted, [layer, head]."""
    task_gap: Any
    """`Estimate` of clean - corrupted metric (nats per repeated token), paired per prompt."""
    readable: bool
    """Whether `task_gap` clears `min_gap` and two standard errors (else patching finds nothing)."""
    induction_found: list[tuple[int, int]]
    """Heads with |recovered| >= patch_threshold and > 2 sem."""
    receivers: list[tuple[int, int]]
    """Induction heads (classified or found) in layers >= 1: the K-composition receivers."""
    k_paths: dict[str, Any] = field(default_factory=dict)
    """via -> `PathPatchingResult` into the receivers' keys (empty without receivers)."""
    k_gap: Any = None
    """`Estimate` of clean - corrupted metric for the K-composition corruption."""
    previous_found: list[tuple[int, int]] = field(default_factory=list)
    """Heads whose K-composition drop (via MLPs) is >= patch_threshold and > 2 sem."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds per stage."""

    def found(self, role: str) -> list[tuple[int, int]]:
        """Heads found by patching for 'induction' or 'previous-token'."""
        return self.induction_found if role == "induction" else self.previous_found

    def k_drop(self, via: str = "mlps") -> tuple[Any, Any] | None:
        """(drop, sem) [layer, head]: fraction of the clean behaviour lost when the head's
        output reaches the receivers' keys from the corrupted run; None without receivers."""
        if via not in self.k_paths:
            return None
        result = self.k_paths[via]
        return 1.0 - result.values, result.sem


def _found(effect: Any, sem: Any, threshold: float) -> list[tuple[int, int]]:
    """(layer, head) where |effect| >= threshold and |effect| > 2 sem (NaN sem: never)."""
    hit = (effect.abs() >= threshold) & (effect.abs() > 2 * sem)
    return [tuple(int(x) for x in idx) for idx in hit.nonzero().tolist()]  # type: ignore[misc]


def repeated_logprob_metric(clean_tokens: Any, seq_len: int) -> Any:
    """Metric `logits [batch, pos, vocab] -> [batch]`: mean log-probability of the clean
    repeated tokens, read at positions p+L .. p+2L-2 (each predicts the second copy's next
    token r[1:]); p = the prefix length (BOS)."""
    import torch

    p = clean_tokens.shape[1] - 2 * seq_len
    pos = torch.arange(p + seq_len, p + 2 * seq_len - 1, device=clean_tokens.device)
    targets = clean_tokens[:, pos + 1]

    def repeated_logprob(logits: Any) -> Any:
        logprobs = logits[:, pos].float().log_softmax(-1)
        return logprobs.gather(-1, targets[..., None].to(logits.device)).squeeze(-1).mean(-1)

    return repeated_logprob


def _clock() -> float:
    return time.perf_counter()


def study_model(model: Any, name: str, config: Any) -> ModelStudy:
    """Loss gap, loss by position, role scores, head patching and K-composition path patching
    of one model (see the module docstring). `config` is an induction or universality Config."""
    import torch
    import torch.nn.functional as F

    from interplab.circuits import Estimate, patch_tokens, path_patch_tokens
    from interplab.circuits.roles import classify_heads, head_role_scores, repeated_sequences
    from interplab.data.tasks import induction
    from interplab.data.tasks.scorecard import induction_score

    n_ctx = int(model.cfg.n_ctx)
    for field_name in ("seq_len", "patch_seq_len"):
        value = getattr(config, field_name)
        if 2 * value + 1 > n_ctx:
            raise InterplabError(
                f"{field_name}={value} needs 2 * {value} + 1 positions but {name} has a context "
                f"of {n_ctx}; use {field_name} <= {(n_ctx - 1) // 2}."
            )
    seconds: dict[str, float] = {}
    device = next(model.parameters()).device

    clock = _clock()
    gap = induction_score(model, n=config.n, seq_len=config.seq_len, seed=config.seed)
    repeated = repeated_sequences(model, config.n, config.seq_len, config.seed)
    losses = []
    with torch.inference_mode():
        for start in range(0, repeated.shape[0], 32):
            batch = repeated[start : start + 32].to(device)
            logits = model(batch)
            nll = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none"
            )
            losses.append(nll.view(batch.shape[0], -1).cpu())
    position_loss = torch.cat(losses)
    seconds["loss"] = _clock() - clock

    clock = _clock()
    text = None
    if config.n_text and getattr(model, "tokenizer", None) is not None:
        from interplab.data.corpus import pack

        width = min(config.text_len, n_ctx)
        text = pack("storyworld", model.tokenizer, width, config.n_text, seed=config.seed + 3).ids
    scores = head_role_scores(model, repeated, text, seq_len=config.seq_len)
    roles = classify_heads(scores, thresholds(config))
    seconds["attention scores"] = _clock() - clock

    clock = _clock()
    task = induction(model, n=config.n_patch, seed=config.seed, seq_len=config.patch_seq_len)
    clean = task.clean_tokens.to(device)
    metric = repeated_logprob_metric(clean, config.patch_seq_len)
    patching = patch_tokens(
        model, clean, task.corrupted_tokens, metric, "z", ("head",), direction="denoise"
    )
    task_gap = Estimate.of(patching.clean.per_example - patching.corrupted.per_example)
    readable = task_gap.mean >= config.min_gap and task_gap.mean > 2 * task_gap.sem
    found = _found(patching.values, patching.sem, config.patch_threshold) if readable else []
    seconds["head patching"] = _clock() - clock

    receivers = sorted(
        {h for h in roles.heads("induction") + found if h[0] >= 1}
    )  # a layer-0 head has no earlier head to compose with
    study = ModelStudy(
        name=name,
        shape=(model.cfg.n_layers, model.cfg.n_heads),
        gap=gap,
        position_loss=position_loss,
        scores=scores,
        roles=roles,
        patching=patching,
        task_gap=task_gap,
        readable=readable,
        induction_found=found,
        receivers=receivers,
        seconds=seconds,
    )
    if not receivers:
        return study

    clock = _clock()
    # an independent repeated sequence: every head's output differs at the first-copy
    # positions the induction heads' keys read
    other = induction(
        model, n=config.n_patch, seed=config.seed + 1, seq_len=config.patch_seq_len
    ).clean_tokens
    labels = [f"L{layer}H{h}" for layer, h in receivers]
    has_mlp = "blocks.0.hook_mlp_out" in model.hook_dict
    for via in VIAS_REPORTED if has_mlp else ("direct",):
        study.k_paths[via] = path_patch_tokens(
            model, clean, other, metric, None, labels, "k", via, direction="noise"
        )
    first = next(iter(study.k_paths.values()))
    study.k_gap = Estimate.of(first.clean.per_example - first.corrupted.per_example)
    k_readable = study.k_gap.mean >= config.min_gap and study.k_gap.mean > 2 * study.k_gap.sem
    drop = study.k_drop("mlps" if has_mlp else "direct")
    if k_readable and drop is not None:
        study.previous_found = _found(drop[0], drop[1], config.patch_threshold)
    seconds["K-composition path patching"] = _clock() - clock
    return study


# ---------------------------------------------------------------------- agreement
@dataclass
class Agreement:
    """How the heads found by patching compare with the attention classification."""

    role: str
    """'induction' or 'previous-token'."""
    by_attention: list[str]
    """Heads the attention scores classify as `role` (previous-token: only layers below the
    receivers', the heads that could compose with them)."""
    by_patching: list[str]
    """Heads found by patching."""

    @property
    def both(self) -> list[str]:
        return [h for h in self.by_attention if h in self.by_patching]

    @property
    def jaccard(self) -> float:
        union = set(self.by_attention) | set(self.by_patching)
        return len(self.both) / len(union) if union else math.nan

    def sentence(self, what: str) -> str:
        a = ", ".join(self.by_attention) or "none"
        p = ", ".join(self.by_patching) or "none"
        union = len(set(self.by_attention) | set(self.by_patching))
        if not union:
            return f"{what}: neither the attention scores nor patching find any."
        return (
            f"{what}: attention scores classify **{a}**; patching finds **{p}**; "
            f"agreement on {len(self.both)} of {union} heads (Jaccard {self.jaccard:.2f})."
        )


def agreements(study: ModelStudy) -> dict[str, Agreement]:
    """Induction and previous-token agreement for one model."""
    from interplab.circuits.roles import head_label

    out = {
        "induction": Agreement(
            "induction",
            study.roles.labels("induction"),
            [head_label(*h) for h in study.induction_found],
        )
    }
    if study.receivers:
        top = max(layer for layer, _ in study.receivers)
        prev = [head_label(*h) for h in study.roles.heads("previous-token") if h[0] < top]
        out["previous-token"] = Agreement(
            "previous-token", prev, [head_label(*h) for h in study.previous_found]
        )
    return out


# ---------------------------------------------------------------------- the recipe
def run(config: Config, run: Any) -> Any:
    import interplab as il
    from interplab.runs import Report

    require_models([config.model, config.control])
    studies: dict[str, ModelStudy] = {}
    models: dict[str, Any] = {}
    for kind, name in (("model", config.model), ("control", config.control)):
        clock = _clock()
        models[kind] = il.load_model(name, device=config.device)
        load = _clock() - clock
        studies[kind] = study_model(models[kind], name, config)
        studies[kind].seconds = {"load": load, **studies[kind].seconds}

    model, control = studies["model"], studies["control"]
    report = Report("Induction heads", subtitle=f"{config.model} vs the control {config.control}")
    report.text(
        f"Does **{config.model}** have induction heads, and does the one-layer control "
        f"**{config.control}** lack them? An induction head (Olsson et al. 2022) completes "
        "[A][B] ... [A] -> [B]: at the second [A] it attends to the token after the first [A] "
        "and copies it. It needs a previous-token head in an earlier layer whose output the "
        "induction head's keys read (K-composition), so a one-layer attention-only model, "
        "which can only learn skip-trigrams, cannot have one (Elhage et al. 2021). Every mean "
        "below comes with its standard error (sem) over sequences or prompts."
    )
    _loss_section(config, run, report, studies)
    _scores_section(config, run, report, studies)
    _patching_section(config, run, report, studies)
    _k_section(config, run, report, model)
    _agreement_section(report, studies)
    _pattern_section(run, report, models["model"], model, config.seed)
    _timings_section(report, studies)
    run.save_json("induction.json", {kind: study_summary(s) for kind, s in studies.items()})
    run.log(
        step=None,
        **{f"{kind}_induction_gap": s.gap.value for kind, s in studies.items()},
    )
    found = ", ".join(f"L{layer}H{h}" for layer, h in model.induction_found) or "none"
    print(
        f"\n{config.model}: induction gap {model.gap.value:.2f} nats, induction heads by "
        f"attention {', '.join(model.roles.labels('induction')) or 'none'}, by patching {found}; "
        f"{config.control}: gap {control.gap.value:.3f} nats, induction heads "
        f"{', '.join(control.roles.labels('induction')) or 'none'}."
    )
    return report


def study_summary(study: ModelStudy) -> dict[str, Any]:
    """The numbers of one study as JSON-able data (saved as induction.json)."""
    from interplab.circuits.roles import head_label

    extra = study.gap.extra or {}
    summary: dict[str, Any] = {
        "name": study.name,
        "shape": list(study.shape),
        "induction_gap": {
            "mean": study.gap.value,
            "sem": extra.get("gap_std", math.nan) / math.sqrt(study.gap.n),
            "first_half_loss": extra.get("first_half_loss"),
            "repeated_half_loss": extra.get("repeated_half_loss"),
            "n": study.gap.n,
        },
        "scores": {
            role: {"mean": s.mean.tolist(), "sem": s.sem.tolist(), "n": s.n}
            for role, s in study.scores.scores.items()
        },
        "roles": study.roles.to_dict(),
        "role_grid": study.roles.roles,
        "thresholds": study.roles.thresholds,
        "patching": {
            "recovered": study.patching.values.tolist(),
            "sem": study.patching.sem.tolist(),
            "clean": study.patching.clean.mean,
            "corrupted": study.patching.corrupted.mean,
        },
        "task_gap": {"mean": study.task_gap.mean, "sem": study.task_gap.sem},
        "readable": study.readable,
        "induction_found": [head_label(*h) for h in study.induction_found],
        "receivers": [head_label(*h) for h in study.receivers],
        "k_paths": {},
        "previous_found": [head_label(*h) for h in study.previous_found],
        "agreement": {
            role: {
                "by_attention": a.by_attention,
                "by_patching": a.by_patching,
                "both": a.both,
                "jaccard": a.jaccard,
            }
            for role, a in agreements(study).items()
        },
        "seconds": study.seconds,
    }
    for via in study.k_paths:
        drop, sem = study.k_drop(via)  # type: ignore[misc]
        summary["k_paths"][via] = {"drop": drop.tolist(), "sem": sem.tolist()}
    return summary


# ---------------------------------------------------------------------- sections
def _gap_sem(study: ModelStudy) -> float:
    extra = study.gap.extra or {}
    return extra.get("gap_std", math.nan) / math.sqrt(study.gap.n)


def _loss_section(config: Config, run: Any, report: Any, studies: dict[str, ModelStudy]) -> None:
    report.section("Induction loss gap")
    rows = []
    for kind, s in studies.items():
        extra = s.gap.extra or {}
        rows.append(
            {
                "model": f"{s.name} ({kind})",
                "first-copy loss": extra.get("first_half_loss"),
                "repeated-copy loss": extra.get("repeated_half_loss"),
                "gap (nats)": s.gap.value,
                "± sem": _gap_sem(s),
                "sequences": s.gap.n,
            }
        )
    report.text(
        f"{config.n} sequences [BOS] r r, r = {config.seq_len} random single-token storyworld "
        "words (the scorecard's induction test). Loss is the mean next-token cross-entropy over "
        "r[1:] of each copy (the first token of a copy cannot be predicted); the gap is their "
        "difference, large when the model copies from the first occurrence."
    )
    report.table(rows, caption="mean over sequences; sem = standard error of the gap")
    run.save_figure("loss-by-position", _loss_figure(studies, config.seq_len))
    report.figure(
        run.path("figures/loss-by-position.png"),
        caption="Next-token loss at each position of [BOS] r r (mean ± sem over sequences); "
        "the dashed line marks the start of the second copy",
    )


def _scores_section(config: Config, run: Any, report: Any, studies: dict[str, ModelStudy]) -> None:
    from interplab.circuits.roles import ROLES, TEXT_PREVIOUS

    report.section("Attention-pattern role scores")
    t = thresholds(config)
    report.text(
        "Per head, the fraction of attention on a role's source position, averaged over "
        "sequences (Olsson et al. 2022): **previous-token** t -> t-1 (on the repeated "
        "sequences, and on storyworld text windows), **induction** second copy's token i -> "
        "first copy's token i+1, **duplicate-token** second copy's token i -> first copy's "
        f"token i. Thresholds: previous-token {t['previous-token']}, induction "
        f"{t['induction']}, duplicate-token {t['duplicate-token']}; a head passing several "
        "gets the role with the largest score / threshold."
    )
    for kind, s in studies.items():
        order = [r for r in ("previous-token", TEXT_PREVIOUS, "induction", "duplicate-token")]
        order = [r for r in order if r in s.scores.scores]
        run.save_figure(f"scores-{kind}", s.scores.plot(order))
        report.figure(
            run.path(f"figures/scores-{kind}.png"),
            caption=f"{s.name} ({kind}): mean role scores per head (layer x head)",
        )
        classified = [
            (layer, h)
            for layer, row in enumerate(s.roles.roles)
            for h, r in enumerate(row)
            if r in ROLES
        ]
        if classified:
            rows = s.scores.table(classified)
            for row, (layer, h) in zip(rows, classified, strict=True):
                row["role"] = s.roles.roles[layer][h]
            report.table(rows, caption=f"{s.name}: heads given a role (mean ± sem)")
        else:
            best = s.scores["induction"].top(1)[0]
            report.text(
                f"**{s.name}: no head reaches any threshold.** Its highest induction score is "
                f"{best[0]} with {best[1].mean:.3f} ± {best[1].sem:.3f}."
            )


def _patching_section(
    config: Config, run: Any, report: Any, studies: dict[str, ModelStudy]
) -> None:
    report.section("Patching: which heads carry induction")
    report.text(
        f"{config.n_patch} induction-task prompts (`interplab.data.tasks.induction`): "
        f"{config.patch_seq_len} random storyworld words, then the same words again; the "
        "corrupted twin has fresh words in the second half. Metric: mean log-probability of "
        "the clean repeated tokens r[1:] in the second half. Each head's output "
        "(`attn.hook_z`) is patched from the clean run into the corrupted run, one head at a "
        "time; *recovered* = (patched - corrupted) / (clean - corrupted). A head is **found** "
        f"when |recovered| >= {config.patch_threshold} and |recovered| > 2 sem, and only when "
        f"the clean prompts beat the corrupted ones by at least {config.min_gap} nats per token "
        "(otherwise there is no behaviour for a head to carry)."
    )
    for kind, s in studies.items():
        gap = s.task_gap
        found = ", ".join(f"L{layer}H{h}" for layer, h in s.induction_found) or "none"
        report.metrics(
            {
                "clean metric (log p per repeated token)": s.patching.clean.mean,
                "corrupted metric": s.patching.corrupted.mean,
                "clean - corrupted (paired)": gap.mean,
                "± sem": gap.sem,
                "patching readable": "yes" if s.readable else "no",
                "heads found": found,
            },
            caption=f"{s.name} ({kind})",
        )
        if not s.readable:
            report.text(
                f"**{s.name}: the clean prompts' repeated tokens get only {gap.mean:.3f} ± "
                f"{gap.sem:.3f} nats more log-probability than the corrupted ones (< "
                f"{config.min_gap}), so there is no induction behaviour to patch and no head "
                "is found.**"
            )
            continue
        negative = [f"L{a}H{b}" for a, b in s.induction_found if float(s.patching.values[a, b]) < 0]
        if negative:
            report.text(
                f"{', '.join(negative)}: found with a **negative** effect: its clean output, "
                "patched in alone, lowers the repeated tokens' probability in the corrupted "
                "run. Its attention still follows the induction pattern; what it writes helps "
                "only together with the other heads' clean outputs (or works against copying)."
            )
        run.save_figure(
            f"patching-{kind}",
            s.patching.plot(
                title=f"{s.name}: recovered by patching each head (clean -> corrupted)"
            ),
        )
        report.figure(
            run.path(f"figures/patching-{kind}.png"),
            caption=f"{s.name}: normalised effect of patching each head's output "
            "(0 = corrupted, 1 = clean)",
        )


def _k_section(config: Config, run: Any, report: Any, study: ModelStudy) -> None:
    report.section("K-composition: what feeds the induction heads' keys")
    if not study.receivers:
        report.text(
            f"{study.name} has no induction head in a layer >= 1, so there are no keys to "
            "path-patch into."
        )
        return
    receivers = ", ".join(f"L{layer}H{h}" for layer, h in study.receivers)
    report.text(
        f"Path patching (Wang et al. 2022) from every earlier head into the **keys** of "
        f"{receivers}: the receivers' key input is recomputed with one sender's output taken "
        "from a run on an independent repeated sequence, everything else clean. (The task's "
        "own corruption changes only the second half, and the keys the induction head matches "
        "are in the first.) *Drop* = 1 - (patched - corrupted) / (clean - corrupted): the "
        "fraction of the behaviour lost. 'via MLPs' lets the sender's change pass through MLPs "
        "(an early MLP often relays previous-token information); 'direct' freezes them. Heads "
        f"with drop (via MLPs, or direct in attention-only models) >= {config.patch_threshold} "
        "and > 2 sem are found as previous-token heads by patching."
    )
    if study.k_gap is not None:
        report.metrics(
            {
                "clean - corrupted (independent sequence)": study.k_gap.mean,
                "± sem": study.k_gap.sem,
            },
            caption="log-probability per repeated token, paired over prompts",
        )
    rows = []
    n_layers, n_heads = study.shape
    top = max(layer for layer, _ in study.receivers)
    prev = study.scores["previous-token"]
    for layer in range(top):
        for h in range(n_heads):
            row: dict[str, Any] = {"head": f"L{layer}H{h}"}
            row["previous-token score"] = (
                f"{float(prev.mean[layer, h]):.3f} ± {float(prev.sem[layer, h]):.3f}"
            )
            for via in study.k_paths:
                drop, sem = study.k_drop(via)  # type: ignore[misc]
                row[f"drop via {via}"] = f"{float(drop[layer, h]):.3f} ± {float(sem[layer, h]):.3f}"
            row["found"] = "yes" if (layer, h) in study.previous_found else ""
            rows.append(row)
    report.table(rows, caption=f"{study.name}: senders in layers below {top} (mean ± sem)")
    if study.previous_found:
        best = max(float(prev.mean[layer, h]) for layer, h in study.previous_found)
        spread = (
            f"None of them attends mostly to the previous token (highest previous-token score "
            f"{best:.2f}): the previous-token signal the keys read is spread over several heads."
            if best < 0.5
            else f"The strongest of them puts {best:.2f} of its attention on the previous token."
        )
        report.text(
            f"Found by K-composition patching: "
            f"{', '.join(f'L{a}H{b}' for a, b in study.previous_found)}. {spread}"
        )


def _agreement_section(report: Any, studies: dict[str, ModelStudy]) -> None:
    report.section("Agreement: patching vs attention scores")
    for kind, s in studies.items():
        lines = [f"**{s.name}** ({kind}):"]
        found = agreements(s)
        lines.append("- " + found["induction"].sentence("Induction heads"))
        if "previous-token" in found:
            lines.append(
                "- "
                + found["previous-token"].sentence(
                    "Previous-token heads feeding the induction heads' keys"
                )
            )
        report.text("\n".join(lines))
        rows = _agreement_rows(s)
        if rows:
            report.table(
                rows,
                caption=f"{s.name}: heads with a role or found by patching (mean ± sem)",
            )
    control = studies["control"]
    if not control.roles.heads("induction") and not control.induction_found:
        best = control.scores["induction"].top(1)[0]
        report.text(
            f"**No induction head is found in the control {control.name}**: no head's induction "
            f"score reaches the threshold (highest: {best[0]}, {best[1].mean:.3f} ± "
            f"{best[1].sem:.3f}), its induction loss gap is {control.gap.value:.3f} ± "
            f"{_gap_sem(control):.3f} nats, and patching finds no head."
        )
    else:
        report.text(
            f"**The control {control.name} shows induction-like heads**: by attention "
            f"{', '.join(control.roles.labels('induction')) or 'none'}, by patching "
            f"{', '.join(f'L{a}H{b}' for a, b in control.induction_found) or 'none'}."
        )


def _agreement_rows(s: ModelStudy) -> list[dict[str, Any]]:
    heads = sorted(
        {
            (layer, h)
            for layer, row in enumerate(s.roles.roles)
            for h, r in enumerate(row)
            if r != "none"
        }
        | set(s.induction_found)
        | set(s.previous_found)
    )
    rows = []
    drop = s.k_drop("mlps") or s.k_drop("direct")
    for layer, h in heads:
        row: dict[str, Any] = {"head": f"L{layer}H{h}", "attention role": s.roles.roles[layer][h]}
        for role in ("previous-token", "induction", "duplicate-token"):
            sc = s.scores[role]
            row[role] = f"{float(sc.mean[layer, h]):.3f} ± {float(sc.sem[layer, h]):.3f}"
        # no behaviour: the normalised effect divides by a difference that is noise
        row["recovered"] = (
            f"{float(s.patching.values[layer, h]):.3f} ± {float(s.patching.sem[layer, h]):.3f}"
            if s.readable
            else "n/a"
        )
        # heads at or after the last receiver's layer have no path to its keys
        row["K drop"] = (
            f"{float(drop[0][layer, h]):.3f} ± {float(drop[1][layer, h]):.3f}"
            if drop is not None and layer < max(r[0] for r in s.receivers)
            else ""
        )
        found = []
        if (layer, h) in s.induction_found:
            found.append("induction")
        if (layer, h) in s.previous_found:
            found.append("previous-token (K)")
        row["found by patching"] = ", ".join(found)
        rows.append(row)
    return rows


def _pattern_section(run: Any, report: Any, model: Any, study: ModelStudy, seed: int) -> None:
    import torch

    from interplab.circuits import plot_attention
    from interplab.circuits.capture import capture
    from interplab.circuits.roles import repeated_sequences

    report.section("The top induction head's attention")
    (label, estimate) = study.scores["induction"].top(1)[0]
    layer, head = (int(x) for x in label[1:].split("H"))
    seq_len = study.scores.seq_len
    tokens = repeated_sequences(model, min(16, study.scores.n), seq_len, seed)
    name = f"blocks.{layer}.attn.hook_pattern"
    device = next(model.parameters()).device
    _, acts = capture(model, tokens.to(device), [name])
    mean = acts[name][:, head].float().mean(0).cpu()
    run.save_figure("top-induction-head-mean", _mean_pattern_figure(mean, seq_len, label))
    report.text(
        f"{label} has the highest induction score ({estimate.mean:.3f} ± {estimate.sem:.3f}). "
        f"First figure: its attention pattern averaged over {tokens.shape[0]} sequences "
        f"[BOS] r r (L = {seq_len}; grey lines mark the copies); an induction head lights up "
        "the stripe in the lower-left block one position right of the earlier occurrence "
        "(key = query - L + 1). Second figure: one sequence with its tokens."
    )
    report.figure(
        run.path("figures/top-induction-head-mean.png"),
        caption=f"{study.name} {label}: mean attention pattern (query rows, key columns)",
    )
    with torch.inference_mode():
        fig = plot_attention(model, tokens[0], layer, [head])
    run.save_figure("top-induction-head-example", fig)
    report.figure(
        run.path("figures/top-induction-head-example.png"),
        caption=f"{study.name} {label} on one repeated sequence",
    )


def _timings_section(report: Any, studies: dict[str, ModelStudy]) -> None:
    report.section("Timings")
    rows = [
        {"model": s.name, **{k: round(v, 2) for k, v in s.seconds.items()}}
        for s in studies.values()
    ]
    report.table(rows, caption="wall seconds per stage", float_format="{:.2f}")


# ---------------------------------------------------------------------- figures
def _loss_figure(studies: dict[str, ModelStudy], seq_len: int) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for kind, s in studies.items():
        loss = s.position_loss.double()
        mean = loss.mean(0)
        sem = loss.std(0) / math.sqrt(loss.shape[0])
        x = range(1, loss.shape[1] + 1)  # position of the predicted token
        ax.plot(x, mean.numpy(), label=f"{s.name} ({kind})")
        ax.fill_between(x, (mean - sem).numpy(), (mean + sem).numpy(), alpha=0.25)
    prefix = studies["model"].position_loss.shape[1] + 1 - 2 * seq_len
    ax.axvline(prefix + seq_len, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("position of the predicted token")
    ax.set_ylabel("loss (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _mean_pattern_figure(mean: Any, seq_len: int, label: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    image = ax.imshow(mean.numpy(), cmap="Blues", vmin=0, vmax=max(float(mean.max()), 1e-6))
    prefix = mean.shape[0] - 2 * seq_len
    for edge in (prefix - 0.5, prefix + seq_len - 0.5):
        ax.axhline(edge, color="grey", linewidth=0.6)
        ax.axvline(edge, color="grey", linewidth=0.6)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(f"{label}: mean attention on [BOS] r r", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig
