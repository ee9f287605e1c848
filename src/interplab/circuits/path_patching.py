"""Path patching: the effect of one component on the metric along chosen paths only.

Activation patching (`patching.py`) replaces a component's output and lets the change flow
everywhere downstream. Path patching (Wang et al. 2022, "Interpretability in the Wild", the
IOI paper; Goldowsky-Dill et al. 2023) lets it reach the metric only through chosen
*receivers*: for each *sender* h and receiver set R,

  1. run the base prompts with the sender's output set to its source value (the corrupted
     run's, in the default 'noise' direction) and every other attention head's output
     frozen at its base value; MLP outputs are frozen too (`via='direct'`) or recomputed
     (`via='mlps'`, so the sender's change also reaches R through MLPs, never through another
     head). Record the receivers' chosen inputs;
  2. run the base prompts again with only the receivers' inputs replaced by those records,
     everything else computed normally, and read the metric.

With `via='direct'` a receiver head's input is exactly

    x_R = x_base - out_base(h) + out_source(h)           (residual stream entering R's layer)

passed through R's own LayerNorm (its scale recomputed) and projection, because every other
term of the residual sum is frozen at its base value.

What is frozen in step 1: the output (`attn.hook_z`) of every head other than the sender, in
every layer, and with `via='direct'` every MLP output (`hook_mlp_out`) other than a sender's.
The embeddings are the base run's unless the sender is 'embed'. Receiver heads are frozen
in step 1 like every head (an MLP receiver too with `via='direct'`), so a receiver's own
output does not carry the sender's change on to a later receiver.

Senders: attention heads (`Head(layer, head)`, `(layer, head)`, 'L1H2'), a whole attention
layer ('L1.attn'), an MLP layer ('L1.mlp') and the embeddings ('embed': the residual stream
entering block 0). Receivers: heads (their q, k, v input, or all three with 'resid'), whole
attention layers (all their heads), MLP layers (the MLP's input: its output is recomputed
from the patched residual stream through ln2) and 'logits' (the final residual stream,
recomputed through the final LayerNorm and the unembedding). For a 'logits' receiver the
sender's path contribution `x_R - x_base` is added to the final residual stream of step 2,
so it combines with other receivers' effects.

Batching: step 1 and step 2 each run many senders' patched copies of the prompts in one
forward pass (copy c holds sender c), `max_batch` rows per pass; step 1 stops after the last
receiver's layer. Senders with no path to any receiver (a head at or after a receiver head's
layer) report the base value without a forward pass. With only a 'logits' receiver, step 2
would recompute step 1's final residual stream exactly, so step 1's logits are scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.ablation import Head, LayerOutput, parse_target
from interplab.circuits.metrics import (
    Estimate,
    TaskMetric,
    check_task,
    model_device,
)
from interplab.circuits.patching import (
    DIRECTIONS,
    Direction,
    Metric,
    PatchingResult,
    _aggregate,
    _capture_and_score,
    _Scorer,
    bind_metric,
    prepare_tokens,
)
from interplab.errors import InterplabError, unknown
from interplab.models.hooks import check_hook_names

Via = Literal["direct", "mlps"]
ReceiverInput = Literal["q", "k", "v", "resid"]
VIAS: tuple[str, ...] = get_args(Via)
RECEIVER_INPUTS: tuple[str, ...] = get_args(ReceiverInput)
NodeKind = Literal["head", "attn", "mlp", "embed", "logits"]


@dataclass(frozen=True)
class PathNode:
    """One end of a path: a head, a whole attention layer, an MLP layer, the embeddings or
    the logits (the final residual stream)."""

    kind: NodeKind
    """'head' | 'attn' | 'mlp' | 'embed' | 'logits'."""
    layer: int = -1
    """Block index (-1 for 'embed' and 'logits')."""
    head: int = -1
    """Head index for 'head', else -1."""

    @property
    def label(self) -> str:
        if self.kind == "head":
            return f"L{self.layer}H{self.head}"
        if self.kind in ("attn", "mlp"):
            return f"L{self.layer}.{self.kind}"
        return self.kind

    def writes_at(self) -> tuple[int, int]:
        """Where the node writes into the residual stream: (layer, 0) attention, (layer, 1)
        MLP; the embeddings come before everything."""
        if self.kind == "embed":
            return (-1, 1)
        return (self.layer, 1 if self.kind == "mlp" else 0)

    def reads_at(self, n_layers: int) -> tuple[int, int]:
        """Where the node reads the residual stream (a sender writing strictly before this
        point has a path to it): heads read resid_pre, MLPs resid_mid, logits the end."""
        if self.kind == "logits":
            return (n_layers, 0)
        return (self.layer, 1 if self.kind == "mlp" else 0)


Node = PathNode | Head | LayerOutput | tuple[int, int] | str


# ------------------------------------------------------------------ result
@dataclass
class PathPatchingResult(PatchingResult):
    """Path patching effects per sender (values [layer, head] when the senders are all heads,
    else [sender]), with per-example values and error bars, like `PatchingResult`."""

    senders: list[str]
    """Sender labels, in the order of the flattened `values`."""
    receivers: list[str]
    """Receiver labels."""
    receiver_input: ReceiverInput
    """Which input of the receiver heads was recomputed ('resid' = q, k and v)."""
    via: Via
    """'direct' (only the direct path) or 'mlps' (also through MLPs, never other heads)."""

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """Heatmap of `values` (see `PatchingResult.plot`)."""
        receivers = ", ".join(self.receivers)
        default = f"path patching -> {receivers} ({self.receiver_input}, via {self.via})"
        return super().plot(ax=ax, title=title or default)


# ------------------------------------------------------------------ parsing
def parse_node(spec: Node, model: Any, role: Literal["sender", "receiver"]) -> PathNode:
    """A `PathNode` from `Head`, `LayerOutput`, `(layer, head)`, 'L1H2', 'L1.attn', 'L1.mlp',
    'embed' (senders) or 'logits' (receivers); checks ranges against the model."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    node: PathNode | None = None
    if isinstance(spec, PathNode):
        node = spec
    elif isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(x, int) for x in spec):
        node = PathNode("head", spec[0], spec[1])
    elif isinstance(spec, str) and spec in ("embed", "logits"):
        node = PathNode(spec)  # type: ignore[arg-type]
    elif isinstance(spec, str | Head | LayerOutput):
        target = parse_target(spec)
        if isinstance(target, Head):
            node = PathNode("head", target.layer, target.head)
        elif isinstance(target, LayerOutput):
            node = PathNode(target.part, target.layer)
    if node is None:
        raise InterplabError(
            f"cannot use {spec!r} as a path {role}; expected Head(layer, head), (layer, head), "
            "'L1H2', 'L1.attn', 'L1.mlp', " + ("'embed'." if role == "sender" else "'logits'.")
        )
    if role == "sender" and node.kind == "logits":
        raise InterplabError("'logits' cannot be a sender; it is the end of every path.")
    if role == "receiver" and node.kind == "embed":
        raise InterplabError("'embed' cannot be a receiver; it is the start of every path.")
    if node.kind in ("head", "attn", "mlp") and not 0 <= node.layer < n_layers:
        raise InterplabError(
            f"path {role} {node.label} has layer {node.layer}; this model has layers "
            f"0..{n_layers - 1}."
        )
    if node.kind == "head" and not 0 <= node.head < n_heads:
        raise InterplabError(
            f"path {role} {node.label} has head {node.head}; this model has heads 0..{n_heads - 1}."
        )
    if node.kind == "mlp" and f"blocks.{node.layer}.hook_mlp_out" not in model.hook_dict:
        raise InterplabError(
            f"path {role} {node.label} is an MLP, but this model has no MLP in block "
            f"{node.layer} (attention-only)."
        )
    return node


# ------------------------------------------------------------------ public API
def path_patch(
    model: Any,
    task: Any,
    senders: Sequence[Node] | Literal["heads"] | None = None,
    receivers: Sequence[Node] | Node = "logits",
    receiver_input: ReceiverInput = "resid",
    via: Via = "direct",
    *,
    metric: Metric = "logit_diff",
    direction: Direction = "noise",
    normalize: bool = True,
    max_batch: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> PathPatchingResult:
    """Path patching on a `TaskDataset` (Wang et al. 2022): each sender's effect on the metric
    through `receivers` only (see the module docstring for what is frozen).

    Args:
        model: a hooked model (TransformerBridge) in eval mode.
        task: a `TaskDataset` (clean/corrupted tokens, answers, answer positions).
        senders: None or 'heads' = every attention head (values [layer, head]); else a list
            of `Head`, `(layer, head)`, 'L1H2', 'L1.attn', 'L1.mlp', 'embed' (values [sender]).
        receivers: heads, 'L1.attn' (all its heads), 'L1.mlp', or 'logits'.
        receiver_input: the receiver heads' input that is recomputed: 'q', 'k', 'v', or
            'resid' (all three); MLP and logits receivers take 'resid' only. In grouped-query
            models a k/v receiver is the key/value head its query head reads, shared by its
            group.
        via: 'direct' (MLPs frozen) or 'mlps' (the sender's change may pass through MLPs).
        metric: 'logit_diff' | 'prob' | 'logprob' | 'kl' | 'accuracy', a `TaskMetric`, or a
            callable `logits [batch, pos, vocab] -> [batch]`.
        direction: 'noise' (base = clean, sender set to its corrupted value; Wang et al.)
            or 'denoise' (base = corrupted, sender set to its clean value).
        normalize: report values on the 0 = corrupted, 1 = clean scale.
        max_batch: most rows (prompt copies) per forward pass.
        device: where to run; None = the model's device.
        progress: show a progress bar over forward passes.

    Returns:
        `PathPatchingResult`: values [layer, head] (all heads) or [sender], per-example raw
        metric values [..., batch], std and sem.
    """
    check_task(task)
    device = model_device(model, device)
    task = task.to(device)
    return path_patch_tokens(
        model,
        task.clean_tokens,
        task.corrupted_tokens,
        bind_metric(model, task, metric),
        senders,
        receivers,
        receiver_input,
        via,
        direction=direction,
        normalize=normalize,
        max_batch=max_batch,
        device=device,
        progress=progress,
    )


def path_patch_tokens(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: TaskMetric | Callable[[Tensor], Tensor],
    senders: Sequence[Node] | Literal["heads"] | None = None,
    receivers: Sequence[Node] | Node = "logits",
    receiver_input: ReceiverInput = "resid",
    via: Via = "direct",
    *,
    direction: Direction = "noise",
    normalize: bool = True,
    max_batch: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> PathPatchingResult:
    """`path_patch` on explicit token pairs with a metric object or callable."""
    if via not in VIAS:
        raise unknown("path patching via", str(via), VIAS, show_all=True)
    if receiver_input not in RECEIVER_INPUTS:
        raise unknown("receiver input", str(receiver_input), RECEIVER_INPUTS, show_all=True)
    if direction not in DIRECTIONS:
        raise unknown("patching direction", str(direction), DIRECTIONS, show_all=True)
    if not isinstance(max_batch, int) or max_batch <= 0:
        raise InterplabError(f"max_batch must be a positive int, got {max_batch!r}.")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    grid = senders is None or (isinstance(senders, str) and senders == "heads")
    if grid:
        sender_nodes = [
            PathNode("head", layer, h) for layer in range(n_layers) for h in range(n_heads)
        ]
    elif isinstance(senders, str | PathNode | Head | LayerOutput | tuple):
        raise InterplabError(
            f"senders must be None, 'heads' or a list of senders, got {senders!r}; wrap a "
            "single sender in a list."
        )
    else:
        sender_nodes = [parse_node(s, model, "sender") for s in senders]  # type: ignore[union-attr]
    if not sender_nodes:
        raise InterplabError(
            "no senders given; expected e.g. ['L0H1', 'embed'] or None (all heads)."
        )
    if isinstance(receivers, str | PathNode | Head | LayerOutput | tuple):
        receivers = [receivers]  # type: ignore[list-item]
    receiver_nodes = [parse_node(r, model, "receiver") for r in receivers]  # type: ignore[union-attr]
    if not receiver_nodes:
        raise InterplabError("no receivers given; expected e.g. 'logits' or ['L2H3'].")
    targets = _Receivers(model, receiver_nodes, receiver_input)

    device = model_device(model, device)
    clean_tokens, corrupted_tokens, metric, _ = prepare_tokens(
        clean_tokens, corrupted_tokens, metric, device
    )
    batch = clean_tokens.shape[0]
    has_mlp = all(f"blocks.{i}.hook_mlp_out" in model.hook_dict for i in range(n_layers))
    names = [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]
    if has_mlp:
        names += [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)]
    names += ["blocks.0.hook_resid_pre", _final_resid(model)]
    check_hook_names(model, names + targets.hook_names())

    scorer = _Scorer(model, metric, batch)
    with torch.inference_mode():
        clean_acts, clean_values, _ = _capture_and_score(model, clean_tokens, names, scorer)
        corrupted_acts, corrupted_values, _ = _capture_and_score(
            model, corrupted_tokens, names, scorer
        )
        if direction == "noise":
            base_tokens, base_acts, source_acts = clean_tokens, clean_acts, corrupted_acts
            base_values = clean_values
        else:
            base_tokens, base_acts, source_acts = corrupted_tokens, corrupted_acts, clean_acts
            base_values = corrupted_values
        run = _PathRun(model, base_tokens, base_acts, source_acts, targets, via, has_mlp, scorer)
        reach = [
            any(s.writes_at() < r.reads_at(n_layers) for r in receiver_nodes) for s in sender_nodes
        ]
        jobs = [i for i, ok in enumerate(reach) if ok]
        out = base_values.to(device).expand(len(sender_nodes), batch).clone()
        copies = max(1, max_batch // batch)
        chunks = [jobs[i : i + copies] for i in range(0, len(jobs), copies)]
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="path patching", unit="chunk")
        for chunk in chunks:
            values = run.values([sender_nodes[i] for i in chunk])
            out[chunk] = values.to(out.dtype)

    clean, corrupted = Estimate.of(clean_values), Estimate.of(corrupted_values)
    per_example = out.reshape(n_layers, n_heads, batch) if grid else out
    values, std, sem = _aggregate(per_example)
    if normalize:
        span = clean.mean - corrupted.mean
        clean.normalized(clean.mean, corrupted.mean)  # raises when the span is 0
        values = (values - corrupted.mean) / span
        std, sem = std / abs(span), sem / abs(span)
    if grid:
        axes: tuple[str, ...] = ("layer", "head")
        labels = {
            "layer": [str(x) for x in range(n_layers)],
            "head": [str(x) for x in range(n_heads)],
        }
    else:
        axes = ("sender",)
        labels = {"sender": [s.label for s in sender_nodes]}
    name = metric.name if isinstance(metric, TaskMetric) else getattr(metric, "__name__", "metric")
    return PathPatchingResult(
        values=values.float(),
        std=std.float(),
        sem=sem.float(),
        per_example=per_example.cpu(),
        axes=axes,
        labels=labels,
        metric=name,
        component="path",
        direction=direction,  # type: ignore[arg-type]
        normalized=normalize,
        clean=clean,
        corrupted=corrupted,
        senders=[s.label for s in sender_nodes],
        receivers=[r.label for r in receiver_nodes],
        receiver_input=receiver_input,
        via=via,
    )


# ------------------------------------------------------------------ internals
def _final_resid(model: Any) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


class _Receivers:
    """The receivers grouped by hook point: which heads read a patched q/k/v in each layer,
    which MLPs are recomputed, and whether the final residual stream is a receiver."""

    def __init__(self, model: Any, nodes: list[PathNode], receiver_input: ReceiverInput) -> None:
        cfg = model.cfg
        self.n_layers = cfg.n_layers
        self.final = _final_resid(model)
        n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        group = cfg.n_heads // n_kv
        self.inputs = ("q", "k", "v") if receiver_input == "resid" else (receiver_input,)
        heads: dict[int, set[int]] = {}
        self.mlps: set[int] = set()
        self.logits = False
        for node in nodes:
            if node.kind in ("mlp", "logits") and receiver_input != "resid":
                raise InterplabError(
                    f"receiver {node.label} takes receiver_input='resid' (its whole input); "
                    f"{receiver_input!r} applies to attention-head receivers only."
                )
            if node.kind == "head":
                heads.setdefault(node.layer, set()).add(node.head)
            elif node.kind == "attn":
                heads.setdefault(node.layer, set()).update(range(cfg.n_heads))
            elif node.kind == "mlp":
                self.mlps.add(node.layer)
            else:
                self.logits = True
        # per (layer, input): which heads of the hook's head axis are replaced
        self.head_masks: dict[tuple[int, str], Tensor] = {}
        for layer, chosen in heads.items():
            for name in self.inputs:
                size = cfg.n_heads if name == "q" else n_kv
                mask = torch.zeros(size, dtype=torch.bool)
                # grouped-query attention: query head h reads key/value head h // group
                mask[[h if name == "q" else h // group for h in chosen]] = True
                self.head_masks[(layer, name)] = mask
        reads = [n.reads_at(self.n_layers) for n in nodes]
        self.last_block = max(layer for layer, _ in reads)  # blocks step 1 must run

    def hook_names(self) -> list[str]:
        names = [f"blocks.{layer}.attn.hook_{name}" for layer, name in self.head_masks]
        return names + [f"blocks.{layer}.hook_mlp_out" for layer in self.mlps]

    @property
    def only_logits(self) -> bool:
        return self.logits and not self.head_masks and not self.mlps


class _PathRun:
    """Step 1 (senders patched, everything else frozen; record receivers' inputs) and step 2
    (receivers' inputs replaced) for a chunk of senders, one copy of the batch per sender."""

    def __init__(
        self,
        model: Any,
        base_tokens: Tensor,
        base_acts: dict[str, Tensor],
        source_acts: dict[str, Tensor],
        targets: _Receivers,
        via: Via,
        has_mlp: bool,
        scorer: _Scorer,
    ) -> None:
        self.model = model
        self.tokens = base_tokens
        self.base = base_acts
        self.source = source_acts
        self.targets = targets
        self.via = via
        self.has_mlp = has_mlp
        self.scorer = scorer
        self.n_layers = model.cfg.n_layers
        self.n_heads = model.cfg.n_heads

    def values(self, senders: list[PathNode]) -> Float[Tensor, "copies batch"]:
        n = len(senders)
        device = self.tokens.device
        z_mask = torch.zeros(n, self.n_layers, self.n_heads, dtype=torch.bool, device=device)
        mlp_mask = torch.zeros(n, self.n_layers, dtype=torch.bool, device=device)
        embed_mask = torch.zeros(n, dtype=torch.bool, device=device)
        for c, node in enumerate(senders):
            if node.kind == "head":
                z_mask[c, node.layer, node.head] = True
            elif node.kind == "attn":
                z_mask[c, node.layer] = True
            elif node.kind == "mlp":
                mlp_mask[c, node.layer] = True
            else:
                embed_mask[c] = True
        records: dict[str, Tensor] = {}
        hooks = self._sender_hooks(n, z_mask, mlp_mask, embed_mask, records)
        tokens = self.tokens.repeat(n, 1)
        if self.targets.only_logits:
            # step 2 would rebuild exactly step 1's final residual stream: score step 1
            with self.model.hooks(fwd_hooks=hooks + self.scorer.hooks(n)):
                logits = self.model(tokens)
            return self.scorer.values(logits, n)
        stop = self.targets.last_block + 1
        kwargs = {"stop_at_layer": stop} if stop < self.n_layers else {}
        with self.model.hooks(fwd_hooks=hooks):
            self.model(tokens, **kwargs)
        with self.model.hooks(fwd_hooks=self._receiver_hooks(n, records) + self.scorer.hooks(n)):
            logits = self.model(tokens)
        return self.scorer.values(logits, n)

    # --- step 1
    def _sender_hooks(
        self,
        n: int,
        z_mask: Tensor,
        mlp_mask: Tensor,
        embed_mask: Tensor,
        records: dict[str, Tensor],
    ) -> list[tuple[str, Callable]]:
        targets = self.targets
        hooks: list[tuple[str, Callable]] = []
        for layer in range(min(targets.last_block + 1, self.n_layers)):
            name = f"blocks.{layer}.attn.hook_z"
            mask = z_mask[:, layer][:, None, None, :, None]  # [copy, 1, 1, head, 1]
            hooks.append((name, _frozen(mask, self.source[name], self.base[name], n)))
            if self.has_mlp:
                name = f"blocks.{layer}.hook_mlp_out"
                record = name if layer in targets.mlps else None
                if self.via == "direct" or record or bool(mlp_mask[:, layer].any()):
                    mask = mlp_mask[:, layer][:, None, None, None]  # [copy, 1, 1, 1]
                    freeze = self.via == "direct"
                    hooks.append(
                        (
                            name,
                            _mlp_hook(
                                mask, self.source[name], self.base[name], n, freeze, record, records
                            ),
                        )
                    )
        if bool(embed_mask.any()):
            name = "blocks.0.hook_resid_pre"
            mask = embed_mask[:, None, None, None]
            hooks.append((name, _replace(mask, self.source[name], n)))
        for layer, input_name in targets.head_masks:
            name = f"blocks.{layer}.attn.hook_{input_name}"
            hooks.append((name, _recorder(records, name)))
        if targets.logits:
            hooks.append((targets.final, _recorder(records, targets.final)))
        return hooks

    # --- step 2
    def _receiver_hooks(self, n: int, records: dict[str, Tensor]) -> list[tuple[str, Callable]]:
        targets = self.targets
        hooks: list[tuple[str, Callable]] = []
        for (layer, input_name), mask in targets.head_masks.items():
            name = f"blocks.{layer}.attn.hook_{input_name}"
            hooks.append((name, _heads_from(records[name], mask.to(self.tokens.device))))
        for layer in targets.mlps:
            name = f"blocks.{layer}.hook_mlp_out"
            hooks.append((name, _overwrite(records[name])))
        if targets.logits:
            delta = records[targets.final] - self.base[targets.final].repeat(n, 1, 1)
            hooks.append((targets.final, _add(delta)))
        return hooks


def _frozen(mask: Tensor, source: Tensor, base: Tensor, n: int) -> Callable:
    """Head outputs: the source value where `mask` selects (the sender), the base value
    everywhere else, whatever the copy computed (the freeze)."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        out = torch.where(mask, source[None], base[None]).expand(n, *base.shape)
        return out.reshape(act.shape).to(act.dtype)

    return hook


def _mlp_hook(
    mask: Tensor,
    source: Tensor,
    base: Tensor,
    n: int,
    freeze: bool,
    record: str | None,
    records: dict[str, Tensor],
) -> Callable:
    """An MLP output in step 1: recorded first when it is a receiver (computed from the
    patched residual stream), then the sender's source value, and elsewhere the base value
    ('direct') or what the copy computed ('mlps')."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        if record is not None:
            records[record] = act.detach().clone()
        computed = act.reshape(n, *base.shape)
        other = base[None].expand_as(computed) if freeze else computed
        return torch.where(mask, source[None], other).reshape(act.shape).to(act.dtype)

    return hook


def _replace(mask: Tensor, source: Tensor, n: int) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        computed = act.reshape(n, *source.shape)
        return torch.where(mask, source[None], computed).reshape(act.shape).to(act.dtype)

    return hook


def _recorder(records: dict[str, Tensor], name: str) -> Callable:
    # keyed by the requested name: bridge hook points fire under their canonical names
    def hook(act: Tensor, hook: Any) -> None:
        records[name] = act.detach().clone()

    return hook


def _heads_from(recorded: Tensor, mask: Tensor) -> Callable:
    """q/k/v of the receiver heads (`mask` over the head axis) from step 1's record."""
    mask = mask[None, None, :, None]  # [1, 1, head, 1] over [rows, pos, head, d_head]

    def hook(act: Tensor, hook: Any) -> Tensor:
        return torch.where(mask, recorded.to(act.dtype), act)

    return hook


def _overwrite(recorded: Tensor) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        return recorded.to(act.dtype)

    return hook


def _add(delta: Tensor) -> Callable:
    def hook(act: Tensor, hook: Any) -> Tensor:
        return act + delta.to(act.dtype)

    return hook
