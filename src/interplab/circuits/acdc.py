"""ACDC: automatic circuit discovery by greedy edge pruning (Conmy et al. 2023).

Start from the full graph. Visit receivers from the logits backwards (reverse topological
order); at each, try removing each incoming edge (latest sender first), measuring the
circuit with exact edge patching. Keep the edge removed when the distance to the clean model
grows by at most `threshold`:

    D(circuit without e) - D(circuit) <= threshold   ->  remove e for good

D is the mean KL(p_clean || p_circuit) at the answer position ('kl', the paper's default),
or |mean metric(circuit) - mean metric(clean)| for other metrics. A node whose outgoing
edges are all gone no longer affects anything, so its incoming edges are dropped without a
test (the paper prunes such nodes too). With threshold 0 only edges whose removal does not
increase D are removed, so every edge that matters stays.

Speed: removals are tried several at a time, speculatively. For receiver v with untested
edges e1, e2, ..., copy j of one batched forward removes e1..ej together; while each
removal passes, copy j's distance is exactly the next sequential test. At the first edge
kept, the later copies are discarded and the next batch starts after it. Most edges are
removed in practice (circuits are sparse), so most copies are used.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interplab.circuits.edge_patching import Ablation, EdgePatcher
from interplab.circuits.graph import Circuit, Graph
from interplab.errors import InterplabError


def acdc(
    model: Any,
    task: Any,
    *,
    threshold: float = 0.01,
    metric: Any = "kl",
    ablation: Ablation = "corrupted",
    reference: Int[Tensor, "n_ref pos"] | None = None,
    edges_per_pass: int = 16,
    max_batch: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Circuit:
    """Find a circuit with ACDC (Conmy et al. 2023).

    Args:
        model: a hooked model (TransformerBridge).
        task: a `TaskDataset`.
        threshold: tau: an edge is removed when removing it raises the distance D by at most
            this much (nats for 'kl'; metric units otherwise).
        metric: 'kl' (D = mean KL to the clean run), or another metric name / `TaskMetric`
            (D = |mean metric - clean mean|).
        ablation: what removed edges carry: the corrupted run's sender outputs, or their
            per-position mean over `reference` (default: the corrupted prompts).
        edges_per_pass: removals tried speculatively in one batched forward.
        max_batch: most rows per forward pass.
        device: where to run; None = the model's device.
        progress: progress bar over receivers.

    Returns:
        `Circuit` whose `scores` are the distance increases measured when each edge was
        tested (edges dropped untested, from dead nodes, score 0), with metadata (threshold,
        metric, final distance, number of forward passes).
    """
    if not isinstance(threshold, int | float) or isinstance(threshold, bool) or threshold < 0:
        raise InterplabError(f"threshold must be a number >= 0, got {threshold!r}.")
    if (
        isinstance(edges_per_pass, bool)
        or not isinstance(edges_per_pass, int)
        or edges_per_pass <= 0
    ):
        raise InterplabError(f"edges_per_pass must be a positive int, got {edges_per_pass!r}.")
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
    clean_mean = float(patcher.clean.mean)
    is_kl = patcher.metric.kind == "kl"

    def distance(values: Tensor) -> Tensor:  # [n, batch] -> [n]
        mean = values.double().mean(1)
        return mean if is_kl else (mean - clean_mean).abs()

    current = graph.full_mask().double()
    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    d_current = float(distance(patcher.values(current[None]))[0])
    passes = 1
    receivers = range(graph.n_receivers - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        receivers = tqdm(receivers, desc="acdc", unit="receiver")
    for receiver in receivers:
        if not _feeds_anything(graph, current, receiver):
            current[:, receiver] = 0.0
            continue
        # latest sender first, as ACDC visits a node's parents in reverse topological order
        todo = [
            s for s in range(int(graph.n_upstream[receiver]) - 1, -1, -1) if current[s, receiver]
        ]
        while todo:
            chunk = todo[:edges_per_pass]
            masks = current.repeat(len(chunk), 1, 1)
            for j, sender in enumerate(chunk):
                masks[j:, sender, receiver] = 0.0  # copy j removes chunk[0..j]
            tried = distance(patcher.values(masks)).tolist()
            passes += 1
            used = len(chunk)
            for j, sender in enumerate(chunk):
                increase = tried[j] - d_current
                scores[sender, receiver] = increase
                if increase <= threshold:
                    current[sender, receiver] = 0.0
                    d_current = tried[j]
                else:
                    used = j + 1  # later copies assumed this edge removed: redo them
                    break
            todo = todo[used:]
    circuit = Circuit(
        graph,
        current.bool(),
        scores,
        metadata={
            "method": "acdc",
            "threshold": float(threshold),
            "metric": patcher.metric.name,
            "ablation": ablation,
            "distance": d_current,
            "forward_passes": passes,
        },
    )
    return circuit


def _feeds_anything(graph: Graph, current: Tensor, receiver: int) -> bool:
    """Whether a node computed from `receiver` still has an outgoing edge (logits always
    do). A key/value input under grouped-query attention feeds every query head of its
    group, so it stays live while any of them does."""
    if receiver == graph.logits_receiver:
        return True
    return any(bool(current[sender].any()) for sender in graph.receiver_senders(receiver))
