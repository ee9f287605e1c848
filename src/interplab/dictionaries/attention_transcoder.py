"""Attention transcoders: a wide, sparse replacement for one attention layer.

An attention layer maps its input sequence x [pos, d_model] to its output y = attn_out. An
attention transcoder reproduces that map with many more, much simpler heads than the layer
has, of which only a few are active at each position:

    x_n       = norm(x / input_scale)                         (see `input_norm`)
    A_g       = softmax_causal((x_n W_Q[g] + b_Q[g]) (x_n W_K[g] + b_K[g])^T / sqrt(d_head_qk))
    val_{h,s} = x_n[s] . W_V[:, h] + b_V[h]                   (one scalar per source: rank 1)
    z_{h,t}   = sum_s A_{g(h)}[t, s] val_{h,s}                (head h reads its group's pattern)
    f_{h,t}   = z_{h,t} if h is among the k heads of largest |z_{h,t}| ||W_O[h]|| at t, else 0
    y_hat_t   = sum_h f_{h,t} W_O[h] + b_O

* `n_qk` QK groups each own one causal attention pattern (W_Q, W_K [d_model, d_head_qk]);
  `n_heads` rank-1 OV heads (value vector `W_V[:, h]`, unit output vector `W_O[h]`) are
  split into contiguous blocks of n_heads // n_qk heads that share their group's pattern.
  A real head of rank d_head is d_head rank-1 heads on one pattern (`from_attention_layer`
  builds that exact decomposition); the transcoder learns far more heads than the layer
  has and keeps only k per position, so each latent is one OV direction with one pattern.
* The latents are the kept signed scalars f [batch, pos, n_heads] (`encode`); `decode` is
  linear per position, so a head's contribution at t is exactly f_{h,t} W_O[h]: ablating a
  head subtracts it, scaling its latent steers along W_O[h].
* Sink (`sink=True`): every group also attends to a virtual key with a learned logit and a
  zero value, so a group can write nothing at a position (real heads use BOS for that; a
  rank-1 head attending BOS would still write BOS's value).
* Causality: patterns are causal and the top-k and decoding act per position, so the
  output at t depends on x[0..t] only.
* Sparsity is exact TopK per position (Gao et al. 2024), with an AuxK loss: the top `aux_k`
  dead heads (by |z|, with the patterns detached so reviving OV vectors does not bend the
  shared QK groups) reconstruct the residual.

References: Anthropic, "Sparse mixtures of linear transforms" / attention replacement
(Circuits Updates, 2025); Kissane et al. 2024 (attention-output SAEs); Dunefsky et al. 2024
(transcoders); Gao et al. 2024 (TopK, AuxK). The design above is interplab's own.

Data: the input is `blocks.L.ln1.hook_normalized` (the layer's LayerNorm/RMSNorm output
before its affine weights, which the transcoder's biases and weights absorb) when the model
has it, else `blocks.L.hook_resid_pre` with a frozen scalar `input_scale` (E||x||^2 =
d_model); the target is `blocks.L.hook_attn_out`. Training streams whole packed windows
(attention needs contexts) and captures both hooks in one forward that stops after the layer.

Training (`train_attention_transcoder`, `fit_attention_transcoder`): Adam on the MSE to the
scaled target, plus AuxK. Learning sharp attention patterns from random QK by gradient
descent is the slow part, and random OV heads summed over k positions start far from the
target, so by default the start is informed: the OV heads (and b_O) are a closed-form
reduced-rank least-squares fit under the starting patterns (`init_ov_lstsq_`), and where
the architecture allows (`from_attention_layer` reproduces the layer) the QK groups start
as the layer's own heads' QK circuits (`init_qk_from_layer_`; `qk_init="random"` for a
from-scratch start). `interplab run attention-transcoder` trains one, evaluates it spliced
in, and compares it with the untrained baseline of the layer's own heads cut into rank-1
pieces and to the top k.

Files: a folder with `cfg.json` (`architecture: "attention_transcoder"`, widths, config,
`metadata{model_name, layer, hook_name, hook_name_out, ...}`) and `sae_weights.safetensors`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from interplab.dictionaries.io import CFG_FILE, WEIGHTS_FILE, write_folder
from interplab.errors import InterplabError

InputNorm = Literal["auto", "none", "scale", "layernorm"]
QKInit = Literal["auto", "random", "layer"]
OVInit = Literal["lstsq", "random"]
ARCHITECTURE = "attention_transcoder"
LatentEdit = Callable[[Tensor], Tensor]
"""A function latents [batch, pos, n_heads] -> edited latents of the same shape."""


def _check_int(name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InterplabError(f"{name} must be an integer >= {low}, got {value!r}.")


def _check_float(name: str, value: object, low: float, high: float, *, open_low: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise InterplabError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}.")


# ---------------------------------------------------------------------------- configs
@dataclass
class AttentionTranscoderConfig:
    """Shape of an attention transcoder (d_model comes from the data when it is built)."""

    n_heads: int = 256
    """Rank-1 OV heads: the dictionary width, far more than the layer's heads."""
    n_qk: int = 8
    """QK groups (attention patterns); each is shared by n_heads // n_qk OV heads."""
    k: int = 16
    """OV heads kept active per position (TopK by |z| ||W_O[h]||)."""
    d_head_qk: int = 16
    """Query/key width of each QK group."""
    sink: bool = True
    """Give every group a learned-logit key with zero value, so it can attend to nothing."""
    input_norm: InputNorm = "auto"
    """How the input is normalised before use: "none"; "scale" divides by a frozen scalar
    (set by the trainer so E||x||^2 = d_model; keeps the map exactly attention-shaped);
    "layernorm" centres and scales each position (no affine); "auto" = "none" when the input
    hook is already normalised (ln1.hook_normalized), else "scale"."""
    aux_k: int | None = None
    """Dead heads used by the AuxK loss; None = min(n_heads, d_model // 2)."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024); 0 disables it."""

    def __post_init__(self) -> None:
        for name in ("n_heads", "n_qk", "k", "d_head_qk"):
            _check_int(name, getattr(self, name))
        if self.n_heads % self.n_qk:
            raise InterplabError(
                f"n_heads={self.n_heads} must be a multiple of n_qk={self.n_qk} "
                "(each QK group owns n_heads // n_qk OV heads)."
            )
        if self.k > self.n_heads:
            raise InterplabError(f"k={self.k} must be <= n_heads={self.n_heads}.")
        if not isinstance(self.sink, bool):
            raise InterplabError(f"sink must be True or False, got {self.sink!r}.")
        if self.input_norm not in ("auto", "none", "scale", "layernorm"):
            raise InterplabError(
                "input_norm must be one of 'auto', 'none', 'scale', 'layernorm', "
                f"got {self.input_norm!r}."
            )
        if self.aux_k is not None:
            _check_int("aux_k", self.aux_k)
        _check_float("aux_coefficient", self.aux_coefficient, 0.0, math.inf, open_low=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (inverse: `AttentionTranscoderConfig.from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionTranscoderConfig:
        """Rebuild from `to_dict()`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise InterplabError(f"unknown field(s) {extra} for AttentionTranscoderConfig.")
        return cls(**data)


@dataclass
class AttentionTrainConfig:
    """Optimisation settings of `train_attention_transcoder`."""

    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences (windows) per step."""
    context_size: int = 128
    """Tokens per window, BOS included (capped at the model's context)."""
    lr: float = 2e-3
    """Peak Adam learning rate."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam (beta1, beta2)."""
    warmup_steps: int = 100
    """Linear learning-rate warmup, capped at 10% of the steps."""
    decay_fraction: float = 0.2
    """Linear decay of the learning rate to 0 over this final fraction of the steps."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value; None = no clipping."""
    dead_tokens_threshold: int = 200_000
    """A head not selected at any position for this many tokens is dead (AuxK trains it)."""
    corpus_seed: int = 0
    """Document order of the training stream (evaluation defaults to seed 1)."""
    seed: int = 0
    """Seed of the initialisation."""
    device: str | None = None
    """Device of the transcoder: cpu, cuda, cuda:N; None = the model's device."""
    log_every: int = 25
    """Steps between progress-bar/run-log updates (metrics averaged over them)."""
    progress: bool = True
    """Show a tqdm progress bar with FVU, L0, dead fraction and tokens/s."""
    qk_init: QKInit = "auto"
    """Starting QK groups: "random"; "layer" copies the layer's own heads' QK circuits
    (group g from head g mod n_heads_layer, reduced to d_head_qk by SVD of the bilinear form,
    with noise on repeats; `AttentionTranscoder.init_qk_from_layer_`); "auto" = "layer"
    where `from_attention_layer` supports the model (absolute positions, plain softmax) and
    the input is used unscaled (input_norm "none"), else "random". Learning sharp patterns
    from random QK is the slow part of training."""
    ov_init: OVInit = "lstsq"
    """Starting OV heads: "lstsq" fits them to the first `init_windows` windows under the
    starting patterns (`AttentionTranscoder.init_ov_lstsq_`); "random" keeps random unit
    heads (their summed output starts far from the target and takes many steps to shrink)."""
    init_windows: int = 64
    """Windows used for the target scale, b_O and the lstsq OV fit (the first batches; they
    are trained on too)."""
    ridge: float = 0.1
    """Ridge weight of the lstsq OV fit, relative to the mean feature energy."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "dead_tokens_threshold"):
            _check_int(name, getattr(self, name))
        _check_int("context_size", self.context_size, low=2)
        _check_int("warmup_steps", self.warmup_steps, low=0)
        _check_int("corpus_seed", self.corpus_seed, low=0)
        _check_int("init_windows", self.init_windows)
        _check_float("ridge", self.ridge, 0.0, math.inf, open_low=False)
        if self.qk_init not in ("auto", "random", "layer"):
            raise InterplabError(
                f"qk_init must be 'auto', 'random' or 'layer', got {self.qk_init!r}."
            )
        if self.ov_init not in ("lstsq", "random"):
            raise InterplabError(f"ov_init must be 'lstsq' or 'random', got {self.ov_init!r}.")
        _check_float("lr", self.lr, 0.0, math.inf, open_low=True)
        _check_float("decay_fraction", self.decay_fraction, 0.0, 1.0, open_low=False)
        if self.max_grad_norm is not None:
            _check_float("max_grad_norm", self.max_grad_norm, 0.0, math.inf, open_low=True)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise InterplabError(
                f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}."
            )
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at 0-based `step`: warmup, flat, linear decay to 0."""
        warmup = min(self.warmup_steps, max(1, self.steps // 10)) if self.warmup_steps else 0
        factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
        decay = int(self.decay_fraction * self.steps)
        if decay and step >= self.steps - decay:
            factor *= (self.steps - step) / decay
        return factor


# ---------------------------------------------------------------------------- the module
@dataclass
class AttentionTranscoderOutput:
    """What `AttentionTranscoder.forward` returns for one batch of sequences."""

    y_hat: Float[Tensor, "batch pos d_model"]
    """Reconstruction of the attention output."""
    latents: Float[Tensor, "batch pos n_heads"]
    """Kept head outputs z (k nonzero per position), zeros elsewhere."""
    loss: Tensor
    """Scalar training loss: mse + aux_coefficient * aux."""
    losses: dict[str, Tensor]
    """Unweighted terms: `mse` (squared error summed over d_model, mean over positions) and
    `aux` (AuxK, when dead heads were given)."""
    fvu: Tensor
    """Fraction of variance unexplained on this batch (detached)."""
    l0: Tensor
    """Mean nonzero latents per position (detached; k unless some kept z are exactly 0)."""
    fired: Bool[Tensor, " n_heads"]
    """Heads kept at some position of the batch."""


class AttentionTranscoder(nn.Module):
    """Sparse mixture of rank-1 attention heads on `n_qk` shared patterns; see the module
    docstring for the computation. Inputs are sequences [batch, pos, d_model] (or one
    sequence [pos, d_model]); position 0 is the first token of the context."""

    W_Q: nn.Parameter
    W_K: nn.Parameter
    W_V: nn.Parameter
    W_O: nn.Parameter
    input_scale: Tensor

    def __init__(
        self,
        config: AttentionTranscoderConfig,
        d_model: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(config, AttentionTranscoderConfig):
            raise InterplabError(
                f"expected an AttentionTranscoderConfig, got {type(config).__name__}."
            )
        _check_int("d_model", d_model)
        self.config = config
        self.d_model = d_model
        self.n_heads, self.n_qk, self.k = config.n_heads, config.n_qk, config.k
        self.d_head_qk = config.d_head_qk
        self.heads_per_group = config.n_heads // config.n_qk
        # "auto" is resolved by the trainer from the input hook; built directly it means "none".
        self.input_norm = "none" if config.input_norm == "auto" else config.input_norm
        self.aux_k = min(config.aux_k or max(d_model // 2, 1), config.n_heads)
        # Free-form provenance (model_name, layer, hook names, training) saved in cfg.json.
        self.metadata: dict[str, Any] = {}

        f = {"device": device, "dtype": dtype}
        G, H, D, E = config.n_qk, config.n_heads, d_model, config.d_head_qk
        self.W_Q = nn.Parameter(torch.empty(G, D, E, **f))
        self.b_Q = nn.Parameter(torch.zeros(G, E, **f))
        self.W_K = nn.Parameter(torch.empty(G, D, E, **f))
        self.b_K = nn.Parameter(torch.zeros(G, E, **f))
        if config.sink:
            self.sink_logit = nn.Parameter(torch.zeros(G, **f))
        self.W_V = nn.Parameter(torch.empty(D, H, **f))
        self.b_V = nn.Parameter(torch.zeros(H, **f))
        self.W_O = nn.Parameter(torch.empty(H, D, **f))
        self.b_O = nn.Parameter(torch.zeros(D, **f))
        self.register_buffer("input_scale", torch.ones((), **f))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Gaussian W_Q, W_K with variance 1/d_model (unit-variance queries and keys for unit
        variance inputs), random unit value vectors and unit output vectors, zero biases."""
        for W in (self.W_Q, self.W_K):
            W.normal_(0.0, self.d_model**-0.5)
        for W, dim in ((self.W_V, 0), (self.W_O, 1)):
            W.normal_()
            W.div_(W.norm(dim=dim, keepdim=True).clamp_min(1e-12))

    # ----------------------------------------------------------------- reading heads
    @property
    def head_group(self) -> Int[Tensor, " n_heads"]:
        """QK group of each OV head (contiguous blocks of n_heads // n_qk heads)."""
        return torch.arange(self.n_heads, device=self.W_O.device) // self.heads_per_group

    def _as_batch(self, x: Tensor, name: str = "x") -> Tensor:
        if not isinstance(x, Tensor):
            raise InterplabError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
        if x.ndim not in (2, 3) or x.shape[-1] != self.d_model:
            raise InterplabError(
                f"{name} has shape {tuple(x.shape)}; expected [batch, pos, d_model] or "
                f"[pos, d_model] with d_model={self.d_model}."
            )
        if x.shape[-2] == 0:
            raise InterplabError(f"{name} has no positions (shape {tuple(x.shape)}).")
        x = x if x.ndim == 3 else x.unsqueeze(0)
        return x.to(device=self.W_O.device, dtype=self.W_O.dtype)

    def normalize_input(self, x: Float[Tensor, "batch pos d_model"]) -> Tensor:
        """x / input_scale, then the per-position LayerNorm when `input_norm="layernorm"`."""
        x = x / self.input_scale
        if self.input_norm == "layernorm":
            x = x - x.mean(-1, keepdim=True)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        return x

    def _patterns(self, x_n: Tensor) -> Tensor:
        q = torch.einsum("bsd,gde->bgse", x_n, self.W_Q) + self.b_Q[None, :, None]
        k = torch.einsum("bsd,gde->bgse", x_n, self.W_K) + self.b_K[None, :, None]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head_qk)  # b g t s
        T = x_n.shape[1]
        future = torch.ones(T, T, dtype=torch.bool, device=x_n.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        if not self.config.sink:
            return scores.softmax(-1)
        sink = self.sink_logit.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        return torch.cat([sink, scores], -1).softmax(-1)[..., 1:]

    def patterns(
        self, x: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch n_qk dst src"]:
        """Causal attention pattern of every QK group (rows sum to 1 minus the sink's share)."""
        return self._patterns(self.normalize_input(self._as_batch(x)))

    def values(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos n_heads"]:
        """Per-source scalar value of every head, x_n . W_V[:, h] + b_V[h]."""
        return self.normalize_input(self._as_batch(x)) @ self.W_V + self.b_V

    def _mix(self, pattern: Tensor, values: Tensor) -> Tensor:
        """z [b, t, H] = each head's values mixed by its group's pattern."""
        B, S, _ = values.shape
        v = values.view(B, S, self.n_qk, self.heads_per_group)
        return torch.einsum("bgts,bsgh->btgh", pattern, v).reshape(B, pattern.shape[2], -1)

    def head_outputs(
        self, x: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos n_heads"]:
        """Dense z of every head before the TopK selection."""
        x_n = self.normalize_input(self._as_batch(x))
        return self._mix(self._patterns(x_n), x_n @ self.W_V + self.b_V)

    def select(self, z: Float[Tensor, "batch pos n_heads"]) -> Float[Tensor, "batch pos n_heads"]:
        """Keep the k heads of largest |z_h| ||W_O[h]|| at each position, zero the rest."""
        scores = z.detach().abs() * self.W_O.detach().norm(dim=1)
        index = scores.topk(self.k, dim=-1, sorted=False).indices
        return torch.zeros_like(z).scatter(-1, index, z.gather(-1, index))

    # ----------------------------------------------------------------- public maps
    def encode(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos n_heads"]:
        """Sparse latents: the kept head outputs (k nonzero per position, signed).
        A [pos, d_model] input gives [pos, n_heads]."""
        latents = self.select(self.head_outputs(x))
        return latents if x.ndim == 3 else latents[0]

    def decode(self, latents: Float[Tensor, "... n_heads"]) -> Float[Tensor, "... d_model"]:
        """`latents @ W_O + b_O`: per position, linear in the latents."""
        if not isinstance(latents, Tensor) or latents.shape[-1] != self.n_heads:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise InterplabError(
                f"latents have shape {shape}; expected last dimension n_heads={self.n_heads}."
            )
        return latents.to(self.W_O.dtype) @ self.W_O + self.b_O

    def head_contribution(
        self, latents: Float[Tensor, "... n_heads"], head: int
    ) -> Float[Tensor, "... d_model"]:
        """What head `head` writes at each position: latents[..., head] * W_O[head]."""
        self._check_heads([head])
        return latents[..., head, None].to(self.W_O.dtype) * self.W_O[head]

    def _check_heads(self, heads: Sequence[int]) -> list[int]:
        heads = [heads] if isinstance(heads, int) else list(heads)  # type: ignore[list-item]
        for h in heads:
            if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < self.n_heads:
                raise InterplabError(f"head {h!r} is out of range; expected 0..{self.n_heads - 1}.")
        return heads

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        y: Float[Tensor, "batch pos d_model"],
        *,
        dead_mask: Bool[Tensor, " n_heads"] | None = None,
    ) -> AttentionTranscoderOutput:
        """Reconstruct the attention output `y` from the input `x` and compute the loss.
        `dead_mask` marks heads that count as dead for the AuxK loss."""
        x = self._as_batch(x)
        y = self._as_batch(y, "y")
        if y.shape != x.shape:
            raise InterplabError(
                f"y has shape {tuple(y.shape)}, expected the shape of x {tuple(x.shape)}."
            )
        x_n = self.normalize_input(x)
        pattern = self._patterns(x_n)
        values = x_n @ self.W_V + self.b_V
        z = self._mix(pattern, values)
        latents = self.select(z)
        y_hat = self.decode(latents)
        mse = (y_hat - y).pow(2).sum(-1).mean()
        losses = {"mse": mse}
        loss = mse
        if dead_mask is not None and self.config.aux_coefficient > 0:
            if dead_mask.shape != (self.n_heads,):
                raise InterplabError(
                    f"dead_mask has shape {tuple(dead_mask.shape)}, expected ({self.n_heads},)."
                )
            losses["aux"] = self._aux_loss(pattern, values, y_hat, y, dead_mask.bool())
            loss = loss + self.config.aux_coefficient * losses["aux"]
        with torch.no_grad():
            flat = y.reshape(-1, self.d_model)
            total = (flat - flat.mean(0)).pow(2).sum()
            fvu = (y_hat - y).pow(2).sum() / total.clamp_min(1e-30)
            active = latents != 0
        return AttentionTranscoderOutput(
            y_hat=y_hat,
            latents=latents,
            loss=loss,
            losses=losses,
            fvu=fvu,
            l0=active.sum(-1).to(y.dtype).mean(),
            fired=active.reshape(-1, self.n_heads).any(0),
        )

    def _aux_loss(
        self, pattern: Tensor, values: Tensor, y_hat: Tensor, y: Tensor, dead: Tensor
    ) -> Tensor:
        """AuxK (Gao et al. 2024, app. A.2) on heads: the top aux_k dead heads reconstruct the
        detached residual, scaled by min(n_dead / aux_k, 1)."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return y_hat.new_zeros(())
        z = self._mix(pattern.detach(), values)
        scores = (z.detach().abs() * self.W_O.detach().norm(dim=1)).masked_fill(~dead, -1.0)
        index = scores.topk(min(self.aux_k, n_dead), dim=-1, sorted=False).indices
        aux_latents = torch.zeros_like(z).scatter(-1, index, z.gather(-1, index))
        residual = (y - y_hat).detach()
        err = (aux_latents @ self.W_O - residual).pow(2).sum(-1).mean()
        return min(n_dead / self.aux_k, 1.0) * err

    # ----------------------------------------------------------------- constraints
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale the output vectors W_O[h] to unit norm (z then carries the magnitude)."""
        self.W_O.div_(self.W_O.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component along each W_O[h], so steps move along the sphere."""
        if self.W_O.grad is not None:
            unit = self.W_O / self.W_O.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.W_O.grad.sub_((self.W_O.grad * unit).sum(1, keepdim=True) * unit)

    @torch.no_grad()
    def fold_output_scale_(self, scale: float) -> None:
        """A transcoder trained on y / scale becomes one for y: z is linear in (W_V, b_V), so
        W_V, b_V and b_O are multiplied by `scale` (latents scale by it too)."""
        for p in (self.W_V, self.b_V, self.b_O):
            p.mul_(scale)

    @torch.no_grad()
    def calibrate_sink_(self, x: Float[Tensor, "batch pos d_model"], share: float = 0.05) -> None:
        """Set each group's sink logit so the sink takes about `share` of the attention of a
        median position of `x` (scores are not shift invariant once a sink is added, so a
        fixed starting logit would be arbitrary)."""
        if not self.config.sink:
            return
        _check_float("share", share, 0.0, 1.0, open_low=True)
        x_n = self.normalize_input(self._as_batch(x))
        q = torch.einsum("bsd,gde->bgse", x_n, self.W_Q) + self.b_Q[None, :, None]
        k = torch.einsum("bsd,gde->bgse", x_n, self.W_K) + self.b_K[None, :, None]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head_qk)
        T = x_n.shape[1]
        future = torch.ones(T, T, dtype=torch.bool, device=x_n.device).triu(1)
        lse = scores.masked_fill(future, float("-inf")).logsumexp(-1)  # b g t
        median = lse.transpose(0, 1).reshape(self.n_qk, -1).median(-1).values
        odds = math.log(share / (1 - share)) if share < 1 else 30.0
        self.sink_logit.copy_(median + odds)

    @staticmethod
    def _joint_maps(
        features: list[Tensor], target: Tensor, ridge: float, rank: int
    ) -> list[Tensor]:
        """All groups' maps from one joint ridge regression, each cut to `rank` (reduced-rank
        projection of its own fitted values)."""
        joint = torch.cat(features, 1)
        gram = joint.T @ joint
        gram.diagonal().add_(ridge * float(gram.diagonal().mean()))
        solution = torch.linalg.solve(gram, joint.T @ target)
        maps = []
        for f, block in zip(features, solution.split(features[0].shape[1]), strict=True):
            right = torch.linalg.svd(f @ block, full_matrices=False).Vh[:rank]
            maps.append(block @ right.T @ right)
        return maps

    @torch.no_grad()
    def init_qk_from_layer_(
        self, model: Any, layer: int, *, noise: float = 0.1, seed: int = 0
    ) -> None:
        """Start the QK groups as the QK circuits of the layer's own heads.

        Group g takes head g mod n_heads_layer of `from_attention_layer(model, layer)` (LN
        affine and score scale folded in). Its bilinear form [x, 1] Q_aug K_aug^T [x, 1]^T
        is reduced (or padded, with small noise) to d_head_qk by SVD; groups that repeat a
        head get Gaussian noise of `noise` times each weight's RMS so they can part ways.
        Raises where `from_attention_layer` does not support the model.
        """
        exact = AttentionTranscoder.from_attention_layer(model, layer)
        if exact.d_model != self.d_model:
            raise InterplabError(
                f"layer {layer} has d_model={exact.d_model}, this transcoder d_model={self.d_model}."
            )
        E, E0, D = self.d_head_qk, exact.d_head_qk, self.d_model
        gen = torch.Generator().manual_seed(seed)
        device = self.W_Q.device
        for g in range(self.n_qk):
            src = g % exact.n_qk
            q = torch.cat([exact.W_Q[src], exact.b_Q[src, None]]).double().cpu()  # (D+1) E0
            k = torch.cat([exact.W_K[src], exact.b_K[src, None]]).double().cpu()
            U, S, Vh = torch.linalg.svd(q @ k.T)
            r = min(E, E0)
            # our scores divide by sqrt(E), the decomposition's by sqrt(E0)
            root = (S[:r] * math.sqrt(E / E0)).sqrt()
            q_new = torch.zeros(D + 1, E, dtype=torch.float64)
            k_new = torch.zeros(D + 1, E, dtype=torch.float64)
            q_new[:, :r], k_new[:, :r] = U[:, :r] * root, Vh[:r].T * root
            rms = float(q_new[:, :r].pow(2).mean().sqrt())
            if r < E:  # extra columns: small noise, not zeros (zero q and k never move)
                q_new[:, r:] = 0.01 * rms * torch.randn(D + 1, E - r, generator=gen)
                k_new[:, r:] = 0.01 * rms * torch.randn(D + 1, E - r, generator=gen)
            if g >= exact.n_qk:
                q_new += noise * rms * torch.randn(q_new.shape, generator=gen)
                k_new += noise * rms * torch.randn(k_new.shape, generator=gen)
            self.W_Q[g].copy_(q_new[:D].to(device))
            self.b_Q[g].copy_(q_new[D].to(device))
            self.W_K[g].copy_(k_new[:D].to(device))
            self.b_K[g].copy_(k_new[D].to(device))

    @torch.no_grad()
    def init_ov_lstsq_(
        self,
        x: Float[Tensor, "batch pos d_model"],
        y: Float[Tensor, "batch pos d_model"],
        *,
        ridge: float = 0.1,
        passes: int = 3,
    ) -> None:
        """Set the OV heads and b_O to a least-squares fit of y under the current patterns.

        With the patterns fixed, a group's output is linear in its OV map: y_t ~ F_g M_g
        with features F_g = [P_g x_n, P_g 1] and M_g [d_model + 1, d_model] (the last row is
        the value bias). b_O is the mean target. The M_g start from one joint ridge
        regression, each cut to rank n_heads // n_qk (the solution projected onto the top
        right singular vectors of its fitted values), or from zero where that cut fits worse
        than nothing (near-collinear groups, e.g. diffuse initial patterns, fit with large
        cancelling maps that truncation breaks); `passes` sweeps of block coordinate descent
        then refit each group, rank-cut the same way, to what the others leave. The SVD of
        M_g gives the
        heads (value = u_j s_j, output = v_j). This replaces the slow first phase of training
        from random heads with a closed form; TopK then prunes it to k heads per position.
        `ridge` is relative to the mean feature energy (the features of one window are
        strongly correlated, so the fit overfits without it).
        """
        x, y = self._as_batch(x), self._as_batch(y, "y")
        _check_int("passes", passes)
        x_n = self.normalize_input(x)
        pattern = self._patterns(x_n).double()  # b g t s
        ones = torch.ones(*x_n.shape[:2], 1, dtype=torch.float64, device=x_n.device)
        x_aug = torch.cat([x_n.double(), ones], -1)  # b s (d + 1)
        n = x_aug.shape[0] * x_aug.shape[1]
        D, hpg, r = self.d_model, self.heads_per_group, min(self.heads_per_group, self.d_model)
        target = y.double().reshape(n, D)
        b_O = target.mean(0)
        features = [(pattern[:, g] @ x_aug).reshape(n, D + 1) for g in range(self.n_qk)]
        # centred regressions: the intercept (b_O) is fitted jointly, not fixed at mean(y)
        means = [f.mean(0) for f in features]
        features = [f - mu for f, mu in zip(features, means, strict=True)]
        factors = []
        for f in features:
            gram = f.T @ f
            gram.diagonal().add_(ridge * float(gram.diagonal().mean()))
            factors.append(torch.linalg.cholesky(gram))
        target = target - b_O
        rest = target
        maps = self._joint_maps(features, rest, ridge, r)
        fitted = sum(f @ m for f, m in zip(features, maps, strict=True))
        if (rest - fitted).pow(2).sum() > rest.pow(2).sum():
            # truncation broke the cancellations of near-collinear groups: start from zero
            maps = [torch.zeros_like(maps[0]) for _ in maps]
            fitted = torch.zeros_like(target)
        for _ in range(passes):
            for g, (f, chol) in enumerate(zip(features, factors, strict=True)):
                fitted -= f @ maps[g]
                rest = target - fitted
                full = torch.cholesky_solve(f.T @ rest, chol)  # (d + 1) d
                right = torch.linalg.svd(f @ full, full_matrices=False).Vh[:r]  # r d
                maps[g] = full @ right.T @ right
                fitted += f @ maps[g]
        W_V = torch.zeros(D + 1, self.n_qk, hpg, dtype=torch.float64, device=x_n.device)
        W_O = self.W_O.detach().double().view(self.n_qk, hpg, D).clone()
        for g, M in enumerate(maps):
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            W_V[:, g, :r] = U[:, :r] * S[:r]
            W_O[g, :r] = Vh[:r]
        self.W_V.copy_(W_V[:D].reshape(D, -1))
        self.b_V.copy_(W_V[D].reshape(-1))
        self.W_O.copy_(W_O.reshape(-1, D))
        self.b_O.copy_(b_O - sum(mu @ M for mu, M in zip(means, maps, strict=True)))

    # ----------------------------------------------------------------- files
    def file_tensors(self) -> dict[str, Tensor]:
        """Every parameter and buffer by name (detached), as saved in the weights file."""
        return {name: t.detach() for name, t in self.state_dict().items()}

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"d_model={self.d_model}, n_heads={c.n_heads}, n_qk={c.n_qk}, k={c.k}, "
            f"d_head_qk={c.d_head_qk}, sink={c.sink}, input_norm={self.input_norm!r}"
        )

    # ----------------------------------------------------------------- exact decomposition
    @classmethod
    def from_attention_layer(
        cls, model: Any, layer: int, *, k: int | None = None, check: bool = True
    ) -> AttentionTranscoder:
        """The exact rank-1 decomposition of a model's attention layer.

        Each of the layer's heads i becomes a QK group with its W_Q, W_K, and d_head rank-1
        OV heads from the SVD of W_V^i W_O^i = sum_j s_j u_j v_j^T (value vector s_j u_j,
        output vector v_j); the value bias b_V^i W_O^i lies in the span of the v_j. The
        LayerNorm affine weights are folded in, since the input is ln1.hook_normalized.
        With k = n_heads (the default) it reproduces hook_attn_out up to float error; a
        smaller k is the untrained sparse baseline. Supports plain softmax(QK^T / scale)
        attention with absolute or no positional embeddings; with `check` the result is
        compared with the real layer on random tokens and a mismatch raises.
        """
        from interplab.models.accessor import weights

        cfg = model.cfg
        _check_layer(model, layer)
        if getattr(cfg, "positional_embedding_type", "standard") not in ("standard", None):
            raise InterplabError(
                f"from_attention_layer needs absolute positional embeddings; this model uses "
                f"{cfg.positional_embedding_type!r} (its patterns depend on relative position)."
            )
        w = weights(model)
        hook_in, _ = attention_hooks(model, layer)
        n_layer_heads, d_head = int(cfg.n_heads), int(cfg.d_head)
        n_heads = n_layer_heads * d_head
        config = AttentionTranscoderConfig(
            n_heads=n_heads,
            n_qk=n_layer_heads,
            k=n_heads if k is None else k,
            d_head_qk=d_head,
            sink=False,
            input_norm="none",
        )
        W_Q, W_K, W_V, W_O = (t[layer].detach().double() for t in (w.W_Q, w.W_K, w.W_V, w.W_O))
        b_Q, b_K, b_V = (t[layer].detach().double() for t in (w.b_Q, w.b_K, w.b_V))
        b_O = w.b_O[layer].detach().double()
        D = W_Q.shape[1]
        if hook_in.endswith("ln1.hook_normalized"):
            ln_w, ln_b = w.ln1_w[layer].detach().double(), w.ln1_b[layer].detach().double()
        else:
            ln_w, ln_b = torch.ones(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
        use_scale = getattr(cfg, "use_attn_scale", True)
        attn_scale = float(getattr(cfg, "attn_scale", -1.0) or -1.0)
        if not use_scale:
            attn_scale = 1.0
        elif attn_scale <= 0:
            attn_scale = math.sqrt(d_head)
        # our scores divide by sqrt(d_head); the model's by attn_scale
        q_fix = math.sqrt(d_head) / attn_scale
        # input to the layer = n * ln_w + ln_b, n = hook_normalized
        Wq = ln_w[None, :, None] * W_Q * q_fix
        bq = (torch.einsum("d,gde->ge", ln_b, W_Q) + b_Q) * q_fix
        Wk = ln_w[None, :, None] * W_K
        bk = torch.einsum("d,gde->ge", ln_b, W_K) + b_K
        v_vecs, b_vals, o_vecs = [], [], []
        for i in range(n_layer_heads):
            U, S, Vh = torch.linalg.svd(W_V[i] @ W_O[i])  # [D, D]
            U, S, Vh = U[:, :d_head], S[:d_head], Vh[:d_head]
            v = U * S  # [D, d_head]
            v_vecs.append(ln_w[:, None] * v)
            b_vals.append(ln_b @ v + (b_V[i] @ W_O[i]) @ Vh.T)
            o_vecs.append(Vh)
        transcoder = cls(config, D)
        with torch.no_grad():
            transcoder.W_Q.copy_(Wq)
            transcoder.b_Q.copy_(bq)
            transcoder.W_K.copy_(Wk)
            transcoder.b_K.copy_(bk)
            transcoder.W_V.copy_(torch.cat(v_vecs, 1))
            transcoder.b_V.copy_(torch.cat(b_vals))
            transcoder.W_O.copy_(torch.cat(o_vecs, 0))
            transcoder.b_O.copy_(b_O)
        transcoder.metadata = _provenance(model, layer, hook_in)
        transcoder.metadata["source"] = "exact decomposition (from_attention_layer)"
        transcoder = transcoder.to(next(model.parameters()).device)
        if check:
            _check_exact(transcoder, model, layer)
        return transcoder.eval()


# ---------------------------------------------------------------------------- hooks
class _StopForward(Exception):
    """Raised in the last needed hook to skip the rest of the forward pass."""


def _check_layer(model: Any, layer: int) -> None:
    n_layers = int(model.cfg.n_layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise InterplabError(
            f"layer {layer!r} is out of range; this model has layers 0..{n_layers - 1}."
        )


def attention_hooks(model: Any, layer: int) -> tuple[str, str]:
    """(input hook, output hook) of attention layer `layer`: `blocks.L.ln1.hook_normalized`
    when the model normalises before attention (else `blocks.L.hook_resid_pre`), and
    `blocks.L.hook_attn_out`."""
    _check_layer(model, layer)
    names = model.hook_dict
    hook_in = f"blocks.{layer}.ln1.hook_normalized"
    if hook_in not in names:
        hook_in = f"blocks.{layer}.hook_resid_pre"
    hook_out = f"blocks.{layer}.hook_attn_out"
    for name in (hook_in, hook_out):
        if name not in names:
            raise InterplabError(f"this model has no hook point {name!r}.")
    return hook_in, hook_out


def _provenance(model: Any, layer: int, hook_in: str) -> dict[str, Any]:
    return {
        "model_name": getattr(model.cfg, "model_name", None),
        "layer": layer,
        "hook_name": hook_in,
        "hook_name_out": f"blocks.{layer}.hook_attn_out",
    }


def capture_attention_io(
    model: Any, tokens: Int[Tensor, "batch pos"], layer: int
) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos d_model"]]:
    """(input, output) of attention layer `layer` on `tokens`, in one forward pass stopped
    right after the layer (no gradients)."""
    hook_in, hook_out = attention_hooks(model, layer)
    got: dict[str, Tensor] = {}

    def grab_in(act: Tensor, hook: Any) -> None:
        got["x"] = act.detach()

    def grab_out(act: Tensor, hook: Any) -> None:
        got["y"] = act.detach()
        raise _StopForward

    device = next(model.parameters()).device
    with (
        torch.no_grad(),
        model.hooks(fwd_hooks=[(hook_in, grab_in), (hook_out, grab_out)]),
        contextlib.suppress(_StopForward),
    ):
        model(tokens.to(device))
    if "x" not in got or "y" not in got:
        raise InterplabError(f"hooks {hook_in!r}/{hook_out!r} did not fire in a forward pass.")
    return got["x"], got["y"]


def _layer_decomposable(model: Any, layer: int) -> bool:
    """Whether `from_attention_layer` reproduces this layer (checked, not guessed)."""
    try:
        AttentionTranscoder.from_attention_layer(model, layer)
    except InterplabError:
        return False
    return True


def _check_exact(transcoder: AttentionTranscoder, model: Any, layer: int) -> None:
    gen = torch.Generator().manual_seed(0)
    T = min(16, int(model.cfg.n_ctx))
    tokens = torch.randint(0, int(model.cfg.d_vocab), (2, T), generator=gen)
    x, y = capture_attention_io(model, tokens, layer)
    with torch.no_grad():
        y_hat = transcoder.decode(transcoder.encode(x.to(transcoder.W_O.device)))
    y = y.to(y_hat)
    fvu = float((y_hat - y).pow(2).sum() / (y - y.mean((0, 1))).pow(2).sum().clamp_min(1e-30))
    if transcoder.k == transcoder.n_heads and not fvu < 1e-6:
        raise InterplabError(
            f"the decomposition of layer {layer} does not reproduce hook_attn_out (FVU {fvu:.3g}): "
            "this architecture's attention is not plain softmax(q k^T / scale) on the ln1 output."
        )


# ---------------------------------------------------------------------------- data
def stream_windows(
    corpus: Any, tokenizer: Any, context_size: int, batch_size: int, seed: int = 0
) -> Iterator[Int[Tensor, "batch pos"]]:
    """Endless batches of packed windows, packed like `interplab.data.corpus.pack` (documents
    in seeded order, EOS after each, BOS first in each window), but tokenized lazily. A
    finite corpus starts over in the order of seed + 1, seed + 2, ...; token files cycle."""
    from interplab.data.corpus import pack, resolve_corpus
    from interplab.data.corpus.sources import TokenFileCorpus

    corpus = resolve_corpus(corpus)
    if isinstance(corpus, TokenFileCorpus):
        ids = corpus.ids
        n = ids.shape[0] if ids.ndim == 2 else ids.numel() // context_size
        windows = pack(corpus, None, context_size, n).ids
        if n < batch_size:
            raise InterplabError(
                f"token file {corpus.path} has {n} windows of {context_size}; a batch needs {batch_size}."
            )
        while True:
            for start in range(0, n - batch_size + 1, batch_size):
                yield windows[start : start + batch_size]
    if tokenizer is None:
        raise InterplabError("streaming a text corpus needs a tokenizer; this model has none.")
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    if bos is None:
        raise InterplabError("the tokenizer has no BOS token; attention transcoders need one.")
    body = context_size - 1
    need = batch_size * body
    buffer: list[int] = []
    epoch = 0
    while True:
        n_docs = 0
        for document in corpus.documents(seed + epoch):
            n_docs += 1
            buffer.extend(tokenizer.encode(document, add_special_tokens=False))
            if eos is not None:
                buffer.append(eos)
            while len(buffer) >= need:
                ids = torch.tensor(buffer[:need], dtype=torch.long).view(batch_size, body)
                del buffer[:need]
                yield torch.cat([torch.full((batch_size, 1), bos, dtype=torch.long), ids], 1)
        if n_docs == 0:
            raise InterplabError(f"corpus {corpus.corpus_id!r} yields no documents.")
        epoch += 1


# ---------------------------------------------------------------------------- training
class RunLike(Protocol):
    """What the trainer needs from a run (`interplab.runs.Run` provides it)."""

    def log(self, step: int, **metrics: float) -> None: ...


@dataclass
class FitSummary:
    """What a training run did (also stored in the transcoder's metadata["training"])."""

    steps: int
    """Optimizer steps taken."""
    tokens: int
    """Positions trained on."""
    seconds: float
    """Wall time of the loop."""
    final: dict[str, float]
    """Metrics averaged over the last `log_every` steps: fvu, l0, dead_fraction, mse, aux,
    tokens_per_s."""


def fit_attention_transcoder(
    transcoder: AttentionTranscoder,
    pairs: Iterable[tuple[Tensor, Tensor]],
    train: AttentionTrainConfig | None = None,
    *,
    run: RunLike | None = None,
    desc: str = "attention transcoder",
) -> FitSummary:
    """Train `transcoder` in place on (input, output) sequence pairs [batch, pos, d_model].

    The first batches (at least `train.init_windows` sequences) set up the start: with
    `input_norm="scale"` the input scale makes E||x||^2 = d_model; the sink logits are
    calibrated (`calibrate_sink_`); targets are divided by s = sqrt(E||y - mean y||^2) while
    training (so the MSE reads as an FVU), folded back into W_V, b_V, b_O at the end; and
    with `ov_init="lstsq"` the OV heads are fitted in closed form under the starting
    patterns (`init_ov_lstsq_`). The QK weights are used as they are (random, or set by
    `init_qk_from_layer_` beforehand). A step is: forward (MSE + AuxK on heads dead for
    `dead_tokens_threshold` tokens) -> backward -> project W_O gradients onto the sphere ->
    clip -> scheduled Adam step -> renormalise W_O. Runs `train.steps` steps; raises if
    `pairs` runs out first.
    """
    train = train or AttentionTrainConfig()
    if not isinstance(transcoder, AttentionTranscoder):
        raise InterplabError(f"expected an AttentionTranscoder, got {type(transcoder).__name__}.")
    device = transcoder.W_O.device
    stream = iter(pairs)

    def next_pair(step: int) -> tuple[Tensor, Tensor]:
        try:
            x, y = next(stream)
        except StopIteration:
            raise InterplabError(
                f"the training pairs ran out after {step} of {train.steps} steps."
            ) from None
        x, y = transcoder._as_batch(x), transcoder._as_batch(y, "y")
        if x.shape != y.shape:
            raise InterplabError(f"input {tuple(x.shape)} and output {tuple(y.shape)} differ.")
        return x.to(device), y.to(device)

    first = [next_pair(0)]
    while sum(p[0].shape[0] for p in first) < train.init_windows and len(first) < train.steps:
        first.append(next_pair(len(first)))
    x0, y0 = (torch.cat([p[i] for p in first]) for i in (0, 1))
    y_scale = _init_from_data_(transcoder, x0, y0, train)
    del x0, y0

    optimizer = _Adam(transcoder.parameters(), lr=train.lr, betas=train.adam_betas)
    since_fired = torch.zeros(transcoder.n_heads, dtype=torch.int64, device=device)
    window: dict[str, float] = {}
    last: dict[str, float] = {}
    bar = None
    if train.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=train.steps, unit="step", desc=desc)
    start = time.perf_counter()
    n_tokens = 0
    was_training = transcoder.training
    transcoder.train()
    try:
        for step in range(train.steps):
            x, y = first[step] if step < len(first) else next_pair(step)
            dead = since_fired >= train.dead_tokens_threshold
            out = transcoder(x, y / y_scale, dead_mask=dead)
            _optimizer_step(transcoder, optimizer, out.loss, train, step)
            n_tokens += x.shape[0] * x.shape[1]
            since_fired += x.shape[0] * x.shape[1]
            since_fired[out.fired] = 0
            for key, value in {
                "fvu": out.fvu,
                "l0": out.l0,
                "dead_fraction": dead.float().mean(),
                **{k: v.detach() for k, v in out.losses.items()},
            }.items():
                window[key] = window.get(key, 0.0) + float(value)
            if (step + 1) % train.log_every == 0 or step + 1 == train.steps:
                n = (step % train.log_every) + 1
                last = {key: value / n for key, value in window.items()}
                last["tokens_per_s"] = n_tokens / (time.perf_counter() - start)
                window.clear()
                if run is not None:
                    run.log(step + 1, **last)
                if bar is not None:
                    bar.set_postfix(
                        fvu=f"{last['fvu']:.3f}",
                        l0=f"{last['l0']:.1f}",
                        dead=f"{last['dead_fraction']:.2f}",
                        tok_s=f"{last['tokens_per_s']:.0f}",
                    )
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        # the scale is folded even when interrupted, so the transcoder is always usable as is
        transcoder.fold_output_scale_(y_scale)
        transcoder.train(was_training)
    return FitSummary(train.steps, n_tokens, time.perf_counter() - start, last)


@torch.no_grad()
def _init_from_data_(
    transcoder: AttentionTranscoder, x: Tensor, y: Tensor, train: AttentionTrainConfig
) -> float:
    """Input scale, sink logits, target scale, b_O and (ov_init="lstsq") the OV heads from
    the first windows; returns the target scale the training targets are divided by."""
    if transcoder.input_norm == "scale":
        rms = float(x.pow(2).sum(-1).mean().sqrt()) / transcoder.d_model**0.5
        transcoder.input_scale.fill_(rms if rms > 0 else 1.0)
    flat = y.reshape(-1, transcoder.d_model)
    y_scale = float((flat - flat.mean(0)).pow(2).sum(-1).mean().sqrt())
    if not y_scale > 0:
        raise InterplabError("the target is constant on the first batch: nothing to learn.")
    transcoder.calibrate_sink_(x)
    if train.ov_init == "lstsq":
        transcoder.init_ov_lstsq_(x, y / y_scale, ridge=train.ridge)
    else:
        transcoder.b_O.copy_(flat.mean(0) / y_scale)
    return y_scale


def train_attention_transcoder(
    model: Any,
    layer: int,
    corpus: Any = "storyworld",
    config: AttentionTranscoderConfig | None = None,
    train: AttentionTrainConfig | None = None,
    *,
    run: RunLike | None = None,
) -> AttentionTranscoder:
    """Train an attention transcoder for attention layer `layer` of `model` on `corpus`.

    Streams batches of `train.batch_size` packed windows (`stream_windows`), captures the
    layer's input and output in one forward each (stopped after hook_attn_out), and fits
    with `fit_attention_transcoder`. Every position is trained on, BOS included, because
    splicing the transcoder in replaces the BOS output too.

    Args:
        model: a hooked model from `interplab.load_model`.
        layer: attention layer index.
        corpus: corpus spec or object (`interplab.data.corpus.resolve_corpus`).
        config: transcoder shape; default `AttentionTranscoderConfig()`. `input_norm="auto"`
            becomes "none" on ln1.hook_normalized and "scale" on hook_resid_pre.
        train: optimisation settings; default `AttentionTrainConfig()`.
        run: optional run to log metrics to (every `log_every` steps).
    Returns:
        The trained transcoder (eval mode) with metadata: model_name, layer, hook_name,
        hook_name_out, context_size, corpus and `training` (settings and final metrics).
    """
    config = config or AttentionTranscoderConfig()
    train = train or AttentionTrainConfig()
    if not isinstance(config, AttentionTranscoderConfig):
        raise InterplabError(f"config must be an AttentionTranscoderConfig, got {config!r}.")
    if not isinstance(train, AttentionTrainConfig):
        raise InterplabError(f"train must be an AttentionTrainConfig, got {train!r}.")
    hook_in, _ = attention_hooks(model, layer)
    if config.input_norm == "auto":
        normalised = hook_in.endswith("hook_normalized")
        config = replace(config, input_norm="none" if normalised else "scale")
    qk_init = train.qk_init
    if qk_init == "auto":
        usable = config.input_norm == "none" and _layer_decomposable(model, layer)
        qk_init = "layer" if usable else "random"
    from interplab.models.loading import resolve_device

    device = (
        resolve_device(train.device)
        if train.device is not None
        else next(model.parameters()).device
    )
    context_size = min(train.context_size, int(model.cfg.n_ctx))
    windows = stream_windows(
        corpus, getattr(model, "tokenizer", None), context_size, train.batch_size, train.corpus_seed
    )
    pairs = (tuple(t.float() for t in capture_attention_io(model, w, layer)) for w in windows)
    torch.manual_seed(train.seed)
    transcoder = AttentionTranscoder(config, int(model.cfg.d_model), device=device)
    if qk_init == "layer":
        if transcoder.input_norm != "none":
            raise InterplabError(
                f"qk_init='layer' needs input_norm 'none' (got {transcoder.input_norm!r}): the "
                "layer's QK circuits read the unscaled input."
            )
        transcoder.init_qk_from_layer_(model, layer, seed=train.seed)
    try:
        summary = fit_attention_transcoder(
            transcoder, pairs, train, run=run, desc=f"attention transcoder L{layer}"
        )
    finally:
        windows.close()
    transcoder.metadata = {
        **_provenance(model, layer, hook_in),
        "context_size": context_size,
        "corpus": str(getattr(corpus, "corpus_id", corpus)),
        "training": {
            **asdict(train),
            "qk_init": qk_init,
            "tokens": summary.tokens,
            "seconds": round(summary.seconds, 2),
            "final": summary.final,
        },
    }
    return transcoder.eval()


class _Adam:
    """Plain Adam (Kingma & Ba 2015) with bias correction. Written out because constructing
    `torch.optim.Adam` imports torch._dynamo (seconds on a small CPU), which would dominate
    short fits such as the unit tests."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float]):
        self.params = [p for p in params if p.requires_grad]
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, 1e-8
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        c1, c2 = 1 - self.beta1**self.t, 1 - self.beta2**self.t
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            m.mul_(self.beta1).add_(p.grad, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


def _optimizer_step(
    transcoder: AttentionTranscoder,
    optimizer: _Adam,
    loss: Tensor,
    train: AttentionTrainConfig,
    step: int,
) -> None:
    """Backward, keep W_O on the sphere, clip, scheduled Adam step, renormalise W_O."""
    if not torch.isfinite(loss):
        raise InterplabError(f"the training loss became {float(loss)} at step {step}; lower lr.")
    optimizer.zero_grad()
    loss.backward()
    transcoder.remove_parallel_grad_()
    if train.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(transcoder.parameters(), train.max_grad_norm)
    optimizer.lr = train.lr * train.lr_factor(step)
    optimizer.step()
    transcoder.normalize_decoder_()


# ---------------------------------------------------------------------------- splicing
@dataclass
class SplicedRun:
    """A forward pass with the transcoder in place of an attention layer's output."""

    logits: Float[Tensor, "batch pos vocab"]
    """Model logits."""
    latents: Float[Tensor, "batch pos n_heads"]
    """Transcoder latents before the edit."""
    edited: Float[Tensor, "batch pos n_heads"]
    """Latents after the edit (what was decoded)."""
    output: Float[Tensor, "batch pos d_model"]
    """What was written into hook_attn_out."""


def _layer_of(transcoder: AttentionTranscoder, model: Any, layer: int | None) -> int:
    if layer is None:
        layer = transcoder.metadata.get("layer")
        if layer is None:
            raise InterplabError(
                "the transcoder's metadata names no layer; pass layer=... explicitly."
            )
    _check_layer(model, layer)
    if int(model.cfg.d_model) != transcoder.d_model:
        raise InterplabError(
            f"the model has d_model={model.cfg.d_model}, the transcoder d_model={transcoder.d_model}: "
            "it was trained on another model."
        )
    return layer


def run_with_attention_transcoder(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    transcoder: AttentionTranscoder,
    edit: LatentEdit | None = None,
    *,
    layer: int | None = None,
    keep_error: bool = False,
) -> SplicedRun:
    """Run `model` with the attention layer's output replaced by the transcoder's.

    The transcoder reads the layer's input from the same forward pass, `edit` (if given)
    maps its latents to edited latents, and the decoded result replaces hook_attn_out.
    With `keep_error` the transcoder's reconstruction error is kept (the output becomes
    real + decode(edited) - decode(latents)), so without an edit the model is unchanged and
    an edit acts on the true layer output: ablating head h subtracts exactly f_h W_O[h].
    """
    layer = _layer_of(transcoder, model, layer)
    hook_in, hook_out = attention_hooks(model, layer)
    state: dict[str, Tensor] = {}

    def read(act: Tensor, hook: Any) -> None:
        state["x"] = act

    def replace_out(act: Tensor, hook: Any) -> Tensor:
        latents = transcoder.encode(state["x"].to(transcoder.W_O.device))
        edited = edit(latents) if edit is not None else latents
        if not isinstance(edited, Tensor) or edited.shape != latents.shape:
            got = tuple(edited.shape) if isinstance(edited, Tensor) else type(edited).__name__
            raise InterplabError(
                f"the latent edit returned {got}; expected a tensor of shape {tuple(latents.shape)}."
            )
        if keep_error:
            new = act + ((edited - latents) @ transcoder.W_O).to(act)
        else:
            new = transcoder.decode(edited).to(act)
        state["latents"], state["edited"], state["output"] = (
            latents.detach(),
            edited.detach(),
            new.detach(),
        )
        return new

    device = next(model.parameters()).device
    with model.hooks(fwd_hooks=[(hook_in, read), (hook_out, replace_out)]):
        logits = model(tokens.to(device))
    if "latents" not in state:
        raise InterplabError(f"hook {hook_out!r} did not fire in a forward pass of this model.")
    return SplicedRun(
        logits=logits, latents=state["latents"], edited=state["edited"], output=state["output"]
    )


def ablate_heads(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    transcoder: AttentionTranscoder,
    heads: Sequence[int] | int,
    *,
    layer: int | None = None,
    keep_error: bool = True,
) -> SplicedRun:
    """Run the model with transcoder heads `heads` zeroed at every position (after the TopK
    selection, so no other head takes their place). `keep_error` as in
    `run_with_attention_transcoder`; default True, so only the heads' writes are removed."""
    heads = transcoder._check_heads(heads)  # type: ignore[arg-type]

    def edit(latents: Tensor) -> Tensor:
        out = latents.clone()
        out[..., heads] = 0
        return out

    return run_with_attention_transcoder(
        model, tokens, transcoder, edit, layer=layer, keep_error=keep_error
    )


def steer_heads(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    transcoder: AttentionTranscoder,
    heads: Sequence[int] | int,
    *,
    scale: float = 1.0,
    value: float | None = None,
    positions: Sequence[int] | None = None,
    layer: int | None = None,
    keep_error: bool = True,
) -> SplicedRun:
    """Run the model with the latents of `heads` multiplied by `scale`, or set to `value`
    (which also switches on a head that was not selected), at `positions` (default all)."""
    heads = transcoder._check_heads(heads)  # type: ignore[arg-type]
    T = tokens.shape[-1]
    where = list(range(T)) if positions is None else list(positions)
    for p in where:
        if isinstance(p, bool) or not isinstance(p, int) or not -T <= p < T:
            raise InterplabError(f"position {p!r} is out of range for {T} tokens.")

    def edit(latents: Tensor) -> Tensor:
        out = latents.clone()
        rows = torch.tensor(where, device=out.device)[:, None]
        cols = torch.tensor(heads, device=out.device)[None, :]
        if value is None:
            out[:, rows, cols] = out[:, rows, cols] * scale
        else:
            out[:, rows, cols] = float(value)
        return out

    return run_with_attention_transcoder(
        model, tokens, transcoder, edit, layer=layer, keep_error=keep_error
    )


# ---------------------------------------------------------------------------- evaluation
@dataclass
class AttentionTranscoderEvaluation:
    """Reconstruction and spliced-in loss of an attention transcoder on held-out windows.

    Per-window values are kept so every mean has a standard error over windows (positions
    in one window are not independent). CE is averaged over predictions at positions
    1..T-2 and KL over positions 1..T-1; BOS is patched but left out of every average, and
    out of the FVU, as in `evaluate_dictionary`.
    """

    layer: int
    """Attention layer replaced."""
    hook_name: str
    """Input hook read."""
    hook_name_out: str
    """Output hook replaced."""
    context_size: int
    """Tokens per window, BOS included."""
    ce_clean: Float[Tensor, " window"]
    """Mean next-token cross-entropy of the unmodified model, per window."""
    ce_spliced: Float[Tensor, " window"]
    """Same with hook_attn_out replaced by the transcoder's output."""
    ce_zero: Float[Tensor, " window"]
    """Same with hook_attn_out zero-ablated."""
    kl_spliced: Float[Tensor, " window"]
    """Mean KL(P_clean || P_spliced) per window."""
    sq_error: Float[Tensor, " window"]
    """Summed squared reconstruction error over non-BOS positions, per window."""
    variance: Float[Tensor, " window"]
    """Summed squared deviation of the real output from its mean over all windows (non-BOS
    positions), per window: FVU = sum(sq_error) / sum(variance)."""
    head_density: Float[Tensor, " n_heads"]
    """Fraction of non-BOS positions at which each head is selected."""
    l0: float
    """Mean nonzero latents per non-BOS position."""

    @property
    def n_windows(self) -> int:
        return int(self.ce_clean.numel())

    @staticmethod
    def _mean_sem(values: Tensor) -> tuple[float, float]:
        v = values.double()
        n = v.numel()
        return float(v.mean()), float(v.std() / math.sqrt(n)) if n > 1 else math.nan

    @property
    def fvu(self) -> float:
        """Pooled fraction of variance unexplained."""
        return _ratio(self.sq_error, self.variance)[0]

    @property
    def fvu_sem(self) -> float:
        """Standard error of the FVU over windows (delta method for a ratio of means)."""
        return _ratio(self.sq_error, self.variance)[1]

    @property
    def ce_recovered(self) -> float:
        """(CE_zero - CE_spliced) / (CE_zero - CE_clean), from the window means."""
        return _ratio(self.ce_zero - self.ce_spliced, self.ce_zero - self.ce_clean)[0]

    @property
    def ce_recovered_sem(self) -> float:
        """Standard error of `ce_recovered` over windows (delta method for a ratio of means)."""
        return _ratio(self.ce_zero - self.ce_spliced, self.ce_zero - self.ce_clean)[1]

    @property
    def dead_fraction(self) -> float:
        """Heads never selected on the evaluation windows."""
        return float((self.head_density == 0).float().mean())

    def summary(self) -> dict[str, float]:
        """Scalar metrics (means with standard errors over windows)."""
        out: dict[str, float] = {"fvu": self.fvu, "fvu_sem": self.fvu_sem, "l0": self.l0}
        for name in ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced"):
            out[name], out[f"{name}_sem"] = self._mean_sem(getattr(self, name))
        out["ce_recovered"] = self.ce_recovered
        out["ce_recovered_sem"] = self.ce_recovered_sem
        out["dead_fraction"] = self.dead_fraction
        out["n_windows"] = self.n_windows
        return out

    def table_rows(self) -> list[tuple[str, str]]:
        """(metric, "mean ± sem") rows."""
        s = self.summary()
        return [
            ("windows", f"{self.n_windows} x {self.context_size} tokens"),
            ("FVU", f"{s['fvu']:.4f} ± {s['fvu_sem']:.4f}"),
            ("L0", f"{s['l0']:.2f}"),
            ("dead heads", f"{s['dead_fraction']:.3f}"),
            ("CE clean", f"{s['ce_clean']:.4f} ± {s['ce_clean_sem']:.4f}"),
            ("CE spliced", f"{s['ce_spliced']:.4f} ± {s['ce_spliced_sem']:.4f}"),
            ("CE zero-ablated", f"{s['ce_zero']:.4f} ± {s['ce_zero_sem']:.4f}"),
            ("CE recovered", f"{s['ce_recovered']:.4f} ± {s['ce_recovered_sem']:.4f}"),
            ("KL spliced", f"{s['kl_spliced']:.5f} ± {s['kl_spliced_sem']:.5f}"),
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary and setup."""
        return {
            "layer": self.layer,
            "hook_name": self.hook_name,
            "hook_name_out": self.hook_name_out,
            "context_size": self.context_size,
            "metrics": {k: (v if math.isfinite(v) else None) for k, v in self.summary().items()},
            "head_density": [float(v) for v in self.head_density.tolist()],
        }


def _ratio(a: Tensor, b: Tensor) -> tuple[float, float]:
    """mean(a) / mean(b) and its delta-method standard error sqrt(var(a - R b) / n) / |mean b|."""
    a, b = a.double(), b.double()
    mean_b = float(b.mean())
    if mean_b == 0:
        return math.nan, math.nan
    r = float(a.mean()) / mean_b
    n = a.numel()
    sem = float((a - r * b).std() / math.sqrt(n)) / abs(mean_b) if n > 1 else math.nan
    return r, sem


def evaluate_attention_transcoder(
    transcoder: AttentionTranscoder,
    model: Any,
    corpus: Any = "storyworld",
    *,
    n_tokens: int = 16_384,
    context_size: int | None = None,
    batch_size: int = 8,
    seed: int = 1,
    layer: int | None = None,
) -> AttentionTranscoderEvaluation:
    """FVU, L0 and CE loss clean / spliced / zero-ablated of `transcoder` replacing its layer.

    Every forward carries three copies of a window batch (clean, spliced, zero-ablated
    attention output), as `evaluate_dictionary` does. `corpus` is a corpus spec or token
    windows [window, pos] (position 0 = BOS); `seed` packs documents in another order than
    training's default (0). `n_tokens` non-BOS positions are evaluated (whole windows).
    """
    from interplab.data.corpus import pack

    layer = _layer_of(transcoder, model, layer)
    hook_in, hook_out = attention_hooks(model, layer)
    for name, value in (("n_tokens", n_tokens), ("batch_size", batch_size)):
        _check_int(name, value)
    if context_size is None:
        context_size = corpus.shape[-1] if isinstance(corpus, Tensor) else min(128, model.cfg.n_ctx)
    _check_int("context_size", context_size, low=3)
    if context_size > model.cfg.n_ctx:
        raise InterplabError(
            f"context_size {context_size} is longer than the model's context ({model.cfg.n_ctx})."
        )
    n_windows = math.ceil(n_tokens / (context_size - 1))
    if isinstance(corpus, Tensor):
        if corpus.ndim != 2 or corpus.shape[1] < context_size:
            raise InterplabError(
                f"token windows must be [window, pos] with >= {context_size} positions, "
                f"got shape {tuple(corpus.shape)}."
            )
        windows = corpus[:n_windows, :context_size].long()
    else:
        tokenizer = getattr(model, "tokenizer", None)
        windows = pack(corpus, tokenizer, context_size, n_windows, seed=seed).ids

    state: dict[str, Tensor] = {}

    def read(act: Tensor, hook: Any) -> None:
        state["x"] = act

    def replace_out(act: Tensor, hook: Any) -> Tensor:
        n = act.shape[0] // 3
        latents = transcoder.encode(state["x"][:n].to(transcoder.W_O.device))
        state["y"], state["latents"] = act[:n].detach(), latents
        out = act.clone()
        out[n : 2 * n] = transcoder.decode(latents).to(act)
        out[2 * n :] = 0
        return out

    device = next(model.parameters()).device
    per: dict[str, list[Tensor]] = {k: [] for k in ("clean", "spliced", "zero", "kl", "sq")}
    density = torch.zeros(transcoder.n_heads, dtype=torch.float64)
    ys: list[Tensor] = []
    was_training = transcoder.training
    transcoder.eval()
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[(hook_in, read), (hook_out, replace_out)]):
            for start in range(0, windows.shape[0], batch_size):
                tokens = windows[start : start + batch_size].to(device)
                n = tokens.shape[0]
                logp = model(tokens.repeat(3, 1)).float().log_softmax(-1)
                targets = tokens[:, 2:, None]
                for key, lp in zip(("clean", "spliced", "zero"), logp.split(n), strict=True):
                    per[key].append(-lp[:, 1:-1].gather(-1, targets).squeeze(-1).mean(1).cpu())
                clean, spliced = logp[:n, 1:], logp[n : 2 * n, 1:]
                kl = (clean.exp() * (clean - spliced)).sum(-1).mean(1)
                per["kl"].append(kl.cpu())
                y = state["y"][:, 1:].float().cpu()
                latents = state["latents"][:, 1:].cpu()
                y_hat = transcoder.decode(latents.to(transcoder.W_O.device)).float().cpu()
                per["sq"].append((y_hat - y).pow(2).sum((1, 2)))
                ys.append(y)
                density += (latents != 0).reshape(-1, transcoder.n_heads).double().sum(0)
    finally:
        transcoder.train(was_training)
    y_all = torch.cat(ys).double()  # window, pos - 1, d_model
    n_positions = y_all.shape[0] * y_all.shape[1]
    variance = (y_all - y_all.mean((0, 1))).pow(2).sum((1, 2))
    l0 = float(density.sum()) / n_positions
    return AttentionTranscoderEvaluation(
        layer=layer,
        hook_name=hook_in,
        hook_name_out=hook_out,
        context_size=int(windows.shape[1]),
        ce_clean=torch.cat(per["clean"]),
        ce_spliced=torch.cat(per["spliced"]),
        ce_zero=torch.cat(per["zero"]),
        kl_spliced=torch.cat(per["kl"]),
        sq_error=torch.cat(per["sq"]).double(),
        variance=variance,
        head_density=(density / n_positions).float(),
        l0=l0,
    )


# ---------------------------------------------------------------------------- files
def save_attention_transcoder(
    transcoder: AttentionTranscoder,
    path: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `cfg.json` + `sae_weights.safetensors` to folder `path`, atomically (a temporary
    folder renamed into place). `metadata` is merged into `transcoder.metadata`. An existing
    non-empty folder is only replaced with `overwrite=True`. Returns the folder."""

    from interplab import __version__

    if not isinstance(transcoder, AttentionTranscoder):
        raise InterplabError(f"expected an AttentionTranscoder, got {type(transcoder).__name__}.")
    path = Path(path)
    cfg = {
        "architecture": ARCHITECTURE,
        "d_model": transcoder.d_model,
        "d_in": transcoder.d_model,
        "d_sae": transcoder.n_heads,
        "d_out": transcoder.d_model,
        "k": transcoder.k,
        "dtype": str(transcoder.W_O.dtype).removeprefix("torch."),
        "config": {**transcoder.config.to_dict(), "input_norm": transcoder.input_norm},
        "metadata": {
            **transcoder.metadata,
            **(metadata or {}),
            "interplab_version": __version__,
        },
    }
    try:
        cfg_text = json.dumps(cfg, indent=2)
    except TypeError as error:
        raise InterplabError(f"metadata must be JSON-serialisable: {error}.") from error
    tensors = {k: v.to("cpu").contiguous() for k, v in transcoder.file_tensors().items()}
    if path.exists():
        if not path.is_dir():
            raise InterplabError(f"cannot save to {path}: it exists and is not a folder.")
        if any(path.iterdir()) and not overwrite:
            raise InterplabError(f"{path} is not empty; pass overwrite=True to replace it.")
    return write_folder(path, cfg_text, tensors)


def load_attention_transcoder(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> AttentionTranscoder:
    """Load a folder written by `save_attention_transcoder` (eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise InterplabError(f"no attention transcoder at {folder}: not a folder.")
    cfg_file, weights_file = folder / CFG_FILE, folder / WEIGHTS_FILE
    for file in (cfg_file, weights_file):
        if not file.exists():
            raise InterplabError(f"missing {file}: an attention transcoder folder needs it.")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as error:
        raise InterplabError(f"{cfg_file} is not valid JSON: {error}.") from error
    if not isinstance(cfg, dict) or cfg.get("architecture") != ARCHITECTURE:
        got = cfg.get("architecture") if isinstance(cfg, dict) else type(cfg).__name__
        raise InterplabError(
            f"{cfg_file}: architecture {got!r} is not {ARCHITECTURE!r}; "
            "load other dictionaries with load_dictionary."
        )
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as error:
        raise InterplabError(
            f"could not read {weights_file}: {error}. The file may be truncated or corrupt."
        ) from error
    if not isinstance(cfg.get("config"), dict):
        raise InterplabError(f"{cfg_file}: field 'config' must be an object.")
    config = AttentionTranscoderConfig.from_dict(cfg["config"])
    d_model = cfg.get("d_model")
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model <= 0:
        raise InterplabError(
            f"{cfg_file}: field 'd_model' must be a positive integer, got {d_model!r}."
        )
    stored = tensors.get("W_O", torch.empty(0)).dtype
    transcoder = AttentionTranscoder(config, d_model, device=device, dtype=dtype or stored)
    expected = transcoder.state_dict()
    if set(tensors) != set(expected):
        raise InterplabError(
            f"{weights_file}: tensors {sorted(tensors)} do not match the expected {sorted(expected)}."
        )
    for name, current in expected.items():
        if tuple(tensors[name].shape) != tuple(current.shape):
            raise InterplabError(
                f"{weights_file}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"expected {tuple(current.shape)}."
            )
    transcoder.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    metadata = dict(cfg.get("metadata") or {})
    metadata.pop("interplab_version", None)
    transcoder.metadata = metadata
    return transcoder.eval()


__all__ = [
    "AttentionTrainConfig",
    "AttentionTranscoder",
    "AttentionTranscoderConfig",
    "AttentionTranscoderEvaluation",
    "AttentionTranscoderOutput",
    "SplicedRun",
    "ablate_heads",
    "attention_hooks",
    "capture_attention_io",
    "FitSummary",
    "evaluate_attention_transcoder",
    "fit_attention_transcoder",
    "load_attention_transcoder",
    "run_with_attention_transcoder",
    "save_attention_transcoder",
    "steer_heads",
    "stream_windows",
    "train_attention_transcoder",
]
