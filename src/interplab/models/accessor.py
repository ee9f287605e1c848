"""Weights in TransformerLens shapes, read through one accessor.

Weight-based analyses (OV/QK circuits, direct logit attribution) read weights only through
`weights(model)`, so a new architecture needs changes here and nowhere else. Shapes:

    W_Q, W_K, W_V   [n_layers, n_heads, d_model, d_head]   (K/V repeated per query head for GQA)
    b_Q, b_K, b_V   [n_layers, n_heads, d_head]            (zeros where the model has no bias)
    W_O             [n_layers, n_heads, d_head, d_model]
    b_O             [n_layers, d_model]
    W_in, W_gate    [n_layers, d_model, d_mlp]             (W_gate only for gated MLPs)
    W_out           [n_layers, d_mlp, d_model]
    b_in, b_out     [n_layers, d_mlp], [n_layers, d_model]
    W_E             [d_vocab, d_model];  W_pos [n_ctx, d_model] (learned positions only)
    W_U             [d_model, d_vocab];  b_U [d_vocab]
    ln1_w, ln2_w    [n_layers, d_model]  effective multipliers (Gemma's 1 + w already added)
    ln1_b, ln2_b    [n_layers, d_model]  (zeros for RMSNorm)
    ln_final_w/_b   [d_model]

The head convention is TransformerLens's: q = x @ W_Q[l, h] + b_Q[l, h] with x the
normalised residual stream, z = pattern @ v, and the block's output is
sum_h z[:, :, h] @ W_O[l, h] + b_O[l].
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


class ModelWeights:
    """Lazy, read-only view of a hooked model's weights (see module docstring for shapes)."""

    def __init__(self, model: Any, expand_kv: bool = True) -> None:
        self.model = model
        self.cfg = model.cfg
        self.expand_kv = expand_kv
        self.n_layers: int = model.cfg.n_layers
        self.n_heads: int = model.cfg.n_heads
        self.d_model: int = model.cfg.d_model
        self.d_head: int = model.cfg.d_head

    # --- helpers -------------------------------------------------------------------------
    def _stack(self, name: str) -> Tensor | None:
        try:
            return getattr(self.model, name).detach()
        except AttributeError:
            return None  # bias-free projections, attention-only blocks, no W_pos

    def _kv(self, w: Tensor) -> Tensor:
        # Grouped-query attention: query head h reads key/value head h // group.
        n_kv = w.shape[1]
        if not self.expand_kv or n_kv == self.n_heads:
            return w
        return w.repeat_interleave(self.n_heads // n_kv, dim=1)

    def _zeros(self, *shape: int) -> Tensor:
        ref = self.model.W_E
        return torch.zeros(*shape, dtype=ref.dtype, device=ref.device)

    def _norm(self, module: Any) -> tuple[Tensor, Tensor]:
        original = getattr(module, "original_component", None) or getattr(
            module, "_original_component", None
        )
        weight = getattr(original, "weight", None) if original is not None else None
        bias = getattr(original, "bias", None) if original is not None else None
        if weight is None:  # no normalisation (e.g. LayerNorm removed)
            w = torch.ones(self.d_model, dtype=self.model.W_E.dtype, device=self.model.W_E.device)
        else:
            w = weight.detach()
            if getattr(self.cfg, "rmsnorm_uses_offset", False):
                w = w + 1.0
        b = bias.detach() if bias is not None else torch.zeros_like(w)
        return w, b

    # --- attention -----------------------------------------------------------------------
    @cached_property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self.model.W_Q.detach()

    @cached_property
    def W_K(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._kv(self.model.W_K.detach())

    @cached_property
    def W_V(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._kv(self.model.W_V.detach())

    @cached_property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self.model.W_O.detach()

    @cached_property
    def b_Q(self) -> Float[Tensor, "layer head d_head"]:
        b = self._stack("b_Q")
        return b if b is not None else self._zeros(self.n_layers, self.n_heads, self.d_head)

    @cached_property
    def b_K(self) -> Float[Tensor, "layer head d_head"]:
        b = self._stack("b_K")
        return (
            self._kv(b) if b is not None else self._zeros(self.n_layers, self.n_heads, self.d_head)
        )

    @cached_property
    def b_V(self) -> Float[Tensor, "layer head d_head"]:
        b = self._stack("b_V")
        return (
            self._kv(b) if b is not None else self._zeros(self.n_layers, self.n_heads, self.d_head)
        )

    @cached_property
    def b_O(self) -> Float[Tensor, "layer d_model"]:
        b = self._stack("b_O")
        return b if b is not None else self._zeros(self.n_layers, self.d_model)

    # --- MLP (None for attention-only models) -------------------------------------------
    @cached_property
    def W_in(self) -> Float[Tensor, "layer d_model d_mlp"] | None:
        return None if self.cfg.attn_only else self._stack("W_in")

    @cached_property
    def W_gate(self) -> Float[Tensor, "layer d_model d_mlp"] | None:
        return (
            None
            if self.cfg.attn_only or not getattr(self.cfg, "gated_mlp", False)
            else self._stack("W_gate")
        )

    @cached_property
    def W_out(self) -> Float[Tensor, "layer d_mlp d_model"] | None:
        return None if self.cfg.attn_only else self._stack("W_out")

    @cached_property
    def b_in(self) -> Float[Tensor, "layer d_mlp"] | None:
        if self.W_in is None:
            return None
        b = self._stack("b_in")
        return b if b is not None else self._zeros(self.n_layers, self.W_in.shape[-1])

    @cached_property
    def b_out(self) -> Float[Tensor, "layer d_model"] | None:
        if self.W_out is None:
            return None
        b = self._stack("b_out")
        return b if b is not None else self._zeros(self.n_layers, self.d_model)

    # --- embeddings ----------------------------------------------------------------------
    @cached_property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.model.W_E.detach()

    @cached_property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"] | None:
        return self._stack("W_pos")

    @cached_property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.model.W_U.detach()

    @cached_property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        b = self._stack("b_U")
        return b if b is not None else self._zeros(self.W_U.shape[-1])

    # --- normalisation -------------------------------------------------------------------
    @cached_property
    def _ln(self) -> dict[str, Tensor]:
        ln1 = [self._norm(block.ln1) for block in self.model.blocks]
        ln2 = [
            self._norm(block.ln2) if hasattr(block, "ln2") else self._norm(None)
            for block in self.model.blocks
        ]
        return {
            "ln1_w": torch.stack([w for w, _ in ln1]),
            "ln1_b": torch.stack([b for _, b in ln1]),
            "ln2_w": torch.stack([w for w, _ in ln2]),
            "ln2_b": torch.stack([b for _, b in ln2]),
        }

    @property
    def ln1_w(self) -> Float[Tensor, "layer d_model"]:
        return self._ln["ln1_w"]

    @property
    def ln1_b(self) -> Float[Tensor, "layer d_model"]:
        return self._ln["ln1_b"]

    @property
    def ln2_w(self) -> Float[Tensor, "layer d_model"]:
        return self._ln["ln2_w"]

    @property
    def ln2_b(self) -> Float[Tensor, "layer d_model"]:
        return self._ln["ln2_b"]

    @cached_property
    def _ln_final(self) -> tuple[Tensor, Tensor]:
        return self._norm(getattr(self.model, "ln_final", None))

    @property
    def ln_final_w(self) -> Float[Tensor, " d_model"]:
        return self._ln_final[0]

    @property
    def ln_final_b(self) -> Float[Tensor, " d_model"]:
        return self._ln_final[1]

    # --- circuits ------------------------------------------------------------------------
    def OV(self, layer: int) -> Float[Tensor, "head d_model d_model"]:
        """Per-head OV matrices W_V @ W_O of one layer (dense; fine for organism sizes)."""
        return self.W_V[layer] @ self.W_O[layer]

    def QK(self, layer: int) -> Float[Tensor, "head d_model d_model"]:
        """Per-head QK matrices W_Q @ W_K^T of one layer (dense)."""
        return self.W_Q[layer] @ self.W_K[layer].transpose(-1, -2)


def weights(model: Any, expand_kv: bool = True) -> ModelWeights:
    """The weight accessor for `model`. Tensors are read on first use and then kept, so take
    a fresh accessor after the weights change (e.g. after training)."""
    return ModelWeights(model, expand_kv=expand_kv)
