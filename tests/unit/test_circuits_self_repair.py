"""Self-repair: the decomposition total = direct + downstream + LN-scale is an identity; the
total effect is the logit-difference change of an independent `ablate` run; the direct,
per-component and LN-scale terms equal DLA differences between clean and ablated caches;
components before the ablated head get nothing; a head with zero output has zero effects."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

import interplab as il
from interplab import circuits as C
from interplab.circuits.self_repair import SelfRepairResult, self_repair
from interplab.data.tasks import TaskDataset
from interplab.errors import InterplabError
from tests.conftest import VOCAB, make_hf_model

FAMILIES = ["gpt2", "llama", "gpt_neox"]  # LayerNorm; RMSNorm + GQA; parallel attn/MLP


def enlarge(hf, factor=4.0):
    # random init gives tiny head outputs; larger weights make every effect clearly non-zero
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 2 and "wpe" not in name:
                p.mul_(factor)
    return hf


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    torch.set_num_threads(1)
    return il.load_model(enlarge(make_hf_model(request.param)), device="cpu")


def random_task(batch=5, pos=7, seed=0, n_wrong=None):
    g = torch.Generator().manual_seed(seed)
    wrong_shape = (batch,) if n_wrong is None else (batch, n_wrong)
    return TaskDataset(
        name="random",
        prompts=[""] * batch,
        corrupted_prompts=[""] * batch,
        clean_tokens=torch.randint(1, VOCAB, (batch, pos), generator=g),
        corrupted_tokens=torch.randint(1, VOCAB, (batch, pos), generator=g),
        answers=torch.randint(1, VOCAB, (batch,), generator=g),
        wrong_answers=torch.randint(1, VOCAB, wrong_shape, generator=g),
        answer_pos=torch.randint(2, pos, (batch,), generator=g),
        metadata=[{}] * batch,
    )


def logit_diff(model, task, logits):
    return C.logit_diff(logits, task.answers, task.wrong_answers, task.answer_pos)


def ablated_logit_diff(model, task, head, kind):
    """LD' by `interplab.circuits.ablate`, one call per example for 'resample' (its
    reference is then that example's own corrupted prompt)."""
    if kind == "resample":
        rows = []
        for b in range(len(task)):
            one = slice(b, b + 1)
            logits = C.ablate(
                model, task.clean_tokens[one], head, "resample", task.corrupted_tokens[one]
            )
            rows.append(
                C.logit_diff(
                    logits, task.answers[one], task.wrong_answers[one], task.answer_pos[one]
                )
            )
        return torch.cat(rows)
    return logit_diff(
        model, task, C.ablate(model, task.clean_tokens, head, kind, task.clean_tokens)
    )


@pytest.mark.parametrize("kind", ["resample", "mean"])
def test_identity_and_total_match_ablate(model, kind):
    task = random_task(n_wrong=2 if kind == "mean" else None)
    result = self_repair(model, task, ablation=kind)
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    assert result.direct_effect.shape == (n_heads, len(task))
    assert result.downstream_effect.shape == (n_heads, len(result.components), len(task))
    # the decomposition is exact (float32 activations, float64 arithmetic)
    parts = result.direct_effect + result.downstream_effect.sum(1) + result.ln_scale_effect
    assert torch.allclose(parts, result.total_effect, rtol=0, atol=1e-4)
    # and the total is LD' - LD of an independent ablation run
    with torch.no_grad():
        clean = logit_diff(model, task, model(task.clean_tokens))
    assert torch.allclose(result.clean.per_example, clean, atol=1e-4)
    # resample is checked one example at a time, so on a few heads only
    checked = result.heads if kind == "mean" else ["L0H1", "L0H3", "L1H2"]
    for head in checked:
        i = result.heads.index(head)
        expected = ablated_logit_diff(model, task, head, kind) - clean
        assert torch.allclose(result.total_effect[i], expected, rtol=0, atol=1e-4), head
    # every term is really there (a test of a sum of zeros could not fail)
    early = [i for i, h in enumerate(result.heads) if h.startswith("L0")]
    assert result.downstream_effect[early].abs().max() > 1e-3
    assert result.ln_scale_effect.abs().max() > 1e-3
    assert (result.total_effect - result.direct_effect).abs().max() > 1e-3
    # Estimates agree with the per-example tensors
    assert result.compensation("L0H1").mean == pytest.approx(
        (result.total_effect[1] - result.direct_effect[1]).double().mean().item(), abs=1e-6
    )


def _ablated_cache(model, task, head, kind):
    hooks = C.ablation_hooks(model, head, kind, task.clean_tokens)
    with model.hooks(fwd_hooks=hooks):
        _, acts = C.capture(model, task.clean_tokens, C.dla_hook_names(model))
    return acts


def test_terms_equal_dla_differences_of_two_caches(model):
    """direct = DLA share of the head with its ablated z, minus its clean share (both with the
    clean scale); downstream c = DLA share of c in the ablated run with the clean scale minus
    its clean share; LN term = DLA logit diff of the ablated run with its own scale minus with
    the clean scale. All through `interplab.circuits.dla_from_cache`."""
    task = random_task(seed=1)
    head, (layer, h) = "L0H2", (0, 2)
    result = self_repair(model, task, [head], ablation="mean")
    _, clean = C.capture(model, task.clean_tokens, C.dla_hook_names(model))
    ablated = _ablated_cache(model, task, head, "mean")

    def dla(acts):
        return C.dla_from_cache(model, acts, task.answers, task.wrong_answers, task.answer_pos)

    base = dla(clean)
    swapped = dict(clean)  # clean run with only the head's z replaced
    z = clean[f"blocks.{layer}.attn.hook_z"].clone()
    z[:, :, h] = ablated[f"blocks.{layer}.attn.hook_z"][:, :, h]
    swapped[f"blocks.{layer}.attn.hook_z"] = z
    direct = dla(swapped).heads[layer, h] - base.heads[layer, h]
    assert direct.abs().max() > 1e-3
    assert torch.allclose(result.direct_effect[0].double(), direct, atol=1e-5)

    frozen = dict(ablated)  # ablated run read through the clean scale
    frozen["ln_final.hook_scale"] = clean["ln_final.hook_scale"]
    moved = dla(frozen)
    for c, name in enumerate(result.components):
        if name.startswith("MLP"):
            expected = moved.mlp[int(name[3:])] - base.mlp[int(name[3:])]
        else:
            lay, hh = (int(x) for x in name[1:].split("H"))
            expected = moved.heads[lay, hh] - base.heads[lay, hh]
        if result.downstream_mask[0, c]:
            assert torch.allclose(result.downstream_effect[0, c].double(), expected, atol=1e-5)
        else:  # upstream: the clean and ablated runs agree, and the result holds exact zeros
            assert name == "L0H2" or expected.abs().max() < 1e-5
            assert torch.equal(result.downstream_effect[0, c], torch.zeros(len(task)))
    ln = dla(ablated).logit_diff - moved.logit_diff
    assert ln.abs().max() > 1e-4
    assert torch.allclose(result.ln_scale_effect[0].double(), ln, atol=1e-5)


def test_downstream_masks(model):
    task = random_task(batch=3)
    last = model.cfg.n_layers - 1
    result = self_repair(model, task, [f"L{last}H1", "L0H0"], ablation="zero")
    parallel = model.cfg.parallel_attn_mlp
    down_last = [c for c, m in zip(result.components, result.downstream_mask[0], strict=True) if m]
    # a last-layer head: no later heads; its own layer's MLP runs after it unless in parallel
    assert down_last == ([] if parallel else [f"MLP{last}"])
    not_down = ~result.downstream_mask[0]
    assert torch.equal(result.downstream_effect[0][not_down], torch.zeros(int(not_down.sum()), 3))
    if parallel:  # nothing after it but the final norm
        assert torch.allclose(
            result.total_effect[0], result.direct_effect[0] + result.ln_scale_effect[0], atol=1e-5
        )
    down_first = {c for c, m in zip(result.components, result.downstream_mask[1], strict=True) if m}
    expected = {f"L{layer}H{h}" for layer in range(1, last + 1) for h in range(4)}
    expected |= {f"MLP{layer}" for layer in range(0 if not parallel else 1, last + 1)}
    assert down_first == expected


def test_attention_only_and_norm_free_toys():
    task = random_task(batch=4)
    attn_only = il.load_model(
        il.models.ToyConfig(n_layers=2, d_model=32, n_heads=4, attn_only=True, d_vocab=VOCAB),
        device="cpu",
    )
    result = self_repair(attn_only, task, ["L1H0", "L0H3"], ablation="zero")
    assert not any(c.startswith("MLP") for c in result.components)
    assert not result.downstream_mask[0].any()  # last layer: only the final norm reacts
    parts = result.direct_effect + result.downstream_effect.sum(1) + result.ln_scale_effect
    assert torch.allclose(parts, result.total_effect, atol=1e-4)
    assert result.ln_scale_effect.abs().max() > 1e-4

    no_norm = il.load_model(
        il.models.ToyConfig(n_layers=2, d_model=32, n_heads=4, normalization="none", d_vocab=VOCAB),
        device="cpu",
    )
    result = self_repair(no_norm, task, ablation="resample")
    assert torch.equal(result.ln_scale_effect, torch.zeros_like(result.ln_scale_effect))
    parts = result.direct_effect + result.downstream_effect.sum(1)
    assert torch.allclose(parts, result.total_effect, atol=1e-4)


def test_head_with_zero_output_has_zero_effects():
    hf = enlarge(make_hf_model("gpt2"))
    d_head = hf.config.n_embd // hf.config.n_head
    with torch.no_grad():  # GPT-2's c_proj is x @ W: rows of head 2 are its W_O
        hf.transformer.h[0].attn.c_proj.weight[2 * d_head : 3 * d_head] = 0
    model = il.load_model(hf, device="cpu")
    assert il.weights(model).W_O[0, 2].abs().max() == 0
    result = self_repair(model, random_task(), ["L0H2", "L0H1"], ablation="zero")
    for effects in (result.total_effect[0], result.direct_effect[0], result.ln_scale_effect[0]):
        assert effects.abs().max() < 1e-6
    assert result.downstream_effect[0].abs().max() < 1e-6
    assert result.total_effect[1].abs().max() > 1e-3  # a head with output does matter


def test_batching_does_not_change_results():
    model = il.load_model(enlarge(make_hf_model("gpt2")), device="cpu")
    task = random_task()
    one_pass = self_repair(model, task, ablation="mean")
    one_head_per_pass = self_repair(model, task, ablation="mean", max_batch=len(task))
    for name in ("direct_effect", "total_effect", "ln_scale_effect", "downstream_effect"):
        assert torch.allclose(getattr(one_pass, name), getattr(one_head_per_pass, name), atol=1e-5)


@pytest.fixture(scope="module")
def toy_result():
    model = il.load_model(
        il.models.ToyConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=VOCAB), device="cpu"
    )
    return self_repair(model, random_task(), ablation="mean")


def test_summaries_table_and_plots(toy_result: SelfRepairResult):
    r = toy_result
    rows = r.table()
    assert [row["head"] for row in rows] == r.heads
    row = rows[0]
    split = r.split("L0H0")
    # the split adds up to the compensation
    assert row["compensation"] == pytest.approx(
        split["heads"].mean + split["mlps"].mean + split["ln_scale"].mean, abs=1e-5
    )
    comp = r.compensation((0, 0))
    parts = sum(e.per_example for e in r.downstream(C.Head(0, 0)).values())
    assert torch.allclose(parts, comp.per_example, atol=1e-5)
    assert row["repair fraction"] == pytest.approx(-comp.mean / r.direct("L0H0").mean, rel=1e-4)
    summary = json.loads(json.dumps(r.to_dict()))
    assert summary["per_head"]["L1H3"]["total"]["mean"] == pytest.approx(r.total("L1H3").mean)
    assert summary["ablation"] == "mean"
    fig = r.plot()
    assert len(fig.axes) == 2
    plt.close(fig)
    fig = r.plot_split("L0H1", top=3)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[:3] == ["direct", "total", "compensation"] and labels[-1] == "other"
    assert len(labels) == 3 + 3 + 1
    plt.close(fig)
    with pytest.raises(InterplabError, match="L5H0"):
        r.direct("L5H0")


def test_bad_inputs():
    model = il.load_model(
        il.models.ToyConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=VOCAB), device="cpu"
    )
    task = random_task(batch=2)
    with pytest.raises(InterplabError, match=r"'L9H0'.*layers 0\.\.1.*L0H0 \.\. L1H3"):
        self_repair(model, task, ["L9H0"])
    with pytest.raises(InterplabError, match=r"'L1H7'.*heads 0\.\.3"):
        self_repair(model, task, [(1, 7)])
    with pytest.raises(InterplabError, match="not a head"):
        self_repair(model, task, ["L0N3"])
    with pytest.raises(InterplabError, match="listed twice"):
        self_repair(model, task, ["L0H1", C.Head(0, 1)])
    with pytest.raises(InterplabError, match="no heads"):
        self_repair(model, task, [])
    with pytest.raises(InterplabError, match="unknown self-repair ablation 'noise'"):
        self_repair(model, task, ablation="noise")
    with pytest.raises(InterplabError, match="max_batch"):
        self_repair(model, task, max_batch=0)
    multi = random_task(batch=2)
    multi.answers = torch.randint(1, VOCAB, (2, 2))  # two-token answers
    with pytest.raises(InterplabError, match="one next token"):
        self_repair(model, multi)
    with pytest.raises(InterplabError, match="no examples"):
        self_repair(model, task.select([]))
    with pytest.raises(InterplabError, match="TaskDataset"):
        self_repair(model, task.clean_tokens)
    gemma = il.load_model(make_hf_model("gemma2"), device="cpu")
    with pytest.raises(InterplabError, match="post-attention"):
        self_repair(gemma, task)
