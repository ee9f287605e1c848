"""Grokfast gradient filters (Lee et al. 2024, "Grokfast: Accelerated Grokking by Amplifying
Slow Gradients").

Grokfast treats the sequence of gradients as a signal over training steps and adds back an
amplified low-pass-filtered copy before the optimiser step, g <- g + lamb * LPF(g): the slow
component (which drives generalisation) grows relative to the fast one (which memorises).
Two filters: an exponential moving average ("ema", momentum alpha) and a moving average of
the last `window` gradients ("ma"). Each is called on the parameters after `backward()`
and edits their `.grad` in place.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

#: Grokfast's recommended amplification per filter (Lee et al. 2024, algorithmic data).
DEFAULT_FILTER_LAMB = {"ema": 2.0, "ma": 5.0}


class EMAGradFilter:
    """Grokfast-EMA: h <- alpha h + (1 - alpha) g;  g <- g + lamb h (h starts at the first g)."""

    def __init__(self, alpha: float, lamb: float):
        self.alpha, self.lamb = alpha, lamb
        self.state: dict[int, Tensor] = {}

    def __call__(self, params: Iterable[Tensor]) -> None:
        for i, param in enumerate(params):
            if param.grad is None:
                continue
            grad = param.grad
            if i not in self.state:
                self.state[i] = grad.detach().clone()
            else:
                self.state[i].mul_(self.alpha).add_(grad.detach(), alpha=1 - self.alpha)
            grad.add_(self.state[i], alpha=self.lamb)


class MAGradFilter:
    """Grokfast-MA: once `window` gradients are stored, g <- g + lamb * mean(last window g).

    A ring buffer and a running sum keep each step O(parameters), not O(window x parameters).
    """

    def __init__(self, window: int, lamb: float):
        self.window, self.lamb = window, lamb
        self.buffers: dict[int, Tensor] = {}
        self.sums: dict[int, Tensor] = {}
        self.count = 0

    def __call__(self, params: Iterable[Tensor]) -> None:
        slot = self.count % self.window
        for i, param in enumerate(params):
            if param.grad is None:
                continue
            grad = param.grad.detach()
            if i not in self.buffers:
                self.buffers[i] = grad.new_zeros((self.window, *grad.shape))
                self.sums[i] = torch.zeros_like(grad)
            self.sums[i].add_(grad - self.buffers[i][slot])
            self.buffers[i][slot] = grad
            if self.count + 1 >= self.window:
                param.grad.add_(self.sums[i], alpha=self.lamb / self.window)
        self.count += 1
