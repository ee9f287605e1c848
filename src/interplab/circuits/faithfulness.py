"""How well a circuit explains a behaviour: faithfulness, completeness and minimality.

All three run the model with exact edge patching (`interplab.circuits.graph`): edges outside
the kept set carry the corrupted run's (or the mean) sender outputs. On the scale where 0
is the model with every edge ablated and 1 the clean model:

  faithfulness   the metric with only the circuit's edges kept (Wang et al. 2022; Hanna et
                 al. 2024 normalise the same way): near 1 = the circuit alone reproduces the
                 behaviour.
  completeness   the metric with only the complement kept (every edge not in the circuit):
                 near 0 = nothing outside the circuit can do the task on its own (Wang et
                 al. 2022 test completeness by knocking out the circuit).
  minimality     for each edge e of the circuit, faithfulness(C) - faithfulness(C - e): every
                 edge is needed when each of these is > 0.

Per-example values share the aggregate normalisation, so each estimate carries a standard
error (`Estimate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.edge_patching import Ablation, EdgePatcher
from interplab.circuits.graph import Circuit
from interplab.circuits.metrics import Estimate
from interplab.errors import InterplabError


@dataclass
class Faithfulness:
    """Faithfulness, completeness and minimality of one circuit on one task."""

    faithfulness: Estimate
    """Normalised metric with only the circuit kept (0 = all ablated, 1 = clean)."""
    completeness: Estimate
    """Normalised metric with only the complement kept (0 = the complement alone does
    nothing)."""
    circuit: Estimate
    """Raw metric with only the circuit kept."""
    complement: Estimate
    """Raw metric with only the complement kept."""
    clean: Estimate
    """Raw metric of the full model."""
    empty: Estimate
    """Raw metric with every edge ablated."""
    edges: list[str]
    """The circuit's edges (order of `edge_drops`)."""
    edge_drops: Float[Tensor, " edge"] | None = field(default=None, repr=False)
    """faithfulness(C) - faithfulness(C without edge), per edge; None when not computed."""
    metric: str = "logit_diff"
    """Metric name."""
    ablation: str = "corrupted"
    """What removed edges carried."""

    @property
    def minimal(self) -> bool:
        """True when removing any single edge lowers faithfulness."""
        if self.edge_drops is None:
            raise InterplabError("minimality was not computed; call faithfulness(minimality=True).")
        return bool((self.edge_drops > 0).all())

    @property
    def redundant_edges(self) -> list[str]:
        """Edges whose removal does not lower faithfulness."""
        if self.edge_drops is None:
            raise InterplabError("minimality was not computed; call faithfulness(minimality=True).")
        return [e for e, d in zip(self.edges, self.edge_drops.tolist(), strict=True) if d <= 0]

    def summary(self) -> dict[str, float]:
        """Headline numbers (for `Report.metrics`)."""
        out = {
            "faithfulness": self.faithfulness.mean,
            "faithfulness_sem": self.faithfulness.sem,
            "completeness": self.completeness.mean,
            "completeness_sem": self.completeness.sem,
            "n_edges": float(len(self.edges)),
        }
        if self.edge_drops is not None:
            out["redundant_edges"] = float(len(self.redundant_edges))
        return out


def faithfulness(
    model: Any,
    task: Any,
    circuit: Circuit,
    *,
    ablation: Ablation = "corrupted",
    metric: Any = "logit_diff",
    reference: Int[Tensor, "n_ref pos"] | None = None,
    minimality: bool = True,
    max_batch: int = 256,
    device: str | torch.device | None = None,
) -> Faithfulness:
    """Faithfulness, completeness and (optionally) minimality of `circuit` on `task`.

    Args:
        model: a hooked model (TransformerBridge).
        task: a `TaskDataset`.
        circuit: a `Circuit` of this model's graph.
        ablation: what edges outside the kept set carry: 'corrupted' sender outputs or their
            per-position 'mean' over `reference` (default: the corrupted prompts).
        metric: metric name or `TaskMetric`.
        minimality: also remove each circuit edge in turn (one batched copy per edge).
        max_batch: most rows per forward pass.
        device: where to run; None = the model's device.
    """
    if not isinstance(circuit, Circuit):
        raise InterplabError(f"expected a Circuit, got {type(circuit).__name__}.")
    patcher = EdgePatcher(
        model,
        task,
        metric=metric,
        ablation=ablation,
        reference=reference,
        max_batch=max_batch,
        device=device,
    )
    if circuit.graph != patcher.graph:
        raise InterplabError(
            f"the circuit's graph {circuit.graph} is not this model's graph {patcher.graph}."
        )
    full = patcher.graph.full_mask()
    kept = circuit.mask()
    masks = [full, torch.zeros_like(full), kept, full * (1 - kept)]
    index = circuit.in_circuit.nonzero()
    if minimality:
        without = kept.repeat(len(index), 1, 1)
        without[torch.arange(len(index)), index[:, 0], index[:, 1]] = 0.0
        masks += list(without)
    values = patcher.values(torch.stack(masks))
    clean, empty = Estimate.of(values[0]), Estimate.of(values[1])
    inside, outside = Estimate.of(values[2]), Estimate.of(values[3])
    drops = None
    if minimality:
        span = clean.mean - empty.mean
        inside.normalized(clean.mean, empty.mean)  # raises when the span is 0
        drops = (values[2].double().mean() - values[4:].double().mean(1)) / span
    names = [f"{circuit.graph.senders[s]}->{circuit.graph.receivers[r]}" for s, r in index.tolist()]
    return Faithfulness(
        faithfulness=inside.normalized(clean.mean, empty.mean),
        completeness=outside.normalized(clean.mean, empty.mean),
        circuit=inside,
        complement=outside,
        clean=clean,
        empty=empty,
        edges=names,
        edge_drops=None if drops is None else drops.float(),
        metric=patcher.metric.name,
        ablation=ablation,
    )


def faithfulness_curve(
    model: Any,
    task: Any,
    scores: Float[Tensor, "sender receiver"],
    sizes: list[int],
    *,
    ablation: Ablation = "corrupted",
    metric: Any = "logit_diff",
    reference: Int[Tensor, "n_ref pos"] | None = None,
    max_batch: int = 256,
    device: str | torch.device | None = None,
) -> Float[Tensor, " size"]:
    """Faithfulness of the top-n edges by |score| for each n in `sizes` (Hanna et al. 2024
    compare attribution methods this way); one batched copy per size."""
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
    if tuple(scores.shape) != (graph.n_senders, graph.n_receivers):
        raise InterplabError(
            f"scores has shape {tuple(scores.shape)}; expected [sender, receiver] = "
            f"{(graph.n_senders, graph.n_receivers)}."
        )
    if not sizes:
        raise InterplabError("sizes is empty; expected circuit sizes such as [10, 50, 100].")
    masks = [Circuit.from_scores(graph, scores, top_n=int(n)).mask() for n in sizes]
    full = graph.full_mask()
    values = patcher.values(torch.stack([full, torch.zeros_like(full), *masks])).double()
    clean, empty = values[0].mean(), values[1].mean()
    Estimate.of(values[0]).normalized(float(clean), float(empty))  # raises when span is 0
    return ((values[2:].mean(1) - empty) / (clean - empty)).float()
