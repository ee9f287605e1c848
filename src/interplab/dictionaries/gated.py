"""Gated dictionary (Rajamanoharan et al. 2024a, "Improving Dictionary Learning with Gated SAEs").

    pi_gate = x_c @ W_enc + b_gate                       which latents fire
    pi_mag  = x_c @ (W_enc * exp(r_mag)) + b_mag         how strongly (weights tied to the gate)
    f       = 1[pi_gate > 0] * ReLU(pi_mag)

loss = ||y - x_hat||^2 + l1 * sum_i ReLU(pi_gate)_i ||W_dec_i|| + ||y - x_hat_gate||^2, where
x_hat_gate decodes ReLU(pi_gate) through a frozen (detached) copy of the decoder so the gate
path gets a reconstruction signal despite the non-differentiable 1[.]. Parameter names follow
SAELens (`b_gate`, `r_mag`, `b_mag`; no `b_enc`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from interplab.dictionaries.base import Dictionary, DictionaryOutput
from interplab.dictionaries.configs import Gated


class GatedDictionary(Dictionary):
    """Gated SAE/transcoder with the frozen-decoder auxiliary loss."""

    variant: Gated
    has_b_enc = False
    dense_at_init = True

    def _init_variant_parameters(self, factory: dict[str, Any]) -> None:
        self.b_gate = nn.Parameter(torch.zeros(self.d_sae, **factory))
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae, **factory))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae, **factory))

    def _pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shared = self._centered(x) @ self.W_enc
        return shared + self.b_gate, shared * self.r_mag.exp() + self.b_mag

    def _encode(self, x: Tensor) -> Tensor:
        pi_gate, pi_mag = self._pre(x)
        return (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()

    def _forward(
        self, x: Tensor, target: Tensor, sparsity_scale: float, dead_mask: Tensor | None
    ) -> DictionaryOutput:
        pi_gate, pi_mag = self._pre(x)
        latents = (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()
        skip = self._skip_out(x)
        x_hat = latents @ self.W_dec + self.b_dec + skip
        mse = self._mse(x_hat, target)
        gate = pi_gate.relu()
        l1 = (gate * self.W_dec.norm(dim=1)).sum(-1).mean()
        frozen_skip = skip.detach() if isinstance(skip, Tensor) else skip
        x_hat_gate = gate @ self.W_dec.detach() + self.b_dec.detach() + frozen_skip
        aux = self._mse(x_hat_gate, target)
        loss = mse + sparsity_scale * self.variant.l1_coefficient * l1 + aux
        return self._dense_output(latents, x_hat, loss, {"mse": mse, "l1": l1, "aux": aux})

    def file_tensors(self) -> dict[str, Tensor]:
        extra = {"b_gate": self.b_gate, "r_mag": self.r_mag, "b_mag": self.b_mag}
        return {**super().file_tensors(), **{k: v.detach() for k, v in extra.items()}}

    def _copy_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        super()._copy_file_tensors(tensors)
        for name in ("b_gate", "r_mag", "b_mag"):
            getattr(self, name).copy_(tensors[name])
