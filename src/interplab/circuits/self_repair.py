"""Self-repair: how much of a head's direct effect the rest of the model makes up for.

Ablating a head changes the logit difference in two ways: the head's own output no longer
reaches the unembedding (its *direct* effect), and every later component sees a different
input and changes its output too (McGrath et al. 2023, "The Hydra Effect"; Rushing & Nanda
2024, "Explorations of Self-Repair in Language Models"). Later heads and MLPs often push
back, and the final norm's scale shrinks when a large output is removed; both make the
*total* effect smaller than the direct one.

With the final norm written as `LN(r) = centre(r) / s * w + b` (RMSNorm: no centring), the
logit difference at the answer position is `LD = r . d / s + const`, where `r` is the final
residual stream, `s` the norm's scale and `d = centre(w * (W_U[:, a] - W_U[:, b]))` (the
mean over wrong answers when there are several). `r` is a sum of components (embeddings,
each head's `z @ W_O[h]`, each `b_O`, each MLP's output). Ablating head h gives `r'`, `s'`,
and exactly

    total = LD' - LD
          = (h' - h) . d / s                         direct: the head's own change, clean scale
          + sum_{c downstream} (c' - c) . d / s      compensation by later heads and MLPs
          + (r' . d) (1 / s' - 1 / s)                the change in the final norm's scale

Components computed before the head (earlier layers, the other heads of its layer, the
embeddings, every `b_O`) cannot change, so they have no term. The *compensation* is
`total - direct` (= the downstream terms + the scale term).

Sign convention: effects are changes of the logit difference caused by the ablation. A head
that supports the answer has a negative direct effect; a positive compensation then means
self-repair (the model recovers part of the loss). `repair_fraction = compensation / -direct`
(ratio of means) is the share of the direct effect that is made up for, for either sign of
the direct effect: 0 = none, 1 = complete, > 1 = over-compensation, < 0 = amplification.

Ablations (of the head's `hook_z` at every position, as `interplab.circuits.ablate` does):
  resample  each prompt gets the head's output on its own, token-aligned corrupted prompt
            (Chan et al. 2022 resampling from the task's corrupted distribution).
  mean      the head's output averaged over the task's clean prompts, per position
            (Wang et al. 2022).
  zero      the head's output set to 0.

Batching: one clean run (plus one corrupted run for 'resample'), then one forward pass per
`max_batch // batch` ablated heads, each head ablated in its own stacked copy of the prompts;
the unembedding is evaluated at the answer positions only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.circuits.ablation import Head, parse_target
from interplab.circuits.lenses import _check_dla_supported, _has_final_norm, _norm_centres
from interplab.circuits.metrics import Estimate, check_task, model_device
from interplab.circuits.patching import bind_metric, prepare_tokens
from interplab.errors import InterplabError, unknown
from interplab.models.accessor import weights
from interplab.models.hooks import check_hook_names

SelfRepairAblation = Literal["resample", "mean", "zero"]
SELF_REPAIR_ABLATIONS: tuple[str, ...] = get_args(SelfRepairAblation)


# ------------------------------------------------------------------ result
@dataclass
class SelfRepairResult:
    """Per-head direct and total effects of ablation on the logit difference, and how the
    difference (the compensation) splits over downstream components and the final norm's
    scale. All effects are changes caused by the ablation (ablated - clean), per example.

    Identity (to float32 rounding of the model's activations):
    `total_effect == direct_effect + downstream_effect.sum(1) + ln_scale_effect`.
    """

    heads: list[str]
    """Ablated heads, 'L{layer}H{head}' (the `head` axis)."""
    components: list[str]
    """Components that can compensate, 'L{layer}H{head}' and 'MLP{layer}', in model order
    (the `component` axis)."""
    direct_effect: Float[Tensor, "head batch"]
    """(h' - h) . d / s: the ablated head's own change through the clean final-norm scale."""
    total_effect: Float[Tensor, "head batch"]
    """LD' - LD, from the model's final-norm output at the answer position."""
    ln_scale_effect: Float[Tensor, "head batch"]
    """(r' . d)(1 / s' - 1 / s): the change of the final norm's scale (0 without a final norm)."""
    downstream_effect: Float[Tensor, "head component batch"]
    """(c' - c) . d / s per component; exactly 0 where the component is not downstream."""
    downstream_mask: Bool[Tensor, "head component"]
    """1 where the component runs after the ablated head (can respond to it), else 0."""
    clean: Estimate
    """The clean logit difference (the model's own, before any output soft-cap)."""
    ablation: SelfRepairAblation
    """'resample', 'mean' or 'zero'."""

    # -------------------------------------------------------------- lookups
    def _row(self, head: str | Head | tuple[int, int]) -> int:
        label = _label(head)
        if label not in self.heads:
            raise unknown("ablated head", label, self.heads)
        return self.heads.index(label)

    @property
    def compensation_effect(self) -> Float[Tensor, "head batch"]:
        """total - direct per example (positive = self-repair of a negative direct effect)."""
        return self.total_effect - self.direct_effect

    def direct(self, head: str | Head | tuple[int, int]) -> Estimate:
        """The head's direct effect (mean, std, sem over examples)."""
        return Estimate.of(self.direct_effect[self._row(head)])

    def total(self, head: str | Head | tuple[int, int]) -> Estimate:
        """The head's total ablation effect LD' - LD."""
        return Estimate.of(self.total_effect[self._row(head)])

    def compensation(self, head: str | Head | tuple[int, int]) -> Estimate:
        """total - direct: what the rest of the model adds back (self-repair when it has the
        opposite sign to the direct effect)."""
        return Estimate.of(self.compensation_effect[self._row(head)])

    def ln_scale(self, head: str | Head | tuple[int, int]) -> Estimate:
        """The part of the compensation due to the change of the final norm's scale."""
        return Estimate.of(self.ln_scale_effect[self._row(head)])

    def repair_fraction(self, head: str | Head | tuple[int, int]) -> float:
        """compensation / -direct from the means: the share of the direct effect made up for
        (NaN when the mean direct effect is 0)."""
        row = self._row(head)
        direct = self.direct_effect[row].double().mean().item()
        compensation = self.compensation_effect[row].double().mean().item()
        return -compensation / direct if direct != 0 else math.nan

    def downstream(self, head: str | Head | tuple[int, int]) -> dict[str, Estimate]:
        """Each downstream component's share of the compensation, plus 'LN scale'; these
        add up to `compensation(head)` (per example)."""
        row = self._row(head)
        out = {
            name: Estimate.of(self.downstream_effect[row, c])
            for c, name in enumerate(self.components)
            if self.downstream_mask[row, c]
        }
        out["LN scale"] = Estimate.of(self.ln_scale_effect[row])
        return out

    def split(self, head: str | Head | tuple[int, int]) -> dict[str, Estimate]:
        """The compensation grouped: downstream 'heads', 'mlps' and 'ln_scale'."""
        row = self._row(head)
        is_mlp = torch.tensor([c.startswith("MLP") for c in self.components])
        effects = self.downstream_effect[row]
        return {
            "heads": Estimate.of(effects[~is_mlp].sum(0)),
            "mlps": Estimate.of(effects[is_mlp].sum(0)),
            "ln_scale": Estimate.of(self.ln_scale_effect[row]),
        }

    # -------------------------------------------------------------- reports
    def table(self) -> list[dict[str, Any]]:
        """One row per ablated head (for `Report.table`): means and sems of the direct, total
        and compensation effects, the compensation split, and the repair fraction."""
        rows = []
        for head in self.heads:
            direct, total, comp = self.direct(head), self.total(head), self.compensation(head)
            split = self.split(head)
            rows.append(
                {
                    "head": head,
                    "direct": direct.mean,
                    "direct sem": direct.sem,
                    "total": total.mean,
                    "total sem": total.sem,
                    "compensation": comp.mean,
                    "compensation sem": comp.sem,
                    "by heads": split["heads"].mean,
                    "by MLPs": split["mlps"].mean,
                    "by LN scale": split["ln_scale"].mean,
                    "repair fraction": self.repair_fraction(head),
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary: per head, mean/std/sem of each effect, the split, the
        repair fraction and the mean share of each downstream component."""

        def est(e: Estimate) -> dict[str, float]:
            return {"mean": e.mean, "std": e.std, "sem": e.sem, "n": e.n}

        per_head = {}
        for head in self.heads:
            per_head[head] = {
                "direct": est(self.direct(head)),
                "total": est(self.total(head)),
                "compensation": est(self.compensation(head)),
                "split": {k: est(v) for k, v in self.split(head).items()},
                "downstream": {k: v.mean for k, v in self.downstream(head).items()},
                "repair_fraction": self.repair_fraction(head),
            }
        return {
            "ablation": self.ablation,
            "clean_logit_diff": est(self.clean),
            "heads": list(self.heads),
            "components": list(self.components),
            "per_head": per_head,
        }

    def plot(self) -> Any:
        """Left: per-head bars of direct and total effect (± sem). Right: total vs direct
        effect per head with the y = x line (no self-repair); points between the line and
        y = 0 are partly repaired. Returns a matplotlib Figure."""
        import matplotlib.pyplot as plt

        direct = [self.direct(h) for h in self.heads]
        total = [self.total(h) for h in self.heads]
        x = torch.arange(len(self.heads)).numpy()
        fig, (bars, scatter) = plt.subplots(
            1, 2, figsize=(max(8, 0.35 * len(self.heads) + 5), 4), width_ratios=[2, 1]
        )
        width = 0.4
        bars.bar(x - width / 2, [e.mean for e in direct], width, yerr=_sems(direct), label="direct")
        bars.bar(x + width / 2, [e.mean for e in total], width, yerr=_sems(total), label="total")
        bars.axhline(0, color="black", linewidth=0.5)
        bars.set_xticks(x, self.heads, rotation=90 if len(self.heads) > 12 else 0)
        bars.set_ylabel("change in logit diff")
        bars.set_title(f"{self.ablation} ablation: direct vs total effect")
        bars.legend()
        dx, dy = [e.mean for e in direct], [e.mean for e in total]
        scatter.errorbar(dx, dy, xerr=_sems(direct), yerr=_sems(total), fmt="o", markersize=4)
        span = max([abs(v) for v in dx + dy] + [1e-6]) * 1.1
        scatter.plot([-span, span], [-span, span], "k--", linewidth=0.8, label="y = x")
        scatter.axhline(0, color="grey", linewidth=0.5)
        scatter.axvline(0, color="grey", linewidth=0.5)
        order = sorted(range(len(dx)), key=lambda i: -abs(dx[i]))
        for i in order[:8]:  # label the heads that matter most, not all of them
            scatter.annotate(self.heads[i], (dx[i], dy[i]), fontsize=7)
        scatter.set_xlim(-span, span)
        scatter.set_ylim(-span, span)
        scatter.set_xlabel("direct effect")
        scatter.set_ylabel("total effect")
        scatter.set_title("self-repair")
        scatter.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def plot_split(self, head: str | Head | tuple[int, int], top: int = 20) -> Any:
        """Bars of how `head`'s compensation splits over downstream components and the
        final-norm scale (± sem), the `top` largest by |mean| (the rest summed as 'other'),
        next to the direct, total and compensation bars. Returns a matplotlib Figure."""
        import matplotlib.pyplot as plt

        label = self.heads[self._row(head)]
        parts = self.downstream(label)
        names = sorted(parts, key=lambda k: -abs(parts[k].mean))
        kept, rest = names[:top], names[top:]
        values = [parts[k] for k in kept]
        if rest:
            row = self._row(label)
            others = [self.components.index(k) for k in rest if k != "LN scale"]
            other = self.downstream_effect[row, others].sum(0)
            if "LN scale" in rest:
                other = other + self.ln_scale_effect[row]
            kept.append("other")
            values.append(Estimate.of(other))
        summary = ["direct", "total", "compensation"]
        summary_values = [self.direct(label), self.total(label), self.compensation(label)]
        fig, ax = plt.subplots(figsize=(max(5, 0.35 * (len(kept) + 4) + 2), 3.5))
        colors = ["tab:blue", "tab:orange", "tab:green"] + ["tab:grey"] * len(kept)
        all_values = summary_values + values
        ax.bar(
            range(len(all_values)),
            [e.mean for e in all_values],
            yerr=_sems(all_values),
            color=colors,
        )
        ax.axvline(2.5, color="black", linewidth=0.5)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(range(len(all_values)), summary + kept, rotation=90)
        ax.set_ylabel("change in logit diff")
        ax.set_title(f"{label} ({self.ablation} ablation): where the compensation comes from")
        fig.tight_layout()
        return fig


def _sems(estimates: Sequence[Estimate]) -> list[float]:
    return [0.0 if math.isnan(e.sem) else e.sem for e in estimates]


def _label(head: str | Head | tuple[int, int]) -> str:
    if isinstance(head, tuple) and len(head) == 2:
        return f"L{int(head[0])}H{int(head[1])}"
    if isinstance(head, Head):
        return f"L{head.layer}H{head.head}"
    return str(head)


def _parse_heads(model: Any, heads: Sequence[Any] | None) -> list[tuple[int, int]]:
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    valid = [f"L{layer}H{head}" for layer in range(n_layers) for head in range(n_heads)]
    if heads is None:
        return [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    if isinstance(heads, str | Head):
        heads = [heads]
    out: list[tuple[int, int]] = []
    for item in heads:
        target = (
            Head(int(item[0]), int(item[1]))
            if isinstance(item, tuple) and len(item) == 2
            else parse_target(item)
            if isinstance(item, str | Head)
            else None
        )
        if not isinstance(target, Head):
            raise InterplabError(
                f"self-repair ablates attention heads; {item!r} is not a head. Expected "
                f"'L{{layer}}H{{head}}' strings, Head objects or (layer, head) pairs, e.g. "
                f"{valid[0]!r}."
            )
        if not (0 <= target.layer < n_layers and 0 <= target.head < n_heads):
            raise InterplabError(
                f"unknown head {_label(target)!r}; this model has layers 0..{n_layers - 1} and "
                f"heads 0..{n_heads - 1} per layer ({valid[0]} .. {valid[-1]})."
            )
        pair = (target.layer, target.head)
        if pair in out:
            raise InterplabError(f"head {_label(target)!r} is listed twice; list each head once.")
        out.append(pair)
    if not out:
        raise InterplabError(f"no heads given; expected e.g. [{valid[0]!r}] or None for all.")
    return out


# ------------------------------------------------------------------ runs
@dataclass
class _Run:
    """Answer-position activations of one (possibly stacked) forward pass, in float64."""

    z: list[Tensor] = field(default_factory=list)  # per layer [rows, head, d_head]
    mlp: list[Tensor] = field(default_factory=list)  # per layer [rows, d_model]
    scale: Tensor | None = None  # [rows]
    resid: Tensor | None = None  # final residual stream [rows, d_model]
    normed: Tensor | None = None  # final-norm output [rows, d_model]
    full_z: dict[int, Tensor] = field(default_factory=dict)  # layer -> [rows, pos, head, d_head]


def _forward(
    model: Any,
    tokens: Int[Tensor, "rows pos"],
    answer_pos: Int[Tensor, " rows"],
    *,
    full_z_layers: Sequence[int] = (),
    ablate: dict[int, tuple[Tensor, Tensor | None]] | None = None,
    copies: int = 1,
) -> _Run:
    """Run `tokens`, keeping what the decomposition needs at each row's answer position.

    `ablate[layer] = (mask [copies, head], values)` replaces, in stacked copy k, the heads
    where mask[k] is set by `values` ([batch | 1, pos, head, d_head], None = zeros) at
    every position.
    """
    cfg = model.cfg
    n_layers = cfg.n_layers
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    run = _Run(z=[None] * n_layers, mlp=[None] * n_layers)  # type: ignore[list-item]
    ablate = ablate or {}

    def at_answer(x: Tensor) -> Tensor:
        return x[rows, answer_pos].double()

    def z_hook(layer: int) -> Callable[[Tensor, Any], Tensor]:
        def fn(act: Tensor, hook: Any) -> Tensor:
            if layer in ablate:
                mask, values = ablate[layer]
                stacked = act.reshape(copies, -1, *act.shape[1:])  # [copy, batch, pos, head, k]
                fill = torch.zeros((), dtype=act.dtype, device=act.device)
                if values is not None:
                    fill = values[None, :, : act.shape[1]].to(act.dtype)
                act = torch.where(mask[:, None, None, :, None], fill, stacked).reshape(act.shape)
            if layer in full_z_layers:
                run.full_z[layer] = act.detach().clone()
            run.z[layer] = at_answer(act)
            return act

        return fn

    def mlp_hook(layer: int) -> Callable[[Tensor, Any], None]:
        def fn(act: Tensor, hook: Any) -> None:
            run.mlp[layer] = at_answer(act)

        return fn

    def scale_hook(act: Tensor, hook: Any) -> None:
        run.scale = at_answer(act)[:, 0]

    def resid_hook(act: Tensor, hook: Any) -> None:
        run.resid = at_answer(act)

    def unembed_hook(act: Tensor, hook: Any) -> Tensor:
        # only the answer positions are scored: skip the unembedding everywhere else
        run.normed = at_answer(act)
        return act[rows, answer_pos][:, None]

    hooks: list[tuple[str, Callable]] = [
        (f"blocks.{layer}.attn.hook_z", z_hook(layer)) for layer in range(n_layers)
    ]
    if not cfg.attn_only:
        hooks += [(f"blocks.{layer}.hook_mlp_out", mlp_hook(layer)) for layer in range(n_layers)]
    if _has_final_norm(model):
        hooks.append(("ln_final.hook_scale", scale_hook))
    hooks.append((f"blocks.{n_layers - 1}.hook_resid_post", resid_hook))
    hooks.append(("unembed.hook_in", unembed_hook))
    check_hook_names(model, [name for name, _ in hooks])
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        model(tokens)
    if run.scale is None:  # no final norm: the residual stream is read as it is
        run.scale = torch.ones(tokens.shape[0], dtype=torch.float64, device=tokens.device)
    if cfg.attn_only:
        zeros = torch.zeros(tokens.shape[0], cfg.d_model, dtype=torch.float64, device=tokens.device)
        run.mlp = [zeros] * n_layers
    return run


def _directions(model: Any, task: Any, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per example, in float64: the unembedding direction u = W_U[:, a] - mean W_U[:, wrong]
    (read from the final-norm output), the residual-stream direction d = centre(u * w) (read
    from the residual stream before dividing by the norm's scale), and b_U[a] - mean b_U[wrong]."""
    w = weights(model)
    W_U, b_U = w.W_U.double().to(device), w.b_U.double().to(device)
    answers = task.answers.to(device)
    wrong = task.wrong_answers.to(device).reshape(answers.shape[0], -1)
    u = W_U.T[answers] - W_U.T[wrong].mean(1)  # [batch, d_model]
    b_diff = b_U[answers] - b_U[wrong].mean(1)
    d = u * w.ln_final_w.double().to(device)
    if _norm_centres(model):  # centring is a symmetric projection: move it onto d
        d = d - d.mean(-1, keepdim=True)
    return u, d, b_diff


def _downstream_masks(
    model: Any, pairs: Sequence[tuple[int, int]], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Which components run after each ablated head: heads [k, layer, head] (later layers
    only; heads of the same layer run in parallel) and MLPs [k, layer] (the head's own layer
    too, unless attention and MLP run in parallel)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    own_mlp = 0 if getattr(model.cfg, "parallel_attn_mlp", False) else 1
    layer_k = torch.tensor([layer for layer, _ in pairs], device=device)[:, None]
    layers = torch.arange(n_layers, device=device)[None]
    heads = (layers > layer_k)[:, :, None].expand(-1, -1, n_heads)
    mlps = layers > layer_k - own_mlp
    if model.cfg.attn_only:
        mlps = torch.zeros_like(mlps)
    return heads, mlps


def self_repair(
    model: Any,
    task: Any,
    heads: Sequence[str | Head | tuple[int, int]] | None = None,
    *,
    ablation: SelfRepairAblation = "resample",
    max_batch: int = 1024,
    device: str | torch.device | None = None,
) -> SelfRepairResult:
    """Direct effect, total ablation effect and the split of the compensation (self-repair)
    for each head, on a task's logit difference (McGrath et al. 2023; Rushing & Nanda 2024).

    See the module docstring for the decomposition
    `total = direct + sum_downstream (c' - c) . d / s + (r' . d)(1/s' - 1/s)`
    and the sign convention (compensation = total - direct; self-repair when it opposes the
    direct effect).

    Args:
        model: a hooked model (TransformerBridge) whose heads and MLPs add straight into the
            residual stream (as for `direct_logit_attribution`).
        task: a `TaskDataset` with single-token answers; the metric is logit(answer) minus
            the mean logit of the wrong answer(s) at `answer_pos` (before any output
            soft-cap).
        heads: heads to ablate ('L1H3', `Head(1, 3)` or (1, 3)); None = every head.
        ablation: 'resample' (each prompt's own corrupted prompt), 'mean' (mean over the
            task's clean prompts, per position) or 'zero'.
        max_batch: most rows (ablated copies x prompts) per forward pass; at least one copy.
        device: where to run; None = the model's device.

    Returns:
        `SelfRepairResult` with per-example effects of shape [head, batch] and the
        downstream split [head, component, batch].
    """
    check_task(task)
    if ablation not in SELF_REPAIR_ABLATIONS:
        raise unknown("self-repair ablation", str(ablation), SELF_REPAIR_ABLATIONS, show_all=True)
    if not isinstance(max_batch, int) or max_batch <= 0:
        raise InterplabError(f"max_batch must be a positive int, got {max_batch!r}.")
    _check_dla_supported(model)
    if task.answers.ndim != 1 or task.wrong_answers.ndim not in (1, 2):
        raise InterplabError(
            f"self-repair scores one next token per prompt: answers must be [batch] and "
            f"wrong_answers [batch] or [batch, n_wrong]; got {tuple(task.answers.shape)} and "
            f"{tuple(task.wrong_answers.shape)}."
        )
    pairs = _parse_heads(model, heads)
    device = model_device(model, device)
    task = task.to(device)
    clean_tokens, corrupted_tokens, _, _ = prepare_tokens(
        task.clean_tokens, task.corrupted_tokens, bind_metric(model, task, "logit_diff"), device
    )
    batch = clean_tokens.shape[0]
    answer_pos = task.answer_pos
    layers = sorted({layer for layer, _ in pairs})

    clean = _forward(model, clean_tokens, answer_pos, full_z_layers=layers)
    if ablation == "resample":
        values: dict[int, Tensor | None] = dict(
            _forward(model, corrupted_tokens, answer_pos, full_z_layers=layers).full_z
        )
    elif ablation == "mean":
        values = {layer: clean.full_z[layer].mean(0, keepdim=True) for layer in layers}
    else:
        values = dict.fromkeys(layers)
    clean.full_z.clear()

    u, d, b_diff = _directions(model, task, device)
    W_O = weights(model).W_O.double().to(device)  # [layer, head, d_head, d_model]
    readout = torch.einsum("lhkd,bd->lhbk", W_O, d)  # z . readout = (z @ W_O) . d
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads

    def shares(run: _Run, copies: int) -> tuple[Tensor, Tensor]:
        """Unscaled shares c . d: heads [copy, layer, head, batch], MLPs [copy, layer, batch]."""
        z = torch.stack(run.z).reshape(n_layers, copies, batch, n_heads, -1)
        mlp = torch.stack(run.mlp).reshape(n_layers, copies, batch, -1)
        return (
            torch.einsum("lcbhk,lhbk->clhb", z, readout),
            torch.einsum("lcbd,bd->clb", mlp, d),
        )

    def logit_diff(run: _Run, copies: int) -> Tensor:
        assert run.normed is not None
        return (run.normed.reshape(copies, batch, -1) * u).sum(-1) + b_diff

    clean_heads, clean_mlp = shares(clean, 1)  # [1, layer, head, batch], [1, layer, batch]
    clean_ld = logit_diff(clean, 1)[0]
    s = clean.scale
    per_pass = max(1, max_batch // batch)
    direct, total, ln_term, down_heads, down_mlp = [], [], [], [], []
    for start in range(0, len(pairs), per_pass):
        chunk = pairs[start : start + per_pass]
        copies = len(chunk)
        ablate = {}
        for layer in sorted({layer for layer, _ in chunk}):
            mask = torch.zeros(copies, n_heads, dtype=torch.bool, device=device)
            for k, (layer_k, head_k) in enumerate(chunk):
                mask[k, head_k] = layer_k == layer
            ablate[layer] = (mask, values[layer])
        run = _forward(
            model,
            clean_tokens.repeat(copies, 1),
            answer_pos.repeat(copies),
            ablate=ablate,
            copies=copies,
        )
        run_heads, run_mlp = shares(run, copies)
        delta_heads = (run_heads - clean_heads) / s  # [copy, layer, head, batch]
        delta_mlp = (run_mlp - clean_mlp) / s  # [copy, layer, batch]
        k_idx = torch.arange(copies, device=device)
        layer_idx = torch.tensor([layer for layer, _ in chunk], device=device)
        head_idx = torch.tensor([head for _, head in chunk], device=device)
        direct.append(delta_heads[k_idx, layer_idx, head_idx])
        head_after, mlp_after = _downstream_masks(model, chunk, device)
        down_heads.append(delta_heads * head_after[..., None])
        down_mlp.append(delta_mlp * mlp_after[..., None])
        assert run.resid is not None and run.scale is not None
        resid_d = (run.resid.reshape(copies, batch, -1) * d).sum(-1)
        ln_term.append(resid_d * (1 / run.scale.reshape(copies, batch) - 1 / s))
        total.append(logit_diff(run, copies) - clean_ld)

    # component axis in model order: L0H0 .. L0H{n-1}, MLP0, L1H0, ...
    head_mask, mlp_mask = _downstream_masks(model, pairs, device)
    effects = [torch.cat(down_heads), head_mask]
    mlp_effects = [torch.cat(down_mlp), mlp_mask]
    has_mlp = not model.cfg.attn_only
    downstream, mask, components = [], [], []
    for layer in range(n_layers):
        components += [f"L{layer}H{head}" for head in range(n_heads)]
        downstream.append(effects[0][:, layer])
        mask.append(effects[1][:, layer])
        if has_mlp:
            components.append(f"MLP{layer}")
            downstream.append(mlp_effects[0][:, layer, None])
            mask.append(mlp_effects[1][:, layer, None])
    return SelfRepairResult(
        heads=[f"L{layer}H{head}" for layer, head in pairs],
        components=components,
        direct_effect=torch.cat(direct).float().cpu(),
        total_effect=torch.cat(total).float().cpu(),
        ln_scale_effect=torch.cat(ln_term).float().cpu(),
        downstream_effect=torch.cat(downstream, 1).float().cpu(),
        downstream_mask=torch.cat(mask, 1).cpu(),
        clean=Estimate.of(clean_ld),
        ablation=ablation,
    )
