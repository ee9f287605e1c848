"""Hierarchy toys: the generator against its closed forms, Park et al.'s geometry checks on
designed vectors, and the SAE ground-truth metrics on hand-built dictionaries with known
answers (oracle: absorption 0, recall 1; absorbing: known rate; duplicated latent: split)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from interplab.errors import InterplabError
from interplab.toys import hierarchy as hi


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _assert_close(actual, expected, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    # torch.testing.assert_close imports torch.distributed.tensor on first use (seconds)
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True), (
        actual,
        expected,
    )


# --------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_parents=0), "n_parents must be an integer >= 1"),
        (dict(n_children=1), "n_children must be an integer >= 2"),
        (dict(geometry="spherical"), "unknown geometry 'spherical'"),
        (dict(d_model=10), "geometry 'orthogonal' needs d_model >= n_features \\(20\\)"),
        (dict(parent_overlap=1.0), r"parent_overlap must be a number in \[0, 1\)"),
        (dict(parent_probability=0.0), r"parent_probability must be a number in \(0, 1\]"),
        (dict(child_probability=1.5), r"child_probability must be a number in \[0, 1\]"),
        (dict(pair_probability=-0.1), r"pair_probability must be a number in \[0, 1\]"),
        (dict(min_magnitude=2.0, max_magnitude=1.0), "0 < min_magnitude <= max_magnitude"),
        (dict(noise_std=-1.0), "noise_std must be a number >= 0"),
    ],
)
def test_toy_rejects_bad_values(kwargs, message):
    with pytest.raises(InterplabError, match=message):
        hi.HierarchyToy(**kwargs)


# --------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------


def test_tree_indexing():
    toy = hi.HierarchyToy(n_parents=3, n_children=2, d_model=9)
    assert toy.n_features == 9
    assert toy.parent_of.tolist() == [-1, -1, -1, 0, 0, 1, 1, 2, 2]
    assert toy.partner.tolist() == [1, 0, -1]


def test_generator_statistics_match_the_closed_forms():
    toy = hi.HierarchyToy(
        n_parents=4,
        n_children=3,
        parent_probability=0.2,
        pair_probability=0.1,
        child_probability=0.75,
        min_magnitude=0.5,
        max_magnitude=1.5,
    )
    n = 40_000
    batch = toy.sample(n, 0)
    act = batch.active
    kids = toy.children
    # a child never fires without its parent, and at most one sibling fires
    assert not bool((act[:, kids] & ~act[:, toy.parent_of[kids]]).any())
    assert int(act[:, 4:].reshape(n, 4, 3).sum(-1).max()) == 1
    # marginal densities (5 sigma)
    density = act.float().mean(0)
    expected = toy.densities()
    _assert_close(expected[0], 1 - 0.8 * 0.9)
    _assert_close(expected[4], expected[0] * 0.75 / 3)
    sigma = (expected * (1 - expected) / n).sqrt()
    assert bool(((density - expected).abs() < 5 * sigma).all()), (density, expected)
    # co-occurrence of parents: partners q + (1 - q) p², others independent
    a = act[:, :4].float()
    joint = a.T @ a / n
    expected_joint = toy.parent_cooccurrence()
    _assert_close(expected_joint[0, 1], 0.1 + 0.9 * 0.04)
    _assert_close(expected_joint[0, 2], expected[0] * expected[2])
    sigma = (expected_joint * (1 - expected_joint) / n).sqrt()
    assert bool(((joint - expected_joint).abs() < 5 * sigma).all()), (joint, expected_joint)
    # magnitudes in range where active, 0 elsewhere; x is their embedding
    mag = batch.magnitude
    assert bool((mag[~act] == 0).all())
    assert float(mag[act].min()) >= 0.5 and float(mag[act].max()) <= 1.5
    _assert_close(batch.x, mag @ toy.directions, atol=1e-5)


def test_noise_and_batches():
    toy = hi.HierarchyToy(n_parents=2, n_children=2, d_model=6, noise_std=0.3)
    batch = toy.sample(20_000, 1)
    residual = batch.x - batch.magnitude @ toy.directions
    assert abs(residual.std().item() - 0.3) < 0.01
    stream = toy.batches(64, seed=2)
    first, second = next(stream), next(stream)
    assert first.shape == (64, 6) and not torch.equal(first, second)
    with pytest.raises(InterplabError, match="n must be an integer >= 1"):
        toy.sample(0)


# --------------------------------------------------------------------------------------
# Geometry (Park et al. 2024)
# --------------------------------------------------------------------------------------


def test_orthogonal_geometry_is_exactly_hierarchical_and_simplicial():
    toy = hi.HierarchyToy(n_parents=3, n_children=4, d_model=16)
    D = toy.directions
    _assert_close(D @ D.T, torch.eye(15), atol=1e-5)
    vectors = toy.concept_vectors()
    _assert_close(vectors[3], D[3] + D[0])
    _assert_close(hi.parent_child_cosines(vectors, toy.parent_of), torch.zeros(12), atol=1e-6)
    simplex = hi.sibling_simplex(vectors, toy.parent_of)
    assert simplex.is_simplex.tolist() == [True] * 3
    _assert_close(simplex.gram, torch.eye(4).expand(3, 4, 4), atol=1e-5)
    _assert_close(simplex.min_singular_value, torch.ones(3), atol=1e-5)  # regular simplex


@pytest.mark.parametrize("geometry", ["orthogonal", "random"])
def test_parent_overlap_gives_the_designed_cosine(geometry):
    toy = hi.HierarchyToy(
        n_parents=3, n_children=3, d_model=12, geometry=geometry, parent_overlap=0.4
    )
    cos = hi.parent_child_cosines(toy.concept_vectors(), toy.parent_of)
    _assert_close(cos, torch.full((9,), 0.4), atol=1e-5)
    _assert_close(toy.directions.norm(dim=1), torch.ones(12), atol=1e-5)


def test_random_directions_in_superposition_are_near_orthogonal():
    toy = hi.HierarchyToy(n_parents=4, n_children=4, d_model=400, geometry="random")
    cos = hi.parent_child_cosines(toy.concept_vectors(), toy.parent_of)
    assert cos.abs().max().item() < 5 / math.sqrt(400)
    small = hi.HierarchyToy(n_parents=4, n_children=4, d_model=8, geometry="random")
    assert small.n_features > small.d_model  # superposition is allowed


def test_sibling_simplex_detects_affine_dependence():
    # parent at the origin; children (1,0,0), (0,1,0) and their midpoint: collinear
    vectors = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    parent_of = torch.tensor([-1, 0, 0, 0])
    check = hi.sibling_simplex(vectors, parent_of)
    assert check.affine_rank.tolist() == [1] and check.is_simplex.tolist() == [False]
    assert check.min_singular_value.item() < 1e-6
    moved = vectors.clone()
    moved[3] = torch.tensor([0.0, 0.0, 1.0])
    assert hi.sibling_simplex(moved, parent_of).is_simplex.tolist() == [True]


def test_geometry_functions_reject_bad_input():
    with pytest.raises(InterplabError, match="expected vectors"):
        hi.parent_child_cosines(torch.zeros(4, 3), torch.tensor([-1, 0, 0]))
    with pytest.raises(InterplabError, match="marks no feature as a child"):
        hi.parent_child_cosines(torch.zeros(2, 3), torch.tensor([-1, -1]))
    uneven = torch.tensor([-1, -1, 0, 0, 1, 1, 1])
    with pytest.raises(InterplabError, match="same number"):
        hi.sibling_simplex(torch.randn(7, 5), uneven)


# --------------------------------------------------------------------------------------
# SAE metrics against the ground truth
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_and_batch():
    toy = hi.HierarchyToy(n_parents=3, n_children=4, d_model=16, parent_probability=0.2)
    return toy, toy.sample(20_000, 5)


def test_oracle_dictionary_is_perfect(toy_and_batch):
    toy, batch = toy_and_batch
    c = hi.compare_to_truth(hi.oracle_dictionary(toy), toy, batch)
    F_ = toy.n_features
    assert c.best_latent.tolist() == list(range(F_))
    _assert_close(c.best_cosine, torch.ones(F_), atol=1e-5)
    _assert_close(c.recall, torch.ones(F_))
    _assert_close(c.precision, torch.ones(F_))
    _assert_close(c.absorption, torch.zeros(12))
    assert c.absorption_rate == 0.0
    _assert_close(c.parent_only_recall, torch.ones(3))
    _assert_close(c.child_decoder_parent_cosine, torch.zeros(12), atol=1e-5)
    assert c.latents_per_feature.tolist() == [1] * F_
    assert c.dead_latents == 0 and c.n_tokens == 20_000
    summary = c.summary()
    assert summary["split_features"] == 0 and summary["mean_recall"] == 1.0


def test_absorbing_dictionary_gives_the_known_rate(toy_and_batch):
    toy, batch = toy_and_batch
    absorbed = [3, 4, 8]  # children 0 and 1 of parent 0, child 1 of parent 1
    c = hi.compare_to_truth(hi.absorbing_dictionary(toy, absorbed), toy, batch)
    kids = toy.children.tolist()
    expected = torch.tensor([1.0 if k in absorbed else 0.0 for k in kids])
    _assert_close(c.absorption, expected)
    _assert_close(c.absorbed_by_child, expected)
    child_on = batch.active[:, toy.children]
    share = child_on[:, [kids.index(k) for k in absorbed]].sum() / child_on.sum()
    assert c.absorption_rate == pytest.approx(share.item(), abs=1e-6)
    n = child_on.sum().item()
    assert c.absorption_rate_sem == pytest.approx(math.sqrt(share * (1 - share) / n), rel=1e-3)
    # the parent latent still works without a child; the absorbing latents carry d_parent
    _assert_close(c.parent_only_recall, torch.ones(3))
    cos = torch.tensor([1 / math.sqrt(2) if k in absorbed else 0.0 for k in kids])
    _assert_close(c.child_decoder_parent_cosine, cos, atol=1e-5)
    # absorbed children still match their own latent (via the concept vector d_p + d_c)
    assert c.best_latent.tolist() == list(range(toy.n_features))
    # parent 0's recall: missed exactly on tokens with child 3 or 4
    p0 = batch.active[:, 0]
    missed = (batch.active[:, 3] | batch.active[:, 4]) & p0
    assert c.recall[0].item() == pytest.approx(1 - (missed.sum() / p0.sum()).item(), abs=1e-6)


def test_duplicated_latent_counts_as_a_split(toy_and_batch):
    from interplab.dictionaries import ReLU, build_dictionary

    toy, batch = toy_and_batch
    oracle = hi.oracle_dictionary(toy)
    F_ = toy.n_features
    wide = build_dictionary(ReLU(d_sae=F_ + 2), toy.d_model)
    D = toy.directions
    with torch.no_grad():
        wide.W_dec[:F_] = oracle.W_dec
        wide.W_enc[:, :F_] = oracle.W_enc
        wide.b_enc[:F_] = oracle.b_enc
        wide.b_dec.zero_()
        # two extra latents: a copy of parent 1, slightly rotated, and one for child 5
        wide.W_dec[F_] = 0.9 * D[1] + math.sqrt(1 - 0.81) * D[2]
        wide.W_dec[F_ + 1] = D[5]
        wide.W_enc[:, F_:] = 0.0
        wide.b_enc[F_:] = -1.0  # never fire
    c = hi.compare_to_truth(wide, toy, batch)
    expected = [1] * F_
    expected[1] = 2
    expected[5] = 2
    assert c.latents_per_feature.tolist() == expected
    assert c.dead_latents == 2
    assert c.summary()["split_features"] == 2


def test_firing_metrics_closed_form():
    # one parent (feature 0) with children 1, 2; latents 0, 1, 2 stand for them
    parent_of = torch.tensor([-1, 0, 0])
    active = torch.tensor(
        [[1, 1, 0], [1, 1, 0], [1, 0, 1], [1, 0, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.bool
    )
    fires = torch.tensor(
        [[0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 1]], dtype=torch.bool
    )
    m = hi.firing_metrics(fires, active, torch.tensor([0, 1, 2]), parent_of)
    _assert_close(m["recall"], torch.tensor([3 / 5, 1.0, 1 / 2]))
    _assert_close(m["precision"], torch.tensor([3 / 4, 1.0, 1.0]))
    _assert_close(
        m["absorption"], torch.tensor([1 / 2, 1 / 2])
    )  # child 1: token 0; child 2: token 2
    _assert_close(m["absorbed_by_child"], torch.tensor([1 / 2, 0.0]))
    _assert_close(m["parent_only_recall"], torch.tensor([1.0]))
    assert m["absorption_rate"].item() == pytest.approx(2 / 4)
    assert m["absorption_rate_sem"].item() == pytest.approx(math.sqrt(1 / 3) / 2)


def test_metric_errors(toy_and_batch):
    toy, batch = toy_and_batch
    other = hi.HierarchyToy(n_parents=2, n_children=2, d_model=7)
    with pytest.raises(InterplabError, match="d_in=7 but the toy has d_model=16"):
        hi.compare_to_truth(hi.oracle_dictionary(other), toy, batch)
    with pytest.raises(InterplabError, match="absorbed must list child features"):
        hi.absorbing_dictionary(toy, [0])
    with pytest.raises(InterplabError, match="split_threshold must be a number"):
        hi.compare_to_truth(hi.oracle_dictionary(toy), toy, batch, split_threshold=0.0)


def test_train_saes_returns_working_dictionaries():
    from interplab.dictionaries import TopK

    toy = hi.HierarchyToy(n_parents=2, n_children=2, d_model=8)
    saes = hi.train_saes(
        toy, [TopK(d_sae=6, k=2), TopK(d_sae=12, k=2)], n_tokens=20_480, batch_size=512
    )
    assert [s.d_sae for s in saes] == [6, 12]
    c = hi.compare_to_truth(saes[0], toy, n_tokens=2000)
    assert c.cosines.shape == (6, 6) and 0 <= c.absorption_rate <= 1
    assert c.best_cosine.mean().item() > 0.5  # 40 steps already point latents at features
    fig = c.plot_cosines("test")
    assert len(fig.axes) == 2


# --------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------


def test_recipe_runs_on_tiny_settings(tmp_path):
    pytest.importorskip("matplotlib")
    from interplab import recipes
    from interplab.runs import run_recipe

    recipes.register("hierarchy", "interplab.recipes.hierarchy")
    args = ["--fast", "--n-parents", "2", "--n-children", "2", "--d-model", "8"]
    args += ["--n-tokens", "10240", "--ks", "1", "--l1-coefficients", "1"]
    args += ["--width-multipliers", "1", "--eval-tokens", "2000"]
    result = run_recipe("hierarchy", args, root=tmp_path)
    calibration = json.loads((result.run_dir / "calibration.json").read_text())["rows"]
    assert calibration[0]["absorption rate"] == 0.0
    assert calibration[1]["absorption rate"] == pytest.approx(calibration[1]["expected"])
    geometry = json.loads((result.run_dir / "geometry.json").read_text())["rows"]
    assert abs(geometry[0]["mean cos(parent, child - parent)"]) < 1e-6
    assert geometry[-1]["mean cos(parent, child - parent)"] == pytest.approx(0.3, abs=1e-5)
    for name in ("geometry", "absorption_vs_sparsity", "splitting_vs_width", "cosines_widest"):
        assert (result.run_dir / "figures" / f"{name}.png").exists()


def test_recipe_config_errors():
    from interplab.recipes.hierarchy import Config

    with pytest.raises(InterplabError, match="ks \\(8,\\) must not exceed the SAE width"):
        Config(n_parents=1, n_children=2, ks=(8,))
    with pytest.raises(InterplabError, match="width_multipliers must list positive numbers"):
        Config(width_multipliers=(0.0,))
    with pytest.raises(InterplabError, match="geometry 'orthogonal' needs d_model"):
        Config(d_model=8)
