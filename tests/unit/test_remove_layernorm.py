"""LayerNorm removal by fine-tuning: removed norms are fixed linear maps, the result loads
with from_pretrained and still models its data, and a killed removal run resumes exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from interplab.errors import InterplabError
from interplab.models.remove_layernorm import RemoveLayerNormConfig, remove_layernorm
from interplab.models.train_lm import LMConfig, TrainLMConfig, build_lm, train_lm
from interplab.models.training.architectures import NO_NORM_EPS, architecture_of

VOCAB, N_CTX = 50, 16


def repeating_stream() -> torch.Tensor:
    period = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(1))[:10]
    return period.repeat(64)


def fine_tune(**overrides) -> TrainLMConfig:
    defaults = dict(
        steps=24,
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        eval_every=None,
        eval_batches=2,
        log_every=4,
        checkpoint_every=None,
        n_threads=1,
        progress=False,
    )
    return TrainLMConfig(**{**defaults, **overrides})


@pytest.fixture(
    scope="module", params=[("gpt2", False), ("llama", True)], ids=["gpt2", "llama-attn-only"]
)
def source(request, tmp_path_factory):
    architecture, attn_only = request.param
    config = LMConfig(
        architecture=architecture,
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_ctx=N_CTX,
        vocab_size=VOCAB,
        attn_only=attn_only,
    )
    stream = repeating_stream()
    out = tmp_path_factory.mktemp(f"source-{architecture}")
    train_lm(config, fine_tune(steps=60, lr=1e-2, warmup_steps=5), stream, stream[: 4 * N_CTX], out)
    return out, config


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_norm_scale_is_the_denominator_the_norm_divides_by(architecture):
    config = LMConfig(
        architecture=architecture, n_layers=1, d_model=32, n_heads=4, n_ctx=N_CTX, vocab_size=VOCAB
    )
    model = build_lm(config)
    arch = architecture_of(config)
    x = 5.0 * torch.randn(3, 7, 32) + 1.0
    for norm in arch.norms(model):
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        centred = x - x.mean(-1, keepdim=True) if architecture == "gpt2" else x
        bias = getattr(norm, "bias", None)
        expected = centred / arch.norm_scale(norm, x)[..., None] * norm.weight
        expected = expected + (bias if bias is not None else 0)
        torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


def test_removed_norms_are_linear_and_the_model_loads_and_still_predicts(source, tmp_path):
    from transformers import AutoModelForCausalLM

    source_dir, config = source
    stream = repeating_stream()
    result = remove_layernorm(
        source_dir,
        fine_tune(),
        stream,
        stream[: 4 * N_CTX],
        tmp_path,
        removal=RemoveLayerNormConfig(first_step=2, gap=4),
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.interplab_layer_norm is False
    arch = architecture_of(config)
    x = 3.0 * torch.randn(4, 32)
    for norm in arch.norms(loaded):
        assert (norm.eps if config.architecture == "gpt2" else norm.variance_epsilon) == NO_NORM_EPS
        bias = norm.bias if getattr(norm, "bias", None) is not None else 0.0
        # A real norm is scale-invariant (norm(2x) = norm(x)); a removed one is linear.
        torch.testing.assert_close(norm(2 * x) - bias, 2 * (norm(x) - bias), rtol=1e-5, atol=1e-6)
    card = json.loads((tmp_path / "card.json").read_text())
    n_norms = 2 * (1 if config.attn_only else 2) + 1
    assert card["layernorm_removal"]["removal_steps"] == [2 + 4 * i for i in range(n_norms)]
    assert card["layer_norm"] is False
    source_loss = json.loads((source_dir / "card.json").read_text())["final_eval_loss"]
    assert source_loss < 0.1 * math.log(VOCAB)
    # Still far below chance after every norm is gone.
    assert result.final_eval_loss < 0.2 * math.log(VOCAB)


def test_a_killed_removal_run_resumes_exactly(source, tmp_path):
    from safetensors.torch import load_file

    source_dir, _ = source
    stream = repeating_stream()
    removal = RemoveLayerNormConfig(first_step=0, gap=4)  # removals before steps 0, 4, 8, ...
    train_config = fine_tune(checkpoint_every=4)
    remove_layernorm(source_dir, train_config, stream, None, tmp_path / "a", removal=removal)

    class Killed(Exception):
        pass

    def kill_at_10(step, model, metrics):
        if step == 10:
            raise Killed

    with pytest.raises(Killed):
        remove_layernorm(
            source_dir,
            train_config,
            stream,
            None,
            tmp_path / "b",
            removal=removal,
            on_step=kill_at_10,
        )
    # Resumes from step 8: re-applies removals 0 and 4, then removes the third before step 8.
    resumed = remove_layernorm(
        source_dir, train_config, stream, None, tmp_path / "b", removal=removal
    )
    assert resumed.resumed_from == 8
    a, b = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_remove_layernorm_errors(source, tmp_path):
    source_dir, _ = source
    stream = repeating_stream()
    with pytest.raises(InterplabError, match="no card.json"):
        remove_layernorm(tmp_path, fine_tune(), stream, None, tmp_path / "out")
    with pytest.raises(InterplabError, match=r"expected steps > \d+"):
        remove_layernorm(
            source_dir,
            fine_tune(steps=10),
            stream,
            None,
            tmp_path / "out",
            removal=RemoveLayerNormConfig(gap=5),
        )
    with pytest.raises(InterplabError, match="gap must be an integer >= 0"):
        RemoveLayerNormConfig(gap=-1)
    with pytest.raises(InterplabError, match="'layernorm_removal' is written by remove_layernorm"):
        remove_layernorm(
            source_dir,
            fine_tune(),
            stream,
            None,
            tmp_path / "out",
            card_extra={"layernorm_removal": 1},
        )
    no_ln = tmp_path / "no-ln"
    config = LMConfig(
        n_layers=1, d_model=32, n_heads=4, n_ctx=N_CTX, vocab_size=VOCAB, layer_norm=False
    )
    train_lm(config, fine_tune(steps=3), stream, None, no_ln)
    with pytest.raises(InterplabError, match="has no LayerNorm to remove"):
        remove_layernorm(no_ln, fine_tune(), stream, None, tmp_path / "out")
