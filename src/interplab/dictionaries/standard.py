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

Sparse training pass (`ReLU.use_sparse_kernels`, on by default): once trained, a ReLU SAE
keeps ~1-5% of its latents active, and after the ReLU only those matter. The pre-activations
`x_c @ W_enc + b_enc` are computed without autograd; when the fraction of positive entries is
at most `ReLU.sparse_max_density`, the active (token, latent) pairs go through the TopK
kernels (`interplab.dictionaries.kernels`): the decoder forward and backward are
`embedding_bag` and sparse products over the active rows of W_dec, and the encoder backward
is built from the active entries alone. A step then costs one dense matmul plus O(nnz d_in)
work instead of six dense matmuls. Denser batches (early training: about half the latents
fire at initialisation) take a dense path that reuses those pre-activations and forms the
L1 term and the fired mask from per-latent sums, so it needs no extra matmul and fewer
[batch, d_sae] passes than plain autograd. All three (plain autograd, dense, sparse) give the
same loss and gradients (tests/unit/test_dictionaries_relu_sparse.py); the threshold and the
timings come from `benchmarks/bench_relu_kernels.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from interplab.dictionaries.base import Dictionary, DictionaryOutput
from interplab.dictionaries.configs import ReLU
from interplab.dictionaries.kernels import SparseCode, sparse_decode, sparse_encode_selected


class _ReLUOfGivenPre(torch.autograd.Function):
    """f = ReLU(pre) for `pre = x_c @ W_enc + b_enc` computed without autograd (for the
    density check), attached to the graph without redoing the matmul. `pre` is overwritten
    in place by f, which saves a [batch, d_sae] buffer; the backward is ReLU's followed by
    addmm's (dense matmuls and a column sum)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, pre: Tensor) -> Tensor:
        ctx.mark_dirty(pre)
        latents = pre.clamp_min_(0)
        ctx.save_for_backward(x, W_enc, latents)
        return latents

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, W_enc, latents = ctx.saved_tensors
        # ReLU's own backward kernel (grad where f > 0, else 0): one pass, about 3x faster
        # here than torch.where with a mask or a bool multiply.
        grad_pre = torch.ops.aten.threshold_backward(grad, latents, 0)
        grad_x = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_pre @ W_enc.T
        if ctx.needs_input_grad[1]:
            grad_W_enc = x.T @ grad_pre
        if ctx.needs_input_grad[2]:
            grad_b_enc = grad_pre.sum(0)
        return grad_x, grad_W_enc, grad_b_enc, None


class ReLUDictionary(Dictionary):
    """ReLU SAE/transcoder trained with a decoder-weighted L1 penalty: the constrained
    recipe (unit-norm decoder rows) by default, Anthropic's April 2024 free decoder with
    `normalize_decoder=False`; the encoder starts as a scaled decoder transpose, and sparse
    batches train through the sparse kernels (see the module docstring)."""

    variant: ReLU
    dense_at_init = True

    def _encode(self, x: Tensor) -> Tensor:
        return (self._centered(x) @ self.W_enc + self.b_enc).relu()

    def _forward(
        self, x: Tensor, target: Tensor, sparsity_scale: float, dead_mask: Tensor | None
    ) -> DictionaryOutput:
        x_c = self._centered(x)
        if not self.variant.use_sparse_kernels:
            return self._reference_loss(x_c, x, target, sparsity_scale)
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_c, self.W_enc)
            active = pre > 0
            # count_nonzero: several times faster than sum() on a bool tensor (measured)
            nnz = int(torch.count_nonzero(active))
        if nnz > self.variant.sparse_max_density * active.numel():
            return self._dense_loss(x_c, pre, nnz, x, target, sparsity_scale)
        rows, cols = active.nonzero(as_tuple=True)  # row-major, so sorted by token
        return self._sparse_loss(x_c, pre, rows, cols, x, target, sparsity_scale)

    def _penalised(
        self, mse: Tensor, l1: Tensor, sparsity_scale: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss = mse + sparsity_scale * self.variant.l1_coefficient * l1
        return loss, {"mse": mse, "l1": l1}

    def _reference_loss(
        self, x_c: Tensor, x: Tensor, target: Tensor, sparsity_scale: float
    ) -> DictionaryOutput:
        """The loss by plain autograd through dense matmuls (`use_sparse_kernels=False`)."""
        latents = (x_c @ self.W_enc + self.b_enc).relu()
        x_hat = latents @ self.W_dec + self.b_dec + self._skip_out(x)
        l1 = (latents * self.W_dec.norm(dim=1)).sum(-1).mean()
        loss, losses = self._penalised(self._mse(x_hat, target), l1, sparsity_scale)
        return self._dense_output(latents, x_hat, loss, losses)

    def _dense_loss(
        self,
        x_c: Tensor,
        pre: Tensor,
        nnz: int,
        x: Tensor,
        target: Tensor,
        sparsity_scale: float,
    ) -> DictionaryOutput:
        """The same loss with dense matmuls from the no-grad `pre` (overwritten): for batches
        too dense for the sparse kernels. Per-latent sums give the L1 term and the fired mask,
        so no further [batch, d_sae] products are formed."""
        n_rows = pre.shape[0]
        latents = _ReLUOfGivenPre.apply(x_c, self.W_enc, self.b_enc, pre)
        x_hat = latents @ self.W_dec + self.b_dec + self._skip_out(x)
        per_latent = latents.sum(0)
        l1 = per_latent @ self.W_dec.norm(dim=1) / n_rows
        loss, losses = self._penalised(self._mse(x_hat, target), l1, sparsity_scale)
        return DictionaryOutput(
            x_hat=x_hat,
            loss=loss,
            losses=losses,
            l0=x_hat.new_tensor(nnz / n_rows),
            fired=per_latent.detach() > 0,  # a sum of non-negative values
            dense_latents=latents,
        )

    def _sparse_loss(
        self,
        x_c: Tensor,
        pre: Tensor,
        rows: Tensor,
        cols: Tensor,
        x: Tensor,
        target: Tensor,
        sparsity_scale: float,
    ) -> DictionaryOutput:
        """The same loss from the active (token, latent) pairs only; ReLU is the identity on
        them (and its derivative 1, as on the dense path where pre > 0)."""
        n_rows = pre.shape[0]
        code = SparseCode(pre.new_empty(0), rows, cols, n_rows, self.d_sae)
        values = sparse_encode_selected(
            x_c, self.W_enc, self.b_enc, pre, rows, cols, code.offsets()
        )
        code = code.with_values(values)
        x_hat = sparse_decode(code, self.W_dec) + self.b_dec + self._skip_out(x)
        l1 = (values * self.W_dec.norm(dim=1)[cols]).sum() / n_rows
        loss, losses = self._penalised(self._mse(x_hat, target), l1, sparsity_scale)
        return DictionaryOutput(
            x_hat=x_hat,
            loss=loss,
            losses=losses,
            # every selected value is positive; count in Python so float64 stays exact
            l0=x_hat.new_tensor(rows.numel() / max(n_rows, 1)),
            fired=code.fired(),
            code=code,
        )
