"""Modular arithmetic and grokking: closed forms for the Fourier tools, the fast forward
against the TransformerLens bridge, Grokfast filters by hand, and a small grokking run
(p = 31) whose embedding becomes sparse in the Fourier basis (Nanda et al. 2023)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from interplab.errors import InterplabError
from interplab.toys import modular as mod
from interplab.toys import modular_fourier as mf
from interplab.toys import modular_grokfast as gf


@pytest.fixture(autouse=True)
def _one_thread():
    # the machine is shared; one thread is also faster than two busy ones for these sizes
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _small(**overrides) -> mod.ModularConfig:
    """p = 31, 70% training pairs, lr 1e-2: memorises by ~step 50, generalises by ~200-350."""
    settings = dict(
        p=31,
        train_fraction=0.7,
        d_model=64,
        n_heads=4,
        d_mlp=128,
        lr=1e-2,
        steps=400,
        eval_every=25,
        checkpoint_every=100,
        generalisation_threshold=0.95,
        seed=0,
    )
    settings.update(overrides)
    return mod.ModularConfig(**settings)


@pytest.fixture(scope="module")
def grokked() -> mod.ModularResult:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return mod.train_modular(_small(), progress=False)
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------
# Config and data
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(p=24), "must be an odd prime"),
        (dict(p=2), "must be an odd prime"),
        (dict(p=0), "p must be a positive integer"),
        (dict(train_fraction=0.0), "train_fraction must be in \\(0, 1\\)"),
        (dict(train_fraction=1.0), "train_fraction must be in \\(0, 1\\)"),
        (dict(train_fraction=1.5), "train_fraction must be in \\(0, 1\\)"),
        (dict(p=3, train_fraction=0.01), "leaves 0 of 9 pairs"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(steps=-5), "steps must be a positive integer"),
        (dict(operation="divide"), "unknown operation 'divide'"),
        (dict(grad_filter="adam"), "unknown grad_filter 'adam'"),
        (dict(d_model=30, n_heads=4), "divisible by n_heads"),
        (dict(checkpoint_every=0), "checkpoint_every must be a positive integer or None"),
        (dict(lr=0.0), "lr must be a positive number"),
        (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
        (dict(betas=(0.9, 1.0)), "betas must be two numbers"),
        (dict(filter_alpha=1.0), "filter_alpha must be in \\[0, 1\\)"),
        (dict(filter_lamb=-1.0), "filter_lamb must be >= 0"),
        (dict(filter_window=0), "filter_window must be a positive integer"),
        (dict(generalisation_threshold=0.0), "generalisation_threshold must be in"),
        (dict(device="gpu0"), "is not a torch device"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(InterplabError, match=message):
        mod.ModularConfig(**kwargs)


def test_filter_lamb_defaults_follow_grokfast():
    assert mod.ModularConfig(grad_filter="ema").lamb == 2.0
    assert mod.ModularConfig(grad_filter="ma").lamb == 5.0
    assert mod.ModularConfig(grad_filter="ema", filter_lamb=0.5).lamb == 0.5


@pytest.mark.parametrize(
    ("operation", "answer"),
    [
        ("add", lambda a, b, p: (a + b) % p),
        ("subtract", lambda a, b, p: (a - b) % p),
        ("multiply", lambda a, b, p: (a * b) % p),
    ],
)
def test_dataset_split_and_labels(operation, answer):
    config = mod.ModularConfig(p=13, operation=operation, train_fraction=0.3, seed=1)
    train_x, train_y, test_x, test_y = mod.modular_dataset(config)
    assert len(train_x) == round(0.3 * 169) and len(train_x) + len(test_x) == 169
    pairs = {tuple(t[:2].tolist()) for t in torch.cat([train_x, test_x])}
    assert pairs == {(a, b) for a in range(13) for b in range(13)}  # disjoint and complete
    assert (train_x[:, 2] == 13).all() and (test_x[:, 2] == 13).all()  # '=' is token p
    for x, y in ((train_x, train_y), (test_x, test_y)):
        expected = [answer(a, b, 13) for a, b in x[:, :2].tolist()]
        assert y.tolist() == expected


def test_dataset_is_deterministic_in_the_seed():
    a = mod.modular_dataset(mod.ModularConfig(p=17, seed=3))
    b = mod.modular_dataset(mod.ModularConfig(p=17, seed=3))
    c = mod.modular_dataset(mod.ModularConfig(p=17, seed=4))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.train_tokens, c.train_tokens)


# --------------------------------------------------------------------------------------
# The model: a native TransformerLens bridge without LayerNorm; the fast forward
# --------------------------------------------------------------------------------------


def test_model_is_layernorm_free_bridge_with_hooks():
    config = _small(p=7, d_model=16, d_mlp=32)
    model = mod.modular_model(config)
    assert model.cfg.normalization_type is None and model.cfg.n_layers == 1
    names = [name for name, _ in model.named_parameters()]
    assert not [n for n in names if "ln" in n.split(".")[-2:] or "norm" in n.lower()]
    tokens, _ = mod.all_pairs(7)
    _, cache = model.run_with_cache(tokens[:5])
    # the normalisation hooks exist but are identities
    torch.testing.assert_close(cache["blocks.0.ln2.hook_out"], cache["blocks.0.ln2.hook_in"])
    assert cache["blocks.0.attn.hook_pattern"].shape == (5, 4, 3, 3)
    assert cache["blocks.0.mlp.hook_post"].shape == (5, 3, 32)
    assert model.W_E.shape == (8, 16)  # p + 1 tokens


@pytest.mark.parametrize("p", [7, 31])
def test_fast_logits_match_the_bridge_and_carry_gradients(p):
    config = _small(p=p, d_model=32, d_mlp=64, seed=5)
    model = mod.modular_model(config)
    with torch.no_grad():  # move away from the symmetric init (zero biases)
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    tokens, labels = mod.all_pairs(p)
    fast = mod.modular_logits(model, tokens)
    with torch.no_grad():
        reference = model(tokens)[:, -1]
    torch.testing.assert_close(fast.detach(), reference, atol=1e-5, rtol=1e-5)
    # the same gradients as backpropagating through the bridge's hooked forward
    F.cross_entropy(model(tokens)[:, -1, :p], labels).backward()
    reference_grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(fast[:, :p], labels).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, reference_grads[name], atol=1e-5, rtol=1e-4)


def test_fast_logits_reject_other_architectures():
    import interplab
    from interplab.models import ToyConfig

    model = interplab.load_model(ToyConfig(n_layers=2, d_model=16, d_vocab=10, n_ctx=3))
    with pytest.raises(InterplabError, match="one-layer model without normalisation"):
        mod.modular_logits(model, torch.zeros(1, 3, dtype=torch.long))


# --------------------------------------------------------------------------------------
# Grokfast filters, by hand
# --------------------------------------------------------------------------------------


def _param_with_grads(grads):
    param = torch.nn.Parameter(torch.zeros(2))
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float32)
        yield param


def test_ema_filter_closed_form():
    alpha, lamb = 0.9, 2.0
    f = gf.EMAGradFilter(alpha, lamb)
    out = []
    for param in _param_with_grads([[1.0, 0.0], [3.0, -1.0]]):
        f([param])
        out.append(param.grad.clone())
    torch.testing.assert_close(out[0], torch.tensor([1.0 + lamb, 0.0]))  # h starts at g
    h = alpha * torch.tensor([1.0, 0.0]) + (1 - alpha) * torch.tensor([3.0, -1.0])
    torch.testing.assert_close(out[1], torch.tensor([3.0, -1.0]) + lamb * h)


def test_ma_filter_closed_form():
    lamb = 0.5
    f = gf.MAGradFilter(window=3, lamb=lamb)
    out = []
    for param in _param_with_grads([[1.0, 1.0], [2.0, 0.0], [3.0, 0.0], [4.0, 2.0], [5.0, 0.0]]):
        f([param])
        out.append(param.grad[0].item())
    # unchanged until the window is full, then g + lamb * mean(last three)
    assert out[:2] == [1.0, 2.0]
    assert out[2:] == pytest.approx([3 + lamb * 2, 4 + lamb * 3, 5 + lamb * 4])


# --------------------------------------------------------------------------------------
# Fourier basis, norms, Gini: closed forms
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [5, 7, 113])
def test_fourier_basis_is_orthonormal(p):
    basis = mf.fourier_basis(p, dtype=torch.float64)
    torch.testing.assert_close(basis @ basis.T, torch.eye(p, dtype=torch.float64))
    x = torch.arange(p, dtype=torch.float64)
    torch.testing.assert_close(basis[3], torch.cos(4 * math.pi * x / p) / math.sqrt(p / 2))
    torch.testing.assert_close(basis[4], torch.sin(4 * math.pi * x / p) / math.sqrt(p / 2))
    assert mf.component_labels(p)[:3] == ["const", "cos 1", "sin 1"]
    with pytest.raises(InterplabError, match="odd prime"):
        mf.fourier_basis(p + 1)


def test_fourier_norms_of_a_pure_frequency():
    p, k = 23, 5
    x = torch.arange(p, dtype=torch.float32)
    u, v = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    W = (
        torch.cos(2 * math.pi * k * x / p)[:, None] * u
        + torch.sin(2 * math.pi * k * x / p)[:, None] * v
    )
    W_E = torch.cat([W + 2.0, torch.randn(1, 3)])  # + a constant, and an '=' row to drop
    norms = mf.fourier_embedding_norms(W_E, p)
    expected = math.sqrt(p / 2) * math.sqrt(25 + 1)
    freq = norms.frequency_norms
    assert freq[k - 1].item() == pytest.approx(expected, rel=1e-5)
    assert freq.pow(2).sum().item() == pytest.approx(expected**2, rel=1e-4)  # nothing elsewhere
    assert norms.constant_norm == pytest.approx(2 * math.sqrt(p) * math.sqrt(3), rel=1e-5)
    assert norms.key_frequencies() == [k]
    assert norms.top_fraction(1) == pytest.approx(1.0, abs=1e-5)
    # unembedding: answers are columns
    un = mf.fourier_unembedding_norms(W.T, p)
    assert un.frequency_norms[k - 1].item() == pytest.approx(expected, rel=1e-5)


def test_gini_closed_forms():
    assert mf.gini([2.0, 2.0, 2.0, 2.0]) == pytest.approx(0.0)
    assert mf.gini([0.0, 0.0, 0.0, 5.0]) == pytest.approx(3 / 4)  # (n - 1) / n
    assert mf.gini([1.0, 2.0, 3.0, 4.0]) == pytest.approx(0.25)
    x = torch.rand(40, generator=torch.Generator().manual_seed(0))
    # reference: mean absolute difference over twice the mean
    reference = (x[:, None] - x[None]).abs().mean() / (2 * x.mean())
    assert mf.gini(x) == pytest.approx(reference.item(), rel=1e-6)
    with pytest.raises(InterplabError, match="nonnegative"):
        mf.gini([1.0, -1.0])


def test_neuron_frequencies_closed_form():
    p = 13
    a = torch.arange(p, dtype=torch.float32)[:, None].expand(p, p)
    b = torch.arange(p, dtype=torch.float32)[None, :].expand(p, p)
    w = lambda k: 2 * math.pi * k / p  # noqa: E731
    acts = torch.stack(
        [
            torch.cos(w(3) * (a + b)),  # all at k=3
            torch.cos(w(2) * a) + 0.5,  # k=2, constant ignored
            torch.cos(w(1) * a) + torch.sin(w(4) * b),  # half at 1, half at 4
            torch.zeros(p, p),  # dead
        ],
        dim=-1,
    )
    nf = mf.neuron_frequencies(acts)
    frac = nf.frac_explained
    assert frac[0, 2].item() == pytest.approx(1.0, abs=1e-5)
    assert frac[1, 1].item() == pytest.approx(1.0, abs=1e-5)
    assert frac[2, 0].item() == pytest.approx(0.5, abs=1e-5)
    assert frac[2, 3].item() == pytest.approx(0.5, abs=1e-5)
    assert frac.sum(-1)[:3].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    assert nf.frequency.tolist()[:2] == [3, 2] and nf.frequency[3].item() == 0


# --------------------------------------------------------------------------------------
# Restricted and excluded loss: closed forms and a brute-force projection
# --------------------------------------------------------------------------------------


def _frequency_logits(p, freqs, sign, generator):
    """Σ_k A_k cos(w_k(a ± b - c)) + B_k sin(...) with random A_k, B_k, as [a, b, c]."""
    r = torch.arange(p, dtype=torch.float64)
    s = r[:, None, None] + sign * r[None, :, None] - r[None, None, :]
    out = torch.zeros(p, p, p, dtype=torch.float64)
    for k in freqs:
        A, B = torch.randn(2, generator=generator, dtype=torch.float64) * 3
        out += A * torch.cos(2 * math.pi * k * s / p) + B * torch.sin(2 * math.pi * k * s / p)
    return out


def _loss(logits, operation, mask=None):
    p = logits.shape[0]
    _, labels = mod.all_pairs(p, operation)
    losses = F.cross_entropy(logits.reshape(p * p, p), labels, reduction="none")
    return (losses if mask is None else losses[mask.reshape(-1)]).mean().item()


@pytest.mark.parametrize(("operation", "sign"), [("add", 1), ("subtract", -1)])
def test_restricted_and_excluded_loss_closed_form(operation, sign):
    p, key, other = 11, [1, 4], [2, 5]
    g = torch.Generator().manual_seed(0)
    key_part = _frequency_logits(p, key, sign, g)
    other_part = _frequency_logits(p, other, sign, g)
    # a per-(a, b) offset is orthogonal to every direction and invisible to the softmax
    offset = torch.randn(p, p, 1, generator=g, dtype=torch.float64).expand(p, p, p)
    logits = key_part + other_part + offset

    torch.testing.assert_close(mf.key_frequency_logits(logits, key, operation), key_part)
    torch.testing.assert_close(mf.key_frequency_logits(key_part + offset, key, operation), key_part)
    assert mf.restricted_loss(key_part + offset, key, operation) == pytest.approx(
        _loss(key_part + offset, operation), rel=1e-9
    )  # built only from key frequencies: restriction changes nothing
    assert mf.restricted_loss(logits, key, operation) == pytest.approx(
        _loss(key_part, operation), rel=1e-9
    )
    train = torch.rand(p, p, generator=g) < 0.4
    assert mf.excluded_loss(logits, key, train, operation) == pytest.approx(
        _loss(other_part, operation, train), rel=1e-9
    )
    assert mf.excluded_loss(key_part, key, train, operation) == pytest.approx(math.log(p))


def test_key_frequency_projection_matches_brute_force():
    p, key = 7, [1, 3]
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(p, p, p, generator=g, dtype=torch.float64)
    r = torch.arange(p, dtype=torch.float64)
    s = (r[:, None, None] + r[None, :, None] - r[None, None, :]).flatten()
    directions = torch.stack(
        [f(2 * math.pi * k * s / p) for k in key for f in (torch.cos, torch.sin)]
    )  # [2K, p³]
    coef = torch.linalg.lstsq(directions.T, logits.flatten()[:, None]).solution
    reference = (directions.T @ coef).view(p, p, p)
    projected = mf.key_frequency_logits(logits, key)
    torch.testing.assert_close(projected, reference)
    torch.testing.assert_close(mf.key_frequency_logits(projected, key), projected)  # idempotent


def test_fourier_analysis_errors():
    logits = torch.zeros(7, 7, 7)
    with pytest.raises(InterplabError, match="frequencies must be in 1..3"):
        mf.key_frequency_logits(logits, [4])
    with pytest.raises(InterplabError, match="multiplication"):
        mf.key_frequency_logits(logits, [1], "multiply")
    with pytest.raises(InterplabError, match=r"\[p, p, p\]"):
        mf.key_frequency_logits(torch.zeros(7, 7, 6), [1])
    with pytest.raises(InterplabError, match="got 32 rows.*pass p="):
        mf.fourier_embedding_norms(torch.zeros(32, 4))
    with pytest.raises(InterplabError, match="fewer than p=31"):
        mf.fourier_embedding_norms(torch.zeros(20, 4), p=31)


# --------------------------------------------------------------------------------------
# Training: grokking, Fourier sparsity, progress measures, determinism, checkpoints
# --------------------------------------------------------------------------------------


def test_memorises_then_generalises(grokked):
    r = grokked
    assert r.steps_to_memorise is not None and r.steps_to_generalise is not None
    assert r.steps_to_memorise < r.steps_to_generalise <= 400
    assert r.test_accuracy[-1] >= 0.95 and r.train_accuracy[-1] == 1.0
    # when the training pairs were memorised, the held-out loss was still far higher
    i = r.steps.index(r.steps_to_memorise)
    assert r.test_loss[i] > 1.0 and r.test_loss[i] > 10 * r.train_loss[i]


def test_embedding_becomes_sparse_in_the_fourier_basis(grokked):
    p = grokked.config.p
    trained = mf.fourier_embedding_norms(grokked.model.W_E, p)
    init = mf.fourier_embedding_norms(mod.modular_model(grokked.config).W_E, p)
    # at init every frequency holds about 1/15 of the norm; after training a few hold most
    assert init.top_fraction(4) < 0.4
    assert trained.top_fraction(4) > 0.8
    assert trained.gini() > init.gini() + 0.25
    key = mf.key_frequencies(grokked.model)  # p read from the vocabulary (p + 1 tokens)
    assert 2 <= len(key.frequencies) <= 6
    assert key.from_embedding and set(key.from_embedding) <= set(key.frequencies)
    assert key.fraction_clustered > 0.6  # neurons cluster by frequency


def test_progress_measures(grokked):
    key = mf.key_frequencies(grokked.model, grokked.config.p).frequencies
    pm = mf.progress_measures(grokked, key)
    assert pm.steps == [0, 100, 200, 300, 400]
    # checkpoints reproduce the training curves
    for step, loss in zip(pm.steps, pm.test_loss, strict=True):
        assert loss == pytest.approx(grokked.test_loss[grokked.steps.index(step)], rel=1e-4)
    final = -1
    assert pm.restricted_loss[final] < 0.1  # the key frequencies alone solve the task
    assert pm.excluded_loss[final] > 1.0 > pm.train_loss[final]  # and the model needs them
    assert pm.restricted_loss[1] < pm.test_loss[1]  # restricted loss falls first
    assert pm.gini_embed[final] > pm.gini_embed[0] + 0.25


def test_training_is_deterministic_and_checkpoints_to_a_run(tmp_path):
    from interplab.runs import start_run

    config = _small(steps=20, eval_every=5, checkpoint_every=10, grad_filter="ema")
    a = mod.train_modular(config, progress=False)
    with start_run("modular", config, root=tmp_path) as run:
        b = mod.train_modular(config, progress=False, run=run)
    c = mod.train_modular(_small(steps=20, eval_every=5, seed=1), progress=False)
    assert a.train_loss == b.train_loss and a.test_accuracy == b.test_accuracy
    assert a.train_loss != c.train_loss
    assert [ck.step for ck in b.checkpoints] == [0, 10, 20]
    assert all(
        ck.path is not None and ck.path.exists() and ck.state is None for ck in b.checkpoints
    )
    loaded = b.load_checkpoint(-1)
    for name, tensor in a.checkpoints[-1].state.items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
    logged = [m for m in run.metrics() if "test_accuracy" in m]
    assert [m["step"] for m in logged] == [0, 5, 10, 15, 20]


def test_figures(grokked):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    figs = [
        grokked.plot_curves(),
        mf.fourier_embedding_norms(grokked.model.W_E, 31).plot(key=[1]),
        mod.plot_filter_comparison({"a": grokked}),
    ]
    assert all(len(f.axes) >= 1 for f in figs)


# --------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------


def test_grokking_recipe_fast(tmp_path):
    pytest.importorskip("matplotlib")
    import interplab.recipes
    from interplab.runs import run_recipe

    interplab.recipes.register("grokking", "interplab.recipes.grokking")
    result = run_recipe("grokking", ["--fast"], root=tmp_path)
    assert result.report_path.exists()
    fourier = json.loads((result.run_dir / "fourier.json").read_text())
    assert 2 <= len(fourier["frequencies"]) <= 6
    curves = json.loads((result.run_dir / "curves.json").read_text())
    ema = json.loads((result.run_dir / "curves_ema.json").read_text())
    assert curves["summary"]["steps_to_generalise"] is not None
    # the filtered run (same seed) stops at the first evaluation that generalises, if any
    ema_summary = ema["summary"]
    assert (
        ema["config"]["grad_filter"] == "ema" and ema["config"]["seed"] == curves["config"]["seed"]
    )
    if ema_summary["steps_to_generalise"] is not None:
        assert ema_summary["steps_to_generalise"] == ema_summary["steps_trained"]
    else:
        assert ema_summary["steps_trained"] == ema["config"]["steps"]
    for name in (
        "curves",
        "fourier_embedding",
        "neuron_clusters",
        "progress_measures",
        "grad_filter",
    ):
        assert (result.run_dir / "figures" / f"{name}.png").exists()
    html = result.report_path.read_text()
    assert "Key frequencies" in html and "Grokfast" in html


def test_grokking_recipe_config_errors():
    from interplab.recipes.grokking import Config

    with pytest.raises(InterplabError, match="p must be an odd prime"):
        Config(p=100)
    with pytest.raises(InterplabError, match="train_fraction must be in"):
        Config(train_fraction=1.0)
    with pytest.raises(InterplabError, match="steps must be a positive integer"):
        Config(steps=0)
