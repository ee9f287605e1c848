"""Modular arithmetic and grokking (Power et al. 2022; Nanda et al. 2023).

A one-layer transformer learns c = (a + b) mod p (or a - b, a * b) from the three tokens
"a b =" and predicts c at the last position. Trained full batch on a fraction of all p²
pairs with AdamW and strong weight decay, it first memorises the training pairs, then,
thousands of steps later, generalises to the held-out ones: grokking. Nanda et al. 2023
("Progress measures for grokking via mechanistic interpretability") show that the model
computes the answer with a few key Fourier frequencies (see `interplab.toys.modular_fourier`).

The model is a TransformerLens-native `TransformerBridge` built by `interplab.load_model`
from a `ToyConfig` (the paper's settings: d_model 128, 4 heads of 32, d_mlp 512, ReLU, no
LayerNorm, learned positions, d_vocab p + 1 with '=' = p), so every hook name works for the
analyses. Training updates the bridge's own parameters (`model.parameters()`), but computes
the loss with `modular_logits`, a last-position-only forward over the same parameters that
equals `model(tokens)[:, -1]` in value and gradient (tested). Measured on one shared CPU core
at p = 113 (full batch of 3,830 pairs, forward + backward + AdamW), at the same moment: the
bridge's hooked forward 0.49 s per step, the bridge's `original_model` 0.30 s, and
`modular_logits` 0.12 s. The hooked forward computes all three positions through every
module and hook, while the loss only reads the last one.

Grokfast (Lee et al. 2024) gradient filters are an option (`interplab.toys.modular_grokfast`):
"ema" adds lamb times an exponential moving average of past gradients, "ma" lamb times the
mean of the last `filter_window` gradients; the paper reports a much shorter plateau.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from interplab.errors import InterplabError, unknown
from interplab.toys.modular_grokfast import DEFAULT_FILTER_LAMB, EMAGradFilter, MAGradFilter

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from interplab.runs import Run

Operation = Literal["add", "subtract", "multiply"]
GradFilter = Literal["none", "ema", "ma"]


def is_prime(n: int) -> bool:
    """Whether the integer `n` is prime (trial division; p is small here)."""
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclass
class ModularConfig:
    """Settings for training a one-layer transformer on modular arithmetic (Nanda et al. 2023)."""

    p: int = 113
    """The modulus; must be prime (the Fourier analysis over Z_p and the multiplicative
    group of multiplication both need it). The paper uses 113."""
    operation: Operation = "add"
    """c = (a + b), (a - b) or (a * b) mod p. The Fourier analysis covers add and subtract."""
    train_fraction: float = 0.3
    """Fraction of all p² pairs used for training, in (0, 1) (paper: 0.3)."""
    d_model: int = 128
    """Residual stream width (paper: 128)."""
    n_heads: int = 4
    """Attention heads; d_head = d_model // n_heads (paper: 4 heads of 32)."""
    d_mlp: int = 512
    """MLP hidden neurons (paper: 512)."""
    lr: float = 1e-3
    """AdamW learning rate (paper: 1e-3), after a linear warmup of `warmup_steps`."""
    weight_decay: float = 1.0
    """AdamW weight decay on every parameter (paper: 1.0)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas (paper: 0.9, 0.98)."""
    warmup_steps: int = 10
    """Steps of linear learning-rate warmup from lr / warmup_steps to lr (paper: 10)."""
    steps: int = 20_000
    """Full-batch optimiser steps (the paper trains 40k; at p = 113 the test accuracy
    passes 0.99 near step 8-9k with seed 0, see the grokking recipe)."""
    eval_every: int = 100
    """Evaluate train/test loss and accuracy on the full p² grid every this many steps."""
    checkpoint_every: int | None = 500
    """Keep (or, with a run, save) the model weights every this many steps; None = never."""
    seed: int = 0
    """Seed of the initial weights and of the train/test split."""
    grad_filter: GradFilter = "none"
    """Grokfast gradient filter: "none", "ema" (exponential moving average) or "ma"
    (moving average of the last `filter_window` gradients)."""
    filter_alpha: float = 0.98
    """EMA momentum of the "ema" filter, in [0, 1) (Grokfast: 0.98)."""
    filter_lamb: float | None = None
    """Amplification of the filtered gradient; None = Grokfast's 2.0 for "ema", 5.0 for "ma"."""
    filter_window: int = 100
    """Window of the "ma" filter in steps (Grokfast: 100); it starts once the window is full."""
    generalisation_threshold: float = 0.99
    """Test accuracy that counts as generalised (steps-to-generalise) and train accuracy
    that counts as memorised."""
    stop_when_generalised: bool = False
    """Stop at the first evaluation whose test accuracy reaches `generalisation_threshold`."""
    device: str = "cpu"
    """Torch device, e.g. "cpu" or "cuda"."""

    def __post_init__(self) -> None:
        for name in ("p", "d_model", "n_heads", "d_mlp", "steps", "eval_every", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InterplabError(
                    f"ModularConfig.{name} must be a positive integer, got {value!r}."
                )
        if not is_prime(self.p) or self.p < 3:
            raise InterplabError(
                f"ModularConfig.p must be an odd prime (the Fourier analysis over Z_p and the "
                f"multiplicative group need it), got {self.p}."
            )
        if self.operation not in get_args(Operation):
            raise unknown("operation", str(self.operation), get_args(Operation), show_all=True)
        if self.grad_filter not in get_args(GradFilter):
            raise unknown("grad_filter", str(self.grad_filter), get_args(GradFilter), show_all=True)
        if not (0.0 < self.train_fraction < 1.0):
            raise InterplabError(
                f"ModularConfig.train_fraction must be in (0, 1), got {self.train_fraction!r}."
            )
        n_train = round(self.train_fraction * self.p**2)
        if n_train < 1 or n_train >= self.p**2:
            raise InterplabError(
                f"train_fraction={self.train_fraction} leaves {n_train} of {self.p**2} pairs for "
                "training; expected at least one pair in each of train and test."
            )
        if self.d_model % self.n_heads:
            raise InterplabError(
                f"ModularConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}."
            )
        if self.checkpoint_every is not None and (
            isinstance(self.checkpoint_every, bool) or self.checkpoint_every <= 0
        ):
            raise InterplabError(
                f"ModularConfig.checkpoint_every must be a positive integer or None, "
                f"got {self.checkpoint_every!r}."
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InterplabError(f"ModularConfig.lr must be a positive number, got {self.lr!r}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InterplabError(
                f"ModularConfig.weight_decay must be >= 0, got {self.weight_decay!r}."
            )
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise InterplabError(
                f"ModularConfig.betas must be two numbers in [0, 1), got {self.betas!r}."
            )
        self.betas = (float(betas[0]), float(betas[1]))
        if not (0.0 <= self.filter_alpha < 1.0):
            raise InterplabError(
                f"ModularConfig.filter_alpha must be in [0, 1), got {self.filter_alpha!r}."
            )
        if self.filter_lamb is not None and not (
            math.isfinite(self.filter_lamb) and self.filter_lamb >= 0
        ):
            raise InterplabError(
                f"ModularConfig.filter_lamb must be >= 0 or None, got {self.filter_lamb!r}."
            )
        if isinstance(self.filter_window, bool) or self.filter_window <= 0:
            raise InterplabError(
                f"ModularConfig.filter_window must be a positive integer, got {self.filter_window!r}."
            )
        if not (0.0 < self.generalisation_threshold <= 1.0):
            raise InterplabError(
                f"ModularConfig.generalisation_threshold must be in (0, 1], "
                f"got {self.generalisation_threshold!r}."
            )
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise InterplabError(
                f"device {self.device!r} is not a torch device (expected e.g. 'cpu' or 'cuda')."
            ) from error

    @property
    def d_head(self) -> int:
        """Width of each attention head."""
        return self.d_model // self.n_heads

    @property
    def lamb(self) -> float:
        """The filter amplification in use (`filter_lamb`, or Grokfast's default)."""
        if self.filter_lamb is not None:
            return self.filter_lamb
        return DEFAULT_FILTER_LAMB.get(self.grad_filter, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------


class ModularData(NamedTuple):
    """The train/test split of all p² equations "a b =" -> c (tokens [n, 3], labels [n])."""

    train_tokens: Int[Tensor, "n_train 3"]
    train_labels: Int[Tensor, " n_train"]
    test_tokens: Int[Tensor, "n_test 3"]
    test_labels: Int[Tensor, " n_test"]


def apply_operation(
    a: Int[Tensor, "*batch"], b: Int[Tensor, "*batch"], p: int, operation: Operation
) -> Int[Tensor, "*batch"]:
    """c = (a op b) mod p, elementwise."""
    if operation == "add":
        return (a + b) % p
    if operation == "subtract":
        return (a - b) % p
    if operation == "multiply":
        return (a * b) % p
    raise unknown("operation", str(operation), get_args(Operation), show_all=True)


def all_pairs(
    p: int, operation: Operation = "add"
) -> tuple[Int[Tensor, "p2 3"], Int[Tensor, " p2"]]:
    """Every equation "a b =" for a, b in Z_p, row a * p + b, with its answer c.

    Tokens are a, b and '=' (token id p); the vocabulary has p + 1 tokens.
    """
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return tokens, apply_operation(a, b, p, operation)


def train_mask(config: ModularConfig) -> Tensor:
    """Boolean [p²] mask of the training pairs in the `all_pairs` order (seeded split)."""
    p2 = config.p**2
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(p2, generator=generator)
    mask = torch.zeros(p2, dtype=torch.bool)
    mask[order[: round(config.train_fraction * p2)]] = True
    return mask


def modular_dataset(config: ModularConfig) -> ModularData:
    """The deterministic train/test split for `config` (depends on p, operation, fraction, seed).

    Returns `ModularData(train_tokens [n_train, 3], train_labels [n_train], test_tokens
    [n_test, 3], test_labels [n_test])`, each set in `all_pairs` order.
    """
    tokens, labels = all_pairs(config.p, config.operation)
    mask = train_mask(config)
    return ModularData(tokens[mask], labels[mask], tokens[~mask], labels[~mask])


def modular_model(config: ModularConfig) -> Any:
    """A fresh one-layer, LayerNorm-free TransformerBridge for `config` (seeded init).

    Built with `interplab.load_model(ToyConfig(...))`: d_vocab = p + 1 tokens (a, b in
    0..p-1 and '=' = p), n_ctx = 3, ReLU MLP, learned positions, no normalisation. Unlike
    the paper's model, the native one has attention biases (zero at init, so the function
    at init is the same); its unembedding has no bias, as in the paper. Weights start from
    TransformerLens's normal init with std 0.8/sqrt(d_model) (output projections scaled by
    1/sqrt(2 n_layers)) rather than the paper's 1/sqrt(d_model)-scaled normals.
    """
    import interplab
    from interplab.models import ToyConfig

    toy = ToyConfig(
        n_layers=1,
        d_model=config.d_model,
        n_heads=config.n_heads,
        d_head=config.d_head,
        d_mlp=config.d_mlp,
        d_vocab=config.p + 1,
        n_ctx=3,
        attn_only=False,
        normalization="none",
        act_fn="relu",
        positional="standard",
        seed=config.seed,
    )
    return interplab.load_model(toy, device=config.device)


_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}

#: The bridge state-dict entries `modular_logits` reads (nn.Linear layout: weight [out, in]).
_WEIGHT_NAMES = (
    "embed.weight",
    "pos_embed.weight",
    *(f"blocks.0.attn.{m}.{t}" for m in "qkvo" for t in ("weight", "bias")),
    *(f"blocks.0.mlp.{m}.{t}" for m in ("in", "out") for t in ("weight", "bias")),
    "unembed.weight",
)


def modular_weights(model: Any) -> dict[str, Tensor]:
    """The live parameters `modular_logits` uses, by bridge state-dict name.

    `state_dict(keep_vars=True)` hands back the Parameter objects themselves, so the dict
    stays valid while an optimiser updates them in place. Raises for a model that is not a
    one-layer, normalisation-free MLP model with learned positions.
    """
    cfg = model.cfg
    if (
        cfg.n_layers != 1
        or cfg.normalization_type is not None
        or cfg.attn_only
        or cfg.positional_embedding_type != "standard"
        or str(cfg.act_fn) not in _ACTIVATIONS
        or (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) != cfg.n_heads
    ):
        raise InterplabError(
            "modular_logits needs a one-layer model without normalisation, with an MLP "
            f"({', '.join(_ACTIVATIONS)}) and learned positions; got n_layers={cfg.n_layers}, "
            f"normalization={cfg.normalization_type}, attn_only={cfg.attn_only}, "
            f"positional={cfg.positional_embedding_type}, act_fn={cfg.act_fn}."
        )
    state = model.state_dict(keep_vars=True)
    missing = [name for name in _WEIGHT_NAMES if name not in state]
    if missing:
        raise InterplabError(f"model lacks the weights {missing} that modular_logits reads.")
    weights = {name: state[name] for name in _WEIGHT_NAMES}
    weights["unembed.bias"] = state.get("unembed.bias", torch.zeros(()))
    return weights


def modular_logits(
    model: Any, tokens: Int[Tensor, "batch pos"], weights: dict[str, Tensor] | None = None
) -> Float[Tensor, "batch d_vocab"]:
    """Last-position logits of a one-layer, LayerNorm-free model, computed from its weights.

    Equals `model(tokens)[:, -1]` (tested) and is differentiable in the model's parameters,
    but computes only what the last position needs, with a few dozen tensor ops instead of
    the hooked forward's hundreds: full-batch training runs about 4x faster on CPU. Layer-0
    queries, keys and values depend only on (position, token), so they are computed once
    per vocabulary entry and gathered. Per head h: scores q_h·k_h / sqrt(d_head) (softmax
    over the 3 positions, all visible to the last one), attention output
    W_O (concat_h pattern_h v_h) + b_O, MLP W_out act(W_in x + b_in) + b_out, logits W_U x.
    `weights` (from `modular_weights`) saves looking the parameters up on every call.
    """
    cfg = model.cfg
    w = modular_weights(model) if weights is None else weights
    act = _ACTIVATIONS[str(cfg.act_fn)]
    n, s = tokens.shape
    W_E = w["embed.weight"]
    d_vocab = W_E.shape[0]
    x_table = (w["pos_embed.weight"][:s, None, :] + W_E[None]).flatten(0, 1)  # [s*d_vocab, d]
    flat = tokens + torch.arange(s, device=tokens.device) * d_vocab  # row of (pos, token)
    scale = cfg.attn_scale if cfg.use_attn_scale and cfg.attn_scale > 0 else math.sqrt(cfg.d_head)

    def table(name: str) -> Tensor:  # [s * d_vocab, n_heads * d_head]
        return F.linear(x_table, w[f"blocks.0.attn.{name}.weight"], w[f"blocks.0.attn.{name}.bias"])

    heads = (cfg.n_heads, cfg.d_head)
    k = F.embedding(flat, table("k")).view(n, s, *heads)
    v = F.embedding(flat, table("v")).view(n, s, *heads)
    q = F.embedding(flat[:, -1], table("q")).view(n, 1, *heads)
    # Broadcast products instead of batched matmuls: with 3 positions a bmm per example is
    # mostly overhead. The last query sees every position, so no causal mask is needed.
    pattern = ((q * k).sum(-1) / scale).softmax(dim=1)  # [n, s, n_heads]
    z = (pattern[..., None] * v).sum(1).flatten(1)  # [n, n_heads * d_head]
    resid = F.embedding(flat[:, -1], x_table)
    resid = resid + F.linear(z, w["blocks.0.attn.o.weight"], w["blocks.0.attn.o.bias"])
    post = act(F.linear(resid, w["blocks.0.mlp.in.weight"], w["blocks.0.mlp.in.bias"]))
    resid = resid + F.linear(post, w["blocks.0.mlp.out.weight"], w["blocks.0.mlp.out.bias"])
    return F.linear(resid, w["unembed.weight"]) + w["unembed.bias"].to(resid.device)


def grid_logits(model: Any, p: int, batch_size: int = 8192) -> Float[Tensor, "p p p"]:
    """Logits over answers c for every pair, [a, b, c] (the '=' logit dropped), no grad."""
    tokens, _ = all_pairs(p)
    weights = modular_weights(model)
    tokens = tokens.to(weights["embed.weight"].device)
    with torch.no_grad():
        parts = [modular_logits(model, chunk, weights)[:, :p] for chunk in tokens.split(batch_size)]
    return torch.cat(parts).view(p, p, p)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def make_grad_filter(config: ModularConfig) -> EMAGradFilter | MAGradFilter | None:
    """The Grokfast filter `config` asks for, or None."""
    if config.grad_filter == "ema":
        return EMAGradFilter(config.filter_alpha, config.lamb)
    if config.grad_filter == "ma":
        return MAGradFilter(config.filter_window, config.lamb)
    return None


@dataclass
class Checkpoint:
    """Model weights at one step: in memory (`state`) or in a safetensors file (`path`)."""

    step: int
    """Optimiser steps taken before these weights."""
    state: dict[str, Tensor] | None = None
    """The bridge's state dict (CPU tensors), when kept in memory."""
    path: Path | None = None
    """The safetensors file, when saved into a run folder."""

    def state_dict(self) -> dict[str, Tensor]:
        """The weights, loading the file if they are not in memory."""
        if self.state is not None:
            return self.state
        from safetensors.torch import load_file

        return load_file(str(self.path))


@dataclass
class ModularResult:
    """A trained modular-arithmetic model with its curves, checkpoints and grokking times."""

    config: ModularConfig
    """The config it was trained with."""
    model: Any
    """The trained TransformerBridge (eval mode)."""
    steps: list[int]
    """Steps at which the curves were evaluated (0 = initialisation)."""
    train_loss: list[float]
    """Cross-entropy on the training pairs at each evaluated step."""
    test_loss: list[float]
    """Cross-entropy on the held-out pairs."""
    train_accuracy: list[float]
    """Accuracy on the training pairs."""
    test_accuracy: list[float]
    """Accuracy on the held-out pairs."""
    checkpoints: list[Checkpoint] = field(default_factory=list)
    """Weights every `checkpoint_every` steps (and at the end)."""
    steps_to_memorise: int | None = None
    """First evaluated step with train accuracy >= the threshold (None = never)."""
    steps_to_generalise: int | None = None
    """First evaluated step with test accuracy >= the threshold (None = never)."""
    seconds: float = 0.0
    """Wall-clock training time."""
    steps_trained: int = 0
    """Optimiser steps actually taken (fewer than config.steps after an early stop)."""

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps_trained, 1)

    def summary(self) -> dict[str, Any]:
        """Final losses and accuracies, grokking steps and timing as a flat dict."""
        return {
            "steps_trained": self.steps_trained,
            "steps_to_memorise": self.steps_to_memorise,
            "steps_to_generalise": self.steps_to_generalise,
            "final_train_loss": self.train_loss[-1],
            "final_test_loss": self.test_loss[-1],
            "final_train_accuracy": self.train_accuracy[-1],
            "final_test_accuracy": self.test_accuracy[-1],
            "seconds": self.seconds,
            "seconds_per_step": self.seconds_per_step,
        }

    def to_dict(self) -> dict[str, Any]:
        """Config, curves and summary as JSON-able data (no weights)."""
        return {
            "config": self.config.to_dict(),
            "summary": self.summary(),
            "steps": self.steps,
            "train_loss": self.train_loss,
            "test_loss": self.test_loss,
            "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy,
            "checkpoint_steps": [c.step for c in self.checkpoints],
        }

    def load_checkpoint(self, index: int) -> Any:
        """A fresh bridge with the weights of `checkpoints[index]`."""
        model = modular_model(self.config)
        model.load_state_dict(self.checkpoints[index].state_dict())
        model.eval()
        return model

    def plot_curves(self) -> Figure:
        """Train/test loss (log scale) and accuracy against step, grokking steps marked."""
        import matplotlib.pyplot as plt

        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
        ax_loss.plot(self.steps, self.train_loss, label="train")
        ax_loss.plot(self.steps, self.test_loss, label="test")
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel("cross-entropy")
        ax_acc.plot(self.steps, self.train_accuracy, label="train")
        ax_acc.plot(self.steps, self.test_accuracy, label="test")
        ax_acc.set_ylabel("accuracy")
        for ax in (ax_loss, ax_acc):
            for step, name in (
                (self.steps_to_memorise, "memorised"),
                (self.steps_to_generalise, "generalised"),
            ):
                if step is not None:
                    ax.axvline(step, color="grey", linestyle=":", linewidth=1)
                    ax.text(
                        step,
                        0.98,
                        f" {name}",
                        transform=ax.get_xaxis_transform(),
                        va="top",
                        fontsize=8,
                    )
            ax.set_xlabel("step")
            ax.legend()
        c = self.config
        fig.suptitle(
            f"{c.operation} mod {c.p}, train fraction {c.train_fraction}, "
            f"grad filter {c.grad_filter}"
        )
        fig.tight_layout()
        return fig


def _evaluate(
    model: Any, weights: dict[str, Tensor], tokens: Tensor, labels: Tensor, mask: Tensor, p: int
) -> tuple[float, float, float, float]:
    with torch.no_grad():
        logits = modular_logits(model, tokens, weights)[:, :p]
        losses = F.cross_entropy(logits, labels, reduction="none")
        correct = (logits.argmax(-1) == labels).float()
    return (
        losses[mask].mean().item(),
        losses[~mask].mean().item(),
        correct[mask].mean().item(),
        correct[~mask].mean().item(),
    )


def _checkpoint(model: Any, step: int, run: Run | None) -> Checkpoint:
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    if run is None:
        return Checkpoint(step=step, state=state)
    from safetensors.torch import save_file

    from interplab.runs import atomic_path

    path = run.path(f"checkpoints/step_{step:07d}.safetensors")
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"step": str(step)})
    return Checkpoint(step=step, path=path)


def train_modular(
    config: ModularConfig, progress: bool = True, run: Run | None = None
) -> ModularResult:
    """Train the one-layer transformer on `config`'s modular arithmetic, full batch.

    Each step: logits of the training pairs at the last position (`modular_logits`),
    cross-entropy over the p answers, backward, optional Grokfast filter on the gradients,
    AdamW step with linear warmup. Every `eval_every` steps the full p² grid is evaluated
    (train and test loss/accuracy); every `checkpoint_every` steps the weights are kept in
    memory, or written to `run.path("checkpoints/step_XXXXXXX.safetensors")` when a run is
    given (and the curves are logged with `run.log`).
    """
    model = modular_model(config)
    model.train()
    weights = modular_weights(model)
    p = config.p
    tokens, labels = all_pairs(p, config.operation)
    device = weights["embed.weight"].device
    tokens, labels = tokens.to(device), labels.to(device)
    mask = train_mask(config).to(device)
    train_tokens, train_labels = tokens[mask], labels[mask]

    params = [param for param in model.parameters() if param.requires_grad]
    # foreach: one multi-tensor kernel per update instead of one per parameter (the
    # per-op overhead dominates a small model's step on CPU).
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, foreach=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps)
    )
    grad_filter = make_grad_filter(config)
    result = ModularResult(config, model, [], [], [], [], [])
    threshold = config.generalisation_threshold

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=f"grokking {config.operation} mod {p}", unit="step")
    start = time.perf_counter()
    step = 0
    while True:
        if step % config.eval_every == 0 or step == config.steps:
            train_loss, test_loss, train_acc, test_acc = _evaluate(
                model, weights, tokens, labels, mask, p
            )
            for name, value in (
                ("steps", step),
                ("train_loss", train_loss),
                ("test_loss", test_loss),
                ("train_accuracy", train_acc),
                ("test_accuracy", test_acc),
            ):
                getattr(result, name).append(value)
            if result.steps_to_memorise is None and train_acc >= threshold:
                result.steps_to_memorise = step
            if result.steps_to_generalise is None and test_acc >= threshold:
                result.steps_to_generalise = step
            if run is not None:
                run.log(
                    step=step,
                    grad_filter=config.grad_filter,
                    train_loss=train_loss,
                    test_loss=test_loss,
                    train_accuracy=train_acc,
                    test_accuracy=test_acc,
                )
            if bar is not None:
                bar.set_postfix(train_acc=f"{train_acc:.3f}", test_acc=f"{test_acc:.3f}")
        stop = step == config.steps or (
            config.stop_when_generalised and result.steps_to_generalise is not None
        )
        if config.checkpoint_every is not None and (step % config.checkpoint_every == 0 or stop):
            result.checkpoints.append(_checkpoint(model, step, run))
        if stop:
            break
        logits = modular_logits(model, train_tokens, weights)[:, :p]
        loss = F.cross_entropy(logits, train_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_filter is not None:
            grad_filter(params)
        optimizer.step()
        scheduler.step()
        step += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    result.seconds = time.perf_counter() - start
    result.steps_trained = step
    model.eval()
    return result


def plot_filter_comparison(results: dict[str, ModularResult]) -> Figure:
    """Train (dotted) and test (solid) accuracy of several runs, steps-to-generalise marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, result) in enumerate(results.items()):
        color = f"C{i}"
        ax.plot(result.steps, result.train_accuracy, ":", color=color, label=f"{name} (train)")
        ax.plot(result.steps, result.test_accuracy, "-", color=color, label=f"{name} (test)")
        if result.steps_to_generalise is not None:
            ax.axvline(result.steps_to_generalise, color=color, linestyle="--", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_title("steps to generalise (dashed lines)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
