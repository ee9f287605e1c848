"""Toy models of superposition (Elhage et al. 2022, "Toy Models of Superposition", Anthropic).

The model squeezes `n` sparse features into `m < n` hidden dimensions and back:

    h = W x,    x' = ReLU(Wᵀ h + b)          W [m, n], b [n]

Each feature x_i is uniform on [0, 1] with probability 1 - S (the feature density) and 0
otherwise; the loss is L = E_x[ Σ_i I_i (x_i - x'_i)² ] with feature importance I_i.
When features are sparse enough the model stores more than m of them, in superposition:
five features on a pentagon in two dimensions, antipodal pairs, and other polytopes.

Many independent instances (each with its own density and importance) train at once: W is
[instances, m, n] and b is [instances, n]; every matrix product is one batched matmul, and
the instances never interact (the loss is a sum over instances and Adam is per-parameter).

Also here: the paper's measures (feature norms, superposition score, feature
dimensionality D_i and dimensions per feature D*), the 2-features-in-1-dimension phase
diagram, and the figures (each result object plots itself; matplotlib is imported lazily).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.errors import InterplabError, unknown

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Activation = Literal["relu", "linear"]
LrSchedule = Literal["constant", "cosine"]

#: Feature dimensionalities D_i of the geometries the paper finds (k features forming a
#: polytope that spans d dimensions each get D_i = d/k): a dedicated dimension 1,
#: tetrahedron 3/4, triangle 2/3, antipodal pair (digon) 1/2, pentagon 2/5, square
#: antiprism 3/8; and 1/3 (six features in a plane).
POLYTOPE_DIMENSIONALITIES: tuple[float, ...] = (1.0, 3 / 4, 2 / 3, 1 / 2, 2 / 5, 3 / 8, 1 / 3)


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclass
class SuperpositionConfig:
    """Settings for training a batch of toy superposition models in one vectorised run."""

    n_features: int = 5
    """n: number of sparse input features."""
    n_hidden: int = 2
    """m: hidden dimensions the features are compressed into."""
    n_instances: int = 1
    """Independent models trained together; each may have its own density and importance."""
    feature_probability: float | Sequence[float] | Sequence[Sequence[float]] | Tensor = 0.05
    """Feature density 1 - S: the chance that a feature is nonzero. A float (every instance
    and feature), one value per instance [n_instances], or [n_instances, n_features]."""
    importance_decay: float = 1.0
    """Importance I_i = importance_decay ** i (the paper uses 0.9 for the pentagon);
    ignored when `importance` is given."""
    importance: Sequence[float] | Sequence[Sequence[float]] | Tensor | None = None
    """Explicit importances I_i: [n_features] (shared by all instances) or
    [n_instances, n_features]. None uses `importance_decay`."""
    activation: Activation = "relu"
    """Output nonlinearity: "relu" (the paper's ReLU output model) or "linear" (x' = WᵀWx + b)."""
    steps: int = 10_000
    """Optimiser steps (the paper's notebook: 10,000)."""
    batch_size: int = 1024
    """Fresh samples per step and instance (the paper's notebook: 1024)."""
    lr: float = 1e-3
    """Adam learning rate (the paper's notebook: 1e-3)."""
    lr_schedule: LrSchedule = "constant"
    """Learning-rate schedule: "constant" (the paper notebook's default) or "cosine"
    (half-cosine decay from `lr` to 0, which lets short runs settle)."""
    seed: int = 0
    """Seed for the initial weights and the data stream."""
    device: str = "cpu"
    """Torch device to train on, e.g. "cpu" or "cuda"."""
    log_every: int = 100
    """Record the per-instance training loss every this many steps."""

    def __post_init__(self) -> None:
        for name in ("n_features", "n_hidden", "n_instances", "steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InterplabError(f"{name} must be a positive integer, got {value!r}.")
        if self.activation not in get_args(Activation):
            raise unknown("activation", str(self.activation), get_args(Activation), show_all=True)
        if self.lr_schedule not in get_args(LrSchedule):
            raise unknown("lr_schedule", str(self.lr_schedule), get_args(LrSchedule), show_all=True)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InterplabError(f"lr must be a positive number, got {self.lr!r}.")
        if not (math.isfinite(self.importance_decay) and self.importance_decay > 0):
            raise InterplabError(
                f"importance_decay must be a positive number, got {self.importance_decay!r}."
            )
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise InterplabError(
                f"device {self.device!r} is not a torch device (expected e.g. 'cpu' or 'cuda')."
            ) from error
        # Resolving once validates values and shapes; the tensors are rebuilt when needed.
        self.probabilities()
        self.importances()

    def probabilities(self) -> Float[Tensor, "instances features"]:
        """Feature density 1 - S for every instance and feature, as a float32 [I, n] tensor."""
        p = _per_instance_feature(
            "feature_probability", self.feature_probability, self.n_instances, self.n_features
        )
        if not bool(((p > 0) & (p <= 1)).all()):
            bad = p[~((p > 0) & (p <= 1))][0].item()
            raise InterplabError(
                f"feature_probability must lie in (0, 1] (it is the feature density 1 - S), "
                f"got {bad!r}."
            )
        return p

    def importances(self) -> Float[Tensor, "instances features"]:
        """Importance I_i for every instance and feature, as a float32 [I, n] tensor."""
        if self.importance is None:
            decay = self.importance_decay ** torch.arange(self.n_features, dtype=torch.float64)
            return decay.float().expand(self.n_instances, -1).clone()
        imp = _per_instance_feature(
            "importance", self.importance, self.n_instances, self.n_features, allow_scalar=False
        )
        if not bool((imp >= 0).all()) or not bool((imp.sum(-1) > 0).all()):
            raise InterplabError(
                "importance must be finite, >= 0, and not all zero for an instance; "
                f"got min {imp.min().item()!r}."
            )
        return imp


def _per_instance_feature(
    name: str, value: Any, n_instances: int, n_features: int, *, allow_scalar: bool = True
) -> Tensor:
    """Broadcast a scalar / [features] / [instances] / [instances, features] setting to [I, n]."""
    try:
        t = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise InterplabError(
            f"{name} must be a number or a list of numbers, got {value!r}."
        ) from error
    if not bool(torch.isfinite(t).all()):
        raise InterplabError(f"{name} must be finite, got {value!r}.")
    if t.ndim == 0 and allow_scalar:
        return t.expand(n_instances, n_features).clone()
    if t.ndim == 1:
        # A flat list names per-instance values for probabilities, per-feature for importance.
        expected = n_instances if allow_scalar else n_features
        if t.shape[0] == expected:
            return (
                (t[:, None] if allow_scalar else t[None, :]).expand(n_instances, n_features).clone()
            )
    if t.ndim == 2 and tuple(t.shape) == (n_instances, n_features):
        return t.clone()
    shapes = (
        f"a number, [n_instances={n_instances}] or [n_instances, n_features={n_features}]"
        if allow_scalar
        else f"[n_features={n_features}] or [n_instances={n_instances}, n_features={n_features}]"
    )
    raise InterplabError(f"{name} has shape {list(t.shape)}; expected {shapes}.")


# --------------------------------------------------------------------------------------
# Model, loss and its gradient
# --------------------------------------------------------------------------------------


def reconstruct(
    W: Float[Tensor, "instances m n"],
    b: Float[Tensor, "instances n"],
    x: Float[Tensor, "instances batch n"],
    activation: Activation = "relu",
) -> Float[Tensor, "instances batch n"]:
    """The toy model's output x' = act(Wᵀ W x + b), for every instance at once."""
    h = torch.einsum("ibn,imn->ibm", x, W)
    out = torch.einsum("ibm,imn->ibn", h, W) + b[:, None, :]
    return torch.relu(out) if activation == "relu" else out


def reconstruction_loss(
    W: Float[Tensor, "instances m n"],
    b: Float[Tensor, "instances n"],
    x: Float[Tensor, "instances batch n"],
    importance: Float[Tensor, "instances n"],
    activation: Activation = "relu",
) -> Float[Tensor, " instances"]:
    """Per-instance loss Σ_i I_i (x_i - x'_i)², averaged over the batch (the paper's L)."""
    err = (x - reconstruct(W, b, x, activation)).square()
    return (err * importance[:, None, :]).sum(-1).mean(-1)


def evaluate_loss(
    W: Float[Tensor, "instances m n"],
    b: Float[Tensor, "instances n"],
    feature_probability: Float[Tensor, "instances n"],
    importance: Float[Tensor, "instances n"],
    activation: Activation = "relu",
    batch_size: int = 1024,
    n_batches: int = 16,
    seed: int = 0,
) -> Float[Tensor, " instances"]:
    """Per-instance loss on `n_batches` × `batch_size` fresh samples.

    Every instance sees the same uniforms (x = ReLU(1 - u/p), so instances of one density
    see identical data): comparing seeds of one setting, e.g. to keep the best, is then free
    of sampling noise, which at 16k samples is as large as the gaps between local minima.
    """
    device = W.device
    gen = torch.Generator().manual_seed(seed + 2)
    neg_inv_p = (-1.0 / feature_probability.to(device))[:, None, :]  # [I, 1, n]
    total = torch.zeros(W.shape[0], device=device)
    with torch.no_grad():
        for _ in range(n_batches):
            u = torch.rand(1, batch_size, W.shape[-1], generator=gen).to(device)
            x = torch.addcmul(torch.ones_like(u), u, neg_inv_p).relu_()
            total += reconstruction_loss(W, b, x, importance.to(device), activation)
    return total / n_batches


class _Workspace:
    """Buffers the training loop reuses every step.

    Layout is feature-major, [instances, n, batch]: broadcasting a per-feature value then
    runs along a contiguous batch row, and the matmuls have the batch as their long side,
    which keeps many-tiny-model runs (e.g. 676 models of 2 features for a phase diagram)
    fast. Reusing buffers matters at [20, 200, 1024], where a fresh allocation per op costs
    page faults that dominate the step on CPU.
    """

    def __init__(self, n_instances: int, n: int, m: int, batch: int, device: torch.device):
        self.u = torch.empty(n_instances, n, batch, device=device)  # uniforms, then δ
        self.x = torch.empty_like(self.u)  # features
        self.z = torch.empty_like(self.u)  # pre-activation Wᵀ W x + b
        self.h = torch.empty(n_instances, m, batch, device=device)  # W x
        # [W x; 1]: multiplying [W; b]ᵀ by it adds the bias inside the matmul (one pass
        # fewer), and multiplying it by δᵀ gives dL/dW's first term and dL/db together.
        self.h1 = torch.ones(n_instances, m + 1, batch, device=device)
        self.g = torch.empty_like(self.h)  # W δ


#: Below this density a CPU instance draws only its nonzero entries (geometric gaps between
#: them), which beats one uniform per entry; above it the dense draw is cheaper (measured).
_SPARSE_BELOW = 0.25
#: ... but only for instances with at least this many entries per batch: below it the
#: per-instance numpy calls cost more than one dense draw over all instances.
_SPARSE_MIN_ENTRIES = 1 << 16


class _FeatureSampler:
    """Draws feature batches [instances, n, batch]: each entry 0 with probability 1 - p,
    else uniform on [0, 1].

    Dense instances use x = ReLU(1 - u / p), u ~ U[0, 1): nonzero exactly when u < p, and
    then uniform, in two cheap passes over the uniforms. On CPU the uniforms come from numpy's
    PCG64 (about twice as fast as torch's CPU generator), and a sparse instance (one density
    below `_SPARSE_BELOW` for all its features) instead draws the positions of its nonzero
    entries as running sums of Geometric(p) gaps (exactly the Bernoulli(p) pattern) and a
    uniform value for each. Other devices use a torch generator on the device.
    """

    def __init__(self, p: Tensor, batch: int, seed: int, device: torch.device):
        self.p = p
        self.neg_inv_p = (-1.0 / p)[:, :, None].to(device)  # [I, n, 1]
        self.one = torch.ones_like(self.neg_inv_p)
        self.device = device
        if device.type == "cpu":
            self.rng = np.random.default_rng(seed)
            uniform = (p == p[:, :1]).all(-1)
            big = batch * p.shape[1] >= _SPARSE_MIN_ENTRIES
            self.sparse = [
                i for i in range(p.shape[0]) if big and uniform[i] and p[i, 0] < _SPARSE_BELOW
            ]
        else:
            self.gen = torch.Generator(device=device).manual_seed(seed)
            self.sparse = []
        self.dense = [i for i in range(p.shape[0]) if i not in self.sparse]

    def sample(self, ws: _Workspace) -> Tensor:
        if self.device.type != "cpu":
            ws.u.uniform_(generator=self.gen)
            torch.addcmul(self.one, ws.u, self.neg_inv_p, out=ws.x)
            return ws.x.relu_()
        if not self.sparse:
            self.rng.random(out=ws.u.numpy(), dtype=np.float32)
            torch.addcmul(self.one, ws.u, self.neg_inv_p, out=ws.x)
            return ws.x.relu_()
        for i in self.dense:
            self.rng.random(out=ws.u[i].numpy(), dtype=np.float32)
            torch.addcmul(self.one[i], ws.u[i], self.neg_inv_p[i], out=ws.x[i]).relu_()
        for i in self.sparse:
            self._sample_sparse(ws.x[i].view(-1), float(self.p[i, 0]))
        return ws.x

    def _sample_sparse(self, flat: Tensor, p: float) -> None:
        size = flat.numel()
        expected = size * p
        gaps = self.rng.geometric(p, size=int(expected + 10 * math.sqrt(expected) + 16))
        positions = np.cumsum(gaps) - 1
        while positions[-1] < size:  # ran short of the end (probability ~e^-50): draw on
            more = np.cumsum(self.rng.geometric(p, size=len(gaps))) + positions[-1]
            positions = np.concatenate([positions, more])
        positions = positions[positions < size]
        flat.zero_()
        flat[torch.from_numpy(positions)] = torch.from_numpy(
            self.rng.random(positions.size, dtype=np.float32)
        )


def _loss_and_grads(
    W: Tensor,
    b: Tensor,
    x: Tensor,
    scale: Tensor,
    importance: Tensor,
    activation: Activation,
    ws: _Workspace,
    want_loss: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Closed-form gradients of Σ_instances reconstruction_loss for x [I, n, B] (checked
    against autograd in the tests); about twice as fast as autograd on CPU because every big
    tensor is a reused buffer. With z = Wᵀ W x + b and δ = (2 I / B)·(act(z) - x)·act'(z):
        dL/db = Σ_batch δ,   dL/dW = (W x) δᵀ + (W δ) xᵀ   (summed over the batch).
    `scale` is 2 I / B [I, n]; it is folded into the small matrices, not the big δ."""
    m = W.shape[1]
    h = torch.bmm(W, x, out=ws.h)  # [I, m, B]
    ws.h1[:, :m] = h
    W_b = torch.cat([W, b[:, None, :]], 1)  # [I, m + 1, n]
    z = torch.bmm(W_b.transpose(1, 2), ws.h1, out=ws.z)  # [I, n, B]
    loss = None
    if want_loss:
        out = z.relu() if activation == "relu" else z
        loss = ((out - x).square() * importance[:, :, None]).sum(1).mean(-1)
    delta = torch.sub(z, x, out=ws.u)  # the uniforms are no longer needed this step
    if activation == "relu":
        # δ = (z - x)·[z > 0], masked by relu's own fused backward kernel
        torch.ops.aten.threshold_backward.grad_input(delta, z, 0.0, grad_input=delta)
    grads = torch.bmm(ws.h1, delta.transpose(1, 2)) * scale[:, None, :]  # [I, m + 1, n]
    g = torch.bmm(W * scale[:, None, :], delta, out=ws.g)  # [I, m, B]
    grad_W = torch.baddbmm(grads[:, :m], g, x.transpose(1, 2))
    return loss, grad_W, grads[:, m]


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


@dataclass
class SuperpositionResult:
    """Trained toy models: weights, per-instance loss and the settings they came from."""

    config: SuperpositionConfig
    """The settings used."""
    W: Float[Tensor, "instances m n"]
    """Weights; column W[:, i] is feature i's direction in the hidden space."""
    b: Float[Tensor, "instances n"]
    """Output biases."""
    loss: Float[Tensor, " instances"]
    """Final loss per instance from `evaluate_loss` (16 batches shared by all instances)."""
    feature_probability: Float[Tensor, "instances n"]
    """Feature density 1 - S used for each instance and feature."""
    importance: Float[Tensor, "instances n"]
    """Importance I_i used for each instance and feature."""
    loss_history: Float[Tensor, "logs instances"]
    """Training-batch loss recorded every `config.log_every` steps."""
    history_steps: list[int]
    """The step of each row of `loss_history`."""
    seconds: float
    """Wall-clock training time."""

    def best_instance(self, instances: Sequence[int] | None = None) -> int:
        """Index of the lowest-loss instance (among `instances` if given)."""
        candidates = list(range(self.W.shape[0])) if instances is None else list(instances)
        return min(candidates, key=lambda i: self.loss[i].item())

    def plot_feature_directions(self, instances: Sequence[int] | None = None) -> Figure:
        """Feature directions W_i in the 2D hidden space, one panel per instance (m must be 2)."""
        idx = list(range(self.W.shape[0])) if instances is None else list(instances)
        fig, axes = _panel_grid(len(idx), 3.0, 3.0)
        for ax, i in zip(axes, idx, strict=True):
            plot_feature_directions(self.W[i], self.importance[i], ax=ax)
            ax.set_title(_instance_title(self, i), fontsize=9)
        return fig

    def plot_gram(self, instances: Sequence[int] | None = None) -> Figure:
        """WᵀW heatmaps with per-feature norm bars coloured by superposition, one row each."""
        idx = list(range(self.W.shape[0])) if instances is None else list(instances)
        return plot_gram(self.W[idx], titles=[_instance_title(self, i) for i in idx])

    def plot_dimensionality(self) -> Figure:
        """D* = m / ||W||_F² against 1/(1-S), with each feature's D_i scattered behind it."""
        p = self.feature_probability
        if not bool((p == p[:, :1]).all()):
            raise InterplabError(
                "plot_dimensionality needs one feature probability per instance; this result "
                "uses different probabilities across features."
            )
        return plot_dimensionality(self.W, p[:, 0])


def train_superposition(config: SuperpositionConfig, progress: bool = True) -> SuperpositionResult:
    """Train `config.n_instances` toy models of superposition at once (Elhage et al. 2022).

    Adam (β = 0.9, 0.999, ε = 1e-8, no weight decay; the paper's notebook used AdamW with
    torch's default 0.01 decay) on fresh batches every step, learning rate constant or
    half-cosine decayed to 0 (`config.lr_schedule`). W starts Xavier-normal (std √(2/(m+n))
    per instance), b at 0. Returns weights on the CPU, the final per-instance loss from
    `evaluate_loss`, and the loss history.

    Speed: one step is a few batched matmuls and memory-bound passes over [instances, n,
    batch]; 20 instances × 200 features × batch 1024 take ~36 ms per step on one core of
    the 2-core development CPU (10k steps ≈ 6 min). There `torch.set_num_threads(1)` is
    much faster than the default 2 threads when the other core is busy.
    """
    from tqdm.auto import tqdm

    device = torch.device(config.device)
    n_inst, n, m = config.n_instances, config.n_features, config.n_hidden
    p = config.probabilities()
    importance = config.importances()
    gen = torch.Generator().manual_seed(config.seed)
    W = (torch.randn(n_inst, m, n, generator=gen) * math.sqrt(2.0 / (m + n))).to(device)
    b = torch.zeros(n_inst, n, device=device)
    adam = _Adam([W, b])
    ws = _Workspace(n_inst, n, m, config.batch_size, device)
    sampler = _FeatureSampler(p, config.batch_size, config.seed + 1, device)
    imp_dev = importance.to(device)
    scale = 2.0 * imp_dev / config.batch_size

    history: list[Tensor] = []
    history_steps: list[int] = []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="superposition", disable=not progress, leave=False)
    for step in bar:
        want_loss = step % config.log_every == 0 or step == config.steps - 1
        x = sampler.sample(ws)
        loss, grad_W, grad_b = _loss_and_grads(
            W, b, x, scale, imp_dev, config.activation, ws, want_loss
        )
        adam.step([grad_W, grad_b], config.lr * _lr_factor(config.lr_schedule, step, config.steps))
        if loss is not None:
            history.append(loss.cpu())
            history_steps.append(step)
            bar.set_postfix(loss=f"{loss.mean().item():.4g}", refresh=False)
    final = evaluate_loss(
        W, b, p, importance, config.activation, batch_size=config.batch_size, seed=config.seed
    )
    seconds = time.perf_counter() - start
    return SuperpositionResult(
        config=config,
        W=W.cpu(),
        b=b.cpu(),
        loss=final.cpu(),
        feature_probability=p,
        importance=importance,
        loss_history=torch.stack(history),
        history_steps=history_steps,
        seconds=seconds,
    )


def _lr_factor(schedule: LrSchedule, step: int, steps: int) -> float:
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))


class _Adam:
    """Adam (Kingma & Ba 2015) in place on a few tensors, with torch.optim.Adam's exact update
    (the tests compare the two). Hand-written because torch.optim's constructor imports
    torch._dynamo (seconds, once per process) and its fused CPU kernel misreads strided
    gradients (torch 2.13), while this loop needs neither autograd nor param groups."""

    def __init__(self, params: list[Tensor], betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = params
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.m = [torch.zeros_like(t) for t in params]
        self.v = [torch.zeros_like(t) for t in params]
        self.t = 0

    def step(self, grads: list[Tensor], lr: float) -> None:
        self.t += 1
        step_size = lr / (1 - self.beta1**self.t)
        bias2_sqrt = math.sqrt(1 - self.beta2**self.t)
        for param, grad, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m.lerp_(grad, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            param.addcdiv_(m, v.sqrt().div_(bias2_sqrt).add_(self.eps), value=-step_size)


# --------------------------------------------------------------------------------------
# Analysis (Elhage et al. 2022, sections "Superposition as a phase change" / "Geometry")
# --------------------------------------------------------------------------------------


def feature_norms(W: Float[Tensor, "*instances m n"]) -> Float[Tensor, "*instances n"]:
    """||W_i||: how strongly each feature is represented (≈1 represented, ≈0 dropped)."""
    return W.norm(dim=-2)


def _normalised_overlaps(W: Tensor, eps: float = 1e-8) -> Tensor:
    """[..., n, n] with entry [i, j] = Ŵ_i · W_j (row 0 for a zero feature)."""
    unit = W / W.norm(dim=-2, keepdim=True).clamp_min(eps)
    return torch.einsum("...mi,...mj->...ij", unit, W)


def superposition_score(W: Float[Tensor, "*instances m n"]) -> Float[Tensor, "*instances n"]:
    """Σ_{j≠i} (Ŵ_i · W_j)² per feature: how much other features project onto feature i's
    direction (0 for a feature with a dedicated orthogonal dimension)."""
    sq = _normalised_overlaps(W).square()
    return sq.sum(-1) - sq.diagonal(dim1=-2, dim2=-1)


def feature_dimensionality(W: Float[Tensor, "*instances m n"]) -> Float[Tensor, "*instances n"]:
    """D_i = ||W_i||² / Σ_j (Ŵ_i · W_j)²: the fraction of a dimension feature i gets
    (1 dedicated, 1/2 antipodal pair, 2/5 pentagon, 0 not represented)."""
    denom = _normalised_overlaps(W).square().sum(-1)
    norm_sq = W.square().sum(-2)
    return torch.where(denom > 0, norm_sq / denom.clamp_min(1e-30), torch.zeros_like(denom))


def dimensions_per_feature(W: Float[Tensor, "*instances m n"]) -> Float[Tensor, "*instances"]:
    """D* = m / ||W||_F²: hidden dimensions per embedded feature (1 with no superposition)."""
    return W.shape[-2] / W.square().sum((-2, -1))


def feature_angles(W: Float[Tensor, "*instances 2 n"]) -> Float[Tensor, "*instances n"]:
    """Direction of each feature in a 2D hidden space, in degrees in [0, 360)."""
    if W.shape[-2] != 2:
        raise InterplabError(f"feature angles need m = 2 hidden dimensions, got m = {W.shape[-2]}.")
    return torch.rad2deg(torch.atan2(W[..., 1, :], W[..., 0, :])) % 360.0


def angles_between_features(
    W: Float[Tensor, "2 n"], min_norm: float = 0.5
) -> Float[Tensor, " represented"]:
    """Angular gaps (degrees) between consecutive represented features of one m = 2 model,
    going round the circle; they sum to 360. A pentagon gives five gaps of 72°.

    Features with ||W_i|| <= `min_norm` count as not represented and are skipped.
    """
    if W.ndim != 2:
        raise InterplabError(
            f"angles_between_features takes one model's W [2, n], got {list(W.shape)}."
        )
    keep = feature_norms(W) > min_norm
    angles = feature_angles(W)[keep].sort().values
    if angles.numel() == 0:
        return angles
    return torch.diff(angles, append=angles[:1] + 360.0)


# --------------------------------------------------------------------------------------
# Phase diagram: 2 features in 1 dimension (paper section "Superposition as a phase change")
# --------------------------------------------------------------------------------------

#: Phase labels of `classify_phase`, indexed by its integer codes.
PHASES: tuple[str, ...] = (
    "feature 2 not represented",
    "feature 2 dedicated (feature 1 dropped)",
    "superposition (antipodal)",
    "other",
)


def classify_phase(
    W: Float[Tensor, "*instances m 2"], min_norm: float = 0.5
) -> Int[Tensor, "*instances"]:
    """Phase of each trained 2-feature model, as an index into `PHASES`.

    A feature is represented when ||W_i|| > `min_norm`. Both represented and pointing apart
    (cos(W_1, W_2) < -0.5) is antipodal superposition; anything else (neither represented,
    or both on one side) is "other".
    """
    if W.shape[-1] != 2:
        raise InterplabError(f"classify_phase needs n = 2 features, got n = {W.shape[-1]}.")
    norms = feature_norms(W)
    r1, r2 = norms[..., 0] > min_norm, norms[..., 1] > min_norm
    cos = (W[..., 0] * W[..., 1]).sum(-1) / (norms[..., 0] * norms[..., 1]).clamp_min(1e-12)
    phase = torch.full(r1.shape, 3, dtype=torch.long)
    phase[r1 & ~r2] = 0
    phase[r2 & ~r1] = 1
    phase[r1 & r2 & (cos < -0.5)] = 2
    return phase


def simple_superposition_boundary(importance_ratio: float) -> float:
    """Density below which antipodal superposition provably beats dropping a feature.

    Closed form for 2 features in 1 dimension, feature 2 with importance r relative to 1:
    dropping the less important feature costs min(1, r)·(p/3 - p²/4) (its variance); the
    antipodal solution W = (1, -1), b = 0 errs only when both features fire, by min(x1, x2),
    costing (1 + r)·p²/6. These cross at p = 4r/(2 + 5r) for r <= 1 and 4/(5 + 2r) for
    r >= 1. Optimised antipodal weights do a little better, so the true boundary lies
    somewhat higher.
    """
    r = importance_ratio
    return 4 * r / (2 + 5 * r) if r <= 1 else 4 / (5 + 2 * r)


def _default_ratios() -> tuple[float, ...]:
    return tuple(float(v) for v in np.logspace(-1, 1, 11))


def _default_densities() -> tuple[float, ...]:
    return tuple(float(v) for v in np.logspace(-2, 0, 11))


@dataclass
class PhaseDiagramConfig:
    """Settings for the 2-features-in-1-dimension phase diagram (one vectorised run)."""

    importance_ratios: tuple[float, ...] = field(default_factory=_default_ratios)
    """Importance of feature 2 relative to feature 1 (x axis, kept sorted; default 0.1 to
    10, log-spaced)."""
    densities: tuple[float, ...] = field(default_factory=_default_densities)
    """Feature densities 1 - S (y axis, kept sorted; default 0.01 to 1, log-spaced)."""
    n_repeats: int = 6
    """Seeds per cell; the lowest-loss one is classified. In sparse cells about half the
    seeds end in a local minimum that drops a feature, so a few are needed."""
    steps: int = 4000
    """Adam steps."""
    batch_size: int = 512
    """Samples per step and instance."""
    lr: float = 1e-2
    """Adam learning rate."""
    lr_schedule: LrSchedule = "cosine"
    """Learning-rate schedule (see SuperpositionConfig)."""
    min_norm: float = 0.5
    """||W_i|| above which a feature counts as represented."""
    seed: int = 0
    """Seed for weights and data."""
    device: str = "cpu"
    """Torch device."""

    def __post_init__(self) -> None:
        for name in ("importance_ratios", "densities"):
            given = getattr(self, name)
            try:
                values = tuple(sorted(float(v) for v in given))  # sorted: the plot's cell edges
            except (TypeError, ValueError):
                values = ()
            if not values or not all(math.isfinite(v) and v > 0 for v in values):
                raise InterplabError(
                    f"{name} must be a non-empty list of positive numbers, got {given!r}."
                )
            setattr(self, name, values)
        if any(d > 1 for d in self.densities):
            raise InterplabError(f"densities must lie in (0, 1], got {self.densities!r}.")
        if (
            isinstance(self.n_repeats, bool)
            or not isinstance(self.n_repeats, int)
            or self.n_repeats <= 0
        ):
            raise InterplabError(f"n_repeats must be a positive integer, got {self.n_repeats!r}.")
        if not self.min_norm > 0:
            raise InterplabError(f"min_norm must be positive, got {self.min_norm!r}.")
        self.training_config()  # validates steps, lr, device, ...

    def training_config(self) -> SuperpositionConfig:
        """The SuperpositionConfig with one instance per (density, ratio, repeat)."""
        grid = [
            (p, r)
            for p in self.densities
            for r in self.importance_ratios
            for _ in range(self.n_repeats)
        ]
        return SuperpositionConfig(
            n_features=2,
            n_hidden=1,
            n_instances=len(grid),
            feature_probability=[p for p, _ in grid],
            importance=[[1.0, r] for _, r in grid],
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            lr_schedule=self.lr_schedule,
            seed=self.seed,
            device=self.device,
        )


@dataclass
class PhaseDiagramResult:
    """The phase of the best trained model in each (density, importance ratio) cell."""

    config: PhaseDiagramConfig
    """The settings used."""
    phase: Int[Tensor, "densities ratios"]
    """Index into `PHASES` for each cell."""
    W: Float[Tensor, "densities ratios 1 2"]
    """Weights of the lowest-loss repeat in each cell."""
    loss: Float[Tensor, "densities ratios"]
    """Its loss."""
    training: SuperpositionResult
    """Every trained instance (ordered density, ratio, repeat)."""

    def plot(self) -> Figure:
        """The phase diagram: importance ratio (log x) by density (log y), coloured by phase,
        with the closed-form bound `simple_superposition_boundary` dashed."""
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        colors = ["#4c72b0", "#dd8452", "#55a868", "#bbbbbb"]
        ratios = np.asarray(self.config.importance_ratios)
        dens = np.asarray(self.config.densities)
        fig = Figure(figsize=(6.0, 4.6), layout="constrained")
        ax = fig.add_subplot()
        ax.pcolormesh(
            _log_edges(ratios),
            _log_edges(dens),
            self.phase.numpy(),
            cmap=ListedColormap(colors),
            norm=BoundaryNorm(np.arange(len(PHASES) + 1) - 0.5, len(PHASES)),
        )
        r_line = np.logspace(np.log10(ratios.min()), np.log10(ratios.max()), 200)
        ax.plot(r_line, [simple_superposition_boundary(r) for r in r_line], "k--", lw=1)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="relative importance of feature 2",
            ylabel="feature density 1 - S",
            title="2 features in 1 dimension",
        )
        handles = [Patch(color=c, label=name) for c, name in zip(colors, PHASES, strict=True)]
        handles.append(
            Line2D([], [], color="k", ls="--", label="W=(1,-1) beats dropping (closed form)")
        )
        ax.legend(
            handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2
        )
        return fig


def train_phase_diagram(config: PhaseDiagramConfig, progress: bool = True) -> PhaseDiagramResult:
    """Train 2-feature, 1-dimension toy models over importance ratio × density in one run,
    keep the lowest-loss repeat per cell and classify it (Elhage et al. 2022, "Superposition
    as a Phase Change"). Feature 1 has importance 1, feature 2 the ratio."""
    result = train_superposition(config.training_config(), progress=progress)
    n_p, n_r, k = len(config.densities), len(config.importance_ratios), config.n_repeats
    loss = result.loss.reshape(n_p, n_r, k)
    best = loss.argmin(-1)  # [P, R]
    W = result.W.reshape(n_p, n_r, k, 1, 2)
    W_best = torch.take_along_dim(W, best[:, :, None, None, None], dim=2)[:, :, 0]
    return PhaseDiagramResult(
        config=config,
        phase=classify_phase(W_best, config.min_norm),
        W=W_best,
        loss=loss.gather(-1, best[..., None])[..., 0],
        training=result,
    )


# --------------------------------------------------------------------------------------
# Figures (matplotlib imported lazily; Figure objects, no pyplot global state)
# --------------------------------------------------------------------------------------


def _panel_grid(count: int, width: float, height: float, max_cols: int = 5):
    from matplotlib.figure import Figure

    cols = min(count, max_cols)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, list(axes[:count])


def _instance_title(result: SuperpositionResult, i: int) -> str:
    p = result.feature_probability[i]
    density = f"{p[0].item():.3g}" if bool((p == p[0]).all()) else "mixed"
    return f"#{i}  1-S = {density}  loss {result.loss[i].item():.3g}"


def _log_edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges halfway (in log space) between sorted centres, for pcolormesh."""
    logc = np.log10(np.asarray(centres, dtype=float))
    if logc.size == 1:
        return 10 ** np.array([logc[0] - 0.5, logc[0] + 0.5])
    mid = (logc[1:] + logc[:-1]) / 2
    return 10 ** np.concatenate([[2 * logc[0] - mid[0]], mid, [2 * logc[-1] - mid[-1]]])


def plot_feature_directions(
    W: Float[Tensor, "2 n"], importance: Float[Tensor, " n"] | None = None, ax: Axes | None = None
) -> Figure:
    """Each feature's direction W_i in a 2D hidden space as a line from the origin, coloured
    by importance (bright = important), as in the paper's pentagon figures."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    if W.ndim != 2 or W.shape[0] != 2:
        raise InterplabError(f"feature directions need one model's W [2, n], got {list(W.shape)}.")
    if ax is None:
        fig = Figure(figsize=(3.2, 3.2), layout="constrained")
        ax = fig.add_subplot()
    n = W.shape[1]
    imp = torch.ones(n) if importance is None else importance.float()
    span = (imp.max() - imp.min()).clamp_min(1e-12)
    shade = ((imp - imp.min()) / span).numpy()
    cmap = colormaps["viridis"]
    for i in range(n):
        x, y = W[0, i].item(), W[1, i].item()
        color = cmap(0.15 + 0.85 * shade[i])
        ax.plot([0, x], [0, y], color=color, lw=2, label=f"feature {i}")
        ax.scatter([x], [y], color=color, s=18, zorder=3)
    lim = max(1.2, 1.1 * W.abs().max().item())
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
    ax.axhline(0, color="0.85", lw=0.5, zorder=0)
    ax.axvline(0, color="0.85", lw=0.5, zorder=0)
    return ax.figure


def plot_gram(W: Float[Tensor, "instances m n"], titles: Sequence[str] | None = None) -> Figure:
    """For each instance: WᵀW as a diverging heatmap (red +, blue -) and a bar of ||W_i|| per
    feature, coloured by its superposition score Σ_{j≠i}(Ŵ_i·W_j)² (dark = orthogonal)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if W.ndim == 2:
        W = W[None]
    k, _, n = W.shape
    gram = W.transpose(1, 2) @ W  # [k, n, n]
    norms = feature_norms(W)
    sup = superposition_score(W)
    fig = Figure(figsize=(6.4, 2.8 * k), layout="constrained")
    axes = fig.subplots(k, 2, squeeze=False, width_ratios=[1.0, 0.8])
    cmap = colormaps["viridis"]
    vmax = max(gram.abs().max().item(), 1e-6)
    for row in range(k):
        ax_g, ax_b = axes[row]
        im = ax_g.imshow(gram[row].numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax_g.set(xticks=[], yticks=[], ylabel="feature")
        if titles is not None:
            ax_g.set_title(titles[row], fontsize=9)
        colors = cmap(Normalize(0, 1, clip=True)(sup[row].numpy()))
        ax_b.barh(np.arange(n), norms[row].numpy(), color=colors, height=0.9)
        ax_b.set(ylim=(n - 0.5, -0.5), xlim=(0, max(1.1, norms.max().item() * 1.05)), yticks=[])
        ax_b.set_xlabel("||W_i||", fontsize=8)
    fig.colorbar(im, ax=axes[-1, 0], location="bottom", shrink=0.8, label="WᵀW")
    bars = ScalarMappable(Normalize(0, 1), cmap)
    fig.colorbar(bars, ax=axes[-1, 1], location="bottom", shrink=0.8, label="superposition score")
    return fig


def plot_dimensionality(
    W: Float[Tensor, "instances m n"], feature_probability: Float[Tensor, " instances"]
) -> Figure:
    """D* = m / ||W||_F² (line) and every feature's D_i (dots) against 1/(1-S), log x, with
    the polytope fractions 1, 3/4, 2/3, 1/2, 2/5, 3/8, 1/3 as guides (the paper's Figure in
    "Feature Dimensionality")."""
    from matplotlib.figure import Figure

    inv = (1.0 / feature_probability.float()).numpy()
    order = np.argsort(inv)
    d_star = dimensions_per_feature(W).numpy()
    d_i = feature_dimensionality(W).numpy()  # [I, n]
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for frac in POLYTOPE_DIMENSIONALITIES:
        ax.axhline(frac, color="0.8", lw=0.6, ls=":", zorder=0)
        ax.text(inv.max() * 1.05, frac, f"{_fraction(frac)}", fontsize=7, va="center")
    xs = np.repeat(inv[:, None], d_i.shape[1], axis=1)
    ax.scatter(xs.ravel(), d_i.ravel(), s=4, alpha=0.25, color="#4c72b0", label="D_i (per feature)")
    ax.plot(inv[order], d_star[order], color="k", lw=1.5, marker="o", ms=3, label="D* = m/||W||_F²")
    ax.set(xscale="log", xlabel="1 / (1 - S)", ylabel="dimensions per feature", ylim=(0, 1.1))
    ax.legend(fontsize=8, loc="upper right")
    return fig


def _fraction(value: float) -> str:
    from fractions import Fraction

    return str(Fraction(value).limit_denominator(8))
