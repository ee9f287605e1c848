"""Local learning coefficient: SGLD estimates against closed forms (regular d/2 with the
exact SGLD stationary value, normal crossings 1/(2k), reduced-rank regression by Aoyagi's
formula), exact quadrature references, determinism, vmap = loop, sanity checks, errors, and
the recipe in fast mode.

Tolerances: every estimate here is a mean over many vectorised chains (256 for the singular
models), so its standard error is 1-3% of λ; the step sizes keep the SGLD discretisation
bias near 3% (measured: the k = 2 estimate moves 0.271 -> 0.250 as lr goes 1e-2 -> 3e-3 at
nβ = 100). Known-value checks therefore allow 10-12%; the slow tier repeats them at 5%.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from interplab.errors import InterplabError
from interplab.slt import (
    LLCConfig,
    NormalCrossing,
    ReducedRankRegression,
    aoyagi_rrr,
    default_beta,
    estimate_llc,
    gaussian_nll,
    gaussian_regression_data,
    quadrature_llc,
    regression_loss,
    rrr_teacher,
    sgld_quadratic_llc,
)
from interplab.slt.llc import _one_pass, split_r_hat

F64 = torch.float64


def quiet(*args, **kwargs):
    """estimate_llc with its diagnostic warnings silenced (tests read result.diagnostics)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return estimate_llc(*args, **kwargs)


def linear_regression(n: int = 400, d_in: int = 3, d_out: int = 2, seed: int = 0):
    """A full-rank linear regression at its least-squares solution, full-batch loader,
    and the Hessian eigenvalues of L_n there (eigenvalues of X^T X / n, each d_out times)."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_out, d_in, generator=g, dtype=F64)
    data = gaussian_regression_data(lambda x: x @ W0.T, n, d_in, seed=seed + 1, dtype=F64)
    x, y = data.tensors
    model = torch.nn.Linear(d_in, d_out, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    hessian = torch.linalg.eigvalsh(x.T @ x / n).repeat(d_out)
    return model, DataLoader(data, batch_size=n), hessian


# --------------------------------------------------------------------------------------
# Known values
# --------------------------------------------------------------------------------------


def test_regular_model_matches_exact_sgld_value_and_d_over_2():
    # Linear regression is a quadratic loss: full-batch SGLD is a linear recursion whose
    # stationary mean of nβ (L - L*) is known exactly, step-size bias included.
    model, loader, hessian = linear_regression(n=200)
    config = LLCConfig(lr=4e-3, localization=1.0, chains=48, burn_in=30, draws=150, seed=0)
    result = quiet(model, loader, regression_loss, config)
    exact = sgld_quadratic_llc(hessian, result.n_beta, 1.0, 4e-3)
    assert result.n_beta == pytest.approx(200 / math.log(200))
    assert abs(result.llc_mean - exact) < 4 * result.llc_sem
    assert result.llc_sem < 0.03 * exact
    # the target is the regular value d/2 = 3, moved a few % by γ and the step size
    assert exact == pytest.approx(3.0, rel=0.10)
    assert result.healthy, result.diagnostics
    assert result.n_parameters == 6


@pytest.mark.parametrize(("k", "lr"), [(1, 1e-3), (2, 3e-3), (3, 3e-3)])
def test_normal_crossing_recovers_one_over_2k(k, lr):
    # y = w^k x + noise at the true w0 = 0 (noise projected off x, so L_n - L_n(w0) is
    # exactly S w^(2k) / 2). Without localisation the tempered partition function of
    # w^(2k) is exactly ∝ (nβ)^(-1/(2k)), so the target is λ = 1/(2k) at any nβ.
    # Measured over seeds 0-2 at these settings: within -4% .. +8% of 1/(2k).
    data = gaussian_regression_data(
        lambda x: 0 * x, 64, 1, seed=k, dtype=F64, orthogonal_noise=True
    )
    model = NormalCrossing((k,), dtype=F64)
    config = LLCConfig(
        lr=lr, localization=0.0, n_beta=100.0, chains=256, burn_in=60, draws=200, seed=0
    )
    result = quiet(model, DataLoader(data, batch_size=64), regression_loss, config)
    assert model.known.llc == pytest.approx(1 / (2 * k))
    assert result.llc_mean == pytest.approx(1 / (2 * k), rel=0.12)
    assert result.llc_sem < 0.03 / k
    assert result.r_hat < 1.2 and not any(result.chain_nonfinite)


def test_reduced_rank_regression_matches_aoyagi():
    # M = N = 2 inputs/outputs, H = 1 hidden, true rank 1: λ = 3/2 (the rank-1 2x2
    # matrices form a 3-dimensional set), while the model has d = 4 parameters (d/2 = 2).
    # The fourth direction (A -> cA, B -> B/c) is flat; only γ holds it, and it mixes
    # slowly, but it barely moves the estimate (the other curvatures stay >> γ / nβ).
    A0, B0 = rrr_teacher(2, 2, 1, 1, seed=0, dtype=F64)
    data = gaussian_regression_data(
        lambda x: x @ A0.T @ B0.T, 100, 2, seed=0, dtype=F64, orthogonal_noise=True
    )
    model = ReducedRankRegression(2, 2, 1, dtype=F64)
    with torch.no_grad():
        model.A.copy_(A0)
        model.B.copy_(B0)
    config = LLCConfig(
        lr=2e-4, localization=5.0, n_beta=100.0, chains=128, burn_in=60, draws=200, seed=0
    )
    result = quiet(model, DataLoader(data, batch_size=100), regression_loss, config)
    assert model.known(1).llc == 1.5
    assert result.llc_mean == pytest.approx(1.5, rel=0.10)
    assert abs(result.llc_mean - 2.0) > 0.3  # clearly below the regular value d/2


@pytest.mark.parametrize(
    ("M", "N", "H", "r", "llc", "m"),
    [
        (3, 3, 2, 0, 2.5, 1),  # central case, M + N + H + r even
        (3, 3, 2, 1, 3.5, 2),  # central case, odd: (36 - 9 + 1) / 8, multiplicity 2
        (4, 2, 2, 1, 3.0, 1),  # M + r > N + H: (H N - H r + M r) / 2
        (2, 4, 2, 1, 3.0, 1),  # N + r > M + H: (H M - H r + N r) / 2 (transposed)
        (1, 1, 3, 0, 0.5, 1),  # H + r > M + N: M N / 2
        (2, 2, 1, 1, 1.5, 1),
    ],
)
def test_aoyagi_formula_cases(M, N, H, r, llc, m):
    assert aoyagi_rrr(M, N, H, r) == (llc, m)


@pytest.mark.parametrize(("M", "N", "H"), [(3, 3, 3), (4, 2, 2), (2, 5, 1), (5, 3, 2)])
def test_aoyagi_full_rank_truth_is_regular(M, N, H):
    # With true rank r = H the model is regular on the rank-H matrices: their dimension
    # H (M + N - H), halved.
    assert aoyagi_rrr(M, N, H, H).llc == H * (M + N - H) / 2


def test_aoyagi_rejects_bad_rank():
    with pytest.raises(InterplabError, match="true rank r must be"):
        aoyagi_rrr(3, 3, 2, 3)
    with pytest.raises(InterplabError, match="M must be a positive integer"):
        aoyagi_rrr(0, 3, 2, 0)


def test_quadrature_reference_matches_gaussian_closed_form():
    # L = h w² / 2: the localised tempered posterior is Gaussian with precision nβ h + γ.
    h, n_beta, gamma = 2.0, 50.0, 10.0
    value = quadrature_llc(
        lambda w: 0.5 * h * (w[:, 0] - 0.3) ** 2, [0.3], n_beta, gamma, radius=2.0
    )
    assert value == pytest.approx(0.5 * n_beta * h / (n_beta * h + gamma), rel=1e-6)
    assert sgld_quadratic_llc([h], n_beta, gamma, lr=0.0 + 1e-12) == pytest.approx(value, rel=1e-6)
    # two dimensions: sum of the two directions
    two = quadrature_llc(
        lambda w: 0.5 * (h * w[:, 0] ** 2 + 3 * h * w[:, 1] ** 2), [0, 0], n_beta, gamma, 1.5, 601
    )
    expected = sum(0.5 * n_beta * e / (n_beta * e + gamma) for e in (h, 3 * h))
    assert two == pytest.approx(expected, rel=1e-4)
    with pytest.raises(InterplabError, match="1 or 2 parameters"):
        quadrature_llc(lambda w: w.sum(-1), [0, 0, 0], 1.0, 1.0, 1.0)
    with pytest.raises(InterplabError, match="unstable"):
        sgld_quadratic_llc([1.0], 100.0, 0.0, lr=0.05)


def test_normal_crossing_and_rrr_models():
    model = NormalCrossing((2, 3), dtype=F64)
    with torch.no_grad():
        model.w.copy_(torch.tensor([0.5, 2.0], dtype=F64))
    x = torch.tensor([[1.0], [2.0]], dtype=F64)
    torch.testing.assert_close(model(x), 0.25 * 8.0 * x)
    assert model.known == (1 / 6, 1)
    assert NormalCrossing((2, 2)).known == (0.25, 2)
    with pytest.raises(InterplabError, match="exponents must be"):
        NormalCrossing((0, 1))
    rrr = ReducedRankRegression(3, 2, 1)
    x = torch.randn(5, 3)
    torch.testing.assert_close(rrr(x), x @ (rrr.B @ rrr.A).T)
    A0, B0 = rrr_teacher(4, 3, 3, 2)
    assert torch.linalg.matrix_rank(B0 @ A0) == 2
    with pytest.raises(InterplabError, match="rank must be in"):
        rrr_teacher(2, 2, 1, 2)
    # the Gaussian NLL is half the summed squared error per example (σ = 1)
    assert gaussian_nll(torch.ones(4, 2), torch.zeros(4, 2)).item() == pytest.approx(1.0)


def test_orthogonal_noise_makes_the_truth_the_least_squares_fit():
    W0 = torch.tensor([[1.0, -2.0]], dtype=F64)
    data = gaussian_regression_data(lambda x: x @ W0.T, 50, 2, dtype=F64, orthogonal_noise=True)
    x, y = data.tensors
    torch.testing.assert_close(torch.linalg.lstsq(x, y).solution.T, W0)
    noisy = gaussian_regression_data(lambda x: x @ W0.T, 50, 2, dtype=F64)
    assert (torch.linalg.lstsq(*noisy.tensors).solution.T - W0).abs().max() > 1e-3
    with pytest.raises(InterplabError, match="more samples than input"):
        gaussian_regression_data(lambda x: x, 2, 2, orthogonal_noise=True)


# --------------------------------------------------------------------------------------
# Mechanics: determinism, vectorisation, model untouched, loaders
# --------------------------------------------------------------------------------------


def small_run(**overrides):
    model, loader, _ = linear_regression(n=100)
    settings = dict(lr=2e-3, localization=1.0, chains=3, burn_in=5, draws=20, seed=0)
    return model, loader, LLCConfig(**(settings | overrides))


def test_same_seed_same_chains_other_seed_differs():
    model, loader, config = small_run()
    a = quiet(model, loader, regression_loss, config)
    b = quiet(model, loader, regression_loss, config)
    c = quiet(model, loader, regression_loss, LLCConfig(**(vars(config) | {"seed": 1})))
    assert torch.equal(a.loss_trace, b.loss_trace) and a.llc_mean == b.llc_mean
    assert not torch.equal(a.loss_trace, c.loss_trace)
    assert a.loss_trace.shape == (3, 20) and a.burn_in_trace.shape == (3, 5)


def test_vmap_and_loop_give_the_same_chains_and_leave_the_model_alone():
    model, loader, config = small_run()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    model.train()
    vmapped = quiet(model, loader, regression_loss, config)
    looped = quiet(
        model, loader, regression_loss, LLCConfig(**(vars(config) | {"vectorize": "loop"}))
    )
    assert vmapped.vectorized and not looped.vectorized
    torch.testing.assert_close(vmapped.loss_trace, looped.loss_trace, rtol=1e-10, atol=1e-12)
    assert model.training  # mode restored
    assert list(model.parameters()) == params  # same Parameter objects
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_bridge_model_survives_vmap_sampling():
    # The TransformerLens bridge reaches each submodule by two paths; functional_call's own
    # tied-weight handling then restored a batched tensor into the model. Slots are now
    # swapped once each, so vmap and loop agree and the model keeps its parameters.
    import torch.nn.functional as F

    from interplab.toys import modular as mod

    cfg = mod.ModularConfig(p=5, d_model=8, n_heads=2, d_mlp=8, steps=1)
    model = mod.modular_model(cfg)
    tokens, labels = mod.all_pairs(5)
    loader = DataLoader(TensorDataset(tokens, labels), batch_size=25)
    before = dict(model.state_dict(keep_vars=True))

    def loss_fn(m, batch):
        return F.cross_entropy(mod.modular_logits(m, batch[0])[:, :5], batch[1])

    config = LLCConfig(lr=1e-3, n_beta=10.0, chains=2, burn_in=0, draws=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "tensors had been replaced"
        warnings.filterwarnings("ignore", message="LLC estimate")
        vmapped = estimate_llc(model, loader, loss_fn, config)
        looped = estimate_llc(
            model, loader, loss_fn, LLCConfig(**(vars(config) | {"vectorize": "loop"}))
        )
    assert vmapped.vectorized
    torch.testing.assert_close(vmapped.loss_trace, looped.loss_trace, rtol=1e-5, atol=1e-6)
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is before[k] for k in before)


def test_unvmappable_model_falls_back_to_the_loop():
    class ItemModel(torch.nn.Linear):
        def forward(self, x):  # .item() on a parameter cannot be traced by vmap
            return super().forward(x) * (1.0 + 0.0 * self.weight.sum().item())

    model, loader, config = small_run()
    odd = ItemModel(3, 2, bias=False).double()
    odd.load_state_dict(model.state_dict())
    result = quiet(odd, loader, regression_loss, config)
    reference = quiet(model, loader, regression_loss, config)
    assert not result.vectorized
    torch.testing.assert_close(result.loss_trace, reference.loss_trace)
    with pytest.raises(InterplabError, match="vectorize='vmap' failed"):
        quiet(odd, loader, regression_loss, LLCConfig(**(vars(config) | {"vectorize": "vmap"})))


def test_tensor_loader_fast_path_yields_the_dataloader_batches():
    data = TensorDataset(torch.arange(23.0)[:, None], torch.arange(23))
    for kwargs in (dict(shuffle=True), dict(shuffle=False), dict(shuffle=False, drop_last=True)):
        a = DataLoader(data, batch_size=5, generator=torch.Generator().manual_seed(3), **kwargs)
        b = DataLoader(data, batch_size=5, generator=torch.Generator().manual_seed(3), **kwargs)
        ours, theirs = list(_one_pass(a)), list(b)
        assert len(ours) == len(theirs)
        for x, y in zip(ours, theirs, strict=True):
            assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))


def test_beta_and_n_resolution():
    model, loader, config = small_run(draws=4, burn_in=0, chains=1)
    assert default_beta(100) == pytest.approx(1 / math.log(100))
    r = quiet(model, loader, regression_loss, config)
    assert r.n_beta == pytest.approx(100 / math.log(100))
    r = quiet(model, loader, regression_loss, LLCConfig(**(vars(config) | {"beta": 0.5})))
    assert r.n_beta == pytest.approx(50.0)
    r = quiet(model, loader, regression_loss, config, n=1000)
    assert r.n_beta == pytest.approx(1000 / math.log(1000))
    batches = list(loader)  # a plain list has no dataset: n must be given
    with pytest.raises(InterplabError, match="number of training samples n is unknown"):
        quiet(model, batches, regression_loss, config)
    r = quiet(model, batches, regression_loss, LLCConfig(**(vars(config) | {"n_beta": 7.0})))
    assert r.n_beta == 7.0 and math.isnan(r.llc_std)  # one chain: no spread
    with pytest.raises(InterplabError, match="n must be an integer >= 2"):
        default_beta(1)


# --------------------------------------------------------------------------------------
# Sanity checks on the traces
# --------------------------------------------------------------------------------------


def test_divergence_is_flagged():
    model, loader, _ = linear_regression(n=100)
    config = LLCConfig(lr=5.0, localization=1.0, chains=2, burn_in=0, draws=150)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        result = estimate_llc(model, loader, regression_loss, config)
    assert not result.healthy and all(result.chain_nonfinite)


def test_start_away_from_the_minimum_gives_a_flagged_negative_estimate():
    model, loader, _ = linear_regression(n=100)
    with torch.no_grad():
        model.weight.add_(1.0)  # far from the least-squares solution
    config = LLCConfig(lr=2e-3, localization=1.0, chains=2, burn_in=0, draws=100)
    with pytest.warns(RuntimeWarning, match="below L_n"):
        result = estimate_llc(model, loader, regression_loss, config)
    assert result.llc_mean < 0 and all(result.chain_below_init)


def test_split_r_hat_against_hand_computation():
    trace = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 3.0, 5.0]])
    halves = [[1.0, 2.0], [2.0, 2.0], [3.0, 4.0], [3.0, 5.0]]
    m = 2
    means = [sum(h) / m for h in halves]
    W = (
        sum(sum((v - mu) ** 2 for v in h) / (m - 1) for h, mu in zip(halves, means, strict=True))
        / 4
    )
    grand = sum(means) / 4
    B_over_m = sum((mu - grand) ** 2 for mu in means) / 3
    assert split_r_hat(trace) == pytest.approx(math.sqrt(((m - 1) / m * W + B_over_m) / W))
    # independent draws of one distribution: close to 1; chains at different levels: large
    g = torch.Generator().manual_seed(0)
    assert split_r_hat(torch.randn(8, 400, generator=g)) < 1.02
    shifted = torch.randn(8, 400, generator=g) + torch.arange(8.0)[:, None]
    assert split_r_hat(shifted) > 1.5
    assert math.isnan(split_r_hat(torch.ones(2, 10)))


def test_result_plots_and_serialises():
    pytest.importorskip("matplotlib")
    model, loader, config = small_run()
    result = quiet(model, loader, regression_loss, config)
    fig = result.plot_traces("linear regression")
    ax = fig.axes[0]
    assert len(ax.lines) == 2 * 3 + 1  # burn-in and draws per chain, plus the init line
    assert ax.lines[-1].get_ydata()[0] == pytest.approx(result.init_loss)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["llc_mean"] == pytest.approx(result.llc_mean)
    assert len(data["loss_trace"]) == 3 and data["config"]["draws"] == 20
    assert result.sgld_steps_per_second > 0
    estimate = result.estimate()
    assert estimate.n == 3 and estimate.mean == pytest.approx(result.llc_mean, rel=1e-6)
    assert estimate.std == pytest.approx(result.llc_std, rel=1e-5)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(lr=0.0), "lr must be a number > 0"),
        (dict(lr=-1e-3), "lr must be a number > 0"),
        (dict(lr=float("inf")), "lr must be finite"),
        (dict(localization=-1.0), "localization"),
        (dict(n_beta=-5.0), "negative or infinite temperature"),
        (dict(beta=0.0), "negative or infinite temperature"),
        (dict(n_beta=1.0, beta=1.0), "either n_beta"),
        (dict(chains=0), "chains must be an integer >= 1"),
        (dict(draws=0), "draws must be an integer >= 1"),
        (dict(burn_in=-1), "burn_in must be an integer >= 0"),
        (dict(steps_between_draws=0), "steps_between_draws"),
        (dict(init_loss_batches=0), "init_loss_batches"),
        (dict(vectorize="jit"), "unknown vectorize mode 'jit'"),
        (dict(device="gpu0"), "is not a torch device"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(InterplabError, match=message):
        LLCConfig(**overrides)


def test_estimate_errors():
    model, loader, config = small_run()
    frozen = torch.nn.Linear(3, 2).double().requires_grad_(False)
    with pytest.raises(InterplabError, match="no parameters with requires_grad"):
        estimate_llc(frozen, loader, regression_loss, config)
    with pytest.raises(InterplabError, match="loss_fn must return a scalar"):
        estimate_llc(model, loader, lambda m, b: (m(b[0]) - b[1]).pow(2), config)
    with pytest.raises(InterplabError, match="LLCConfig.device is 'meta'"):
        estimate_llc(
            model, loader, regression_loss, LLCConfig(**(vars(config) | {"device": "meta"}))
        )
    with pytest.raises(InterplabError, match="yielded no batches"):
        estimate_llc(model, [], regression_loss, LLCConfig(**(vars(config) | {"n_beta": 1.0})))
    with pytest.raises(InterplabError, match="config must be an LLCConfig"):
        estimate_llc(model, loader, regression_loss, {"lr": 1e-3})
    with pytest.raises(InterplabError, match="n .training samples. must be a positive"):
        estimate_llc(model, loader, regression_loss, config, n=0)


# --------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:LLC estimate")  # a smoke run: chains far too short
def test_llc_recipe_fast(tmp_path):
    pytest.importorskip("matplotlib")
    import interplab.recipes
    from interplab.runs import run_recipe

    interplab.recipes.register("llc", "interplab.recipes.llc")
    result = run_recipe("llc", ["--fast"], root=tmp_path)
    assert result.report_path.exists()
    known = json.loads((result.run_dir / "known_values.json").read_text())
    names = [row["model"] for row in known["rows"]]
    assert any("w^2" in name for name in names) and any("reduced-rank" in n for n in names)
    for row in known["rows"]:
        assert math.isfinite(row["estimate"]) and row["true"] > 0
    curve = json.loads((result.run_dir / "llc_over_training.json").read_text())
    assert len(curve["steps"]) == len(curve["llc_mean"]) >= 3
    assert curve["steps"] == sorted(curve["steps"])
    for name in ("known_value_traces", "llc_over_training"):
        assert (result.run_dir / "figures" / f"{name}.png").exists()
    html = result.report_path.read_text()
    assert "Known learning coefficients" in html and "over training" in html


def test_llc_recipe_config_errors():
    from interplab.recipes.llc import Config

    with pytest.raises(InterplabError, match="p must be an odd prime"):
        Config(p=12)
    with pytest.raises(InterplabError, match="chains must be a positive integer"):
        Config(chains=0)
    with pytest.raises(InterplabError, match="llc_lr must be > 0"):
        Config(llc_lr=-1.0)
    with pytest.raises(InterplabError, match="nothing to do"):
        Config(known_values=False, grokking=False)
