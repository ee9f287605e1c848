"""Recipe: grokking modular addition, reverse-engineered with Fourier progress measures.

Reproduces the core of Nanda et al. 2023 ("Progress measures for grokking via mechanistic
interpretability") on the paper's one-layer, LayerNorm-free transformer:
1. train on 30% of all (a + b) mod 113 pairs with AdamW (lr 1e-3, weight decay 1, full
   batch): train accuracy saturates within a few hundred steps, test accuracy thousands of
   steps later;
2. the trained embedding is sparse in the Fourier basis: a handful of key frequencies hold
   most of its norm, and MLP neurons cluster by frequency;
3. progress measures over checkpoints: restricted loss (only the key frequencies' logit
   directions) falls before the test loss, excluded loss (key frequencies removed) rises,
   and the Gini coefficient of the Fourier norms grows;
4. Grokfast (Lee et al. 2024): the EMA gradient filter on the same seed and data, and how
   many steps it takes to generalise.

    interplab run grokking            # p = 113, the paper's setting (see DEFAULTS for time)
    interplab run grokking --fast     # p = 31, 70% train split, lr 1e-2: about a minute
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from interplab.errors import InterplabError

if TYPE_CHECKING:  # pragma: no cover
    from interplab.runs import Report, Run
    from interplab.toys.modular import ModularConfig, ModularResult

DESCRIPTION = (
    "Grokking (a + b) mod p (Nanda et al. 2023): curves, key Fourier frequencies, restricted/"
    "excluded loss, Gini, and steps to generalise with and without the Grokfast EMA filter."
)


@dataclass
class Config:
    """Settings of the grokking recipe; None picks the full (paper) or fast default."""

    fast: bool = False
    """Quick run: p = 31, 70% train split, d_model 64, d_mlp 128, lr 1e-2 (about a minute)."""
    p: int | None = None
    """Prime modulus (default 113 as in the paper, fast 31)."""
    steps: int | None = None
    """Full-batch AdamW steps of the run without filter (default 12,000, fast 400)."""
    train_fraction: float | None = None
    """Share of the p² pairs used for training (default 0.3 as in the paper, fast 0.7)."""
    seed: int = 0
    """Seed of the weights and of the train/test split (shared by both runs)."""
    device: str = "cpu"
    """Torch device, e.g. "cpu" or "cuda"."""
    compare_grad_filter: bool = True
    """Also train with the Grokfast EMA filter on the same seed and compare steps to generalise."""
    filter_alpha: float = 0.98
    """EMA momentum of the Grokfast filter (Grokfast: 0.98)."""
    filter_lamb: float = 2.0
    """Amplification of the filtered gradient (Grokfast: 2.0)."""

    def __post_init__(self) -> None:
        for name in ("p", "steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise InterplabError(f"{name} must be a positive integer or None, got {value!r}.")
        if self.train_fraction is not None and not 0 < self.train_fraction < 1:
            raise InterplabError(
                f"train_fraction must be in (0, 1) or None, got {self.train_fraction!r}."
            )
        # Build the training config once so bad combinations fail before any work.
        self.modular_config()

    def resolved(self, name: str) -> Any:
        """The value of an optional field, with None replaced by the full or fast default."""
        value = getattr(self, name)
        if value is not None:
            return value
        full, fast = DEFAULTS[name]
        return fast if self.fast else full

    def modular_config(self, **overrides: Any) -> ModularConfig:
        """The `ModularConfig` of the run without filter (fields overridable)."""
        from interplab.toys.modular import ModularConfig

        steps = self.resolved("steps")
        settings: dict[str, Any] = dict(
            p=self.resolved("p"),
            train_fraction=self.resolved("train_fraction"),
            steps=steps,
            seed=self.seed,
            device=self.device,
            eval_every=max(1, min(100, steps // 100)),
            checkpoint_every=max(1, steps // 60),
            filter_alpha=self.filter_alpha,
            filter_lamb=self.filter_lamb,
        )
        if self.fast:
            settings.update(d_model=64, d_mlp=128, lr=1e-2, eval_every=10, checkpoint_every=25)
        settings.update(overrides)
        return ModularConfig(**settings)


#: field -> (full default, fast default)
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "p": (113, 31),
    "steps": (12_000, 400),
    "train_fraction": (0.3, 0.7),
}


def run(config: Config, run: Run) -> Report:
    """Train, analyse and compare; save curves, measures and figures into `run`."""
    from interplab.runs import Report

    base = config.modular_config()
    report = Report(
        f"Grokking (a + b) mod {base.p}",
        subtitle="Nanda et al. 2023 progress measures and Grokfast (Lee et al. 2024), measured",
    )
    main = _train_and_curves(config, base, run, report)
    key = _fourier(main, run, report)
    _progress(main, key.frequencies, run, report)
    if config.compare_grad_filter:
        _compare_filter(config, main, run, report)
    return report


def _setting_text(c: ModularConfig) -> str:
    return (
        f"One layer, d_model {c.d_model}, {c.n_heads} heads of {c.d_head}, d_mlp {c.d_mlp}, "
        f"ReLU, no LayerNorm, learned positions; tokens 'a b =' (vocabulary p + 1). "
        f"{c.operation} mod {c.p}, {c.train_fraction:.0%} of the {c.p**2} pairs for training, "
        f"full batch; AdamW lr {c.lr:g} ({c.warmup_steps}-step warmup), weight decay "
        f"{c.weight_decay:g}, betas {c.betas}; {c.steps} steps, seed {c.seed}."
    )


def _train_and_curves(
    config: Config, base: ModularConfig, run: Run, report: Report
) -> ModularResult:
    from interplab.toys.modular import train_modular

    main = train_modular(base, progress=True, run=run)
    run.save_json("curves", main.to_dict())
    fig = main.plot_curves()
    run.save_figure("curves", fig)
    s = main.summary()
    report.section("Training: memorisation, then generalisation")
    report.text(
        _setting_text(base)
        + f"\n\nTraining took {main.seconds:.0f} s ({1000 * main.seconds_per_step:.1f} ms per "
        f"step on {base.device}).\n\n"
        f"- **memorised** (train accuracy ≥ {base.generalisation_threshold}): step "
        f"{main.steps_to_memorise}\n"
        f"- **generalised** (test accuracy ≥ {base.generalisation_threshold}): step "
        f"{main.steps_to_generalise} (paper, p = 113: memorisation until ~1.4k steps, circuit "
        "formation until ~9.4k, cleanup, when the test loss falls, until ~13.3k)\n"
        f"- final test accuracy {s['final_test_accuracy']:.4f}, test loss "
        f"{s['final_test_loss']:.3g}, train loss {s['final_train_loss']:.3g}"
    )
    if config.fast:
        report.text(
            "Fast mode trains on 70% of the pairs with a 10× learning rate, so the gap between "
            "memorising and generalising is short (hundreds of steps, not thousands); run "
            "without --fast for the paper's setting."
        )
    report.figure(fig, caption="Train and test loss (log scale) and accuracy over training")
    report.metrics(s, caption="Run without gradient filter")
    return main


def _fourier(main: ModularResult, run: Run, report: Report) -> Any:
    from interplab.toys import modular_fourier as mf
    from interplab.toys.modular import modular_model

    p = main.config.p
    key = mf.key_frequencies(main.model, p)
    embed = key.embedding_norms
    unembed = mf.fourier_unembedding_norms(main.model.W_U, p)
    init = modular_model(main.config)  # same seed: the weights training started from
    init_embed = mf.fourier_embedding_norms(init.W_E, p)
    n_key = max(len(key.frequencies), 1)
    numbers = {
        "key frequencies (neuron clusters)": ", ".join(map(str, key.frequencies)) or "none",
        "key frequencies (embedding norm² > 2× mean)": ", ".join(map(str, key.from_embedding))
        or "none",
        "neurons in key clusters": key.fraction_clustered,
        f"share of W_E Fourier norm² in top {n_key} frequencies": embed.top_fraction(n_key),
        "same at initialisation": init_embed.top_fraction(n_key),
        "Gini of W_E frequency norms": embed.gini(),
        "Gini of W_E frequency norms at initialisation": init_embed.gini(),
        "Gini of W_U frequency norms": unembed.gini(),
    }
    run.save_json("fourier", {**key.to_dict(), "summary": numbers})
    run.log(experiment="fourier", **key.to_dict())
    fig_embed = embed.plot("Fourier norms of W_E", key=key.frequencies)
    run.save_figure("fourier_embedding", fig_embed)
    fig_unembed = unembed.plot("Fourier norms of W_U", key=key.frequencies)
    run.save_figure("fourier_unembedding", fig_unembed)
    fig_neurons = key.plot()
    run.save_figure("neuron_clusters", fig_neurons)

    report.section("Key frequencies")
    report.text(
        f"The embedding of the numbers 0..{p - 1} written in the Fourier basis of Z_{p} "
        f"(constant, cos and sin of each frequency k = 1..{(p - 1) // 2}). MLP neurons are "
        f"assigned to the frequency explaining the most of their variance over the (a, b) "
        f"grid (hook `blocks.0.mlp.hook_post` at '='); a frequency is key when at least "
        f"{key.min_neurons} neurons have ≥ {key.threshold:.0%} of their variance there. "
        "Paper (p = 113): 5 key frequencies, W_E sparse in the Fourier basis, neurons "
        "clustered by frequency."
    )
    report.metrics(numbers)
    report.figure(fig_embed, caption="Norm of W_E per frequency (red: key)")
    report.figure(fig_unembed, caption="Norm of W_U per frequency (red: key)")
    report.figure(fig_neurons, caption="Neuron clusters by frequency")
    return key


def _progress(main: ModularResult, frequencies: list[int], run: Run, report: Report) -> None:
    from interplab.toys import modular_fourier as mf

    started = time.perf_counter()
    measures = mf.progress_measures(main, frequencies)
    seconds = time.perf_counter() - started
    run.save_json("progress_measures", measures.to_dict())
    fig = measures.plot()
    run.save_figure("progress_measures", fig)
    n = len(measures.steps)
    picks = sorted({0, n // 8, n // 4, 3 * n // 8, n // 2, 3 * n // 4, n - 1})
    rows = [
        {
            "step": measures.steps[i],
            "train loss": measures.train_loss[i],
            "test loss": measures.test_loss[i],
            "restricted loss": measures.restricted_loss[i],
            "excluded loss": measures.excluded_loss[i],
            "Gini W_E": measures.gini_embed[i],
            "Gini W_U": measures.gini_unembed[i],
            "Σ w²": measures.weight_norm[i],
        }
        for i in picks
    ]
    report.section("Progress measures")
    report.text(
        f"At each of {n} checkpoints ({seconds:.0f} s): **restricted loss** keeps only the "
        "logit components along cos(w_k(a + b − c)) and sin(w_k(a + b − c)) for the key "
        f"frequencies {frequencies} (all pairs); **excluded loss** removes exactly those "
        "components and is measured on the training pairs; the **Gini coefficient** of the "
        "Fourier frequency norms of W_E and W_U measures their sparsity. Paper: restricted loss "
        "falls well before test loss, excluded loss rises during circuit formation while train "
        "loss stays low, Gini grows, and the weight norm falls during cleanup."
    )
    report.figure(fig, caption="Progress measures over training")
    report.table(rows, caption="Progress measures at selected checkpoints")


def _compare_filter(config: Config, main: ModularResult, run: Run, report: Report) -> None:
    from interplab.toys.modular import plot_filter_comparison, train_modular

    filtered_config = config.modular_config(
        grad_filter="ema", stop_when_generalised=True, checkpoint_every=None
    )
    filtered = train_modular(filtered_config, progress=True, run=run)
    run.save_json("curves_ema", filtered.to_dict())
    fig = plot_filter_comparison({"no filter": main, "Grokfast EMA": filtered})
    run.save_figure("grad_filter", fig)
    rows = [
        {
            "gradient filter": name,
            "steps to memorise": r.steps_to_memorise,
            "steps to generalise": r.steps_to_generalise,
            "ms per step": 1000 * r.seconds_per_step,
        }
        for name, r in (
            ("none", main),
            (f"EMA (α {config.filter_alpha}, λ {config.filter_lamb})", filtered),
        )
    ]
    base, fast = main.steps_to_generalise, filtered.steps_to_generalise
    if base is not None and fast is not None and fast > 0:
        verdict = f"the EMA filter generalised {base / fast:.1f}× sooner ({fast} vs {base} steps)"
    elif fast is not None:
        verdict = (
            f"the EMA filter generalised at step {fast}; without it the model had not "
            f"generalised by step {main.steps_trained}"
        )
    elif base is not None:
        verdict = f"without the filter the model generalised at step {base}; with it, not within {filtered.steps_trained} steps"
    else:
        verdict = "neither run generalised within its steps"
    report.section("Grokfast: the EMA gradient filter")
    report.text(
        "Same seed, data and optimiser; before each AdamW step the gradient g becomes "
        f"g + λ·EMA(g) (α = {config.filter_alpha}, λ = {config.filter_lamb}), which amplifies "
        "its slowly varying component (Lee et al. 2024 report grokking up to ~50× sooner on "
        f"algorithmic data). Here {verdict}."
    )
    report.figure(fig, caption="Test accuracy with and without the EMA filter")
    report.table(rows, caption="Steps to memorise / generalise (accuracy ≥ 0.99)")
