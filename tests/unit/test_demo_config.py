"""The demo recipe's config: fast settings and clear errors for bad values."""

from __future__ import annotations

import pytest

from interplab.errors import InterplabError
from interplab.recipes.demo import Config, _pick_latents


def test_fast_shrinks_everything():
    fast = Config(fast=True)
    assert fast.ioi_n <= 12 and fast.n_tokens <= 4096 and fast.train_tokens <= 8192
    assert fast.k <= fast.d_sae and not fast.by_pos


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 2048}, "k=2048 must be <= d_sae=1024"),
        ({"ioi_n": 1}, "ioi_n must be at least 2"),
        ({"d_sae": 0}, "d_sae must be a positive integer"),
        ({"train_tokens": 100}, "less than one batch"),
        ({"ioi_split": "test"}, "IOI split"),
    ],
)
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(InterplabError, match=message):
        Config(**kwargs)


def test_pick_latents_prefers_frequent_non_dense_then_random():
    import torch

    density = torch.tensor([0.0, 0.5, 0.09, 0.08, 0.001, 0.0, 0.02, 0.05, 0.03])
    chosen, kinds = _pick_latents(density, 3, seed=0)
    # two thirds frequent: 0.09 (2) and 0.08 (3); 0.5 is dense; the last is a random live one
    assert chosen[:2] == [2, 3] and kinds == ["frequent", "frequent", "random"]
    assert chosen[2] in {1, 4, 6, 7, 8}
    assert _pick_latents(torch.zeros(5), 3, seed=0) == ([], [])
