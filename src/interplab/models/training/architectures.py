"""`LMConfig` -> a randomly initialised HuggingFace causal LM: the one place that knows
how GPT-2 and Llama lay out their configs, blocks, MLPs and norms.

Every model is an ordinary `GPT2LMHeadModel` / `LlamaForCausalLM`, so organisms load with
`transformers.AutoModelForCausalLM.from_pretrained(dir)` and TransformerLens's
`TransformerBridge` wraps them with exact HF numerics. The two variants HF has no switch
for are built from ordinary modules with fixed weights:

- attention-only: each MLP has width 1 and all-zero weights and biases, frozen during
  training, so it adds exactly 0 to the residual stream (a GELU/SwiGLU of zeros times a
  zero matrix plus a zero bias). The norm in front of it is frozen too.
- no normalisation: each norm keeps its HF module but gets epsilon = 2**48 and a frozen
  weight of 2**24 = sqrt(epsilon) (bias 0). Then
  RMSNorm(x) = x * 2**24 / sqrt(mean(x^2) + 2**48) = x and
  LayerNorm(x) = (x - mean(x)) * 2**24 / sqrt(var(x) + 2**48) = x - mean(x)
  to float32 rounding whenever the variance is below 2**24 (residual variances of these
  models are orders of magnitude smaller), because 2**48 + var rounds to 2**48. The GPT-2
  variant keeps LayerNorm's mean-centring, a fixed linear projection that can be folded
  into the next weight matrix; this is the same form as the LayerNorm-free GPT-2 of
  Heimersheim (2024, "You can remove GPT2's LayerNorm by fine-tuning"), which is
  published for HF in the same large-epsilon way.

The TransformerLens-native models (`TransformerBridge.boot_native`) do support
`attn_only=True` and `normalization_type=None` directly, but they have no save format that
HF can load; keeping one HF format for every organism keeps one loading path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interplab.models.training.config import LMConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NO_NORM_EPS = 2.0**48
"""Epsilon of a norm that has been turned off (see the module docstring)."""
NO_NORM_WEIGHT = 2.0**24
"""Weight of a norm that has been turned off: sqrt(NO_NORM_EPS), a power of two so the
division is exact."""


class _Architecture:
    """What the shared code needs to know about one HF family."""

    name: str
    eps_key: str
    """Name of the norm epsilon in the HF config."""

    def hf_config(self, config: LMConfig, d_mlp: int, eps: float) -> Any:
        raise NotImplementedError

    def blocks(self, model: PreTrainedModel) -> list[nn.Module]:
        raise NotImplementedError

    def mlp(self, block: nn.Module) -> nn.Module:
        raise NotImplementedError

    def pre_attn_norm(self, block: nn.Module) -> nn.Module:
        raise NotImplementedError

    def pre_mlp_norm(self, block: nn.Module) -> nn.Module:
        raise NotImplementedError

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        raise NotImplementedError

    def norm_scale(
        self, norm: nn.Module, x: Float[Tensor, "*batch d_model"]
    ) -> Float[Tensor, " *batch"]:
        """The per-token denominator the norm divides by on input `x`."""
        raise NotImplementedError

    def set_norm_eps(self, norm: nn.Module, eps: float) -> None:
        raise NotImplementedError

    def norms(self, model: PreTrainedModel) -> list[nn.Module]:
        """Every norm: (attention, MLP) of each block in order, then the final one."""
        blocks = self.blocks(model)
        pairs = [m for b in blocks for m in (self.pre_attn_norm(b), self.pre_mlp_norm(b))]
        return [*pairs, self.final_norm(model)]


class _GPT2(_Architecture):
    name = "gpt2"
    eps_key = "layer_norm_epsilon"

    def hf_config(self, config: LMConfig, d_mlp: int, eps: float) -> Any:
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.n_ctx,
            n_embd=config.d_model,
            n_layer=config.n_layers,
            n_head=config.n_heads,
            n_inner=d_mlp,
            # GPT-2's tanh-approximated GELU ("gelu_new") as one fused kernel: the same
            # function to float rounding, ~4x faster than HF's composed version on CPU.
            activation_function="gelu_pytorch_tanh",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=eps,
            initializer_range=config.init_std,
            tie_word_embeddings=config.tie_embeddings,
            bos_token_id=None,
            eos_token_id=None,
        )

    def blocks(self, model: PreTrainedModel) -> list[nn.Module]:
        return list(model.transformer.h)

    def mlp(self, block: nn.Module) -> nn.Module:
        return block.mlp

    def pre_attn_norm(self, block: nn.Module) -> nn.Module:
        return block.ln_1

    def pre_mlp_norm(self, block: nn.Module) -> nn.Module:
        return block.ln_2

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        return model.transformer.ln_f

    def norm_scale(self, norm: nn.Module, x: Tensor) -> Tensor:
        return (x.float().var(-1, unbiased=False) + norm.eps).sqrt()

    def set_norm_eps(self, norm: nn.Module, eps: float) -> None:
        norm.eps = eps


class _Llama(_Architecture):
    name = "llama"
    eps_key = "rms_norm_eps"

    def hf_config(self, config: LMConfig, d_mlp: int, eps: float) -> Any:
        import inspect

        from transformers import LlamaConfig

        rope: dict[str, Any]
        if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
            rope = {"rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base}}
        else:  # transformers 4.x
            rope = {"rope_theta": config.rotary_base}
        return LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.d_model,
            intermediate_size=d_mlp,
            num_hidden_layers=config.n_layers,
            num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_heads,
            max_position_embeddings=config.n_ctx,
            rms_norm_eps=eps,
            initializer_range=config.init_std,
            tie_word_embeddings=config.tie_embeddings,
            attention_dropout=0.0,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
            bos_token_id=None,
            eos_token_id=None,
            **rope,
        )

    def blocks(self, model: PreTrainedModel) -> list[nn.Module]:
        return list(model.model.layers)

    def mlp(self, block: nn.Module) -> nn.Module:
        return block.mlp

    def pre_attn_norm(self, block: nn.Module) -> nn.Module:
        return block.input_layernorm

    def pre_mlp_norm(self, block: nn.Module) -> nn.Module:
        return block.post_attention_layernorm

    def final_norm(self, model: PreTrainedModel) -> nn.Module:
        return model.model.norm

    def norm_scale(self, norm: nn.Module, x: Tensor) -> Tensor:
        return (x.float().pow(2).mean(-1) + norm.variance_epsilon).sqrt()

    def set_norm_eps(self, norm: nn.Module, eps: float) -> None:
        norm.variance_epsilon = eps


_ARCHITECTURES: dict[str, _Architecture] = {"gpt2": _GPT2(), "llama": _Llama()}


def architecture_of(config: LMConfig) -> _Architecture:
    """The adapter for `config.architecture` (validated by LMConfig)."""
    return _ARCHITECTURES[config.architecture]


def _freeze(module: nn.Module, *, weight: float | None) -> None:
    """Set a module's weights to constants (weight=`weight` for norms, 0 otherwise) and
    exclude them from training."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if weight is not None and name == "weight":
                param.fill_(weight)
            else:
                param.zero_()
            param.requires_grad_(False)


def build_lm(
    config: LMConfig, seed: int = 0, *, attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    """A randomly initialised HF causal LM of shape `config` (GPT2LMHeadModel or
    LlamaForCausalLM), initialised from `seed` without touching the global torch RNG.

    Attention-only and LayerNorm-free models are ordinary HF models with some weights
    fixed and `requires_grad=False` (see the module docstring); `config.json` records them
    as `interplab_attn_only` and `interplab_layer_norm`. `attn_implementation` is HF's
    ("sdpa" trains fastest; "eager" exposes attention patterns).
    """
    from transformers import AutoModelForCausalLM

    arch = architecture_of(config)
    assert config.d_mlp is not None  # resolved by LMConfig
    # An attention-only block keeps a width-1 MLP of zeros: HF has no MLP-free block.
    d_mlp = 1 if config.attn_only else config.d_mlp
    eps = config.layer_norm_eps if config.layer_norm else NO_NORM_EPS
    hf_config = arch.hf_config(config, d_mlp, eps)
    hf_config.interplab_attn_only = config.attn_only
    hf_config.interplab_layer_norm = config.layer_norm
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation)
    if config.position_init == "sinusoidal":
        with torch.no_grad():
            table = sinusoidal_positions(config.n_ctx, config.d_model)
            model.transformer.wpe.weight.copy_(
                table * (config.init_std / table.std())
            )  # GPT-2 only
    if config.attn_only:
        for block in arch.blocks(model):
            _freeze(arch.mlp(block), weight=None)
            # The norm before a zero MLP has no effect on the output; freeze it so no
            # optimizer state or weight decay is spent on it.
            _freeze(arch.pre_mlp_norm(block), weight=1.0 if config.layer_norm else NO_NORM_WEIGHT)
    if not config.layer_norm:
        for norm in arch.norms(model):
            _freeze(norm, weight=NO_NORM_WEIGHT)
    return model


def sinusoidal_positions(n_ctx: int, d_model: int) -> Tensor:
    """[n_ctx, d_model] table of Vaswani et al. 2017: entry (p, 2i) = sin(p / 10000^(2i/d)),
    (p, 2i+1) = cos(p / 10000^(2i/d))."""
    position = torch.arange(n_ctx, dtype=torch.float64)[:, None]
    rate = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(n_ctx, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)[:, : d_model // 2]
    return table.float()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all stored parameters, trainable parameters), tied tensors counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for param in model.parameters():  # parameters() already yields a shared tensor once
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return total, trainable
