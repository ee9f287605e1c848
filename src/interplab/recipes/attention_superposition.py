"""Recipe: attention superposition in one-layer attention-only toy transformers.

Skip-trigram tasks with more features than heads (Anthropic, "Circuits Updates — May 2023"
and "— July 2023"; Jermyn et al.'s OV-coherent follow-up), in both settings:
"ov_incoherent" (one source token, a destination per feature) and "ov_coherent" (a source
per feature, one destination). For each, several seeds are trained at once, and the best
is analysed: per-feature direct logit attribution of every head (features x heads
heatmap), participation ratio, accuracy, and QK/OV interference. A sweep over the number
of features at a fixed number of heads shows how the spreading depends on features/heads.

    interplab run attention-superposition          # ~3 min of one CPU core
    interplab run attention-superposition --fast   # ~20 s
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from interplab.errors import InterplabError

if TYPE_CHECKING:  # pragma: no cover
    from interplab.runs import Report, Run
    from interplab.toys.attention_superposition import (
        AttentionSuperpositionResult,
        FeatureHeads,
    )

DESCRIPTION = (
    "Attention superposition toys: skip-trigram features > heads (OV-incoherent and "
    "OV-coherent); per-feature head attribution, participation ratio and interference."
)

SETTINGS = ("ov_incoherent", "ov_coherent")


@dataclass
class Config:
    """Settings of the attention-superposition recipe; None picks the full or fast default."""

    fast: bool = False
    """Quick run (tens of seconds): fewer steps, seeds and sweep points."""
    n_features: int = 12
    """Skip-trigram features of the main experiment."""
    n_heads: int = 4
    """Attention heads (fewer than n_features)."""
    d_head: int = 4
    """Width of each head."""
    d_model: int = 32
    """Residual stream width."""
    seq_len: int = 10
    """Tokens per sequence."""
    steps: int | None = None
    """Adam steps per model (default 600, fast 250)."""
    n_instances: int | None = None
    """Seeds trained together per setting (default 4, fast 2)."""
    sweep_features: tuple[int, ...] | None = None
    """Feature counts of the sweep at fixed heads (default 2,4,8,16,24; fast 4,12)."""
    seed: int = 0
    """Seed of weights and data."""
    device: str = "cpu"
    """Torch device."""
    threads: int | None = 1
    """CPU threads for torch during the run (restored after); None keeps torch's setting."""

    def __post_init__(self) -> None:
        for name in ("n_features", "n_heads", "d_head", "d_model", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InterplabError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("steps", "n_instances", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise InterplabError(f"{name} must be a positive integer or None, got {value!r}.")
        if self.n_features <= self.n_heads:
            raise InterplabError(
                f"n_features ({self.n_features}) must exceed n_heads ({self.n_heads}): the "
                "experiment is about more skip-trigrams than heads."
            )
        if self.sweep_features is not None and (
            not self.sweep_features or any(f < 2 for f in self.sweep_features)
        ):
            raise InterplabError(
                f"sweep_features must list feature counts >= 2, got {self.sweep_features!r}."
            )

    def resolved_steps(self) -> int:
        return self.steps if self.steps is not None else (250 if self.fast else 600)

    def resolved_instances(self) -> int:
        return self.n_instances if self.n_instances is not None else (2 if self.fast else 4)

    def resolved_sweep(self) -> tuple[int, ...]:
        if self.sweep_features is not None:
            return tuple(self.sweep_features)
        return (4, 12) if self.fast else (2, 4, 8, 16, 24)


def run(config: Config, run: Run) -> Report:
    """Train both settings and the sweep, save figures and numbers into `run`, return the report."""
    import torch

    from interplab.runs import Report

    report = Report(
        "Attention superposition",
        subtitle="Skip-trigram features > heads in one-layer attention-only transformers "
        "(Anthropic circuits updates, May and July 2023)",
    )
    previous = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        _describe(config, report)
        for setting in SETTINGS:
            _main_experiment(config, setting, run, report)
        _sweep(config, run, report)
    finally:
        torch.set_num_threads(previous)
    return report


def _train(config: Config, setting: str, n_features: int) -> AttentionSuperpositionResult:
    from interplab.toys import attention_superposition as at

    return at.train_attention_superposition(
        at.AttentionSuperpositionConfig(
            task=at.SkipTrigramTask(setting=setting, n_features=n_features, seq_len=config.seq_len),
            n_heads=config.n_heads,
            d_head=config.d_head,
            d_model=config.d_model,
            n_instances=config.resolved_instances(),
            steps=config.resolved_steps(),
            batch_size=256 if config.fast else 512,
            seed=config.seed,
            device=config.device,
        ),
        progress=False,
    )


def _describe(config: Config, report: Report) -> None:
    report.section("Task and model")
    report.text(
        "A skip-trigram feature f is (a_f, b_f, c_f): source a_f somewhere in the context, "
        "destination b_f as the current token, answer c_f. Each sequence has "
        f"{config.seq_len - 1} filler tokens and then a destination; with probability 1/2 the "
        "feature's source replaces one filler and the answer is c_f, otherwise the answer is "
        "NULL (without these negatives the destination alone would give the answer).\n\n"
        "- **OV-incoherent**: one source token A for all features, one destination B_f each. "
        "A head attending to A writes the same OV(A) from every destination, so it cannot by "
        "itself give each destination its own answer.\n"
        "- **OV-coherent**: one source A_f per feature, one shared destination B. The QK "
        "circuit cannot tell features apart (one destination); the OV circuit must map many "
        f"sources to many answers, with rank <= d_head = {config.d_head} per head.\n\n"
        f"Model: one layer, attention only, {config.n_heads} heads of d_head {config.d_head}, "
        f"d_model {config.d_model}, learned positions, no LayerNorm (TransformerLens shapes; "
        "`AttentionSuperpositionResult.to_model()` gives the native hooked model). "
        f"{config.resolved_instances()} seeds per setting, {config.resolved_steps()} Adam "
        "steps (lr 1e-2, cosine), fresh batches. Attribution: for complete examples of f, "
        "each head's output dotted with u_f = W_U[:, c_f] - mean over answers (direct logit "
        "attribution); heads + direct path + biases sum exactly to c_f's centred logit."
    )


def _main_experiment(config: Config, setting: str, run: Run, report: Report) -> FeatureHeads:
    import torch

    result = _train(config, setting, config.n_features)
    analyses = [result.analyse(i) for i in range(result.loss.shape[0])]
    best = result.best_instance()
    a = analyses[best]
    per_seed_pr = torch.stack([x.participation_ratio.mean() for x in analyses])
    per_seed_spread = torch.tensor([float((x.heads_used > 1).sum()) for x in analyses])
    summary = a.summary()
    direct_share = (a.direct / a.logit).mean().item()
    source_share = (a.dla_via_source.sum(1) / a.dla.sum(1)).mean().item()
    run.save_json(
        f"{setting}",
        {
            "loss": result.loss.tolist(),
            "accuracy": result.accuracy.tolist(),
            "best_instance": best,
            "summary": summary,
            "dla": a.dla.tolist(),
            "dla_sem": a.dla_sem.tolist(),
            "direct": a.direct.tolist(),
            "participation_ratio": a.participation_ratio.tolist(),
            "heads_used": a.heads_used.tolist(),
            "attention_to_source": a.attention_to_source.tolist(),
            "qk_selectivity": a.qk_selectivity.tolist(),
            "ov_own": a.ov_own.tolist(),
            "ov_interference": a.ov_interference.tolist(),
            "per_seed_mean_participation_ratio": per_seed_pr.tolist(),
            "per_seed_features_on_more_than_one_head": per_seed_spread.tolist(),
            "seconds": result.seconds,
        },
    )
    run.log(experiment=setting, **summary, seconds=result.seconds)
    heat = run.save_figure(f"{setting}_dla", a.plot())
    circuits = run.save_figure(f"{setting}_circuits", a.plot_circuits())

    name = "OV-incoherent" if setting == "ov_incoherent" else "OV-coherent"
    pr_mean, pr_sem = _mean_sem(per_seed_pr)
    sp_mean, sp_sem = _mean_sem(per_seed_spread)
    helped = a.ov_own > 0  # pairs where the head's OV writes the feature's own answer
    ratio = a.ov_interference[helped] / a.ov_own[helped]
    interference = ratio.median().item() if ratio.numel() else math.nan
    report.section(f"{name}: {config.n_features} features, {config.n_heads} heads")
    report.text(
        f"Trained {result.loss.shape[0]} seeds in {result.seconds:.1f} s; evaluation accuracy "
        f"{', '.join(f'{v:.3f}' for v in result.accuracy.tolist())}, loss "
        f"{', '.join(f'{v:.2g}' for v in result.loss.tolist())}. Seed {best} (lowest loss) "
        "is shown.\n\n"
        f"- **spread over heads**: {summary['features_on_more_than_one_head']} of "
        f"{config.n_features} features get >= {a.share:.0%} of their positive head "
        f"attribution from more than one head; over seeds {sp_mean:.1f} ± {sp_sem:.1f} "
        f"(sem). Mean participation ratio {summary['mean_participation_ratio']:.2f} heads "
        f"(over seeds {pr_mean:.2f} ± {pr_sem:.2f}). Published finding (May 2023): with more "
        "skip-trigrams than heads, features are spread over several heads.\n"
        f"- **paths**: the direct path carries {direct_share:.0%} of c_f's centred logit on "
        f"average; of the heads' part, {source_share:.0%} comes from attending to the source "
        "(the rest from attending elsewhere, e.g. fillers or the destination itself).\n"
        f"- **interference**: over (feature, head) pairs whose OV circuit raises the feature's "
        f"own answer, the median ratio of the largest logit it writes for another feature's "
        f"answer to its own: {interference:.2f}; mean "
        f"attention from the destination to the source (best head) "
        f"{summary['mean_attention_to_source']:.2f}; NULL accuracy {summary['null_accuracy']:.3f}."
    )
    report.figure(heat, caption=f"{name}: DLA of each head (and the direct path) to c_f")
    report.figure(
        circuits,
        caption=f"{name}: OV circuit per head (sources x answers) and QK preference for the source",
    )
    report.table(a.rows(), caption=f"{name}: per feature (best seed)")
    return a


def _sweep(config: Config, run: Run, report: Report) -> None:
    import torch

    rows = []
    curves: dict[str, list[tuple[int, float, float]]] = {s: [] for s in SETTINGS}
    for setting in SETTINGS:
        for n_features in config.resolved_sweep():
            result = _train(config, setting, n_features)
            analyses = [result.analyse(i, n_per_feature=128) for i in range(result.loss.shape[0])]
            pr = torch.stack([x.participation_ratio.mean() for x in analyses])
            used = torch.stack([x.heads_used.float().mean() for x in analyses])
            acc = result.accuracy
            pr_mean, pr_sem = _mean_sem(pr)
            used_mean, used_sem = _mean_sem(used)
            curves[setting].append((n_features, pr_mean, pr_sem))
            rows.append(
                {
                    "setting": setting,
                    "features": n_features,
                    "features / heads": n_features / config.n_heads,
                    "accuracy (mean over seeds)": acc.mean().item(),
                    "participation ratio": pr_mean,
                    "participation ratio sem": pr_sem,
                    "heads used": used_mean,
                    "heads used sem": used_sem,
                }
            )
            run.log(
                experiment="sweep",
                setting=setting,
                n_features=n_features,
                participation_ratio=pr_mean,
                heads_used=used_mean,
                accuracy=acc.mean().item(),
            )
    run.save_json("sweep", {"rows": rows})
    png = run.save_figure("sweep", _plot_sweep(curves, config.n_heads))
    comparisons = []
    for setting, points in curves.items():
        few = [p[1] for p in points if p[0] <= config.n_heads]
        many = [p[1] for p in points if p[0] > config.n_heads]
        if few and many:
            comparisons.append(
                f"- **{setting}**: mean participation ratio {sum(few) / len(few):.2f} with "
                f"features <= heads, {sum(many) / len(many):.2f} with features > heads"
            )
    report.section("Sweep: number of features at fixed heads")
    report.text(
        f"{config.n_heads} heads, feature counts {', '.join(map(str, config.resolved_sweep()))}; "
        "participation ratio averaged over features, then mean ± sem over seeds. A feature "
        "with its own head would have ratio 1. If the ratio is already well above 1 with "
        "features <= heads, spreading over heads is what gradient descent does here anyway, "
        "not something forced by having more features than heads.\n\n" + "\n".join(comparisons)
    )
    report.figure(png, caption="Mean participation ratio against features per head")
    report.table(rows, caption="Sweep")


def _plot_sweep(curves: dict[str, list[tuple[int, float, float]]], n_heads: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for setting, points in curves.items():
        xs = [p[0] / n_heads for p in points]
        ax.errorbar(
            xs,
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            marker="o",
            capsize=3,
            label=setting,
        )
    ax.axvline(1.0, color="0.6", lw=0.6, ls=":")
    ax.axhline(1.0, color="0.6", lw=0.6, ls=":")
    ax.set(
        xlabel="features / heads",
        ylabel="mean participation ratio (heads)",
        ylim=(0, n_heads + 0.2),
    )
    ax.legend(fontsize=8)
    return fig


def _mean_sem(values) -> tuple[float, float]:
    n = values.numel()
    mean = values.float().mean().item()
    sem = values.float().std().item() / math.sqrt(n) if n > 1 else math.nan
    return mean, sem
