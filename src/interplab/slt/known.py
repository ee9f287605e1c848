"""Models whose learning coefficient is known in closed form, to check LLC estimates.

All are Gaussian regressions y = f(x; w) + N(0, σ²) with data drawn from a true parameter
w0, so the average negative log-likelihood is L_n(w) = 1/(2σ²) mean ||y - f(x; w)||²
(+ a constant) and the learning coefficient λ at w0 is the real log canonical threshold
(RLCT) of K(w) = E_x ||f(x; w) - f(x; w0)||² / (2σ²) (Watanabe 2009):

- regular models (e.g. full-rank linear regression with d parameters): λ = d/2;
- normal-crossing models f(x; w) = (w_1^k_1 ... w_d^k_d) x at w0 = 0: K ∝ Π w_i^(2 k_i),
  whose RLCT is min_i 1/(2 k_i) with multiplicity m = the number of i attaining it
  (1/2, 1/4, 1/6 for a single weight with k = 1, 2, 3);
- reduced-rank regression f(x; A, B) = B A x (A: H x M, B: N x H) with a true product of
  rank r: Aoyagi and Watanabe 2005 ("Stochastic complexities of reduced rank regression in
  Bayesian estimation") give λ and m in closed form (`aoyagi_rrr`).

Two exact references for the *finite-β* quantity the sampler targets,
E_w[nβ (L_n(w) - L_n(w*))] under exp(-nβ L_n(w) - γ/2 ||w - w*||²), separate sampler error
from the asymptotic gap between that quantity and λ: `quadrature_llc` (numerical
integration, one or two parameters) and `sgld_quadratic_llc` (a quadratic loss, including
the step-size bias of SGLD).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from interplab.errors import InterplabError

__all__ = [
    "KnownCoefficient",
    "NormalCrossing",
    "ReducedRankRegression",
    "aoyagi_rrr",
    "gaussian_nll",
    "gaussian_regression_data",
    "quadrature_llc",
    "regression_loss",
    "rrr_teacher",
    "sgld_quadratic_llc",
]


class KnownCoefficient(NamedTuple):
    """A learning coefficient λ with its multiplicity m (the order of the pole)."""

    llc: float
    multiplicity: int


# --------------------------------------------------------------------------------------
# Losses and data
# --------------------------------------------------------------------------------------


def gaussian_nll(
    prediction: Float[Tensor, "batch ..."], target: Float[Tensor, "batch ..."], sigma: float = 1.0
) -> Float[Tensor, ""]:
    """Mean over the batch of the Gaussian negative log-likelihood, constant dropped:
    ||y - f||² / (2σ²) summed over output dimensions (the scale the LLC needs)."""
    squared = (prediction - target).pow(2)
    per_example = squared.reshape(squared.shape[0], -1).sum(dim=1)
    return per_example.mean() / (2 * sigma**2)


def regression_loss(model: nn.Module, batch: Sequence[Tensor]) -> Float[Tensor, ""]:
    """`loss_fn` for `estimate_llc` on (x, y) batches: `gaussian_nll(model(x), y)`, σ = 1."""
    x, y = batch
    return gaussian_nll(model(x), y)


def gaussian_regression_data(
    teacher: Callable[[Tensor], Tensor],
    n: int,
    d_in: int,
    sigma: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    orthogonal_noise: bool = False,
) -> TensorDataset:
    """n pairs (x, y) with x ~ N(0, I_{d_in}) and y = teacher(x) + N(0, σ²) noise.

    With `orthogonal_noise`, the noise is projected off the column span of x. For a
    teacher that is linear in x (every model in this module), the true parameter then
    fits the data exactly as well as any other parameter of the same function class can:
    L_n(w) - L_n(w0) = (f(w) - f(w0))ᵀ X X ᵀ(f(w) - f(w0)) / (2nσ²) is the empirical K(w),
    with no linear term. Without the projection that linear term (of order 1/sqrt(n))
    moves the minimum off w0 and adds the data-dependent U_n sqrt(λβ/2) term of Watanabe's
    WBIC expansion to the estimate, a dataset-to-dataset spread of ~±30% of λ at n = 1000
    for the singular models here; with it, a known-value check measures the sampler and
    the finite-nβ bias only.
    """
    if isinstance(n, bool) or n < 1 or d_in < 1:
        raise InterplabError(f"n and d_in must be positive integers, got n={n!r}, d_in={d_in!r}.")
    if orthogonal_noise and n <= d_in:
        raise InterplabError(
            f"orthogonal_noise needs more samples than input dimensions, got n={n}, d_in={d_in}."
        )
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=generator, dtype=dtype)
    with torch.no_grad():
        clean = teacher(x)
    noise = sigma * torch.randn(clean.shape, generator=generator, dtype=dtype)
    if orthogonal_noise:
        flat = noise.reshape(n, -1)
        flat = flat - x @ torch.linalg.lstsq(x, flat).solution
        noise = flat.reshape(clean.shape)
    return TensorDataset(x, clean + noise)


# --------------------------------------------------------------------------------------
# Normal crossing
# --------------------------------------------------------------------------------------


class NormalCrossing(nn.Module):
    """f(x; w) = (Π_i w_i^k_i) x for scalar x: K(w) ∝ Π w_i^(2 k_i) at the true w0 = 0.

    The weights start at w0 = 0 (the point whose LLC is known). Input [batch, 1], output
    [batch, 1].
    """

    def __init__(self, exponents: Sequence[int], dtype: torch.dtype = torch.float32):
        super().__init__()
        exponents = tuple(exponents)
        if not exponents or any(
            isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in exponents
        ):
            raise InterplabError(
                f"exponents must be a non-empty sequence of integers >= 1, got {exponents!r}."
            )
        self.exponents = exponents
        self.w = nn.Parameter(torch.zeros(len(exponents), dtype=dtype))

    def coefficient(self) -> Tensor:
        """a(w) = Π_i w_i^k_i."""
        powers = torch.tensor(self.exponents, dtype=self.w.dtype, device=self.w.device)
        return self.w.pow(powers).prod()

    def forward(self, x: Float[Tensor, "batch 1"]) -> Float[Tensor, "batch 1"]:
        return self.coefficient() * x

    @property
    def known(self) -> KnownCoefficient:
        """λ = min_i 1/(2 k_i), m = how many i attain it."""
        k_max = max(self.exponents)
        return KnownCoefficient(1 / (2 * k_max), self.exponents.count(k_max))


# --------------------------------------------------------------------------------------
# Reduced-rank regression
# --------------------------------------------------------------------------------------


class ReducedRankRegression(nn.Module):
    """f(x; A, B) = B A x with A: [d_hidden, d_in], B: [d_out, d_hidden] (no biases).

    In Aoyagi's notation M = d_in, N = d_out, H = d_hidden.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        d_hidden: int,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        super().__init__()
        for name, value in (("d_in", d_in), ("d_out", d_out), ("d_hidden", d_hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InterplabError(f"{name} must be a positive integer, got {value!r}.")
        generator = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(d_hidden, d_in, generator=generator, dtype=dtype))
        self.B = nn.Parameter(torch.randn(d_out, d_hidden, generator=generator, dtype=dtype))

    def forward(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_out"]:
        return x @ self.A.T @ self.B.T

    def known(self, rank: int) -> KnownCoefficient:
        """Aoyagi's λ and m when the true product B0 A0 has rank `rank`."""
        H, M = self.A.shape
        return aoyagi_rrr(M, self.B.shape[0], H, rank)


def aoyagi_rrr(M: int, N: int, H: int, r: int) -> KnownCoefficient:
    """RLCT λ and multiplicity m of reduced-rank regression (Aoyagi and Watanabe 2005).

    Input dimension M, output N, hidden H, true rank r <= H:
    - N + r > M + H: λ = (H M - H r + N r) / 2;
    - M + r > N + H: λ = (H N - H r + M r) / 2;
    - H + r > M + N: λ = M N / 2;
    - otherwise λ = (2 (H + r)(M + N) - (M - N)² - (H + r)²) / 8 when M + N + H + r is
      even (m = 1), with + 1 in the numerator and m = 2 when it is odd.
    (The first three cases are mutually exclusive; each has m = 1.)
    """
    for name, value in (("M", M), ("N", N), ("H", H)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InterplabError(f"{name} must be a positive integer, got {value!r}.")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= min(H, M, N):
        raise InterplabError(
            f"the true rank r must be an integer in [0, min(H, M, N)] = [0, {min(H, M, N)}], "
            f"got {r!r}."
        )
    if N + r > M + H:
        return KnownCoefficient((H * M - H * r + N * r) / 2, 1)
    if M + r > N + H:
        return KnownCoefficient((H * N - H * r + M * r) / 2, 1)
    if H + r > M + N:
        return KnownCoefficient(M * N / 2, 1)
    numerator = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
    if (M + N + H + r) % 2 == 0:
        return KnownCoefficient(numerator / 8, 1)
    return KnownCoefficient((numerator + 1) / 8, 2)


def rrr_teacher(
    d_in: int,
    d_out: int,
    d_hidden: int,
    rank: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Float[Tensor, "d_hidden d_in"], Float[Tensor, "d_out d_hidden"]]:
    """True weights (A0, B0) whose product B0 A0 has rank `rank`, balanced.

    A random rank-r matrix (product of Gaussian factors) U S Vᵀ is split as
    A0 = sqrt(S) Vᵀ, B0 = U sqrt(S) in the first `rank` hidden units (zeros in the rest):
    the balanced factorisation that gradient descent with weight decay converges to. It
    keeps the Hessian well conditioned, so a moderate localisation γ perturbs every
    direction alike.
    """
    if not 0 <= rank <= min(d_in, d_out, d_hidden):
        raise InterplabError(
            f"rank must be in [0, min(d_in, d_out, d_hidden)] = "
            f"[0, {min(d_in, d_out, d_hidden)}], got {rank!r}."
        )
    generator = torch.Generator().manual_seed(seed)
    A0 = torch.zeros(d_hidden, d_in, dtype=dtype)
    B0 = torch.zeros(d_out, d_hidden, dtype=dtype)
    if rank:
        left = torch.randn(d_out, rank, generator=generator, dtype=torch.float64)
        right = torch.randn(rank, d_in, generator=generator, dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(left @ right / math.sqrt(rank), full_matrices=False)
        root = S[:rank].sqrt()
        A0[:rank] = (root[:, None] * Vh[:rank]).to(dtype)
        B0[:, :rank] = (U[:, :rank] * root).to(dtype)
    return A0, B0


# --------------------------------------------------------------------------------------
# Exact references for the finite-β target
# --------------------------------------------------------------------------------------


def quadrature_llc(
    loss: Callable[[Float[Tensor, "grid d"]], Float[Tensor, " grid"]],
    w_star: Sequence[float],
    n_beta: float,
    localization: float,
    radius: float,
    points: int = 801,
) -> float:
    """E_w[nβ (L(w) - L(w*))] under exp(-nβ L(w) - γ/2 ||w - w*||²), by quadrature.

    `loss` maps a batch of parameter vectors [grid, d] to L_n at each (d = 1 or 2). The
    integral runs over the cube of half-width `radius` around w* with `points` nodes per
    axis (trapezoid rule); the radius must hold essentially all of the posterior mass.
    This is exactly the quantity an LLC estimate converges to as lr -> 0 and draws -> ∞.
    """
    w_star_t = torch.as_tensor(w_star, dtype=torch.float64).flatten()
    d = w_star_t.numel()
    if d not in (1, 2):
        raise InterplabError(f"quadrature_llc integrates 1 or 2 parameters, got {d}.")
    axis = torch.linspace(-radius, radius, points, dtype=torch.float64)
    offsets = torch.cartesian_prod(*([axis] * d)).reshape(-1, d)
    grid = w_star_t + offsets
    with torch.no_grad():
        excess = n_beta * (loss(grid).double() - float(loss(w_star_t[None]).double()[0]))
    log_weight = -excess - 0.5 * localization * offsets.pow(2).sum(dim=1)
    weight = torch.exp(log_weight - log_weight.max())
    edge = torch.ones(points, dtype=torch.float64)
    edge[0] = edge[-1] = 0.5  # trapezoid rule weights
    weight = weight * (edge if d == 1 else torch.outer(edge, edge).flatten())
    return float((weight * excess).sum() / weight.sum())


def sgld_quadratic_llc(
    hessian_eigenvalues: Sequence[float] | Tensor, n_beta: float, localization: float, lr: float
) -> float:
    """Exact stationary value of the SGLD estimator for L(w) = L(w*) + ½ (w - w*)ᵀ H (w - w*).

    Full-batch SGLD is a linear recursion here: along an eigenvector of H with eigenvalue
    h the drift is a = nβ h + γ and the stationary variance ε / (1 - (1 - ε a / 2)²) =
    1 / (a (1 - ε a / 4)); hence E[nβ (L - L*)] = ½ Σ nβ h / (a (1 - ε a / 4)). As ε -> 0
    this is the tempered-posterior value ½ Σ nβ h / (nβ h + γ), and d/2 when nβ h >> γ.
    """
    h = torch.as_tensor(hessian_eigenvalues, dtype=torch.float64).flatten()
    a = n_beta * h + localization
    if (lr * a >= 4).any():
        raise InterplabError(
            f"lr {lr} is unstable for this quadratic: it needs lr * (nβ h + γ) < 4, "
            f"got a maximum of {float((lr * a).max()):.3g}."
        )
    return float(0.5 * (n_beta * h / (a * (1 - lr * a / 4))).sum())
