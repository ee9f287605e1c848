"""Standard (ReLU) dictionary: f = ReLU(x_c @ W_enc + b_enc), loss = MSE + l1 * L1.

loss = ||y - x_hat||^2 + l1_coefficient * sum_i f_i * ||W_dec_i||   (averaged over tokens)

Recipe (defaults): the constrained one of Bricken et al. 2023 ("Towards Monosemanticity"):
decoder rows are kept at unit norm (the trainer removes the gradient component parallel to
each row and renormalises after every step), so the norm weights are 1 and the penalty is a
plain L1 on the latents; `b_dec` starts at the geometric median of the first batch and is
subtracted from the input; the L1 coefficient warms up linearly over the first 5% of steps
(`TrainConfig.sparsity_warmup_fraction`); inputs are scaled to E||x||^2 = d_in. With
`normalize_decoder=False` the decoder is free and the norm weights make this the penalty of
Anthropic's "Circuits Updates - April 2024", which stops the optimiser from shrinking latents
by growing decoder rows (their rows start at norm 0.1 with W_enc = W_dec.T; here rows start
at norm 1 and the encoder scale below sets the size of the first reconstruction instead).
Both train to the FVU of a plain reference implementation on synthetic sparse data
(tests/unit/test_dictionaries_training.py); the constrained one was as good or slightly
better at 4 and 16 latents per dimension, and shares its machinery with the TopK family.

Initialisation: W_enc = s * W_dec.T with s = 2 d_in / (d_sae + 2 d_in)
(`base.dense_encoder_scale`). An unscaled tied encoder (s = 1) makes about half of the latents
fire with the full projection w_i . x, so the first reconstruction is ~d_sae / (2 d_in) times
too large: at 16 latents per dimension interplab's ReLU SAE started at FVU ~70 and was still
at FVU ~22 after 64 steps of the dictionary benchmark, and ~5 after 300 steps on synthetic
sparse data where a plain reference implementation reached 0.15.
"""

from __future__ import annotations

from torch import Tensor

from interplab.dictionaries.base import Dictionary, DictionaryOutput
from interplab.dictionaries.configs import ReLU


class ReLUDictionary(Dictionary):
    """ReLU SAE/transcoder trained with a decoder-weighted L1 penalty: the constrained
    recipe (unit-norm decoder rows) by default, Anthropic's April 2024 free decoder with
    `normalize_decoder=False`; the encoder starts as a scaled decoder transpose (see the
    module docstring)."""

    variant: ReLU
    dense_at_init = True

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
