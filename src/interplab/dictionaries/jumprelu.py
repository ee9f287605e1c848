"""JumpReLU dictionary (Rajamanoharan et al. 2024b, "Jumping Ahead").

f_i = z_i * H(z_i - theta_i) with z = x_c @ W_enc + b_enc and a learned threshold theta >= 0.
The loss ||y - x_hat||^2 + l0_coefficient * sum_i H(z_i - theta_i) is trained with
straight-through estimators: the Heaviside step gets the pseudo-derivative

    d/dtheta H(z - theta) := -(1/eps) K((z - theta)/eps),   K = rectangle on (-1/2, 1/2),

and the JumpReLU output d/dtheta [z H(z - theta)] := -(theta/eps) K((z - theta)/eps), while the
gradient with respect to z is the true one (H(z - theta) for the output, 0 for the step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from interplab.dictionaries.base import Dictionary, DictionaryOutput
from interplab.dictionaries.configs import JumpReLU


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLUFunction(torch.autograd.Function):
    """z * H(z - theta); gradient into theta by the rectangle-kernel estimator."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad * (z > theta).to(z.dtype)
        grad_theta = (-(theta / eps) * _rectangle((z - theta) / eps) * grad).sum(0)
        return grad_z, grad_theta, None


class _StepFunction(torch.autograd.Function):
    """H(z - theta); no gradient into z, rectangle-kernel estimator into theta."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * _rectangle((z - theta) / eps) * grad).sum(0)
        return None, grad_theta, None


class JumpReLUDictionary(Dictionary):
    """JumpReLU SAE/transcoder with an L0 penalty (straight-through estimators)."""

    variant: JumpReLU
    dense_at_init = True

    def _init_variant_parameters(self, factory: dict[str, Any]) -> None:
        init = self.variant.init_threshold
        if self.variant.threshold_param == "log":
            self.log_threshold = nn.Parameter(torch.full((self.d_sae,), math.log(init), **factory))
        else:
            # Named as in SAELens; used as max(threshold, 0).
            self.threshold = nn.Parameter(torch.full((self.d_sae,), init, **factory))

    def theta(self) -> Tensor:
        """Effective per-latent threshold theta >= 0 [d_sae]."""
        if self.variant.threshold_param == "log":
            return self.log_threshold.exp()
        return self.threshold.relu()

    def _pre(self, x: Tensor) -> Tensor:
        return self._centered(x) @ self.W_enc + self.b_enc

    def _encode(self, x: Tensor) -> Tensor:
        pre = self._pre(x)
        return pre.relu() * (pre > self.theta()).to(pre.dtype)

    def _forward(
        self, x: Tensor, target: Tensor, sparsity_scale: float, dead_mask: Tensor | None
    ) -> DictionaryOutput:
        pre = self._pre(x)
        theta = self.theta()
        bandwidth = self.variant.bandwidth
        latents = _JumpReLUFunction.apply(pre, theta, bandwidth)
        x_hat = latents @ self.W_dec + self.b_dec + self._skip_out(x)
        mse = self._mse(x_hat, target)
        l0 = _StepFunction.apply(pre, theta, bandwidth).sum(-1).mean()
        loss = mse + sparsity_scale * self.variant.l0_coefficient * l0
        return self._dense_output(latents, x_hat, loss, {"mse": mse, "l0": l0})

    def file_tensors(self) -> dict[str, Tensor]:
        return {**super().file_tensors(), "threshold": self.theta().detach()}

    def _copy_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        super()._copy_file_tensors(tensors)
        # SAELens applies max(threshold, 0); a threshold <= 0 means plain ReLU, which the log
        # parametrisation represents as log(0) = -inf.
        threshold = tensors["threshold"].clamp_min(0)
        if self.variant.threshold_param == "log":
            self.log_threshold.copy_(threshold.log())
        else:
            self.threshold.copy_(threshold)
