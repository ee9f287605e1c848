"""Toy models of superposition: closed forms, the trainer against a reference loop, and the
published results of Elhage et al. 2022 at fast settings (pentagon, dense regime, D* ≈ 1/2,
the 2-features-in-1-dimension phase diagram)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from interplab.errors import InterplabError
from interplab.toys import superposition as sp


@pytest.fixture(autouse=True)
def _one_thread():
    # the machine is shared; one thread is also faster than two busy ones for these sizes
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _assert_close(actual, expected, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    # torch.testing.assert_close imports torch.distributed.tensor on first use (seconds)
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (actual, expected)


def _fast(**overrides) -> sp.SuperpositionConfig:
    settings = dict(steps=1500, lr=1e-2, lr_schedule="cosine", seed=0)
    settings.update(overrides)
    return sp.SuperpositionConfig(**settings)


# --------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_features=0), "n_features must be a positive integer"),
        (dict(n_hidden=-1), "n_hidden must be a positive integer"),
        (dict(n_instances=0), "n_instances must be a positive integer"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(batch_size=2.5), "batch_size must be a positive integer"),
        (dict(log_every=0), "log_every must be a positive integer"),
        (dict(feature_probability=0.0), r"feature_probability must lie in \(0, 1\]"),
        (dict(feature_probability=1.5), r"feature_probability must lie in \(0, 1\]"),
        (dict(feature_probability="dense"), "feature_probability must be a number"),
        (dict(n_instances=3, feature_probability=[0.1, 0.2]), r"shape \[2\]"),
        (dict(n_features=5, importance=[1.0, 2.0]), r"importance has shape \[2\]"),
        (dict(n_features=2, importance=[1.0, -1.0]), "importance must be finite, >= 0"),
        (dict(n_features=2, importance=[0.0, 0.0]), "not all zero"),
        (dict(importance_decay=0.0), "importance_decay must be a positive number"),
        (dict(lr=0.0), "lr must be a positive number"),
        (dict(lr=float("nan")), "lr must be a positive number"),
        (dict(activation="gelu"), "unknown activation 'gelu'.*linear, relu"),
        (dict(lr_schedule="linear"), "unknown lr_schedule 'linear'"),
        (dict(device="nonsense"), "device 'nonsense' is not a torch device"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(InterplabError, match=message):
        sp.SuperpositionConfig(**kwargs)


def test_config_broadcasts_probability_and_importance():
    cfg = sp.SuperpositionConfig(
        n_features=3, n_instances=2, feature_probability=[0.5, 0.1], importance_decay=0.5
    )
    assert torch.equal(cfg.probabilities(), torch.tensor([[0.5] * 3, [0.1] * 3]))
    assert torch.equal(cfg.importances(), torch.tensor([[1.0, 0.5, 0.25]] * 2))
    cfg = sp.SuperpositionConfig(n_features=3, n_instances=2, importance=[3.0, 2.0, 1.0])
    assert torch.equal(cfg.importances(), torch.tensor([[3.0, 2.0, 1.0]] * 2))
    per_instance = [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    cfg = sp.SuperpositionConfig(n_features=3, n_instances=2, importance=per_instance)
    assert torch.equal(cfg.importances(), torch.tensor(per_instance))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(densities=(0.5, 2.0)), r"densities must lie in \(0, 1\]"),
        (dict(importance_ratios=()), "importance_ratios must be a non-empty list"),
        (dict(importance_ratios=(1.0, -2.0)), "importance_ratios must be a non-empty list"),
        (dict(densities=("dense",)), "densities must be a non-empty list of positive numbers"),
        (dict(n_repeats=0), "n_repeats must be a positive integer"),
        (dict(min_norm=0.0), "min_norm must be positive"),
        (dict(steps=0), "steps must be a positive integer"),
    ],
)
def test_phase_config_rejects_bad_values(kwargs, message):
    with pytest.raises(InterplabError, match=message):
        sp.PhaseDiagramConfig(**kwargs)


def test_phase_config_builds_one_instance_per_cell_and_repeat():
    cfg = sp.PhaseDiagramConfig(importance_ratios=(2.0, 0.5), densities=(1.0, 0.1), n_repeats=3)
    assert cfg.importance_ratios == (0.5, 2.0) and cfg.densities == (0.1, 1.0)  # sorted axes
    training = cfg.training_config()
    assert (training.n_features, training.n_hidden, training.n_instances) == (2, 1, 12)
    # ordered (density, ratio, repeat): instance 3 is density 0.1, ratio 2, first repeat
    assert training.probabilities()[3].tolist() == pytest.approx([0.1, 0.1])
    assert training.importances()[3].tolist() == [1.0, 2.0]


# --------------------------------------------------------------------------------------
# Analysis functions against closed forms
# --------------------------------------------------------------------------------------


def _polygon(k: int) -> torch.Tensor:
    angles = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return torch.stack([angles.cos(), angles.sin()]).float()  # [2, k]


def test_pentagon_measures_match_closed_form():
    W = _polygon(5)
    # Σ_j cos²(72° j) = 5/2, so D_i = 1 / (5/2) = 2/5 and the score is 5/2 - 1
    _assert_close(sp.feature_dimensionality(W), torch.full((5,), 0.4))
    _assert_close(sp.superposition_score(W), torch.full((5,), 1.5))
    _assert_close(sp.dimensions_per_feature(W), torch.tensor(0.4))
    _assert_close(sp.feature_norms(W), torch.ones(5))
    _assert_close(sp.angles_between_features(W), torch.full((5,), 72.0))
    _assert_close(sp.feature_angles(W), torch.arange(5.0) * 72, atol=1e-4, rtol=0)


def test_measures_for_dedicated_antipodal_and_dropped_features():
    W = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # two dedicated, one dropped
    _assert_close(sp.feature_dimensionality(W), torch.tensor([[1.0, 1.0, 0.0]]))
    _assert_close(sp.superposition_score(W), torch.zeros(1, 3))
    _assert_close(sp.dimensions_per_feature(W), torch.tensor([1.0]))
    antipodal = torch.tensor([[0.8, -0.8]])
    _assert_close(sp.feature_dimensionality(antipodal), torch.tensor([0.5, 0.5]))
    _assert_close(sp.superposition_score(antipodal), torch.tensor([0.64, 0.64]))
    # unequal partners share the dimension unequally: D = (1/1.25, 0.25/1.25), summing to m
    _assert_close(sp.feature_dimensionality(torch.tensor([[1.0, -0.5]])), torch.tensor([0.8, 0.2]))


def test_angles_skip_unrepresented_features_and_check_shapes():
    W = torch.cat([_polygon(4), torch.tensor([[0.1], [0.1]])], 1)  # square + a short one
    _assert_close(sp.angles_between_features(W), torch.full((4,), 90.0))
    with pytest.raises(InterplabError, match="m = 2 hidden dimensions, got m = 3"):
        sp.feature_angles(torch.zeros(3, 4))
    with pytest.raises(InterplabError, match=r"W \[2, n\]"):
        sp.angles_between_features(torch.zeros(2, 2, 4))


def test_classify_phase():
    W = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, -0.9]], [[1.0, 1.0]], [[0.1, 0.1]]])
    assert sp.classify_phase(W).tolist() == [0, 1, 2, 3, 3]
    with pytest.raises(InterplabError, match="n = 2 features, got n = 3"):
        sp.classify_phase(torch.zeros(1, 3))


@pytest.mark.parametrize("ratio", [0.5, 2.0])
def test_simple_boundary_is_where_antipodal_and_dropping_cost_the_same(ratio):
    """Monte Carlo losses of the two closed-form solutions agree at the boundary density."""
    p = sp.simple_superposition_boundary(ratio)
    assert p == pytest.approx(4 * ratio / (2 + 5 * ratio) if ratio < 1 else 4 / (5 + 2 * ratio))
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    x = torch.rand(1, n, 2, generator=gen) * (torch.rand(1, n, 2, generator=gen) < p)
    importance = torch.tensor([[1.0, ratio]])
    keep = 0 if ratio < 1 else 1  # drop the less important feature, predict its mean
    W_drop = torch.zeros(1, 1, 2)
    W_drop[0, 0, keep] = 1.0
    b_drop = torch.zeros(1, 2)
    b_drop[0, 1 - keep] = p / 2
    drop = sp.reconstruction_loss(W_drop, b_drop, x, importance).item()
    anti = sp.reconstruction_loss(torch.tensor([[[1.0, -1.0]]]), torch.zeros(1, 2), x, importance)
    expected = min(1.0, ratio) * (p / 3 - p * p / 4)
    assert drop == pytest.approx(expected, rel=0.02)
    assert anti.item() == pytest.approx((1 + ratio) * p * p / 6, rel=0.02)
    assert anti.item() == pytest.approx(drop, rel=0.03)


# --------------------------------------------------------------------------------------
# Data, gradients and the trainer
# --------------------------------------------------------------------------------------


def test_sampler_dense_and_sparse_paths_match_the_feature_distribution():
    p = torch.tensor([1.0, 0.3, 0.05, 0.002])[:, None].expand(4, 64)
    sampler = sp._FeatureSampler(p, batch=1024, seed=0, device=torch.device("cpu"))
    assert sampler.sparse == [2, 3]  # both code paths are exercised below
    ws = sp._Workspace(4, 64, 1, 1024, torch.device("cpu"))
    x = torch.stack([sampler.sample(ws).clone() for _ in range(8)])  # [8, I, n, B]
    assert x.min() >= 0 and x.max() <= 1
    count = 8 * 64 * 1024
    for i, density in enumerate([1.0, 0.3, 0.05, 0.002]):
        active = x[:, i] > 0
        sigma = math.sqrt(density * (1 - density) / count) + 1e-9
        assert abs(active.float().mean().item() - density) < 5 * sigma + 1e-6
        values = x[:, i][active]
        # uniform on [0, 1]: mean 1/2, variance 1/12
        assert values.mean().item() == pytest.approx(0.5, abs=5 / math.sqrt(12 * values.numel()))
        assert values.var().item() == pytest.approx(1 / 12, rel=0.1)
    # no position bias: each feature row of the sparse instance is hit at the same rate
    row_rate = (x[:, 2] > 0).float().mean((0, 2))
    assert (row_rate - 0.05).abs().max() < 6 * math.sqrt(0.05 * 0.95 / (8 * 1024))


@pytest.mark.parametrize("activation", ["relu", "linear"])
def test_closed_form_gradients_match_autograd(activation):
    gen = torch.Generator().manual_seed(0)
    n_inst, batch, n, m = 3, 7, 5, 2
    W = torch.randn(n_inst, m, n, generator=gen).requires_grad_(True)
    b = (0.3 * torch.randn(n_inst, n, generator=gen)).requires_grad_(True)
    x = torch.rand(n_inst, batch, n, generator=gen) * (
        torch.rand(n_inst, batch, n, generator=gen) < 0.5
    )
    importance = torch.rand(n_inst, n, generator=gen)
    loss = sp.reconstruction_loss(W, b, x, importance, activation)
    loss.sum().backward()
    ws = sp._Workspace(n_inst, n, m, batch, torch.device("cpu"))
    ws.x.copy_(x.transpose(1, 2))
    ours, grad_W, grad_b = sp._loss_and_grads(
        W.detach(), b.detach(), ws.x, 2 * importance / batch, importance, activation, ws, True
    )
    _assert_close(ours, loss.detach())
    _assert_close(grad_W, W.grad)
    _assert_close(grad_b, b.grad)


def test_trainer_matches_a_plain_autograd_adam_loop():
    """The fast loop (closed-form grads, reused buffers, fused Adam) equals textbook training."""
    cfg = sp.SuperpositionConfig(
        n_features=5, n_hidden=2, n_instances=3, feature_probability=[1.0, 0.2, 0.05],
        importance_decay=0.9, steps=25, batch_size=64, lr=1e-2, lr_schedule="cosine", seed=3,
    )  # fmt: skip
    result = sp.train_superposition(cfg, progress=False)

    gen = torch.Generator().manual_seed(cfg.seed)
    W = (torch.randn(3, 2, 5, generator=gen) * math.sqrt(2 / 7)).requires_grad_(True)
    b = torch.zeros(3, 5, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / cfg.steps))
    )
    sampler = sp._FeatureSampler(cfg.probabilities(), 64, cfg.seed + 1, torch.device("cpu"))
    ws = sp._Workspace(3, 5, 2, 64, torch.device("cpu"))
    for _ in range(cfg.steps):
        x = sampler.sample(ws).transpose(1, 2)
        opt.zero_grad()
        sp.reconstruction_loss(W, b, x, cfg.importances()).sum().backward()
        opt.step()
        sched.step()
    _assert_close(result.W, W.detach(), atol=1e-5, rtol=1e-4)
    _assert_close(result.b, b.detach(), atol=1e-5, rtol=1e-4)
    assert result.history_steps == [0, 24] and result.loss_history.shape == (2, 3)


def test_training_is_deterministic_per_seed():
    cfg = _fast(n_features=5, n_hidden=2, n_instances=2, steps=20, batch_size=32)
    a = sp.train_superposition(cfg, progress=False)
    b = sp.train_superposition(cfg, progress=False)
    c = sp.train_superposition(_fast(n_features=5, n_hidden=2, n_instances=2, steps=20,
                                     batch_size=32, seed=1), progress=False)  # fmt: skip
    assert torch.equal(a.W, b.W) and torch.equal(a.loss, b.loss)
    assert not torch.allclose(a.W, c.W)


# --------------------------------------------------------------------------------------
# Published results (Elhage et al. 2022), fast settings
# --------------------------------------------------------------------------------------


def test_pentagon_five_features_in_two_dimensions():
    """n=5, m=2, I_i = 0.9^i, density 0.05: all five features on a regular pentagon."""
    cfg = _fast(
        n_features=5, n_hidden=2, n_instances=6, feature_probability=0.05, importance_decay=0.9
    )
    result = sp.train_superposition(cfg, progress=False)
    best = result.best_instance()
    assert (sp.feature_norms(result.W[best]) > 0.9).all()
    gaps = sp.angles_between_features(result.W[best])
    assert len(gaps) == 5
    assert ((gaps - 72.0).abs() < 10.0).all(), gaps
    pentagons = sum(bool((sp.feature_norms(result.W[i]) > 0.9).all()) for i in range(6))
    assert pentagons >= 3


def test_dense_regime_keeps_only_the_m_most_important_features():
    """Density 1: the two most important features get orthogonal unit directions, the rest
    are dropped, and the loss is exactly the dropped features' variance Σ_{i>=m} I_i / 12.
    (Features 2 and 3 differ in importance by only 10%, so some seeds are still sorting
    them out after a short run; the best seed is checked.)"""
    cfg = _fast(
        n_features=5,
        n_hidden=2,
        n_instances=4,
        feature_probability=1.0,
        importance_decay=0.9,
        steps=3000,
    )
    result = sp.train_superposition(cfg, progress=False)
    best = result.best_instance()
    norms = sp.feature_norms(result.W[best])
    assert (norms[2:] < 0.1).all(), norms
    gram = result.W[best].T @ result.W[best]
    _assert_close(gram[:2, :2], torch.eye(2), atol=0.05, rtol=0)
    expected = sum(0.9**i for i in range(2, 5)) / 12
    assert result.loss[best].item() == pytest.approx(expected, rel=0.02)


def test_linear_model_does_not_use_superposition():
    """Without the ReLU, even sparse features are not superposed (the paper's linear
    baseline): the model keeps the top-m features, like PCA."""
    cfg = _fast(
        n_features=5,
        n_hidden=2,
        n_instances=2,
        feature_probability=0.05,
        importance_decay=0.7,
        activation="linear",
    )
    result = sp.train_superposition(cfg, progress=False)
    for i in range(2):
        norms = sp.feature_norms(result.W[i])
        assert (norms[:2] > 0.9).all() and (norms[2:] < 0.15).all(), norms


def test_dimensions_per_feature_falls_from_one_and_sticks_at_one_half():
    """n=100, m=10, uniform importance: D* = 1 when dense, ≈1/2 (antipodal pairs) at
    1/(1-S) = 2.8, and well below 1/2 at 1/(1-S) = 20."""
    cfg = _fast(n_features=100, n_hidden=10, n_instances=3,
                feature_probability=[1.0, 1 / 2.8, 1 / 20], steps=600)  # fmt: skip
    result = sp.train_superposition(cfg, progress=False)
    d_star = sp.dimensions_per_feature(result.W)
    assert 0.95 < d_star[0] < 1.05
    assert 0.45 < d_star[1] < 0.58
    assert d_star[2] < 0.25
    represented = sp.feature_norms(result.W[1]) > 0.5
    d_i = sp.feature_dimensionality(result.W[1])[represented]
    assert represented.sum() >= 16  # about 2m features in antipodal pairs
    assert ((d_i - 0.5).abs() < 0.05).float().mean() > 0.7


@pytest.fixture(scope="module")
def phase_result() -> sp.PhaseDiagramResult:
    cfg = sp.PhaseDiagramConfig(
        importance_ratios=(0.3, 1.0, 3.0),
        densities=(0.03, 1.0),
        n_repeats=8,  # about half the seeds of a sparse cell end in a minimum that drops a feature
        steps=1500,
        lr=1e-2,
    )
    previous = torch.get_num_threads()  # module-scoped: set up before the autouse fixture
    torch.set_num_threads(1)
    try:
        return sp.train_phase_diagram(cfg, progress=False)
    finally:
        torch.set_num_threads(previous)


def test_phase_diagram_two_features_in_one_dimension(phase_result):
    phase = phase_result.phase  # [densities, ratios]
    # dense: the less important feature is not represented (ratio 1 is a tie: skipped)
    assert phase[1, 0] == sp.PHASES.index("feature 2 not represented")
    assert phase[1, 2] == sp.PHASES.index("feature 2 dedicated (feature 1 dropped)")
    # sparse (far below the closed-form boundary): both kept, antipodally
    assert (phase[0] == sp.PHASES.index("superposition (antipodal)")).all()
    W = phase_result.W[0, :, 0, :]  # [ratios, 2]
    cos = W[:, 0] * W[:, 1] / (W[:, 0].abs() * W[:, 1].abs())
    assert (cos < -0.99).all()


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def _tiny_result(**overrides) -> sp.SuperpositionResult:
    settings = dict(n_features=5, n_hidden=2, n_instances=3, steps=5, batch_size=16)
    settings.update(overrides)
    return sp.train_superposition(_fast(**settings), progress=False)


def test_plots_draw_the_data():
    pytest.importorskip("matplotlib")
    result = _tiny_result(feature_probability=[1.0, 0.3, 0.05])
    fig = result.plot_feature_directions([0, 2])
    lines = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("feature")]
    ends = sorted((line.get_xdata()[1], line.get_ydata()[1]) for line in lines)
    expected = sorted(zip(result.W[0, 0].tolist(), result.W[0, 1].tolist(), strict=True))
    _assert_close(torch.tensor(ends), torch.tensor(expected))

    fig = result.plot_gram([1])
    image = fig.axes[0].get_images()[0].get_array()
    _assert_close(torch.as_tensor(image), result.W[1].T @ result.W[1])

    fig = result.plot_dimensionality()
    d_star_line = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("D*")]
    assert list(d_star_line[0].get_xdata()) == pytest.approx([1.0, 1 / 0.3, 20.0])
    assert list(d_star_line[0].get_ydata()) == pytest.approx(
        sp.dimensions_per_feature(result.W).tolist()
    )


def test_plot_errors_name_the_problem():
    pytest.importorskip("matplotlib")
    with pytest.raises(InterplabError, match=r"W \[2, n\], got \[3, 5\]"):
        sp.plot_feature_directions(torch.zeros(3, 5))
    mixed = _tiny_result(n_instances=1, feature_probability=[[0.1, 0.2, 0.3, 0.4, 0.5]])
    with pytest.raises(InterplabError, match="one feature probability per instance"):
        mixed.plot_dimensionality()


def test_phase_plot_shows_the_phases(phase_result):
    pytest.importorskip("matplotlib")
    fig = phase_result.plot()
    mesh = fig.axes[0].collections[0]
    assert mesh.get_array().reshape(2, 3).tolist() == phase_result.phase.tolist()


# --------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------


def test_recipe_config_rejects_bad_values():
    from interplab.recipes import superposition as recipe

    with pytest.raises(InterplabError, match=r"n_hidden \(20\) must be smaller than n_features"):
        recipe.Config(n_features=20, n_hidden=20)
    with pytest.raises(InterplabError, match="steps must be a positive integer or None"):
        recipe.Config(steps=0)
    with pytest.raises(InterplabError, match="n_densities must be at least 2"):
        recipe.Config(n_densities=1)
    with pytest.raises(InterplabError, match="threads must be a positive integer or None"):
        recipe.Config(threads=0)
    assert recipe.Config(fast=True).resolved("n_features") == 100
    assert recipe.Config().resolved("n_features") == 200


class _FakeRun:
    """Stands in for interplab.runs.Run without rendering figures (the slow test renders)."""

    def __init__(self, png: bytes):
        self.png, self.figures, self.logs, self.json = png, {}, [], {}

    def save_figure(self, name, fig):
        self.figures[name] = fig
        return self.png

    def log(self, step=None, **metrics):
        self.logs.append(metrics)

    def save_json(self, name, obj):
        self.json[name] = json.loads(json.dumps(obj))


def test_recipe_writes_report_figures_and_numbers():
    """Wiring only (tiny step counts): every experiment lands in the run and the report."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from interplab.recipes import superposition as recipe
    from interplab.runs import Report, figure_png

    config = recipe.Config(
        fast=True, n_features=12, n_hidden=3, n_densities=3, steps=10, small_steps=10
    )
    run = _FakeRun(figure_png(Figure(figsize=(0.2, 0.2)), dpi=10))
    torch.set_num_threads(2)
    report = recipe.run(config, run)
    assert torch.get_num_threads() == 2  # the recipe's threads=1 is undone afterwards
    assert isinstance(report, Report)
    sections = report.to_dict()["sections"]
    assert [s["title"] for s in sections] == [
        "Five features in two dimensions (introduction figure)",
        "Feature dimensionality",
        "Phase diagram: 2 features in 1 dimension",
    ]
    texts = " ".join(b["text"] for s in sections for b in s["blocks"] if b["type"] == "text")
    assert "(paper: 72° each)" in texts and "sticks' at 1/2" in texts
    assert sum(b["type"] == "figure" for s in sections for b in s["blocks"]) == 4
    assert sorted(run.figures) == [
        "dimensionality",
        "dimensionality_gram",
        "pentagon_directions",
        "phase_diagram",
    ]
    assert all(isinstance(fig, Figure) for fig in run.figures.values())
    assert [m["experiment"] for m in run.logs] == ["pentagon", "dimensionality", "phase_diagram"]
    rows = run.json["dimensionality"]["rows"]
    assert [r["1/(1-S)"] for r in rows] == pytest.approx([1.0, math.sqrt(20), 20.0])
    assert len(run.json["pentagon"]["rows"]) == 10
