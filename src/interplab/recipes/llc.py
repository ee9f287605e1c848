"""Recipe: the local learning coefficient (LLC), checked on known cases and tracked over
grokking.

1. Known values: SGLD estimates (`interplab.slt.estimate_llc`, Lau et al. 2023) on
   Gaussian regressions whose learning coefficient is known in closed form: a regular
   linear regression (λ = d/2), normal-crossing models y = (Π w_i^k_i) x at w0 = 0
   (λ = min 1/(2 k_i): 1/2, 1/4, 1/6 for one weight), and reduced-rank regression
   (Aoyagi and Watanabe 2005). Beside the true λ the table gives, where it can be computed
   exactly, the finite-nβ value the sampler targets (quadrature over one or two weights,
   or the exact SGLD stationary value of a quadratic loss), separating sampler error from
   the asymptotic gap.
2. LLC over training: a one-layer transformer learns (a + b) mod p (the grokking recipe's
   fast setting); the LLC of the training loss is estimated at each checkpoint and plotted
   beside the train and test loss.

    interplab run llc            # ~10 minutes of one CPU core
    interplab run llc --fast     # a smoke run: seconds, small chains, tiny grokking model
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from interplab.errors import InterplabError

if TYPE_CHECKING:  # pragma: no cover
    from interplab.runs import Report, Run
    from interplab.slt import LLCResult

DESCRIPTION = (
    "Local learning coefficient (Lau et al. 2023): SGLD estimates against known values "
    "(regular, normal crossing, reduced-rank regression) and the LLC over a grokking run."
)


@dataclass
class Config:
    """Settings of the LLC recipe; None picks the full or fast default."""

    fast: bool = False
    """Smoke run in seconds: three known-value models with few draws and a tiny grokking run."""
    known_values: bool = True
    """Run the known-value checks (section 1)."""
    grokking: bool = True
    """Run the LLC-over-training curve of a grokking model (section 2)."""
    p: int | None = None
    """Prime modulus of the grokking task (default 31, fast 13)."""
    train_steps: int | None = None
    """Full-batch AdamW steps of the grokking run (default 400, fast 60)."""
    checkpoint_every: int | None = None
    """Steps between the checkpoints whose LLC is estimated (default 40, fast 20)."""
    chains: int | None = None
    """SGLD chains per grokking checkpoint (default 4, fast 2)."""
    burn_in: int | None = None
    """SGLD burn-in steps per grokking checkpoint (default 100, fast 5)."""
    draws: int | None = None
    """SGLD draws per chain per grokking checkpoint (default 150, fast 15)."""
    llc_lr: float = 3e-4
    """SGLD step size for the grokking model (with γ = 100 and batch 128, 1e-3 lets the
    traces climb far above L_n(w*); 1e-4 was still drifting after 300 steps)."""
    localization: float = 100.0
    """Localisation γ for the grokking model (Lau et al.'s default)."""
    batch_size: int = 128
    """SGLD minibatch size for the grokking model (training pairs; β = 1/log n)."""
    seed: int = 0
    """Seed of the data, the grokking run and the SGLD chains."""
    device: str = "cpu"
    """Torch device, e.g. "cpu" or "cuda"."""
    threads: int | None = 1
    """CPU threads for torch during the run (restored after); None keeps torch's setting."""

    def __post_init__(self) -> None:
        from interplab.toys.modular import is_prime

        for name in ("p", "train_steps", "checkpoint_every", "chains", "draws", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise InterplabError(f"{name} must be a positive integer or None, got {value!r}.")
        if self.burn_in is not None and self.burn_in < 0:
            raise InterplabError(f"burn_in must be >= 0 or None, got {self.burn_in!r}.")
        if self.p is not None and (self.p < 3 or not is_prime(self.p)):
            raise InterplabError(f"p must be an odd prime, got {self.p}.")
        if not (math.isfinite(self.llc_lr) and self.llc_lr > 0):
            raise InterplabError(f"llc_lr must be > 0, got {self.llc_lr!r}.")
        if not (math.isfinite(self.localization) and self.localization >= 0):
            raise InterplabError(f"localization must be >= 0, got {self.localization!r}.")
        if isinstance(self.batch_size, bool) or self.batch_size <= 0:
            raise InterplabError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if not (self.known_values or self.grokking):
            raise InterplabError(
                "known_values and grokking are both off: nothing to do; enable at least one."
            )

    def resolved(self, name: str) -> Any:
        """The value of an optional field, with None replaced by the full or fast default."""
        value = getattr(self, name)
        if value is not None:
            return value
        full, fast = _DEFAULTS[name]
        return fast if self.fast else full


#: field -> (full default, fast default)
_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "p": (31, 13),
    "train_steps": (400, 60),
    "checkpoint_every": (40, 20),
    "chains": (4, 2),
    "burn_in": (100, 5),
    "draws": (150, 15),
}


def run(config: Config, run: Run) -> Report:
    """Estimate the known cases and the grokking curve; save tables, figures and JSON."""
    import torch

    from interplab.runs import Report

    report = Report(
        "Local learning coefficient",
        subtitle="SGLD estimates (Lau et al. 2023) against closed forms, and over grokking",
    )
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        if config.known_values:
            _known_values(config, run, report)
        if config.grokking:
            _grokking_curve(config, run, report)
    finally:
        torch.set_num_threads(previous_threads)
    return report


# --------------------------------------------------------------------------------------
# 1. Known values
# --------------------------------------------------------------------------------------


@dataclass
class _Case:
    """One known-value model: how to build it and the sampler settings used."""

    name: str
    kind: str  # "linear", "crossing" or "rrr"
    spec: tuple[int, ...]  # exponents, or (M, N, H, r) for reduced-rank regression
    n: int
    lr: float
    localization: float
    n_beta: float | None
    chains: int
    burn_in: int
    draws: int


def _cases(fast: bool) -> list[_Case]:
    if fast:
        return [
            _Case("linear regression, d = 6", "linear", (3, 2), 400, 4e-3, 1.0, None, 32, 30, 60),
            _Case("y = w^2 x", "crossing", (2,), 64, 3e-3, 0.0, 100.0, 64, 30, 60),
            _Case(
                "reduced-rank (M, N, H, r) = (2, 2, 1, 1)",
                "rrr",
                (2, 2, 1, 1),
                100,
                2e-4,
                5.0,
                100.0,
                32,
                30,
                60,
            ),
        ]
    return [
        _Case("linear regression, d = 6", "linear", (3, 2), 400, 4e-3, 1.0, None, 64, 100, 500),
        _Case("y = w x", "crossing", (1,), 64, 1e-3, 0.0, 100.0, 256, 200, 1000),
        _Case("y = w^2 x", "crossing", (2,), 64, 3e-3, 0.0, 100.0, 256, 200, 1000),
        _Case("y = w^3 x", "crossing", (3,), 64, 3e-3, 0.0, 100.0, 256, 200, 1000),
        _Case("y = w1 w2^2 x", "crossing", (1, 2), 64, 2e-3, 1.0, 100.0, 256, 300, 1000),
        _Case("y = w1 w2 x (m = 2)", "crossing", (1, 1), 64, 1e-3, 1.0, 100.0, 256, 300, 1000),
        _Case(
            "reduced-rank (M, N, H, r) = (2, 2, 1, 1)",
            "rrr",
            (2, 2, 1, 1),
            100,
            2e-4,
            5.0,
            100.0,
            128,
            200,
            1000,
        ),
        _Case(
            "reduced-rank (4, 2, 2, 1)", "rrr", (4, 2, 2, 1), 1000, 3e-4, 1.0, None, 32, 500, 2000
        ),
        _Case(
            "reduced-rank (3, 3, 2, 0)", "rrr", (3, 3, 2, 0), 1000, 3e-4, 1.0, None, 32, 500, 2000
        ),
    ]


def _build(case: _Case, seed: int, device: str) -> tuple[Any, Any, float, int, float | None]:
    """Model at its true parameter, full-batch loader, true λ, m, finite-nβ reference."""
    import torch
    from torch.utils.data import DataLoader

    from interplab import slt

    f64 = torch.float64
    reference = None
    if case.kind == "linear":
        d_in, d_out = case.spec
        g = torch.Generator().manual_seed(seed)
        W0 = torch.randn(d_out, d_in, generator=g, dtype=f64)
        data = slt.gaussian_regression_data(lambda x: x @ W0.T, case.n, d_in, seed=seed, dtype=f64)
        x, y = data.tensors
        model = torch.nn.Linear(d_in, d_out, bias=False).to(f64)
        with torch.no_grad():  # w* = the least-squares fit, the minimum of L_n
            model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
        hessian = torch.linalg.eigvalsh(x.T @ x / case.n).repeat(d_out)
        n_beta = case.n_beta or case.n / math.log(case.n)
        reference = slt.sgld_quadratic_llc(hessian, n_beta, case.localization, case.lr)
        known = (d_in * d_out / 2, 1)
    elif case.kind == "crossing":
        data = slt.gaussian_regression_data(
            lambda x: 0 * x, case.n, 1, seed=seed, dtype=f64, orthogonal_noise=True
        )
        model = slt.NormalCrossing(case.spec, dtype=f64)
        x, y = data.tensors
        S_xx, S_yy = float((x * x).mean()), float((y * y).mean())
        powers = torch.tensor(case.spec, dtype=f64)

        def loss(grid: torch.Tensor) -> torch.Tensor:  # L_n(w); S_xy = 0 by construction
            a = grid.pow(powers).prod(dim=-1)
            return 0.5 * (S_yy + a * a * S_xx)

        one_d = len(case.spec) == 1
        reference = slt.quadrature_llc(
            loss,
            [0.0] * len(case.spec),
            case.n_beta or case.n / math.log(case.n),
            case.localization,
            radius=3.0 if one_d else 6.0,
            points=4001 if one_d else 901,
        )
        known = tuple(model.known)
    else:
        M, N, H, r = case.spec
        A0, B0 = slt.rrr_teacher(M, N, H, r, seed=seed, dtype=f64)
        data = slt.gaussian_regression_data(
            lambda x: x @ A0.T @ B0.T, case.n, M, seed=seed, dtype=f64, orthogonal_noise=True
        )
        model = slt.ReducedRankRegression(M, N, H, dtype=f64)
        with torch.no_grad():
            model.A.copy_(A0)
            model.B.copy_(B0)
        known = tuple(model.known(r))
    model = model.to(device)
    loader = DataLoader(data, batch_size=case.n)
    return model, loader, float(known[0]), int(known[1]), reference


def _known_values(config: Config, run: Run, report: Report) -> None:
    import matplotlib.pyplot as plt

    from interplab import slt

    rows, results = [], []
    for case in _cases(config.fast):
        model, loader, true, multiplicity, reference = _build(case, config.seed, config.device)
        llc_config = slt.LLCConfig(
            lr=case.lr,
            localization=case.localization,
            n_beta=case.n_beta,
            chains=case.chains,
            burn_in=case.burn_in,
            draws=case.draws,
            seed=config.seed,
        )
        started = time.perf_counter()
        result = slt.estimate_llc(model, loader, slt.regression_loss, llc_config)
        seconds = time.perf_counter() - started
        results.append((case, result))
        d = result.n_parameters
        rows.append(
            {
                "model": case.name,
                "d": d,
                "true": true,
                "multiplicity": multiplicity,
                "d/2": d / 2,
                "finite-nβ reference": reference,
                "estimate": result.llc_mean,
                "std over chains": result.llc_std,
                "standard error": result.llc_sem,
                "error vs true": (result.llc_mean - true) / true,
                "r_hat": result.r_hat,
                "healthy": result.healthy,
                "nβ": result.n_beta,
                "γ": case.localization,
                "lr": case.lr,
                "chains x draws": f"{case.chains} x {case.draws}",
                "seconds": seconds,
            }
        )
        run.log(experiment="known_values", model=case.name, **result.summary())
    run.save_json("known_values", {"rows": rows})

    cols = 3
    lines = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(5 * cols, 3.2 * lines), squeeze=False)
    for ax, (case, result) in zip(axes.flat, results, strict=False):
        result.plot_traces(case.name, ax=ax, max_chains=4)
    for ax in list(axes.flat)[len(results) :]:
        ax.set_visible(False)
    fig.tight_layout()
    run.save_figure("known_value_traces", fig)

    report.section("Known learning coefficients")
    report.text(
        "Gaussian regressions y = f(x; w) + N(0, 1) at their true parameter, loss = the mean "
        "negative log-likelihood ½ ||y - f||² (constant dropped), full-batch SGLD "
        "w ← w - ε/2 (nβ ∇L_n + γ (w - w*)) + N(0, ε), λ̂ = nβ (mean draw loss - L_n(w*)), "
        "± the standard deviation of the per-chain estimates.\n\n"
        "- **linear regression** at its least-squares fit: regular, λ = d/2. The reference "
        "is the exact stationary value of this SGLD on the quadratic loss, "
        "½ Σ nβh / ((nβh + γ)(1 - ε(nβh + γ)/4)) over the Hessian eigenvalues h: a sampler "
        "check with no approximation.\n"
        "- **normal crossing** y = (Π w_i^k_i) x at w0 = 0: λ = min 1/(2 k_i), multiplicity "
        "m = the number of i attaining it. The noise is projected off x, so w0 is exactly "
        "the least-squares fit and L_n(w) - L_n(w0) = S_xx a(w)²/2 (removing the "
        "dataset-dependent term of Watanabe's WBIC expansion, ±30% of λ at n = 1000 "
        "otherwise). With one weight and γ = 0 the tempered partition function is exactly "
        "∝ (nβ)^(-1/(2k)), so the target is λ itself; the reference column is the same "
        "finite-nβ, localised expectation by quadrature. With two weights the flat valleys "
        "along the axes need γ > 0, and the finite-nβ target sits below λ: by a factor "
        "that fades like (nβ)^(-1/4) for w1 w2², and by (m - 1)/log(nβ) for w1 w2 (m = 2).\n"
        "- **reduced-rank regression** f(x) = B A x (A: H x M, B: N x H), true product of "
        "rank r, noise projected off x: Aoyagi and Watanabe 2005's closed form. No exact "
        "finite-nβ reference exists here; the gap to λ mixes localisation and finite nβ."
    )
    report.table(rows, caption="True λ vs SGLD estimate (mean ± std over chains)")
    report.figure(
        run.path("figures/known_value_traces.png"),
        caption="Loss traces of 4 chains per model (burn-in dotted) and L_n(w*) (dashed)",
    )


# --------------------------------------------------------------------------------------
# 2. LLC over a grokking run
# --------------------------------------------------------------------------------------


def _modular_config(config: Config) -> Any:
    from interplab.toys.modular import ModularConfig

    settings: dict[str, Any] = dict(
        p=config.resolved("p"),
        train_fraction=0.7,
        lr=1e-2,
        steps=config.resolved("train_steps"),
        eval_every=10,
        checkpoint_every=config.resolved("checkpoint_every"),
        seed=config.seed,
        device=config.device,
    )
    if config.fast:
        settings.update(d_model=32, n_heads=4, d_mlp=64, eval_every=5)
    else:
        settings.update(d_model=64, n_heads=4, d_mlp=128)
    return ModularConfig(**settings)


def _grokking_curve(config: Config, run: Run, report: Report) -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from interplab import slt
    from interplab.toys import modular as mod

    base = _modular_config(config)
    trained = mod.train_modular(base, progress=False)
    data = mod.modular_dataset(base)
    train = TensorDataset(data.train_tokens.to(base.device), data.train_labels.to(base.device))
    n, p = len(train), base.p
    loader = DataLoader(train, batch_size=min(config.batch_size, n), shuffle=True, drop_last=True)

    def loss_fn(model: Any, batch: Any) -> torch.Tensor:
        tokens, labels = batch
        return F.cross_entropy(mod.modular_logits(model, tokens)[:, :p], labels)

    llc_config = slt.LLCConfig(
        lr=config.llc_lr,
        localization=config.localization,
        chains=config.resolved("chains"),
        burn_in=config.resolved("burn_in"),
        draws=config.resolved("draws"),
        seed=config.seed,
    )
    model = mod.modular_model(base)
    results: list[LLCResult] = []
    steps = [c.step for c in trained.checkpoints]
    started = time.perf_counter()
    for checkpoint in trained.checkpoints:
        model.load_state_dict(checkpoint.state_dict())
        result = slt.estimate_llc(model, loader, loss_fn, llc_config, n=n)
        results.append(result)
        run.log(step=checkpoint.step, experiment="llc_over_training", **result.summary())
    seconds = time.perf_counter() - started

    def at(curve: list[float], step: int) -> float:  # the evaluation nearest to `step`
        i = min(range(len(trained.steps)), key=lambda j: abs(trained.steps[j] - step))
        return curve[i]

    curve = {
        "steps": steps,
        "llc_mean": [r.llc_mean for r in results],
        "llc_std": [r.llc_std for r in results],
        "llc_sem": [r.llc_sem for r in results],
        "r_hat": [r.r_hat for r in results],
        "healthy": [r.healthy for r in results],
        "init_loss": [r.init_loss for r in results],
        "train_loss": [at(trained.train_loss, s) for s in steps],
        "test_loss": [at(trained.test_loss, s) for s in steps],
        "n_beta": results[0].n_beta,
        "settings": {"llc": llc_config.__dict__, "modular": base.to_dict()},
        "steps_to_memorise": trained.steps_to_memorise,
        "steps_to_generalise": trained.steps_to_generalise,
    }
    run.save_json("llc_over_training", curve)
    fig = _plot_curve(curve, trained)
    run.save_figure("llc_over_training", fig)
    final = results[-1].plot_traces(f"final checkpoint (step {steps[-1]})")
    run.save_figure("llc_traces_final", final)

    peak = max(range(len(steps)), key=lambda i: curve["llc_mean"][i])
    rows = [
        {
            "step": s,
            "LLC": curve["llc_mean"][i],
            "± std": curve["llc_std"][i],
            "R̂": curve["r_hat"][i],
            "train loss": curve["train_loss"][i],
            "test loss": curve["test_loss"][i],
            "healthy": curve["healthy"][i],
        }
        for i, s in enumerate(steps)
    ]
    unhealthy = sum(not h for h in curve["healthy"])
    report.section("LLC over training: grokking")
    report.text(
        f"(a + b) mod {p}, {base.train_fraction:.0%} of the pairs ({n}) for training, one-layer "
        f"transformer (d_model {base.d_model}, d_mlp {base.d_mlp}), AdamW lr {base.lr:g}, "
        f"weight decay {base.weight_decay:g}, {base.steps} full-batch steps: "
        f"{_when('memorised', trained.steps_to_memorise)}, "
        f"{_when('generalised', trained.steps_to_generalise)}. At "
        f"each of {len(steps)} checkpoints, the LLC of the training loss: SGLD with lr "
        f"{llc_config.lr:g}, γ {llc_config.localization:g}, nβ = n / log n = "
        f"{curve['n_beta']:.1f}, minibatches of {loader.batch_size}, "
        f"{llc_config.chains} chains x ({llc_config.burn_in} burn-in + {llc_config.draws} draws) "
        f"({seconds:.0f} s in all).\n\n"
        f"The LLC is largest at step {steps[peak]} (λ̂ = {curve['llc_mean'][peak]:.3g}) and "
        f"ends at λ̂ = {curve['llc_mean'][-1]:.3g} at step {steps[-1]}. "
        + (
            f"{unhealthy} checkpoints raised a trace warning (see the table). "
            if unhealthy
            else "No checkpoint raised a trace warning. "
        )
        + "Estimates depend on the SGLD settings (lr, γ, nβ); compare them across checkpoints "
        "at fixed settings, as here, not as absolute counts of parameters."
    )
    report.figure(fig, caption="LLC (± std over chains) above train and test loss")
    report.table(rows, caption="LLC at each checkpoint")
    report.figure(final, caption="SGLD loss traces at the final checkpoint")


def _when(event: str, step: int | None) -> str:
    return f"{event} at step {step}" if step is not None else f"not {event} within the run"


def _plot_curve(curve: dict[str, Any], trained: Any) -> Any:
    import matplotlib.pyplot as plt

    fig, (ax_llc, ax_loss) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_llc.errorbar(curve["steps"], curve["llc_mean"], yerr=curve["llc_std"], marker="o", ms=3)
    ax_llc.set_ylabel("LLC λ̂")
    ax_loss.plot(trained.steps, trained.train_loss, label="train")
    ax_loss.plot(trained.steps, trained.test_loss, label="test")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_xlabel("step")
    ax_loss.legend()
    for ax in (ax_llc, ax_loss):
        for step in (trained.steps_to_memorise, trained.steps_to_generalise):
            if step is not None:
                ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    ax_llc.set_title("local learning coefficient over training (dotted: memorised, generalised)")
    fig.tight_layout()
    return fig
