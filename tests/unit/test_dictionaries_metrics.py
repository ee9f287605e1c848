"""reconstruction_metrics against closed-form cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interplab.dictionaries import ReLU, SkipTranscoder, build_dictionary, reconstruction_metrics
from interplab.dictionaries.metrics import decoder_mean_max_cosine
from interplab.errors import InterplabError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP contention on a shared 2-core machine (this
    runs after any session-wide thread setting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _identity_relu(d: int, decoder_scale: float = 1.0):
    """ReLU dictionary with W_enc = I, W_dec = scale * I, zero biases: latents = relu(x)."""
    sae = build_dictionary(ReLU(d, normalize_decoder=False), d, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(decoder_scale * torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _positive_data(n=500, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix).abs() + 0.1


def test_perfect_reconstruction():
    x = _positive_data()
    m = reconstruction_metrics(_identity_relu(6), x, batch_size=128)
    assert m.n_tokens == 500
    assert m.mse == pytest.approx(0, abs=1e-20) and m.fvu == pytest.approx(0, abs=1e-20)
    assert m.explained_variance == pytest.approx(1)
    assert m.cosine_similarity == pytest.approx(1) and m.shrinkage == pytest.approx(1)
    assert m.l0 == pytest.approx(6) and m.l1 == pytest.approx(float(x.sum(1).mean()))
    assert m.dead_fraction == 0 and m.dense_fraction == 1
    assert m.decoder_mean_max_cosine == pytest.approx(0, abs=1e-12)
    # latents equal x, so the PCA spectrum is that of x's covariance
    cov_eig = np.linalg.eigvalsh(np.cov(x.numpy(), rowvar=False))[::-1]
    assert np.allclose(m.latent_pca_spectrum[:6].numpy(), cov_eig / cov_eig.sum(), atol=1e-10)


def test_half_scaled_decoder_closed_form():
    x = _positive_data()
    m = reconstruction_metrics(_identity_relu(6, decoder_scale=0.5), x, batch_size=77)
    err = (0.5 * x).pow(2).sum()
    var = (x - x.mean(0)).pow(2).sum()
    assert m.fvu == pytest.approx(float(err / var), rel=1e-12)
    assert m.mse == pytest.approx(float(err / x.numel()), rel=1e-12)
    assert m.shrinkage == pytest.approx(0.5) and m.cosine_similarity == pytest.approx(1)


def test_dead_dense_and_density():
    x = _positive_data(n=200)
    x[:150, 0] = -1.0  # latent 0 fires on 50 / 200 tokens
    x[:, 1] = -1.0  # latent 1 never fires
    m = reconstruction_metrics(_identity_relu(6), x, dense_threshold=0.5)
    assert m.latent_density[0] == pytest.approx(0.25) and m.latent_density[1] == 0
    assert m.dead_fraction == pytest.approx(1 / 6)
    assert m.dense_fraction == pytest.approx(4 / 6)
    counts, edges = m.density_histogram(bins=4)
    assert counts.sum() == 5 and len(edges) == 5


def test_decoder_mean_max_cosine_closed_form():
    W = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    # |cos|: rows 0-1: 1/sqrt2, rows 0-2: 0, rows 1-2: 1/sqrt2
    assert decoder_mean_max_cosine(W, chunk=2) == pytest.approx(2**-0.5)


def test_transcoder_metrics_use_targets_and_skip():
    t = build_dictionary(SkipTranscoder(ReLU(4)), 3, 2, dtype=torch.float64)
    with torch.no_grad():
        t.W_enc.fill_(-1.0)  # no latent ever fires
        t.b_enc.zero_()
        t.W_skip.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
        t.b_dec.zero_()
    x = _positive_data(n=50, d=3)
    y = torch.stack([x[:, 0], 2 * x[:, 1]], dim=1)
    m = reconstruction_metrics(t, x, y)
    assert m.fvu == pytest.approx(0, abs=1e-20) and m.dead_fraction == 1 and m.l0 == 0
    with pytest.raises(InterplabError, match="pass y"):
        reconstruction_metrics(t, x)
    with pytest.raises(InterplabError, match="d_out=2"):
        reconstruction_metrics(t, x, x)
    with pytest.raises(InterplabError, match="d_in=3"):
        reconstruction_metrics(t, y, y)


def test_metrics_restore_training_mode():
    sae = _identity_relu(6)
    sae.train()
    reconstruction_metrics(sae, _positive_data(n=10))
    assert sae.training
