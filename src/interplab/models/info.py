"""`model_info(model)`: architecture, sizes and hook names, for `interplab info`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from interplab.models.hooks import hook_names


@dataclass
class ModelInfo:
    """A summary of a hooked model."""

    name: str
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int | None
    d_vocab: int
    n_ctx: int
    normalization: str
    positional: str
    n_params: int
    hook_names: list[str] = field(default_factory=list)

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [
            ("name", self.name),
            ("architecture", self.architecture),
            ("layers", str(self.n_layers)),
            ("d_model", str(self.d_model)),
            ("heads", f"{self.n_heads} (kv {self.n_kv_heads}), d_head {self.d_head}"),
            ("d_mlp", "none (attention only)" if self.d_mlp is None else str(self.d_mlp)),
            ("vocab", str(self.d_vocab)),
            ("context", str(self.n_ctx)),
            ("normalization", self.normalization),
            ("positions", self.positional),
            ("parameters", f"{self.n_params:,}"),
            ("hook points", str(len(self.hook_names))),
        ]
        return rows


def canonical_hook_names(names: list[str]) -> list[str]:
    """The TransformerLens-standard hook names (drops the bridge's `*.hook_in/hook_out` aliases
    of submodules, which duplicate the canonical ones)."""
    return [
        n for n in names if not n.endswith((".hook_in", ".hook_out")) and n not in ("hook_unembed",)
    ]


def model_info(model: Any, name: str | None = None) -> ModelInfo:
    """Summarise `model` (a TransformerBridge)."""
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    norm = getattr(cfg, "normalization_type", None) or "none"
    return ModelInfo(
        name=name or getattr(cfg, "model_name", None) or "model",
        architecture=str(getattr(cfg, "architecture", None) or "TransformerLensNative"),
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=n_kv,
        d_head=cfg.d_head,
        d_mlp=None if cfg.attn_only else cfg.d_mlp,
        d_vocab=cfg.d_vocab,
        n_ctx=cfg.n_ctx,
        normalization=str(norm),
        positional=str(getattr(cfg, "positional_embedding_type", "standard")),
        n_params=sum(p.numel() for p in model.parameters()),
        hook_names=canonical_hook_names(hook_names(model)),
    )
