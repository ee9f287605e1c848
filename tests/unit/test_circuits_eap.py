"""EAP and EAP-IG against exact edge patching: EAP is exact on a model that is linear in the
edge activations, its gradients equal finite differences of edge masks, EAP-IG with one
step is EAP, and with many steps EAP-IG satisfies completeness (a node's summed outgoing
edge scores approach the exact effect of ablating all its outgoing edges) where EAP does
not."""

from __future__ import annotations

import pytest
import torch

import interplab as il
from interplab.circuits.eap import _group_senders, eap, eap_ig, exact_edge_scores
from interplab.circuits.edge_patching import EdgePatcher
from interplab.errors import InterplabError
from interplab.models import ToyConfig
from tests.unit.test_circuits_graph import VOCAB, random_task


def toy(dtype="float32", scale=1.0, **kwargs):
    cfg = dict(n_layers=2, d_model=32, n_heads=2, d_vocab=VOCAB)
    model = il.load_model(ToyConfig(**{**cfg, **kwargs}), device="cpu", dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(scale)  # larger weights: clearly nonlinear, effects well above rounding
    return model


@pytest.fixture(scope="module")
def linear_model():
    """Attention-only, no normalisation, W_Q = W_K = 0: every attention pattern is the
    uniform causal average whatever the inputs, so the logits (and logit_diff) are affine in
    every head's value input and in the logits input, and q/k edges have no effect at all."""
    torch.set_num_threads(1)
    model = toy("float64", scale=3.0, attn_only=True, normalization="none")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q.original_component.weight.zero_()
            block.attn.k.original_component.weight.zero_()
    return model


@pytest.fixture(scope="module")
def nonlinear_model():
    """LayerNorm + GELU MLPs + softmax attention, float64 so differences are exact enough."""
    return toy("float64", scale=3.0)


@pytest.fixture(scope="module")
def task():
    return random_task()


@pytest.mark.parametrize("ablation", ["corrupted", "mean"])
def test_eap_is_exact_when_the_model_is_linear_in_edges(linear_model, task, ablation):
    approx = eap(linear_model, task, ablation=ablation)
    exact = exact_edge_scores(linear_model, task, ablation=ablation)
    scale = float(exact.per_example.abs().max())
    assert scale > 1e-2  # edges matter
    assert (approx.per_example - exact.per_example).abs().max() <= 1e-5 * scale
    graph = approx.graph
    qk = torch.tensor(["<q>" in r or "<k>" in r for r in graph.receivers])
    assert float(exact.scores[:, qk].abs().max()) == 0.0  # q/k edges do nothing here
    assert approx.top(1)[0][0] == exact.top(1)[0][0]
    assert approx.sem.shape == approx.scores.shape and bool((approx.sem[graph.valid] >= 0).all())


def test_eap_gradients_equal_finite_differences_of_edge_masks(nonlinear_model, task):
    """x_v = resid_v - (1 - m) (out_u - ablated_u), so d metric / d m_uv = -score(u -> v)."""
    scores = eap(nonlinear_model, task)
    patcher = EdgePatcher(nonlinear_model, task)
    graph = patcher.graph
    index = graph.edge_index
    rows = torch.arange(len(index))
    eps = 1e-3
    plus = graph.full_mask().double().repeat(len(index), 1, 1)
    minus = plus.clone()
    plus[rows, index[:, 0], index[:, 1]] += eps
    minus[rows, index[:, 0], index[:, 1]] -= eps
    derivative = (patcher.values(plus) - patcher.values(minus)).T / (2 * eps)  # [batch, edge]
    got = scores.per_example[:, index[:, 0], index[:, 1]].double()
    scale = float(derivative.abs().max())
    assert scale > 1e-2
    assert (got + derivative).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("variant", ["inputs", "activations"])
def test_eap_ig_with_one_step_is_eap(nonlinear_model, task, variant):
    one = eap_ig(nonlinear_model, task, steps=1, variant=variant)
    plain = eap(nonlinear_model, task)
    assert torch.allclose(one.per_example, plain.per_example, atol=1e-6)
    assert one.method == f"eap-ig-{variant}" and one.steps == 1


def _exact_node_effect(patcher, senders):
    """metric with every outgoing edge of `senders` ablated, minus clean, per example."""
    mask = patcher.graph.full_mask().double().clone()
    mask[senders] = 0.0
    values = patcher.values(torch.stack([patcher.graph.full_mask().double(), mask]))
    return (values[1] - values[0]).mean()


def test_eap_ig_inputs_approaches_exact_patching_of_the_input_node(nonlinear_model, task):
    """Integrated gradients on the embeddings are complete: the input node's edge scores sum
    to (metric with the input node's edges ablated) - (clean metric) as steps grow."""
    patcher = EdgePatcher(nonlinear_model, task)
    target = float(_exact_node_effect(patcher, slice(0, 1)))
    errors = {}
    for steps in (1, 64):
        ig = eap_ig(nonlinear_model, task, steps=steps, variant="inputs")
        errors[steps] = abs(float(ig.per_example[:, 0].sum(1).mean()) - target)
    assert abs(target) > 0.1
    assert errors[64] <= 0.05 * abs(target)
    assert errors[64] * 10 < errors[1]  # EAP (= one step) is far off on this nonlinear toy


def test_eap_ig_activations_approaches_exact_patching_of_each_layer(nonlinear_model, task):
    patcher = EdgePatcher(nonlinear_model, task)
    ig = eap_ig(nonlinear_model, task, steps=32, variant="activations")
    first_order = eap(nonlinear_model, task)
    for senders in _group_senders(patcher.graph):
        target = float(_exact_node_effect(patcher, senders))
        ig_error = abs(float(ig.per_example[:, senders].sum((1, 2)).mean()) - target)
        eap_error = abs(float(first_order.per_example[:, senders].sum((1, 2)).mean()) - target)
        assert ig_error <= 0.05 * abs(target) + 1e-3, senders
        assert ig_error < eap_error, senders


def test_attribution_result_views(linear_model, task):
    result = eap(linear_model, task)
    circuit = result.circuit(top_n=5)
    assert circuit.n_edges == 5
    assert [name for name, _ in circuit.top(5)] == [name for name, _ in result.top(5)]
    assert circuit.metadata["method"] == "eap"
    assert result.edge_scores()[result.top(1)[0][0]] == pytest.approx(result.top(1)[0][1])
    assert result.clean.n == len(task)


def test_attribution_refuses_bad_input(linear_model, task):
    with pytest.raises(InterplabError, match="not differentiable"):
        eap(linear_model, task, metric="accuracy")
    with pytest.raises(InterplabError, match="steps must be a positive int"):
        eap_ig(linear_model, task, steps=0)
    with pytest.raises(InterplabError, match="unknown EAP-IG variant 'embeddings'"):
        eap_ig(linear_model, task, variant="embeddings")
    with pytest.raises(InterplabError, match="unknown metric"):
        eap(linear_model, task, metric="logit-diff")
