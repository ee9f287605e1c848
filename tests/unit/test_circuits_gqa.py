"""Edge-level circuits on grouped-query attention (GQA) models: 4 query heads sharing 2
key/value heads (tiny Llama and Qwen2 fixtures; Qwen2 adds k/v biases). Single k/v edges
equal hand-built hook experiments written against the HF modules (not the weight
accessor), EAP equals gradient-times-difference computed by hand and finite differences
of edge masks, and ACDC / faithfulness respect that a key/value head serves a group."""

from __future__ import annotations

import pytest
import torch

import interplab as il
from interplab.circuits.acdc import acdc
from interplab.circuits.eap import eap, eap_ig, exact_edge_scores
from interplab.circuits.edge_patching import EdgePatcher
from interplab.circuits.faithfulness import faithfulness
from interplab.circuits.graph import Graph
from tests.conftest import make_hf_model, make_tokenizer
from tests.unit.test_circuits_graph import random_task

TOL = 1e-5


def load(family: str, dtype: str = "float32"):
    return il.load_model(
        make_hf_model(family), tokenizer=make_tokenizer(), device="cpu", dtype=dtype
    )


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return {"llama": load("llama"), "qwen2": load("qwen2")}


@pytest.fixture(scope="module")
def models64():
    """float64 copies: gradients compared to 1e-8 relative, not float32 rounding."""
    return {"llama": load("llama", "float64"), "qwen2": load("qwen2", "float64")}


@pytest.fixture(scope="module")
def task():
    return random_task(vocab=90)


# ------------------------------------------------------------------ by hand, from HF modules
def head_out(model, cache, layer, head):
    """Head `head`'s write z_h @ W_O[h], from the HF output projection's weight."""
    d_head = model.cfg.d_head
    W_O = model.blocks[layer].attn.o.original_component.weight  # [d_model, heads * d_head]
    z = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
    return z @ W_O[:, head * d_head : (head + 1) * d_head].T


def port_input(model, layer, port, index, x):
    """Head `index`'s `port` (its key/value head for k, v) from residual stream `x`: the
    block's own norm and HF projection (with bias), cut to that head's columns."""
    d_head = model.cfg.d_head
    proj = getattr(model.blocks[layer].attn, port).original_component
    out = proj(model.blocks[layer].ln1.original_component(x))
    return out[..., index * d_head : (index + 1) * d_head]


def sender_out(model, cache, sender):
    """A sender's output from a cache: the embeddings, a head's write or an MLP's output."""
    if sender == "input":
        return cache["blocks.0.hook_resid_pre"]
    if sender.startswith("m"):
        return cache[f"blocks.{sender[1:]}.hook_mlp_out"]
    layer, head = sender[1:].split(".h")
    return head_out(model, cache, int(layer), int(head))


def parse_receiver(receiver):
    """'a1.g0<k>' -> (1, 'k', 0): layer, port and the head index that port's hook uses."""
    node, port = receiver[:-3], receiver[-2]
    layer, index = node[1:].split(".")
    return int(layer), port, int(index[1:])


# single edges into q, k and v ports, from the embeddings, a head of another group and an MLP
EDGES = ["a0.h3->a1.g0<k>", "input->a1.g1<v>", "input->a0.g1<k>", "m0->a1.h2<q>"]


# ------------------------------------------------------------------ exact edge patching
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_single_gqa_edges_equal_hand_built_hook_experiments(models, task, family):
    """Removing u -> a{L}.g{G}<k> = the key of key/value head G (and only it) computed from
    the residual stream with u's clean output swapped for its corrupted one."""
    model = models[family]
    patcher = EdgePatcher(model, task)
    graph = patcher.graph
    assert graph.n_kv_heads == 2 and graph.group_size == 2
    with torch.inference_mode():
        _, clean = model.run_with_cache(patcher.tokens)
        _, corrupted = model.run_with_cache(patcher.corrupted_tokens)
    masks = []
    for name in EDGES:
        mask = graph.full_mask().clone()
        mask[graph.edge(name)] = 0.0
        masks.append(mask)
    got = patcher.logits(torch.stack(masks))
    with torch.inference_mode():
        plain = model(patcher.tokens)
        for i, name in enumerate(EDGES):
            sender, receiver = name.split("->")
            layer, port, index = parse_receiver(receiver)
            diff = sender_out(model, clean, sender) - sender_out(model, corrupted, sender)
            x = clean[f"blocks.{layer}.hook_resid_pre"] - diff

            def hook(act, hook, x=x, layer=layer, port=port, index=index):
                act = act.clone()
                act[:, :, index] = port_input(model, layer, port, index, x)
                return act

            with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_{port}", hook)]):
                expected = model(patcher.tokens)
            assert (got[i] - expected).abs().max() <= TOL, name
            assert (expected - plain).abs().max() > 1e-4, name  # the edge mattered


def test_a_kv_edge_changes_only_its_groups_attention(models, task):
    """With a0.h3 -> a1.g0<k> removed, query heads 0 and 1 (group 0) of layer 1 attend
    differently; heads 2 and 3 (group 1) read another key and are untouched."""
    patcher = EdgePatcher(models["llama"], task)
    graph, em = patcher.graph, patcher.em
    mask = graph.full_mask().clone()
    mask[graph.edge("a0.h3->a1.g0<k>")] = 0.0
    hook = "blocks.1.attn.hook_pattern"
    with torch.inference_mode():
        cut = em.run(patcher.tokens, mask[None], patcher.ablated, keep=[hook]).acts[hook]
        full = em.run(patcher.tokens, keep=[hook]).acts[hook]
    change = (cut - full).abs().amax(dim=(0, 2, 3))  # per query head
    assert bool((change[:2] > 1e-4).all())
    assert float(change[2:].max()) == 0.0


def test_exact_edge_scores_on_gqa_equal_the_hand_built_metric(models, task):
    model = models["llama"]
    exact = exact_edge_scores(model, task)
    patcher = EdgePatcher(model, task)
    graph = patcher.graph
    with torch.inference_mode():
        _, clean = model.run_with_cache(patcher.tokens)
        _, corrupted = model.run_with_cache(patcher.corrupted_tokens)
        base = patcher.metric(model(patcher.tokens))
        sender, receiver = EDGES[0].split("->")
        layer, port, index = parse_receiver(receiver)
        diff = sender_out(model, clean, sender) - sender_out(model, corrupted, sender)
        x = clean[f"blocks.{layer}.hook_resid_pre"] - diff

        def hook(act, hook):
            act = act.clone()
            act[:, :, index] = port_input(model, layer, port, index, x)
            return act

        with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_{port}", hook)]):
            expected = patcher.metric(model(patcher.tokens)) - base
    s, r = graph.edge(EDGES[0])
    assert float(expected.abs().max()) > 1e-4
    assert torch.allclose(exact.per_example[:, s, r], expected.float(), atol=TOL)


# ------------------------------------------------------------------ attribution
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_eap_on_gqa_equals_gradient_times_difference_by_hand(models64, task, family):
    """score(u -> v) = sum_pos (corrupted_u - clean_u) . d metric / d x_v, with the gradient
    taken by hand through a zero probe added to the residual stream that only port v's
    projection reads (one backward per edge)."""
    model = models64[family]
    scores = eap(model, task)
    patcher = EdgePatcher(model, task)
    with torch.no_grad():
        _, clean = model.run_with_cache(patcher.tokens)
        _, corrupted = model.run_with_cache(patcher.corrupted_tokens)
    for name in EDGES:
        sender, receiver = name.split("->")
        layer, port, index = parse_receiver(receiver)
        probe = torch.zeros_like(clean["blocks.0.hook_resid_pre"], requires_grad=True)
        resid = {}

        def keep(x, hook, resid=resid):
            resid["x"] = x

        def swap(act, hook, layer=layer, port=port, index=index, resid=resid, probe=probe):
            act = act.clone()
            act[:, :, index] = port_input(model, layer, port, index, resid["x"] + probe)
            return act

        hooks = [
            (f"blocks.{layer}.hook_resid_pre", keep),
            (f"blocks.{layer}.attn.hook_{port}", swap),
        ]
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
            (grad,) = torch.autograd.grad(patcher.metric(model(patcher.tokens)).sum(), probe)
        delta = sender_out(model, corrupted, sender) - sender_out(model, clean, sender)
        expected = (delta * grad).sum(dim=(1, 2)).detach()
        s, r = patcher.graph.edge(name)
        got = scores.per_example[:, s, r].double()
        scale = float(expected.abs().max())
        assert scale > 1e-5, name  # the edge has a gradient signal
        assert (got - expected).abs().max() <= 1e-5 * scale, name


def test_eap_on_gqa_equals_finite_differences_of_edge_masks(models64, task):
    """x_v = resid_v - (1 - m) (out_u - ablated_u), so d metric / d m_uv = -score(u -> v),
    for every edge (q, per-group k and v, MLP and logits receivers)."""
    llama64 = models64["llama"]
    scores = eap(llama64, task)
    patcher = EdgePatcher(llama64, task)
    graph = patcher.graph
    index = graph.edge_index
    rows = torch.arange(len(index))
    # HF's eager attention takes its softmax in float32 even in float64 models, so the
    # metric carries ~1e-8 noise: a step of 1e-2 keeps that noise and the O(eps^2)
    # truncation error of central differences both near 4e-6 (5e-5 of the largest score)
    eps = 1e-2
    plus = graph.full_mask().double().repeat(len(index), 1, 1)
    minus = plus.clone()
    plus[rows, index[:, 0], index[:, 1]] += eps
    minus[rows, index[:, 0], index[:, 1]] -= eps
    derivative = (patcher.values(plus) - patcher.values(minus)).T / (2 * eps)  # [batch, edge]
    got = scores.per_example[:, index[:, 0], index[:, 1]].double()
    kv = torch.tensor([".g" in graph.receivers[r] for r in index[:, 1].tolist()])
    scale = float(derivative.abs().max())
    assert float(derivative[:, kv].abs().max()) > 1e-3  # k/v group edges carry signal
    assert (got + derivative).abs().max() <= 2e-4 * scale
    # one-step EAP-IG is EAP on GQA models too
    one = eap_ig(llama64, task, steps=1, variant="activations")
    assert torch.allclose(one.per_example, scores.per_example, atol=1e-6)


# ------------------------------------------------------------------ ACDC and faithfulness
def test_acdc_and_faithfulness_on_gqa(models, task):
    model = models["llama"]
    circuit = acdc(model, task, threshold=1e-4)  # the empty circuit's KL is 2.4e-3
    graph = circuit.graph
    assert graph == Graph.from_model(model) and 0 < circuit.n_edges < graph.n_edges
    assert any(".g" in name for name in circuit.edges)  # some key/value group edges matter
    # every kept input port feeds a node that still has an outgoing edge: a k/v port stays
    # while any query head of its group does
    for r in circuit.in_circuit.any(0).nonzero().flatten().tolist():
        if r != graph.logits_receiver:
            assert any(bool(circuit.in_circuit[s].any()) for s in graph.receiver_senders(r))
    result = faithfulness(model, task, circuit, metric="kl", minimality=False)
    assert result.circuit.mean == pytest.approx(circuit.metadata["distance"], abs=1e-6)
    full = faithfulness(model, task, circuit.full(graph), metric="kl", minimality=False)
    assert full.faithfulness.mean == pytest.approx(1.0, abs=1e-6)
