"""ACDC recovers the circuit of a hand-built model whose relevant edges are known in closed
form; speculative batching gives the same circuit as one-edge-at-a-time ACDC; faithfulness,
completeness and minimality have their defined endpoints."""

from __future__ import annotations

import pytest
import torch

import interplab as il
from interplab.circuits.acdc import acdc
from interplab.circuits.faithfulness import faithfulness, faithfulness_curve
from interplab.circuits.graph import Circuit, Graph
from interplab.errors import InterplabError
from interplab.models import ToyConfig
from tests.unit.test_circuits_graph import VOCAB, random_task

# In the hand-built model below only these edges can change the output (see `known_model`).
KNOWN = {
    "input->a0.h0<v>",
    "input->a1.h1<v>",
    "a0.h0->a1.h1<v>",
    "a0.h0->logits",
    "a1.h1->logits",
}


@pytest.fixture(scope="module")
def known_model():
    """Two attention-only layers of two heads, no normalisation, with
    * W_Q = W_K = 0: every pattern is the uniform causal average, so no q or k edge matters;
    * W_O = 0 for heads a0.h1 and a1.h0: they write nothing, so no edge from them matters
      (and neither do their inputs).
    That leaves value edges among input, a0.h0, a1.h1 and their edges to the logits. The
    clean and corrupted prompts differ only before the answer position, so the direct edge
    input -> logits (which reads the answer position's own embedding) does not matter
    either: KNOWN is exactly the set of edges that matter."""
    torch.set_num_threads(1)
    model = il.load_model(
        ToyConfig(
            n_layers=2, d_model=32, n_heads=2, d_vocab=VOCAB, attn_only=True, normalization="none"
        ),
        device="cpu",
    )
    d_head = model.cfg.d_head
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
        for block in model.blocks:
            block.attn.q.original_component.weight.zero_()
            block.attn.k.original_component.weight.zero_()
        model.blocks[0].attn.o.original_component.weight[:, d_head : 2 * d_head] = 0.0
        model.blocks[1].attn.o.original_component.weight[:, :d_head] = 0.0
    return model


@pytest.fixture(scope="module")
def mlp_model():
    return il.load_model(ToyConfig(n_layers=2, d_model=32, n_heads=2, d_vocab=VOCAB), device="cpu")


@pytest.fixture(scope="module")
def task():
    return random_task(batch=6)


def test_acdc_recovers_the_known_circuit(known_model, task):
    circuit = acdc(known_model, task, threshold=1e-6)
    assert set(circuit.edges) == KNOWN
    assert circuit.metadata["method"] == "acdc" and circuit.metadata["metric"] == "kl"
    assert circuit.metadata["distance"] <= 1e-6
    kept = circuit.scores[circuit.in_circuit]
    assert bool((kept > 1e-6).all())  # each kept edge failed the removal test


def test_acdc_threshold_zero_keeps_every_edge_that_matters(known_model, mlp_model, task):
    circuit = acdc(known_model, task, threshold=0.0)
    assert set(circuit.edges) >= KNOWN
    # on a generic model: removing any kept edge raises the KL, so the circuit is minimal
    # in the sense ACDC tests, and keeps the clean behaviour exactly (KL ~ 0)
    found = acdc(mlp_model, task, threshold=0.0)
    result = faithfulness(mlp_model, task, found, metric="kl")
    assert result.faithfulness.mean == pytest.approx(1.0, abs=1e-4)
    assert found.metadata["distance"] <= 1e-6


def test_speculative_batches_equal_one_edge_at_a_time(mlp_model, task):
    for threshold in (0.002, 0.02):
        sequential = acdc(mlp_model, task, threshold=threshold, edges_per_pass=1)
        batched = acdc(mlp_model, task, threshold=threshold, edges_per_pass=16)
        assert sequential.edges == batched.edges
        assert torch.allclose(sequential.scores, batched.scores, atol=1e-6)
        assert batched.metadata["forward_passes"] < sequential.metadata["forward_passes"]
    huge = acdc(mlp_model, task, threshold=100.0)
    assert huge.n_edges == 0


def test_faithfulness_endpoints_and_minimality(known_model, task):
    graph = Graph.from_model(known_model)
    full = faithfulness(known_model, task, Circuit.full(graph), metric="kl", minimality=False)
    assert full.faithfulness.mean == pytest.approx(1.0, abs=1e-6)
    assert full.completeness.mean == pytest.approx(0.0, abs=1e-6)  # nothing is left outside
    empty = faithfulness(known_model, task, Circuit.empty(graph), metric="kl")
    assert empty.faithfulness.mean == pytest.approx(0.0, abs=1e-6)
    assert empty.completeness.mean == pytest.approx(1.0, abs=1e-6)

    # the known circuit plus an edge from a head that writes nothing: that edge is redundant
    padded = Circuit.from_edges(graph, [*KNOWN, "a0.h1->logits"])
    result = faithfulness(known_model, task, padded, metric="kl")
    assert result.faithfulness.mean == pytest.approx(1.0, abs=1e-5)
    assert result.redundant_edges == ["a0.h1->logits"]
    assert not result.minimal
    known = faithfulness(known_model, task, Circuit.from_edges(graph, sorted(KNOWN)), metric="kl")
    assert known.minimal
    assert known.faithfulness.per_example.double().mean().item() == pytest.approx(
        known.faithfulness.mean, abs=1e-6
    )
    summary = known.summary()
    assert summary["n_edges"] == 5 and summary["redundant_edges"] == 0


def test_faithfulness_curve_and_mean_ablation(known_model, task):
    graph = Graph.from_model(known_model)
    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    for i, name in enumerate(sorted(KNOWN)):
        scores[graph.edge(name)] = 10.0 - i
    curve = faithfulness_curve(known_model, task, scores, [0, 5, graph.n_edges], metric="kl")
    assert curve[0] == pytest.approx(0.0, abs=1e-6)
    assert curve[1] == pytest.approx(1.0, abs=1e-5)  # the top 5 are the known circuit
    assert curve[2] == pytest.approx(1.0, abs=1e-6)
    # against the mean of the corrupted prompts the answer position's own embedding differs
    # too, so the direct edge input -> logits joins the edges that matter
    with_direct = Circuit.from_edges(graph, [*KNOWN, "input->logits"])
    mean = faithfulness(known_model, task, with_direct, ablation="mean", metric="kl")
    assert mean.faithfulness.mean == pytest.approx(1.0, abs=1e-5)
    assert mean.minimal and mean.ablation == "mean"
    without = faithfulness(
        known_model, task, Circuit.from_edges(graph, sorted(KNOWN)), ablation="mean", metric="kl"
    )
    assert without.faithfulness.mean < 1.0 - 1e-3


def test_acdc_and_faithfulness_refuse_bad_input(known_model, task):
    with pytest.raises(InterplabError, match="threshold must be a number >= 0"):
        acdc(known_model, task, threshold=-1.0)
    with pytest.raises(InterplabError, match="edges_per_pass"):
        acdc(known_model, task, edges_per_pass=0)
    with pytest.raises(InterplabError, match="expected a Circuit"):
        faithfulness(known_model, task, ["a0.h0->logits"])
    other = Circuit.full(Graph(3, 2, False))
    with pytest.raises(InterplabError, match="is not this model's graph"):
        faithfulness(known_model, task, other)
    with pytest.raises(InterplabError, match="minimality was not computed"):
        _ = faithfulness(
            known_model, task, other.__class__.full(Graph.from_model(known_model)), minimality=False
        ).minimal
