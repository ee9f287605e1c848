"""Language-model trainer: schedule, batch order, model variants, determinism, resume,
divergence handling, HF-loadable output and config errors. Tiny models only."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from interplab.errors import InterplabError
from interplab.models.train_lm import LMConfig, TrainLMConfig, build_lm, lm_loss, train_lm
from interplab.models.training.architectures import NO_NORM_WEIGHT, architecture_of
from interplab.models.training.checkpoints import list_checkpoints
from interplab.models.training.data import BatchOrder, TokenWindows
from interplab.models.training.schedule import lr_at, make_optimizer
from tests.conftest import make_tokenizer

VOCAB = 50
N_CTX = 16


def tiny_model(**overrides) -> LMConfig:
    return LMConfig(
        **{
            "n_layers": 2,
            "d_model": 32,
            "n_heads": 4,
            "n_ctx": N_CTX,
            "vocab_size": VOCAB,
            **overrides,
        }
    )


def tiny_train(**overrides) -> TrainLMConfig:
    defaults = dict(
        steps=8,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        eval_every=4,
        eval_batches=2,
        log_every=2,
        checkpoint_every=4,
        n_threads=1,
        progress=False,
    )
    return TrainLMConfig(**{**defaults, **overrides})


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (40 * N_CTX,), generator=generator)


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out_dir / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class FakeRun:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def log(self, step: int, **metrics: float) -> None:
        self.records.append({"step": step, **metrics})


# --------------------------------------------------------------------------- schedule, order


def test_lr_schedule_matches_closed_form():
    config = TrainLMConfig(steps=101, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    # Cosine from 1.0 at step 10 to 0.1 at step 100; midpoint (step 55) is halfway.
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(55, config) == pytest.approx(0.55)
    assert lr_at(100, config) == pytest.approx(0.1)
    step = 30
    expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))
    assert lr_at(step, config) == pytest.approx(expected)


def test_batch_order_is_a_permutation_per_epoch_and_a_function_of_the_step():
    order = BatchOrder(n_windows=12, batch_size=4, seed=3)
    epoch0 = torch.cat([order.indices(s) for s in range(3)])
    epoch1 = torch.cat([order.indices(s) for s in range(3, 6)])
    assert sorted(epoch0.tolist()) == list(range(12))
    assert sorted(epoch1.tolist()) == list(range(12))
    assert not torch.equal(epoch0, epoch1)
    # A fresh sampler asked for step 4 alone (as after a resume) gives the same batch.
    assert torch.equal(BatchOrder(12, 4, seed=3).indices(4), order.indices(4))
    assert not torch.equal(BatchOrder(12, 4, seed=4).indices(0), order.indices(0))
    # A batch straddling an epoch boundary (batch 5 does not divide 12 windows).
    straddle = BatchOrder(12, 5, seed=3)
    samples = torch.cat([straddle.indices(s) for s in range(3)])  # 15 samples
    assert torch.equal(samples[:12], straddle.permutation(0))
    assert torch.equal(samples[12:], straddle.permutation(1)[:3])


def test_token_windows_pack_streams_and_memmaps(tmp_path, stream):
    windows = TokenWindows(stream[: 3 * N_CTX + 5], N_CTX, VOCAB)
    assert (windows.n_windows, windows.width) == (3, N_CTX)
    assert torch.equal(windows.get(torch.tensor([2])), stream[2 * N_CTX : 3 * N_CTX][None])
    path = tmp_path / "tokens.bin"
    stream.numpy().astype(np.uint16).tofile(path)
    memmap = np.memmap(path, dtype=np.uint16, mode="r")
    from_disk = TokenWindows(memmap, N_CTX, VOCAB)
    index = torch.tensor([5, 0, 7])
    assert torch.equal(from_disk.get(index), stream.view(-1, N_CTX)[index])
    assert from_disk.get(index).dtype == torch.int64


# --------------------------------------------------------------------------- model variants


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_build_lm_is_seeded_and_has_the_requested_shape(architecture):
    config = tiny_model(architecture=architecture, d_mlp=48)
    a, b, c = build_lm(config, seed=1), build_lm(config, seed=1), build_lm(config, seed=2)
    assert_same_weights(a.state_dict(), b.state_dict())
    assert not torch.equal(a.get_input_embeddings().weight, c.get_input_embeddings().weight)
    assert a.get_input_embeddings().weight.shape == (VOCAB, 32)
    assert a.get_output_embeddings().weight is not a.get_input_embeddings().weight
    tied = build_lm(tiny_model(architecture=architecture, tie_embeddings=True))
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    arch = architecture_of(config)
    widths = {p.shape[0] for p in arch.mlp(arch.blocks(a)[0]).parameters()}
    assert 48 in widths


def test_sinusoidal_position_init_is_a_scaled_vaswani_table():
    config = LMConfig(n_ctx=32, d_model=16, n_heads=2, vocab_size=50, position_init="sinusoidal")
    wpe = build_lm(config).transformer.wpe.weight.detach().double()
    assert wpe.std().item() == pytest.approx(config.init_std, rel=1e-4)
    p, i = 5, 3  # closed form: entry (p, 2i) = sin(p / 10000^(2i/d)) times the common scale
    scale = wpe[0, 1].item()  # cos(0) = 1
    assert wpe[p, 2 * i].item() == pytest.approx(scale * math.sin(p / 10000 ** (2 * i / 16)))
    # a shift by one position is the same linear map everywhere: pos[t+1] = pos[t] @ R
    R = torch.linalg.lstsq(wpe[:-1], wpe[1:]).solution
    assert torch.allclose(wpe[:-1] @ R, wpe[1:], atol=1e-6 * scale)
    with pytest.raises(InterplabError, match="sinusoidal"):
        LMConfig(architecture="llama", position_init="sinusoidal")
    with pytest.raises(InterplabError, match="position_init"):
        LMConfig(position_init="fourier")


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_attn_only_model_adds_exactly_zero_from_its_mlps(architecture):
    config = tiny_model(architecture=architecture, attn_only=True)
    model = build_lm(config)
    arch = architecture_of(config)
    outputs = []
    for block in arch.blocks(model):
        arch.mlp(block).register_forward_hook(lambda m, i, o: outputs.append(o))
        assert not any(p.requires_grad for p in arch.mlp(block).parameters())
    tokens = torch.randint(0, VOCAB, (2, N_CTX))
    lm_loss(model, tokens).backward()
    assert len(outputs) == config.n_layers
    assert all(torch.equal(o, torch.zeros_like(o)) for o in outputs)
    optimizer = make_optimizer(model, tiny_train())
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in arch.mlp(arch.blocks(model)[0]).parameters())
    assert model.config.interplab_attn_only is True


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_model_without_layer_norm_has_linear_norms(architecture):
    config = tiny_model(architecture=architecture, layer_norm=False)
    model = build_lm(config)
    norms = architecture_of(config).norms(model)
    assert len(norms) == 2 * config.n_layers + 1
    x = 30.0 * torch.randn(3, 5, 32)  # variance ~900, far from the unit scale a norm gives
    # GPT-2's LayerNorm keeps only its mean-centring; Llama's RMSNorm becomes the identity.
    expected = x - x.mean(-1, keepdim=True) if architecture == "gpt2" else x
    for norm in norms:
        assert not any(p.requires_grad for p in norm.parameters())
        assert norm.weight.eq(NO_NORM_WEIGHT).all()
        torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-5)
    assert model.config.interplab_layer_norm is False


# --------------------------------------------------------------------------- training runs


def test_training_is_deterministic_and_resume_reproduces_the_uninterrupted_run(tmp_path, stream):
    model_config, train_config = tiny_model(), tiny_train()
    evals = stream[: 8 * N_CTX]
    first = train_lm(model_config, train_config, stream, evals, tmp_path / "a")
    again = train_lm(model_config, train_config, stream, evals, tmp_path / "b")
    reference = final_weights(first.out_dir)
    assert_same_weights(reference, final_weights(again.out_dir))
    assert first.final_train_loss == again.final_train_loss

    class Killed(Exception):
        pass

    def kill_at_7(step, model, metrics):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        train_lm(model_config, train_config, stream, evals, tmp_path / "c", on_step=kill_at_7)
    assert [s for s, _ in list_checkpoints(tmp_path / "c")] == [4]
    resumed = train_lm(model_config, train_config, stream, evals, tmp_path / "c")
    assert resumed.resumed_from == 4
    assert_same_weights(reference, final_weights(resumed.out_dir))
    assert resumed.final_train_loss == first.final_train_loss
    assert resumed.final_eval_loss == first.final_eval_loss
    assert (resumed.steps, resumed.tokens) == (8, 8 * 4 * N_CTX)
    # Only the newest two checkpoints are kept.
    assert [s for s, _ in list_checkpoints(tmp_path / "c")] == [4, 8]


def test_packed_stream_memmap_and_windows_train_identically(tmp_path, stream):
    path = tmp_path / "tokens.bin"
    stream.numpy().astype(np.uint16).tofile(path)
    memmap = np.memmap(path, dtype=np.uint16, mode="r")
    config, train_config = tiny_model(), tiny_train(steps=4, checkpoint_every=None)
    a = train_lm(config, train_config, stream.view(-1, N_CTX), None, tmp_path / "windows")
    b = train_lm(config, train_config, memmap, None, tmp_path / "memmap")
    assert_same_weights(final_weights(a.out_dir), final_weights(b.out_dir))
    assert a.final_eval_loss is None


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, stream):
    def poison_after_5(step, model, metrics):
        if step == 5:
            with torch.no_grad():
                model.get_input_embeddings().weight[:] = float("nan")

    train_config = tiny_train(checkpoint_every=2)
    with pytest.raises(InterplabError, match=r"diverged at step 6.*step-000004 \(step 4\)"):
        train_lm(tiny_model(), train_config, stream, None, tmp_path, on_step=poison_after_5)
    kept = list_checkpoints(tmp_path)
    assert [s for s, _ in kept] == [2, 4]
    from safetensors.torch import load_file

    weights = load_file(kept[-1][1] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "model.safetensors").exists()


def test_huge_learning_rate_is_caught_as_divergence(tmp_path, stream):
    train_config = tiny_train(lr=1e30, warmup_steps=0, grad_clip=None, checkpoint_every=1)
    with pytest.raises(InterplabError, match="diverged at step"):
        train_lm(tiny_model(), train_config, stream, None, tmp_path)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_output_folder_loads_with_from_pretrained(tmp_path, stream, architecture):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = make_tokenizer([f"w{i}" for i in range(VOCAB - 2)])
    config = tiny_model(architecture=architecture, attn_only=architecture == "llama")
    run = FakeRun()
    result = train_lm(
        config,
        tiny_train(),
        stream,
        stream[: 8 * N_CTX],
        tmp_path,
        tokenizer=tokenizer,
        run=run,
        card_extra={"corpus": {"id": "test", "sha256": "abc"}},
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (
        type(loaded).__name__
        == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[architecture]
    )
    # The saved model reproduces the held-out loss the trainer reported.
    evals = stream[: 8 * N_CTX].view(-1, N_CTX)
    with torch.no_grad():
        loss = float(lm_loss(loaded, evals))
    assert loss == pytest.approx(result.final_eval_loss, abs=1e-5)
    assert loaded.config.interplab_attn_only is config.attn_only
    assert AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids("w3") == 5
    assert loaded.config.bos_token_id == tokenizer.bos_token_id == 0

    card = json.loads((tmp_path / "card.json").read_text())
    assert card["steps"] == 8 and card["tokens_seen"] == 8 * 4 * N_CTX
    assert card["final_train_loss"] == result.final_train_loss
    assert card["corpus"] == {"id": "test", "sha256": "abc"}
    assert card["architecture"] == architecture and card["n_layers"] == 2
    assert card["n_params"] == sum(p.numel() for p in loaded.parameters())
    # The logged train loss of the last window is the mean of its two step losses, and
    # the card reports it.
    train_logs = [r for r in run.records if "train_loss" in r]
    assert [r["step"] for r in train_logs] == [2, 4, 6, 8]
    assert [r["step"] for r in run.records if "eval_loss" in r] == [4, 8]
    assert train_logs[-1]["train_loss"] == result.final_train_loss


def test_loss_falls_far_below_chance_on_a_repeating_stream(tmp_path):
    generator = torch.Generator().manual_seed(1)
    period = torch.randperm(VOCAB, generator=generator)[:10]
    pattern = period.repeat(64)
    train_config = tiny_train(
        steps=60, batch_size=8, lr=1e-2, warmup_steps=5, checkpoint_every=None
    )
    losses = []
    result = train_lm(
        tiny_model(),
        train_config,
        pattern,
        pattern[: 4 * N_CTX],
        tmp_path,
        on_step=lambda step, model, metrics: losses.append(metrics["train_loss"]),
    )
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.3)  # chance at initialisation
    assert result.final_train_loss < 0.1 * math.log(VOCAB)
    assert result.final_eval_loss < 0.1 * math.log(VOCAB)


def test_resume_refuses_a_different_run_and_resume_false_starts_over(tmp_path, stream):
    train_lm(tiny_model(), tiny_train(steps=4), stream, None, tmp_path)
    with pytest.raises(InterplabError, match=r"cannot resume.*train_config.lr"):
        train_lm(tiny_model(), tiny_train(steps=4, lr=1e-3), stream, None, tmp_path)
    with pytest.raises(InterplabError, match=r"cannot resume.*train_tokens differ"):
        train_lm(tiny_model(), tiny_train(steps=4), stream.flip(0), None, tmp_path)
    # Cadence and device settings may change between sessions.
    done = train_lm(tiny_model(), tiny_train(steps=4, log_every=1), stream, None, tmp_path)
    assert done.resumed_from == 4
    fresh = train_lm(
        tiny_model(), tiny_train(steps=4, lr=1e-3), stream, None, tmp_path, resume=False
    )
    assert fresh.resumed_from is None


def test_bf16_autocast_on_cpu_trains_close_to_float32(tmp_path, stream):
    losses: dict[str, list[float]] = {"off": [], "bf16": []}
    for mode in losses:
        train_lm(
            tiny_model(),
            tiny_train(steps=4, checkpoint_every=None, autocast=mode),
            stream,
            None,
            tmp_path / mode,
            on_step=lambda step, model, metrics, mode=mode: losses[mode].append(
                metrics["train_loss"]
            ),
        )
    # bf16 matmuls change the numbers (so the setting is applied) but not the training.
    assert losses["bf16"] != losses["off"]
    assert losses["bf16"] == pytest.approx(losses["off"], abs=0.05)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"architecture": "gpt3"}, "unknown architecture 'gpt3'"),
        ({"d_model": 30, "n_heads": 4}, "d_model=30 must be divisible by n_heads=4"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"vocab_size": 1}, "vocab_size must be an integer >= 2"),
        ({"d_mlp": -4}, "d_mlp must be a positive integer"),
        ({"positional": "rotary"}, "positional='rotary' is not available for architecture='gpt2'"),
        (
            {"architecture": "llama", "positional": "learned"},
            "not available for architecture='llama'",
        ),
        ({"positional": "alibi"}, "unknown positional encoding 'alibi'"),
        (
            {"architecture": "llama", "d_model": 36, "n_heads": 4},
            "rotary positions need an even d_head",
        ),
        ({"layer_norm": "yes"}, "layer_norm must be True or False"),
        ({"init_std": 0.0}, "init_std must be a finite number"),
    ],
)
def test_lm_config_errors(overrides, message):
    with pytest.raises(InterplabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_model(**overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"steps": 10, "warmup_steps": 10}, "warmup_steps=10 must be smaller than steps=10"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer"),
        ({"lr": 0.0}, "lr must be a finite number"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"weight_decay": -0.1}, "weight_decay must be a finite number"),
        ({"betas": (0.9,)}, "betas must be a pair"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\] must be a finite number"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio must be a finite number"),
        ({"grad_clip": 0.0}, "grad_clip must be a finite number"),
        ({"eval_every": 0}, "eval_every must be a positive integer"),
        ({"checkpoint_every": -5}, "checkpoint_every must be a positive integer"),
        ({"keep_checkpoints": 0}, "keep_checkpoints must be a positive integer"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"device": "gpu"}, "device='gpu' is not a torch device"),
        ({"progress": 1}, "progress must be True or False"),
        ({"autocast": "fp16"}, "unknown autocast mode 'fp16'"),
    ],
)
def test_train_config_errors(overrides, message):
    with pytest.raises(InterplabError, match=message):
        tiny_train(**overrides)


def test_train_lm_argument_errors(tmp_path, stream):
    config, train_config = tiny_model(), tiny_train()
    cases = [
        (dict(train_tokens=stream.float()), "train_tokens must hold integer token ids"),
        (
            dict(train_tokens=stream + VOCAB),
            f"token id {VOCAB + 0}|expected ids in \\[0, vocab_size=50\\)",
        ),
        (dict(train_tokens=stream[:5]), "shorter than one window of n_ctx=16"),
        (dict(train_tokens=stream[: 4 * 32].view(4, 32)), "windows of 32 tokens"),
        (dict(train_tokens=[1, 2, 3]), "must be a torch tensor, numpy array or numpy memmap"),
        (dict(eval_tokens=stream.view(1, 1, -1)), "eval_tokens must be 1-D"),
        (
            dict(tokenizer=make_tokenizer()),
            "tokenizer has 100 tokens but LMConfig.vocab_size is 50",
        ),
        (dict(run=object()), "run must have a log"),
        (dict(card_extra={"steps": 3}), r"card_extra keys \['steps'\] clash"),
        (dict(card_extra={"x": object()}), "card_extra must be JSON-serialisable"),
        (dict(train_config=object()), "train_config must be a TrainLMConfig"),
    ]
    for overrides, message in cases:
        arguments = dict(
            model_config=config,
            train_config=train_config,
            train_tokens=stream,
            eval_tokens=None,
            out_dir=tmp_path,
        )
        with pytest.raises(InterplabError, match=message):
            train_lm(**{**arguments, **overrides})
    assert not (tmp_path / "checkpoints").exists()
