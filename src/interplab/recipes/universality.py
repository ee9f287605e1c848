"""Universality of head roles: which roles appear at which layer and head across models.

`interplab run universality` runs the induction recipe's per-model study
(`interplab.recipes.induction.study_model`) on each model of a list, by default
`storyworld-2l` and its retrained seeds `storyworld-2l-seed1..4`: attention-pattern role
scores (previous-token, induction, duplicate-token) classified with stated thresholds, head
patching on the induction task, and K-composition path patching into the induction heads'
keys. It reports a table role -> (model: heads), a grid of every model's heads coloured by
role, and which roles are universal (present in every model) and at which layers. Head
indices of independently trained seeds are arbitrary (permuting the heads of a layer gives
the same function), so a role is compared across seeds by layer; models that share
ancestry (a fine-tune and its base) can keep the same indices too, which is reported.
A model that is not trained yet stops the run before any work, naming
`interplab train-organism NAME`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from interplab.errors import InterplabError
from interplab.recipes.induction import (
    ModelStudy,
    check_study_config,
    require_models,
    study_model,
    study_summary,
)

DESCRIPTION = (
    "Head roles (previous-token, induction, duplicate-token; by attention and by patching) "
    "across models: which are universal and at which layers."
)

PATCH_ROLES = {
    "induction (patching)": "induction",
    "previous-token (K-composition patching)": "previous-token",
}
"""Role rows found by patching -> `ModelStudy.found` key."""
ATTENTION_ROLES = ("previous-token", "induction", "duplicate-token")


def _default_models() -> list[str]:
    return [f"storyworld-2l-seed{s}" for s in range(1, 5)] + ["storyworld-2l"]


@dataclass
class Config:
    models: list[str] = field(default_factory=_default_models)
    """Models to compare (comma-separated on the command line): organism names or local HF
    directories."""
    n: int = 64
    """Repeated sequences [BOS] r r for the loss gap and attention scores."""
    seq_len: int = 20
    """Length of r (tokens)."""
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
    """A head is found by patching when |effect| >= this (normalised) and > 2 sem."""
    min_gap: float = 0.5
    """Patching is read only when clean beats corrupted by at least this (nats per token)."""
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
        if isinstance(self.models, str) or not self.models:
            raise InterplabError(
                f"models must be a non-empty list of model names, got {self.models!r}."
            )
        self.models = [str(m).strip() for m in self.models]
        repeated = sorted({m for m in self.models if self.models.count(m) > 1})
        if repeated or not all(self.models):
            raise InterplabError(
                f"models must be distinct, non-empty names; got {self.models!r}"
                + (f" ({', '.join(repeated)} repeated)." if repeated else ".")
            )
        check_study_config(self)


def run(config: Config, run: Any) -> Any:
    import interplab as il
    from interplab.runs import Report

    require_models(config.models)
    studies: dict[str, ModelStudy] = {}
    for name in config.models:
        model = il.load_model(name, device=config.device)
        studies[name] = study_model(model, name, config)
        del model
    table = role_table(studies)
    universal = universality(studies)

    report = Report("Universality of head roles", subtitle=", ".join(config.models))
    report.text(
        f"Each of {len(studies)} models gets the induction recipe's per-model study: "
        "attention-pattern scores on [BOS] r r and storyworld text, classified with "
        f"thresholds previous-token {config.previous_token_threshold}, induction "
        f"{config.induction_threshold}, duplicate-token {config.duplicate_token_threshold} "
        "(see the `induction` recipe); induction heads found by patching each head's output "
        "on the induction task; and previous-token heads found by path patching into the "
        f"induction heads' keys (|effect| >= {config.patch_threshold}, > 2 sem). Head indices "
        "of separately trained seeds are arbitrary, so roles are compared by layer."
    )
    report.section("Models")
    report.table(_model_rows(studies), caption="mean ± sem over sequences")
    report.section("Roles by model")
    report.table(
        [
            {"role": role, **{m: ", ".join(h) or "-" for m, h in row.items()}}
            for role, row in table.items()
        ],
        caption="heads given each role, per model ('-' = none)",
    )
    run.save_figure("roles-grid", roles_figure(studies))
    report.figure(
        run.path("figures/roles-grid.png"),
        caption="Each model's heads (layer x head) coloured by attention role; the number is "
        "that role's score; '*' = found by patching (induction or K-composition)",
    )
    report.section("Which roles are universal")
    report.text(_universal_text(universal, list(studies)))
    run.save_json(
        "universality.json",
        {
            "models": {name: study_summary(s) for name, s in studies.items()},
            "table": table,
            "universal": universal,
        },
    )
    for name, s in studies.items():
        run.log(step=None, model=name, induction_gap=s.gap.value, roles=s.roles.to_dict())
    print("\n" + _universal_text(universal, list(studies)).replace("**", ""))
    return report


# ---------------------------------------------------------------------- tables
def _labels(heads: list[tuple[int, int]]) -> list[str]:
    return [f"L{layer}H{h}" for layer, h in heads]


def role_table(studies: dict[str, ModelStudy]) -> dict[str, dict[str, list[str]]]:
    """Role -> model -> head labels, for the attention roles and the patching-found ones."""
    table: dict[str, dict[str, list[str]]] = {}
    for role in ATTENTION_ROLES:
        table[role] = {name: s.roles.labels(role) for name, s in studies.items()}
    for row, key in PATCH_ROLES.items():
        table[row] = {name: _labels(s.found(key)) for name, s in studies.items()}
    return table


def universality(studies: dict[str, ModelStudy]) -> dict[str, dict[str, Any]]:
    """Per role: whether every model has it, the layers it sits at per model, the heads
    (layer, head) that have it in every model, and how many such shared heads chance alone
    gives (`shared_by_chance`).

    Head indices within a layer are arbitrary (permuting heads gives the same function), so
    the null keeps each model's number of role heads per layer and draws which ones at
    random: a head index is shared by all models with probability prod_m(k_m / n_heads),
    summed over the layer's heads and over layers. Shared heads at about that number say
    nothing about universality of the index; the layer is what can be compared.
    """
    out = {}
    n_heads = {name: study.shape[1] for name, study in studies.items()}
    for role, row in role_table(studies).items():
        layers = {m: sorted({int(h[1:].split("H")[0]) for h in heads}) for m, heads in row.items()}
        common = set.intersection(*(set(heads) for heads in row.values())) if row else set()
        chance = 0.0
        if row and len(set(n_heads.values())) == 1:
            heads = next(iter(n_heads.values()))
            for layer in set.union(*(set(v) for v in layers.values())):
                share = 1.0
                for labels in row.values():
                    share *= sum(h.startswith(f"L{layer}H") for h in labels) / heads
                chance += heads * share
        out[role] = {
            "in_every_model": all(row.values()),
            "n_models": sum(bool(h) for h in row.values()),
            "layers": layers,
            "same_heads": sorted(common),
            "shared_by_chance": chance,
        }
    return out


def _universal_text(universal: dict[str, dict[str, Any]], models: list[str]) -> str:
    lines = []
    every = [r for r, u in universal.items() if u["in_every_model"]]
    if every:
        lines.append(f"**Universal (in all {len(models)} models):** {', '.join(every)}.")
    else:
        lines.append(f"**No role appears in all {len(models)} models.**")
    for role, u in universal.items():
        layer_sets = {tuple(v) for v in u["layers"].values() if v}
        if not u["n_models"]:
            lines.append(f"- {role}: in no model.")
            continue
        where = (
            _always(next(iter(layer_sets)))
            if len(layer_sets) == 1 and u["in_every_model"]
            else "layers "
            + "; ".join(f"{m}: {', '.join(map(str, v)) or '-'}" for m, v in u["layers"].items())
        )
        same = (
            f"; the same heads in every model: {', '.join(u['same_heads'])} "
            f"({len(u['same_heads'])} shared; {u['shared_by_chance']:.2f} expected by chance "
            "with head indices drawn at random)"
            if u["same_heads"] and u["in_every_model"]
            else ""
        )
        lines.append(f"- {role}: {u['n_models']} of {len(models)} models, {where}{same}.")
    return "\n".join(lines)


def _always(layers: tuple[int, ...]) -> str:
    return f"always at layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"


def _model_rows(studies: dict[str, ModelStudy]) -> list[dict[str, Any]]:
    import math

    rows = []
    for name, s in studies.items():
        extra = s.gap.extra or {}
        label, best = s.scores["induction"].top(1)[0]
        rows.append(
            {
                "model": name,
                "layers x heads": f"{s.shape[0]} x {s.shape[1]}",
                "induction gap (nats)": s.gap.value,
                "± sem": extra.get("gap_std", math.nan) / math.sqrt(s.gap.n),
                "top induction head": label,
                "its induction score": f"{best.mean:.3f} ± {best.sem:.3f}",
                "patching readable": "yes" if s.readable else "no",
            }
        )
    return rows


# ---------------------------------------------------------------------- figure
ROLE_COLOURS = {
    "none": "#eeeeee",
    "previous-token": "#4c72b0",
    "induction": "#c44e52",
    "duplicate-token": "#55a868",
}


def roles_figure(studies: dict[str, ModelStudy]) -> Any:
    """One panel per model: its [layer, head] grid coloured by attention role, annotated with
    the role's score and '*' where patching found the head. Returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names = list(ROLE_COLOURS)
    cmap = ListedColormap([ROLE_COLOURS[r] for r in names])
    n = len(studies)
    max_layers = max(s.shape[0] for s in studies.values())
    max_heads = max(s.shape[1] for s in studies.values())
    fig, axes = plt.subplots(
        1, n, figsize=(0.55 * max_heads * n + 1.2 * n + 1, 0.5 * max_layers + 2.0), squeeze=False
    )
    for ax, (name, s) in zip(axes[0], studies.items(), strict=True):
        grid = [[names.index(r) for r in row] for row in s.roles.roles]
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=len(names) - 1, aspect="auto")
        found = set(s.induction_found) | set(s.previous_found)
        for layer, row in enumerate(s.roles.roles):
            for h, role in enumerate(row):
                text = f"{float(s.scores[role].mean[layer, h]):.2f}" if role != "none" else ""
                if (layer, h) in found:
                    text += "*"
                ax.text(h, layer, text, ha="center", va="center", fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(s.shape[1]))
        ax.set_yticks(range(s.shape[0]))
        ax.set_xlabel("head")
    axes[0][0].set_ylabel("layer")
    fig.legend(
        handles=[Patch(color=ROLE_COLOURS[r], label=r) for r in names],
        loc="lower center",
        ncol=len(names),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig
