"""The `Dictionary` interface shared by every variant, and its initialisation helpers.

A dictionary maps input activations x [batch, d_in] to sparse latents [batch, d_sae] and
decodes them into a target space [batch, d_out] (d_out = d_in for autoencoders):

    x_c    = x - b_dec               (only when apply_b_dec_to_input)
    f      = sigma(x_c @ W_enc ...)  (the variant's sparse activation)
    x_hat  = f @ W_dec + b_dec (+ x @ W_skip.T for skip transcoders)

Parameter names and shapes follow SAELens' file layout (`W_enc [d_in, d_sae]`,
`W_dec [d_sae, d_out]`, `b_enc [d_sae]`, `b_dec [d_out]`, `W_skip [d_out, d_in]`), so saving
and loading is a rename-free copy. Variants differ only in how they encode and which loss
terms they add; each lives in its own module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from interplab.dictionaries.configs import BDecInit, DictionaryConfig, SAEConfig, Transcoder
from interplab.dictionaries.kernels import SparseCode, dense_decode, sparse_decode
from interplab.errors import InterplabError


@dataclass
class DictionaryOutput:
    """What `Dictionary.forward` returns for one batch."""

    x_hat: Float[Tensor, "batch d_out"]
    """Reconstruction of the target."""
    loss: Tensor
    """Scalar training loss: mse plus the variant's weighted penalty terms."""
    losses: dict[str, Tensor]
    """Unweighted loss terms, e.g. `mse` (squared error summed over dimensions, averaged over
    tokens), `l1`, `l0`, `aux`, `matryoshka`."""
    l0: Tensor
    """Mean number of active (positive) latents per token (detached)."""
    fired: Bool[Tensor, " d_sae"]
    """Latents that were active on at least one token of the batch."""
    code: SparseCode | None = field(default=None, repr=False)
    """Sparse latents, for variants that compute them sparsely (TopK family)."""
    dense_latents: Tensor | None = field(default=None, repr=False)

    @property
    def latents(self) -> Float[Tensor, "batch d_sae"]:
        """Dense latent activations (materialised on first access for sparse variants)."""
        if self.dense_latents is None:
            assert self.code is not None
            self.dense_latents = self.code.to_dense()
        return self.dense_latents


def geometric_median(
    points: Float[Tensor, "n d"], max_iter: int = 100, tol: float = 1e-6
) -> Float[Tensor, " d"]:
    """Geometric median argmin_m sum_i ||p_i - m|| by Weiszfeld's iterations, started at the
    mean and stopped when the update moves less than `tol` times the data scale."""
    pts = points.detach().to(torch.float64)
    median = pts.mean(0)
    scale = (pts - median).norm(dim=1).mean().clamp_min(1e-30)
    for _ in range(max_iter):
        dist = (pts - median).norm(dim=1).clamp_min(1e-12 * float(scale))
        weights = 1.0 / dist
        new = (weights[:, None] * pts).sum(0) / weights.sum()
        moved = (new - median).norm()
        median = new
        if moved < tol * scale:
            break
    return median.to(points.dtype)


def dense_encoder_scale(d_in: int, d_sae: int) -> float:
    """Initial scale s of a ReLU-like encoder `W_enc = s * W_dec.T` (unit-norm rows w_i):
    s = 2 d_in / (d_sae + 2 d_in).

    At initialisation about half of the pre-activations w_i . x are positive, so
    x_hat = s * sum_i ReLU(w_i . x) w_i. For random directions w_i and centred inputs x in
    general position, E[x_hat] = s (d_sae / (2 d_in)) x and E||x_hat||^2 = s^2 ||x||^2
    (d_sae^2 / (4 d_in^2) + d_sae / (2 d_in)); the s above minimises E||x_hat - x||^2. With
    s = 1 the reconstruction starts d_sae / (2 d_in) times too large (8x at 16 latents per
    input dimension: FVU ~ 50-70), which Adam then needs hundreds of steps to undo. An
    untied random encoder (transcoders) gets the same s: its initial output, uncorrelated
    with the target, then has mean squared norm 2r / (r + 2)^2 of the input's (r = d_sae /
    d_in), at most 1/4.
    """
    return 2 * d_in / (d_sae + 2 * d_in)


class Dictionary(nn.Module):
    """A sparse dictionary (SAE or transcoder); see the module docstring for the computation.

    Build with `build_dictionary(config, d_in, d_out)`. `forward(x, y)` is the training pass;
    `encode`/`decode` are the inference maps (BatchTopK uses its learned threshold there).
    """

    has_b_enc: ClassVar[bool] = True
    """Whether the variant has an encoder bias `b_enc` (Gated uses `b_gate`/`b_mag`)."""
    dense_at_init: ClassVar[bool] = False
    """Whether about half of the latents fire on every token at initialisation (ReLU, Gated,
    JumpReLU), so the encoder must start small (`dense_encoder_scale`). The TopK family keeps
    k latents per token, which bounds the initial reconstruction without rescaling."""

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def __init__(
        self,
        config: DictionaryConfig,
        d_in: int,
        d_out: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        variant = config.variant
        is_transcoder = isinstance(config, Transcoder)
        for name, value in (("d_in", d_in), ("d_out", d_out)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise InterplabError(f"{name} must be a positive integer, got {value!r}.")
        d_out = d_in if d_out is None else d_out
        if not is_transcoder and d_out != d_in:
            raise InterplabError(
                f"an autoencoder has d_out = d_in, got d_in={d_in}, d_out={d_out}; "
                "wrap the config in Transcoder(...) to map between different spaces."
            )
        apply_b_dec = variant.apply_b_dec_to_input
        if apply_b_dec is None:
            apply_b_dec = not is_transcoder
        if apply_b_dec and d_in != d_out:
            raise InterplabError(
                f"apply_b_dec_to_input needs d_in == d_out, got d_in={d_in}, d_out={d_out}."
            )
        self.config = config
        self.variant: SAEConfig = variant
        self.d_in, self.d_sae, self.d_out = d_in, variant.d_sae, d_out
        self.apply_b_dec_to_input = bool(apply_b_dec)
        self.skip = bool(getattr(config, "skip", False))
        # Free-form provenance (model_name, hook_name, ...) written into cfg.json's metadata.
        self.metadata: dict[str, Any] = {}

        factory = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(d_in, self.d_sae, **factory))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, d_out, **factory))
        if self.has_b_enc:
            self.b_enc = nn.Parameter(torch.zeros(self.d_sae, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **factory))
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, **factory))
        self._init_variant_parameters(factory)
        self.reset_parameters()

    # ----------------------------------------------------------------- construction
    def _init_variant_parameters(self, factory: dict[str, Any]) -> None:
        """Create the variant's extra parameters/buffers (thresholds, gates)."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit-norm decoder rows; encoder = decoder transpose where the shapes allow
        (Gao et al. 2024), else independent random unit-norm encoder columns. Variants that
        are `dense_at_init` then scale the encoder by `dense_encoder_scale(d_in, d_sae)`."""
        self.W_dec.copy_(torch.randn_like(self.W_dec))
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if self.variant.init_encoder_as_decoder_transpose and self.d_in == self.d_out:
            self.W_enc.copy_(self.W_dec.T)
        else:
            self.W_enc.copy_(torch.randn_like(self.W_enc))
            self.W_enc.div_(self.W_enc.norm(dim=0, keepdim=True).clamp_min(1e-12))
        if self.dense_at_init:
            self.W_enc.mul_(dense_encoder_scale(self.d_in, self.d_sae))

    @torch.no_grad()
    def init_b_dec_(self, sample: Float[Tensor, "n d_out"], method: BDecInit | None = None) -> None:
        """Set `b_dec` from a sample of targets: geometric median, mean, or zeros."""
        method = method or self.variant.b_dec_init
        sample = sample.reshape(-1, sample.shape[-1])
        if sample.shape[-1] != self.d_out:
            raise InterplabError(
                f"b_dec sample has {sample.shape[-1]} features, expected d_out={self.d_out}."
            )
        if method == "zeros":
            self.b_dec.zero_()
        elif method == "mean":
            self.b_dec.copy_(sample.to(torch.float64).mean(0))
        elif method == "geometric_median":
            self.b_dec.copy_(geometric_median(sample))
        else:
            raise InterplabError(
                f"unknown b_dec init {method!r}; expected 'geometric_median', 'mean' or 'zeros'."
            )

    # ----------------------------------------------------------------- decoder constraint
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (no-op when `normalize_decoder` is off)."""
        if self.variant.normalize_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Project out the gradient component parallel to each decoder row, so an optimizer
        step moves rows (to first order) along the unit sphere (Bricken et al. 2023)."""
        grad = self.W_dec.grad
        if grad is None or not self.variant.normalize_decoder:
            return
        unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        grad.sub_((grad * unit).sum(1, keepdim=True) * unit)

    @torch.no_grad()
    def fold_activation_scale_(self, scale_in: float, scale_out: float) -> None:
        """Fold input/target scale factors into the weights.

        A dictionary trained on `scale_in * x` predicting `scale_out * y` becomes one that maps
        raw x to raw y: W_enc *= scale_in, W_dec, b_dec /= scale_out, W_skip *= scale_in /
        scale_out. Pre-activations are unchanged, so thresholds and gates stay valid.
        """
        self.W_enc.mul_(scale_in)
        self.W_dec.div_(scale_out)
        self.b_dec.div_(scale_out)
        if self.skip:
            self.W_skip.mul_(scale_in / scale_out)

    # ----------------------------------------------------------------- shared pieces
    def _check_input(self, x: Tensor, name: str, width: int) -> Tensor:
        if not isinstance(x, Tensor):
            raise InterplabError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
        if x.ndim < 1 or x.shape[-1] != width:
            expected = "d_in" if name == "x" else "d_out"
            raise InterplabError(
                f"{name} has shape {tuple(x.shape)}; expected last dimension {expected}={width}."
            )
        return x.to(self.W_enc.dtype)

    def _centered(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def _skip_out(self, x: Tensor) -> Tensor | float:
        return x @ self.W_skip.T if self.skip else 0.0

    def _decode_code(self, code: SparseCode, sparse: bool) -> Tensor:
        """Sparse latents times W_dec (no bias), with the sparse or the dense kernel."""
        return sparse_decode(code, self.W_dec) if sparse else dense_decode(code, self.W_dec)

    @staticmethod
    def _mse(x_hat: Tensor, target: Tensor) -> Tensor:
        """Squared error summed over dimensions, averaged over tokens."""
        return (x_hat - target).pow(2).sum(-1).mean()

    def _dense_output(
        self, latents: Tensor, x_hat: Tensor, loss: Tensor, losses: dict[str, Tensor]
    ) -> DictionaryOutput:
        active = latents.detach() > 0
        return DictionaryOutput(
            x_hat=x_hat,
            loss=loss,
            losses=losses,
            l0=active.sum(-1).to(x_hat.dtype).mean(),
            fired=active.any(0),
            dense_latents=latents,
        )

    # ----------------------------------------------------------------- public API
    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Inference latents for inputs with any leading shape."""
        x = self._check_input(x, "x", self.d_in)
        flat = x.reshape(-1, self.d_in)
        return self._encode(flat).reshape(*x.shape[:-1], self.d_sae)

    def decode(
        self, latents: Float[Tensor, "... d_sae"], x: Float[Tensor, "... d_in"] | None = None
    ) -> Float[Tensor, "... d_out"]:
        """`latents @ W_dec + b_dec` (+ `x @ W_skip.T`: skip transcoders need the input `x`)."""
        if latents.shape[-1] != self.d_sae:
            raise InterplabError(
                f"latents have shape {tuple(latents.shape)}; expected last dimension d_sae={self.d_sae}."
            )
        out = latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.skip:
            if x is None:
                raise InterplabError(
                    "a skip transcoder decodes with its input: call decode(latents, x)."
                )
            out = out + self._skip_out(self._check_input(x, "x", self.d_in))
        return out

    def forward(
        self,
        x: Float[Tensor, "batch d_in"],
        y: Float[Tensor, "batch d_out"] | None = None,
        *,
        sparsity_scale: float = 1.0,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
    ) -> DictionaryOutput:
        """Reconstruct `y` (default: `x`) and compute the training loss.

        `sparsity_scale` multiplies the sparsity coefficient (the trainer's warmup);
        `dead_mask` marks latents that count as dead for the AuxK loss (TopK family).
        """
        x = self._check_input(x, "x", self.d_in)
        if x.ndim != 2:
            raise InterplabError(f"forward expects x of shape [batch, d_in], got {tuple(x.shape)}.")
        if y is None:
            if self.d_out != self.d_in or isinstance(self.config, Transcoder):
                raise InterplabError("a transcoder needs its target: call forward(x, y).")
            target = x
        else:
            target = self._check_input(y, "y", self.d_out)
            if target.shape[0] != x.shape[0]:
                raise InterplabError(
                    f"x and y have different numbers of rows: {x.shape[0]} and {target.shape[0]}."
                )
        return self._forward(x, target, float(sparsity_scale), dead_mask)

    # ----------------------------------------------------------------- per variant
    def _encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _forward(
        self, x: Tensor, target: Tensor, sparsity_scale: float, dead_mask: Tensor | None
    ) -> DictionaryOutput:
        raise NotImplementedError

    def file_tensors(self) -> dict[str, Tensor]:
        """Tensors in SAELens' `sae_weights.safetensors` layout (detached)."""
        out = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.has_b_enc:
            out["b_enc"] = self.b_enc
        if self.skip:
            out["W_skip"] = self.W_skip
        return {name: t.detach() for name, t in out.items()}

    @torch.no_grad()
    def load_file_tensors_(self, tensors: dict[str, Tensor]) -> None:
        """Copy tensors in the `file_tensors` layout into this dictionary."""
        expected = self.file_tensors()
        for name, current in expected.items():
            if name not in tensors:
                raise InterplabError(f"missing tensor {name!r}; expected {sorted(expected)}.")
            if tuple(tensors[name].shape) != tuple(current.shape):
                raise InterplabError(
                    f"tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                    f"expected {tuple(current.shape)}."
                )
        self._copy_file_tensors(tensors)

    def _copy_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        for name in ("W_enc", "W_dec", "b_dec", "b_enc", "W_skip"):
            if name in tensors and hasattr(self, name):
                getattr(self, name).copy_(tensors[name])

    def extra_repr(self) -> str:
        kind = type(self.variant).__name__
        if isinstance(self.config, Transcoder):
            kind = f"{type(self.config).__name__}({kind})"
        return f"{kind}, d_in={self.d_in}, d_sae={self.d_sae}, d_out={self.d_out}"
