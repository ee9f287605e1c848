"""Batched activation patching equals TransformerLens 4's one-forward-per-site patching
(`transformer_lens.patching`, which runs on a TransformerBridge) to <= 1e-5, on a tiny GPT-2
and a grouped-query Llama; patching everything reproduces the clean run exactly."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from transformer_lens import patching as tl_patching

import interplab as il
from interplab import circuits as C
from interplab.data.tasks import TaskDataset
from interplab.errors import InterplabError
from tests.conftest import VOCAB, make_hf_model

TOL = 1e-5


def enlarge(hf, factor=4.0):
    """Scale every weight matrix so random-init patching effects are well above float noise."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 2 and "wpe" not in name:
                p.mul_(factor)
    return hf


def make_task(batch=3, pos=7, seed=0):
    """Corrupted prompts differ at positions 2 and 4 (so earlier sites are unchanged and
    skipped); one row's answer comes early (so later positions are cut and padded back)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, VOCAB, (batch, pos), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(1, VOCAB, (batch,), generator=g)
    corrupted[:, 4] = torch.randint(1, VOCAB, (batch,), generator=g)
    answer_pos = torch.full((batch,), pos - 2)
    answer_pos[1] = 3
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


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    torch.set_num_threads(1)
    return il.load_model(enlarge(make_hf_model(request.param)), device="cpu")


@pytest.fixture(scope="module")
def task():
    return make_task()


def tl_reference(model, task, fn, direction="denoise"):
    """TransformerLens 4's patching: one forward of the whole batch per site."""
    base, source = task.corrupted_tokens, task.clean_tokens
    if direction == "noise":
        base, source = source, base

    def metric(logits):
        return C.logit_diff(logits, task.answers, task.wrong_answers, task.answer_pos).mean()

    with torch.inference_mode():
        _, cache = model.run_with_cache(source)
        return getattr(tl_patching, fn)(model, base, cache, metric)


CASES = [
    # (TL function, component, over, permutation of TL's axes into ours)
    ("get_act_patch_resid_pre", "resid_pre", ("pos",), None),
    ("get_act_patch_attn_head_out_all_pos", "z", ("head",), None),
    ("get_act_patch_attn_head_out_by_pos", "z", ("head", "pos"), (0, 2, 1)),
    ("get_act_patch_mlp_out", "mlp_out", ("pos",), None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[1] + "-" + "-".join(c[2]) for c in CASES])
def test_equals_transformer_lens(model, task, case):
    fn, component, over, perm = case
    expected = tl_reference(model, task, fn)
    if perm:
        expected = expected.permute(*perm)
    # max_batch=4 forces several forward passes with several copies each
    got = C.patch(model, task, component, over, normalize=False, max_batch=4)
    assert got.values.shape == expected.shape
    assert (got.values - expected).abs().max() <= TOL
    assert expected.max() - expected.min() > 1e-2  # the sweep is not trivially constant


def test_noising_equals_transformer_lens(model, task):
    expected = tl_reference(model, task, "get_act_patch_resid_pre", "noise")
    got = C.patch_residual(model, task, direction="noise", normalize=False)
    assert (got.values - expected).abs().max() <= TOL
    assert got.values[:, 0].sub(got.clean.mean).abs().max() < 1e-6  # an unchanged position


def test_qkv_and_pattern_equal_transformer_lens():
    """Llama has 4 query heads and 2 key/value heads: k and v sites are per key-value head."""
    model = il.load_model(enlarge(make_hf_model("llama")), device="cpu")
    task = make_task()
    for fn, component, over, perm in [
        ("get_act_patch_attn_head_q_all_pos", "q", ("head",), None),
        ("get_act_patch_attn_head_k_all_pos", "k", ("head",), None),
        ("get_act_patch_attn_head_v_all_pos", "v", ("head",), None),
        ("get_act_patch_attn_head_pattern_all_pos", "pattern", ("head",), None),
        ("get_act_patch_attn_head_pattern_by_pos", "pattern", ("head", "pos"), None),
    ]:
        expected = tl_reference(model, task, fn)
        expected = expected.permute(*perm) if perm else expected
        got = C.patch(model, task, component, over, normalize=False)
        assert got.values.shape == expected.shape, component
        assert (got.values - expected).abs().max() <= TOL, component
        assert expected.max() - expected.min() > 1e-3, component
    assert C.patch_heads(model, task, "k").values.shape == (2, 2)


def naive_patching(model, task, hook_template, index_of, n_sites, layers):
    """An unbatched reference loop: one `run_with_hooks` per site."""
    out = torch.zeros(len(layers), n_sites)
    with torch.inference_mode():
        _, cache = model.run_with_cache(task.clean_tokens)
        for i, layer in enumerate(layers):
            name = hook_template.format(layer=layer)
            for site in range(n_sites):

                def hook(act, hook, site=site, name=name):
                    act = act.clone()
                    idx = index_of(site)
                    act[idx] = cache[name][idx]
                    return act

                logits = model.run_with_hooks(task.corrupted_tokens, fwd_hooks=[(name, hook)])
                out[i, site] = C.logit_diff(
                    logits, task.answers, task.wrong_answers, task.answer_pos
                ).mean()
    return out


def test_neurons_equal_a_naive_loop():
    model = il.load_model(enlarge(make_hf_model("gpt2")), device="cpu")
    task = make_task()
    got = C.patch_neurons(model, task, layers=[0], normalize=False, max_batch=64)
    assert got.values.shape == (1, model.cfg.d_mlp)
    expected = naive_patching(
        model,
        task,
        "blocks.{layer}.mlp.hook_post",
        lambda n: (slice(None), slice(None), n),
        12,
        [0],
    )
    assert (got.values[:, :12] - expected).abs().max() <= TOL


def test_native_model_without_kv_cache_equals_transformer_lens():
    """Native toy models return no KV cache: every pass starts at position 0."""
    toy = il.load_model(
        il.models.ToyConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=VOCAB), device="cpu"
    )
    task = make_task()
    expected = tl_reference(toy, task, "get_act_patch_attn_head_out_by_pos").permute(0, 2, 1)
    got = C.patch_heads(toy, task, by_pos=True, normalize=False, max_batch=5)
    assert (got.values - expected).abs().max() <= TOL


def test_patching_everything_gives_the_clean_run_exactly():
    """One whole-layer site in one layer is one pass of the clean computation (a toy model
    without a KV cache runs every pass from position 0). The last block's MLP runs on the
    answer rows only, which changes float rounding and nothing else: the clean metric to
    1e-6."""
    toy = il.load_model(
        il.models.ToyConfig(n_layers=2, d_model=32, n_heads=4, d_vocab=VOCAB), device="cpu"
    )
    task = make_task()
    for component, layer in [("resid_pre", 0), ("resid_post", 1)]:
        result = C.patch(toy, task, component, over=(), layers=[layer])
        assert result.values.shape == (1,)
        assert abs(result.values.item() - 1.0) < 1e-6
        assert torch.allclose(result.per_example[0], result.clean.per_example, rtol=0, atol=1e-6)
        noised = C.patch(toy, task, component, over=(), layers=[layer], direction="noise")
        assert abs(noised.values.item()) < 1e-6
    kl = C.patch(toy, task, "resid_pre", over=(), layers=[0], metric="kl", normalize=False)
    assert abs(kl.values.item()) < 1e-6 and kl.corrupted.mean > 0


def test_patching_everything_gives_the_clean_run(model, task):
    """HF models reuse the unchanged prefix from a KV cache: equal to float rounding."""
    for component, layer in [("resid_pre", 0), ("resid_post", model.cfg.n_layers - 1)]:
        result = C.patch(model, task, component, over=())
        assert (result.values[layer] - 1.0).abs() < 1e-4  # normalised: raw error / span
        assert torch.allclose(result.per_example[layer], result.clean.per_example, atol=1e-5)
    kl = C.patch(model, task, "resid_pre", over=(), layers=[0], metric="kl", normalize=False)
    assert kl.values.abs().item() < 1e-6 and kl.corrupted.mean > 1e-3


def test_batch_size_does_not_change_results(model, task):
    one = C.patch(model, task, "z", ("head", "pos"), layers=[1], max_batch=1, normalize=False)
    many = C.patch(model, task, "z", ("head", "pos"), layers=[1], max_batch=1024, normalize=False)
    assert (one.values - many.values).abs().max() < 1e-5
    assert one.values.shape == (1, model.cfg.n_heads, task.clean_tokens.shape[1])


def test_block_skipping_and_answer_row_mlp_are_used_and_undone(model, task, monkeypatch):
    """The shortcuts the TransformerLens comparisons run through (skipped blocks, the last
    MLP on answer rows, a point site's MLP on its own row) are really taken on GPT-2 and
    Llama bridges (not silently turned off), and leave no block patched afterwards."""
    from interplab.circuits import patching

    n_layers = model.cfg.n_layers
    base = task.corrupted_tokens
    metric = patching.bind_metric(model, task, "logit_diff")
    _, cache = model.run_with_cache(base)
    resid = [cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(n_layers)]
    assert patching._LayerSkip(model, base, resid).enabled
    scorer = patching._Scorer(model, metric, base.shape[0])
    assert scorer.check_last_mlp(model, base, metric(model(base)[None])[0])
    outputs = [cache[f"blocks.{layer}.hook_resid_post"] for layer in range(n_layers)]
    point = patching._PointSites(model, outputs)
    assert all(point.check(base, layer, model(base)) for layer in range(n_layers - 1))
    assert not point.check(base, 0, model(base) + 1.0)

    skipped_from = []
    original = patching._LayerSkip.skipping

    def spy(self, block):
        skipped_from.append(block)
        return original(self, block)

    monkeypatch.setattr(patching._LayerSkip, "skipping", spy)
    C.patch(model, task, "z", ("head", "pos"), normalize=False)
    assert set(skipped_from) >= set(range(1, n_layers))
    assert all("forward" not in block.__dict__ for block in model.blocks)
    # a model whose last block does not add its MLP output back: the check refuses
    wrong = patching._Scorer(model, metric, base.shape[0])
    assert not wrong.check_last_mlp(model, base, metric(model(base)[None])[0] + 1.0)


def test_callable_metric_matches_task_metric(model, task):
    def logit_diff(logits):
        return C.logit_diff(logits, task.answers, task.wrong_answers, task.answer_pos)

    by_task = C.patch(model, task, "resid_pre", ("pos",), normalize=False)
    by_callable = C.patch(model, task, "resid_pre", ("pos",), metric=logit_diff, normalize=False)
    assert (by_task.values - by_callable.values).abs().max() < 1e-5
    assert by_callable.metric == "logit_diff"


def test_result_statistics_and_plot(model, task):
    result = C.patch_residual(model, task)
    assert result.axes == ("layer", "pos")
    assert result.per_example.shape == (*result.values.shape, len(task))
    raw = result.per_example.double()
    span = result.clean.mean - result.corrupted.mean
    assert torch.allclose(
        result.values.double(), (raw.mean(-1) - result.corrupted.mean) / span, atol=1e-6
    )
    assert torch.allclose(result.sem.double(), raw.std(-1) / span / len(task) ** 0.5, atol=1e-6)
    assert len(result.top(3)) == 3
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Figure)
    assert isinstance(C.patch_heads(model, task, by_pos=True, layers=[1]).plot(), Figure)
    import matplotlib.pyplot as plt

    plt.close("all")


# --- errors ------------------------------------------------------------------------------


def test_patching_errors(model, task):
    with pytest.raises(InterplabError, match="unknown patching component"):
        C.patch(model, task, "resid")
    with pytest.raises(InterplabError, match="unknown axis"):
        C.patch(model, task, "resid_pre", ("head",))
    with pytest.raises(InterplabError, match="unknown patching direction"):
        C.patch(model, task, direction="forwards")
    with pytest.raises(InterplabError, match="max_batch"):
        C.patch(model, task, max_batch=0)
    with pytest.raises(InterplabError, match="layers"):
        C.patch(model, task, layers=[7])
    with pytest.raises(InterplabError, match="no examples"):
        C.patch(model, task.select([]))
    with pytest.raises(InterplabError, match="differ in shape"):
        C.patch_tokens(
            model,
            task.clean_tokens,
            task.corrupted_tokens[:, :-1],
            C.task_metric("logit_diff", task),
        )
    with pytest.raises(InterplabError, match="one value per example"):
        C.patch(model, task, metric=lambda logits: logits[:, -1, 0].mean())
    with pytest.raises(InterplabError, match="must be finite and different"):
        C.patch(model, make_task_same(task))


def make_task_same(task):
    """Corrupted prompts equal to the clean ones: nothing to normalise against."""
    return TaskDataset(
        name="same",
        prompts=task.prompts,
        corrupted_prompts=task.corrupted_prompts,
        clean_tokens=task.clean_tokens,
        corrupted_tokens=task.clean_tokens.clone(),
        answers=task.answers,
        wrong_answers=task.wrong_answers,
        answer_pos=task.answer_pos,
        metadata=task.metadata,
    )


def test_ioi_task_end_to_end():
    """A real task: storyworld IOI prompts (right-padded, answer positions differ per row)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from interplab.data import tasks
    from interplab.data.corpus.tokenizer import storyworld_tokenizer

    tok = storyworld_tokenizer(n_docs=100, vocab_size=2048)
    ioi = tasks.ioi(tok, n=6, seed=0)
    assert len(set(ioi.answer_pos.tolist())) > 1
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=2048, n_positions=64)
    config.bos_token_id = config.eos_token_id = 0
    model = il.load_model(enlarge(GPT2LMHeadModel(config).eval()), device="cpu")
    for fn, component, over in [
        ("get_act_patch_resid_pre", "resid_pre", ("pos",)),
        ("get_act_patch_attn_head_out_all_pos", "z", ("head",)),
    ]:
        expected = tl_reference(model, ioi, fn)
        got = C.patch(model, ioi, component, over, normalize=False)
        assert (got.values - expected).abs().max() <= TOL, component
    dla = C.direct_logit_attribution(model, ioi)
    assert torch.allclose(dla.total(), dla.logit_diff, rtol=0, atol=1e-6)
