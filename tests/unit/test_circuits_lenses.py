"""Lenses: the logit lens's last point is the model's logits; DLA shares sum exactly to the
frozen-scale logit difference (which is the model's own); per-head outputs match TL's
per-head result hook; plots render."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

import interplab as il
from interplab import circuits as C
from interplab.data.tasks import TaskDataset
from interplab.errors import InterplabError
from tests.conftest import VOCAB, make_hf_model, make_tokenizer

FAMILIES = ["gpt2", "llama", "gpt_neox"]


def enlarge(hf, factor=4.0):
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 2 and "wpe" not in name:
                p.mul_(factor)
    return hf


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    torch.set_num_threads(1)
    return il.load_model(enlarge(make_hf_model(request.param)), device="cpu")


def random_task(batch=4, pos=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, VOCAB, (batch, pos), generator=g)
    return TaskDataset(
        name="random",
        prompts=[""] * batch,
        corrupted_prompts=[""] * batch,
        clean_tokens=clean,
        corrupted_tokens=torch.randint(1, VOCAB, (batch, pos), generator=g),
        answers=torch.randint(1, VOCAB, (batch,), generator=g),
        wrong_answers=torch.randint(1, VOCAB, (batch, 2), generator=g),
        answer_pos=torch.randint(1, pos, (batch,), generator=g),
        metadata=[{}] * batch,
    )


@pytest.mark.parametrize("scale", ["recompute", "cached"])
def test_logit_lens_last_point_is_the_models_logits(model, scale):
    ids = random_task().clean_tokens
    lens = C.logit_lens(model, ids, scale=scale)
    with torch.no_grad():
        logits = model(ids)
    assert lens.logits.shape == (model.cfg.n_layers + 1, *logits.shape)
    assert (lens.logits[-1] - logits).abs().max() < 1e-4
    assert (lens.logits[0] - logits).abs().max() > 1e-2  # earlier points really differ
    assert lens.points[0] == "blocks.0.hook_resid_pre"


def test_logit_lens_cached_scale_closed_form(model):
    ids = random_task().clean_tokens
    lens = C.logit_lens(model, ids, scale="cached", positions=[2, 5])
    _, cache = model.run_with_cache(ids)
    w = il.weights(model)
    x = cache["blocks.1.hook_resid_pre"][:, [2, 5]]
    if model.cfg.normalization_type == "LN":
        x = x - x.mean(-1, keepdim=True)
    expected = (
        x / cache["ln_final.hook_scale"][:, [2, 5]] * w.ln_final_w + w.ln_final_b
    ) @ w.W_U + w.b_U
    assert torch.allclose(lens.logits[1], expected, atol=1e-4)
    # recompute mode uses the point's own norm statistics instead
    recomputed = C.logit_lens(model, ids, positions=[2, 5]).logits[1]
    assert not torch.allclose(recomputed, expected, atol=1e-3)


def test_logit_lens_softcapped_gemma2():
    model = il.load_model(make_hf_model("gemma2"), device="cpu")
    ids = random_task().clean_tokens
    with torch.no_grad():
        logits = model(ids)
    assert model.cfg.output_logits_soft_cap > 0
    for scale in ("recompute", "cached"):
        assert (C.logit_lens(model, ids, scale=scale).logits[-1] - logits).abs().max() < 1e-4


def test_logit_lens_score_per_layer(model):
    task = random_task()
    lens = C.logit_lens(model, task.clean_tokens)
    metric = C.task_metric("logit_diff", task)
    per_layer = lens.score(metric)
    assert len(per_layer) == model.cfg.n_layers + 1
    actual = C.score(model, task).clean.mean
    assert abs(per_layer[-1].mean - actual) < 1e-4


def test_dla_sum_identity(model):
    task = random_task()
    dla = C.direct_logit_attribution(model, task)
    L, H, B = model.cfg.n_layers, model.cfg.n_heads, len(task)
    assert dla.heads.shape == (L, H, B) and dla.mlp.shape == (L, B)
    # closed form: the shares add up to the logit difference from the final residual stream
    # with the frozen final-norm scale (to the float32 rounding of the model's own residual
    # additions, ~1e-7; leaving out the b_O or bias terms is off by ~0.1)
    assert torch.allclose(dla.total(), dla.logit_diff, rtol=0, atol=1e-6)
    # and that is the model's own logit difference
    with torch.no_grad():
        logits = model(task.clean_tokens)
    actual = C.logit_diff(logits, task.answers, task.wrong_answers, task.answer_pos)
    assert torch.allclose(dla.logit_diff.float(), actual, atol=1e-4)
    assert dla.heads.abs().max() > 1e-3 and dla.mlp.abs().max() > 1e-3


def test_dla_head_outputs_match_the_result_hook(model):
    """Per-head z @ W_O (interplab.weights) equals TL's per-head `attn.hook_result`, so each
    head's share is its real residual contribution (up to the shared bias)."""
    task = random_task()
    names = C.dla_hook_names(model) + ["blocks.1.attn.hook_result"]
    _, acts = C.capture(model, task.clean_tokens, names)
    w = il.weights(model)
    z = acts["blocks.1.attn.hook_z"]
    rebuilt = torch.einsum("bphk,hkd->bphd", z, w.W_O[1])
    result = acts["blocks.1.attn.hook_result"]
    assert torch.allclose(rebuilt, result, atol=1e-4)
    # one head's share by hand, through the frozen final norm
    dla = C.dla_from_cache(model, acts, task.answers, task.wrong_answers, task.answer_pos)
    b = 0
    pos = task.answer_pos[b]
    out = result[b, pos, 2]
    if model.cfg.normalization_type == "LN":
        out = out - out.mean()
    u = w.W_U[:, task.answers[b]] - w.W_U[:, task.wrong_answers[b]].mean(-1)
    by_hand = (out / acts["ln_final.hook_scale"][b, pos] * w.ln_final_w * u).sum()
    assert abs(dla.heads[1, 2, b].item() - by_hand.item()) < 1e-4


def test_dla_attention_only_toy():
    toy = il.load_model(
        il.models.ToyConfig(n_layers=2, d_model=32, n_heads=4, attn_only=True, d_vocab=VOCAB),
        device="cpu",
    )
    task = random_task()
    dla = C.direct_logit_attribution(toy, task)
    assert torch.equal(dla.mlp, torch.zeros_like(dla.mlp))
    assert torch.allclose(dla.total(), dla.logit_diff, rtol=0, atol=1e-6)
    with torch.no_grad():
        actual = C.logit_diff(
            toy(task.clean_tokens), task.answers, task.wrong_answers, task.answer_pos
        )
    assert torch.allclose(dla.logit_diff.float(), actual, atol=1e-4)


def test_dla_refuses_post_attention_norms():
    gemma = il.load_model(make_hf_model("gemma2"), device="cpu")
    with pytest.raises(InterplabError, match="post-attention"):
        C.direct_logit_attribution(gemma, random_task())


def test_dla_missing_cache_entry(model):
    task = random_task()
    with pytest.raises(InterplabError, match="dla_hook_names"):
        C.dla_from_cache(model, {}, task.answers, task.wrong_answers, task.answer_pos)


def test_plots_render():
    from matplotlib.figure import Figure

    model = il.load_model(make_hf_model("gpt2"), device="cpu")
    task = random_task()
    fig = C.plot_attention(model, task.clean_tokens[0], layer=1)
    assert isinstance(fig, Figure)
    assert sum(ax.has_data() for ax in fig.axes) == model.cfg.n_heads
    assert isinstance(C.plot_attention(model, task.clean_tokens[0], 0, heads=[1]), Figure)
    assert isinstance(C.direct_logit_attribution(model, task).plot(), Figure)
    lens = C.logit_lens(model, task.clean_tokens)
    assert isinstance(lens.plot(), Figure)
    assert isinstance(lens.plot(C.task_metric("logit_diff", task)), Figure)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_plot_attention_from_text_and_errors():
    model = il.load_model(make_hf_model("gpt2"), tokenizer=make_tokenizer(), device="cpu")
    fig = C.plot_attention(model, "w1 w2 w3", layer=0, heads=[0, 1])
    assert fig.axes[0].get_xticklabels()[1].get_text() == "w1"
    with pytest.raises(InterplabError, match="layer 7"):
        C.plot_attention(model, "w1", layer=7)
    with pytest.raises(InterplabError, match="heads"):
        C.plot_attention(model, "w1", layer=0, heads=[9])
    with pytest.raises(InterplabError, match="one prompt"):
        C.plot_attention(model, torch.zeros(2, 3, dtype=torch.long), layer=0)
    with pytest.raises(InterplabError, match="unknown logit lens scale"):
        C.logit_lens(model, torch.zeros(1, 3, dtype=torch.long), scale="frozen")
    import matplotlib.pyplot as plt

    plt.close("all")
