"""Standard (ReLU) dictionary with a decoder-norm-weighted L1 penalty.

Anthropic, "Circuits Updates - April 2024" (training SAEs): f = ReLU(x_c @ W_enc + b_enc),
loss = ||y - x_hat||^2 + l1_coefficient * sum_i f_i * ||W_dec_i||. With the decoder kept at
unit norm the weights are 1; they matter when `normalize_decoder=False`, where they stop the
optimiser from shrinking latents by growing decoder rows.
"""

from __future__ import annotations

from torch import Tensor

from interplab.dictionaries.base import Dictionary, DictionaryOutput
from interplab.dictionaries.configs import ReLU


class ReLUDictionary(Dictionary):
    """ReLU SAE/transcoder trained with a decoder-weighted L1 penalty."""

    variant: ReLU

    def _encode(self, x: Tensor) -> Tensor:
        return (self._centered(x) @ self.W_enc + self.b_enc).relu()

    def _forward(
        self, x: Tensor, target: Tensor, sparsity_scale: float, dead_mask: Tensor | None
    ) -> DictionaryOutput:
        latents = self._encode(x)
        x_hat = latents @ self.W_dec + self.b_dec + self._skip_out(x)
        mse = self._mse(x_hat, target)
        l1 = (latents * self.W_dec.norm(dim=1)).sum(-1).mean()
        loss = mse + sparsity_scale * self.variant.l1_coefficient * l1
        return self._dense_output(latents, x_hat, loss, {"mse": mse, "l1": l1})
