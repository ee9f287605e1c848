"""Remove the LayerNorms of a trained organism by fine-tuning (Heimersheim 2024, "You can
remove GPT2's LayerNorm by fine-tuning", arXiv:2409.13710).

A norm divides each token's (centred, for LayerNorm) residual vector by its own scale
sigma(x) = sqrt(var(x) + eps) (RMSNorm: sqrt(mean(x^2) + eps)); that per-token division is
the only non-linearity a norm adds. Removing a norm replaces sigma(x) by one constant
sigma_bar, the mean of sigma(x) over the tokens of the batch at the moment of removal, so
the norm becomes a fixed linear map. Norms are removed one at a time, `gap` fine-tuning
steps apart, so the model can adapt to each change before the next: first the norm
before every MLP, then the norm before every attention layer, then the final norm.

A removed norm is stored in the ordinary HF module: weight w -> w * 2**24 / sigma_bar and
epsilon -> 2**48, so sqrt(var + 2**48) = 2**24 to float32 precision and the module computes
(x - mean(x)) * w / sigma_bar (see `training.architectures`). Its weight is frozen from
then on (it is a diagonal map the next layer can absorb; its bias stays trainable). The
output folder is an ordinary GPT2LMHeadModel / LlamaForCausalLM with
`interplab_layer_norm: false` that `AutoModelForCausalLM.from_pretrained` loads; the
community GPT-2 LN-free checkpoints use the same large-epsilon encoding (with 1e12 / 1e6).

Which norms are removed is a function of the step, so the schedule survives a kill: a run
resumed from a checkpoint re-applies the epsilon of the norms removed before it (their
weights are in the checkpoint) and carries on. Checkpoints taken mid-removal are for
resuming only: HF's config holds one epsilon for all norms.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from interplab.errors import InterplabError
from interplab.models.train_lm import TrainResult, fit_lm
from interplab.models.training.architectures import (
    NO_NORM_EPS,
    NO_NORM_WEIGHT,
    architecture_of,
    build_lm,
)
from interplab.models.training.checkpoints import load_model_weights
from interplab.models.training.config import LMConfig, TrainLMConfig
from interplab.models.training.loop import StepCallback

__all__ = ["RemoveLayerNormConfig", "remove_layernorm"]


@dataclass
class RemoveLayerNormConfig:
    """When each norm is removed during the fine-tuning run."""

    first_step: int = 0
    """0-based step before whose update the first norm is removed."""
    gap: int = 10
    """Fine-tuning steps between two removals (0 removes all norms at first_step)."""

    def __post_init__(self) -> None:
        for name in ("first_step", "gap"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InterplabError(
                    f"RemoveLayerNormConfig.{name} must be an integer >= 0, got {value!r}."
                )


class _NormRemoval:
    """The removal schedule, as a `StepSchedule` for the training loop."""

    def __init__(self, config: LMConfig, removal: RemoveLayerNormConfig) -> None:
        self.arch = architecture_of(config)
        self.attn_only = config.attn_only
        self.removal = removal

    def order(self, model: nn.Module) -> list[nn.Module]:
        """The norms in removal order; an attention-only model's MLP norms feed all-zero
        MLPs and are already frozen, so they are not part of the schedule."""
        blocks = self.arch.blocks(model)
        mlp_norms = [] if self.attn_only else [self.arch.pre_mlp_norm(b) for b in blocks]
        attn_norms = [self.arch.pre_attn_norm(b) for b in blocks]
        return [*mlp_norms, *attn_norms, self.arch.final_norm(model)]

    def step_of(self, index: int) -> int:
        return self.removal.first_step + index * self.removal.gap

    @torch.no_grad()
    def before_step(self, step: int, model: nn.Module, batch: Int[Tensor, "batch pos"]) -> None:
        due = [n for i, n in enumerate(self.order(model)) if self.step_of(i) == step]
        if not due:
            return
        sigma_bar = self.mean_scales(model, due, batch)
        for norm, sigma in zip(due, sigma_bar, strict=True):
            norm.weight.mul_(NO_NORM_WEIGHT / sigma)
            self.arch.set_norm_eps(norm, NO_NORM_EPS)
            norm.weight.requires_grad_(False)

    def restore(self, step: int, model: nn.Module) -> None:
        for i, norm in enumerate(self.order(model)):
            if self.step_of(i) < step:  # removed before the update of an earlier step
                self.arch.set_norm_eps(norm, NO_NORM_EPS)
                norm.weight.requires_grad_(False)

    def mean_scales(
        self, model: nn.Module, norms: list[nn.Module], batch: Int[Tensor, "batch pos"]
    ) -> list[float]:
        """Mean over the batch's tokens of each norm's per-token scale sigma(x)."""
        scales: dict[int, float] = {}

        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            scales[id(module)] = float(self.arch.norm_scale(module, args[0]).mean())

        handles = [n.register_forward_pre_hook(record) for n in norms]
        try:
            model(input_ids=batch, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return [scales[id(n)] for n in norms]

    def finalize(self, model: nn.Module) -> None:
        """Mark the model LayerNorm-free; MLP norms of an attention-only model (which have
        no effect) get the same constants, so every norm shares the config's epsilon."""
        if self.attn_only:
            for block in self.arch.blocks(model):
                norm = self.arch.pre_mlp_norm(block)
                with torch.no_grad():
                    norm.weight.fill_(NO_NORM_WEIGHT)
                self.arch.set_norm_eps(norm, NO_NORM_EPS)
        setattr(model.config, self.arch.eps_key, NO_NORM_EPS)
        model.config.interplab_layer_norm = False


def remove_layernorm(
    source: str | Path,
    train_config: TrainLMConfig,
    train_tokens: Any,
    eval_tokens: Any | None,
    out_dir: str | Path,
    removal: RemoveLayerNormConfig | None = None,
    tokenizer: Any | None = None,
    resume: bool = True,
    run: Any | None = None,
    card_extra: dict[str, Any] | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Fine-tune the organism in `source` (a folder written by `train_lm`) while removing
    its norms one by one, and save the LayerNorm-free model to `out_dir`.

    `train_config` is the fine-tuning run (its lr schedule, checkpoints and resume behave
    as in `train_lm`; `steps` must leave room after the last removal, and its `seed` only
    orders the batches: the weights start from `source`). The tokenizer is copied from
    `source` when it has one and `tokenizer` is None. card.json gets a `layernorm_removal`
    entry: the source, its held-out loss and the removal steps.
    """
    source = Path(source)
    removal = removal or RemoveLayerNormConfig()
    if not isinstance(removal, RemoveLayerNormConfig):
        raise InterplabError(
            f"removal must be a RemoveLayerNormConfig, got {type(removal).__name__}."
        )
    source_card = _read_card(source)
    try:
        source_config = LMConfig(**source_card["model_config"])
    except TypeError as error:
        raise InterplabError(
            f"{source}/card.json has an unreadable model_config: {error}"
        ) from None
    if not source_config.layer_norm:
        raise InterplabError(f"{source} has no LayerNorm to remove (layer_norm is false).")
    if card_extra is not None and "layernorm_removal" in card_extra:
        raise InterplabError("card_extra key 'layernorm_removal' is written by remove_layernorm.")
    schedule = _NormRemoval(source_config, removal)

    def init_model() -> nn.Module:
        model = build_lm(source_config, seed=0)  # the freezing pattern; weights replaced below
        load_model_weights(model, source)
        return model

    n_norms = _count_norms(source_config)
    last = removal.first_step + (n_norms - 1) * removal.gap
    if isinstance(train_config, TrainLMConfig) and last >= train_config.steps:
        raise InterplabError(
            f"the last of {n_norms} norms is removed before step {last}, but the fine-tuning "
            f"run has steps={train_config.steps}; expected steps > {last} (lower gap or "
            "first_step, or train longer)."
        )
    if tokenizer is None and (source / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    extra = {
        **(card_extra or {}),
        "layernorm_removal": {
            "method": "Heimersheim 2024 (arXiv:2409.13710): per-token scale -> batch mean, one norm at a time",
            "source": str(source),
            "source_final_eval_loss": source_card.get("final_eval_loss"),
            "removal_steps": [removal.first_step + i * removal.gap for i in range(n_norms)],
            **asdict(removal),
        },
    }
    return fit_lm(
        replace(source_config, layer_norm=False),
        train_config,
        train_tokens,
        eval_tokens,
        out_dir,
        init_model=init_model,
        schedule=schedule,
        finalize=schedule.finalize,
        tokenizer=tokenizer,
        resume=resume,
        run=run,
        card_extra=extra,
        on_step=on_step,
    )


def _count_norms(config: LMConfig) -> int:
    """Norms in the removal schedule: attention norms, MLP norms unless attn_only, final."""
    return config.n_layers * (1 if config.attn_only else 2) + 1


def _read_card(source: Path) -> dict[str, Any]:
    path = source / "card.json"
    if not path.is_file():
        raise InterplabError(
            f"{source} is not a model folder written by interplab's train_lm: no card.json."
        )
    card = json.loads(path.read_text())
    if "model_config" not in card:
        raise InterplabError(f"{path} has no model_config; expected a card written by train_lm.")
    return card
