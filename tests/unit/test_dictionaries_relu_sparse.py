"""The ReLU dictionary's sparse training pass equals its dense one.

Reference: the dense path (`use_sparse_kernels=False`: plain autograd through matmuls), which
`test_dictionaries.py` checks against the closed-form loss. In float64 the sparse kernels and
the dense fallback above `sparse_max_density` must give the same loss, reconstruction, loss
terms, l0, fired mask, latents and parameter gradients (1e-10), and a short training run must
end at the same weights and log the same metrics.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from interplab.dictionaries import (
    ReLU,
    SkipTranscoder,
    TrainConfig,
    Transcoder,
    build_dictionary,
    config_from_dict,
    train_dictionaries,
)
from interplab.dictionaries.standard import ReLUDictionary
from interplab.errors import InterplabError

F64 = torch.float64
D_IN, D_OUT, D_SAE, N = 12, 7, 48, 40

CONFIGS = [
    ReLU(D_SAE, l1_coefficient=0.7),
    ReLU(D_SAE, l1_coefficient=0.7, normalize_decoder=False),
    ReLU(D_SAE, apply_b_dec_to_input=False),
    Transcoder(ReLU(D_SAE, l1_coefficient=0.3)),
    SkipTranscoder(ReLU(D_SAE, l1_coefficient=0.3, normalize_decoder=False)),
]
# Always sparse / always the dense fallback that reuses the no-grad pre-activations.
MODES = {"sparse": {"sparse_max_density": 1.0}, "dense_fallback": {"sparse_max_density": 0.0}}


def _id(config) -> str:
    name = type(config).__name__
    variant = config.variant
    if isinstance(config, Transcoder):
        name += "-ReLU"
    if not variant.normalize_decoder:
        name += "-free_decoder"
    if variant.apply_b_dec_to_input is False:
        name += "-no_b_dec_input"
    return name


def _with(config, **fields):
    """The same config with ReLU fields replaced (inside a transcoder wrapper too)."""
    variant = dataclasses.replace(config.variant, **fields)
    return type(config)(variant) if isinstance(config, Transcoder) else variant


def _build(config, b_enc: float = -0.15):
    """A float64 dictionary with non-trivial biases, skip weights and decoder norms; `b_enc`
    sets the density of the latents."""
    torch.manual_seed(0)
    transcoder = isinstance(config, Transcoder)
    d = build_dictionary(config, D_IN, D_OUT if transcoder else None, dtype=F64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        d.b_dec.copy_(0.3 * torch.randn(d.d_out, generator=g, dtype=F64))
        d.b_enc.copy_(b_enc + 0.05 * torch.randn(D_SAE, generator=g, dtype=F64))
        d.b_enc[-4:] -= 100.0  # a few latents that never fire (the fired mask differs)
        if not config.variant.normalize_decoder:  # decoder norms away from 1
            d.W_dec.mul_(torch.linspace(0.3, 2.0, D_SAE, dtype=F64)[:, None])
        if d.skip:
            d.W_skip.copy_(0.2 * torch.randn(d.d_out, D_IN, generator=g, dtype=F64))
    return d


def _data(config, n: int = N):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, D_IN, generator=g, dtype=F64)
    y = torch.randn(n, D_OUT, generator=g, dtype=F64) if isinstance(config, Transcoder) else None
    return x, y


def _run(config, mode: dict | None, b_enc: float = -0.15):
    """Output and parameter gradients of one training pass; mode None = dense reference."""
    fields = {"use_sparse_kernels": False} if mode is None else mode
    d = _build(_with(config, **fields), b_enc)
    x, y = _data(config)
    out = d(x, y, sparsity_scale=0.6)
    out.loss.backward()
    return d, out, {name: p.grad.clone() for name, p in d.named_parameters()}


def _assert_same(out, grads, ref_out, ref_grads):
    close = dict(rtol=0, atol=1e-10)
    torch.testing.assert_close(out.loss, ref_out.loss, **close)
    torch.testing.assert_close(out.x_hat, ref_out.x_hat, **close)
    assert out.losses.keys() == ref_out.losses.keys() == {"mse", "l1"}
    for key in out.losses:
        torch.testing.assert_close(out.losses[key], ref_out.losses[key], **close)
    torch.testing.assert_close(out.l0, ref_out.l0, **close)
    assert torch.equal(out.fired, ref_out.fired)
    torch.testing.assert_close(out.latents, ref_out.latents, **close)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **close, msg=name)


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_sparse_and_fallback_paths_equal_the_dense_path(config, mode):
    _, ref_out, ref_grads = _run(config, None)
    d, out, grads = _run(config, MODES[mode])
    density = float(ref_out.l0) / D_SAE
    assert 0.05 < density < 0.6  # a real mix of active and inactive latents
    assert ref_out.losses["l1"] > 0 and not torch.all(ref_out.fired)
    if mode == "sparse":  # the output carries the sparse code; latents materialise lazily
        assert out.code is not None and out.dense_latents is None
        assert out.code.values.numel() == round(float(ref_out.l0) * N)
    else:
        assert out.code is None
    _assert_same(out, grads, ref_out, ref_grads)
    if d.skip:
        assert grads["W_skip"].abs().sum() > 0
    if not config.variant.normalize_decoder:  # the penalty's decoder-norm gradient is there
        assert not torch.allclose(
            grads["W_dec"], _run(_with(config, l1_coefficient=0), None)[2]["W_dec"]
        )


def test_density_threshold_chooses_the_path():
    """Batches whose active fraction is at most `sparse_max_density` take the sparse path."""
    config = CONFIGS[0]
    _, ref_out, _ = _run(config, None)
    nnz = round(float(ref_out.l0) * N)
    numel = N * D_SAE
    for threshold, sparse in (((nnz + 0.5) / numel, True), ((nnz - 0.5) / numel, False)):
        _, out, _ = _run(config, {"sparse_max_density": threshold})
        assert (out.code is not None) is sparse
    # use_sparse_kernels=False never builds a code, whatever the density
    _, out, _ = _run(config, {"use_sparse_kernels": False, "sparse_max_density": 1.0})
    assert out.code is None


@pytest.mark.parametrize("b_enc", [-50.0, 50.0], ids=["none_active", "all_but_4_active"])
@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[4]], ids=_id)
def test_sparse_path_with_no_or_all_latents_active(config, b_enc):
    _, ref_out, ref_grads = _run(config, None, b_enc)
    d, out, grads = _run(config, MODES["sparse"], b_enc)
    assert float(ref_out.l0) == (0.0 if b_enc < 0 else D_SAE - 4)
    assert out.code is not None
    _assert_same(out, grads, ref_out, ref_grads)
    if b_enc < 0:  # nothing active: only the biases (and skip path) learn
        assert torch.all(grads["W_enc"] == 0) and torch.all(grads["b_enc"] == 0)
        expected = d.b_dec + (_data(config)[0] @ d.W_skip.T if d.skip else 0)
        torch.testing.assert_close(out.x_hat, expected.expand_as(out.x_hat), rtol=0, atol=1e-12)


def test_sparse_forward_without_grad_matches_encode_decode():
    """Under no_grad (evaluation) the sparse pass still reconstructs decode(encode(x))."""
    d = _build(_with(CONFIGS[0], sparse_max_density=1.0)).eval()
    x, _ = _data(CONFIGS[0])
    with torch.no_grad():
        out = d(x)
        latents = d.encode(x)
    assert out.code is not None
    torch.testing.assert_close(out.latents, latents, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.x_hat, d.decode(latents), rtol=0, atol=1e-12)


class _Run:
    """Minimal run: collects logged metrics, keeps files under a folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs: list[dict[str, float]] = []

    def log(self, step: int, **metrics: float) -> None:
        self.logs.append({"step": step, **metrics})

    def path(self, name: str) -> Path:
        return self.root / name


def _synthetic_sparse(n: int, seed: int = 0) -> torch.Tensor:
    """Sums of ~3 of 32 random directions with exponential magnitudes (float64)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(32, D_IN, generator=g, dtype=F64)
    mask = torch.rand(n, 32, generator=g, dtype=F64) < 3 / 32
    magnitude = torch.empty(n, 32, dtype=F64).exponential_(generator=g)
    return (mask * magnitude) @ directions + 0.05 * torch.randn(n, D_IN, generator=g, dtype=F64)


def test_training_run_is_the_same_with_and_without_sparse_kernels(tmp_path, monkeypatch):
    """30 steps in float64: the sparse kernels (always, and switched by density) end at the
    weights of dense training and log the same metrics (fvu, l0, dead fraction, losses)."""
    calls = {"reference": 0, "dense": 0, "sparse": 0}
    for path in calls:  # count which path each training step took
        method = getattr(ReLUDictionary, f"_{path}_loss")

        def counted(self, *args, _method=method, _path=path, **kwargs):
            calls[_path] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(ReLUDictionary, f"_{path}_loss", counted)
    batch, steps = 64, 30
    data = _synthetic_sparse(batch * steps)
    train = TrainConfig(
        batch_size=batch, total_tokens=batch * steps, lr=1e-2, lr_warmup_steps=0,
        dead_tokens_threshold=4 * batch, max_grad_norm=5.0, log_every=10,
        checkpoint_every=None, progress=False,
    )  # fmt: skip
    results = {}
    modes = {
        "dense": {"use_sparse_kernels": False},
        "sparse": {"sparse_max_density": 1.0},
        "switched": {"sparse_max_density": 0.3},
    }
    for name, fields in modes.items():
        calls.update(reference=0, dense=0, sparse=0)
        run = _Run(tmp_path / name)
        config = ReLU(D_SAE, l1_coefficient=1.0, **fields)
        [d] = train_dictionaries([config], data.split(batch), train, run=run, dtype=F64)
        results[name] = (d, run.logs, dict(calls))
    assert results["dense"][2] == {"reference": steps, "dense": 0, "sparse": 0}
    assert results["sparse"][2] == {"reference": 0, "dense": 0, "sparse": steps}
    switched = results["switched"][2]
    assert switched["reference"] == 0 and switched["dense"] > 0 and switched["sparse"] > 0
    ref, ref_logs, _ = results["dense"]
    assert ref_logs[-1]["relu-48/fvu"] < 0.5 and ref_logs[-1]["relu-48/l0"] < D_SAE / 4
    for name in ("sparse", "switched"):
        d, logs, _ = results[name]
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(d.state_dict()[key], value, rtol=0, atol=1e-8, msg=key)
        assert len(logs) == len(ref_logs) == steps // 10
        for log, ref_log in zip(logs, ref_logs, strict=True):
            assert log.keys() == ref_log.keys()
            for key in log:
                if key.endswith(("tokens_per_s",)):
                    continue
                assert log[key] == pytest.approx(ref_log[key], rel=1e-9, abs=1e-12), key


def test_config_fields_round_trip_and_old_files_load():
    config = SkipTranscoder(ReLU(64, use_sparse_kernels=False, sparse_max_density=0.03))
    assert config_from_dict(config.to_dict()) == config
    old = ReLU(64).to_dict()
    del old["use_sparse_kernels"], old["sparse_max_density"]
    loaded = config_from_dict(old)
    assert loaded == ReLU(64) and loaded.use_sparse_kernels and loaded.sparse_max_density == 0.05


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"use_sparse_kernels": "yes"}, "use_sparse_kernels must be True or False, got 'yes'"),
        ({"sparse_max_density": -0.1}, "sparse_max_density must be a number >= 0, got -0.1"),
        ({"sparse_max_density": 1.5}, "sparse_max_density must be a fraction in [0, 1], got 1.5"),
        ({"sparse_max_density": True}, "sparse_max_density must be a number >= 0, got True"),
    ],
)
def test_bad_sparse_fields_are_rejected(fields, message):
    with pytest.raises(InterplabError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ReLU(8, **fields)
