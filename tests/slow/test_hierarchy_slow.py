"""SAEs trained on the hierarchy toy reproduce the published qualitative findings
(about a minute of one CPU core).

- Chanin et al. 2024 ("A is for absorption"): absorption grows with sparsity pressure;
  here a TopK SAE with k = 1 absorbs parents into children far more than k = 4.
- Bricken et al. 2023 ("Towards monosemanticity"): wider dictionaries split features;
  here 4x the features splits more of them than 1x.
"""

from __future__ import annotations

import pytest
import torch

from interplab.toys import hierarchy as hi

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained():
    from interplab.dictionaries import TopK

    torch.set_num_threads(1)
    toy = hi.HierarchyToy(n_parents=4, n_children=4, d_model=32)
    n = toy.n_features
    configs = [TopK(d_sae=n, k=1), TopK(d_sae=n, k=4), TopK(d_sae=4 * n, k=2), TopK(d_sae=n, k=2)]
    saes = hi.train_saes(toy, configs, n_tokens=1_000_000, batch_size=1024)
    batch = toy.sample(20_000, 99)
    return [hi.compare_to_truth(s, toy, batch) for s in saes]


def test_absorption_grows_with_sparsity(trained):
    k1, k4 = trained[0], trained[1]
    # measured (seed 0): 0.79 at k = 1, 0.05 at k = 4
    assert k1.absorption_rate > k4.absorption_rate + 10 * (
        k1.absorption_rate_sem + k4.absorption_rate_sem
    )
    assert k1.absorption_rate > 0.5
    # absorption, not a dead parent latent: it fires when the parent is alone
    assert k1.parent_only_recall.mean().item() > 0.5


def test_splitting_grows_with_width(trained):
    wide, narrow = trained[2], trained[3]
    assert int((wide.latents_per_feature > 1).sum()) > int((narrow.latents_per_feature > 1).sum())
    assert wide.latents_per_feature.sum() > narrow.latents_per_feature.sum()
