"""compare_dictionaries and opposing_pairs against planted permutations, rotations and pairs."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from interplab.dictionaries import ReLU, TopK, Transcoder, build_dictionary
from interplab.dictionaries.compare import compare_dictionaries, hungarian, opposing_pairs
from interplab.errors import InterplabError

D, N_LATENTS = 16, 40


def topk(seed: int = 0, d_sae: int = N_LATENTS, d: int = D):
    torch.manual_seed(seed)
    sae = build_dictionary(TopK(d_sae, k=4), d).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def data(n: int = 512, d: int = D, seed: int = 0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def permuted_copy(sae, perm):
    other = build_dictionary(sae.config, sae.d_in).eval()
    with torch.no_grad():
        other.W_enc.copy_(sae.W_enc[:, perm])
        other.b_enc.copy_(sae.b_enc[perm])
        other.W_dec.copy_(sae.W_dec[perm])
        other.b_dec.copy_(sae.b_dec)
    return other


def test_permuted_copy_is_recovered_exactly():
    a = topk()
    perm = torch.randperm(N_LATENTS, generator=torch.Generator().manual_seed(1))
    b = permuted_copy(a, perm)
    result = compare_dictionaries(a, b, data(), names=("orig", "perm"))
    # latent perm[j] of a became latent j of b, so a's latent i pairs with b's argsort(perm)[i]
    expected = perm.argsort()
    assert torch.equal(result.matching.partner_of(N_LATENTS), expected)
    assert torch.equal(result.decoder_nearest_a, expected)
    assert result.matching.mean_score == pytest.approx(1.0, abs=1e-6)
    assert result.shared_fraction(0.9) == 1.0 and result.shared_fraction(0.9, "b") == 1.0
    assert result.encoder_max_cos_a.min() == pytest.approx(1.0, abs=1e-6)
    f = result.functional
    assert f.reconstruction_fvu == pytest.approx(0.0, abs=1e-10)
    assert f.reconstruction_cosine == pytest.approx(1.0, abs=1e-6)
    assert f.mean_matched_correlation == pytest.approx(1.0, abs=1e-6)
    assert f.matching_agreement == 1.0
    assert result.procrustes.residual_fraction == pytest.approx(0.0, abs=1e-10)
    assert torch.allclose(result.procrustes.rotation, torch.eye(D), atol=1e-5)
    summary = result.summary()
    assert summary["shared_a@0.7"] == 1.0 and summary["matched_cosine"] == pytest.approx(1.0)
    assert json.loads(json.dumps(result.to_dict()))["matching"]["b"] == expected.tolist()


def test_rotated_copy_needs_procrustes():
    a = topk()
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(2)))
    b = build_dictionary(a.config, D).eval()
    with torch.no_grad():
        b.load_file_tensors_({**a.file_tensors(), "W_dec": a.W_dec @ q})
    for pairs in ("index", "activations"):
        result = compare_dictionaries(a, b, data(), procrustes_pairs=pairs)
        assert result.matching.mean_score < 0.6  # direct matching is poor
        assert result.shared_fraction(0.9) < 0.2
        fit = result.procrustes
        assert fit.pairs_from == pairs
        assert fit.residual_fraction == pytest.approx(0.0, abs=1e-8)
        assert torch.allclose(fit.rotation, q, atol=1e-4)
        assert fit.matched_cosine == pytest.approx(1.0, abs=1e-5)
        # the encoder was not rotated: latent activations agree one for one
        assert result.functional.mean_matched_correlation < 0.9
        assert result.functional.activation_matching.mean_score == pytest.approx(1.0, abs=1e-6)


def test_rectangular_matching_finds_the_embedded_copy():
    a = topk(d_sae=24)
    b = topk(seed=5, d_sae=60)
    slots = torch.randperm(60, generator=torch.Generator().manual_seed(3))[:24]
    with torch.no_grad():
        b.W_dec[slots] = a.W_dec
    result = compare_dictionaries(a, b, procrustes=False)
    assert result.functional is None and result.procrustes is None
    assert torch.equal(result.matching.cols_b, slots)
    assert result.shared_fraction(0.99, "a") == 1.0
    assert result.shared_fraction(0.99, "b") == pytest.approx(24 / 60)
    # the matching maximises the summed similarity: brute force over every injection 4 -> 6
    sim = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    best = max(
        itertools.permutations(range(6), 4), key=lambda c: sum(sim[i, j] for i, j in enumerate(c))
    )
    m = hungarian(sim)
    assert m.rows_a.tolist() == [0, 1, 2, 3] and m.cols_b.tolist() == list(best)


def test_opposing_pairs_planted():
    torch.manual_seed(0)
    sae = build_dictionary(ReLU(30), 64)
    with torch.no_grad():
        sae.W_dec[7] = -2.0 * sae.W_dec[3]
        sae.W_dec[20] = -sae.W_dec[11] + 0.05 * torch.randn(64)
    found = opposing_pairs(sae, threshold=-0.9)
    assert len(found) == 2
    assert found.indices.tolist() == [[3, 7], [11, 20]]
    assert found.cosine[0] == pytest.approx(-1.0, abs=1e-6) and found.cosine[1] < -0.9
    assert len(opposing_pairs(sae.W_dec, threshold=-0.9999)) == 1
    with pytest.raises(InterplabError, match="threshold"):
        opposing_pairs(sae, threshold=0.5)


def test_plots():
    a, b = topk(), topk(seed=1)
    result = compare_dictionaries(a, b, data(64))
    fig = result.plot_max_cosine()
    assert len(fig.axes) == 2
    counts = sum(p.get_height() for p in fig.axes[0].patches)
    assert counts == 2 * N_LATENTS  # both directions, every latent once
    ax = result.plot_matched()
    assert sum(p.get_height() for p in ax.patches) == 2 * N_LATENTS
    import matplotlib.pyplot as plt

    plt.close("all")


def test_errors():
    a = topk()
    with pytest.raises(InterplabError, match="different spaces"):
        compare_dictionaries(a, topk(d=8))
    tc = build_dictionary(Transcoder(TopK(N_LATENTS, k=4)), 8, D)
    with pytest.raises(InterplabError, match="one input space"):
        compare_dictionaries(a, tc, data())
    with pytest.raises(InterplabError, match="needs equal widths"):
        compare_dictionaries(a, topk(d_sae=20), procrustes_pairs="index")
    with pytest.raises(InterplabError, match="needs data"):
        compare_dictionaries(a, a, procrustes_pairs="activations")
    with pytest.raises(InterplabError, match="procrustes_pairs must be"):
        compare_dictionaries(a, a, procrustes_pairs="cosine")
    with pytest.raises(InterplabError, match="width d_in"):
        compare_dictionaries(a, a, data(d=8))
    with pytest.raises(InterplabError, match="must be an interplab Dictionary"):
        compare_dictionaries(a, a.W_dec)
    with pytest.raises(InterplabError, match="of must be"):
        compare_dictionaries(a, a, procrustes=False).shared_fraction(0.5, of="c")
