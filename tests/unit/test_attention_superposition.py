"""Attention superposition toys: the skip-trigram generator, the last-position forward
against a direct reference and the native TransformerLens model, attributions on hand-built
models with closed-form answers, and trained models at fast settings (accuracy, and the
published qualitative finding that features > heads are spread over several heads)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from interplab.errors import InterplabError
from interplab.toys import attention_superposition as at


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _assert_close(actual, expected, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    # torch.testing.assert_close imports torch.distributed.tensor on first use (seconds)
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (actual, expected)


# --------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(setting="ov_cohernt"), "unknown setting 'ov_cohernt'"),
        (dict(n_features=1), "n_features must be an integer >= 2"),
        (dict(n_filler=0), "n_filler must be an integer >= 1"),
        (dict(seq_len=1), "seq_len must be an integer >= 2"),
        (dict(p_complete=1.5), r"p_complete must be a number in \[0.0, 1.0\]"),
        (dict(feature_decay=0.0), r"feature_decay must be a number in \(0.0, 1.0\]"),
    ],
)
def test_task_rejects_bad_values(kwargs, message):
    with pytest.raises(InterplabError, match=message):
        at.SkipTrigramTask(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(task="ov_coherent"), "task must be a SkipTrigramTask"),
        (dict(n_heads=0), "n_heads must be an integer >= 1"),
        (dict(d_head=2.5), "d_head must be an integer >= 1"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(lr=-1.0), "lr must be a number in"),
        (dict(weight_decay=-0.1), "weight_decay must be a number in"),
        (dict(lr_schedule="linear"), "unknown lr_schedule 'linear'"),
        (dict(device="gpu0"), "device 'gpu0' is not a torch device"),
    ],
)
def test_training_config_rejects_bad_values(kwargs, message):
    with pytest.raises(InterplabError, match=message):
        at.AttentionSuperpositionConfig(**kwargs)


def test_sample_rejects_bad_arguments():
    task = at.SkipTrigramTask(n_features=4)
    with pytest.raises(InterplabError, match="n must be an integer >= 1"):
        task.sample(0)
    with pytest.raises(InterplabError, match=r"feature must lie in \[0, 4\)"):
        task.sample(3, feature=4)
    with pytest.raises(InterplabError, match=r"one per example \(\[3\]\)"):
        task.sample(3, feature=torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------
# Data generator
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["ov_incoherent", "ov_coherent"])
def test_vocabulary_layout(setting):
    task = at.SkipTrigramTask(setting=setting, n_features=5, n_filler=7)
    groups = [
        task.filler_tokens,
        task.source_tokens,
        task.destination_tokens,
        task.answer_tokens,
    ]
    ids = torch.cat(groups)
    assert ids.tolist() == list(range(task.d_vocab))  # disjoint and contiguous
    table = task.features
    if setting == "ov_incoherent":
        assert table[:, 0].unique().numel() == 1 and table[:, 1].unique().numel() == 5
    else:
        assert table[:, 0].unique().numel() == 5 and table[:, 1].unique().numel() == 1
    assert table[:, 2].tolist() == task.answer_tokens[:5].tolist()
    assert task.null_token == task.d_vocab - 1


@pytest.mark.parametrize("setting", ["ov_incoherent", "ov_coherent"])
def test_generator_plants_exactly_the_labelled_trigrams(setting):
    task = at.SkipTrigramTask(setting=setting, n_features=6, n_filler=9, seq_len=8, p_complete=0.3)
    n = 20_000
    batch = task.sample(n, 3)
    table = task.features
    sources = task.source_tokens
    is_source = (batch.tokens[:, :-1, None] == sources).any(-1)  # [n, L-1]
    done = batch.complete
    feat = torch.where(batch.feature >= 0, batch.feature, 0)
    # the destination is last; a complete example has exactly one source, its feature's,
    # at source_pos; an incomplete one has none; the answer follows
    assert bool((batch.tokens[:, -1] == table[feat, 1]).all())
    assert bool((is_source.sum(1) == done.long()).all())
    rows = torch.nonzero(done)[:, 0]
    assert bool((batch.tokens[rows, batch.source_pos[rows]] == table[batch.feature[rows], 0]).all())
    assert bool((batch.source_pos[~done] == -1).all())
    assert bool((batch.answer[done] == batch.feature[done]).all())
    assert bool((batch.answer[~done] == task.n_features).all())
    assert bool((batch.tokens[:, :-1][~is_source] < task.n_filler).all())
    if setting == "ov_coherent":
        assert bool((batch.feature[~done] == -1).all())
    # statistics: completion rate, uniform features, uniform source positions (5 sigma)
    p = task.p_complete
    assert abs(done.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    counts = torch.bincount(batch.feature[done], minlength=6).float()
    expected = done.sum().item() / 6
    assert (counts - expected).abs().max().item() < 5 * math.sqrt(expected)
    pos_counts = torch.bincount(batch.source_pos[done], minlength=7).float()
    expected = done.sum().item() / 7
    assert (pos_counts - expected).abs().max().item() < 5 * math.sqrt(expected)


def test_feature_decay_sets_frequencies_and_forcing_works():
    task = at.SkipTrigramTask(n_features=4, feature_decay=0.5)
    probs = task.feature_probabilities()
    _assert_close(probs, torch.tensor([8, 4, 2, 1]) / 15.0)
    n = 30_000
    freq = torch.bincount(task.sample(n, 0).feature, minlength=4).float() / n
    assert (freq - probs).abs().max().item() < 5 * math.sqrt(0.25 / n)
    forced = task.sample(50, 1, feature=2, complete=True)
    assert bool((forced.feature == 2).all() and forced.complete.all())
    assert bool((forced.answer == 2).all())
    again = task.sample(50, 1, feature=2, complete=True)
    assert torch.equal(forced.tokens, again.tokens)  # seeded


# --------------------------------------------------------------------------------------
# Forward pass against references
# --------------------------------------------------------------------------------------


def _reference_logits(w: at.AttentionWeights, tokens: torch.Tensor) -> torch.Tensor:
    """Plain full-sequence causal attention, one head at a time (one model)."""
    L = tokens.shape[1]
    x = w.W_E[tokens] + w.W_pos[:L]
    out = torch.zeros_like(x) + w.b_O
    mask = torch.ones(L, L).tril().bool()
    for h in range(w.W_Q.shape[0]):
        q = x @ w.W_Q[h] + w.b_Q[h]
        k = x @ w.W_K[h] + w.b_K[h]
        v = x @ w.W_V[h] + w.b_V[h]
        scores = (q @ k.transpose(1, 2)) / math.sqrt(w.W_Q.shape[-1])
        pattern = scores.masked_fill(~mask, -math.inf).softmax(-1)
        out = out + (pattern @ v) @ w.W_O[h]
    return (x + out) @ w.W_U + w.b_U


def _random_weights(task, n_instances=2, d_model=12, n_heads=3, d_head=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = at.init_weights(n_instances, task.d_vocab, task.seq_len, d_model, n_heads, d_head, gen)
    return w.map(lambda t: t + 0.1 * torch.randn(t.shape, generator=gen))  # nonzero biases


def test_last_position_forward_matches_reference():
    task = at.SkipTrigramTask(n_features=5, n_filler=6, seq_len=7)
    w = _random_weights(task)
    batch = task.sample(16, 0)
    out = at.last_position_forward(w, batch.tokens)
    for i in range(2):
        ref = _reference_logits(w.instance(i), batch.tokens)[:, -1]
        _assert_close(out.logits[i], ref, atol=1e-5, rtol=1e-5)
    _assert_close(out.pattern.sum(-1), torch.ones(2, 16, 3))


def test_to_model_matches_native_transformerlens():
    task = at.SkipTrigramTask(n_features=5, n_filler=6, seq_len=7)
    w = _random_weights(task, n_instances=1)
    batch = task.sample(8, 0)
    ours = at.last_position_forward(w, batch.tokens)
    model = at.to_model(w.instance(0), task)
    logits, cache = model.run_with_cache(batch.tokens)
    _assert_close(logits[:, -1], ours.logits[0], atol=1e-5, rtol=1e-5)
    _assert_close(
        cache["blocks.0.attn.hook_pattern"][:, :, -1], ours.pattern[0], atol=1e-6, rtol=1e-5
    )
    _assert_close(cache["blocks.0.attn.hook_z"][:, -1], ours.z[0], atol=1e-6, rtol=1e-5)
    with pytest.raises(InterplabError, match="one model's weights"):
        at.to_model(w, task)


# --------------------------------------------------------------------------------------
# Attribution on hand-built models (closed forms)
# --------------------------------------------------------------------------------------


def _hand_built(task: at.SkipTrigramTask, head_scales: list[float]) -> at.AttentionWeights:
    """Residual = logit space (d_model = d_vocab, W_U = I, one-hot embeddings). Every head
    attends from the destination to the source with score 40 (fillers 0).
    ov_coherent: head h writes 10 * head_scales[h] on c_f for source a_f; NULL bias 5.
    ov_incoherent: the destination B_f's embedding also carries 5 on c_f (direct path),
    head h writes -4 * head_scales[h] on NULL for source A; NULL bias 7."""
    V = task.d_vocab
    H, e = len(head_scales), V
    eye = torch.eye(V)
    W_E = eye.clone()
    table = task.features
    W_Q = torch.zeros(H, V, e)
    W_K = torch.zeros(H, V, e)
    W_V = torch.zeros(H, V, e)
    W_O = torch.zeros(H, e, V)
    b_U = torch.zeros(V)
    score = 40.0 * math.sqrt(e)
    for h, scale in enumerate(head_scales):
        for a, b, c in table.tolist():
            W_Q[h, b, 0] = 1.0
            W_K[h, a, 0] = score
            if task.setting == "ov_coherent":
                W_V[h, a, a] = 1.0
                W_O[h, a, c] = 10.0 * scale
            else:
                W_V[h, a, a] = 1.0
                W_O[h, a, task.null_token] = -4.0 * scale
    if task.setting == "ov_coherent":
        b_U[task.null_token] = 5.0
    else:
        for _, b, c in table.tolist():
            W_E[b, c] = 5.0
        b_U[task.null_token] = 7.0
    return at.AttentionWeights(
        W_E=W_E,
        W_pos=torch.zeros(task.seq_len, V),
        W_Q=W_Q,
        W_K=W_K,
        W_V=W_V,
        W_O=W_O,
        b_Q=torch.zeros(H, e),
        b_K=torch.zeros(H, e),
        b_V=torch.zeros(H, e),
        b_O=torch.zeros(V),
        W_U=eye.clone(),
        b_U=b_U,
    )


def test_one_head_coherent_model_uses_one_head():
    task = at.SkipTrigramTask(setting="ov_coherent", n_features=5, n_filler=6, seq_len=6)
    n = task.n_features
    w = _hand_built(task, [1.0, 0.0, 0.0])
    a = at.analyse_features(w, task, n_per_feature=32)
    assert bool((a.accuracy == 1).all()) and bool((a.null_accuracy == 1).all())
    own = 10.0 - 10.0 / (n + 1)  # 10 on c_f, centred over n + 1 answers
    _assert_close(a.dla[:, 0], torch.full((n,), own), atol=1e-4, rtol=0)
    _assert_close(a.dla[:, 1:], torch.zeros(n, 2), atol=1e-6, rtol=0)
    _assert_close(a.participation_ratio, torch.ones(n))
    assert a.heads_used.tolist() == [1] * n
    _assert_close(a.attention_to_source[:, 0], torch.ones(n))
    _assert_close(a.dla_via_source, a.dla, atol=1e-4, rtol=0)
    # exact decomposition: heads + direct + biases = centred logit of c_f
    _assert_close(a.dla.sum(1) + a.direct + a.bias, a.logit, atol=1e-4, rtol=0)
    # OV table: own answer 10 - mean, others -mean (interference = own - 10)
    _assert_close(a.ov_own[:, 0], torch.full((n,), own), atol=1e-4, rtol=0)
    _assert_close(a.ov_interference[:, 0], torch.full((n,), -10.0 / (n + 1)), atol=1e-4, rtol=0)
    assert bool((a.qk_selectivity[:, 0] > 39).all())


def test_split_heads_give_participation_ratio_two():
    task = at.SkipTrigramTask(setting="ov_coherent", n_features=4, n_filler=5, seq_len=6)
    a = at.analyse_features(_hand_built(task, [0.5, 0.5, 0.0]), task, n_per_feature=16)
    _assert_close(a.participation_ratio, torch.full((4,), 2.0))
    assert a.heads_used.tolist() == [2] * 4
    assert a.summary()["features_on_more_than_one_head"] == 4


def test_incoherent_closed_form_direct_path_plus_suppressor():
    task = at.SkipTrigramTask(setting="ov_incoherent", n_features=6, n_filler=5, seq_len=6)
    n = task.n_features
    a = at.analyse_features(_hand_built(task, [1.0, 0.0]), task, n_per_feature=32)
    assert bool((a.accuracy == 1).all()) and bool((a.null_accuracy == 1).all())
    # the head lowers NULL by 4, which raises every c_f's centred logit by 4 / (n + 1)
    _assert_close(a.dla[:, 0], torch.full((n,), 4.0 / (n + 1)), atol=1e-4, rtol=0)
    _assert_close(a.direct, torch.full((n,), 5.0 - 5.0 / (n + 1)), atol=1e-4, rtol=0)
    _assert_close(a.dla.sum(1) + a.direct + a.bias, a.logit, atol=1e-4, rtol=0)


def test_analyse_rejects_mismatched_weights():
    task = at.SkipTrigramTask(n_features=4, n_filler=5, seq_len=6)
    w = _random_weights(task)
    with pytest.raises(InterplabError, match="one model's weights"):
        at.analyse_features(w, task)
    other = at.SkipTrigramTask(n_features=7, n_filler=5, seq_len=6)
    with pytest.raises(InterplabError, match="do not fit the task"):
        at.analyse_features(w.instance(0), other)
    with pytest.raises(InterplabError, match="share must be a number"):
        at.analyse_features(w.instance(0), task, share=0.0)


# --------------------------------------------------------------------------------------
# Trained models (fast settings)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["ov_incoherent", "ov_coherent"])
def test_trained_model_solves_task_and_spreads_features(setting):
    config = at.AttentionSuperpositionConfig(
        task=at.SkipTrigramTask(setting=setting, n_features=12),
        n_heads=4,
        d_head=4,
        n_instances=1,
        steps=200,
        batch_size=256,
        eval_examples=64,
    )
    result = at.train_attention_superposition(config, progress=False)
    assert result.accuracy.item() > 0.95
    assert result.loss_history[0].item() > 10 * result.loss.item()  # it learned
    a = result.analyse(n_per_feature=64)
    assert a.accuracy.mean().item() > 0.95
    _assert_close(a.dla.sum(1) + a.direct + a.bias, a.logit, atol=1e-3, rtol=1e-4)
    # Anthropic (May 2023): with more skip-trigrams than heads, features share heads
    assert int((a.heads_used > 1).sum()) >= 1
    assert a.participation_ratio.max().item() > 1.5
    fig = a.plot()
    assert len(fig.axes) >= 3
    assert len(a.plot_circuits().axes) == 2 * 4


def test_recipe_runs_on_tiny_settings(tmp_path):
    pytest.importorskip("matplotlib")
    from interplab import recipes
    from interplab.runs import run_recipe

    recipes.register("attention-superposition", "interplab.recipes.attention_superposition")
    args = ["--fast", "--steps", "40", "--n-instances", "1", "--n-features", "5"]
    result = run_recipe("attention-superposition", [*args, "--sweep-features", "3"], root=tmp_path)
    data = json.loads((result.run_dir / "ov_coherent.json").read_text())
    assert len(data["dla"]) == 5 and len(data["dla"][0]) == 4
    for name in ("ov_incoherent_dla", "ov_coherent_circuits", "sweep"):
        assert (result.run_dir / "figures" / f"{name}.png").exists()
    assert "participation ratio" in result.report_path.read_text()


def test_recipe_config_errors():
    from interplab.recipes.attention_superposition import Config

    with pytest.raises(InterplabError, match=r"n_features \(4\) must exceed n_heads \(4\)"):
        Config(n_features=4)
    with pytest.raises(InterplabError, match="steps must be a positive integer or None"):
        Config(steps=0)
    with pytest.raises(InterplabError, match="sweep_features must list feature counts >= 2"):
        Config(sweep_features=(1, 4))
