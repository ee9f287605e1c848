"""Edge attribution: EAP, EAP-IG and exact edge patching scores for every edge at once.

Every method estimates, per edge u -> v and per example, the effect of ablating that one
edge in the clean run: metric(clean, edge u -> v carrying the corrupted/mean output of u)
- metric(clean). Scores are in raw metric units (negative = the edge supports the metric).

  exact        one masked forward per edge (batched): the ground truth the others estimate.
  eap          Edge Attribution Patching (Syed et al. 2023): the first-order estimate
               (ablated_u - clean_u) . d metric / d x_v, with x_v receiver v's input, from
               one clean forward + backward and one corrupted forward, for all edges.
  eap-ig       EAP with integrated gradients (Hanna et al. 2024, "Have faith in
               faithfulness"): the gradient is averaged over m points on a path from the
               corrupted to the clean run, alpha_k = k/m for k = 1..m (m = 1 is EAP).
               'inputs': the input embeddings are interpolated (Sundararajan et al. 2017 IG
               on the embeddings; m + 2 passes). 'activations': each sender layer's outputs
               (the input node, one layer's heads, one MLP) are interpolated in turn while
               the rest runs on the clean prompts, and the gradients from group g's path
               score the edges leaving g (IG on that layer's outputs, so by completeness a
               layer's summed edge scores approach its activation-patching effect);
               (1 + layers * (1 + has_mlp)) * m passes.

All three give `EdgeAttribution`, with per-example scores so each edge carries a
standard error. Gradients come from zero "probe" tensors at every receiver input (see
`interplab.circuits.graph`), so one backward pass gives all receivers' gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.edge_patching import Ablation, EdgeModel, EdgePatcher, GraphRun
from interplab.circuits.graph import PORTS, Circuit, Graph
from interplab.circuits.metrics import Estimate, TaskMetric
from interplab.errors import InterplabError, unknown

IGVariant = Literal["inputs", "activations"]
IG_VARIANTS: tuple[str, ...] = get_args(IGVariant)


# ------------------------------------------------------------------ result
@dataclass
class EdgeAttribution:
    """Per-edge scores: the estimated change of the metric when the edge alone is ablated."""

    graph: Graph
    """The model's edge graph (index convention of every [sender, receiver] tensor)."""
    scores: Float[Tensor, "sender receiver"]
    """Mean score over examples (0 where there is no edge)."""
    std: Float[Tensor, "sender receiver"]
    """Sample standard deviation over examples."""
    sem: Float[Tensor, "sender receiver"]
    """Standard error of the mean."""
    per_example: Float[Tensor, "batch sender receiver"] = field(repr=False)
    """Scores per example."""
    method: str
    """'exact', 'eap' or 'eap-ig-inputs' / 'eap-ig-activations'."""
    metric: str
    """Metric name."""
    ablation: str
    """What an ablated edge carries: 'corrupted' or 'mean'."""
    clean: Estimate
    """The metric on the clean prompts."""
    steps: int | None = None
    """Integrated-gradient steps (EAP-IG only)."""

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The `k` edges with the largest |score|, as (name, score)."""
        index = self.graph.edge_index
        values = self.scores[index[:, 0], index[:, 1]]
        order = values.abs().argsort(descending=True, stable=True)[:k]
        return [(self.graph.edges[i], float(values[i])) for i in order.tolist()]

    def edge_scores(self) -> dict[str, float]:
        """Every edge's mean score by name."""
        index = self.graph.edge_index
        values = self.scores[index[:, 0], index[:, 1]].tolist()
        return dict(zip(self.graph.edges, values, strict=True))

    def circuit(self, top_n: int | None = None, threshold: float | None = None) -> Circuit:
        """The circuit of the `top_n` edges by |score| (or those with |score| >= threshold)."""
        metadata = {"method": self.method, "metric": self.metric, "ablation": self.ablation}
        if self.steps is not None:
            metadata["steps"] = self.steps
        return Circuit.from_scores(
            self.graph, self.scores, top_n=top_n, threshold=threshold, metadata=metadata
        )

    def draw(self, top_n: int = 50, **kwargs: Any) -> Any:
        """Draw the `top_n` highest-|score| edges (see `Circuit.draw`)."""
        return self.circuit(top_n=top_n).draw(**kwargs)


def _result(
    graph: Graph,
    per_example: Tensor,
    method: str,
    patcher: EdgePatcher,
    clean_values: Tensor,
    steps: int | None = None,
) -> EdgeAttribution:
    x = per_example.detach().double().cpu()
    n = x.shape[0]
    std = x.std(0) if n > 1 else torch.full_like(x[0], math.nan)
    return EdgeAttribution(
        graph=graph,
        scores=x.mean(0).float(),
        std=std.float(),
        sem=(std / math.sqrt(n)).float(),
        per_example=per_example.float().cpu(),
        method=method,
        metric=patcher.metric.name,
        ablation=patcher.ablation,
        clean=Estimate.of(clean_values),
        steps=steps,
    )


# ------------------------------------------------------------------ gradients -> scores
def _grad_pass(
    em: EdgeModel,
    patcher: EdgePatcher,
    *,
    copies: int = 1,
    replace: dict[str, Tensor] | None = None,
    record: bool = False,
) -> tuple[dict[int, Tensor], GraphRun, Tensor]:
    """Forward with probes at every receiver and one backward of the summed metric.
    Returns receiver-group gradients summed over copies ([batch, ...]), the run, and the
    metric values [copies, batch]."""
    metric: TaskMetric = patcher.metric
    batch = patcher.batch
    with torch.enable_grad():
        run = em.run(
            patcher.tokens,
            answer_pos=patcher.answer_pos,
            probes=True,
            record=record,
            replace=replace,
            copies=copies,
        )
        values = metric.from_answer_logits(run.logits[:, 0].reshape(copies, batch, -1))
        if not values.requires_grad:
            raise InterplabError(
                f"metric {metric.name!r} is not differentiable; attribution needs a smooth "
                "metric such as 'logit_diff', 'logprob', 'prob' or 'kl'."
            )
        keys = sorted(run.probes)
        grads = torch.autograd.grad(values.sum(), [run.probes[k] for k in keys], allow_unused=True)
    out = {}
    for key, grad in zip(keys, grads, strict=True):
        probe = run.probes[key]
        grad = torch.zeros_like(probe) if grad is None else grad
        out[key] = grad.reshape(copies, batch, *grad.shape[1:]).sum(0)
    return out, run, values.detach()


def _scores_from_grads(
    graph: Graph,
    grads: dict[int, Tensor],
    delta: Float[Tensor, "batch pos sender d_model"],
    answer_pos: Int[Tensor, " batch"],
    senders: slice | None = None,
) -> Float[Tensor, "batch sender receiver"]:
    """score[b, u, v] = sum over positions of delta[b, :, u] . grad_v[b, :] for every edge
    (restricted to senders in `senders` when given)."""
    batch = delta.shape[0]
    lo, hi = (0, graph.n_senders) if senders is None else (senders.start, senders.stop)
    out = torch.zeros(batch, graph.n_senders, graph.n_receivers, device=delta.device)
    for layer in range(graph.n_layers):
        first = graph.head_receiver(layer, 0, "q")
        up = min(graph.attn_upstream(layer), hi)
        if up > lo:
            ports = torch.cat([grads[graph.head_receiver(layer, 0, p)] for p in PORTS], dim=2)
            block = torch.einsum("bpsd,bprd->bsr", delta[:, :, lo:up], ports)
            out[:, lo:up, first : first + graph.n_attn_receivers] = block
        if graph.has_mlp:
            receiver = graph.mlp_receiver(layer)
            up = min(graph.mlp_upstream(layer), hi)
            if up > lo:
                block = torch.einsum("bpsd,bpd->bs", delta[:, :, lo:up], grads[receiver])
                out[:, lo:up, receiver] = block
    rows = torch.arange(batch, device=delta.device)
    at_answer = delta[rows, answer_pos.to(delta.device)]  # [batch, sender, d]
    receiver = graph.logits_receiver
    out[:, lo:hi, receiver] = torch.einsum(
        "bsd,bd->bs", at_answer[:, lo:hi], grads[receiver].reshape(batch, -1)
    )
    return out


def _ablated_minus(patcher: EdgePatcher, clean: Tensor) -> Tensor:
    """ablated_u - clean_u for every sender, [batch, pos, sender, d]."""
    return patcher.ablated.to(clean) - clean


# ------------------------------------------------------------------ public API
def eap(
    model: Any,
    task: Any,
    *,
    metric: Any = "logit_diff",
    ablation: Ablation = "corrupted",
    reference: Int[Tensor, "n_ref pos"] | None = None,
    device: str | torch.device | None = None,
) -> EdgeAttribution:
    """Edge Attribution Patching (Syed et al. 2023) of every edge of the model's graph.

    score(u -> v) = (ablated_u - clean_u) . d metric / d x_v at the clean run, summed over
    positions, per example: one corrupted forward (the ablated sender outputs) and one clean
    forward + backward.

    Args:
        model: a hooked model (TransformerBridge).
        task: a `TaskDataset` (clean/corrupted prompts, answers, answer positions).
        metric: a differentiable metric name ('logit_diff', 'logprob', 'prob', 'kl') or a
            `TaskMetric`. With 'kl' every EAP score is ~0 (KL has zero gradient at the clean
            run); use `eap_ig` for KL.
        ablation: what an ablated edge carries: the sender's output on the corrupted prompts,
            or its per-position mean over `reference` (default: the corrupted prompts).
        reference: prompts for 'mean' ablation.
        device: where to run; None = the model's device.

    Returns:
        `EdgeAttribution` with scores [sender, receiver] and per-example scores.
    """
    patcher = EdgePatcher(
        model, task, metric=metric, ablation=ablation, reference=reference, device=device
    )
    grads, run, values = _grad_pass(patcher.em, patcher, record=True)
    assert run.outputs is not None
    delta = _ablated_minus(patcher, run.outputs)
    with torch.no_grad():
        per_example = _scores_from_grads(patcher.graph, grads, delta, patcher.answer_pos)
    return _result(patcher.graph, per_example, "eap", patcher, values[0])


def eap_ig(
    model: Any,
    task: Any,
    *,
    steps: int = 8,
    variant: IGVariant = "inputs",
    metric: Any = "logit_diff",
    ablation: Ablation = "corrupted",
    reference: Int[Tensor, "n_ref pos"] | None = None,
    max_batch: int = 256,
    device: str | torch.device | None = None,
) -> EdgeAttribution:
    """EAP with integrated gradients (Hanna et al. 2024) of every edge.

    score(u -> v) = (ablated_u - clean_u) . (1/m) sum_{k=1..m} d metric / d x_v at
    alpha_k = k/m on the path from the ablated run (alpha = 0) to the clean run (alpha = 1).

    Args:
        steps: m, the number of points on the path (m = 1 reproduces EAP exactly).
        variant: 'inputs' interpolates the input embeddings (cost: m forward+backward rows
            per example plus two plain forwards); 'activations' interpolates the outputs
            of each sender layer in turn (cost: m per sender layer).
        max_batch: most rows (prompt copies) per forward pass; the m path points of a
            batch run as stacked copies.
        Other arguments as in `eap`.

    Returns:
        `EdgeAttribution` (method 'eap-ig-inputs' or 'eap-ig-activations').
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise InterplabError(f"steps must be a positive int, got {steps!r}.")
    if variant not in IG_VARIANTS:
        raise unknown("EAP-IG variant", str(variant), IG_VARIANTS, show_all=True)
    patcher = EdgePatcher(
        model,
        task,
        metric=metric,
        ablation=ablation,
        reference=reference,
        max_batch=max_batch,
        device=device,
    )
    em, graph = patcher.em, patcher.graph
    keep = _group_hooks(graph) if variant == "activations" else []
    with torch.no_grad():
        clean_run = em.run(patcher.tokens, answer_pos=patcher.answer_pos, record=True, keep=keep)
    assert clean_run.outputs is not None
    clean_values = patcher.metric.from_answer_logits(clean_run.logits[:, 0])
    delta = _ablated_minus(patcher, clean_run.outputs)
    alphas = torch.arange(1, steps + 1, dtype=torch.float32) / steps
    per_example = torch.zeros(
        patcher.batch, graph.n_senders, graph.n_receivers, device=delta.device
    )
    if variant == "inputs":
        clean_in = clean_run.outputs[:, :, 0]
        ablated_in = patcher.ablated[:, :, 0].to(clean_in).expand_as(clean_in)
        grads = _path_grads(
            patcher, alphas, {"blocks.0.hook_resid_pre": (ablated_in, clean_in)}, max_batch
        )
        with torch.no_grad():
            per_example = _scores_from_grads(graph, grads, delta, patcher.answer_pos) / steps
    else:
        ablated_acts = _ablated_group_acts(patcher, keep)
        for hook, senders in zip(keep, _group_senders(graph), strict=True):
            ends = {
                hook: (ablated_acts[hook].expand_as(clean_run.acts[hook]), clean_run.acts[hook])
            }
            grads = _path_grads(patcher, alphas, ends, max_batch)
            with torch.no_grad():
                per_example += (
                    _scores_from_grads(graph, grads, delta, patcher.answer_pos, senders) / steps
                )
    return _result(graph, per_example, f"eap-ig-{variant}", patcher, clean_values, steps)


def _path_grads(
    patcher: EdgePatcher,
    alphas: Tensor,
    ends: dict[str, tuple[Tensor, Tensor]],
    max_batch: int,
) -> dict[int, Tensor]:
    """Receiver gradients summed over the path points `alphas`, where each hook in `ends`
    is replaced by ablated + alpha * (clean - ablated); points run as stacked copies."""
    per = max(1, max_batch // patcher.batch)
    total: dict[int, Tensor] = {}
    for start in range(0, len(alphas), per):
        chunk = alphas[start : start + per]
        replace = {}
        for hook, (ablated, clean) in ends.items():
            a = chunk.to(clean).reshape(-1, *([1] * clean.ndim))
            path = ablated[None] + a * (clean - ablated)[None]  # [copies, batch, ...]
            replace[hook] = path.reshape(-1, *clean.shape[1:])
        grads, _, _ = _grad_pass(patcher.em, patcher, copies=len(chunk), replace=replace)
        for key, grad in grads.items():
            total[key] = total[key] + grad if key in total else grad
    return total


def _group_hooks(graph: Graph) -> list[str]:
    """The hook whose value is each sender layer's output: the input, heads' z, MLP out."""
    hooks = ["blocks.0.hook_resid_pre"]
    for layer in range(graph.n_layers):
        hooks.append(f"blocks.{layer}.attn.hook_z")
        if graph.has_mlp:
            hooks.append(f"blocks.{layer}.hook_mlp_out")
    return hooks


def _group_senders(graph: Graph) -> list[slice]:
    """The senders each `_group_hooks` entry produces."""
    groups = [slice(0, 1)]
    for layer in range(graph.n_layers):
        first = graph.head_sender(layer, 0)
        groups.append(slice(first, first + graph.n_heads))
        if graph.has_mlp:
            groups.append(slice(graph.mlp_sender(layer), graph.mlp_sender(layer) + 1))
    return groups


def _ablated_group_acts(patcher: EdgePatcher, hooks: Sequence[str]) -> dict[str, Tensor]:
    """The group hooks' activations on the ablated side: the corrupted run, or the
    per-position mean over the reference prompts (z -> z @ W_O is linear, so the mean z
    gives the mean head output)."""
    tokens = patcher.corrupted_tokens if patcher.reference is None else patcher.reference
    with torch.no_grad():
        run = patcher.em.run(tokens, keep=hooks)
    if patcher.ablation == "mean":
        return {name: act.mean(0, keepdim=True) for name, act in run.acts.items()}
    return run.acts


def exact_edge_scores(
    model: Any,
    task: Any,
    *,
    metric: Any = "logit_diff",
    ablation: Ablation = "corrupted",
    reference: Int[Tensor, "n_ref pos"] | None = None,
    max_batch: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> EdgeAttribution:
    """Exact single-edge patching: for every edge, the metric with that edge alone ablated,
    minus the clean metric (one masked copy per edge, batched). The reference EAP and EAP-IG
    approximate; costs about n_edges forward rows per example."""
    patcher = EdgePatcher(
        model,
        task,
        metric=metric,
        ablation=ablation,
        reference=reference,
        max_batch=max_batch,
        device=device,
    )
    graph = patcher.graph
    index = graph.edge_index
    full = graph.full_mask()
    per = max(1, max_batch // patcher.batch)
    clean = patcher.values(full[None])[0]  # full precision (Estimate keeps float32)
    per_example = torch.zeros(patcher.batch, graph.n_senders, graph.n_receivers, dtype=clean.dtype)
    starts = range(0, len(index), per)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="edges", unit="pass")
    for start in starts:
        chunk = index[start : start + per]
        masks = full.repeat(len(chunk), 1, 1)
        masks[torch.arange(len(chunk)), chunk[:, 0], chunk[:, 1]] = 0.0
        values = patcher.values(masks)  # [edges, batch]
        per_example[:, chunk[:, 0], chunk[:, 1]] = (values - clean[None]).T
    return _result(graph, per_example, "exact", patcher, clean)
