"""Configs for every dictionary variant: one typed dataclass each.

`d_in` and `d_out` are not part of a config: they come from the data when the dictionary is
built (`build_dictionary(config, d_in, d_out)`), so one config can be trained on any hook.
A transcoder wraps the config of the sparse encoder it uses (`Transcoder(TopK(4096, k=32))`).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, fields
from typing import Any, ClassVar, Literal, get_args

from interplab.errors import InterplabError

BDecInit = Literal["geometric_median", "mean", "zeros"]
ThresholdParam = Literal["direct", "log"]


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InterplabError(f"{name} must be a positive integer, got {value!r}.")


def _check_non_negative(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InterplabError(f"{name} must be a number >= 0, got {value!r}.")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InterplabError(f"{name} must be a number > 0, got {value!r}.")


def _check_choice(name: str, value: object, literal: Any) -> None:
    choices = get_args(literal)
    if value not in choices:
        raise InterplabError(
            f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}."
        )


@dataclass
class SAEConfig:
    """Fields shared by every sparse encoder variant (not instantiated directly)."""

    d_sae: int
    """Number of latents (the dictionary width)."""
    _: KW_ONLY
    apply_b_dec_to_input: bool | None = None
    """Subtract `b_dec` from the input before encoding (SAELens' `apply_b_dec_to_input`).
    None means True for autoencoders and False for transcoders (whose `b_dec` lives in the
    output space)."""
    b_dec_init: BDecInit = "geometric_median"
    """How the trainer initialises `b_dec` from the first batch of targets: their geometric
    median (Weiszfeld iterations), their mean, or zeros."""
    init_encoder_as_decoder_transpose: bool = True
    """Start with `W_enc = W_dec.T` (Gao et al. 2024; Anthropic, April 2024 update) when the
    shapes allow it (d_in == d_out); otherwise the encoder gets independent random unit columns."""
    normalize_decoder: bool = True
    """Keep decoder rows at unit norm during training (renormalise after each step and remove
    the gradient component parallel to each row)."""

    architecture: ClassVar[str] = ""
    """SAELens `architecture` name of the inference form of this variant."""

    def __post_init__(self) -> None:
        _check_positive_int("d_sae", self.d_sae)
        if self.apply_b_dec_to_input is not None and not isinstance(
            self.apply_b_dec_to_input, bool
        ):
            raise InterplabError(
                f"apply_b_dec_to_input must be True, False or None, got {self.apply_b_dec_to_input!r}."
            )
        _check_choice("b_dec_init", self.b_dec_init, BDecInit)

    @property
    def variant(self) -> SAEConfig:
        """The sparse encoder config (itself; a `Transcoder` returns the one it wraps)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: `{"type": class name, **fields}` (inverse: `config_from_dict`)."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass
class ReLU(SAEConfig):
    """Standard SAE: ReLU latents, L1 penalty weighted by decoder row norms.

    Anthropic, "Circuits Updates - April 2024": loss = ||x - x_hat||^2 + l1 * sum_i f_i ||W_dec_i||.
    """

    l1_coefficient: float = 5.0
    """L1 penalty weight (Anthropic use ~5 with inputs normalised to E||x||^2 = d_in)."""
    use_sparse_kernels: bool = True
    """Train batches whose active fraction is at most `sparse_max_density` through the
    sparse kernels (`interplab.dictionaries.kernels`): only the encoder forward stays a dense
    matmul; the decoder and all gradients touch only the active latents. False always uses
    dense matmuls (same numbers, slower once the dictionary is sparse)."""
    sparse_max_density: float = 0.05
    """Largest fraction of active (token, latent) pairs in a batch that takes the sparse path;
    denser batches (early training, when about half the latents fire) use dense matmuls.
    0.05 is where the two paths cost the same in `benchmarks/bench_relu_kernels.py` (CPU, one
    thread, d_in 256, d_sae 4096, 4096 tokens); at 1% the sparse pass is ~2.5x faster."""

    architecture: ClassVar[str] = "standard"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_non_negative("l1_coefficient", self.l1_coefficient)
        if not isinstance(self.use_sparse_kernels, bool):
            raise InterplabError(
                f"use_sparse_kernels must be True or False, got {self.use_sparse_kernels!r}."
            )
        _check_non_negative("sparse_max_density", self.sparse_max_density)
        if self.sparse_max_density > 1:
            raise InterplabError(
                f"sparse_max_density must be a fraction in [0, 1], got {self.sparse_max_density!r}."
            )


@dataclass
class TopK(SAEConfig):
    """TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token, then ReLU.

    Dead latents are revived by the AuxK loss: the top `aux_k` dead latents reconstruct the
    residual of the main reconstruction.
    """

    k: int = 32
    """Latents kept active per token."""
    aux_k: int | None = None
    """Dead latents used by the AuxK loss; None = d_in // 2 (Gao et al. appendix B.1)."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. use 1/32); 0 disables it."""
    use_sparse_kernels: bool = True
    """Decode with `embedding_bag` and back-propagate only into selected latents
    (`interplab.dictionaries.kernels`); False uses dense matmuls (same numbers, slower)."""

    architecture: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("k", self.k)
        if self.k > self.d_sae:
            raise InterplabError(f"k={self.k} must be <= d_sae={self.d_sae}.")
        if self.aux_k is not None:
            _check_positive_int("aux_k", self.aux_k)
        _check_non_negative("aux_coefficient", self.aux_coefficient)


@dataclass
class BatchTopK(TopK):
    """BatchTopK SAE (Bussmann et al. 2024): keep the top k * batch pre-activations over the
    whole batch while training; at inference use a global threshold (a running mean of the
    smallest kept activation), so the saved dictionary is a JumpReLU with equal thresholds.
    """

    threshold_momentum: float = 0.99
    """Exponential moving-average momentum of the inference threshold estimate."""

    architecture: ClassVar[str] = "jumprelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.threshold_momentum < 1:
            raise InterplabError(
                f"threshold_momentum must be in [0, 1), got {self.threshold_momentum!r}."
            )


@dataclass
class Matryoshka(TopK):
    """Matryoshka TopK SAE (Bussmann et al. 2025; Nabeshima 2024): the latents are nested
    prefixes, and every prefix must reconstruct the input on its own. The loss is the sum of
    the prefix reconstruction errors (plus AuxK); inference is plain TopK.
    """

    prefixes: tuple[int, ...] | None = None
    """Increasing prefix sizes; d_sae is appended when missing. None = (d_sae // 16,
    d_sae // 4, d_sae)."""

    architecture: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefixes is None:
            sizes = [self.d_sae // 16, self.d_sae // 4, self.d_sae]
            self.prefixes = tuple(sorted({s for s in sizes if s > 0}))
            return
        if isinstance(self.prefixes, int | str) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in self.prefixes
        ):
            raise InterplabError(f"prefixes must be a sequence of integers, got {self.prefixes!r}.")
        prefixes = tuple(self.prefixes)
        if not prefixes or any(p <= 0 for p in prefixes):
            raise InterplabError(f"prefixes must be positive integers, got {prefixes!r}.")
        if any(b <= a for a, b in zip(prefixes, prefixes[1:], strict=False)):
            raise InterplabError(f"prefixes must be strictly increasing, got {prefixes!r}.")
        if prefixes[-1] > self.d_sae:
            raise InterplabError(f"prefixes must not exceed d_sae={self.d_sae}, got {prefixes!r}.")
        if prefixes[-1] != self.d_sae:
            prefixes = (*prefixes, self.d_sae)
        self.prefixes = prefixes


@dataclass
class JumpReLU(SAEConfig):
    """JumpReLU SAE (Rajamanoharan et al. 2024b, "Jumping Ahead"): f = z * H(z - theta) with a
    learned per-latent threshold, trained with an L0 penalty through straight-through
    estimators whose pseudo-derivatives use a rectangle kernel of width `bandwidth`.
    """

    l0_coefficient: float = 1.0
    """Weight of the L0 penalty."""
    bandwidth: float = 0.05
    """Width epsilon of the rectangle kernel in the threshold pseudo-derivatives."""
    init_threshold: float = 0.01
    """Initial threshold of every latent."""
    threshold_param: ThresholdParam = "direct"
    """"direct" trains theta itself (clamped at 0); "log" trains log(theta) as in the paper.
    Under Adam a log parameter moves theta by only ~lr * theta per step, which freezes small
    thresholds (SAELens issue #494), hence the default."""

    architecture: ClassVar[str] = "jumprelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_non_negative("l0_coefficient", self.l0_coefficient)
        _check_positive("bandwidth", self.bandwidth)
        _check_positive("init_threshold", self.init_threshold)
        _check_choice("threshold_param", self.threshold_param, ThresholdParam)


@dataclass
class Gated(SAEConfig):
    """Gated SAE (Rajamanoharan et al. 2024a): a gate path (shared `W_enc`, bias `b_gate`)
    decides which latents fire, a magnitude path (`W_enc * exp(r_mag)`, `b_mag`) how much.
    The L1 penalty acts on the gate pre-activations, and an auxiliary loss asks the gate path
    alone to reconstruct the input through a frozen copy of the decoder.
    """

    l1_coefficient: float = 5.0
    """Weight of the gate-path L1 penalty (weighted by decoder row norms)."""

    architecture: ClassVar[str] = "gated"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_non_negative("l1_coefficient", self.l1_coefficient)


VARIANTS: dict[str, type[SAEConfig]] = {
    cls.__name__: cls for cls in (ReLU, TopK, BatchTopK, Matryoshka, JumpReLU, Gated)
}


@dataclass
class Transcoder:
    """A transcoder (Dunefsky et al. 2024): encodes input x with any sparse `variant` and
    decodes into a different target y (e.g. MLP input -> MLP output); `forward(x, y)`.
    """

    variant: SAEConfig
    """The sparse encoder (ReLU, TopK, BatchTopK, JumpReLU, Gated or Matryoshka config)."""

    skip: ClassVar[bool] = False
    """Whether the output also gets an unpenalised linear path `x @ W_skip.T`."""

    def __post_init__(self) -> None:
        if not isinstance(self.variant, SAEConfig) or type(self.variant) is SAEConfig:
            raise InterplabError(
                f"{type(self).__name__} wraps a dictionary variant config "
                f"({', '.join(VARIANTS)}), got {self.variant!r}."
            )

    @property
    def d_sae(self) -> int:
        """Number of latents of the wrapped variant."""
        return self.variant.d_sae

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (inverse: `config_from_dict`)."""
        return {"type": type(self).__name__, "variant": self.variant.to_dict()}


@dataclass
class SkipTranscoder(Transcoder):
    """Skip transcoder (Paulo et al. 2025): a transcoder plus a linear skip path
    `x @ W_skip.T` that is not penalised (initialised at zero)."""

    skip: ClassVar[bool] = True


DictionaryConfig = SAEConfig | Transcoder
"""Anything `build_dictionary` accepts."""


def config_from_dict(data: dict[str, Any]) -> DictionaryConfig:
    """Rebuild a config from `config.to_dict()` (used by checkpoints and saved files)."""
    data = dict(data)
    kind = data.pop("type", None)
    if kind in ("Transcoder", "SkipTranscoder"):
        variant = config_from_dict(data["variant"])
        if not isinstance(variant, SAEConfig):
            raise InterplabError(f"a {kind} must wrap a variant config, got {data['variant']!r}.")
        return (SkipTranscoder if kind == "SkipTranscoder" else Transcoder)(variant)
    if kind not in VARIANTS:
        raise InterplabError(
            f"unknown dictionary config type {kind!r}; expected one of "
            f"{', '.join([*VARIANTS, 'Transcoder', 'SkipTranscoder'])}."
        )
    cls = VARIANTS[kind]
    known = {f.name for f in fields(cls)}
    unknown_keys = sorted(set(data) - known)
    if unknown_keys:
        raise InterplabError(f"unknown field(s) {unknown_keys} for dictionary config {kind}.")
    if isinstance(data.get("prefixes"), list):
        data["prefixes"] = tuple(data["prefixes"])
    return cls(**data)


def describe(config: DictionaryConfig) -> str:
    """Short name for logs and folders, e.g. `topk-4096-k32` or `skip_transcoder-relu-1024`."""
    variant = config.variant
    name = f"{type(variant).__name__.lower()}-{variant.d_sae}"
    if isinstance(variant, TopK):
        name += f"-k{variant.k}"
    if isinstance(config, Transcoder):
        name = f"{'skip_' if config.skip else ''}transcoder-{name}"
    return name


__all__ = [
    "BDecInit",
    "BatchTopK",
    "DictionaryConfig",
    "Gated",
    "JumpReLU",
    "Matryoshka",
    "ReLU",
    "SAEConfig",
    "SkipTranscoder",
    "TopK",
    "Transcoder",
    "config_from_dict",
    "describe",
]
