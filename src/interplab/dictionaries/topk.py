"""TopK-family dictionaries: TopK, BatchTopK and Matryoshka.

All three pick a sparse set of (token, latent) pairs from the dense pre-activations, then run
everything else through the sparse kernels of `interplab.dictionaries.kernels`:

* TopK (Gao et al. 2024): the k largest pre-activations of each token, then ReLU; dead latents
  are trained by the AuxK loss (the top `aux_k` dead latents reconstruct the residual).
* BatchTopK (Bussmann et al. 2024): the k * batch largest over the whole batch while training;
  a running threshold (EMA of the smallest kept activation) replaces the batch top-k at
  inference, which makes the saved dictionary a JumpReLU with one shared threshold.
* Matryoshka (Bussmann et al. 2025): TopK whose nested latent prefixes must each reconstruct
  the target; the loss sums the prefix errors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from interplab.dictionaries.base import Dictionary, DictionaryOutput
from interplab.dictionaries.configs import BatchTopK, Matryoshka, TopK
from interplab.dictionaries.kernels import SparseCode, dense_encode_selected, sparse_encode_selected
from interplab.errors import InterplabError


class TopKDictionary(Dictionary):
    """TopK SAE/transcoder with the AuxK dead-latent loss (Gao et al. 2024)."""

    variant: TopK

    def _init_variant_parameters(self, factory: dict[str, Any]) -> None:
        if self.variant.k > self.d_sae:
            raise InterplabError(f"k={self.variant.k} must be <= d_sae={self.d_sae}.")
        aux_k = self.variant.aux_k if self.variant.aux_k is not None else max(self.d_out // 2, 1)
        self.aux_k = min(aux_k, self.d_sae)

    @property
    def use_sparse_kernels(self) -> bool:
        """Whether the sparse kernels (True) or dense matmuls (False) are used."""
        return self.variant.use_sparse_kernels

    # ----------------------------------------------------------------- selection
    def _pre(self, x_c: Tensor) -> Tensor:
        """Dense pre-activations; with sparse kernels they carry no autograd graph (the
        gradient is rebuilt from the selected entries only)."""
        if self.use_sparse_kernels:
            with torch.no_grad():
                return torch.addmm(self.b_enc, x_c, self.W_enc)
        return torch.addmm(self.b_enc, x_c, self.W_enc)

    def _code_at(self, x_c: Tensor, pre: Tensor, rows: Tensor, cols: Tensor) -> SparseCode:
        """ReLU of the pre-activations at (rows, cols), differentiable in the parameters."""
        code = SparseCode(pre.new_empty(0), rows, cols, pre.shape[0], self.d_sae)
        if self.use_sparse_kernels:
            selected = sparse_encode_selected(
                x_c, self.W_enc, self.b_enc, pre, rows, cols, code.offsets()
            )
        else:
            selected = dense_encode_selected(pre, rows, cols)
        return code.with_values(selected.relu())

    def _topk_code(
        self, x_c: Tensor, pre: Tensor, k: int, candidates: Tensor | None = None
    ) -> SparseCode:
        """Per-token top-k of `pre` (restricted to `candidates` latents when given)."""
        scores = pre.detach()
        if candidates is not None:
            scores = scores.masked_fill(~candidates, float("-inf"))
        indices = scores.topk(k, dim=-1, sorted=False).indices
        n_rows = pre.shape[0]
        rows = torch.arange(n_rows, device=pre.device).repeat_interleave(k)
        return self._code_at(x_c, pre, rows, indices.reshape(-1))

    def _train_code(self, x_c: Tensor, pre: Tensor) -> SparseCode:
        """Latents used by the training forward pass."""
        return self._topk_code(x_c, pre, self.variant.k)

    def _inference_code(self, x_c: Tensor, pre: Tensor) -> SparseCode:
        """Latents used by `encode` (and by `forward` in eval mode)."""
        return self._topk_code(x_c, pre, self.variant.k)

    # ----------------------------------------------------------------- passes
    def _encode(self, x: Tensor) -> Tensor:
        x_c = self._centered(x)
        # The sparse path rebuilds encoder gradients from the selected entries, so `encode`
        # stays differentiable either way.
        return self._inference_code(x_c, self._pre(x_c)).to_dense()

    def _reconstruct(
        self, code: SparseCode, x: Tensor, target: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """x_hat and the reconstruction loss terms (Matryoshka adds prefix terms)."""
        x_hat = self._decode_code(code, self.use_sparse_kernels) + self.b_dec + self._skip_out(x)
        return x_hat, {"mse": self._mse(x_hat, target)}

    def _aux_loss(
        self, x_c: Tensor, pre: Tensor, x_hat: Tensor, target: Tensor, dead_mask: Tensor
    ) -> Tensor:
        """AuxK (Gao et al. 2024, appendix A.2): the top `aux_k` dead latents reconstruct the
        (detached) residual; scaled down by n_dead / aux_k while few latents are dead."""
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return x_hat.new_zeros(())
        k_aux = min(self.aux_k, n_dead)
        code = self._topk_code(x_c, pre, k_aux, candidates=dead_mask)
        residual_hat = self._decode_code(code, self.use_sparse_kernels)
        residual = (target - x_hat).detach()
        return min(n_dead / self.aux_k, 1.0) * self._mse(residual_hat, residual)

    def _forward(
        self, x: Tensor, target: Tensor, sparsity_scale: float, dead_mask: Tensor | None
    ) -> DictionaryOutput:
        x_c = self._centered(x)
        pre = self._pre(x_c)
        code = self._train_code(x_c, pre) if self.training else self._inference_code(x_c, pre)
        x_hat, losses = self._reconstruct(code, x, target)
        loss = sum(losses.values(), x_hat.new_zeros(()))
        if dead_mask is not None and self.variant.aux_coefficient > 0:
            if dead_mask.shape != (self.d_sae,):
                raise InterplabError(
                    f"dead_mask has shape {tuple(dead_mask.shape)}, expected ({self.d_sae},)."
                )
            losses["aux"] = self._aux_loss(x_c, pre, x_hat, target, dead_mask.bool())
            loss = loss + self.variant.aux_coefficient * losses["aux"]
        return DictionaryOutput(
            x_hat=x_hat,
            loss=loss,
            losses=losses,
            l0=code.l0().detach().to(x_hat.dtype),
            fired=code.fired(),
            code=code,
        )


class BatchTopKDictionary(TopKDictionary):
    """BatchTopK (Bussmann et al. 2024): batch-level top-k while training, a learned global
    threshold at inference (saved as a JumpReLU `threshold`)."""

    variant: BatchTopK
    threshold: Tensor
    threshold_updates: Tensor

    def _init_variant_parameters(self, factory: dict[str, Any]) -> None:
        super()._init_variant_parameters(factory)
        self.register_buffer("threshold", torch.zeros(self.d_sae, **factory))
        self.register_buffer(
            "threshold_updates", torch.zeros((), dtype=torch.int64, device=factory["device"])
        )

    def _train_code(self, x_c: Tensor, pre: Tensor) -> SparseCode:
        n_rows = pre.shape[0]
        flat = pre.detach().relu().reshape(-1)
        top = flat.topk(self.variant.k * n_rows, sorted=False).indices.sort().values
        rows, cols = top // self.d_sae, top % self.d_sae
        code = self._code_at(x_c, pre, rows, cols)
        self._update_threshold(code.values.detach())
        return code

    @torch.no_grad()
    def _update_threshold(self, values: Tensor) -> None:
        """EMA of the smallest positive kept activation (the inference threshold)."""
        positive = values[values > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min().to(self.threshold.dtype)
        momentum = self.variant.threshold_momentum
        first = self.threshold_updates == 0
        new = torch.where(first, smallest, momentum * self.threshold[0] + (1 - momentum) * smallest)
        self.threshold.copy_(new.expand_as(self.threshold))
        self.threshold_updates.add_(1)

    def _inference_code(self, x_c: Tensor, pre: Tensor) -> SparseCode:
        scores = pre.detach()
        active = (scores > self.threshold) & (scores > 0)
        rows, cols = active.nonzero(as_tuple=True)
        return self._code_at(x_c, pre, rows, cols)

    def file_tensors(self) -> dict[str, Tensor]:
        return {**super().file_tensors(), "threshold": self.threshold.detach()}

    def _copy_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        super()._copy_file_tensors(tensors)
        self.threshold.copy_(tensors["threshold"])
        self.threshold_updates.fill_(1)


class MatryoshkaDictionary(TopKDictionary):
    """Matryoshka TopK: each nested prefix of latents reconstructs the target on its own."""

    variant: Matryoshka

    def _reconstruct(
        self, code: SparseCode, x: Tensor, target: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        prefixes = self.variant.prefixes
        assert prefixes is not None
        bounds = torch.tensor(prefixes, device=code.cols.device)
        group = torch.bucketize(code.cols, bounds, right=True)
        x_hat = self.b_dec + self._skip_out(x)
        prefix_mse = target.new_zeros(())
        for g in range(len(prefixes)):
            keep = group == g
            part = SparseCode(
                code.values[keep], code.rows[keep], code.cols[keep], code.n_rows, code.n_cols
            )
            x_hat = x_hat + self._decode_code(part, self.use_sparse_kernels)
            if g < len(prefixes) - 1:
                prefix_mse = prefix_mse + self._mse(x_hat, target)
        return x_hat, {"mse": self._mse(x_hat, target), "matryoshka": prefix_mse}
