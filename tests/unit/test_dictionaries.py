"""Dictionary variants: shapes, constraints, losses against closed forms, sparse recovery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from interplab.dictionaries import (
    BatchTopK,
    Gated,
    JumpReLU,
    Matryoshka,
    ReLU,
    SkipTranscoder,
    TopK,
    TrainConfig,
    Transcoder,
    build_dictionary,
    config_from_dict,
    geometric_median,
    reconstruction_metrics,
    train_dictionaries,
)
from interplab.dictionaries.base import dense_encoder_scale
from interplab.errors import InterplabError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP contention on a shared 2-core machine (this
    runs after any session-wide thread setting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


D_IN, D_SAE = 12, 32
VARIANTS = [
    ReLU(D_SAE),
    TopK(D_SAE, k=4),
    BatchTopK(D_SAE, k=4),
    JumpReLU(D_SAE),
    Gated(D_SAE),
    Matryoshka(D_SAE, k=4, prefixes=(8, 16)),
]
CONFIGS = [
    *VARIANTS,
    Transcoder(TopK(D_SAE, k=4)),
    Transcoder(JumpReLU(D_SAE)),
    SkipTranscoder(ReLU(D_SAE)),
    SkipTranscoder(Gated(D_SAE)),
    SkipTranscoder(BatchTopK(D_SAE, k=4)),
]


def _id(config) -> str:
    if isinstance(config, Transcoder):
        return f"{type(config).__name__}-{type(config.variant).__name__}"
    return type(config).__name__


def _build(config, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    d_out = 9 if isinstance(config, Transcoder) else None
    return build_dictionary(config, D_IN, d_out, dtype=dtype)


def _data(config, n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    y = torch.randn(n, 9, generator=g) if isinstance(config, Transcoder) else None
    return x, y


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_shapes_and_inference_consistency(config):
    d = _build(config)
    x, y = _data(config)
    d_out = 9 if isinstance(config, Transcoder) else D_IN
    assert d.W_enc.shape == (D_IN, D_SAE) and d.W_dec.shape == (D_SAE, d_out)
    assert d.b_dec.shape == (d_out,)
    out = d(x, y)
    assert out.x_hat.shape == (64, d_out) and out.latents.shape == (64, D_SAE)
    assert out.loss.ndim == 0 and out.fired.shape == (D_SAE,)
    assert out.l0 == (out.latents > 0).sum(1).float().mean()
    assert "mse" in out.losses
    # eval-mode forward equals decode(encode(x)), also for leading batch dims
    d.eval()
    out = d(x, y)
    latents = d.encode(x)
    assert torch.allclose(out.latents, latents, atol=1e-6)
    assert torch.allclose(out.x_hat, d.decode(latents, x), atol=1e-5)
    assert d.encode(x.reshape(4, 16, D_IN)).shape == (4, 16, D_SAE)
    assert torch.allclose(d.encode(x.reshape(4, 16, D_IN)).reshape(64, D_SAE), latents, atol=1e-6)
    if isinstance(config.variant, TopK):
        assert torch.all(
            (latents > 0).sum(1) <= (64 * 4 if isinstance(config.variant, BatchTopK) else 4)
        )


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_decoder_stays_unit_norm_and_loss_decreases(config):
    d = _build(config)
    x, y = _data(config, n=256)
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        out = d(x, y, dead_mask=torch.zeros(D_SAE, dtype=torch.bool))
        out.loss.backward()
        d.remove_parallel_grad_()
        opt.step()
        d.normalize_decoder_()
        losses.append(out.loss.item())
    assert torch.allclose(d.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-5)
    assert losses[-1] < 0.8 * losses[0]


def test_remove_parallel_grad_projects_out_row_direction():
    d = _build(TopK(D_SAE, k=4))
    d.W_dec.grad = torch.randn_like(d.W_dec)
    d.remove_parallel_grad_()
    assert torch.allclose((d.W_dec.grad * d.W_dec).sum(1), torch.zeros(D_SAE), atol=1e-6)


def test_encoder_initialised_as_decoder_transpose():
    d = _build(TopK(D_SAE, k=4))
    assert torch.equal(d.W_enc, d.W_dec.T)
    assert torch.allclose(d.W_dec.norm(dim=1), torch.ones(D_SAE))
    d = _build(TopK(D_SAE, k=4, init_encoder_as_decoder_transpose=False))
    assert not torch.equal(d.W_enc, d.W_dec.T)
    assert torch.allclose(d.W_enc.norm(dim=0), torch.ones(D_SAE))


@pytest.mark.parametrize("config", [ReLU(1024), Gated(1024), JumpReLU(1024)], ids=_id)
def test_dense_variants_start_with_the_least_squares_encoder_scale(config):
    """W_enc = s * W_dec.T with s = 2 d_in / (d_sae + 2 d_in). For isotropic inputs the
    expected initial FVU is then 2 / (r + 2) (r = d_sae / d_in; 1/9 here), and s minimises
    it: a 0.8x or 1.25x encoder does worse. An unscaled encoder starts at FVU ~70 here."""
    d_in, r = 64, config.d_sae / 64
    torch.manual_seed(0)
    d = build_dictionary(config, d_in)
    scale = dense_encoder_scale(d_in, config.d_sae)
    assert scale == pytest.approx(2 / (r + 2))
    assert torch.allclose(d.W_enc, scale * d.W_dec.T)
    assert torch.allclose(d.W_dec.norm(dim=1), torch.ones(config.d_sae))
    x = torch.randn(4096, d_in, generator=torch.Generator().manual_seed(1))

    def fvu(factor: float) -> float:
        with torch.no_grad():
            d.W_enc.mul_(factor)
            value = reconstruction_metrics(d, x).fvu
            d.W_enc.div_(factor)
        return value

    assert fvu(1.0) == pytest.approx(2 / (r + 2), rel=0.15)
    assert fvu(1.0) < min(fvu(0.8), fvu(1.25))


def test_relu_l1_is_weighted_by_decoder_norms():
    d = _build(ReLU(D_SAE, l1_coefficient=0.5, normalize_decoder=False), dtype=torch.float64)
    with torch.no_grad():
        d.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE, dtype=torch.float64)[:, None])
    x, _ = _data(d.config)
    x = x.double()
    out = d(x, sparsity_scale=0.25)
    f = torch.relu((x - d.b_dec) @ d.W_enc + d.b_enc)
    l1 = (f * d.W_dec.norm(dim=1)).sum(1).mean()
    mse = (f @ d.W_dec + d.b_dec - x).pow(2).sum(1).mean()
    assert torch.allclose(out.losses["l1"], l1) and torch.allclose(out.losses["mse"], mse)
    assert torch.allclose(out.loss, mse + 0.25 * 0.5 * l1)


def test_topk_aux_loss_matches_closed_form():
    d = _build(TopK(D_SAE, k=4, aux_k=3, aux_coefficient=0.5), dtype=torch.float64)
    x = _data(d.config)[0].double()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:6] = True  # 6 dead latents, aux_k = 3: scale min(6 / 3, 1) = 1
    out = d(x, dead_mask=dead)
    pre = (x - d.b_dec) @ d.W_enc + d.b_enc
    top = pre.topk(4)
    f = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    x_hat = f @ d.W_dec + d.b_dec
    aux_pre = pre.masked_fill(~dead, -math.inf).topk(3)
    f_aux = torch.zeros_like(pre).scatter(1, aux_pre.indices, aux_pre.values.relu())
    aux = (f_aux @ d.W_dec - (x - x_hat)).pow(2).sum(1).mean()
    assert torch.allclose(out.losses["aux"], aux)
    assert torch.allclose(out.loss, (x_hat - x).pow(2).sum(1).mean() + 0.5 * aux)
    # two dead latents with aux_k = 3: aux uses both, scaled by 2 / 3
    few = torch.zeros(D_SAE, dtype=torch.bool)
    few[[1, 5]] = True
    f_aux = torch.zeros_like(pre)
    f_aux[:, [1, 5]] = pre[:, [1, 5]].relu()
    aux_few = (2 / 3) * (f_aux @ d.W_dec - (x - x_hat)).pow(2).sum(1).mean()
    assert torch.allclose(d(x, dead_mask=few).losses["aux"], aux_few)
    assert d(x, dead_mask=torch.zeros(D_SAE, dtype=torch.bool)).losses["aux"] == 0
    # the aux loss never moves live latents' encoder columns
    d.zero_grad()
    d(x, dead_mask=dead).losses["aux"].backward()
    assert torch.all(d.W_enc.grad[:, 6:] == 0)


def test_batchtopk_keeps_k_per_token_on_average_and_learns_threshold():
    d = _build(BatchTopK(D_SAE, k=3, threshold_momentum=0.5))
    x, _ = _data(d.config, n=50)
    out = d(x)
    assert (out.latents > 0).sum() == 3 * 50  # all kept values are positive here
    assert (out.latents > 0).sum(1).float().std() > 0  # varies per token
    smallest = out.latents[out.latents > 0].min()
    assert torch.allclose(d.threshold, smallest.expand(D_SAE))  # first update sets it
    second = d(x * 2).latents
    expected = 0.5 * smallest + 0.5 * second[second > 0].min()
    assert torch.allclose(d.threshold[0], expected)
    d.eval()
    pre = (x - d.b_dec) @ d.W_enc + d.b_enc
    assert torch.allclose(d.encode(x), pre.relu() * (pre > d.threshold))


def test_matryoshka_loss_is_sum_of_prefix_reconstructions():
    d = _build(Matryoshka(D_SAE, k=6, prefixes=(4, 16)), dtype=torch.float64)
    x = _data(d.config)[0].double()
    out = d(x)
    f = out.latents.detach()
    errors = [((f[:, :p] @ d.W_dec[:p] + d.b_dec) - x).pow(2).sum(1).mean() for p in (4, 16, D_SAE)]
    assert torch.allclose(out.losses["mse"], errors[-1])
    assert torch.allclose(out.losses["matryoshka"], errors[0] + errors[1])
    assert torch.allclose(out.loss, sum(errors))


def test_jumprelu_straight_through_gradients_match_the_paper():
    """d/dtheta of JumpReLU and of the L0 step use the rectangle kernel of width eps."""
    eps = 0.5
    d = _build(
        JumpReLU(2, l0_coefficient=1.0, bandwidth=eps, init_threshold=0.4), dtype=torch.float64
    )
    with torch.no_grad():
        d.W_enc.copy_(torch.eye(D_IN, 2, dtype=torch.float64))
        d.b_enc.zero_()
        d.b_dec.zero_()
    x = torch.zeros(3, D_IN, dtype=torch.float64)
    x[:, 0] = torch.tensor([0.3, 0.5, 2.0])  # latent 0 pre-activations
    out = d(x)
    # L0 term: pre within eps/2 of theta=0.4 contribute -1/eps each, averaged over the batch
    d.zero_grad()
    out.losses["l0"].backward(retain_graph=True)
    assert torch.allclose(d.threshold.grad[0], torch.tensor(-2 / eps / 3, dtype=torch.float64))
    # output term: d latents.sum() / d theta = -(theta / eps) * #(|z - theta| < eps / 2)
    d.zero_grad()
    out.latents.sum().backward()
    assert torch.allclose(d.threshold.grad[0], torch.tensor(-(0.4 / eps) * 2, dtype=torch.float64))
    assert torch.allclose(d.W_enc.grad[0, 0], torch.tensor(0.5 + 2.0, dtype=torch.float64))
    assert torch.equal(out.latents[:, 0], torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64))


def test_jumprelu_log_threshold_parametrisation():
    d = _build(JumpReLU(D_SAE, init_threshold=0.2, threshold_param="log"))
    assert torch.allclose(d.theta(), torch.full((D_SAE,), 0.2))
    assert "log_threshold" in dict(d.named_parameters())
    assert torch.allclose(d.file_tensors()["threshold"], torch.full((D_SAE,), 0.2))


def test_gated_aux_loss_uses_a_frozen_decoder():
    d = _build(Gated(D_SAE, l1_coefficient=2.0), dtype=torch.float64)
    x = _data(d.config)[0].double()
    out = d(x)
    gate = ((x - d.b_dec) @ d.W_enc + d.b_gate).relu()
    aux = (gate @ d.W_dec + d.b_dec - x).pow(2).sum(1).mean()
    assert torch.allclose(out.losses["aux"], aux)
    assert torch.allclose(out.loss, out.losses["mse"] + 2.0 * out.losses["l1"] + aux)
    d.zero_grad()
    out.losses["aux"].backward()
    assert d.W_dec.grad is None or torch.all(d.W_dec.grad == 0)
    assert torch.all(d.b_dec.grad.abs() > 0)  # b_dec still learns through x - b_dec
    mag = ((x - d.b_dec) @ (d.W_enc * d.r_mag.exp()) + d.b_mag).relu()
    assert torch.allclose(d.encode(x), (gate > 0) * mag)


def test_skip_transcoder_linear_path():
    d = _build(SkipTranscoder(ReLU(D_SAE)))
    assert torch.all(d.W_skip == 0) and d.W_skip.shape == (9, D_IN)
    with torch.no_grad():
        d.W_skip.normal_()
    x, y = _data(d.config)
    latents = d.encode(x)
    assert torch.allclose(d.decode(latents, x), latents @ d.W_dec + d.b_dec + x @ d.W_skip.T)
    assert not d.apply_b_dec_to_input


def test_fold_activation_scale_maps_raw_to_raw():
    d = _build(SkipTranscoder(JumpReLU(D_SAE, init_threshold=0.05)), dtype=torch.float64)
    with torch.no_grad():
        d.W_skip.normal_()
        d.b_dec.normal_()
    x, y = _data(d.config)
    x = x.double()
    s_in, s_out = 3.0, 0.25
    expected = d.decode(d.encode(s_in * x), s_in * x) / s_out
    d.fold_activation_scale_(s_in, s_out)
    assert torch.allclose(d.decode(d.encode(x), x), expected)


def test_geometric_median_minimises_sum_of_distances():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(40, 3, generator=g, dtype=torch.float64)
    points[:5] += 50  # outliers pull the mean, not the median
    median = geometric_median(points)

    def objective(m):
        return np.linalg.norm(points.numpy() - m, axis=1).sum()

    best = minimize(
        objective,
        points.mean(0).numpy(),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000},
    )
    assert objective(median.numpy()) <= best.fun + 1e-6
    assert objective(median.numpy()) < objective(points.mean(0).numpy()) - 1.0


@pytest.mark.parametrize("method", ["geometric_median", "mean", "zeros"])
def test_init_b_dec(method):
    d = _build(ReLU(D_SAE, b_dec_init=method))
    sample = torch.randn(100, D_IN) + 3
    d.init_b_dec_(sample)
    expected = {
        "geometric_median": geometric_median(sample),
        "mean": sample.mean(0),
        "zeros": torch.zeros(D_IN),
    }[method]
    assert torch.allclose(d.b_dec, expected, atol=1e-5)


def test_config_roundtrip_through_dict():
    for config in CONFIGS:
        assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TopK(8, k=9), "k=9 must be <= d_sae=8"),
        (lambda: TopK(0), "d_sae must be a positive integer"),
        (lambda: ReLU(8, l1_coefficient=-1), "l1_coefficient must be a number >= 0"),
        (lambda: ReLU(8, b_dec_init="median"), "b_dec_init must be one of"),
        (lambda: JumpReLU(8, bandwidth=0), "bandwidth must be a number > 0"),
        (lambda: JumpReLU(8, threshold_param="exp"), "threshold_param must be one of"),
        (lambda: Matryoshka(8, k=2, prefixes=(4, 2)), "strictly increasing"),
        (lambda: Matryoshka(8, k=2, prefixes=(4, 16)), "must not exceed d_sae=8"),
        (lambda: BatchTopK(8, k=2, threshold_momentum=1.0), "threshold_momentum"),
        (lambda: Transcoder("topk"), "wraps a dictionary variant config"),
        (lambda: config_from_dict({"type": "Sparse"}), "unknown dictionary config type 'Sparse'"),
        (lambda: build_dictionary(TopK(8, k=2), 4, 5), "wrap the config in Transcoder"),
        (lambda: build_dictionary(TopK(8, k=2), 0), "d_in must be a positive integer"),
        (
            lambda: build_dictionary(Transcoder(TopK(8, k=2, apply_b_dec_to_input=True)), 4, 5),
            "apply_b_dec_to_input needs d_in == d_out",
        ),
        (lambda: build_dictionary("topk", 4), "expected a dictionary config"),
    ],
)
def test_config_errors(make, message):
    with pytest.raises(InterplabError, match=message):
        make()


def test_input_errors():
    d = _build(TopK(D_SAE, k=4))
    with pytest.raises(InterplabError, match=r"expected last dimension d_in=12"):
        d(torch.randn(4, 7))
    with pytest.raises(InterplabError, match=r"expected last dimension d_in=12"):
        d.encode(torch.randn(4, 7))
    with pytest.raises(InterplabError, match=r"expected last dimension d_sae=32"):
        d.decode(torch.randn(4, 7))
    with pytest.raises(InterplabError, match=r"forward expects x of shape \[batch, d_in\]"):
        d(torch.randn(2, 4, D_IN))
    with pytest.raises(InterplabError, match="dead_mask has shape"):
        d(torch.randn(4, D_IN), dead_mask=torch.zeros(3, dtype=torch.bool))
    t = _build(SkipTranscoder(TopK(D_SAE, k=4)))
    with pytest.raises(InterplabError, match="needs its target"):
        t(torch.randn(4, D_IN))
    with pytest.raises(InterplabError, match="different numbers of rows"):
        t(torch.randn(4, D_IN), torch.randn(3, 9))
    with pytest.raises(InterplabError, match=r"call decode\(latents, x\)"):
        t.decode(torch.zeros(4, D_SAE))


def _sparse_data(seed: int, n_batches: int, rows: int = 256, n_true: int = 48, k_true: int = 3):
    """x = sum of k_true of n_true unit ground-truth directions (coefficients in [0.5, 1.5])."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(n_true, 24, generator=g)
    truth /= truth.norm(dim=1, keepdim=True)
    batches = []
    for _ in range(n_batches):
        idx = torch.rand(rows, n_true, generator=g).topk(k_true).indices
        coef = torch.rand(rows, k_true, generator=g) + 0.5
        batches.append(torch.zeros(rows, n_true).scatter_(1, idx, coef) @ truth)
    return truth, batches


def test_topk_recovers_ground_truth_directions():
    """A TopK SAE trained for ~1 s on x = sum of 3 of 48 sparse directions recovers them."""
    truth, batches = _sparse_data(seed=0, n_batches=120)
    [sae] = train_dictionaries(
        [TopK(96, k=3)],
        batches,
        TrainConfig(
            batch_size=256, total_tokens=120 * 256, lr=1e-2, lr_warmup_steps=0, progress=False
        ),
    )
    W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    max_cos = (truth @ W.T).max(dim=1).values
    assert (max_cos > 0.9).float().mean() >= 0.9
