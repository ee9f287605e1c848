"""Typed configs of the language-model trainer: the model (`LMConfig`) and the run (`TrainLMConfig`).

Both are validated on construction, so a bad value fails before any model is built or any
token is read, with an `InterplabError` that names the field, the value and what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from interplab.errors import InterplabError, unknown

ARCHITECTURES = ("gpt2", "llama")
POSITIONAL_OF_ARCHITECTURE = {"gpt2": "learned", "llama": "rotary"}

# Fields of TrainLMConfig that change which weights a run produces. A run resumed from a
# checkpoint must agree with the checkpoint on these; the others (device, logging, eval and
# checkpoint cadence, threads, progress bar) may change between the two halves of a run.
TRAJECTORY_FIELDS = (
    "steps",
    "batch_size",
    "lr",
    "weight_decay",
    "betas",
    "adam_eps",
    "warmup_steps",
    "min_lr_ratio",
    "grad_clip",
    "seed",
    "data_seed",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(owner: str, name: str, value: Any, *, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InterplabError(f"{owner}.{name} must be {expected}, got {value!r}.")


def _check_optional_int(owner: str, name: str, value: Any, *, minimum: int) -> None:
    if value is not None:
        _check_int(owner, name, value, minimum=minimum)


def _check_float(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open or high == math.inf else "]"
        raise InterplabError(
            f"{owner}.{name} must be a finite number in {left}{low}, {high}{right}, got {value!r}."
        )


@dataclass
class LMConfig:
    """Shape of a small causal language model, built as a HuggingFace model by `build_lm`.

    Dropout is always 0: organisms are trained once, on a lot of synthetic data, and
    dropout would only make the circuits we want to find noisier.
    """

    architecture: Literal["gpt2", "llama"] = "gpt2"
    """HuggingFace family: GPT-2 (LayerNorm, GELU MLP, learned positions, biases) or
    Llama (RMSNorm, SwiGLU MLP, rotary positions, no biases)."""
    n_layers: int = 2
    """Number of transformer blocks."""
    d_model: int = 128
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads per layer; d_head = d_model // n_heads."""
    d_mlp: int | None = None
    """MLP hidden width; None = 4 * d_model. Ignored (and stored as a zero placeholder)
    when attn_only."""
    n_ctx: int = 256
    """Context length: maximum positions the model is trained on."""
    vocab_size: int = 4096
    """Rows of the embedding and unembedding; every token id must be below it."""
    attn_only: bool = False
    """Blocks without MLPs. Saved as an ordinary HF model whose MLPs have width 1 and
    all-zero frozen weights (so they add exactly 0); config.json says
    `interplab_attn_only: true`."""
    layer_norm: bool = True
    """Normalisation before attention, MLP and unembedding. False freezes every norm to a
    fixed linear map (see `build_lm`): mean-centring for GPT-2, the identity for Llama;
    config.json says `interplab_layer_norm: false`."""
    layer_norm_eps: float = 1e-5
    """Epsilon of LayerNorm (GPT-2) / RMSNorm (Llama) when layer_norm is True."""
    tie_embeddings: bool = False
    """Share the unembedding with the embedding (W_U = W_E^T). Off by default so the
    direct path W_E W_U and the two matrices can be studied separately."""
    positional: Literal["learned", "rotary"] | None = None
    """Position encoding; None = the architecture's own (learned for gpt2, rotary for
    llama). HF GPT-2 has no rotary option and HF Llama no learned one."""
    rotary_base: float = 10000.0
    """RoPE base (theta) for llama."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation (HF `initializer_range`)."""
    position_init: Literal["normal", "sinusoidal"] = "normal"
    """How learned positions start: "normal" (HF's N(0, init_std)) or "sinusoidal" (the
    table of Vaswani et al. 2017, scaled to the same per-entry std). With sinusoids a shift
    by one position is a fixed rotation of each frequency pair, so a previous-token head is a
    linear function of W_Q W_K^T from the start instead of something the positions must
    first be learned for (learned positions only)."""

    def __post_init__(self) -> None:
        owner = "LMConfig"
        if self.architecture not in ARCHITECTURES:
            raise unknown("architecture", str(self.architecture), ARCHITECTURES, show_all=True)
        for name in ("n_layers", "d_model", "n_heads", "n_ctx"):
            _check_int(owner, name, getattr(self, name), minimum=1)
        _check_int(owner, "vocab_size", self.vocab_size, minimum=2)
        if self.d_model % self.n_heads:
            raise InterplabError(
                f"LMConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                "(d_head = d_model // n_heads)."
            )
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        _check_int(owner, "d_mlp", self.d_mlp, minimum=1)
        for name in ("attn_only", "layer_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise InterplabError(
                    f"LMConfig.{name} must be True or False, got {getattr(self, name)!r}."
                )
        _check_float(owner, "layer_norm_eps", self.layer_norm_eps, low=0.0, low_open=True)
        _check_float(owner, "rotary_base", self.rotary_base, low=1.0, low_open=True)
        _check_float(owner, "init_std", self.init_std, low=0.0, low_open=True)
        native = POSITIONAL_OF_ARCHITECTURE[self.architecture]
        if self.positional is None:
            self.positional = native  # type: ignore[assignment]
        elif self.positional not in ("learned", "rotary"):
            raise unknown(
                "positional encoding", str(self.positional), ("learned", "rotary"), show_all=True
            )
        elif self.positional != native:
            raise InterplabError(
                f"LMConfig.positional={self.positional!r} is not available for "
                f"architecture={self.architecture!r}: HF {self.architecture} uses {native!r} "
                f"positions. Use architecture={'llama' if native == 'learned' else 'gpt2'!r} "
                f"for {self.positional} positions."
            )
        if self.position_init not in ("normal", "sinusoidal"):
            raise unknown(
                "position_init", str(self.position_init), ("normal", "sinusoidal"), show_all=True
            )
        if self.position_init == "sinusoidal" and self.positional != "learned":
            raise InterplabError(
                "LMConfig.position_init='sinusoidal' initialises learned positions; "
                f"positional={self.positional!r} has none."
            )
        if self.positional == "rotary" and self.d_head % 2:
            raise InterplabError(
                f"LMConfig: rotary positions need an even d_head, got d_head={self.d_head} "
                f"(d_model={self.d_model}, n_heads={self.n_heads})."
            )

    @property
    def d_head(self) -> int:
        """Width of each attention head."""
        return self.d_model // self.n_heads


@dataclass
class TrainLMConfig:
    """How to train an `LMConfig` model: AdamW with linear warmup and cosine decay.

    The learning rate rises linearly from lr / warmup_steps to lr over `warmup_steps`,
    then follows a cosine from lr down to lr * min_lr_ratio at the last step
    (the schedule of Loshchilov & Hutter 2017 without restarts, as in GPT-3 / nanoGPT).
    """

    steps: int = 1000
    """Optimizer steps in the whole run (the schedule depends on it)."""
    batch_size: int = 32
    """Windows of n_ctx tokens per step."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (embeddings included); never on biases or norms."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Steps of linear warmup; must be smaller than steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr, reached at the last step."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; None = no clipping."""
    eval_every: int | None = 200
    """Held-out evaluation every this many steps (and always at the end); None = end only."""
    eval_batches: int = 8
    """Batches of held-out windows per evaluation (always the same windows)."""
    log_every: int = 10
    """Steps per logged training-loss window (mean loss, lr, tokens/s)."""
    checkpoint_every: int | None = 500
    """Checkpoint every this many steps (and always at the end); None = end only."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept in out_dir/checkpoints."""
    seed: int = 0
    """Seed of the initialisation (and of the batch order unless data_seed is set)."""
    data_seed: int | None = None
    """Seed of the batch order; None = seed."""
    device: str = "cpu"
    """Torch device to train on ("cpu", "cuda", "cuda:1", ...), or "auto" (CUDA if present)."""
    autocast: Literal["auto", "bf16", "off"] = "auto"
    """Mixed precision (float32 weights and optimizer, bf16 matmuls): "auto" = bf16 on
    CUDA and float32 on CPU; "bf16" = also on CPU (fast on CPUs with AMX / AVX512-BF16);
    "off" = float32 everywhere. Bit-identical resumes need the same device and setting."""
    n_threads: int | None = None
    """CPU threads for torch during training; None = every CPU this process may use."""
    deterministic: bool = True
    """Use torch's deterministic algorithms while training (bit-identical reruns on CPU)."""
    progress: bool = True
    """Show a tqdm progress bar with loss, lr and tokens/s."""

    def __post_init__(self) -> None:
        owner = "TrainLMConfig"
        for name in ("steps", "batch_size", "eval_batches", "log_every", "keep_checkpoints"):
            _check_int(owner, name, getattr(self, name), minimum=1)
        for name in ("eval_every", "checkpoint_every", "n_threads"):
            _check_optional_int(owner, name, getattr(self, name), minimum=1)
        _check_int(owner, "warmup_steps", self.warmup_steps, minimum=0)
        if self.warmup_steps >= self.steps:
            raise InterplabError(
                f"TrainLMConfig.warmup_steps={self.warmup_steps} must be smaller than "
                f"steps={self.steps}."
            )
        _check_int(owner, "seed", self.seed, minimum=0)
        _check_optional_int(owner, "data_seed", self.data_seed, minimum=0)
        _check_float(owner, "lr", self.lr, low=0.0, low_open=True)
        _check_float(owner, "weight_decay", self.weight_decay, low=0.0)
        _check_float(owner, "adam_eps", self.adam_eps, low=0.0, low_open=True)
        _check_float(owner, "min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        if self.grad_clip is not None:
            _check_float(owner, "grad_clip", self.grad_clip, low=0.0, low_open=True)
        if not isinstance(self.betas, tuple | list) or len(self.betas) != 2:
            raise InterplabError(
                f"TrainLMConfig.betas must be a pair (beta1, beta2), got {self.betas!r}."
            )
        self.betas = (self.betas[0], self.betas[1])
        for i, beta in enumerate(self.betas):
            _check_float(owner, f"betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
        if self.autocast not in ("auto", "bf16", "off"):
            raise unknown(
                "autocast mode", str(self.autocast), ("auto", "bf16", "off"), show_all=True
            )
        for name in ("deterministic", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise InterplabError(
                    f"TrainLMConfig.{name} must be True or False, got {getattr(self, name)!r}."
                )
        if not isinstance(self.device, str) or not self.device:
            raise InterplabError(
                f"TrainLMConfig.device must be a device string such as 'cpu', 'cuda' or "
                f"'auto', got {self.device!r}."
            )
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError:
                raise InterplabError(
                    f"TrainLMConfig.device={self.device!r} is not a torch device; expected "
                    "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'."
                ) from None

    @property
    def resolved_data_seed(self) -> int:
        """The seed of the batch order."""
        return self.seed if self.data_seed is None else self.data_seed
