"""Attribution patching: every activation-patching effect estimated from two forward passes
and one backward pass (AtP), and its corrected form AtP*.

AtP (Nanda 2023, "Attribution patching"; Syed et al. 2023): patching site n from the base
run to the source run changes the metric M by approximately

    c_AtP(n) = (a_source(n) - a_base(n)) . dM/da(n)  at the base run

(the first-order Taylor term), for every site at once: a forward pass on the source prompts
(activations only), one on the base prompts that keeps the graph, and one backward pass of
sum_batch M (examples are independent, so each row's gradient is that example's own). A site
is a cell of the same grid `patch` uses (`component`, `over`), and the estimate is summed
over the dims the site covers. In the 'denoise' direction base = corrupted and source =
clean, in 'noise' the reverse, as in `patching.py`.

AtP* (Kramár et al. 2024) fixes AtP's two sources of false negatives:
  * QK fix (attention saturation): for query and key sites the change of the attention
    pattern is computed exactly instead of linearised through the softmax:
        c(n) = sum_{t,s} dM/dA[t,s] * (A_patched[t,s] - A_base[t,s])
    A_patched is the pattern with the site's queries (or keys) from the source run and
    everything else from the base run. The model computes it itself: one extra forward pass
    with `attn.hook_q` / `attn.hook_k` overwritten in every layer (so each layer's pattern
    sees exactly base/source queries and keys), reading `attn.hook_pattern`; keys patched
    one position at a time take one copy of the prompts per key position whose keys differ.
    Head outputs (`z`) need no fix: their source value already includes their own
    pattern's exact change.
  * GradDrop (cancellation between direct and indirect effects): for each layer l, the
    gradient is recomputed with the backward pass through layer l's residual-stream writes
    (`hook_attn_out`, `hook_mlp_out`) set to zero, giving estimates c_l(n); then
        magnitude(n) = 1/(L - 1) * sum_l |c_l(n)|
    (one backward pass per layer on the kept graph). A site whose paths cancel in c(n)
    survives in the magnitude. GradDrop yields a magnitude, not a signed effect, so
    `values` stay the (QK-fixed) signed estimate and `magnitude` ranks sites.

The result is an `AttributionResult`, a `PatchingResult` whose per-example values are
`M(base) + c(n)`, so it normalises, plots and compares exactly like activation patching;
`compare_to_patching` scores it against an exact sweep (correlation, top-k false negatives).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.metrics import Estimate, TaskMetric, check_task, model_device
from interplab.circuits.patching import (
    DIRECTIONS,
    Axis,
    Component,
    Direction,
    Metric,
    PatchingResult,
    _aggregate,
    _pad_positions,
    _Scorer,
    bind_metric,
    check_grid,
    layer_hooks,
    prepare_tokens,
)
from interplab.errors import InterplabError, unknown
from interplab.models.hooks import check_hook_names

AttributionMethod = Literal["atp", "atp*"]
ATTRIBUTION_METHODS: tuple[str, ...] = get_args(AttributionMethod)


# ------------------------------------------------------------------ results
@dataclass
class AttributionResult(PatchingResult):
    """Attribution-patching estimates on the grid activation patching uses: `values`,
    `std`, `sem` and `per_example` (= base metric + estimated change) mean what they mean in
    `PatchingResult`, so the two can be compared and plotted side by side."""

    method: AttributionMethod
    """'atp' or 'atp*'."""
    magnitude: Float[Tensor, "layer ..."]
    """Estimated |change of the mean metric| per site, in raw metric units: |mean estimate|,
    or with GradDrop 1/(L-1) * sum_l |mean estimate with layer l's gradient dropped|. Ranks
    the sites in `top` and `compare_to_patching`."""
    qk_fix: bool
    """Whether query/key sites used the exact attention pattern (AtP*)."""
    grad_drop: bool
    """Whether `magnitude` is the GradDrop aggregate (AtP*)."""

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The `k` sites with the largest `magnitude`, as (label, value)."""
        order = self.magnitude.flatten().argsort(descending=True)[:k]
        labels = site_labels(self)
        flat = self.values.flatten()
        return [(labels[i], float(flat[i])) for i in order.tolist()]

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """Heatmap of `values` (see `PatchingResult.plot`)."""
        default = f"{self.method} ({self.direction}) of {self.component}: {self.metric}"
        return super().plot(ax=ax, title=title or default)


@dataclass
class AttributionComparison:
    """How well attribution estimates match exact activation patching over the same sites."""

    pearson: float
    """Pearson correlation of estimated and exact effects (signed, over sites)."""
    spearman: float
    """Rank correlation of the estimated magnitude and the exact |effect|."""
    k: int
    """Size of the top sets compared."""
    false_negative_rate: float
    """Fraction of the exact top-k sites (by |effect|) missing from the estimate's top-k
    (by magnitude)."""
    missed: list[str]
    """Labels of those missing sites."""
    estimated: Float[Tensor, " site"] = field(repr=False)
    """Estimated change of the mean metric per site (raw units)."""
    exact: Float[Tensor, " site"] = field(repr=False)
    """Exact change of the mean metric per site (raw units)."""
    labels: list[str] = field(repr=False)
    """Site labels."""

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """Scatter of estimated against exact effects, with the identity line."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(4, 4))
        else:
            fig = ax.figure
        x, y = self.exact.numpy(), self.estimated.numpy()
        ax.scatter(x, y, s=12)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
        ax.set_xlabel("exact patching effect")
        ax.set_ylabel("attribution estimate")
        ax.set_title(
            title or f"r = {self.pearson:.3f}, top-{self.k} FNR = {self.false_negative_rate:.2f}"
        )
        return fig


def site_labels(result: PatchingResult) -> list[str]:
    """A label per site of `result`, in the order of `result.values.flatten()`."""
    labels = [""]
    for axis in result.axes:
        labels = [
            f"{prefix} {axis}={tick}".strip() for prefix in labels for tick in result.labels[axis]
        ]
    return labels


def compare_to_patching(
    attribution: AttributionResult, exact: PatchingResult, k: int = 10
) -> AttributionComparison:
    """Score attribution estimates against exact activation patching of the same sites.

    Effects are changes of the mean metric from the base run (raw units, so normalisation
    does not matter). Returns the Pearson correlation of signed effects, the Spearman
    correlation of `attribution.magnitude` with |exact effect|, and the false-negative rate
    of the top `k`: the share of the k sites with the largest exact |effect| that are not
    among the k largest estimated magnitudes (Kramár et al. 2024 measure AtP this way).
    """
    from scipy import stats

    if not isinstance(attribution, AttributionResult) or not isinstance(exact, PatchingResult):
        raise InterplabError(
            "compare_to_patching takes an AttributionResult (interplab.circuits.attribute) and "
            f"a PatchingResult (interplab.circuits.patch); got {type(attribution).__name__} and "
            f"{type(exact).__name__}."
        )
    if attribution.shape != exact.shape or attribution.axes != exact.axes:
        raise InterplabError(
            f"the attribution has sites {attribution.axes} {attribution.shape} but the exact "
            f"sweep has {exact.axes} {exact.shape}; compare the same component and grid."
        )
    if attribution.direction != exact.direction:
        raise InterplabError(
            f"the attribution is {attribution.direction!r} but the exact sweep is "
            f"{exact.direction!r}; both must patch in the same direction."
        )
    n_sites = attribution.values.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_sites:
        raise InterplabError(f"k must be an int in 1..{n_sites} (the number of sites), got {k!r}.")
    estimated = _effects(attribution)
    exact_effects = _effects(exact)
    labels = site_labels(exact)
    magnitude = attribution.magnitude.flatten().double()
    true_top = set(exact_effects.abs().argsort(descending=True)[:k].tolist())
    found = set(magnitude.argsort(descending=True)[:k].tolist())
    missed = sorted(true_top - found, key=lambda i: -float(exact_effects[i].abs()))
    pearson = (
        float(stats.pearsonr(estimated.numpy(), exact_effects.numpy())[0])
        if n_sites > 1
        else math.nan
    )
    spearman = (
        float(stats.spearmanr(magnitude.numpy(), exact_effects.abs().numpy())[0])
        if n_sites > 1
        else math.nan
    )
    return AttributionComparison(
        pearson=pearson,
        spearman=spearman,
        k=k,
        false_negative_rate=len(missed) / k,
        missed=[labels[i] for i in missed],
        estimated=estimated.float(),
        exact=exact_effects.float(),
        labels=labels,
    )


def _effects(result: PatchingResult) -> Tensor:
    base = result.corrupted if result.direction == "denoise" else result.clean
    return (result.per_example.double().mean(-1) - base.mean).flatten()


# ------------------------------------------------------------------ public API
def attribute(
    model: Any,
    task: Any,
    component: Component = "z",
    over: Sequence[Axis] = ("head",),
    *,
    method: AttributionMethod = "atp",
    metric: Metric = "logit_diff",
    direction: Direction = "denoise",
    normalize: bool = True,
    layers: Sequence[int] | None = None,
    qk_fix: bool | None = None,
    grad_drop: bool | None = None,
    max_batch: int = 256,
    device: str | torch.device | None = None,
) -> AttributionResult:
    """Attribution patching (AtP, or AtP* with `method='atp*'`) on a `TaskDataset`: the
    estimated effect of patching every site of `component` over `over` (see `patch` for the
    components and grids).

    Args:
        model: a hooked model (TransformerBridge) in eval mode.
        task: a `TaskDataset` (clean/corrupted tokens, answers, answer positions).
        component: 'z' (head outputs), 'q' | 'k' | 'v', 'result', 'pattern', 'attn_out',
            'mlp_out', 'resid_pre' | 'resid_mid' | 'resid_post', 'mlp_pre' | 'mlp_post'.
        over: the site grid, e.g. ('head',), ('head', 'pos'), ('pos',), ('neuron',).
        method: 'atp' (first-order) or 'atp*' (QK fix and GradDrop; Kramár et al. 2024).
        metric: 'logit_diff' | 'prob' | 'logprob' | 'kl', a `TaskMetric`, or a callable
            `logits [batch, pos, vocab] -> [batch]`; it must be differentiable (not
            'accuracy'). 'kl' has zero gradient at the clean run, so use it with 'denoise'.
        direction: 'denoise' (base = corrupted, sites set to clean) or 'noise'.
        normalize: report values on the 0 = corrupted, 1 = clean scale.
        layers: which blocks' sites (default all).
        qk_fix: AtP* only; None = on for 'atp*'. Applies to 'q' and 'k' sites.
        grad_drop: AtP* only; None = on for 'atp*' when the model has 2 or more layers.
        max_batch: most rows per forward pass of the QK fix's per-key-position copies.
        device: where to run; None = the model's device.

    Returns:
        `AttributionResult` with `values` of shape [layer, *over sizes], per-example
        estimated metric values, and the ranking `magnitude`.
    """
    check_task(task)
    device = model_device(model, device)
    task = task.to(device)
    return attribute_tokens(
        model,
        task.clean_tokens,
        task.corrupted_tokens,
        bind_metric(model, task, metric),
        component,
        over,
        method=method,
        direction=direction,
        normalize=normalize,
        layers=layers,
        qk_fix=qk_fix,
        grad_drop=grad_drop,
        max_batch=max_batch,
        device=device,
    )


def attribute_tokens(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: TaskMetric | Callable[[Tensor], Tensor],
    component: Component = "z",
    over: Sequence[Axis] = ("head",),
    *,
    method: AttributionMethod = "atp",
    direction: Direction = "denoise",
    normalize: bool = True,
    layers: Sequence[int] | None = None,
    qk_fix: bool | None = None,
    grad_drop: bool | None = None,
    max_batch: int = 256,
    device: str | torch.device | None = None,
) -> AttributionResult:
    """`attribute` on explicit token pairs with a metric object or callable."""
    layout, over = check_grid(component, over, "attribution")
    if method not in ATTRIBUTION_METHODS:
        raise unknown("attribution method", str(method), ATTRIBUTION_METHODS, show_all=True)
    if direction not in DIRECTIONS:
        raise unknown("patching direction", str(direction), DIRECTIONS, show_all=True)
    if method == "atp" and (qk_fix or grad_drop):
        raise InterplabError(
            "qk_fix and grad_drop are the parts of AtP*; pass method='atp*' to use them."
        )
    n_layers = model.cfg.n_layers
    qk_fix = method == "atp*" if qk_fix is None else bool(qk_fix)
    grad_drop = method == "atp*" and n_layers > 1 if grad_drop is None else bool(grad_drop)
    if grad_drop and n_layers < 2:
        raise InterplabError(
            f"grad_drop needs at least 2 layers (it averages over the other L - 1 layers); "
            f"this model has {n_layers}. Pass grad_drop=False."
        )
    if isinstance(metric, TaskMetric) and metric.kind == "accuracy":
        raise InterplabError(
            "attribution patching needs a differentiable metric; 'accuracy' is piecewise "
            "constant. Use 'logit_diff', 'logprob', 'prob' or 'kl'."
        )
    layers, names = layer_hooks(model, component, layers, max_batch)
    qk = qk_fix and component in ("q", "k")

    device = model_device(model, device)
    clean_tokens, corrupted_tokens, metric, full_width = prepare_tokens(
        clean_tokens, corrupted_tokens, metric, device
    )
    batch = clean_tokens.shape[0]
    scorer = _Scorer(model, metric, batch)
    if direction == "denoise":
        base_tokens, source_tokens = corrupted_tokens, clean_tokens
    else:
        base_tokens, source_tokens = clean_tokens, corrupted_tokens
    qk_names = [f"blocks.{i}.attn.hook_{x}" for i in layers for x in ("q", "k")] if qk else []
    pattern_names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers] if qk else []
    if qk:
        check_hook_names(model, qk_names + pattern_names)

    with torch.inference_mode():
        source_acts, source_values = _run(model, source_tokens, names + qk_names, scorer)
    grads_on = pattern_names if qk else names
    drops = list(range(n_layers)) if grad_drop else []
    base_acts, base_values, grads = _forward_backward(
        model,
        base_tokens,
        list(dict.fromkeys(names + qk_names + pattern_names)),
        grads_on,
        scorer,
        drops,
    )
    if qk:
        with torch.inference_mode():
            deltas = _pattern_changes(
                model,
                component,
                "pos" in over,
                layers,
                base_tokens,
                base_acts,
                source_acts,
                max_batch,
            )
    estimates = []  # per gradient set: [layer, *over, batch]
    for grad in grads:
        per_layer = []
        for layer, name in zip(layers, names, strict=True):
            if qk:
                pattern = f"blocks.{layer}.attn.hook_pattern"
                site = _qk_site(component, deltas[layer], grad[pattern], model)
            else:
                site = (source_acts[name] - base_acts[name]) * grad[name]
            per_layer.append(_reduce(site, layout, over))
        estimates.append(torch.stack(per_layer))
    signed = estimates[0]
    if grad_drop:
        dropped = torch.stack([e.double().mean(-1).abs() for e in estimates[1:]])
        magnitude = dropped.sum(0) / (n_layers - 1)
    else:
        magnitude = signed.double().mean(-1).abs()
    per_example = base_values.to(signed) + signed
    if "pos" in over and clean_tokens.shape[1] < full_width:
        dim = over.index("pos")
        per_example = _pad_positions(per_example, dim + 1, full_width, base_values)
        magnitude = _pad_positions(magnitude[..., None], dim + 1, full_width, torch.zeros(1))[
            ..., 0
        ]

    clean_values = source_values if direction == "denoise" else base_values
    corrupted_values = base_values if direction == "denoise" else source_values
    clean, corrupted = Estimate.of(clean_values), Estimate.of(corrupted_values)
    values, std, sem = _aggregate(per_example)
    if normalize:
        span = clean.mean - corrupted.mean
        clean.normalized(clean.mean, corrupted.mean)  # raises when the span is 0
        values = (values - corrupted.mean) / span
        std, sem = std / abs(span), sem / abs(span)
    labels = {"layer": [str(x) for x in layers]}
    for axis, size in zip(over, per_example.shape[1:-1], strict=True):
        labels[axis] = [str(i) for i in range(size)]
    name = metric.name if isinstance(metric, TaskMetric) else getattr(metric, "__name__", "metric")
    return AttributionResult(
        values=values.float(),
        std=std.float(),
        sem=sem.float(),
        per_example=per_example.detach().cpu(),
        axes=("layer", *over),
        labels=labels,
        metric=name,
        component=component,
        direction=direction,  # type: ignore[arg-type]
        normalized=normalize,
        clean=clean,
        corrupted=corrupted,
        method=method,  # type: ignore[arg-type]
        magnitude=magnitude.float().cpu(),
        qk_fix=qk,
        grad_drop=grad_drop,
    )


# ------------------------------------------------------------------ named sweeps
def attribute_heads(
    model: Any,
    task: Any,
    component: Literal["z", "q", "k", "v", "result", "pattern"] = "z",
    *,
    by_pos: bool = False,
    **kwargs: Any,
) -> AttributionResult:
    """Attention heads: values [layer, head], or [layer, head, pos] with `by_pos`."""
    return attribute(model, task, component, ("head", "pos") if by_pos else ("head",), **kwargs)


def attribute_residual(
    model: Any,
    task: Any,
    hook: Literal["resid_pre", "resid_mid", "resid_post"] = "resid_pre",
    **kwargs: Any,
) -> AttributionResult:
    """Residual stream by layer and position: values [layer, pos]."""
    if hook not in ("resid_pre", "resid_mid", "resid_post"):
        raise unknown(
            "residual hook", str(hook), ("resid_pre", "resid_mid", "resid_post"), show_all=True
        )
    return attribute(model, task, hook, ("pos",), **kwargs)


def attribute_mlp(model: Any, task: Any, **kwargs: Any) -> AttributionResult:
    """MLP outputs by layer and position: values [layer, pos]."""
    return attribute(model, task, "mlp_out", ("pos",), **kwargs)


def attribute_neurons(
    model: Any, task: Any, *, by_pos: bool = False, **kwargs: Any
) -> AttributionResult:
    """MLP neurons (`mlp.hook_post`): values [layer, neuron], or [layer, neuron, pos]."""
    return attribute(
        model, task, "mlp_post", ("neuron", "pos") if by_pos else ("neuron",), **kwargs
    )


# ------------------------------------------------------------------ internals
def _reduce(site: Tensor, layout: tuple[str, ...], over: tuple[str, ...]) -> Tensor:
    """[batch, *layout dims] -> [*over, batch]: sum over the dims a site covers."""
    summed = [d + 1 for d, axis in enumerate(layout) if axis not in over]
    kept = [axis for axis in layout if axis in over]
    x = site.sum(dim=summed) if summed else site
    order = [kept.index(axis) + 1 for axis in over]
    return x.permute(*order, 0)


def _run(
    model: Any, tokens: Tensor, names: list[str], scorer: _Scorer
) -> tuple[dict[str, Tensor], Tensor]:
    acts: dict[str, Tensor] = {}

    def saver(name: str) -> Callable:
        def keep(act: Tensor, hook: Any) -> None:
            acts[name] = act.detach().clone()

        return keep

    with model.hooks(fwd_hooks=[(n, saver(n)) for n in dict.fromkeys(names)] + scorer.hooks(1)):
        logits = model(tokens)
    return acts, scorer.values(logits, 1)[0]


class _DropState:
    """Which layer's residual-stream writes the backward pass currently drops (None = none)."""

    dropped: int | None = None


class _GradGate(torch.autograd.Function):
    """Identity forward; backward passes the gradient unless its layer is being dropped."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, state: _DropState, layer: int) -> Tensor:
        ctx.state, ctx.layer = state, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        if ctx.state.dropped == ctx.layer:
            return torch.zeros_like(grad), None, None
        return grad, None, None


def _forward_backward(
    model: Any,
    tokens: Tensor,
    names: list[str],
    grad_names: list[str],
    scorer: _Scorer,
    drops: list[int],
) -> tuple[dict[str, Tensor], Tensor, list[dict[str, Tensor]]]:
    """Activations at `names` and metric values of one base run, then the gradient of
    sum_batch M at `grad_names`: first the full one, then one per layer in `drops` with that
    layer's residual-stream writes dropped from the backward pass (GradDrop)."""
    acts: dict[str, Tensor] = {}
    state = _DropState()

    def keeper(name: str) -> Callable:
        def keep(act: Tensor, hook: Any) -> Tensor:
            if not act.requires_grad:  # frozen weights: nothing upstream needs a gradient
                act = act.detach().requires_grad_()
            acts[name] = act
            return act  # returned, so the kept tensor is the one the model computes on

        return keep

    def gate(layer: int) -> Callable:
        def hook(act: Tensor, hook: Any) -> Tensor:
            return _GradGate.apply(act, state, layer)

        return hook

    hooks = [(name, keeper(name)) for name in names]
    for layer in sorted(set(drops)):
        for part in ("attn", "mlp"):
            name = f"blocks.{layer}.hook_{part}_out"
            if name in model.hook_dict:
                hooks.append((name, gate(layer)))
    with torch.inference_mode(False), torch.enable_grad():
        with model.hooks(fwd_hooks=hooks + scorer.hooks(1)):
            logits = model(tokens)
        values = scorer.values(logits, 1)[0]
        total = values.sum()
        inputs = [acts[name] for name in grad_names]
        grads = []
        for i, dropped in enumerate([None, *drops]):
            state.dropped = dropped
            found = torch.autograd.grad(
                total, inputs, retain_graph=i < len(drops), allow_unused=True
            )
            if dropped is None:
                missing = [name for name, g in zip(grad_names, found, strict=True) if g is None]
                if missing:
                    raise InterplabError(
                        f"the metric does not depend on the tensor at hook {missing[0]!r} in this "
                        "model (the hook point only reports a copy), so it has no gradient "
                        "there; attribute a different component."
                    )
            grads.append(
                {
                    name: torch.zeros_like(act) if g is None else g.detach()
                    for name, act, g in zip(grad_names, inputs, found, strict=True)
                }
            )
    return {k: v.detach() for k, v in acts.items()}, values.detach(), grads


# ------------------------------------------------------------------ QK fix
def _pattern_changes(
    model: Any,
    component: str,
    by_pos: bool,
    layers: list[int],
    base_tokens: Tensor,
    base_acts: dict[str, Tensor],
    source_acts: dict[str, Tensor],
    max_batch: int,
) -> dict[int, Tensor]:
    """Exact change of each layer's attention pattern when its queries ('q') or keys ('k')
    come from the source run: [batch, head, q_pos, k_pos] for queries and for keys patched
    at all positions at once; [key_pos, batch, head, q_pos, k_pos] for keys patched one
    position at a time (`by_pos`; zero for positions whose keys never differ)."""
    batch, width = base_tokens.shape
    stop = max(layers) + 1
    kwargs = {"stop_at_layer": stop} if stop < model.cfg.n_layers else {}
    base = {layer: base_acts[f"blocks.{layer}.attn.hook_pattern"] for layer in layers}

    def mixed(copies: int, queries: Callable, keys: Callable) -> dict[int, Tensor]:
        """Patterns of `copies` stacked base runs whose every layer's q and k are overwritten
        (so no layer sees a change from an earlier one)."""
        patterns: dict[int, Tensor] = {}
        hooks = []
        for layer in layers:
            hooks.append((f"blocks.{layer}.attn.hook_q", _constant(queries(layer))))
            hooks.append((f"blocks.{layer}.attn.hook_k", _constant(keys(layer))))
            hooks.append((f"blocks.{layer}.attn.hook_pattern", _keeper(patterns, layer)))
        with model.hooks(fwd_hooks=hooks):
            model(base_tokens.repeat(copies, 1), **kwargs)
        return patterns

    def of(acts: dict[str, Tensor], kind: str, copies: int = 1) -> Callable:
        return lambda layer: acts[f"blocks.{layer}.attn.hook_{kind}"].repeat(copies, 1, 1, 1)

    if component == "q":
        after = mixed(1, of(source_acts, "q"), of(base_acts, "k"))
        return {layer: after[layer] - base[layer] for layer in layers}
    if not by_pos:
        after = mixed(1, of(base_acts, "q"), of(source_acts, "k"))
        return {layer: after[layer] - base[layer] for layer in layers}
    differs = torch.zeros(width, dtype=torch.bool, device=base_tokens.device)
    for layer in layers:
        name = f"blocks.{layer}.attn.hook_k"
        differs |= (source_acts[name] != base_acts[name]).flatten(2).any(-1).any(0)
    positions = differs.nonzero()[:, 0]
    out = {layer: base[layer].new_zeros(width, *base[layer].shape) for layer in layers}
    step = max(1, max_batch // batch)
    for begin in range(0, len(positions), step):
        chosen = positions[begin : begin + step]
        copies = len(chosen)
        # copy c takes the source keys at position chosen[c] only, in every key/value head
        one_hot = torch.zeros(copies, 1, width, 1, 1, dtype=torch.bool, device=chosen.device)
        one_hot[torch.arange(copies), 0, chosen] = True

        def keys(layer: int, one_hot: Tensor = one_hot, copies: int = copies) -> Tensor:
            name = f"blocks.{layer}.attn.hook_k"
            value = torch.where(one_hot, source_acts[name][None], base_acts[name][None])
            return value.reshape(copies * batch, *value.shape[2:])

        after = mixed(copies, of(base_acts, "q", copies), keys)
        for layer in layers:
            stacked = after[layer].reshape(copies, batch, *after[layer].shape[1:])
            out[layer][chosen] = stacked - base[layer][None]
    return out


def _constant(value: Tensor) -> Callable:
    return lambda act, hook: value.to(act.dtype)


def _keeper(store: dict[int, Tensor], layer: int) -> Callable:
    def keep(act: Tensor, hook: Any) -> None:
        store[layer] = act.detach().clone()

    return keep


def _qk_site(component: str, delta: Tensor, grad_pattern: Tensor, model: Any) -> Tensor:
    """QK-fixed estimates laid out like the component's activation, [batch, pos, head, 1]:
    dM/dA * (exact change of A), summed over the pattern entries the site moves. A query
    moves its own row; a key column moves every row's normalisation, so its estimate sums
    whole rows. Key sites of grouped-query models are key/value heads: the sum over the
    query heads that read them. Keys patched at all positions at once get pos size 1."""
    if component == "q":
        per_row = (grad_pattern * delta).sum(-1)  # [batch, head, q_pos]
        return per_row.transpose(1, 2)[..., None]
    n_heads = model.cfg.n_heads
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or n_heads
    if delta.ndim == 4:  # all key positions at once
        whole = (grad_pattern * delta).sum((-1, -2))  # [batch, head]
        return whole.reshape(whole.shape[0], 1, n_kv, -1).sum(-1)[..., None]
    each = (grad_pattern[None] * delta).sum((-1, -2))  # [key_pos, batch, head]
    each = each.reshape(*each.shape[:2], n_kv, -1).sum(-1)  # [key_pos, batch, kv_head]
    return each.transpose(0, 1)[..., None]
