"""Attribution patching against references: exact activation patching where AtP is exact (a
linear model: attention-only, no LayerNorm, attention patterns that cannot change), the QK
fix where it is exact (one attention-only layer without LayerNorm: the metric is linear in the
pattern), central finite differences for the gradients, GradDrop rebuilt with forward-pass
detaches, and `compare_to_patching` against numpy/scipy on hand-made effects."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import dataclasses

import numpy as np
import pytest
import torch

import interplab as il
from interplab import circuits as C
from interplab.circuits.attribution import (
    AttributionResult,
    attribute,
    attribute_heads,
    attribute_mlp,
    attribute_neurons,
    attribute_residual,
    attribute_tokens,
    compare_to_patching,
)
from interplab.data.tasks import TaskDataset
from interplab.errors import InterplabError
from tests.conftest import VOCAB


def make_task(batch=4, pos=7, seed=0, corrupt=(2, 4, 6)):
    """Corrupted prompts differ at `corrupt` (the answer positions among them, so queries
    there change too); row 2 answers early, so later positions are cut and padded back."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, VOCAB, (batch, pos), generator=g)
    corrupted = clean.clone()
    for p in corrupt:
        corrupted[:, p] = torch.randint(1, VOCAB, (batch,), generator=g)
    answer_pos = torch.full((batch,), pos - 1)
    answer_pos[2] = 4
    return TaskDataset(
        name="random",
        prompts=[""] * batch,
        corrupted_prompts=[""] * batch,
        clean_tokens=clean,
        corrupted_tokens=corrupted,
        answers=torch.randint(1, VOCAB, (batch,), generator=g),
        wrong_answers=torch.randint(1, VOCAB, (batch,), generator=g),
        answer_pos=answer_pos,
        metadata=[{}] * batch,
    )


def build(config, qk=1.0, other=2.0, zero_qk=False):
    """A float64 native model with query/key weights scaled by `qk` (saturating attention)
    or zeroed (uniform causal attention), other matrices by `other`."""
    model = il.load_model(config, device="cpu", dtype="float64")
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_qk = ".q." in name or ".k." in name
            if is_qk and zero_qk:
                p.zero_()
            elif is_qk and p.ndim == 2:
                p.mul_(qk)
            elif p.ndim == 2 and "pos" not in name:
                p.mul_(other)
    return model


def toy(**kwargs):
    return il.models.ToyConfig(d_model=32, n_heads=4, d_vocab=VOCAB, **kwargs)


@pytest.fixture(scope="module")
def task():
    return make_task()


@pytest.fixture(scope="module")
def deep():
    """Two layers with LayerNorm and MLPs, moderately saturated attention."""
    return build(toy(n_layers=2), qk=4.0)


def gap(a, b):
    return float((a.per_example - b.per_example).abs().max())


# --- AtP is exact on a linear model --------------------------------------------------------


LINEAR_CASES = [
    ("z", ("head",)),
    ("z", ("head", "pos")),
    ("v", ("head",)),
    ("resid_pre", ("pos",)),
    ("attn_out", ("pos",)),
    ("resid_post", ()),
]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_atp_equals_patching_on_a_linear_model(task, direction):
    """Attention-only, no LayerNorm, zero query/key weights: every pattern is the uniform
    causal one whatever the input, so the metric is affine in every activation and the
    first-order estimate is exact (to float32 storage of the exact sweep's values)."""
    linear = build(toy(n_layers=2, attn_only=True, normalization="none"), zero_qk=True)
    for component, over in LINEAR_CASES:
        exact = C.patch(linear, task, component, over, normalize=False, direction=direction)
        atp = attribute(linear, task, component, over, normalize=False, direction=direction)
        assert atp.shape == exact.shape and atp.axes == exact.axes, component
        assert gap(atp, exact) <= 1e-6, component
        base = exact.corrupted if direction == "denoise" else exact.clean
        assert (exact.per_example - base.per_example).abs().max() > 0.1, component
    exact = C.patch_heads(linear, task, normalize=False, direction=direction)
    atp = attribute_heads(linear, task, normalize=False, direction=direction)
    comparison = compare_to_patching(atp, exact, k=3)
    assert comparison.pearson > 1 - 1e-9 and comparison.false_negative_rate == 0.0


# --- the QK fix ------------------------------------------------------------------------------


QK_CASES = [
    ("q", ("head",)),
    ("q", ("head", "pos")),
    ("k", ("head",)),
    ("k", ("head", "pos")),
    ("k", ("pos",)),
]


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_qk_fix_is_exact_when_the_metric_is_linear_in_the_pattern(task, kv_heads):
    """One attention-only layer without LayerNorm: logits are linear in the pattern, so
    dM/dA . (exact change of A) is the exact effect of patching queries or keys, while AtP's
    linearisation through the saturated softmax is far off. With grouped-query attention
    (kv_heads=2) key sites are the 2 key/value heads, as in `patch`."""
    from transformer_lens.config import TransformerBridgeConfig

    config = TransformerBridgeConfig(
        n_layers=1,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_vocab=VOCAB,
        n_ctx=64,
        attn_only=True,
        normalization_type=None,
        n_key_value_heads=kv_heads,
        seed=0,
        d_mlp=None,
    )
    model = build(config, qk=8.0)
    with torch.inference_mode():
        _, cache = model.run_with_cache(task.clean_tokens)
    top = cache["blocks.0.attn.hook_pattern"][:, :, 2:].max(-1).values
    assert top.mean() > 0.75  # saturated attention: the case AtP gets wrong
    for component, over in QK_CASES:
        exact = C.patch(model, task, component, over, normalize=False)
        fixed = attribute(model, task, component, over, method="atp*", normalize=False)
        plain = attribute(model, task, component, over, normalize=False)
        assert fixed.qk_fix and not fixed.grad_drop  # one layer: GradDrop is off by default
        assert fixed.shape == exact.shape, component
        assert gap(fixed, exact) <= 1e-6, (component, over)
        assert gap(plain, exact) > 0.05, (component, over)
        if component == "k" and "head" in over:
            assert fixed.shape[1] == (kv_heads or 4)


def test_atp_star_beats_atp_with_saturated_attention(task, deep):
    """LayerNorm and MLPs downstream: the QK fix is no longer exact, but strictly better."""
    for component, over in QK_CASES[:4]:
        exact = C.patch(deep, task, component, over, normalize=False)
        plain = attribute(deep, task, component, over, normalize=False)
        star = attribute(deep, task, component, over, method="atp*", normalize=False)
        err_plain = (plain.values - exact.values).abs().mean()
        err_star = (star.values - exact.values).abs().mean()
        # errors here come from later layers' saturated softmaxes, which AtP* leaves linear
        assert err_star < 0.9 * err_plain, (component, over, err_star, err_plain)


# --- gradients against finite differences ------------------------------------------------


def metric_of(model, task, hooks):
    with torch.inference_mode():
        logits = model.run_with_hooks(task.corrupted_tokens, fwd_hooks=hooks)
    return C.logit_diff(logits, task.answers, task.wrong_answers, task.answer_pos)


def central_difference(model, task, name, direction, eps=1e-5):
    """d/de M(a + e * direction) at e = 0, with `direction` added at hook `name`."""
    values = [
        metric_of(model, task, [(name, lambda act, hook, s=s: act + s * eps * direction)])
        for s in (1.0, -1.0)
    ]
    return (values[0] - values[1]) / (2 * eps)


def test_gradients_equal_finite_differences(task, deep):
    with torch.inference_mode():
        _, clean = deep.run_with_cache(task.clean_tokens)
        _, corrupted = deep.run_with_cache(task.corrupted_tokens)
    heads = attribute_heads(deep, task, normalize=False)
    base = heads.corrupted.per_example.double()
    for layer in range(2):
        name = f"blocks.{layer}.attn.hook_z"
        for head in range(4):
            delta = torch.zeros_like(clean[name])
            delta[:, :, head] = clean[name][:, :, head] - corrupted[name][:, :, head]
            expected = central_difference(deep, task, name, delta)
            got = heads.per_example[layer, head].double() - base
            assert (got - expected).abs().max() <= 1e-7 * (1 + expected.abs().max())
    neurons = attribute_neurons(deep, task, normalize=False, layers=[1])
    name = "blocks.1.mlp.hook_post"
    for neuron in (0, 5, 77):
        delta = torch.zeros_like(clean[name])
        delta[..., neuron] = clean[name][..., neuron] - corrupted[name][..., neuron]
        expected = central_difference(deep, task, name, delta)
        got = neurons.per_example[0, neuron].double() - base
        assert (got - expected).abs().max() <= 1e-7 * (1 + expected.abs().max())
    assert expected.abs().max() > 1e-4


def test_qk_fix_gradient_equals_finite_difference_along_the_exact_pattern_change(task, deep):
    """The QK-fixed estimate is d/de M(A + e * (A_patched - A)) at e = 0, where A_patched is
    the pattern with one head's queries from the clean run (found here by patching hook_q)."""
    star = attribute_heads(deep, task, "q", method="atp*", grad_drop=False, normalize=False)
    base = star.corrupted.per_example.double()
    with torch.inference_mode():
        _, clean = deep.run_with_cache(task.clean_tokens)
        _, corrupted = deep.run_with_cache(task.corrupted_tokens)
    for layer, head in [(0, 1), (1, 2), (1, 3)]:
        q_name = f"blocks.{layer}.attn.hook_q"
        p_name = f"blocks.{layer}.attn.hook_pattern"

        def clean_query(act, hook, q_name=q_name, head=head):
            act = act.clone()
            act[:, :, head] = clean[q_name][:, :, head]
            return act

        patched = {}

        def keep_pattern(act, hook, store=patched):
            store["A"] = act.clone()

        hooks = [(q_name, clean_query), (p_name, keep_pattern)]
        metric_of(deep, task, hooks)
        delta = patched["A"] - corrupted[p_name]
        expected = central_difference(deep, task, p_name, delta)
        got = star.per_example[layer, head].double() - base
        assert (got - expected).abs().max() <= 1e-7 * (1 + expected.abs().max())
        assert expected.abs().max() > 1e-4


# --- GradDrop ---------------------------------------------------------------------------------


def test_grad_drop_equals_gradients_with_detached_layers(task):
    """Rebuild GradDrop by hand: for each layer l, a forward pass whose layer-l writes to the
    residual stream are detached; magnitude = 1/(L-1) sum_l |mean_b AtP estimate|."""
    model = build(toy(n_layers=3), qk=2.0)
    star = attribute_heads(model, task, method="atp*", normalize=False)
    assert star.grad_drop and not star.qk_fix  # head outputs need no QK fix
    with torch.inference_mode():
        _, clean = model.run_with_cache(task.clean_tokens)
        _, corrupted = model.run_with_cache(task.corrupted_tokens)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(3)]
    per_drop = []
    for dropped in range(3):
        acts = {}

        def keep(act, hook, name, store=acts):
            store[name] = act
            return act  # returned: the kept tensor is the one the model computes on

        hooks = [(name, lambda act, hook, name=name: keep(act, hook, name)) for name in names]
        hooks += [
            (f"blocks.{dropped}.hook_{part}_out", lambda act, hook: act.detach())
            for part in ("attn", "mlp")
        ]
        with model.hooks(fwd_hooks=hooks):
            logits = model(task.corrupted_tokens)
        total = C.logit_diff(logits, task.answers, task.wrong_answers, task.answer_pos).sum()
        grads = torch.autograd.grad(total, [acts[name] for name in names], allow_unused=True)
        estimate = torch.stack(
            [
                torch.zeros(4, len(task), dtype=torch.float64)
                if g is None
                else ((clean[name] - corrupted[name]) * g).sum((1, 3)).T
                for name, g in zip(names, grads, strict=True)
            ]
        )  # [layer, head, batch]
        per_drop.append(estimate.mean(-1).abs())
        assert torch.all(per_drop[-1][dropped] == 0)  # a dropped layer's own heads get nothing
    expected = torch.stack(per_drop).sum(0) / 2
    assert torch.allclose(star.magnitude.double(), expected, rtol=1e-5, atol=1e-9)
    plain = (star.per_example.double().mean(-1) - star.corrupted.mean).abs()
    assert (expected - plain).abs().max() > 1e-3  # GradDrop is not plain |AtP|
    # the signed values are plain AtP's (head outputs have no QK fix)
    atp = attribute_heads(model, task, normalize=False)
    assert gap(atp, star) <= 1e-12


# --- comparison, result, errors ------------------------------------------------------------


def test_compare_to_patching_on_hand_made_effects(task, deep):
    exact = C.patch_heads(deep, task, normalize=False)
    atp = attribute_heads(deep, task, normalize=False)
    true = torch.tensor([5.0, -4.0, 3.0, 0.5, 0.1, 0.2, -0.3, 0.0], dtype=torch.float64)
    guess = torch.tensor([0.1, -3.5, 2.0, 4.0, 0.0, 0.2, 0.1, 0.3], dtype=torch.float64)
    base = exact.corrupted.mean
    exact = dataclasses.replace(
        exact, per_example=(base + true).reshape(2, 4, 1).expand(2, 4, len(task)).clone()
    )
    atp = dataclasses.replace(
        atp,
        per_example=(base + guess).reshape(2, 4, 1).expand(2, 4, len(task)).clone(),
        magnitude=guess.abs().reshape(2, 4),
    )
    result = compare_to_patching(atp, exact, k=2)
    assert result.pearson == pytest.approx(np.corrcoef(guess, true)[0, 1], abs=1e-6)
    from scipy.stats import spearmanr

    assert result.spearman == pytest.approx(spearmanr(guess.abs(), true.abs())[0], abs=1e-6)
    # exact top-2: L0H0, L0H1; estimated top-2: L0H3, L0H1 -> L0H0 missed
    assert result.false_negative_rate == 0.5 and result.missed == ["layer=0 head=0"]
    assert compare_to_patching(atp, exact, k=3).false_negative_rate == pytest.approx(1 / 3)
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Figure)


def test_result_statistics_and_plot(task, deep):
    result = attribute_residual(deep, task)
    assert isinstance(result, AttributionResult) and result.axes == ("layer", "pos")
    raw = result.per_example.double()
    span = result.clean.mean - result.corrupted.mean
    expected = (raw.mean(-1) - result.corrupted.mean) / span
    assert torch.allclose(result.values.double(), expected, atol=1e-6)
    assert torch.allclose(result.sem.double(), raw.std(-1) / abs(span) / len(task) ** 0.5)
    # positions after the last answer cannot matter: cut, then padded with the base value
    assert result.shape == (2, task.clean_tokens.shape[1])
    exact_clean = C.score(deep, task)
    assert result.clean.mean == pytest.approx(exact_clean.clean.mean, abs=1e-9)
    top = result.top(3)  # ranked by magnitude
    order = result.magnitude.flatten().argsort(descending=True)[:3].tolist()
    width = result.shape[1]
    assert [label for label, _ in top] == [f"layer={i // width} pos={i % width}" for i in order]
    assert top[0][1] == pytest.approx(float(result.values.flatten()[order[0]]))
    assert attribute_mlp(deep, task).shape == (2, task.clean_tokens.shape[1])
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Figure)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_callable_metric_matches_task_metric(task, deep):
    def logit_diff(logits):
        return C.logit_diff(logits, task.answers, task.wrong_answers, task.answer_pos)

    by_task = attribute_heads(deep, task, normalize=False)
    by_callable = attribute_tokens(
        deep,
        task.clean_tokens,
        task.corrupted_tokens,
        logit_diff,
        "z",
        ("head",),
        normalize=False,
    )
    assert gap(by_task, by_callable) <= 1e-10 and by_callable.metric == "logit_diff"


def test_attribution_errors(task, deep):
    with pytest.raises(InterplabError, match="unknown attribution method"):
        attribute(deep, task, method="eap")
    with pytest.raises(InterplabError, match="unknown attribution component"):
        attribute(deep, task, "resid")
    with pytest.raises(InterplabError, match="unknown axis"):
        attribute(deep, task, "resid_pre", ("head",))
    with pytest.raises(InterplabError, match="repeats an axis"):
        attribute(deep, task, "z", ("head", "head"))
    with pytest.raises(InterplabError, match="unknown patching direction"):
        attribute(deep, task, direction="up")
    with pytest.raises(InterplabError, match="method='atp\\*'"):
        attribute(deep, task, qk_fix=True)
    with pytest.raises(InterplabError, match="differentiable"):
        attribute(deep, task, metric="accuracy")
    with pytest.raises(InterplabError, match="at least 2 layers"):
        attribute(build(toy(n_layers=1)), task, method="atp*", grad_drop=True)
    with pytest.raises(InterplabError, match="layers"):
        attribute(deep, task, layers=[3])
    with pytest.raises(InterplabError, match="max_batch"):
        attribute(deep, task, max_batch=0)
    with pytest.raises(InterplabError, match="unknown residual hook"):
        attribute_residual(deep, task, "resid_final")
    exact = C.patch_heads(deep, task)
    atp = attribute_heads(deep, task)
    with pytest.raises(InterplabError, match="same component and grid"):
        compare_to_patching(attribute_heads(deep, task, by_pos=True), exact)
    with pytest.raises(InterplabError, match="same direction"):
        compare_to_patching(atp, C.patch_heads(deep, task, direction="noise"))
    with pytest.raises(InterplabError, match="k must be"):
        compare_to_patching(atp, exact, k=9)
    with pytest.raises(InterplabError, match="takes an AttributionResult"):
        compare_to_patching(exact, exact)
