"""Toy configurations: small TransformerLens-native models of any shape, built offline.

A `ToyConfig` becomes a `TransformerBridgeConfig` and is booted with
`TransformerBridge.boot_native`, so toy models expose the same hook names as HF models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from interplab.errors import InterplabError


@dataclass
class ToyConfig:
    """A small native transformer (no HuggingFace weights needed)."""

    n_layers: int = 2
    """Number of transformer blocks."""
    d_model: int = 64
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads per layer."""
    d_head: int | None = None
    """Width of each head; None = d_model // n_heads."""
    d_mlp: int | None = None
    """MLP hidden width; None = 4 * d_model. Ignored when attn_only."""
    d_vocab: int = 128
    """Vocabulary size."""
    n_ctx: int = 128
    """Maximum context length."""
    attn_only: bool = False
    """Blocks without MLPs."""
    normalization: Literal["LN", "RMS", "none"] = "LN"
    """LayerNorm, RMSNorm, or no normalisation at all."""
    act_fn: Literal["relu", "gelu", "gelu_new", "silu"] = "gelu"
    """MLP activation function."""
    positional: Literal["standard", "rotary"] = "standard"
    """Learned absolute positions, or rotary embeddings."""
    seed: int = 0
    """Seed of the random initialisation."""

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_vocab", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InterplabError(f"ToyConfig.{name} must be a positive integer, got {value!r}.")
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise InterplabError(
                    f"ToyConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set d_head explicitly."
                )
            self.d_head = self.d_model // self.n_heads
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model

    def to_bridge_config(self) -> Any:
        """The equivalent `transformer_lens.config.TransformerBridgeConfig`."""
        from transformer_lens.config import TransformerBridgeConfig

        return TransformerBridgeConfig(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_head,
            d_mlp=self.d_mlp,
            d_vocab=self.d_vocab,
            n_ctx=self.n_ctx,
            attn_only=self.attn_only,
            normalization_type=None if self.normalization == "none" else self.normalization,
            act_fn=self.act_fn,
            positional_embedding_type=self.positional,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
