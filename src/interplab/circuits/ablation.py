"""Ablations: replace a component's activation with zero, a reference mean, or a resample.

A target names where to ablate: one attention head (its `hook_z` slice, so the head's
whole output z @ W_O is removed and nothing else), one MLP neuron (`mlp.hook_post`), a whole
attention or MLP layer output, or any hook point with an optional index. `ablation_hooks`
returns `(hook_name, fn)` pairs for `model.hooks(fwd_hooks=...)` / `run_with_hooks`; `ablate`
runs the model with them.

Kinds:
  zero      the activation is set to 0.
  mean      set to its mean over a reference distribution (`reference` tokens), per position
            by default (Wang et al. 2022 mean-ablate over the task distribution).
  resample  each row gets the activation of a randomly drawn reference row (resample
            ablation, Chan et al. 2022 "causal scrubbing").
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.capture import capture
from interplab.circuits.metrics import model_device
from interplab.errors import InterplabError, unknown
from interplab.models.hooks import check_hook_names

AblationKind = Literal["zero", "mean", "resample"]
ABLATION_KINDS: tuple[str, ...] = get_args(AblationKind)
Index = tuple[int | slice, ...]


@dataclass(frozen=True)
class Head:
    """Attention head `head` of block `layer` (ablated through `attn.hook_z`)."""

    layer: int
    """Block index."""
    head: int
    """Query-head index within the block."""


@dataclass(frozen=True)
class Neuron:
    """MLP neuron `neuron` of block `layer` (ablated through `mlp.hook_post`)."""

    layer: int
    """Block index."""
    neuron: int
    """Index into the MLP hidden layer (d_mlp)."""


@dataclass(frozen=True)
class LayerOutput:
    """The whole attention or MLP output of block `layer`."""

    layer: int
    """Block index."""
    part: Literal["attn", "mlp"] = "attn"
    """'attn' (`hook_attn_out`) or 'mlp' (`hook_mlp_out`)."""

    def __post_init__(self) -> None:
        if self.part not in ("attn", "mlp"):
            raise unknown("layer part", str(self.part), ("attn", "mlp"), show_all=True)


@dataclass(frozen=True)
class HookSite:
    """Any hook point; `index` selects within the activation after the batch dim (e.g.
    `(slice(None), 3)` = every position of channel 3); empty = the whole activation."""

    hook_name: str
    """TransformerLens hook name, e.g. 'blocks.1.hook_resid_mid'."""
    index: Index = ()
    """Index into the non-batch dims."""


Target = Head | Neuron | LayerOutput | HookSite
_SHORT = re.compile(r"^L(\d+)(H|N)(\d+)$")


def parse_target(target: Target | str) -> Target:
    """A target object, or a short string: 'L3H2' (head), 'L1N40' (neuron), 'L2.attn' /
    'L2.mlp' (layer output), or a hook name (whole activation)."""
    if isinstance(target, Head | Neuron | LayerOutput | HookSite):
        return target
    if not isinstance(target, str):
        raise InterplabError(
            f"cannot ablate {target!r}; expected Head, Neuron, LayerOutput, HookSite or a string "
            "like 'L3H2', 'L1N40', 'L2.mlp' or a hook name."
        )
    match = _SHORT.match(target)
    if match:
        layer, kind, index = int(match.group(1)), match.group(2), int(match.group(3))
        return Head(layer, index) if kind == "H" else Neuron(layer, index)
    layer_match = re.match(r"^L(\d+)\.(attn|mlp)$", target)
    if layer_match:
        return LayerOutput(int(layer_match.group(1)), layer_match.group(2))  # type: ignore[arg-type]
    return HookSite(target)


def target_site(target: Target | str) -> tuple[str, Index]:
    """(hook name, index into the non-batch dims) of a target."""
    target = parse_target(target)
    if isinstance(target, Head):
        return f"blocks.{target.layer}.attn.hook_z", (slice(None), target.head)
    if isinstance(target, Neuron):
        return f"blocks.{target.layer}.mlp.hook_post", (slice(None), target.neuron)
    if isinstance(target, LayerOutput):
        return f"blocks.{target.layer}.hook_{target.part}_out", ()
    return target.hook_name, tuple(target.index)


def _is_pos_first(hook_name: str) -> bool:
    # Attention patterns/scores are [batch, head, query, key]; every other hook point is
    # [batch, pos, ...], which is what per-position references and resampling rely on.
    return not hook_name.endswith(("hook_pattern", "hook_attn_scores"))


def _check_index(hook_name: str, index: Index, shape: tuple[int, ...]) -> None:
    for dim, item in enumerate(index):
        if dim >= len(shape):
            raise InterplabError(
                f"index {index} has more dims than {hook_name!r} (non-batch shape {shape})."
            )
        if isinstance(item, int) and not -shape[dim] <= item < shape[dim]:
            raise InterplabError(
                f"index {item} is out of range for dim {dim} of {hook_name!r} (size {shape[dim]})."
            )


@dataclass
class _Replacement:
    """What one hook point's ablated entries are set to."""

    hook_name: str
    indices: list[Index]
    kind: AblationKind
    reference: Tensor | None  # mean [*dims] or reference rows [n_ref, *dims]
    generator: torch.Generator | None

    def __call__(self, act: Tensor, hook: Any = None) -> Tensor:
        out = act.clone()
        # one draw per forward pass, shared by every target at this hook point
        values = None if self.kind == "zero" else self._values(act)
        for index in self.indices:
            _check_index(self.hook_name, index, tuple(act.shape[1:]))
            sel = (slice(None), *index)
            out[sel] = 0 if values is None else values[sel]
        return out

    def _values(self, act: Tensor) -> Tensor:
        assert self.reference is not None
        ref = self.reference.to(act.device, act.dtype)
        if self.kind == "mean":
            ref = ref[None]
        else:
            rows = torch.randint(
                0, ref.shape[0], (act.shape[0],), generator=self.generator, device="cpu"
            )
            ref = ref[rows.to(ref.device)]
        return _fit(ref, act, self.hook_name)


def _fit(ref: Tensor, act: Tensor, hook_name: str) -> Tensor:
    """Broadcast reference values [1 or batch, *dims] to the activation's shape, cutting a
    longer reference sequence to the activation's length where positions come first."""
    if _is_pos_first(hook_name) and ref.ndim == act.ndim and ref.shape[1] >= act.shape[1]:
        ref = ref[:, : act.shape[1]]
    try:
        return ref.expand_as(act)
    except RuntimeError as error:
        raise InterplabError(
            f"reference activation for {hook_name!r} has shape {tuple(ref.shape[1:])}, which "
            f"does not fit the activation {tuple(act.shape[1:])}; use reference prompts at least "
            "as long as the ablated ones."
        ) from error


def ablation_hooks(
    model: Any,
    targets: Sequence[Target | str] | Target | str,
    kind: AblationKind = "zero",
    reference: Int[Tensor, "n_ref pos"] | None = None,
    *,
    per_position: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> list[tuple[str, Callable[[Tensor, Any], Tensor]]]:
    """Forward hooks that ablate `targets`, one per hook point touched.

    Args:
        model: a hooked model (TransformerBridge).
        targets: heads, neurons, layer outputs, hook sites, or short strings ('L3H2').
        kind: 'zero', 'mean' or 'resample'.
        reference: reference prompts [n_ref, pos] for 'mean' / 'resample'.
        per_position: 'mean' only: average over reference examples separately at each
            position (True), or over examples and positions together (False).
        seed: seeds the rows drawn by 'resample'.
        device: where reference activations are computed; None = the model's device.

    Returns:
        `[(hook_name, fn), ...]` for `model.hooks(fwd_hooks=...)` or `run_with_hooks`.
    """
    if kind not in ABLATION_KINDS:
        raise unknown("ablation kind", str(kind), ABLATION_KINDS, show_all=True)
    if isinstance(targets, str | Head | Neuron | LayerOutput | HookSite):
        targets = [targets]
    if not targets:
        raise InterplabError("no ablation targets given; expected e.g. [Head(0, 1)] or ['L0H1'].")
    sites: dict[str, list[Index]] = defaultdict(list)
    for target in targets:
        name, index = target_site(target)
        sites[name].append(index)
    _check_targets_in_range(model, targets)
    check_hook_names(model, list(sites))

    means: dict[str, Tensor | None] = dict.fromkeys(sites)
    if kind != "zero":
        if reference is None:
            raise InterplabError(
                f"{kind} ablation needs reference= prompts [n_ref, pos] to take activations from."
            )
        if reference.ndim != 2 or reference.shape[0] == 0:
            raise InterplabError(
                f"reference must be a non-empty [n_ref, pos] token tensor, got shape "
                f"{tuple(reference.shape)}."
            )
        _, acts = capture(model, reference.to(model_device(model, device)), list(sites))
        for name, act in acts.items():
            if kind == "resample":
                means[name] = act
            elif per_position:
                means[name] = act.mean(0)
            elif _is_pos_first(name):
                means[name] = act.mean((0, 1), keepdim=True)[0]
            else:
                raise InterplabError(
                    f"per_position=False averages over positions, but {name!r} is an attention "
                    "pattern [head, query, key] without a single position axis; use per_position=True."
                )
    generator = torch.Generator().manual_seed(seed)
    return [
        (name, _Replacement(name, indices, kind, means[name], generator))
        for name, indices in sites.items()
    ]


def _check_targets_in_range(model: Any, targets: Sequence[Target | str]) -> None:
    cfg = model.cfg
    for target in map(parse_target, targets):
        if isinstance(target, Head | Neuron | LayerOutput) and not 0 <= target.layer < cfg.n_layers:
            raise InterplabError(
                f"{target} has layer {target.layer}; this model has layers 0..{cfg.n_layers - 1}."
            )
        if isinstance(target, Head) and not 0 <= target.head < cfg.n_heads:
            raise InterplabError(
                f"{target} has head {target.head}; this model has heads 0..{cfg.n_heads - 1}."
            )
        if isinstance(target, Neuron) and not 0 <= target.neuron < (cfg.d_mlp or 0):
            raise InterplabError(
                f"{target} has neuron {target.neuron}; this model's MLPs have d_mlp={cfg.d_mlp}."
            )


def ablate(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    targets: Sequence[Target | str] | Target | str,
    kind: AblationKind = "zero",
    reference: Int[Tensor, "n_ref pos"] | None = None,
    *,
    per_position: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Float[Tensor, "batch pos vocab"]:
    """Logits of `tokens` with `targets` ablated (see `ablation_hooks` for the arguments)."""
    device = model_device(model, device)
    hooks = ablation_hooks(
        model, targets, kind, reference, per_position=per_position, seed=seed, device=device
    )
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        return model(tokens.to(device))
