"""Recipe: hierarchical features with known ground truth; SAE absorption and splitting.

A tree of parent and child features (`interplab.toys.hierarchy.HierarchyToy`) is
1. checked against its closed forms (densities, co-occurrence) and measured for the
   geometry Park et al. 2024 report (parent ⟂ child - parent, siblings form a simplex),
   exactly (orthogonal directions), approximately (random, also in superposition) and
   with a known violation (`parent_overlap`);
2. used to calibrate the SAE metrics on hand-built dictionaries: the oracle (absorption 0,
   recall 1) and one built to absorb half of the children (known rate);
3. used to train SAEs (`interplab.dictionaries`): a sparsity sweep at width = features
   (TopK k and ReLU L1), where Chanin et al. 2024 find absorption grows with sparsity
   pressure, and a width sweep, where Bricken et al. 2023 find features split into more
   latents as the dictionary widens.

    interplab run hierarchy           # ~2 min of one CPU core
    interplab run hierarchy --fast    # ~20 s
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from interplab.errors import InterplabError

if TYPE_CHECKING:  # pragma: no cover
    from interplab.runs import Report, Run
    from interplab.toys.hierarchy import HierarchyToy, TruthComparison

DESCRIPTION = (
    "Hierarchical toy features (parents/children, co-occurrence): Park et al. geometry, "
    "and SAE absorption vs sparsity and splitting vs width against the ground truth."
)


@dataclass
class Config:
    """Settings of the hierarchy recipe; None picks the full or fast default."""

    fast: bool = False
    """Quick run: fewer training tokens and sweep points."""
    n_parents: int = 4
    """Parent features."""
    n_children: int = 4
    """Children per parent."""
    d_model: int = 32
    """Dimension of the activations the SAEs train on."""
    geometry: Literal["orthogonal", "random"] = "orthogonal"
    """Directions of the SAE experiments' toy ("random" allows d_model < features)."""
    parent_probability: float = 0.1
    """Chance that a parent fires on its own."""
    child_probability: float = 0.6
    """Chance that one of its children fires when a parent fires."""
    pair_probability: float = 0.05
    """Chance that partner parents fire together (co-occurrence)."""
    ks: tuple[int, ...] | None = None
    """TopK k of the sparsity sweep (default 1,2,3,4,6; fast 1,4)."""
    l1_coefficients: tuple[float, ...] | None = None
    """ReLU L1 coefficients of the sparsity sweep (default 0.5,1,2,5; fast 1,5)."""
    width_multipliers: tuple[float, ...] | None = None
    """SAE widths as multiples of the number of features (default 0.5,1,2,4; fast 1,4)."""
    width_k: int = 2
    """TopK k of the width sweep."""
    n_tokens: int | None = None
    """Training tokens per sweep (default 2,000,000; fast 150,000)."""
    batch_size: int = 1024
    """Tokens per SAE step."""
    eval_tokens: int = 20_000
    """Fresh tokens for the metrics."""
    seed: int = 0
    """Seed of the directions, data and SAEs."""
    device: str = "cpu"
    """Torch device for SAE training."""
    threads: int | None = 1
    """CPU threads for torch during the run (restored after); None keeps torch's setting."""

    def __post_init__(self) -> None:
        for name in ("n_parents", "n_children", "d_model", "width_k", "batch_size", "eval_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InterplabError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("n_tokens", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise InterplabError(f"{name} must be a positive integer or None, got {value!r}.")
        for name in ("ks", "l1_coefficients", "width_multipliers"):
            values = getattr(self, name)
            if values is not None and (not values or any(v <= 0 for v in values)):
                raise InterplabError(f"{name} must list positive numbers, got {values!r}.")
        self.toy()  # validates the toy's settings
        if max(self.resolved_ks()) > self.n_features:
            raise InterplabError(
                f"ks {self.resolved_ks()} must not exceed the SAE width (= {self.n_features} "
                "features)."
            )

    @property
    def n_features(self) -> int:
        return self.n_parents * (1 + self.n_children)

    def toy(self, **overrides) -> HierarchyToy:
        """The toy of the SAE experiments (with `overrides` applied)."""
        from interplab.toys.hierarchy import HierarchyToy

        settings = dict(
            n_parents=self.n_parents,
            n_children=self.n_children,
            d_model=self.d_model,
            geometry=self.geometry,
            parent_probability=self.parent_probability,
            child_probability=self.child_probability,
            pair_probability=self.pair_probability,
            seed=self.seed,
        )
        settings.update(overrides)
        return HierarchyToy(**settings)

    def resolved_ks(self) -> tuple[int, ...]:
        return self.ks if self.ks is not None else ((1, 4) if self.fast else (1, 2, 3, 4, 6))

    def resolved_l1(self) -> tuple[float, ...]:
        if self.l1_coefficients is not None:
            return self.l1_coefficients
        return (1.0, 5.0) if self.fast else (0.5, 1.0, 2.0, 5.0)

    def resolved_widths(self) -> tuple[int, ...]:
        mult = self.width_multipliers
        if mult is None:
            mult = (1.0, 4.0) if self.fast else (0.5, 1.0, 2.0, 4.0)
        return tuple(max(self.width_k, round(m * self.n_features)) for m in mult)

    def resolved_tokens(self) -> int:
        return self.n_tokens if self.n_tokens is not None else (150_000 if self.fast else 2_000_000)


def run(config: Config, run: Run) -> Report:
    """Geometry checks, metric calibration and the two SAE sweeps; returns the report."""
    import torch

    from interplab.runs import Report

    report = Report(
        "Hierarchical features: geometry, absorption and splitting",
        subtitle="Park et al. 2024 (geometry), Chanin et al. 2024 (absorption), "
        "Bricken et al. 2023 (splitting), against a toy with known ground truth",
    )
    previous = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        toy = config.toy()
        eval_batch = toy.sample(config.eval_tokens, config.seed + 7)
        _statistics(config, toy, run, report)
        _geometry(config, run, report)
        _calibration(toy, eval_batch, run, report)
        by_k = _sparsity_sweep(config, toy, eval_batch, run, report)
        _width_sweep(config, toy, eval_batch, run, report, by_k)
    finally:
        torch.set_num_threads(previous)
    return report


# --------------------------------------------------------------------------------------
# 1. The generator against its closed forms, and the geometry
# --------------------------------------------------------------------------------------


def _statistics(config: Config, toy: HierarchyToy, run: Run, report: Report) -> None:
    batch = toy.sample(100_000, config.seed + 3)
    act = batch.active.float()
    density = act.mean(0)
    expected = toy.densities()
    P = toy.n_parents
    joint = (act[:, :P].T @ act[:, :P]) / act.shape[0]
    expected_joint = toy.parent_cooccurrence()
    kids = toy.children
    orphan = (batch.active[:, kids] & ~batch.active[:, toy.parent_of[kids]]).sum().item()
    siblings = batch.active[:, P:].reshape(-1, P, toy.n_children).sum(-1).max().item()
    rows = [
        {
            "quantity": "parent density",
            "measured": density[:P].mean().item(),
            "closed form": expected[:P].mean().item(),
        },
        {
            "quantity": "child density",
            "measured": density[P:].mean().item(),
            "closed form": expected[P:].mean().item(),
        },
        {
            "quantity": "P(partner parents both on)",
            "measured": joint[0, 1].item() if P > 1 else float("nan"),
            "closed form": expected_joint[0, 1].item() if P > 1 else float("nan"),
        },
        {
            "quantity": "P(non-partner parents both on)",
            "measured": joint[0, 2].item() if P > 2 else float("nan"),
            "closed form": expected_joint[0, 2].item() if P > 2 else float("nan"),
        },
    ]
    run.save_json("statistics", {"rows": rows, "orphan_children": orphan})
    report.section("The generator")
    report.text(
        f"{toy.n_parents} parents x {toy.n_children} children = {toy.n_features} features in "
        f"d_model = {toy.d_model} ({toy.geometry} directions). A parent fires with "
        f"probability {toy.parent_probability}; partners (0-1, 2-3, ...) also fire together "
        f"with probability {toy.pair_probability}; given its parent one child fires with "
        f"probability {toy.child_probability}, uniformly among siblings; magnitudes uniform "
        f"on [{toy.min_magnitude}, {toy.max_magnitude}].\n\n"
        f"On 100,000 samples: {orphan} child activations without their parent (must be 0); "
        f"at most {siblings} sibling(s) active together (must be 1)."
    )
    report.table(rows, caption="Measured statistics against the closed forms")


def _geometry(config: Config, run: Run, report: Report) -> None:
    from interplab.toys import hierarchy as hi

    n = config.n_features
    variants = {
        f"orthogonal, d={max(n, config.d_model)}": config.toy(
            geometry="orthogonal", d_model=max(n, config.d_model)
        ),
        f"random, d={max(n, config.d_model)}": config.toy(
            geometry="random", d_model=max(n, config.d_model)
        ),
        f"random, d={max(2, n // 2)} (superposition)": config.toy(
            geometry="random", d_model=max(2, n // 2)
        ),
        "orthogonal, parent_overlap 0.3": config.toy(
            geometry="orthogonal", d_model=max(n, config.d_model), parent_overlap=0.3
        ),
    }
    rows, cosines = [], {}
    for name, toy in variants.items():
        vectors = toy.concept_vectors()
        cos = hi.parent_child_cosines(vectors, toy.parent_of)
        simplex = hi.sibling_simplex(vectors, toy.parent_of)
        cosines[name] = cos
        rows.append(
            {
                "directions": name,
                "mean cos(parent, child - parent)": cos.mean().item(),
                "max |cos|": cos.abs().max().item(),
                "siblings form a simplex": f"{int(simplex.is_simplex.sum())}/{toy.n_parents}",
                "min singular value (rel.)": simplex.min_singular_value.min().item(),
                "mean sibling cosine": simplex.mean_offdiagonal_cosine.mean().item(),
            }
        )
    run.save_json("geometry", {"rows": rows})
    png = run.save_figure("geometry", _plot_geometry(cosines))
    report.section("Geometry of the concept vectors (Park et al. 2024)")
    report.text(
        "Concept vectors: ℓ_parent = d_parent, ℓ_child = d_parent + d_child (a child never "
        "fires without its parent). Park et al. find ℓ_parent ⟂ ℓ_child - ℓ_parent and "
        "sibling vectors forming a simplex. Orthogonal directions satisfy both exactly; "
        "random directions, also in superposition, approximately (cosines ~ 1/sqrt(d)); "
        "parent_overlap = 0.3 builds in a known violation (every cosine exactly 0.3, "
        "siblings overlapping by 0.09)."
    )
    report.figure(png, caption="cos(ℓ_parent, ℓ_child - ℓ_parent) per child")
    report.table(rows, caption="Hierarchical orthogonality and sibling simplices")


def _plot_geometry(cosines):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.0), layout="constrained")
    ax = fig.add_subplot()
    for i, cos in enumerate(cosines.values()):
        ax.scatter(cos.numpy(), [i] * cos.numel(), s=14, alpha=0.7)
    ax.axvline(0, color="0.6", lw=0.6, ls=":")
    ax.set_yticks(range(len(cosines)), list(cosines))
    ax.set(xlabel="cos(parent, child - parent)", xlim=(-0.6, 0.6))
    return fig


# --------------------------------------------------------------------------------------
# 2. Metric calibration on hand-built dictionaries
# --------------------------------------------------------------------------------------


def _calibration(toy: HierarchyToy, batch, run: Run, report: Report) -> None:
    from interplab.toys import hierarchy as hi

    rows = []
    if toy.geometry != "orthogonal":
        report.section("Metric calibration")
        report.text(
            "Skipped: the hand-built oracle is exact only for orthogonal directions "
            "(here the SAE toy uses random directions)."
        )
        return
    kids = toy.children.tolist()
    absorbed = [c for c in kids if (c - toy.n_parents) % toy.n_children < toy.n_children // 2]
    kid_active = batch.active[:, toy.children]
    expected = kid_active[:, [kids.index(c) for c in absorbed]].sum().item() / max(
        kid_active.sum().item(), 1
    )
    for name, sae in (
        ("oracle", hi.oracle_dictionary(toy)),
        (
            f"absorbing ({len(absorbed)} of {len(kids)} children)",
            hi.absorbing_dictionary(toy, absorbed),
        ),
    ):
        c = hi.compare_to_truth(sae, toy, batch)
        rows.append(
            {
                "dictionary": name,
                "absorption rate": c.absorption_rate,
                "expected": 0.0 if name == "oracle" else expected,
                "mean recall": c.recall.mean().item(),
                "mean precision": c.precision.nanmean().item(),
                "parent-only recall": c.parent_only_recall.mean().item(),
            }
        )
    run.save_json("calibration", {"rows": rows})
    report.section("Metric calibration")
    report.text(
        "The oracle dictionary (decoder = true directions, encoder = their pseudo-inverse) "
        "must show absorption 0 and recall 1. The absorbing dictionary silences each parent "
        "latent when one of the first half of its children is on and gives those children's "
        "latents the parent direction; its absorption rate must equal the share of "
        "child-active tokens whose child is one of those."
    )
    report.table(rows, caption="Hand-built dictionaries")


# --------------------------------------------------------------------------------------
# 3. SAE sweeps
# --------------------------------------------------------------------------------------


def _sae_row(label: str, c: TruthComparison, **extra) -> dict:
    s = c.summary()
    return {
        "SAE": label,
        **extra,
        "absorption rate": s["absorption_rate"],
        "sem": s["absorption_rate_sem"],
        "absorbed by child latent": s["absorbed_by_child_rate"],
        "parent-only recall": s["parent_only_recall"],
        "mean best cosine": s["mean_best_cosine"],
        "mean recall": s["mean_recall"],
        "mean precision": s["mean_precision"],
        "latents per parent": s["mean_latents_per_parent"],
        "latents per child": s["mean_latents_per_child"],
        "dead latents": s["dead_latents"],
    }


def _sparsity_sweep(
    config: Config, toy: HierarchyToy, batch, run: Run, report: Report
) -> dict[int, float]:
    """Train the width = features sweep over k and L1; returns absorption rate by TopK k."""
    from interplab.dictionaries import ReLU, TopK
    from interplab.toys import hierarchy as hi

    n = toy.n_features
    ks, l1s = config.resolved_ks(), config.resolved_l1()
    configs = [TopK(d_sae=n, k=k) for k in ks] + [ReLU(d_sae=n, l1_coefficient=c) for c in l1s]
    saes = hi.train_saes(
        toy,
        configs,
        config.resolved_tokens(),
        config.batch_size,
        seed=config.seed,
        device=config.device,
    )
    results = [hi.compare_to_truth(s.cpu(), toy, batch) for s in saes]
    rows = [
        _sae_row(f"TopK k={k}", r, width=n) for k, r in zip(ks, results[: len(ks)], strict=True)
    ]
    rows += [
        _sae_row(f"ReLU L1={c:g}", r, width=n) for c, r in zip(l1s, results[len(ks) :], strict=True)
    ]
    for row, r in zip(rows, results, strict=True):
        run.log(experiment="sparsity", sae=row["SAE"], width=n, **r.summary())
    run.save_json("sparsity_sweep", {"rows": rows})
    png = run.save_figure("absorption_vs_sparsity", _plot_sparsity(ks, l1s, results))
    middle = results[min(1, len(ks) - 1)]
    cos_png = run.save_figure(
        "cosines_sparsity",
        middle.plot_cosines(f"TopK k={ks[min(1, len(ks) - 1)]}, width {n}"),
    )
    topk_rates = [r.absorption_rate for r in results[: len(ks)]]
    relu_rates = [r.absorption_rate for r in results[len(ks) :]]
    report.section("Absorption against sparsity (Chanin et al. 2024)")
    report.text(
        f"Width = {n} (one latent per true feature), {config.resolved_tokens():,} training "
        "tokens, one seed each. Absorption rate: P(parent latent off | a child on), pooled "
        "over child-active tokens. The ± sem is over tokens only; the spread over training "
        "seeds is larger (see the initialisation check in the width sweep).\n\n"
        f"- **TopK**: k = {', '.join(map(str, ks))} gives "
        f"{', '.join(f'{v:.2f}' for v in topk_rates)}\n"
        f"- **ReLU**: L1 = {', '.join(f'{c:g}' for c in l1s)} gives "
        f"{', '.join(f'{v:.2f}' for v in relu_rates)}\n\n"
        "Chanin et al.: absorption rises as the sparsity pressure rises (smaller k, larger "
        "L1), because one latent that reconstructs parent + child costs less sparsity than two."
    )
    report.figure(png, caption="Absorption rate against sparsity")
    report.figure(cos_png, caption="cos(true feature, latent decoder)")
    report.table(rows, caption="Sparsity sweep")
    return {k: r.absorption_rate for k, r in zip(ks, results, strict=False)}


def _plot_sparsity(ks, l1s, results):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.0), layout="constrained")
    ax_k, ax_l = fig.subplots(1, 2)
    top, relu = results[: len(ks)], results[len(ks) :]
    ax_k.errorbar(
        list(ks),
        [r.absorption_rate for r in top],
        yerr=[r.absorption_rate_sem for r in top],
        marker="o",
        capsize=3,
    )
    ax_k.set(xlabel="TopK k (less sparse →)", ylabel="absorption rate", ylim=(-0.02, 1.02))
    ax_l.errorbar(
        list(l1s),
        [r.absorption_rate for r in relu],
        yerr=[r.absorption_rate_sem for r in relu],
        marker="o",
        capsize=3,
        color="#dd8452",
    )
    ax_l.set(xlabel="ReLU L1 coefficient (sparser →)", xscale="log", ylim=(-0.02, 1.02))
    ax_l.set_xticks(list(l1s), [f"{c:g}" for c in l1s])
    ax_l.minorticks_off()
    return fig


def _width_sweep(
    config: Config,
    toy: HierarchyToy,
    batch,
    run: Run,
    report: Report,
    absorption_by_k: dict[int, float],
) -> None:
    from interplab.dictionaries import TopK
    from interplab.toys import hierarchy as hi

    widths = config.resolved_widths()
    k = config.width_k
    saes = hi.train_saes(
        toy,
        [TopK(d_sae=w, k=k) for w in widths],
        config.resolved_tokens(),
        config.batch_size,
        seed=config.seed,
        device=config.device,
    )
    results = [hi.compare_to_truth(s.cpu(), toy, batch) for s in saes]
    rows = [_sae_row(f"TopK k={k}", r, width=w) for w, r in zip(widths, results, strict=True)]
    for w, r in zip(widths, results, strict=True):
        run.log(experiment="width", k=k, width=w, **r.summary())
    run.save_json("width_sweep", {"rows": rows})
    png = run.save_figure("splitting_vs_width", _plot_widths(widths, results, toy.n_features))
    cos_png = run.save_figure(
        "cosines_widest", results[-1].plot_cosines(f"TopK k={k}, width {widths[-1]}")
    )
    split = [int((r.latents_per_feature > 1).sum()) for r in results]
    report.section("Splitting against width (Bricken et al. 2023)")
    report.text(
        f"TopK k = {k}, widths {', '.join(map(str, widths))}. A latent is assigned to the "
        "true feature its decoder is closest to (cosine >= 0.5 with the feature's direction "
        "or its concept vector, d_parent + d_child for a child, so a latent that absorbed its "
        "parent counts for its child); a feature with more than one latent is split.\n\n"
        f"- features with > 1 latent: {', '.join(map(str, split))} (of {toy.n_features})\n"
        f"- absorption rate: {', '.join(f'{r.absorption_rate:.2f}' for r in results)}\n"
        f"{_seed_check(widths, results, toy.n_features, k, absorption_by_k)}\n"
        "Bricken et al.: as the dictionary widens, features split into several latents."
    )
    report.figure(png, caption="Latents per true feature and absorption against width")
    report.figure(cos_png, caption="cos(true feature, latent decoder), widest SAE")
    report.table(rows, caption="Width sweep")


def _seed_check(widths, results, n_features, k, absorption_by_k) -> str:
    """The same SAE config in both sweeps differs only in initialisation: a seed spread."""
    if n_features not in widths or k not in absorption_by_k:
        return ""
    here = results[widths.index(n_features)].absorption_rate
    return (
        f"- initialisation check: TopK k={k}, width {n_features} gives absorption "
        f"{here:.2f} here and {absorption_by_k[k]:.2f} in the sparsity sweep (same data and "
        "settings, different initial weights)\n"
    )


def _plot_widths(widths, results, n_features):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.0), layout="constrained")
    ax_s, ax_a = fig.subplots(1, 2)
    n_parents = int((results[0].parent_of < 0).sum())
    parents = [r.latents_per_feature[:n_parents].float().mean().item() for r in results]
    children = [r.latents_per_feature[n_parents:].float().mean().item() for r in results]
    xs = [w / n_features for w in widths]
    ax_s.plot(xs, parents, marker="o", label="parents")
    ax_s.plot(xs, children, marker="s", label="children")
    ax_s.axhline(1, color="0.6", lw=0.6, ls=":")
    ax_s.set(xlabel="width / features", ylabel="latents per true feature", xscale="log")
    ax_s.legend(fontsize=8)
    ax_a.errorbar(
        xs,
        [r.absorption_rate for r in results],
        yerr=[r.absorption_rate_sem for r in results],
        marker="o",
        capsize=3,
    )
    ax_a.set(xlabel="width / features", ylabel="absorption rate", xscale="log", ylim=(-0.02, 1.02))
    for ax in (ax_s, ax_a):
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    return fig
