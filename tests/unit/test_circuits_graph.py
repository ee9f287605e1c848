"""Edge graph and exact edge patching: edge counts match a brute-force enumeration, circuits
round-trip through JSON and draw, all-edges masks reproduce the clean logits and empty masks
the corrupted (or mean) run, and single-edge masks equal hand-built hook experiments."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

import interplab as il
from interplab.circuits.edge_patching import EdgeModel, EdgePatcher
from interplab.circuits.graph import Circuit, Graph
from interplab.data.tasks import TaskDataset
from interplab.errors import InterplabError
from interplab.models import ToyConfig
from tests.conftest import make_hf_model, make_tokenizer

TOL = 1e-5
VOCAB = 50


def random_task(vocab=VOCAB, batch=4, pos=7, seed=0):
    """Corrupted prompts differ at positions 2 and 4; one row's answer comes early."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, vocab, (batch, pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(1, vocab, (batch,), generator=g)
    corrupted[:, 4] = torch.randint(1, vocab, (batch,), generator=g)
    answer_pos = torch.full((batch,), pos - 1)
    answer_pos[1] = 5
    return TaskDataset(
        name="random",
        prompts=[""] * batch,
        corrupted_prompts=[""] * batch,
        clean_tokens=clean,
        corrupted_tokens=corrupted,
        answers=torch.randint(1, vocab, (batch,), generator=g),
        wrong_answers=torch.randint(1, vocab, (batch,), generator=g),
        answer_pos=answer_pos,
        metadata=[{}] * batch,
    )


def toy(**kwargs):
    cfg = dict(n_layers=2, d_model=32, n_heads=2, d_vocab=VOCAB)
    return il.load_model(ToyConfig(**{**cfg, **kwargs}), device="cpu")


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return {
        "toy-ln-mlp": toy(),
        "toy-attn-only": toy(attn_only=True, normalization="none"),
        "toy-rms-rotary": toy(normalization="RMS", positional="rotary"),
        "gpt2": il.load_model(make_hf_model("gpt2"), device="cpu"),
        "neox-parallel": il.load_model(make_hf_model("gpt_neox"), device="cpu"),
        # grouped-query attention: 4 query heads share 2 key/value heads (qwen2: k/v biases)
        "llama-gqa": il.load_model(
            make_hf_model("llama"), tokenizer=make_tokenizer(), device="cpu"
        ),
        "qwen2-gqa": il.load_model(
            make_hf_model("qwen2"), tokenizer=make_tokenizer(), device="cpu"
        ),
    }


# ------------------------------------------------------------------ graph structure
def brute_force_edges(n_layers, n_heads, has_mlp, parallel, n_kv=None):
    """Edges from the computation order written out node by node."""
    senders_so_far = ["input"]
    edges = []
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        # grouped-query attention: k and v are inputs of the key/value heads 'a{L}.g{G}'
        kv_heads = heads if n_kv is None else [f"a{layer}.g{g}" for g in range(n_kv)]
        for h in heads:
            edges += [(s, f"{h}<q>") for s in senders_so_far]
        for port in "kv":
            for h in kv_heads:
                edges += [(s, f"{h}<{port}>") for s in senders_so_far]
        before_heads = list(senders_so_far)
        senders_so_far += heads
        if has_mlp:
            readable = before_heads if parallel else senders_so_far
            edges += [(s, f"m{layer}") for s in readable]
            senders_so_far.append(f"m{layer}")
    edges += [(s, "logits") for s in senders_so_far]
    return {f"{s}->{r}" for s, r in edges}


@pytest.mark.parametrize(
    "shape",
    [
        (2, 2, True, False),
        (3, 4, False, False),
        (2, 3, True, True),
        (1, 1, True, False),
        (2, 4, True, False, 2),  # grouped-query attention
        (2, 6, False, True, 1),  # multi-query attention
        (2, 6, True, True, 3),
    ],
)
def test_edges_match_brute_force_enumeration(shape):
    graph = Graph(*shape)
    expected = brute_force_edges(*shape)
    assert set(graph.edges) == expected
    assert graph.n_edges == len(expected) == len(graph.edges)
    for name in graph.edges:  # names parse back to their own index
        s, r = graph.edge(name)
        assert f"{graph.senders[s]}->{graph.receivers[r]}" == name
    # every query head reads its k/v from its group's receivers; the index helpers agree
    n_layers, n_heads = shape[:2]
    group = n_heads // (shape[4] if len(shape) > 4 else n_heads)
    node = "g" if len(shape) > 4 and shape[4] != n_heads else "h"
    for layer in range(n_layers):
        for h in range(n_heads):
            assert graph.receivers[graph.head_receiver(layer, h, "q")] == f"a{layer}.h{h}<q>"
            for port in "kv":
                r = graph.head_receiver(layer, h, port)
                assert graph.receivers[r] == f"a{layer}.{node}{h // group}<{port}>"
                assert r == graph.kv_receiver(layer, h // group, port)
                assert graph.head_sender(layer, h) in graph.receiver_senders(r)
                assert len(graph.receiver_senders(r)) == group


def test_graph_from_model_and_bad_input(models):
    assert Graph.from_model(models["gpt2"]) == Graph(2, 4, True, False)
    assert Graph.from_model(models["llama-gqa"]) == Graph(2, 4, True, False, n_kv_heads=2)
    assert Graph(2, 4, n_kv_heads=4) == Graph(2, 4)  # one k/v head per query head: plain
    assert Graph(2, 4, n_kv_heads=4).n_kv_heads is None
    with pytest.raises(InterplabError, match="n_kv_heads=3 must divide n_heads=4"):
        Graph(2, 4, n_kv_heads=3)
    with pytest.raises(InterplabError, match="n_kv_heads must be a positive int"):
        Graph(2, 4, n_kv_heads=0)
    with pytest.raises(InterplabError, match="kv_head 2 is out of range"):
        Graph(2, 4, n_kv_heads=2).kv_receiver(0, 2, "k")
    with pytest.raises(InterplabError, match="head 4 is out of range"):
        Graph(2, 4).head_receiver(0, 4, "q")
    with pytest.raises(InterplabError, match="unknown port 'x'"):
        Graph(2, 4).head_receiver(0, 0, "x")
    assert Graph.from_model(models["toy-attn-only"]) == Graph(2, 2, False, False)
    assert Graph.from_model(models["neox-parallel"]).parallel_attn_mlp
    with pytest.raises(InterplabError, match="n_layers"):
        Graph(0, 2)
    with pytest.raises(InterplabError, match="unknown edge 'a1.h0->a0.h0<q>'"):
        Graph(2, 2).edge("a1.h0->a0.h0<q>")  # a later sender cannot feed an earlier port
    with pytest.raises(InterplabError, match="Did you mean"):
        Graph(2, 2).edge("a0.h0->a1.h0<x>")


# ------------------------------------------------------------------ circuits
def test_from_scores_json_round_trip_and_errors(tmp_path):
    graph = Graph(2, 2, True)
    scores = torch.randn(
        graph.n_senders, graph.n_receivers, generator=torch.Generator().manual_seed(1)
    )
    circuit = Circuit.from_scores(graph, scores, top_n=7, metadata={"method": "test"})
    valid = scores[graph.valid].abs().sort(descending=True).values
    assert circuit.n_edges == 7
    kept = scores[circuit.in_circuit].abs()
    assert torch.equal(kept.sort(descending=True).values, valid[:7])
    by_threshold = Circuit.from_scores(graph, scores, threshold=float(valid[6]))
    assert torch.equal(by_threshold.in_circuit, circuit.in_circuit)
    assert circuit.top(1)[0][1] == pytest.approx(float(scores[circuit.in_circuit][kept.argmax()]))

    path = circuit.save(tmp_path / "c.json")
    loaded = Circuit.load(path)
    assert loaded.graph == graph and loaded.edges == circuit.edges
    assert torch.allclose(loaded.scores, circuit.scores)
    assert loaded.metadata == {"method": "test"}
    assert set(json.loads(path.read_text())["edges"]) == set(circuit.edges)
    assert Circuit.from_edges(graph, circuit.edges).edges == circuit.edges
    complement = circuit.complement()
    assert complement.n_edges == graph.n_edges - 7
    assert not bool((complement.in_circuit & circuit.in_circuit).any())

    with pytest.raises(InterplabError, match="exactly one of top_n= or threshold="):
        Circuit.from_scores(graph, scores)
    with pytest.raises(InterplabError, match="does not exist"):
        Circuit.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InterplabError, match="not valid JSON"):
        Circuit.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InterplabError, match="not a circuit file"):
        Circuit.load(tmp_path / "other.json")
    with pytest.raises(InterplabError, match="in_circuit has shape"):
        Circuit(graph, torch.zeros(3, 3, dtype=torch.bool))


def test_gqa_circuit_json_round_trip_and_versions(tmp_path):
    graph = Graph(2, 4, True, n_kv_heads=2)
    scores = torch.randn(
        graph.n_senders, graph.n_receivers, generator=torch.Generator().manual_seed(2)
    )
    circuit = Circuit.from_scores(graph, scores, top_n=9, metadata={"method": "test"})
    path = circuit.save(tmp_path / "gqa.json")
    data = json.loads(path.read_text())
    assert data["graph"]["n_kv_heads"] == 2 and data["version"] == 2
    loaded = Circuit.load(path)
    assert loaded.graph == graph and loaded.graph.n_kv_heads == 2
    assert loaded.edges == circuit.edges and torch.allclose(loaded.scores, circuit.scores)
    assert any(".g" in name for name in Circuit.full(graph).nodes)
    # graphs without GQA still write the version-1 file older readers expect
    plain = Circuit.full(Graph(2, 2, True)).to_dict()
    assert plain["version"] == 1 and "n_kv_heads" not in plain["graph"]
    with pytest.raises(InterplabError, match="bad 'graph' entry"):
        Circuit.from_dict({**data, "graph": {**data["graph"], "n_groups": 2}})
    with pytest.raises(InterplabError, match="newer than this interplab reads"):
        Circuit.from_dict({**data, "version": 3})


def test_circuit_file_without_n_kv_heads_loads_as_before(tmp_path):
    """A file as interplab wrote it before GQA support (version 1, no n_kv_heads)."""
    old = {
        "format": "interplab.circuit",
        "version": 1,
        "graph": {"n_layers": 2, "n_heads": 2, "has_mlp": True, "parallel_attn_mlp": False},
        "edges": ["input->a0.h1<k>", "a0.h1->m0", "a1.h0->logits"],
        "metadata": {"method": "eap"},
        "scores": {"input->a0.h1<k>": 0.5, "a0.h1->m0": -2.0, "a1.h0->logits": 1.0},
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = Circuit.load(tmp_path / "old.json")
    assert loaded.graph == Graph(2, 2, True, False) and loaded.graph.n_kv_heads is None
    assert set(loaded.edges) == set(old["edges"])
    assert loaded.score_of("a0.h1->m0") == -2.0
    assert loaded.metadata == {"method": "eap"}
    resaved = loaded.to_dict()
    assert resaved["graph"] == old["graph"] and resaved["version"] == 1


def test_draw_gqa_ends_k_and_v_edges_at_group_nodes():
    graph = Graph(2, 4, True, n_kv_heads=2)
    circuit = Circuit.from_edges(graph, ["a0.h3->a1.g0<k>", "input->a0.g1<v>", "a1.h1->logits"])
    assert circuit.nodes == ["input", "a0.g1", "a0.h3", "a1.g0", "a1.h1", "logits"]
    pos = circuit.layout()
    # a group node sits below the middle of its query heads
    assert pos["a1.g0"][0] == pytest.approx((pos["a1.h0"][0] + pos["a1.h1"][0]) / 2)
    assert pos["a1.g0"][1] < pos["a1.h0"][1]
    fig = circuit.draw()
    (lines,) = fig.axes[0].collections[:1]
    segments = lines.get_segments()
    assert len(segments) == 3
    ends = {tuple(seg[-1].round(6)) for seg in segments}
    assert (round(pos["a1.g0"][0], 6), round(pos["a1.g0"][1] - 0.08, 6)) in ends


def test_draw_shows_one_line_per_edge_with_width_by_score():
    graph = Graph(2, 3, True)
    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    names = ["input->a0.h1<k>", "a0.h1->m0", "m1->logits"]
    for value, name in zip([0.5, -2.0, 1.0], names, strict=True):
        scores[graph.edge(name)] = value
    circuit = Circuit.from_scores(graph, scores, top_n=3)
    fig = circuit.draw()
    (lines,) = fig.axes[0].collections[:1]
    widths = sorted(lines.get_linewidths())
    assert len(lines.get_segments()) == 3
    assert widths[-1] == pytest.approx(4.0)  # the largest |score| gets the widest line
    assert widths[0] == pytest.approx(0.4 + 3.6 * 0.5 / 2.0)
    assert set(circuit.nodes) == {"input", "a0.h1", "m0", "m1", "logits"}


# ------------------------------------------------------------------ exact edge patching
@pytest.mark.parametrize(
    "name",
    [
        "toy-ln-mlp",
        "toy-attn-only",
        "toy-rms-rotary",
        "gpt2",
        "neox-parallel",
        "llama-gqa",
        "qwen2-gqa",
    ],
)
def test_full_mask_is_clean_and_empty_mask_is_corrupted(models, name):
    model = models[name]
    vocab = model.cfg.d_vocab
    task = random_task(vocab=min(vocab, 90))
    patcher = EdgePatcher(model, task)
    full = patcher.graph.full_mask()
    logits = patcher.logits(torch.stack([full, torch.zeros_like(full), full]))
    with torch.inference_mode():
        clean = model(patcher.tokens)
        corrupted = model(patcher.corrupted_tokens)
    assert (clean - corrupted).abs().max() > 1e-2  # the corruption matters
    assert (logits[0] - clean).abs().max() <= TOL
    assert (logits[2] - clean).abs().max() <= TOL
    assert (logits[1] - corrupted).abs().max() <= TOL
    # the metric path (answer positions only) agrees with the full logits
    values = patcher.values(torch.stack([full, torch.zeros_like(full)]))
    assert torch.allclose(values[0], patcher.metric(clean), atol=TOL)
    assert torch.allclose(values[1], patcher.metric(corrupted), atol=TOL)


def test_single_edges_equal_hand_built_hook_experiments(models):
    """Three edges, each into a different kind of receiver, removed by hand with hooks."""
    model = models["toy-ln-mlp"]
    task = random_task()
    patcher = EdgePatcher(model, task)
    graph = patcher.graph
    clean_tokens, corrupted_tokens = patcher.tokens, patcher.corrupted_tokens
    w = il.weights(model)
    with torch.inference_mode():
        _, clean = model.run_with_cache(clean_tokens)
        _, corrupted = model.run_with_cache(corrupted_tokens)

    def head_out(cache, layer, head):
        return cache[f"blocks.{layer}.attn.hook_z"][:, :, head] @ w.W_O[layer, head]

    emb_diff = clean["blocks.0.hook_resid_pre"] - corrupted["blocks.0.hook_resid_pre"]

    def value_of_a1h0(v, hook):  # edge input -> a1.h0<v>: a1.h0 reads corrupted embeddings
        x = clean["blocks.1.hook_resid_pre"] - emb_diff
        normed = model.blocks[1].ln1.original_component(x)
        v = v.clone()
        v[:, :, 0] = normed @ w.W_V[1, 0] + w.b_V[1, 0]
        return v

    def logits_without_a0h1(x, hook):  # edge a0.h1 -> logits
        return x - (head_out(clean, 0, 1) - head_out(corrupted, 0, 1))

    def mlp1_without_a0h0(x, hook):  # edge a0.h0 -> m1
        return x - (head_out(clean, 0, 0) - head_out(corrupted, 0, 0))

    experiments = {
        "input->a1.h0<v>": ("blocks.1.attn.hook_v", value_of_a1h0),
        "a0.h1->logits": ("ln_final.hook_in", logits_without_a0h1),
        "a0.h0->m1": ("blocks.1.hook_mlp_in", mlp1_without_a0h0),
    }
    masks = []
    for name in experiments:
        mask = graph.full_mask().clone()
        mask[graph.edge(name)] = 0.0
        masks.append(mask)
    got = patcher.logits(torch.stack(masks))
    for i, (name, hook) in enumerate(experiments.values()):
        with torch.inference_mode(), model.hooks(fwd_hooks=[(name, hook)]):
            expected = model(clean_tokens)
        assert (expected - clean["ln_final.hook_in"].new_zeros(1)).abs().max() > 0
        assert (got[i] - expected).abs().max() <= TOL, list(experiments)[i]
        assert (got[i] - model(clean_tokens)).abs().max() > 1e-4  # the edge mattered


def test_empty_mask_with_mean_ablation_reads_the_mean_residual_stream(models):
    """With every edge mean-ablated the logits receiver reads sum_u mean(out_u) + biases =
    the reference mean of the final residual stream (per position)."""
    model = models["toy-ln-mlp"]
    task = random_task()
    reference = torch.randint(1, VOCAB, (9, 7), generator=torch.Generator().manual_seed(3))
    patcher = EdgePatcher(model, task, ablation="mean", reference=reference)
    empty = torch.zeros_like(patcher.graph.full_mask())
    got = patcher.logits(empty[None])[0]
    width = patcher.tokens.shape[1]
    with torch.inference_mode():
        _, cache = model.run_with_cache(reference[:, :width])
        mean_final = cache["ln_final.hook_in"].mean(0, keepdim=True)
        with model.hooks(fwd_hooks=[("ln_final.hook_in", lambda x, hook: mean_final.expand_as(x))]):
            expected = model(patcher.tokens)
    assert (got - expected).abs().max() <= TOL


def test_edge_patching_refuses_bad_input(models):
    task = random_task()
    # Gemma 2 normalises attention outputs before the residual stream: not a sum of edges
    with pytest.raises(InterplabError, match="not the sum of its heads"):
        EdgeModel(il.load_model(make_hf_model("gemma2"), device="cpu"))
    patcher = EdgePatcher(models["toy-attn-only"], task)
    with pytest.raises(InterplabError, match=r"masks must be \[n, sender, receiver\]"):
        patcher.values(torch.ones(2, 3, 4))
    with pytest.raises(InterplabError, match="unknown ablation 'zero'"):
        EdgePatcher(models["toy-attn-only"], task, ablation="zero")
    with pytest.raises(InterplabError, match="max_batch"):
        EdgePatcher(models["toy-attn-only"], task, max_batch=0)
    with pytest.raises(InterplabError, match="reference prompts"):
        EdgePatcher(
            models["toy-attn-only"], task, ablation="mean", reference=task.clean_tokens[:, :3]
        )
    with pytest.raises(InterplabError, match="expected a TaskDataset"):
        EdgePatcher(models["toy-attn-only"], "ioi")
