"""train_dictionaries: sweeps on one stream, normalisation, checkpoint/resume, failures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from interplab.dictionaries import (
    BatchTopK,
    Gated,
    JumpReLU,
    Matryoshka,
    ReLU,
    SkipTranscoder,
    TopK,
    TrainConfig,
    Transcoder,
    load_dictionary,
    reconstruction_metrics,
    train_dictionaries,
)
from interplab.dictionaries.training import rebatch
from interplab.errors import InterplabError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP contention on a shared 2-core machine (this
    runs after any session-wide thread setting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


D_IN = 16


class FakeRun:
    """The two methods train_dictionaries uses from interplab.runs.Run."""

    def __init__(self, root: Path):
        self.root = root
        self.logs: list[dict] = []

    def log(self, step: int, **metrics: float) -> None:
        self.logs.append({"step": step, **metrics})

    def path(self, name: str) -> Path:
        return self.root / name


def sparse_batches(n_batches: int, rows: int = 128, seed: int = 0, scale: float = 1.0):
    """Deterministic stream: each row is a sum of 2 of 32 fixed unit directions."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(32, D_IN, generator=g)
    truth /= truth.norm(dim=1, keepdim=True)
    for i in range(n_batches):
        gi = torch.Generator().manual_seed(seed * 10_000 + i)
        idx = torch.rand(rows, 32, generator=gi).topk(2).indices
        coef = torch.rand(rows, 2, generator=gi) + 0.5
        yield scale * (torch.zeros(rows, 32).scatter_(1, idx, coef) @ truth + 0.3)


def quick(**overrides) -> TrainConfig:
    settings = dict(
        batch_size=128,
        total_tokens=128 * 40,
        lr=5e-3,
        lr_warmup_steps=0,
        log_every=10,
        progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_sweep_on_one_stream_logs_and_saves(tmp_path):
    run = FakeRun(tmp_path)
    configs = [
        ReLU(48, l1_coefficient=0.3),
        TopK(48, k=2),
        TopK(64, k=2),
        Gated(48, l1_coefficient=0.3),
        JumpReLU(48, l0_coefficient=0.01),
        BatchTopK(48, k=2),
        Matryoshka(48, k=2, prefixes=(8,)),
    ]
    dictionaries = train_dictionaries(configs, sparse_batches(40), quick(), run=run)
    assert [d.d_sae for d in dictionaries] == [c.d_sae for c in configs]
    assert all(not d.training for d in dictionaries)
    assert [log["step"] for log in run.logs] == [10, 20, 30, 40]
    first, last = run.logs[0], run.logs[-1]
    names = [
        "relu-48",
        "topk-48-k2",
        "topk-64-k2",
        "gated-48",
        "jumprelu-48",
        "batchtopk-48-k2",
        "matryoshka-48-k2",
    ]
    for name in names:
        assert last[f"{name}/mse"] < first[f"{name}/mse"]
        assert 0 <= last[f"{name}/fvu"] < 0.5
        assert 0 <= last[f"{name}/dead_fraction"] <= 1
    assert last["topk-48-k2/l0"] == pytest.approx(2.0)
    assert last["tokens"] == 40 * 128 and last["tokens_per_s"] > 0
    by_name = dict(zip(names, dictionaries, strict=True))
    x = next(sparse_batches(1, seed=5))
    for name in ("relu-48", "matryoshka-48-k2"):
        loaded = load_dictionary(tmp_path / "dictionaries" / name)
        assert torch.equal(loaded.encode(x), by_name[name].encode(x))
    assert (tmp_path / "checkpoints" / "checkpoint.pt").exists()


def superposed_batches(n_batches: int, seed: int, rows: int = 256):
    """Rows that are sums of 3 of 64 fixed random unit directions in D_IN dimensions
    (coefficients in [0.5, 1.5]): 4x more features than dimensions."""
    truth = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0))
    truth /= truth.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        idx = torch.rand(rows, 64, generator=g).topk(3).indices
        coef = torch.rand(rows, 3, generator=g) + 0.5
        yield torch.zeros(rows, 64).scatter_(1, idx, coef) @ truth


def reference_relu_sae(batches, d_sae: int, l1: float, lr: float, warmup: int):
    """A plain ReLU SAE written out in full (Anthropic, April 2024 update): free decoder
    rows of norm 0.1, W_enc = W_dec.T, zero biases, loss MSE + l1 * sum_i f_i ||W_dec_i||
    with l1 warmed up linearly over `warmup` steps, Adam. Returns the reconstruction map."""
    batches = list(batches)
    torch.manual_seed(0)
    W_dec = torch.randn(d_sae, batches[0].shape[1])
    W_dec *= 0.1 / W_dec.norm(dim=1, keepdim=True)
    W_enc, b_enc, b_dec = W_dec.T.clone(), torch.zeros(d_sae), torch.zeros(W_dec.shape[1])
    params = [p.requires_grad_() for p in (W_enc, W_dec, b_enc, b_dec)]
    opt = torch.optim.Adam(params, lr=lr)
    for step, x in enumerate(batches):
        f = torch.relu(x @ W_enc + b_enc)
        mse = (f @ W_dec + b_dec - x).pow(2).sum(1).mean()
        penalty = (f * W_dec.norm(dim=1)).sum(1).mean()
        loss = mse + l1 * min(1.0, (step + 1) / warmup) * penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda x: torch.relu(x @ W_enc + b_enc) @ W_dec + b_dec


def test_dense_variants_train_as_well_as_a_plain_reference():
    """ReLU, Gated and JumpReLU on superposed sparse data, 16 latents per dimension, 150
    steps: each must reach the FVU of a plain reference ReLU SAE (~0.18). Before the encoder
    was scaled at init (`dense_encoder_scale`), about half of the latents fired at full
    strength, the first reconstruction was ~8x too large, and these ended at FVU 10-12."""
    steps, rows, d_sae = 150, 256, 256
    first = torch.cat(list(superposed_batches(4, seed=1)))
    scale = math.sqrt(D_IN / first.pow(2).sum(1).mean())  # E||x||^2 = d_in, as the trainer
    train = [x * scale for x in superposed_batches(steps, seed=1)]
    test_x = next(superposed_batches(1, seed=2, rows=4096)) * scale
    reference = reference_relu_sae(train, d_sae, l1=1.0, lr=1e-3, warmup=int(0.05 * steps))
    with torch.no_grad():
        error = (reference(test_x) - test_x).pow(2).sum()
    ref_fvu = (error / (test_x - test_x.mean(0)).pow(2).sum()).item()
    assert ref_fvu < 0.25  # so the bound below means a good reconstruction

    configs = [ReLU(d_sae, l1_coefficient=1.0), Gated(d_sae, l1_coefficient=1.0), JumpReLU(d_sae)]
    cfg = quick(batch_size=rows, total_tokens=rows * steps, lr=1e-3, log_every=steps)
    dictionaries = train_dictionaries(configs, train, cfg)
    for config, d in zip(configs, dictionaries, strict=True):
        fvu = reconstruction_metrics(d, test_x).fvu
        assert fvu < ref_fvu + 0.03, (type(config).__name__, fvu, ref_fvu)


def test_normalisation_is_folded_into_the_weights():
    """Training on 64 * x with E||x||^2 normalisation gives the same dictionary, rescaled:
    it reconstructs raw 64 * x exactly as the x-trained one reconstructs x, times 64 (a power
    of two keeps every rescaling exact in floating point)."""
    cfg = quick(total_tokens=128 * 15, dead_tokens_threshold=256)
    [a] = train_dictionaries([TopK(48, k=2)], sparse_batches(15), cfg, dtype=torch.float64)
    [b] = train_dictionaries(
        [TopK(48, k=2)], sparse_batches(15, scale=64.0), cfg, dtype=torch.float64
    )
    x = next(sparse_batches(1, seed=3)).double()
    assert torch.allclose(
        b.decode(b.encode(64 * x)), 64 * a.decode(a.encode(x)), rtol=1e-12, atol=1e-10
    )
    assert reconstruction_metrics(b, 64 * x).fvu == pytest.approx(
        reconstruction_metrics(a, x).fvu, rel=1e-6
    )
    # without normalisation the raw scale matters
    [c] = train_dictionaries(
        [TopK(48, k=2)],
        sparse_batches(15, scale=64.0),
        quick(total_tokens=128 * 15, normalize_activations="none"),
        dtype=torch.float64,
    )
    assert not torch.allclose(c.decode(c.encode(64 * x)), 64 * a.decode(a.encode(x)), rtol=1e-3)


class Crash(RuntimeError):
    pass


def crashing(batches, after: int):
    for i, batch in enumerate(batches):
        if i == after:
            raise Crash("simulated crash")
        yield batch


@pytest.mark.parametrize("interrupt_at", [13, 7])
def test_resume_matches_uninterrupted_run(tmp_path, interrupt_at):
    configs = [
        TopK(48, k=2),
        ReLU(48, l1_coefficient=0.3),
        BatchTopK(48, k=2),
        SkipTranscoder(JumpReLU(48, l0_coefficient=0.01)),
    ]
    cfg = quick(
        total_tokens=128 * 20,
        dead_tokens_threshold=512,
        checkpoint_every=5,
        checkpoint_dir=str(tmp_path / "ck"),
    )

    def stream():
        return ((x, 2 * x[:, :8]) for x in sparse_batches(20))

    reference = train_dictionaries(
        configs, stream(), quick(total_tokens=128 * 20, dead_tokens_threshold=512)
    )
    with pytest.raises(Crash):
        train_dictionaries(configs, crashing(stream(), interrupt_at), cfg)
    resumed = train_dictionaries(configs, stream(), cfg)
    for ref, res in zip(reference, resumed, strict=True):
        for (name, a), b in zip(ref.state_dict().items(), res.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    # a finished run resumes to the same result without training again
    again = train_dictionaries(configs, stream(), cfg)
    assert torch.equal(again[0].W_dec, reference[0].W_dec)


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    cfg = quick(total_tokens=128 * 4, checkpoint_dir=str(tmp_path))
    train_dictionaries([TopK(48, k=2)], sparse_batches(4), cfg)
    with pytest.raises(InterplabError, match="different dictionaries or training settings"):
        train_dictionaries([TopK(48, k=3)], sparse_batches(4), cfg)
    fresh = train_dictionaries(
        [TopK(48, k=3)],
        sparse_batches(4),
        quick(total_tokens=128 * 4, checkpoint_dir=str(tmp_path), resume=False),
    )
    assert fresh[0].variant.k == 3


def test_nan_inputs_stop_with_checkpoint_kept(tmp_path):
    def poisoned():
        for i, batch in enumerate(sparse_batches(20)):
            if i == 12:
                batch[3, 2] = float("nan")
            yield batch

    cfg = quick(total_tokens=128 * 20, checkpoint_every=5, checkpoint_dir=str(tmp_path))
    with pytest.raises(
        InterplabError,
        match=r"step 12: the batch contains NaN or inf.*last good checkpoint \(step 10\) was kept",
    ):
        train_dictionaries([TopK(48, k=2)], poisoned(), cfg)
    with pytest.raises(InterplabError, match="No checkpoint had been written"):
        train_dictionaries([TopK(48, k=2)], poisoned(), quick(total_tokens=128 * 20))


def test_diverging_loss_stops_training(tmp_path):
    cfg = quick(
        total_tokens=128 * 20,
        lr=1e30,
        adam_eps=1e-30,
        checkpoint_every=1,
        checkpoint_dir=str(tmp_path),
        normalize_activations="none",
    )
    with pytest.raises(InterplabError, match=r"non-finite loss \(relu-48\).*last good checkpoint"):
        train_dictionaries([ReLU(48, normalize_decoder=False)], sparse_batches(20), cfg)


def test_transcoder_learns_a_linear_map_through_w_skip():
    A = torch.randn(8, D_IN, generator=torch.Generator().manual_seed(1))
    stream = ((x, x @ A.T) for x in sparse_batches(200))
    [tc] = train_dictionaries(
        [SkipTranscoder(TopK(32, k=1))], stream, quick(total_tokens=128 * 200, lr=2e-2)
    )
    x = next(sparse_batches(1, seed=9))
    assert reconstruction_metrics(tc, x, x @ A.T).fvu < 0.05


def test_rebatch_recuts_any_chunking():
    data = torch.arange(50 * 3, dtype=torch.float32).reshape(50, 3)
    chunks = [data[:7], data[7:20].reshape(13, 1, 3), data[20:21], data[21:50]]
    out = [x for x, y in rebatch(chunks, 8)]
    assert len(out) == 6 and torch.equal(torch.cat(out), data[:48])
    pairs = list(rebatch([(data[:10], -data[:10]), (data[10:20], -data[10:20])], 6))
    assert all(torch.equal(y, -x) for x, y in pairs)
    with pytest.raises(InterplabError, match="mix plain tensors"):
        list(rebatch([data[:4], (data[:4], data[:4])], 2))
    with pytest.raises(InterplabError, match="different numbers of tokens"):
        list(rebatch([(data[:4], data[:3])], 2))
    with pytest.raises(InterplabError, match="tensors x"):
        list(rebatch(["text"], 2))


def test_stream_running_out_warns():
    with pytest.warns(UserWarning, match="ran out after 3 of 10 steps"):
        [d] = train_dictionaries([TopK(48, k=2)], sparse_batches(3), quick(total_tokens=128 * 10))
    assert not d.training


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: TrainConfig(batch_size=0), "batch_size must be a positive integer"),
        (lambda: TrainConfig(batch_size=64, total_tokens=10), "less than one batch"),
        (lambda: TrainConfig(lr=-1.0), "lr must be > 0"),
        (lambda: TrainConfig(adam_betas=(0.9, 1.0)), "adam_betas"),
        (lambda: TrainConfig(lr_decay_fraction=1.5), "lr_decay_fraction must be in"),
        (lambda: TrainConfig(normalize_activations="layer_norm"), "normalize_activations must be"),
        (lambda: TrainConfig(checkpoint_every=0), "checkpoint_every must be > 0"),
        (lambda: train_dictionaries([], sparse_batches(2), quick()), "at least one dictionary"),
        (
            lambda: train_dictionaries([TopK(48, k=2)], sparse_batches(0), quick()),
            "fewer than 128 tokens",
        ),
        (
            lambda: train_dictionaries([Transcoder(TopK(48, k=2))], sparse_batches(2), quick()),
            "transcoders need",
        ),
        (
            lambda: train_dictionaries(
                [TopK(48, k=2), TopK(48, k=2)], sparse_batches(2), quick(), names=["a", "a"]
            ),
            "must be unique",
        ),
        (
            lambda: train_dictionaries(["topk"], sparse_batches(2), quick()),
            "expected dictionary configs",
        ),
    ],
)
def test_training_errors(call, message):
    with pytest.raises(InterplabError, match=message):
        call()


def test_schedules():
    cfg = TrainConfig(
        batch_size=10,
        total_tokens=1000,
        lr_warmup_steps=4,
        lr_decay_fraction=0.2,
        sparsity_warmup_fraction=0.1,
    )
    assert cfg.total_steps == 100
    assert [cfg.lr_factor(s) for s in (0, 1, 3, 50, 80, 90, 99)] == pytest.approx(
        [0.25, 0.5, 1, 1, 1, 0.5, 0.05]
    )
    assert [cfg.sparsity_factor(s) for s in (0, 4, 9, 50)] == pytest.approx([0.1, 0.5, 1, 1])
    assert TrainConfig().default_lr(2**14) == pytest.approx(2e-4)
    assert TrainConfig().default_lr(2**12) == pytest.approx(4e-4)
    assert TrainConfig(lr=1e-3).default_lr(2**12) == 1e-3
