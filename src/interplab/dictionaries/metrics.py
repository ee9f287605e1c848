"""Reconstruction quality of a dictionary on a tensor of activations (no model involved).

Definitions (all over the tokens of `x`, accumulated in float64):

* mse: mean squared error per element, mean((y - y_hat)^2).
* fvu: fraction of variance unexplained, sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 with the
  mean over all tokens (SAELens' explained variance is 1 - fvu).
* cosine_similarity: mean over tokens of cos(y, y_hat).
* shrinkage: mean over tokens of ||y_hat|| / ||y|| (SAELens' "l2_ratio"); < 1 means shrinkage.
* l0 / l1: mean number of active latents / mean sum of latent values per token.
* latent_density: fraction of tokens on which each latent fires; dead = never fires here,
  dense = fires on more than `dense_threshold` of tokens.
* decoder_mean_max_cosine: mean over latents of the largest |cos| between its decoder row and
  any other row (redundancy of the dictionary).
* latent_pca_spectrum: eigenvalues of the covariance of the latent activations (on up to
  `pca_tokens` tokens), as fractions of the total variance, largest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.dictionaries.base import Dictionary
from interplab.errors import InterplabError


@dataclass
class ReconstructionMetrics:
    """How well a dictionary reconstructs a set of activations (see module docstring)."""

    n_tokens: int
    """Tokens evaluated."""
    mse: float
    """Mean squared error per element."""
    fvu: float
    """Fraction of variance unexplained (1 - explained variance)."""
    cosine_similarity: float
    """Mean cosine similarity between target and reconstruction."""
    shrinkage: float
    """Mean ||y_hat|| / ||y||."""
    l0: float
    """Mean number of active latents per token."""
    l1: float
    """Mean sum of latent activations per token."""
    dead_fraction: float
    """Fraction of latents that never fire on these tokens."""
    dense_fraction: float
    """Fraction of latents that fire on more than `dense_threshold` of the tokens."""
    latent_density: Float[Tensor, " d_sae"]
    """Firing frequency of each latent."""
    decoder_mean_max_cosine: float
    """Mean over latents of the max |cosine| between its decoder row and any other row."""
    latent_pca_spectrum: Float[Tensor, " components"]
    """Fraction of latent-activation variance per principal component, largest first."""

    @property
    def explained_variance(self) -> float:
        """1 - fvu."""
        return 1.0 - self.fvu

    def summary(self) -> dict[str, float]:
        """The scalar metrics, for logging."""
        keys = (
            "mse",
            "fvu",
            "explained_variance",
            "cosine_similarity",
            "shrinkage",
            "l0",
            "l1",
            "dead_fraction",
            "dense_fraction",
            "decoder_mean_max_cosine",
        )
        return {k: float(getattr(self, k)) for k in keys}

    def density_histogram(self, bins: int = 50) -> tuple[Tensor, Tensor]:
        """Histogram of log10 firing density over the latents that fire: (counts, bin edges)."""
        alive = self.latent_density[self.latent_density > 0]
        if alive.numel() == 0:
            return torch.zeros(bins), torch.linspace(-1, 0, bins + 1)
        counts, edges = torch.histogram(alive.log10().to(torch.float64), bins=bins)
        return counts, edges

    def plot_density(self, ax: Any = None, bins: int = 50) -> Any:
        """Plot the log10 density histogram with matplotlib (optional dependency)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3))
        counts, edges = self.density_histogram(bins)
        ax.stairs(counts.numpy(), edges.numpy(), fill=True)
        ax.set_xlabel("log10 firing density")
        ax.set_ylabel("latents")
        ax.set_title(f"L0 {self.l0:.1f}, dead {self.dead_fraction:.1%}, FVU {self.fvu:.3f}")
        return ax


def decoder_mean_max_cosine(W_dec: Float[Tensor, "d_sae d_out"], chunk: int = 1024) -> float:
    """Mean over rows of the largest |cosine similarity| with any other row (chunked)."""
    unit = W_dec.detach().to(torch.float64)
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = unit.shape[0]
    if n < 2:
        return 0.0
    best = []
    for start in range(0, n, chunk):
        sims = (unit[start : start + chunk] @ unit.T).abs()
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = -1.0
        best.append(sims.max(dim=1).values)
    return float(torch.cat(best).mean())


def latent_pca_spectrum(latents: Float[Tensor, "n d_sae"]) -> Float[Tensor, " components"]:
    """Covariance eigenvalues of `latents` as fractions of the total, largest first (computed
    from the n x n Gram matrix of the centred rows, so the cost is O(n^2 d_sae))."""
    z = latents.to(torch.float64)
    z = z - z.mean(0)
    gram = z @ z.T
    eig = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    total = eig.sum()
    return eig / total if total > 0 else eig


@torch.no_grad()
def reconstruction_metrics(
    dictionary: Dictionary,
    x: Float[Tensor, "... d_in"],
    y: Float[Tensor, "... d_out"] | None = None,
    *,
    batch_size: int = 4096,
    dense_threshold: float = 0.1,
    pca_tokens: int = 1024,
) -> ReconstructionMetrics:
    """Evaluate `dictionary` on activations `x` (targets `y`, default `x`) with inference
    latents (`encode`/`decode`), in chunks of `batch_size` tokens."""
    if x.shape[-1] != dictionary.d_in:
        raise InterplabError(
            f"x has shape {tuple(x.shape)}; expected last dimension d_in={dictionary.d_in}."
        )
    xs = x.reshape(-1, dictionary.d_in)
    if y is None:
        if dictionary.d_out != dictionary.d_in:
            raise InterplabError("a transcoder is evaluated against its targets: pass y.")
        ys = xs
    else:
        if y.shape[-1] != dictionary.d_out:
            raise InterplabError(
                f"y has shape {tuple(y.shape)}; expected last dimension d_out={dictionary.d_out}."
            )
        ys = y.reshape(-1, dictionary.d_out)
        if ys.shape[0] != xs.shape[0]:
            raise InterplabError(
                f"x and y hold different numbers of tokens: {xs.shape[0]} and {ys.shape[0]}."
            )
    n = xs.shape[0]
    if n == 0:
        raise InterplabError("reconstruction_metrics needs at least one token.")

    device = dictionary.W_dec.device
    f64 = torch.float64
    # Two passes over y: the mean first, so the variance has no cancellation error even when
    # activations have a large mean direction.
    mean_y = sum(ys[s : s + batch_size].to(device, f64).sum(0) for s in range(0, n, batch_size)) / n
    sq_err, sq_dev, cos, ratio, l0, l1 = (
        torch.zeros((), dtype=f64, device=device) for _ in range(6)
    )
    fires = torch.zeros(dictionary.d_sae, dtype=f64, device=device)
    pca_rows: list[Tensor] = []
    was_training = dictionary.training
    dictionary.eval()
    try:
        for start in range(0, n, batch_size):
            xb = xs[start : start + batch_size].to(device)
            yb = ys[start : start + batch_size].to(device).to(f64)
            latents = dictionary.encode(xb)
            y_hat = dictionary.decode(latents, xb if dictionary.skip else None).to(f64)
            sq_err = sq_err + (yb - y_hat).pow(2).sum()
            sq_dev = sq_dev + (yb - mean_y).pow(2).sum()
            y_norm, y_hat_norm = yb.norm(dim=1), y_hat.norm(dim=1)
            cos = cos + ((yb * y_hat).sum(1) / (y_norm * y_hat_norm).clamp_min(1e-30)).sum()
            ratio = ratio + (y_hat_norm / y_norm.clamp_min(1e-30)).sum()
            active = latents > 0
            l0 = l0 + active.sum()
            l1 = l1 + latents.to(f64).abs().sum()
            fires = fires + active.sum(0)
            taken = sum(r.shape[0] for r in pca_rows)
            if taken < pca_tokens:
                pca_rows.append(latents[: pca_tokens - taken].to(f64))
    finally:
        dictionary.train(was_training)

    density = (fires / n).cpu()
    return ReconstructionMetrics(
        n_tokens=n,
        mse=float(sq_err / (n * dictionary.d_out)),
        fvu=float(sq_err / sq_dev) if sq_dev > 0 else float("nan"),
        cosine_similarity=float(cos / n),
        shrinkage=float(ratio / n),
        l0=float(l0 / n),
        l1=float(l1 / n),
        dead_fraction=float((density == 0).to(f64).mean()),
        dense_fraction=float((density > dense_threshold).to(f64).mean()),
        latent_density=density.to(torch.float32),
        decoder_mean_max_cosine=decoder_mean_max_cosine(dictionary.W_dec),
        latent_pca_spectrum=latent_pca_spectrum(torch.cat(pca_rows)).cpu(),
    )
