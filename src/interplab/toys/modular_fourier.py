"""Fourier analysis and progress measures of modular addition (Nanda et al. 2023).

Nanda et al. ("Progress measures for grokking via mechanistic interpretability", ICLR 2023)
show that a one-layer transformer trained on (a + b) mod p computes the answer with a few
key frequencies w_k = 2πk/p: the embedding maps a to cos(w_k a), sin(w_k a); attention and
MLP form cos(w_k(a + b)), sin(w_k(a + b)); the unembedding reads off logits
Σ_k cos(w_k(a + b - c)), largest at c = a + b mod p. Here:

- the Fourier basis of functions on Z_p (constant, then cos/sin of k = 1..(p-1)/2,
  orthonormal rows) and the norms of the embedding / unembedding in it;
- neuron frequencies: the fraction of each MLP neuron's variance over the (a, b) grid that one
  frequency explains, and the key frequencies that clusters of neurons use;
- restricted loss (keep only the key-frequency directions cos/sin(w_k(a + b - c)) of the
  logits over (a, b, c), all pairs) and excluded loss (remove them, training pairs);
- the Gini coefficient of Fourier norms (sparsity), and all of these over checkpoints.

For subtraction every `a + b` reads `a - b`; multiplication is addition only in
discrete-log coordinates and is not covered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from interplab.errors import InterplabError
from interplab.toys.modular import (
    ModularResult,
    Operation,
    all_pairs,
    grid_logits,
    is_prime,
    train_mask,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

NEURON_HOOK = "blocks.0.mlp.hook_post"


def _check_p(p: int) -> None:
    if not isinstance(p, int) or p < 3 or not is_prime(p):
        raise InterplabError(f"Fourier analysis over Z_p needs an odd prime p, got {p!r}.")


def _check_operation(operation: Operation) -> int:
    """The sign of b in the combination a ± b that the logits depend on."""
    if operation == "add":
        return 1
    if operation == "subtract":
        return -1
    raise InterplabError(
        f"Fourier analysis covers operation 'add' and 'subtract', got {operation!r} "
        "(multiplication is addition only in discrete-log coordinates)."
    )


# --------------------------------------------------------------------------------------
# Basis, norms, Gini
# --------------------------------------------------------------------------------------


def fourier_basis(
    p: int, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "p p"]:
    """Orthonormal Fourier basis of functions on Z_p, one basis vector per row.

    Row 0 is the constant 1/sqrt(p); rows 2k-1 and 2k are cos(2πkx/p) and sin(2πkx/p)
    for k = 1..(p-1)/2, each divided by sqrt(p/2). For odd p the rows are orthonormal.
    """
    _check_p(p)
    x = torch.arange(p, dtype=torch.float64)
    k = torch.arange(1, (p - 1) // 2 + 1, dtype=torch.float64)
    angles = 2 * torch.pi * k[:, None] * x[None] / p  # [n_freq, p]
    rows = torch.empty(p, p, dtype=torch.float64)
    rows[0] = 1 / p**0.5
    rows[1::2] = torch.cos(angles) / (p / 2) ** 0.5
    rows[2::2] = torch.sin(angles) / (p / 2) ** 0.5
    return rows.to(device=device, dtype=dtype)


def component_labels(p: int) -> list[str]:
    """Names of the basis rows: "const", "cos 1", "sin 1", ..., "sin (p-1)/2"."""
    _check_p(p)
    return ["const"] + [f"{f} {k}" for k in range(1, (p - 1) // 2 + 1) for f in ("cos", "sin")]


def component_frequency(p: int) -> Tensor:
    """Frequency k of each basis row (0 for the constant), [p] int64."""
    _check_p(p)
    return (torch.arange(p) + 1) // 2


@dataclass
class FourierNorms:
    """Norms of a matrix's rows (one per element of Z_p) projected on the Fourier basis."""

    component_norms: Float[Tensor, " p"]
    """Norm of the projection on each basis row (const, cos 1, sin 1, ...)."""

    @property
    def p(self) -> int:
        return self.component_norms.shape[0]

    @property
    def constant_norm(self) -> float:
        return self.component_norms[0].item()

    @property
    def frequency_norms(self) -> Float[Tensor, " n_freq"]:
        """sqrt(|cos k|² + |sin k|²) for k = 1..(p-1)/2 (index k - 1)."""
        sq = self.component_norms[1:].pow(2)
        return (sq[0::2] + sq[1::2]).sqrt()

    def top_fraction(self, k: int) -> float:
        """Share of the squared norm (constant excluded) held by the k largest frequencies."""
        sq = self.frequency_norms.pow(2)
        return (sq.topk(min(k, sq.numel())).values.sum() / sq.sum()).item()

    def key_frequencies(self, factor: float = 2.0) -> list[int]:
        """Frequencies whose squared norm exceeds `factor` times the mean over frequencies.

        At random initialisation every frequency has about the mean (a chi-squared with
        2 d_model degrees of freedom), so none passes; a trained embedding concentrates
        its norm on a handful of frequencies.
        """
        sq = self.frequency_norms.pow(2)
        keep = sq > factor * sq.mean()
        return [int(k) + 1 for k in torch.nonzero(keep).flatten().tolist()]

    def gini(self) -> float:
        """Gini coefficient of the frequency norms (0 = uniform, near 1 = one frequency)."""
        return gini(self.frequency_norms)

    def plot(self, title: str = "Fourier norms", key: Sequence[int] = ()) -> Figure:
        """Bar per frequency (key frequencies highlighted)."""
        import matplotlib.pyplot as plt

        norms = self.frequency_norms.cpu()
        freqs = list(range(1, norms.numel() + 1))
        colors = ["tab:red" if k in set(key) else "tab:blue" for k in freqs]
        fig, ax = plt.subplots(figsize=(10, 3.2))
        ax.bar(freqs, norms.tolist(), color=colors)
        ax.set_xlabel("frequency k")
        ax.set_ylabel("norm")
        ax.set_title(f"{title} (constant: {self.constant_norm:.2f}; Gini {self.gini():.2f})")
        fig.tight_layout()
        return fig


def fourier_norms(rows: Float[Tensor, "p d"]) -> FourierNorms:
    """Norms of `rows` (a function Z_p -> R^d) in the Fourier basis: ||F rows|| per basis row."""
    p = rows.shape[0]
    if p < 3 or not is_prime(p):
        raise InterplabError(
            f"got {p} rows; the Fourier analysis needs one row per element of Z_p for an odd "
            "prime p (pass p= to drop extra rows such as the '=' token)."
        )
    basis = fourier_basis(p, device=rows.device, dtype=torch.float32)
    return FourierNorms((basis @ rows.detach().float()).norm(dim=-1).cpu())


def fourier_embedding_norms(
    W_E: Float[Tensor, "d_vocab d_model"], p: int | None = None
) -> FourierNorms:
    """Fourier norms of the embedding of the numbers 0..p-1 (Nanda et al. Fig. 3).

    `W_E` is [p, d_model], or [p + 1, d_model] with `p` given (the '=' row is dropped).
    """
    p = W_E.shape[0] if p is None else p
    if W_E.shape[0] < p:
        raise InterplabError(f"W_E has {W_E.shape[0]} rows, fewer than p={p}.")
    return fourier_norms(W_E[:p])


def fourier_unembedding_norms(
    W_U: Float[Tensor, "d_model d_vocab"], p: int | None = None
) -> FourierNorms:
    """Fourier norms of the unembedding directions of the answers 0..p-1."""
    p = W_U.shape[1] if p is None else p
    if W_U.shape[1] < p:
        raise InterplabError(f"W_U has {W_U.shape[1]} columns, fewer than p={p}.")
    return fourier_norms(W_U[:, :p].T)


def gini(values: Float[Tensor, " n"] | Sequence[float]) -> float:
    """Gini coefficient of nonnegative values: Σ_i (2i - n - 1) x_(i) / (n Σ x), x sorted up.

    0 when all values are equal, (n - 1)/n when one value holds everything. Nanda et al.
    track it for the Fourier norms of W_E and W_U as a sparsity progress measure.
    """
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0 or bool((x < 0).any()):
        raise InterplabError("gini needs a nonempty set of nonnegative values.")
    total = x.sum()
    if total == 0:
        return 0.0
    n = x.numel()
    rank = torch.arange(1, n + 1, dtype=torch.float64)
    return ((2 * rank - n - 1) * x.sort().values).sum().item() / (n * total.item())


# --------------------------------------------------------------------------------------
# Neurons and key frequencies
# --------------------------------------------------------------------------------------


def _model_p(model: Any, p: int | None) -> int:
    """p of a modular model: its vocabulary is the p numbers and '='."""
    p = model.cfg.d_vocab - 1 if p is None else p
    _check_p(p)
    return p


def neuron_activations(
    model: Any, p: int | None = None, hook_name: str = NEURON_HOOK
) -> Float[Tensor, "p p d_mlp"]:
    """MLP activations at the '=' position for every pair, [a, b, neuron], via the hook.

    `p` defaults to the model's d_vocab - 1 (the numbers and '=').
    """
    p = _model_p(model, p)
    tokens, _ = all_pairs(p)
    tokens = tokens.to(model.W_E.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name == hook_name)
    acts = cache[hook_name][:, -1]
    return acts.reshape(p, p, -1).float()


@dataclass
class NeuronFrequencies:
    """How much of each neuron's variance over the (a, b) grid each frequency explains."""

    frac_explained: Float[Tensor, "d_mlp n_freq"]
    """Fraction of the neuron's variance in the 2D Fourier terms of frequency k (column k - 1):
    cos/sin(w_k a), cos/sin(w_k b) and their four products."""

    @property
    def frequency(self) -> Tensor:
        """Best frequency per neuron, [d_mlp] (1-based; 0 for a dead neuron)."""
        best = self.frac_explained.argmax(dim=-1) + 1
        return torch.where(self.best_frac > 0, best, torch.zeros_like(best))

    @property
    def best_frac(self) -> Float[Tensor, " d_mlp"]:
        return self.frac_explained.max(dim=-1).values


def neuron_frequencies(acts: Float[Tensor, "p p d_mlp"]) -> NeuronFrequencies:
    """Per-neuron, per-frequency fraction of variance explained (Nanda et al. Section 4.3).

    The centred activations are written in the 2D Fourier basis over (a, b); frequency k's
    share is the squared mass on basis pairs (i, j) with i, j in {const, cos k, sin k} and
    not both constant, divided by the total squared mass (the variance). Dead neurons
    (zero variance) get zeros.
    """
    p = acts.shape[0]
    basis = fourier_basis(p, device=acts.device)
    coeffs = torch.einsum("ia,abn,jb->nij", basis, acts.float(), basis)  # [n, p, p]
    energy = coeffs.pow(2)
    energy[:, 0, 0] = 0  # the mean is not variance
    n_freq = (p - 1) // 2
    group = F.one_hot(component_frequency(p).to(acts.device), n_freq + 1).float()  # [p, K+1]
    by_group = torch.einsum("nij,ik,jl->nkl", energy, group, group)  # [n, K+1, K+1]
    diag = torch.diagonal(by_group, dim1=1, dim2=2)[:, 1:]
    mass = diag + by_group[:, 0, 1:] + by_group[:, 1:, 0]
    total = energy.sum(dim=(1, 2))
    frac = torch.where(total[:, None] > 0, mass / total.clamp_min(1e-30)[:, None], 0.0)
    return NeuronFrequencies(frac.cpu())


@dataclass
class KeyFrequencies:
    """Key frequencies of a trained model, from neuron clusters and from the embedding."""

    frequencies: list[int]
    """Frequencies used by at least `min_neurons` neurons that each have >= `threshold` of
    their variance at that frequency (the paper's clusters)."""
    from_embedding: list[int]
    """Frequencies whose embedding norm² exceeds twice the mean (`FourierNorms.key_frequencies`)."""
    neurons: NeuronFrequencies
    """Per-neuron fractions of variance explained."""
    embedding_norms: FourierNorms
    """Fourier norms of W_E (numbers only)."""
    threshold: float
    """Fraction of variance a neuron needs at its best frequency to join that cluster."""
    min_neurons: int
    """Neurons a cluster needs for its frequency to count as key."""

    @property
    def neurons_per_frequency(self) -> list[int]:
        """Clustered neurons at each frequency k = 1..(p-1)/2 (index k - 1)."""
        n_freq = self.neurons.frac_explained.shape[1]
        counts = torch.bincount(self.clustered_frequency(), minlength=n_freq + 1)
        return counts[1:].tolist()

    def clustered_frequency(self) -> Tensor:
        """Each neuron's frequency if it is well explained by it, else 0, [d_mlp]."""
        freq = self.neurons.frequency
        return torch.where(self.neurons.best_frac >= self.threshold, freq, torch.zeros_like(freq))

    @property
    def fraction_clustered(self) -> float:
        """Share of neurons that belong to a key-frequency cluster."""
        clustered = self.clustered_frequency()
        in_key = torch.isin(clustered, torch.tensor(self.frequencies, dtype=clustered.dtype))
        return in_key.float().mean().item()

    def plot(self) -> Figure:
        """Neurons per frequency, and each neuron's best frequency against variance explained."""
        import matplotlib.pyplot as plt

        counts = self.neurons_per_frequency
        fig, (ax_bar, ax_dot) = plt.subplots(1, 2, figsize=(11, 3.6))
        freqs = list(range(1, len(counts) + 1))
        colors = ["tab:red" if k in self.frequencies else "tab:blue" for k in freqs]
        ax_bar.bar(freqs, counts, color=colors)
        ax_bar.set_xlabel("frequency k")
        ax_bar.set_ylabel(f"neurons with ≥ {self.threshold:.0%} variance at k")
        ax_bar.set_title(f"key frequencies {self.frequencies}")
        ax_dot.scatter(
            self.neurons.frequency.tolist(), self.neurons.best_frac.tolist(), s=6, alpha=0.5
        )
        ax_dot.axhline(self.threshold, color="grey", linestyle=":")
        ax_dot.set_xlabel("neuron's best frequency")
        ax_dot.set_ylabel("fraction of variance explained")
        ax_dot.set_title(f"{self.fraction_clustered:.0%} of neurons in key clusters")
        fig.tight_layout()
        return fig

    def to_dict(self) -> dict[str, Any]:
        return {
            "frequencies": self.frequencies,
            "from_embedding": self.from_embedding,
            "neurons_per_frequency": self.neurons_per_frequency,
            "fraction_clustered": self.fraction_clustered,
            "embedding_frequency_norms": self.embedding_norms.frequency_norms.tolist(),
            "embedding_gini": self.embedding_norms.gini(),
            "threshold": self.threshold,
            "min_neurons": self.min_neurons,
        }


def key_frequencies(
    model: Any, p: int | None = None, threshold: float = 0.5, min_neurons: int | None = None
) -> KeyFrequencies:
    """Key frequencies of a trained modular-addition model (Nanda et al. Section 4).

    Each MLP neuron is assigned to the frequency explaining most of its variance over the
    (a, b) grid (hook `blocks.0.mlp.hook_post` at the '=' position); a frequency is key if
    at least `min_neurons` (default: 1% of d_mlp, at least 2) neurons have >= `threshold`
    of their variance there. The embedding's own sparse frequencies come alongside.
    `p` defaults to the model's d_vocab - 1.
    """
    p = _model_p(model, p)
    if not 0 < threshold <= 1:
        raise InterplabError(f"threshold must be in (0, 1], got {threshold!r}.")
    neurons = neuron_frequencies(neuron_activations(model, p))
    d_mlp = neurons.frac_explained.shape[0]
    min_neurons = max(2, round(0.01 * d_mlp)) if min_neurons is None else min_neurons
    embedding = fourier_embedding_norms(model.W_E, p)
    result = KeyFrequencies(
        [], embedding.key_frequencies(), neurons, embedding, threshold, min_neurons
    )
    counts = result.neurons_per_frequency
    result.frequencies = [k + 1 for k, c in enumerate(counts) if c >= min_neurons]
    return result


# --------------------------------------------------------------------------------------
# Restricted and excluded loss
# --------------------------------------------------------------------------------------


def key_frequency_logits(
    logits: Float[Tensor, "p p p"], frequencies: Sequence[int], operation: Operation = "add"
) -> Float[Tensor, "p p p"]:
    """The projection of logits [a, b, c] on cos(w_k(a + b - c)) and sin(w_k(a + b - c)).

    w_k = 2πk/p for k in `frequencies`. These 2K directions over Z_p³ are orthogonal, each
    with squared norm p³/2, so the projection is a sum of independent terms. The logits
    depend on (a, b) through s = a + b here, so the inner products reduce to sums over
    (s, c) of logits summed within each s.
    """
    p = logits.shape[-1]
    if logits.shape != (p, p, p):
        raise InterplabError(f"logits must be [p, p, p] over (a, b, c), got {tuple(logits.shape)}.")
    _check_p(p)
    sign = _check_operation(operation)
    freqs = sorted(set(int(k) for k in frequencies))
    if any(not 1 <= k <= (p - 1) // 2 for k in freqs):
        raise InterplabError(f"frequencies must be in 1..{(p - 1) // 2}, got {list(frequencies)}.")
    if not freqs:
        return torch.zeros_like(logits)
    device = logits.device
    a = torch.arange(p, device=device)
    s = (a[:, None] + sign * a[None, :]) % p  # [a, b]
    summed = torch.zeros(p, p, dtype=torch.float64, device=device)  # [s, c]
    summed.index_add_(0, s.flatten(), logits.reshape(p * p, p).double())
    shift = (a[:, None] - a[None, :]) % p  # (s - c) mod p, [s, c]
    w = 2 * torch.pi * torch.tensor(freqs, dtype=torch.float64, device=device) / p
    cos = torch.cos(w[:, None, None] * shift)  # [K, s, c]
    sin = torch.sin(w[:, None, None] * shift)
    norm_sq = p**3 / 2
    alpha = (summed * cos).sum(dim=(1, 2)) / norm_sq
    beta = (summed * sin).sum(dim=(1, 2)) / norm_sq
    by_s = torch.einsum("k,ksc->sc", alpha, cos) + torch.einsum("k,ksc->sc", beta, sin)
    return by_s[s].to(logits.dtype)


def _answer_loss(
    logits: Float[Tensor, "p p p"], operation: Operation, mask: Bool[Tensor, "p p"] | None
) -> float:
    p = logits.shape[-1]
    _, labels = all_pairs(p, operation)
    flat = logits.reshape(p * p, p)
    # float64: the projections are exact up to rounding, and p³ values are cheap
    losses = F.cross_entropy(flat.double(), labels.to(flat.device), reduction="none")
    if mask is not None:
        losses = losses[mask.reshape(-1).to(flat.device)]
    return losses.mean().item()


def restricted_loss(
    logits: Float[Tensor, "p p p"],
    frequencies: Sequence[int],
    operation: Operation = "add",
    mask: Bool[Tensor, "p p"] | None = None,
) -> float:
    """Loss with the logits restricted to the key frequencies' directions (Nanda et al. 5.1).

    Only the components along cos/sin(w_k(a + b - c)), k in `frequencies`, are kept
    (`key_frequency_logits`); the cross-entropy is averaged over all p² pairs, or the
    pairs in `mask` ([a, b]). It falls when the generalising algorithm forms, before the
    test loss does.
    """
    return _answer_loss(key_frequency_logits(logits, frequencies, operation), operation, mask)


def excluded_loss(
    logits: Float[Tensor, "p p p"],
    frequencies: Sequence[int],
    train: Bool[Tensor, "p p"],
    operation: Operation = "add",
) -> float:
    """Training loss with the key frequencies' directions removed (Nanda et al. 5.1).

    The logits minus their components along cos/sin(w_k(a + b - c)), cross-entropy over
    the training pairs `train` ([a, b] mask). It rises as the model comes to rely on the
    generalising algorithm instead of memorisation.
    """
    ablated = logits - key_frequency_logits(logits, frequencies, operation)
    return _answer_loss(ablated, operation, train)


# --------------------------------------------------------------------------------------
# Progress measures over checkpoints
# --------------------------------------------------------------------------------------


@dataclass
class ProgressMeasures:
    """Nanda et al.'s progress measures at each checkpoint of one training run."""

    steps: list[int]
    """Checkpoint steps."""
    key_frequencies: list[int]
    """The key frequencies used for restricted and excluded loss (the final model's)."""
    train_loss: list[float]
    """Training-pair cross-entropy."""
    test_loss: list[float]
    """Held-out cross-entropy."""
    restricted_loss: list[float]
    """Loss on all pairs with only the key frequencies' logit directions kept."""
    excluded_loss: list[float]
    """Training loss with the key frequencies' logit directions removed."""
    gini_embed: list[float]
    """Gini coefficient of the Fourier frequency norms of W_E."""
    gini_unembed: list[float]
    """Gini coefficient of the Fourier frequency norms of W_U."""
    weight_norm: list[float]
    """Sum of squared parameters (weight decay drives it down during cleanup)."""

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def plot(self) -> Figure:
        """Losses (log scale) with restricted/excluded loss; Gini and total weight norm."""
        import matplotlib.pyplot as plt

        fig, (ax_loss, ax_gini) = plt.subplots(1, 2, figsize=(12, 4))
        for name, style in (
            ("train_loss", "-"),
            ("test_loss", "-"),
            ("restricted_loss", "--"),
            ("excluded_loss", "--"),
        ):
            ax_loss.plot(self.steps, getattr(self, name), style, label=name.replace("_", " "))
        ax_loss.set_yscale("log")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("cross-entropy")
        ax_loss.set_title(f"key frequencies {self.key_frequencies}")
        ax_loss.legend(fontsize=8)
        ax_gini.plot(self.steps, self.gini_embed, label="Gini of W_E Fourier norms")
        ax_gini.plot(self.steps, self.gini_unembed, label="Gini of W_U Fourier norms")
        ax_gini.set_ylim(0, 1)
        ax_gini.set_xlabel("step")
        ax_gini.set_ylabel("Gini coefficient")
        ax_norm = ax_gini.twinx()
        ax_norm.plot(self.steps, self.weight_norm, color="grey", linestyle=":", label="Σ w²")
        ax_norm.set_ylabel("sum of squared weights")
        lines = ax_gini.get_lines() + ax_norm.get_lines()
        ax_gini.legend(lines, [line.get_label() for line in lines], fontsize=8)
        fig.tight_layout()
        return fig


def progress_measures(
    result: ModularResult, frequencies: Sequence[int] | None = None
) -> ProgressMeasures:
    """Evaluate the progress measures at every checkpoint of `result`.

    `frequencies` defaults to the final model's key frequencies (`key_frequencies`), as in
    the paper, which fixes them from the end of training.
    """
    config = result.config
    _check_operation(config.operation)
    if not result.checkpoints:
        raise InterplabError(
            "progress_measures needs checkpoints; train with checkpoint_every set."
        )
    p = config.p
    if frequencies is None:
        frequencies = key_frequencies(result.model, p).frequencies
    frequencies = sorted(int(k) for k in frequencies)
    train = train_mask(config).view(p, p)
    measures = ProgressMeasures([], frequencies, [], [], [], [], [], [], [])
    from interplab.toys.modular import modular_model

    model = modular_model(config)
    model.eval()
    _, labels = all_pairs(p, config.operation)
    for checkpoint in result.checkpoints:
        model.load_state_dict(checkpoint.state_dict())
        logits = grid_logits(model, p).cpu()
        losses = F.cross_entropy(logits.reshape(p * p, p), labels, reduction="none").view(p, p)
        measures.steps.append(checkpoint.step)
        measures.train_loss.append(losses[train].mean().item())
        measures.test_loss.append(losses[~train].mean().item())
        measures.restricted_loss.append(restricted_loss(logits, frequencies, config.operation))
        measures.excluded_loss.append(excluded_loss(logits, frequencies, train, config.operation))
        measures.gini_embed.append(fourier_embedding_norms(model.W_E, p).gini())
        measures.gini_unembed.append(fourier_unembedding_norms(model.W_U, p).gini())
        measures.weight_norm.append(
            sum(param.detach().pow(2).sum().item() for param in model.parameters())
        )
    return measures
