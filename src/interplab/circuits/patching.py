"""Activation patching, batched: many patched copies of the prompts in one forward pass.

Activation patching (Meng et al. 2022; Wang et al. 2022; Heimersheim & Nanda 2024) runs the
model on one set of prompts (the *base*) while overwriting one activation site with its value
from a paired run (the *source*), and reads a metric. Directions:

  denoise  clean -> corrupted: base = corrupted, source = clean. A site that restores the
           clean behaviour is sufficient for it (given the rest of the corrupted run).
  noise    corrupted -> clean: base = clean, source = corrupted. A site whose corruption
           breaks the behaviour is necessary for it.

A *site* is a cell of the grid `over` spans in one hook's activation: ("pos",) patches each
position of the residual stream; ("head",) each head at every position; ("head", "pos") each
head at each position; () the whole activation of a layer. The result has axes
`("layer", *over)`.

Batching: for a layer and its S sites, the base prompts [batch, pos] are repeated into
S * batch rows and one forward hook overwrites site s in copy s (a `torch.where` with a
one-hot site mask; no Python loop over heads or positions). Copies from several layers
share a forward pass too; `max_batch` bounds the rows per pass. Two exact shortcuts:
  * a site whose source and base activations are bitwise equal for every example (e.g.
    positions before the first token where clean and corrupted prompts differ) cannot
    change anything: it gets the unpatched base value without a forward pass;
  * with a task metric, which reads only the answer positions, the prompts are cut after
    the last answer position (a causal model's later positions cannot reach it) and the
    unembedding is evaluated at the answer positions only.
  * positions before the first one a patch changes are identical to the base run, so copies
    whose patches start at position p share the base run's keys and values for positions
    < p (a HuggingFace KV cache) and compute positions >= p only. This is used when a split
    forward pass reproduces the full one (checked once per sweep; native toy models without
    a KV cache fall back to full passes).
  * after the last block's MLP nothing mixes positions, so with a task metric that MLP runs
    on the answer rows only (for sites that come before it; checked once per sweep).
  * a head's z, q or result (or attn_out) patched at one position p changes only position
    p of its block's output, so that block's MLP runs on row p only and its other output
    rows are the base run's (checked once per block).
  * blocks before the first one a patch touches are identical to the base run too, so a
    pass for sites in block L skips blocks < L (they return their input) and feeds block L
    the base run's residual stream. Also checked once per sweep against a full pass.
Positions after the last answer position therefore report the unpatched base value, which is
also what a full forward pass gives. Results equal TransformerLens's one-forward-per-site
`transformer_lens.patching` functions to float32 rounding (tests check <= 1e-5).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.metrics import (
    Estimate,
    MetricKind,
    TaskMetric,
    check_pair,
    check_task,
    model_device,
    task_metric,
)
from interplab.errors import InterplabError, unknown
from interplab.models.hooks import check_hook_names

Component = Literal[
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "z",
    "q",
    "k",
    "v",
    "result",
    "pattern",
    "mlp_pre",
    "mlp_post",
]
Axis = Literal["head", "pos", "neuron"]
Direction = Literal["denoise", "noise"]
COMPONENTS: tuple[str, ...] = get_args(Component)
DIRECTIONS: tuple[str, ...] = get_args(Direction)

_HOOK: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "z": "blocks.{layer}.attn.hook_z",
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
    "result": "blocks.{layer}.attn.hook_result",
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
}
"""Component -> hook name template."""

_AFTER_MLP_IN = ("mlp_pre", "mlp_post", "mlp_out", "resid_post")
"""Components whose hook fires after (or inside) the MLP of their block."""

_POINT = ("z", "q", "result", "attn_out")
"""Components whose patch at one position changes only that position of their block's
attention output (a key or value would change every later query's)."""

_RESID = ("pos", "d_model")
_HEADS = ("pos", "head", "d_head")
_LAYOUT: dict[str, tuple[str, ...]] = {
    "resid_pre": _RESID,
    "resid_mid": _RESID,
    "resid_post": _RESID,
    "attn_out": _RESID,
    "mlp_out": _RESID,
    "z": _HEADS,
    "q": _HEADS,
    "k": _HEADS,
    "v": _HEADS,
    "result": _HEADS,
    "pattern": ("head", "pos", "src_pos"),  # "pos" is the query (destination) position
    "mlp_pre": ("pos", "neuron"),
    "mlp_post": ("pos", "neuron"),
}
"""Component -> names of its activation's dims after the batch dim."""

Metric = MetricKind | TaskMetric | Callable[[Tensor], Tensor]


# ------------------------------------------------------------------ result
@dataclass
class PatchingResult:
    """Patching effects on a grid of sites, with per-example values and error bars."""

    values: Float[Tensor, "layer ..."]
    """Mean metric per site (normalised to 0 = corrupted, 1 = clean when `normalized`)."""
    std: Float[Tensor, "layer ..."]
    """Standard deviation over examples per site (same scale as `values`)."""
    sem: Float[Tensor, "layer ..."]
    """Standard error of the mean per site."""
    per_example: Float[Tensor, "layer ... batch"] = field(repr=False)
    """Raw (unnormalised) metric per site and example."""
    axes: tuple[str, ...]
    """Axis names of `values`, e.g. ('layer', 'head', 'pos')."""
    labels: dict[str, list[str]]
    """Tick labels per axis."""
    metric: str
    """Metric name."""
    component: str
    """Patched component, e.g. 'z' (hook `blocks.{layer}.attn.hook_z`)."""
    direction: Direction
    """'denoise' (clean -> corrupted) or 'noise' (corrupted -> clean)."""
    normalized: bool
    """Whether `values` are on the 0 = corrupted, 1 = clean scale."""
    clean: Estimate
    """The metric on the clean prompts (unpatched)."""
    corrupted: Estimate
    """The metric on the corrupted prompts (unpatched)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The `k` sites with the largest |effect relative to the base run|, as (label, value)."""
        base = 1.0 if self.direction == "noise" else 0.0
        if not self.normalized:
            base = (self.clean if self.direction == "noise" else self.corrupted).mean
        flat = (self.values - base).abs().flatten()
        order = flat.argsort(descending=True)[:k]
        out = []
        for i in order.tolist():
            coords = _unravel_int(i, self.shape)
            label = " ".join(
                f"{a}={self.labels[a][c]}" for a, c in zip(self.axes, coords, strict=True)
            )
            out.append((label, float(self.values.flatten()[i])))
        return out

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """Heatmap of `values` (rows: all axes but the last; columns: the last axis).
        Returns the matplotlib Figure. Needs matplotlib (`interplab[viz]`)."""
        import matplotlib.pyplot as plt

        grid = self.values.detach().float().cpu()
        if grid.ndim == 1:
            grid = grid[:, None]
        rows = (
            _row_labels(self.axes[:-1], self.labels)
            if self.values.ndim > 1
            else list(self.labels[self.axes[0]])
        )
        cols = self.labels[self.axes[-1]] if self.values.ndim > 1 else [""]
        grid = grid.reshape(len(rows), len(cols))
        if ax is None:
            fig, ax = plt.subplots(
                figsize=(max(4, 0.35 * len(cols) + 2), max(3, 0.3 * len(rows) + 1.5))
            )
        else:
            fig = ax.figure
        centre = 0.0
        if self.normalized:
            centre = 0.0 if self.direction == "denoise" else 1.0
        span = float((grid - centre).abs().max()) or 1.0
        image = ax.imshow(
            grid.numpy(), cmap="RdBu", vmin=centre - span, vmax=centre + span, aspect="auto"
        )
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xticks(range(len(cols)), cols, rotation=90 if len(cols) > 12 else 0)
        ax.set_xlabel(self.axes[-1] if self.values.ndim > 1 else "")
        ax.set_ylabel(" x ".join(self.axes[:-1]) if self.values.ndim > 1 else self.axes[0])
        scale = " (normalised)" if self.normalized else ""
        ax.set_title(
            title or f"{self.direction} patching of {self.component}: {self.metric}{scale}"
        )
        fig.colorbar(image, ax=ax)
        return fig


def _row_labels(axes: Sequence[str], labels: dict[str, list[str]]) -> list[str]:
    rows = [""]
    for axis in axes:
        prefix = {"layer": "L", "head": "H", "neuron": "N", "pos": "P"}.get(axis, axis)
        rows = [f"{r}{prefix}{lab}" for r in rows for lab in labels[axis]]
    return rows


def _unravel_int(index: int, shape: Sequence[int]) -> list[int]:
    coords = []
    for size in reversed(shape):
        coords.append(index % size)
        index //= size
    return coords[::-1]


# ------------------------------------------------------------------ scoring
class _Scorer:
    """Turns a forward pass over `n` stacked copies of the batch into metric values [n, batch].

    A task metric reads the answer positions only, so a hook on the unembedding input keeps
    just those rows: the unembedding (often most of a small model's compute) runs on one
    position per example instead of all of them. A forward pass that starts at position
    `offset` (the prefix came from a KV cache) scores row b at `answer_pos[b] - offset`; rows
    whose answer comes before `offset` cannot have changed and keep their base value.
    """

    def __init__(self, model: Any, metric: TaskMetric | Callable, batch: int) -> None:
        self.metric = metric
        self.batch = batch
        self.narrow = isinstance(metric, TaskMetric) and "unembed.hook_in" in model.hook_dict
        last_mlp = f"blocks.{model.cfg.n_layers - 1}.mlp.hook_in"
        self.last_mlp = last_mlp if self.narrow and last_mlp in model.hook_dict else None

    def hooks(self, n: int, offset: int = 0, last_mlp: bool = False) -> list[tuple[str, Callable]]:
        """Hooks that keep the answer rows only: at the unembedding input, and with
        `last_mlp` at the last block's MLP input too (see `check_last_mlp`)."""
        if not self.narrow:
            return []
        assert isinstance(self.metric, TaskMetric)
        rows = (self.metric.answer_pos - offset).clamp(min=0).repeat(n)

        def keep_answer_rows(x: Tensor, hook: Any) -> Tensor:
            index = torch.arange(x.shape[0], device=x.device)
            return x[index, rows.to(x.device)][:, None]

        hooks = [("unembed.hook_in", keep_answer_rows)]
        if last_mlp and self.last_mlp is not None:
            hooks.append((self.last_mlp, keep_answer_rows))
        return hooks

    def check_last_mlp(self, model: Any, tokens: Tensor, values: Tensor) -> bool:
        """Whether the last block's MLP may run on the answer rows only.

        Nothing after that MLP mixes positions, so its output is needed at the answer rows
        alone; given a [batch, 1, d_model] output, the block's residual addition broadcasts
        and the answer rows come out exact (the other rows are wrong and never read). Checked
        once against `values` of a full run, as a block that does not add its MLP output to
        the residual would break it."""
        if self.last_mlp is None:
            return False
        try:
            with model.hooks(fwd_hooks=self.hooks(1, 0, last_mlp=True)):
                logits = model(tokens)
            narrowed = self.values(logits, 1)[0]
        except (TypeError, ValueError, AttributeError, NotImplementedError, RuntimeError):
            return False
        tolerance = 1e-4 * (1.0 + float(values.abs().max()))
        return narrowed.shape == values.shape and bool((narrowed - values).abs().max() <= tolerance)

    def values(
        self,
        logits: Tensor,
        n: int,
        offset: int = 0,
        base_logits: Tensor | None = None,
        base_values: Tensor | None = None,
    ) -> Float[Tensor, "n batch"]:
        if isinstance(self.metric, TaskMetric) and self.narrow and logits.shape[1] == 1:
            out = self.metric.from_answer_logits(logits[:, 0].reshape(n, self.batch, -1))
            if offset:
                assert base_values is not None
                early = self.metric.answer_pos < offset
                out = torch.where(early, base_values.to(out), out)
            return out
        if offset:  # positions before `offset` are the base run's, unchanged by the patch
            assert base_logits is not None
            prefix = base_logits[:, :offset].repeat(n, 1, 1)
            logits = torch.cat([prefix, logits], dim=1)
        stacked = logits.reshape(n, self.batch, *logits.shape[1:])
        if isinstance(self.metric, TaskMetric):
            return self.metric(stacked)
        out = []
        for logits_copy in stacked:
            value = torch.as_tensor(self.metric(logits_copy))
            if value.shape != (self.batch,):
                raise InterplabError(
                    f"the patching metric must return one value per example (shape "
                    f"[{self.batch}]), got shape {tuple(value.shape)}; e.g. return "
                    "logit_diff(...) rather than logit_diff(...).mean()."
                )
            out.append(value)
        return torch.stack(out)


def _capture_and_score(
    model: Any, tokens: Tensor, names: Sequence[str], scorer: _Scorer
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Activations at `names`, metric values [batch] and logits of one unpatched run."""
    acts: dict[str, Tensor] = {}

    def saver(name: str) -> Callable:
        def fn(act: Tensor, hook: Any) -> None:
            acts[name] = act.detach().clone()

        return fn

    with model.hooks(fwd_hooks=[(name, saver(name)) for name in names] + scorer.hooks(1)):
        logits = model(tokens)
    return acts, scorer.values(logits, 1)[0].float(), logits


# ------------------------------------------------------------------ shared prefixes
class _Prefix:
    """KV caches of the base prompts' first p positions, for forward passes that start at p.

    A patch whose first changed position is p leaves positions < p exactly as in the base
    run, so every copy can reuse the base run's keys and values there and compute positions
    >= p only. Used when the model's forward takes HuggingFace `past_key_values` and a split
    run reproduces the full one (checked once per sweep); otherwise every pass starts at 0.
    """

    def __init__(self, model: Any, base_tokens: Tensor) -> None:
        self.model = model
        self.tokens = base_tokens
        self.cached: tuple[int, Any] | None = None
        self.enabled = base_tokens.shape[1] > 1 and self._reproduces_full_run()

    def _split(self, p: int) -> Any:
        _, cache = self.model(self.tokens[:, :p], return_type="logits_and_cache")
        return cache

    def _reproduces_full_run(self) -> bool:
        p = self.tokens.shape[1] // 2
        try:
            full = self.model(self.tokens)
            cache = self._split(p)
            if cache is None or not hasattr(cache, "batch_select_indices"):
                return False
            tail = self.model(self.tokens[:, p:], past_key_values=cache)
        except (TypeError, ValueError, AttributeError, NotImplementedError, RuntimeError):
            return False
        if tail.shape != full[:, p:].shape:
            return False
        tolerance = 1e-4 * (1.0 + float(full.abs().max()))
        return bool((tail - full[:, p:]).abs().max() <= tolerance)

    def cache_for(self, p: int, n: int) -> Any:
        """A fresh cache of the first `p` positions, for `n` stacked copies (copy-major)."""
        if self.cached is None or self.cached[0] != p:
            self.cached = (p, self._split(p))
        cache = copy.deepcopy(self.cached[1])
        rows = torch.arange(self.tokens.shape[0], device=self.tokens.device).repeat(n)
        cache.batch_select_indices(rows)
        return cache


class _LayerSkip:
    """Forward passes that start at block L: blocks < L return their input unchanged (their
    forward is swapped for a passthrough for the pass) and a hook on block L's input puts
    the base run's residual stream there. Enabled only for models whose blocks are
    `model.blocks` and when a skipped pass reproduces a full one (checked once)."""

    def __init__(self, model: Any, base_tokens: Tensor, resid_pre: list[Tensor] | None) -> None:
        self.model = model
        self.resid_pre = resid_pre
        self.blocks = getattr(model, "blocks", None)
        self.enabled = (
            resid_pre is not None
            and isinstance(self.blocks, torch.nn.ModuleList)
            and len(self.blocks) == len(resid_pre) > 1
            and self._reproduces_full_run(base_tokens)
        )

    def _reproduces_full_run(self, tokens: Tensor) -> bool:
        assert self.resid_pre is not None
        last = len(self.resid_pre) - 1
        try:
            full = self.model(tokens)
            with self.model.hooks(fwd_hooks=self.hooks(last, 1, 0)), self.skipping(last):
                skipped = self.model(tokens)
        except (TypeError, ValueError, AttributeError, NotImplementedError, RuntimeError):
            return False
        if skipped.shape != full.shape:
            return False
        tolerance = 1e-4 * (1.0 + float(full.abs().max()))
        return bool((skipped - full).abs().max() <= tolerance)

    def hooks(self, block: int, n: int, start: int) -> list[tuple[str, Callable]]:
        """The hook that feeds block `block` the base residual (positions >= `start`, `n`
        stacked copies); put it before any patch hook on the same point."""
        assert self.resid_pre is not None
        resid = self.resid_pre[block][:, start:].repeat(n, 1, 1)

        def inject(act: Tensor, hook: Any) -> Tensor:
            return resid.to(act.dtype)

        return [(f"blocks.{block}.hook_resid_pre", inject)]

    @contextlib.contextmanager
    def skipping(self, block: int) -> Iterator[None]:
        """Blocks < `block` pass their input through for the duration."""
        assert self.blocks is not None
        swapped = list(self.blocks)[:block]
        # straight into the instance dict: bridge components forward attribute writes to the
        # wrapped module, which would leave the swap behind
        for module in swapped:
            module.__dict__["forward"] = _passthrough
        try:
            yield
        finally:
            for module in swapped:
                module.__dict__.pop("forward", None)


def _passthrough(*args: Any, **kwargs: Any) -> Any:
    """A skipped block: its hidden-state input, as the block's output."""
    return args[0] if args else kwargs["hidden_states"]


class _PointSites:
    """For sites that change one position p of their block before its MLP (a head's z, q or
    result, or attn_out, at one position): the block's MLP runs on row p only, and the
    block's other output rows are the base run's, which such a patch cannot change.

    A hook on the block's MLP input keeps row p of each copy ([rows, 1, d_model]); the
    block's residual addition broadcasts it, so row p of the block output is exact and the
    other rows, wrong, are replaced from `resid_post` (the base run's block outputs) by a
    hook on `hook_resid_post`. Checked once against a full pass."""

    def __init__(self, model: Any, resid_post: list[Tensor] | None) -> None:
        self.model = model
        self.resid_post = resid_post

    def hooks(self, block: int, rows: Tensor, n: int, start: int) -> list[tuple[str, Callable]]:
        """Hooks for a pass over positions >= `start` of `n` stacked copies whose site sits at
        row `rows[i]` (relative to `start`) of pass row i."""
        assert self.resid_post is not None
        base = self.resid_post[block][:, start:].repeat(n, 1, 1)
        index = torch.arange(rows.shape[0], device=rows.device)
        keep = torch.arange(base.shape[1], device=rows.device)[None, :] == rows[:, None]

        def mlp_row(x: Tensor, hook: Any) -> Tensor:
            return x[index, rows][:, None]

        def restore(x: Tensor, hook: Any) -> Tensor:
            return torch.where(keep[..., None], x, base.to(x.dtype))

        return [
            (f"blocks.{block}.mlp.hook_in", mlp_row),
            (f"blocks.{block}.hook_resid_post", restore),
        ]

    def check(self, tokens: Tensor, block: int, logits: Tensor) -> bool:
        """Whether narrowing block `block` reproduces `logits` of the unpatched run."""
        if self.resid_post is None:
            return False
        names = (f"blocks.{block}.mlp.hook_in", f"blocks.{block}.hook_resid_post")
        if not all(name in self.model.hook_dict for name in names):
            return False
        rows = torch.full((tokens.shape[0],), tokens.shape[1] // 2, device=tokens.device)
        try:
            with self.model.hooks(fwd_hooks=self.hooks(block, rows, 1, 0)):
                narrowed = self.model(tokens)
        except (TypeError, ValueError, AttributeError, NotImplementedError, RuntimeError):
            return False
        if narrowed.shape != logits.shape:
            return False
        tolerance = 1e-4 * (1.0 + float(logits.abs().max()))
        return bool((narrowed - logits).abs().max() <= tolerance)


# ------------------------------------------------------------------ the sweep
def _site_masks(
    layout: tuple[str, ...],
    over: tuple[str, ...],
    sizes: tuple[int, ...],
    sites: Int[Tensor, " copies"],
    selected: torch.Tensor,
) -> Tensor:
    """Boolean mask [copies, *dims] (size 1 on dims not in `over`): copy c patches the cell
    `sites[c]` of the `over` grid, and only if `selected[c]`."""
    copies = sites.shape[0]
    mask = selected.reshape(copies, *([1] * len(layout)))
    rest = sites
    coords = []
    for size in reversed(sizes):
        coords.append(rest % size)
        rest = rest // size
    coords.reverse()
    for axis, size, coord in zip(over, sizes, coords, strict=True):
        dim = layout.index(axis)
        shape = [1] * (len(layout) + 1)
        shape[dim + 1] = size
        grid = torch.arange(size, device=sites.device).reshape(shape)
        mask = mask & (grid == coord.reshape(copies, *([1] * len(layout))))
    return mask


def _site_plan(
    source: Tensor, base: Tensor, layout: tuple[str, ...], over: tuple[str, ...]
) -> tuple[Tensor, Tensor]:
    """For every site of the `over` grid: whether patching it changes the activation at all
    (source != base somewhere), and the first position it changes. Both [*over sizes]."""
    diff = (source != base).any(0)  # [*dims]
    kept = [name for name in layout if name in over or name == "pos"]
    other = tuple(d for d, name in enumerate(layout) if name not in kept)
    if other:
        diff = diff.any(dim=other)
    if "pos" in over:
        changed = diff.permute([kept.index(axis) for axis in over])
        pos_axis = over.index("pos")
        shape = [1] * len(over)
        shape[pos_axis] = changed.shape[pos_axis]
        first = torch.arange(changed.shape[pos_axis], device=diff.device).reshape(shape)
        return changed, first.expand_as(changed)
    by_pos = diff.permute([kept.index(axis) for axis in (*over, "pos")])  # [*over, pos]
    return by_pos.any(-1), by_pos.int().argmax(-1)  # argmax: the first True


def _chunks(
    starts: Tensor, blocks: Tensor, copies: int, min_copies: int
) -> list[tuple[int, int, int, int]]:
    """(begin, end, start position, first block) runs of jobs sorted by (start, block): at
    most `copies` jobs of one start position each. A run ends where the block changes once it
    holds `min_copies` jobs, so that large sweeps skip more blocks while small ones still
    share forward passes; a run's first block is that of its first job."""
    out = []
    begin = 0
    values, counts = torch.unique_consecutive(starts, return_counts=True)
    for start, count in zip(values.tolist(), counts.tolist(), strict=True):
        run = blocks[begin : begin + count].tolist()
        first = 0
        for i in range(1, count + 1):
            full = i - first == copies
            new_block = i < count and run[i] != run[i - 1] and i - first >= min_copies
            if i == count or full or new_block:
                out.append((begin + first, begin + i, start, run[first]))
                first = i
        begin += count
    return out


def _sweep(
    model: Any,
    base_tokens: Tensor,
    source_acts: dict[str, Tensor],
    base_acts: dict[str, Tensor],
    base_values: Tensor,
    base_logits: Tensor,
    names: list[str],
    layout: tuple[str, ...],
    over: tuple[str, ...],
    scorer: _Scorer,
    max_batch: int,
    progress: bool,
    blocks: list[int] | None = None,
    resid_pre: list[Tensor] | None = None,
    before_last_mlp: list[bool] | None = None,
    point: _PointSites | None = None,
) -> Float[Tensor, "layer sites batch"]:
    """Metric values of every patched site. `blocks[i]` is the block that hook `names[i]`
    lives in and `resid_pre[b]` the base run's input to block b (both None: no block
    skipping). `before_last_mlp[i]`: hook `names[i]` fires before the last block's MLP input,
    so passes patching only such hooks may run that MLP on the answer rows alone. `point`:
    the sites change one position of their block (see `_PointSites`); None = they may not."""
    batch = base_tokens.shape[0]
    first = base_acts[names[0]]
    sizes = tuple(first.shape[1 + layout.index(axis)] for axis in over)
    n_sites = math.prod(sizes)
    device = base_tokens.device
    plans = [_site_plan(source_acts[n], base_acts[n], layout, over) for n in names]
    todo = torch.stack([changed.reshape(-1) for changed, _ in plans])  # [layer, sites]
    start_at = torch.stack([first.reshape(-1) for _, first in plans])
    jobs = todo.nonzero()  # [n_jobs, 2]: (layer index, site index)
    starts = start_at[jobs[:, 0], jobs[:, 1]]
    site_pos = starts.clone()  # for point sites, the one position they change
    prefix = _Prefix(model, base_tokens) if bool((starts > 0).any()) else None
    if prefix is None or not prefix.enabled:
        starts = torch.zeros_like(starts)
    job_blocks = torch.zeros_like(starts)
    skip = None
    if blocks is not None and max(blocks) > 0:
        skip = _LayerSkip(model, base_tokens, resid_pre)
        if skip.enabled:
            job_blocks = torch.tensor(blocks)[jobs[:, 0].cpu()].to(starts)
    order = torch.argsort(starts * (1 + max(blocks or [0])) + job_blocks, stable=True)
    jobs, starts, job_blocks = jobs[order].to(device), starts[order], job_blocks[order]
    site_pos = site_pos[order].to(device)
    site_blocks = torch.tensor(blocks or [0] * len(names), device=device)[jobs[:, 0]]
    last_block = len(resid_pre) - 1 if resid_pre else -1
    point_ok: dict[int, bool] = {}
    out = base_values.to(device).expand(len(names), n_sites, batch).clone()
    copies = max(1, max_batch // batch)
    plan = _chunks(starts, job_blocks, copies, min_copies=max(1, copies // 4))
    early = torch.tensor(before_last_mlp or [False] * len(names), device=device)
    if bool(early.any()) and not scorer.check_last_mlp(model, base_tokens, base_values):
        early[:] = False
    if progress:
        from tqdm.auto import tqdm

        plan = tqdm(plan, desc="patching", unit="pass")
    pos_dim = layout.index("pos")
    for begin, end, start, block in plan:
        chunk = jobs[begin:end]
        n = chunk.shape[0]
        hooks = []
        skipping = contextlib.nullcontext()
        if block and skip is not None:
            hooks, skipping = skip.hooks(block, n, start), skip.skipping(block)
        for layer_index in chunk[:, 0].unique().tolist():
            name = names[layer_index]
            mask = _site_masks(layout, over, sizes, chunk[:, 1], chunk[:, 0] == layer_index)
            hooks.append((name, _patch_hook(mask, source_acts[name], n, start, pos_dim)))
        chunk_blocks = site_blocks[begin:end].unique().tolist()
        site_block = chunk_blocks[0] if len(chunk_blocks) == 1 else -1
        if point is not None and 0 <= site_block < last_block:
            if site_block not in point_ok:
                point_ok[site_block] = point.check(base_tokens, site_block, base_logits)
            if point_ok[site_block]:
                rows = (site_pos[begin:end] - start).repeat_interleave(batch)
                hooks += point.hooks(site_block, rows, n, start)
        kwargs = {"past_key_values": prefix.cache_for(start, n)} if start and prefix else {}
        last_mlp = bool(early[chunk[:, 0]].all())
        with model.hooks(fwd_hooks=hooks + scorer.hooks(n, start, last_mlp)), skipping:
            logits = model(base_tokens[:, start:].repeat(n, 1), **kwargs)
        values = scorer.values(logits, n, start, base_logits, base_values)
        out[chunk[:, 0], chunk[:, 1]] = values.to(out.dtype)
    return out.reshape(len(names), *sizes, batch)


def _patch_hook(mask: Tensor, source: Tensor, n: int, start: int, pos_dim: int) -> Callable:
    """Overwrite, in each of the `n` stacked copies, the cells `mask` [n, *dims] selects with
    `source` [batch, *dims]; a pass starting at position `start` sees positions >= start."""
    if start:
        length = source.shape[1 + pos_dim] - start
        source = source.narrow(1 + pos_dim, start, length)
        if mask.shape[1 + pos_dim] > 1:
            mask = mask.narrow(1 + pos_dim, start, length)
    mask = mask[:, None]  # broadcast over the batch inside each copy

    def patch(act: Tensor, hook: Any) -> Tensor:
        stacked = act.reshape(n, *source.shape)
        return torch.where(mask, source.to(act.dtype)[None], stacked).reshape(act.shape)

    return patch


# ------------------------------------------------------------------ public API
def patch(
    model: Any,
    task: Any,
    component: Component = "resid_pre",
    over: Sequence[Axis] = ("pos",),
    *,
    metric: Metric = "logit_diff",
    direction: Direction = "denoise",
    normalize: bool = True,
    layers: Sequence[int] | None = None,
    max_batch: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> PatchingResult:
    """Activation patching on a `TaskDataset`, every site of `component` over `over`.

    Args:
        model: a hooked model (TransformerBridge) in eval mode.
        task: a `TaskDataset` (clean/corrupted tokens, answers, answer positions).
        component: which activation: 'resid_pre' | 'resid_mid' | 'resid_post' | 'attn_out' |
            'mlp_out' (dims pos, d_model); 'z' | 'q' | 'k' | 'v' | 'result' (pos, head,
            d_head; k/v have the key-value heads of grouped-query models); 'pattern' (head,
            query pos, key pos); 'mlp_pre' | 'mlp_post' (pos, neuron).
        over: the site grid: any of 'head', 'pos', 'neuron' the component has; () = the
            whole layer.
        metric: 'logit_diff' | 'prob' | 'logprob' | 'kl' | 'accuracy', a `TaskMetric`, or a
            callable `logits [batch, pos, vocab] -> [batch]`.
        direction: 'denoise' (clean -> corrupted) or 'noise' (corrupted -> clean).
        normalize: report values on the 0 = corrupted, 1 = clean scale.
        layers: which blocks (default all).
        max_batch: most rows (prompt copies) per forward pass.
        device: where to run; None = the model's device.
        progress: show a progress bar over forward passes.

    Returns:
        `PatchingResult` with `values` of shape [layer, *over sizes].
    """
    check_task(task)
    device = model_device(model, device)
    task = task.to(device)
    return patch_tokens(
        model,
        task.clean_tokens,
        task.corrupted_tokens,
        bind_metric(model, task, metric),
        component,
        over,
        direction=direction,
        normalize=normalize,
        layers=layers,
        max_batch=max_batch,
        device=device,
        progress=progress,
    )


def patch_tokens(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: TaskMetric | Callable[[Tensor], Tensor],
    component: Component = "resid_pre",
    over: Sequence[Axis] = ("pos",),
    *,
    direction: Direction = "denoise",
    normalize: bool = True,
    layers: Sequence[int] | None = None,
    max_batch: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> PatchingResult:
    """`patch` on explicit token pairs with a metric object or callable (see `patch`)."""
    layout, over = check_grid(component, over, "patching")
    if direction not in DIRECTIONS:
        raise unknown("patching direction", str(direction), DIRECTIONS, show_all=True)
    layers, names = layer_hooks(model, component, layers, max_batch)
    n_layers = model.cfg.n_layers

    device = model_device(model, device)
    clean_tokens, corrupted_tokens, metric, full_width = prepare_tokens(
        clean_tokens, corrupted_tokens, metric, device
    )

    batch = clean_tokens.shape[0]
    scorer = _Scorer(model, metric, batch)
    # the base run's block inputs let passes for later blocks skip the earlier ones
    resid_names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    if not all(name in model.hook_dict for name in resid_names):
        resid_names = []
    # and its block outputs let a site that changes one position run its block's MLP there only
    point_names = [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    usable = all(name in model.hook_dict for name in point_names)
    if component not in _POINT or "pos" not in over or not resid_names or not usable:
        point_names = []
    captured = list(dict.fromkeys(names + resid_names + point_names))
    with torch.inference_mode():
        clean_acts, clean_values, clean_logits = _capture_and_score(
            model, clean_tokens, captured, scorer
        )
        corrupted_acts, corrupted_values, corrupted_logits = _capture_and_score(
            model, corrupted_tokens, captured, scorer
        )
        if direction == "denoise":
            base_tokens, base_acts, source_acts = corrupted_tokens, corrupted_acts, clean_acts
            base_values, base_logits = corrupted_values, corrupted_logits
        else:
            base_tokens, base_acts, source_acts = clean_tokens, clean_acts, corrupted_acts
            base_values, base_logits = clean_values, clean_logits
        per_example = _sweep(
            model,
            base_tokens,
            source_acts,
            base_acts,
            base_values,
            base_logits,
            names,
            layout,
            over,
            scorer,
            max_batch,
            progress,
            blocks=layers if resid_names else None,
            resid_pre=[base_acts[name] for name in resid_names] if resid_names else None,
            before_last_mlp=[
                layer < n_layers - 1 or component not in _AFTER_MLP_IN for layer in layers
            ],
            point=(
                _PointSites(model, [base_acts[name] for name in point_names])
                if point_names
                else None
            ),
        )
    if "pos" in over and clean_tokens.shape[1] < full_width:
        per_example = _pad_positions(per_example, over.index("pos") + 1, full_width, base_values)

    clean = Estimate.of(clean_values)
    corrupted = Estimate.of(corrupted_values)
    values, std, sem = _aggregate(per_example)
    if normalize:
        span = clean.mean - corrupted.mean
        clean.normalized(clean.mean, corrupted.mean)  # raises when the span is 0
        values = (values - corrupted.mean) / span
        std, sem = std / abs(span), sem / abs(span)
    axes = ("layer", *over)
    sizes = per_example.shape[1:-1]
    labels = {"layer": [str(x) for x in layers]}
    for axis, size in zip(over, sizes, strict=True):
        labels[axis] = [str(i) for i in range(size)]
    name = metric.name if isinstance(metric, TaskMetric) else getattr(metric, "__name__", "metric")
    return PatchingResult(
        values=values.float(),
        std=std.float(),
        sem=sem.float(),
        per_example=per_example.cpu(),
        axes=axes,
        labels=labels,
        metric=name,
        component=component,
        direction=direction,  # type: ignore[arg-type]
        normalized=normalize,
        clean=clean,
        corrupted=corrupted,
    )


def check_grid(
    component: str, over: Sequence[str], what: str = "patching"
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The layout of `component`'s activation and `over` as a tuple, or an InterplabError
    naming the unknown component or axis (shared by patching and attribution)."""
    if component not in _LAYOUT:
        raise unknown(f"{what} component", str(component), COMPONENTS, show_all=True)
    layout = _LAYOUT[component]
    over = tuple(over)
    for axis in over:
        if axis not in layout or axis in ("d_model", "d_head", "src_pos"):
            valid = [a for a in layout if a in ("head", "pos", "neuron")]
            raise unknown(f"axis for component {component!r}", str(axis), valid, show_all=True)
    if len(set(over)) != len(over):
        raise InterplabError(f"over={over} repeats an axis; expected each axis at most once.")
    return layout, over


def layer_hooks(
    model: Any, component: str, layers: Sequence[int] | None, max_batch: int
) -> tuple[list[int], list[str]]:
    """The blocks to sweep (default all) and `component`'s hook name in each, checked against
    the model; `max_batch` must be a positive int."""
    if not isinstance(max_batch, int) or max_batch <= 0:
        raise InterplabError(f"max_batch must be a positive int, got {max_batch!r}.")
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    if not layers or any(not 0 <= x < n_layers for x in layers):
        raise InterplabError(f"layers {layers} must be a non-empty list within 0..{n_layers - 1}.")
    names = [_HOOK[component].format(layer=layer) for layer in layers]
    check_hook_names(model, names)
    return layers, names


def _on_device(metric: TaskMetric, device: torch.device) -> TaskMetric:
    return TaskMetric(
        kind=metric.kind,
        answers=metric.answers.to(device),
        wrong_answers=metric.wrong_answers.to(device),
        answer_pos=metric.answer_pos.to(device),
        reference=None if metric.reference is None else metric.reference.to(device),
    )


def bind_metric(model: Any, task: Any, metric: Any) -> TaskMetric | Callable:
    """A metric name bound to `task` (clean logits computed for 'kl'), or `metric` as given."""
    if not isinstance(metric, str):
        return metric
    clean_logits = None
    if metric == "kl":
        # no_grad, not inference_mode: gradient methods (AtP, EAP) differentiate through a
        # KL against these logits, and inference tensors cannot be saved for backward
        with torch.no_grad():
            clean_logits = model(task.clean_tokens)
    return task_metric(metric, task, clean_logits)  # type: ignore[arg-type]


def prepare_tokens(
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: TaskMetric | Callable,
    device: torch.device,
) -> tuple[Tensor, Tensor, TaskMetric | Callable, int]:
    """Tokens on `device`, cut after the last answer position a task metric reads (a causal
    model's later positions cannot reach it); returns (clean, corrupted, metric, full width)."""
    check_pair(clean_tokens, corrupted_tokens)
    clean_tokens, corrupted_tokens = clean_tokens.to(device), corrupted_tokens.to(device)
    full_width = clean_tokens.shape[1]
    if isinstance(metric, TaskMetric):
        if metric.answers.shape[0] != clean_tokens.shape[0]:
            raise InterplabError(
                f"the metric has {metric.answers.shape[0]} examples but there are "
                f"{clean_tokens.shape[0]} prompts."
            )
        metric = _on_device(metric, device)
        width = int(metric.answer_pos.max()) + 1
        clean_tokens, corrupted_tokens = clean_tokens[:, :width], corrupted_tokens[:, :width]
    return clean_tokens, corrupted_tokens, metric, full_width


def _pad_positions(per_example: Tensor, dim: int, width: int, base_values: Tensor) -> Tensor:
    """Extend the position axis to `width` with the unpatched base values."""
    shape = list(per_example.shape)
    missing = width - shape[dim]
    shape[dim] = missing
    fill = base_values.to(per_example).expand(*shape[:-1], shape[-1]) if missing else None
    return per_example if fill is None else torch.cat([per_example, fill.clone()], dim=dim)


def _aggregate(per_example: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, sample std and sem over the last (example) axis. Float64 accumulation keeps a
    site that reproduces a baseline run exactly equal to that baseline's mean."""
    x = per_example.detach().double().cpu()
    n = x.shape[-1]
    mean = x.mean(-1)
    std = x.std(-1) if n > 1 else torch.full_like(mean, math.nan)
    return mean, std, std / math.sqrt(n)


# ------------------------------------------------------------------ named sweeps
def patch_residual(
    model: Any,
    task: Any,
    hook: Literal["resid_pre", "resid_mid", "resid_post"] = "resid_pre",
    **kwargs: Any,
) -> PatchingResult:
    """Residual stream by layer and position: values [layer, pos]."""
    if hook not in ("resid_pre", "resid_mid", "resid_post"):
        raise unknown(
            "residual hook", str(hook), ("resid_pre", "resid_mid", "resid_post"), show_all=True
        )
    return patch(model, task, hook, ("pos",), **kwargs)


def patch_heads(
    model: Any,
    task: Any,
    component: Literal["z", "q", "k", "v", "result", "pattern"] = "z",
    *,
    by_pos: bool = False,
    **kwargs: Any,
) -> PatchingResult:
    """Attention heads: values [layer, head], or [layer, head, pos] with `by_pos` (for
    'pattern', pos is the query position). 'z' patches each head's output."""
    if component not in ("z", "q", "k", "v", "result", "pattern"):
        raise unknown(
            "head component",
            str(component),
            ("z", "q", "k", "v", "result", "pattern"),
            show_all=True,
        )
    return patch(model, task, component, ("head", "pos") if by_pos else ("head",), **kwargs)


def patch_mlp(model: Any, task: Any, **kwargs: Any) -> PatchingResult:
    """MLP outputs by layer and position: values [layer, pos]."""
    return patch(model, task, "mlp_out", ("pos",), **kwargs)


def patch_attn(model: Any, task: Any, **kwargs: Any) -> PatchingResult:
    """Attention-layer outputs by layer and position: values [layer, pos]."""
    return patch(model, task, "attn_out", ("pos",), **kwargs)


def patch_neurons(model: Any, task: Any, *, by_pos: bool = False, **kwargs: Any) -> PatchingResult:
    """MLP neurons (`mlp.hook_post`): values [layer, neuron], or [layer, neuron, pos]."""
    return patch(model, task, "mlp_post", ("neuron", "pos") if by_pos else ("neuron",), **kwargs)
