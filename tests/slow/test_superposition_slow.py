"""Toy models of superposition at the paper's settings (minutes on a 2-core CPU).

Elhage et al. 2022, "Feature Dimensionality": uniform importance, density swept from 1 to
1/20, Adam lr 1e-3 constant, 10,000 steps of batch 1024 (the paper's notebook), here with
n = 200 features in m = 20 dimensions trained as one vectorised run of 20 instances.
"""

from __future__ import annotations

import pytest
import torch

from interplab.toys import superposition as sp

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dimensionality_sweep() -> sp.SuperpositionResult:
    torch.set_num_threads(1)
    config = sp.SuperpositionConfig(
        n_features=200,
        n_hidden=20,
        n_instances=20,
        feature_probability=20 ** -torch.linspace(0, 1, 20),
        steps=10_000,
        batch_size=1024,
        lr=1e-3,
        lr_schedule="constant",
        seed=0,
    )
    result = sp.train_superposition(config, progress=False)
    print(f"\n20 x 200-feature models, 10k steps of batch 1024: {result.seconds:.0f} s")
    return result


def test_dimensions_per_feature_curve(dimensionality_sweep):
    result = dimensionality_sweep
    inverse_density = 1 / result.feature_probability[:, 0]
    d_star = sp.dimensions_per_feature(result.W)
    assert d_star[0] > 0.95  # dense: no superposition
    plateau = (inverse_density >= 2.2) & (inverse_density <= 3.6)
    assert plateau.sum() >= 3
    assert ((d_star[plateau] - 0.5).abs() < 0.05).all(), d_star[plateau]  # sticks at 1/2
    assert d_star[-1] < 0.25  # 1/(1-S) = 20: far more features than dimensions
    # D* falls with sparsity (allowing small wiggles between neighbouring densities)
    assert (d_star[1:] <= d_star[:-1] + 0.02).all()


def test_feature_dimensionalities_sit_on_polytope_fractions(dimensionality_sweep):
    result = dimensionality_sweep
    inverse_density = 1 / result.feature_probability[:, 0]
    fractions = torch.tensor(sp.POLYTOPE_DIMENSIONALITIES)
    d_i = sp.feature_dimensionality(result.W)
    near = ((d_i[..., None] - fractions).abs() < 0.03).any(-1)
    represented = sp.feature_norms(result.W) > 0.5
    window = (inverse_density >= 1.8) & (inverse_density <= 6.0)
    share = near[window][represented[window]].float().mean().item()
    assert share > 0.7, share
    # the antipodal plateau is made of pairs: D_i ≈ 1/2 for nearly every represented feature
    plateau = (inverse_density >= 2.2) & (inverse_density <= 3.6)
    halves = (d_i[plateau] - 0.5).abs() < 0.03
    assert halves[represented[plateau]].float().mean() > 0.9


def test_recipe_fast_run_reproduces_the_paper(tmp_path):
    pytest.importorskip("matplotlib")
    from interplab.recipes import superposition as recipe
    from interplab.runs import start_run

    config = recipe.Config(fast=True)
    with start_run("superposition", config, root=tmp_path) as run:
        report = recipe.run(config, run)
        report.write(run.dir / "report.html")
    metrics = {m["experiment"]: m for m in run.metrics()}
    pentagon = metrics["pentagon"]
    assert all(abs(g - 72) < 10 for g in pentagon["pentagon_angle_gaps"])
    assert len(pentagon["pentagon_angle_gaps"]) == 5
    assert sorted(pentagon["dense_norms"])[:3] == pytest.approx([0, 0, 0], abs=0.15)
    d_star = metrics["dimensionality"]["d_star"]
    assert d_star[0] > 0.95 and d_star[-1] < 0.3
    assert (run.dir / "report.html").stat().st_size > 10_000
