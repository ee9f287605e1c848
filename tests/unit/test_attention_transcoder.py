"""Attention transcoders: numerics against a loop reference, TopK exactness, causality, a
teacher-recovery experiment, the exact decomposition of a real attention layer, splicing,
ablation/steering, evaluation, streaming, files and bad-input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import interplab as il
from interplab.data.corpus import TextCorpus, pack
from interplab.dictionaries.attention_transcoder import (
    AttentionTrainConfig,
    AttentionTranscoder,
    AttentionTranscoderConfig,
    _ratio,
    ablate_heads,
    capture_attention_io,
    evaluate_attention_transcoder,
    fit_attention_transcoder,
    load_attention_transcoder,
    run_with_attention_transcoder,
    save_attention_transcoder,
    steer_heads,
    stream_windows,
    train_attention_transcoder,
)
from interplab.dictionaries.io import load_dictionary
from interplab.errors import InterplabError
from tests.conftest import make_hf_model, make_tokenizer

D = 16


def small(**kw) -> AttentionTranscoder:
    torch.manual_seed(kw.pop("seed", 0))
    d_model = kw.pop("d_model", D)
    base = dict(n_heads=12, n_qk=3, k=4, d_head_qk=4)
    transcoder = AttentionTranscoder(AttentionTranscoderConfig(**{**base, **kw}), d_model)
    with torch.no_grad():  # nonzero biases and sink so the tests would notice them missing
        for p in (transcoder.b_Q, transcoder.b_K, transcoder.b_V, transcoder.b_O):
            p.normal_(0, 0.3)
        if transcoder.config.sink:
            transcoder.sink_logit.normal_()
    return transcoder


@pytest.fixture(scope="module")
def model():
    return il.load_model(make_hf_model("gpt2"), tokenizer=make_tokenizer(), device="cpu")


@pytest.fixture(scope="module")
def windows():
    ids = torch.randint(2, 100, (6, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    return ids


@pytest.fixture(scope="module")
def exact(model):
    return AttentionTranscoder.from_attention_layer(model, 1)


# ---------------------------------------------------------------------------- numerics
def reference_head_outputs(t: AttentionTranscoder, x: torch.Tensor) -> torch.Tensor:
    """z by explicit loops over sequences, groups, destinations and sources (float64)."""
    x = x.double()
    B, T, _ = x.shape
    z = torch.zeros(B, T, t.n_heads, dtype=torch.float64)
    W_Q, W_K, W_V = t.W_Q.double(), t.W_K.double(), t.W_V.double()
    for b in range(B):
        for g in range(t.n_qk):
            heads = [h for h in range(t.n_heads) if h // t.heads_per_group == g]
            for dst in range(T):
                q = x[b, dst] @ W_Q[g] + t.b_Q[g].double()
                logits = [
                    float(q @ (x[b, src] @ W_K[g] + t.b_K[g].double())) / math.sqrt(t.d_head_qk)
                    for src in range(dst + 1)
                ]
                if t.config.sink:
                    logits = [float(t.sink_logit[g]), *logits]
                p = torch.tensor(logits, dtype=torch.float64).softmax(0)
                p = p[1:] if t.config.sink else p
                for src in range(dst + 1):
                    value = x[b, src] @ W_V[:, heads] + t.b_V[heads].double()
                    z[b, dst, heads] += p[src] * value
    return z


@pytest.mark.parametrize("sink", [True, False])
def test_head_outputs_match_loop_reference(sink):
    t = small(sink=sink)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = t.head_outputs(x)
        reference = reference_head_outputs(t, x)
    torch.testing.assert_close(z.double(), reference, atol=1e-5, rtol=1e-5)


def test_shapes_and_single_sequence():
    t = small()
    x = torch.randn(3, 7, D)
    with torch.no_grad():
        latents = t.encode(x)
        assert latents.shape == (3, 7, 12)
        assert t.decode(latents).shape == (3, 7, D)
        assert t.patterns(x).shape == (3, 3, 7, 7)
        assert t.values(x).shape == (3, 7, 12)
        assert t.head_group.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        out = t(x, torch.randn(3, 7, D))
        assert out.y_hat.shape == (3, 7, D) and out.latents.shape == (3, 7, 12)
        assert out.fired.shape == (12,) and out.loss.ndim == 0
        # one sequence [pos, d_model] is the same as a batch of one
        torch.testing.assert_close(t.encode(x[1]), latents[1])


def test_topk_is_exact():
    t = small()
    with torch.no_grad():
        t.W_O[3].mul_(5.0)  # an output norm that changes the ranking
        x = torch.randn(4, 9, D)
        z = t.head_outputs(x)
        latents = t.encode(x)
    nonzero = (latents != 0).sum(-1)
    assert int(nonzero.max()) <= t.k and int(nonzero.min()) == t.k
    expected = (z.abs() * t.W_O.norm(dim=1)).topk(t.k, dim=-1).indices.sort(-1).values
    kept = (latents != 0).nonzero()[:, -1].view(4, 9, t.k)
    assert torch.equal(kept, expected)
    torch.testing.assert_close(latents[latents != 0], z[latents != 0])


def test_sink_takes_attention():
    t = small(sink=True)
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        t.sink_logit.fill_(-1e4)
        assert torch.allclose(t.patterns(x).sum(-1), torch.ones(2, 3, 6), atol=1e-5)
        t.sink_logit.fill_(1e4)  # every group attends only to the sink: z = 0, output = b_O
        assert t.patterns(x).abs().max() < 1e-6
        assert t.head_outputs(x).abs().max() < 1e-5


def test_causal():
    t = small()
    x = torch.randn(2, 10, D)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, D)
    with torch.no_grad():
        a, b = t.encode(x), t.encode(x2)
        assert torch.equal(a[:, :6], b[:, :6])
        assert torch.equal(t.decode(a)[:, :6], t.decode(b)[:, :6])
        assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_ablating_a_head_subtracts_its_contribution():
    t = small()
    with torch.no_grad():
        latents = t.encode(torch.randn(2, 8, D))
        active = int((latents != 0).reshape(-1, t.n_heads).sum(0).argmax())
        ablated = latents.clone()
        ablated[..., active] = 0
        expected = t.decode(latents) - t.head_contribution(latents, active)
        torch.testing.assert_close(t.decode(ablated), expected)
        assert t.head_contribution(latents, active).abs().max() > 0


def test_aux_loss_trains_dead_values_not_patterns():
    t = small(aux_coefficient=1.0)
    x, y = torch.randn(2, 6, D), torch.randn(2, 6, D)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[:6] = True
    out = t(x, y, dead_mask=dead)
    assert out.losses["aux"] > 0
    out.losses["aux"].backward()
    assert t.W_Q.grad is None or t.W_Q.grad.abs().max() == 0  # patterns are detached
    assert t.W_V.grad[:, :6].abs().max() > 0  # dead heads' value vectors learn
    with pytest.raises(InterplabError, match="dead_mask"):
        t(x, y, dead_mask=torch.zeros(5, dtype=torch.bool))


def test_ratio_standard_error_closed_forms():
    b = torch.tensor([1.0, 2.0, 3.0, 4.0])
    r, sem = _ratio(2.5 * b, b)  # a proportional to b: exact ratio, no spread
    assert r == pytest.approx(2.5) and sem == pytest.approx(0.0, abs=1e-12)
    a = torch.tensor([1.0, 4.0, 2.0, 7.0])
    r, sem = _ratio(a, torch.ones(4))  # constant denominator: the plain mean and its sem
    assert r == pytest.approx(3.5)
    assert sem == pytest.approx(float(a.std() / 2.0))


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("ov_init", ["lstsq", "random"])
def test_training_recovers_a_teacher_layer(ov_init):
    """Ground truth: 4 rank-1 heads on one causal pattern. A student with 8 heads and k=4,
    fitted for 150 steps, reproduces it (the untrained student does not)."""
    torch.manual_seed(0)
    teacher = AttentionTranscoder(
        AttentionTranscoderConfig(n_heads=4, n_qk=1, k=4, d_head_qk=4, sink=False), 8
    )

    def pairs(seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randn(16, 8, 8, generator=g)
            with torch.no_grad():  # (never yield inside no_grad: it would leak into the trainer)
                y = teacher.decode(teacher.encode(x))
            yield x, y

    torch.manual_seed(1)
    student = AttentionTranscoder(
        AttentionTranscoderConfig(n_heads=8, n_qk=1, k=4, d_head_qk=4, sink=False), 8
    )
    x, y = next(pairs(99))  # held-out sequences
    with torch.no_grad():
        before = float(student(x, y).fvu)
    train = AttentionTrainConfig(
        steps=150, lr=3e-2, progress=False, dead_tokens_threshold=5000, ov_init=ov_init
    )
    summary = fit_attention_transcoder(student, pairs(1), train)
    with torch.no_grad():
        after = float(student(x, y).fvu)  # raw targets: the training scale was folded back
    assert before > 0.5
    assert after < 0.05
    assert summary.steps == 150 and summary.tokens == 150 * 16 * 8
    assert summary.final["l0"] == pytest.approx(4.0)


def test_lstsq_ov_init_recovers_heads_under_known_patterns():
    """With the teacher's QK copied, the OV fit is a least-squares problem whose exact
    solution is the teacher (dense, 4 rank-1 heads per group): the closed form finds it."""
    teacher = small(n_heads=8, n_qk=2, k=8, seed=3)
    student = small(n_heads=16, n_qk=2, k=16, seed=4)  # 8 heads per group: rank to spare
    with torch.no_grad():
        for name in ("W_Q", "b_Q", "W_K", "b_K", "sink_logit"):
            getattr(student, name).copy_(getattr(teacher, name))
        x = torch.randn(32, 10, D, generator=torch.Generator().manual_seed(5))
        y = teacher.decode(teacher.encode(x))
        student.init_ov_lstsq_(x, y, ridge=1e-9)
        assert float(student(x, y).fvu) < 1e-6
        held_out = torch.randn(4, 10, D)
        y_new = teacher.decode(teacher.encode(held_out))
        assert float(student(held_out, y_new).fvu) < 1e-6
        torch.testing.assert_close(student.W_O.norm(dim=1), torch.ones(16))


def test_sink_calibration():
    t = small(sink=True)
    x = torch.randn(8, 20, D)
    with torch.no_grad():
        t.calibrate_sink_(x, share=0.1)
        sink_share = 1 - t.patterns(x).sum(-1)  # b g t
    median = sink_share.transpose(0, 1).reshape(3, -1).median(-1).values
    torch.testing.assert_close(median, torch.full((3,), 0.1), atol=0.02, rtol=0)
    with pytest.raises(InterplabError, match="share"):
        t.calibrate_sink_(x, share=0.0)


def test_fit_errors():
    t = small()
    with pytest.raises(InterplabError, match="ran out after 2 of 5"):
        pairs = [(torch.randn(1, 4, D), torch.randn(1, 4, D))] * 2
        fit_attention_transcoder(t, pairs, AttentionTrainConfig(steps=5, progress=False))
    with pytest.raises(InterplabError, match="constant"):
        pairs = [(torch.randn(1, 4, D), torch.ones(1, 4, D))]
        fit_attention_transcoder(t, pairs, AttentionTrainConfig(steps=1, progress=False))
    with pytest.raises(InterplabError, match="d_model=16"):
        pairs = [(torch.randn(1, 4, 8), torch.randn(1, 4, 8))]
        fit_attention_transcoder(t, pairs, AttentionTrainConfig(steps=1, progress=False))


@pytest.mark.parametrize("qk_init", ["auto", "random"])
def test_train_on_a_model_from_a_token_file(model, tmp_path, qk_init):
    ids = np.random.default_rng(0).integers(2, 100, size=64 * 12).astype(np.int64)
    ids[::12] = 0
    np.save(tmp_path / "tokens.npy", ids)
    config = AttentionTranscoderConfig(n_heads=32, n_qk=4, k=8, d_head_qk=8)
    train = AttentionTrainConfig(
        steps=30, batch_size=4, context_size=12, lr=1e-2, progress=False, qk_init=qk_init
    )
    t = train_attention_transcoder(model, 1, str(tmp_path / "tokens.npy"), config, train)
    assert t.metadata["layer"] == 1
    assert t.metadata["hook_name"] == "blocks.1.ln1.hook_normalized"
    assert t.metadata["hook_name_out"] == "blocks.1.hook_attn_out"
    assert t.input_norm == "none"  # the input hook is already normalised
    assert t.metadata["training"]["tokens"] == 30 * 4 * 12
    # "auto" starts from the layer's QK circuits on this (absolute-position) model
    assert t.metadata["training"]["qk_init"] == ("layer" if qk_init == "auto" else "random")
    x, y = capture_attention_io(model, torch.tensor(ids[: 4 * 12]).view(4, 12), 1)
    untrained = AttentionTranscoder(config, 64)
    with torch.no_grad():
        assert float(t(x, y).fvu) < 0.9 * float(untrained(x, y).fvu)


# ---------------------------------------------------------------------------- the model
def test_exact_decomposition_reproduces_the_layer(model, exact, windows):
    x, y = capture_attention_io(model, windows, 1)
    with torch.no_grad():
        y_hat = exact.decode(exact.encode(x))
    torch.testing.assert_close(y_hat, y, atol=1e-4, rtol=1e-4)
    assert exact.n_heads == 4 * 16 and exact.n_qk == 4
    spliced = run_with_attention_transcoder(model, windows, exact)
    with torch.no_grad():
        torch.testing.assert_close(spliced.logits, model(windows), atol=1e-4, rtol=1e-4)
    sparse = AttentionTranscoder.from_attention_layer(model, 1, k=8)
    with torch.no_grad():
        assert (sparse.encode(x) != 0).sum(-1).max() <= 8


def test_qk_init_from_layer(model, exact, windows):
    x, _ = capture_attention_io(model, windows, 1)
    same = small(d_model=64, n_heads=16, n_qk=4, k=4, d_head_qk=16, sink=False)
    same.init_qk_from_layer_(model, 1)
    with torch.no_grad():  # same width as the layer's heads: the same patterns
        torch.testing.assert_close(same.patterns(x), exact.patterns(x), atol=1e-5, rtol=1e-5)
    repeated = small(d_model=64, n_heads=16, n_qk=8, k=4, d_head_qk=8, sink=False)
    repeated.init_qk_from_layer_(model, 1, noise=0.0)
    with torch.no_grad():  # narrower groups approximate them; repeats copy them
        p = repeated.patterns(x)
        torch.testing.assert_close(p[:, 4:], p[:, :4])
        assert (p[:, :4] - exact.patterns(x)).abs().mean() < 0.05


def test_keep_error_splice_and_ablation(model, windows):
    t = small(d_model=64, n_heads=16, n_qk=4, k=4)
    t.metadata["layer"] = 1
    x, y = capture_attention_io(model, windows, 1)
    with torch.no_grad():
        clean = model(windows)
        kept = run_with_attention_transcoder(model, windows, t, keep_error=True)
        torch.testing.assert_close(kept.logits, clean)  # no edit: the model is unchanged
        dropped = run_with_attention_transcoder(model, windows, t)
        torch.testing.assert_close(dropped.output, t.decode(t.encode(x)))
        head = int((kept.latents != 0).reshape(-1, 16).sum(0).argmax())
        ablated = ablate_heads(model, windows, t, [head])
        expected = y - t.head_contribution(kept.latents, head)
        torch.testing.assert_close(ablated.output, expected)
        assert (ablated.edited[..., head] == 0).all()
        assert not torch.allclose(ablated.logits, clean)


def test_steering(model, windows):
    t = small(d_model=64, n_heads=16, n_qk=4, k=4)
    t.metadata["layer"] = 1
    with torch.no_grad():
        base = run_with_attention_transcoder(model, windows, t)
        same = steer_heads(model, windows, t, [2, 5], scale=1.0, keep_error=False)
        torch.testing.assert_close(same.logits, base.logits)
        on = steer_heads(model, windows, t, 7, value=3.0, positions=[4, -1], keep_error=False)
        assert torch.all(on.edited[:, [4, 11], 7] == 3.0)
        assert torch.equal(on.edited[:, :4], on.latents[:, :4])
        torch.testing.assert_close(
            on.output[:, 4], base.output[:, 4] + (3.0 - on.latents[:, 4, 7, None]) * t.W_O[7]
        )
        doubled = steer_heads(model, windows, t, 7, scale=2.0)
        torch.testing.assert_close(doubled.edited[..., 7], 2 * doubled.latents[..., 7])
    with pytest.raises(InterplabError, match="position 12"):
        steer_heads(model, windows, t, 7, value=1.0, positions=[12])
    with pytest.raises(InterplabError, match="head 16"):
        ablate_heads(model, windows, t, [16])
    with pytest.raises(InterplabError, match="latent edit returned"):
        run_with_attention_transcoder(model, windows, t, edit=lambda z: z[..., :3])


def test_evaluation_of_the_exact_decomposition(model, exact, windows):
    result = evaluate_attention_transcoder(exact, model, windows, n_tokens=60, batch_size=4)
    assert result.n_windows == 6 and result.context_size == 12
    assert result.fvu < 1e-8
    assert torch.allclose(result.ce_spliced, result.ce_clean, atol=1e-4)
    assert result.ce_recovered == pytest.approx(1.0, abs=1e-3)
    assert result.l0 == pytest.approx(exact.n_heads)
    # zero ablation matches a manual run with hook_attn_out zeroed
    with (
        torch.no_grad(),
        model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", lambda a, hook: 0 * a)]),
    ):
        logp = model(windows).log_softmax(-1)
    ce = -logp[:, 1:-1].gather(-1, windows[:, 2:, None]).squeeze(-1).mean(1)
    torch.testing.assert_close(result.ce_zero, ce, atol=1e-5, rtol=1e-5)
    summary = result.summary()
    assert summary["ce_clean_sem"] > 0 and math.isfinite(summary["ce_recovered_sem"])
    json.dumps(result.to_dict())
    assert len(result.table_rows()) == 9


def test_model_errors(model, windows):
    with pytest.raises(InterplabError, match="layer 2 is out of range"):
        AttentionTranscoder.from_attention_layer(model, 2)
    with pytest.raises(InterplabError, match="layer -1 is out of range"):
        train_attention_transcoder(model, -1, "storyworld")
    wrong = small(d_model=32)
    with pytest.raises(InterplabError, match="d_model=64, the transcoder d_model=32"):
        run_with_attention_transcoder(model, windows, wrong, layer=0)
    with pytest.raises(InterplabError, match="names no layer"):
        run_with_attention_transcoder(model, windows, small(d_model=64))


# ---------------------------------------------------------------------------- data
def test_stream_windows_packs_like_pack(tmp_path):
    words = [f"w{i}" for i in range(98)]
    for i in range(5):
        text = " ".join(words[(7 * i + j) % 98] for j in range(23 + 5 * i))
        (tmp_path / f"doc{i}.txt").write_text(text)
    corpus, tok = TextCorpus(tmp_path), make_tokenizer()
    stream = stream_windows(corpus, tok, 9, 2, seed=3)
    streamed = torch.cat([next(stream) for _ in range(4)])
    torch.testing.assert_close(streamed, pack(corpus, tok, 9, 8, seed=3).ids)
    for _ in range(20):  # a finite corpus starts over rather than running dry
        assert next(stream).shape == (2, 9)


# ---------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path):
    t = small(input_norm="scale")
    with torch.no_grad():
        t.input_scale.fill_(2.5)
    t.metadata.update(layer=1, model_name="toy")
    folder = save_attention_transcoder(t, tmp_path / "at", {"note": "x"})
    loaded = load_attention_transcoder(folder)
    assert loaded.config == t.config and loaded.input_norm == "scale"
    via_generic = load_dictionary(folder)  # dispatches on cfg.json's architecture
    assert type(via_generic) is type(loaded) and via_generic.config == t.config
    with pytest.raises(InterplabError, match="activation_scale"):
        load_dictionary(folder, activation_scale=2.0)
    for name, value in t.file_tensors().items():
        assert torch.equal(loaded.file_tensors()[name], value), name
    assert loaded.metadata == {"layer": 1, "model_name": "toy", "note": "x"}
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(x)), t.decode(t.encode(x)))
    with pytest.raises(InterplabError, match="not empty"):
        save_attention_transcoder(t, folder)
    save_attention_transcoder(t, folder, overwrite=True)


def test_file_errors(tmp_path):
    folder = save_attention_transcoder(small(), tmp_path / "at")
    weights = folder / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InterplabError, match="truncated or corrupt"):
        load_attention_transcoder(folder)
    weights.write_bytes(data)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "topk"}))
    with pytest.raises(InterplabError, match="'topk' is not 'attention_transcoder'"):
        load_attention_transcoder(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_model": 8}))
    with pytest.raises(InterplabError, match="tensor 'W_Q' has shape"):
        load_attention_transcoder(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(InterplabError, match="not valid JSON"):
        load_attention_transcoder(folder)
    with pytest.raises(InterplabError, match="not a folder"):
        load_attention_transcoder(tmp_path / "missing")
    weights.unlink()
    with pytest.raises(InterplabError, match="missing"):
        load_attention_transcoder(folder)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(k=20, n_heads=16), "k=20 must be <= n_heads=16"),
        (dict(n_heads=10, n_qk=3), "multiple of n_qk=3"),
        (dict(n_heads=0), "n_heads must be an integer >= 1"),
        (dict(input_norm="rms"), "input_norm must be one of"),
        (dict(aux_coefficient=-1.0), "aux_coefficient"),
        (dict(sink="yes"), "sink must be True or False"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(InterplabError, match=match):
        AttentionTranscoderConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(steps=0), "steps"),
        (dict(lr=0.0), "lr"),
        (dict(context_size=1), "context_size"),
        (dict(decay_fraction=1.5), "decay_fraction"),
        (dict(adam_betas=(0.9, 1.0)), "adam_betas"),
        (dict(qk_init="svd"), "qk_init must be"),
        (dict(ov_init="zeros"), "ov_init must be"),
        (dict(init_windows=0), "init_windows"),
        (dict(ridge=-1.0), "ridge"),
    ],
)
def test_train_config_errors(kwargs, match):
    with pytest.raises(InterplabError, match=match):
        AttentionTrainConfig(**kwargs)


def test_lr_schedule():
    train = AttentionTrainConfig(steps=100, warmup_steps=10, decay_fraction=0.2)
    assert train.lr_factor(0) == pytest.approx(0.1)
    assert train.lr_factor(50) == 1.0
    assert train.lr_factor(90) == pytest.approx(0.5)


def test_tensor_errors():
    t = small()
    with pytest.raises(InterplabError, match="d_model=16"):
        t.encode(torch.randn(2, 5, 8))
    with pytest.raises(InterplabError, match="n_heads=12"):
        t.decode(torch.randn(2, 5, 11))
    with pytest.raises(InterplabError, match="expected the shape of x"):
        t(torch.randn(2, 5, D), torch.randn(2, 4, D))
    with pytest.raises(InterplabError, match="d_model must be"):
        AttentionTranscoder(AttentionTranscoderConfig(), 0)
    with pytest.raises(InterplabError, match="unknown field"):
        AttentionTranscoderConfig.from_dict({"n_heads": 8, "width": 3})


# ---------------------------------------------------------------------------- recipe
def test_recipe_fast(tmp_path):
    from interplab.recipes import attention_transcoder as recipe
    from interplab.runs import start_run

    folder = tmp_path / "gpt2"
    make_hf_model("gpt2").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    words = [f"w{i}" for i in range(98)]
    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(" ".join(rng.choice(words, size=600)))
    config = recipe.Config(
        model=str(folder), layer=1, corpus=str(tmp_path), fast=True, d_head_qk=8, device="cpu"
    )
    with start_run("attention-transcoder", config, root=tmp_path / "runs") as run:
        report = recipe.run(config, run)
        saved = load_attention_transcoder(run.path("attention_transcoder"))
        assert saved.metadata["layer"] == 1 and saved.n_heads == 32
        assert run.path("figures/head_patterns.png").exists()
        evaluation = json.loads(run.path("evaluation.json").read_text())
    assert evaluation["metrics"]["l0"] == pytest.approx(4.0)
    table = next(
        b for s in report.to_dict()["sections"] for b in s["blocks"] if b["type"] == "table"
    )
    assert [row[0] for row in table["rows"]][0] == "attention transcoder (trained)"
    assert len(table["rows"]) == 3  # trained, the layer's heads cut to k, all of them
    with pytest.raises(InterplabError, match="n_heads"):
        recipe.Config(n_heads=0)


def test_model_without_layernorm(tmp_path):
    """No ln1: the input is hook_resid_pre, scaled by a frozen input_scale; the exact
    decomposition still reproduces the layer, and "auto" QK init falls back to random."""
    toy = il.load_model(
        il.models.ToyConfig(
            n_layers=1, d_model=16, n_heads=2, d_vocab=40, n_ctx=16, normalization="none"
        ),
        device="cpu",
    )
    ids = np.random.default_rng(1).integers(0, 40, size=(16, 10)).astype(np.int64)
    exact = AttentionTranscoder.from_attention_layer(toy, 0)
    assert exact.metadata["hook_name"] == "blocks.0.hook_resid_pre"
    x, y = capture_attention_io(toy, torch.tensor(ids[:4]), 0)
    with torch.no_grad():
        torch.testing.assert_close(exact.decode(exact.encode(x)), y, atol=1e-5, rtol=1e-4)
    np.save(tmp_path / "ids.npy", ids)
    config = AttentionTranscoderConfig(n_heads=8, n_qk=2, k=2, d_head_qk=4)
    train = AttentionTrainConfig(steps=3, batch_size=4, context_size=10, progress=False)
    t = train_attention_transcoder(toy, 0, str(tmp_path / "ids.npy"), config, train)
    assert t.input_norm == "scale" and float(t.input_scale) != 1.0
    assert t.metadata["training"]["qk_init"] == "random"
    rms = float(x.pow(2).sum(-1).mean().sqrt()) / 4.0
    assert float(t.input_scale) == pytest.approx(rms, rel=0.3)
