"""The edge-level computational graph of a transformer, and circuits over it.

Graph (Conmy et al. 2023, ACDC; Syed et al. 2023, EAP; Hanna et al. 2024, EAP-IG). Every
component writes into the residual stream and reads from it, so the stream can be unrolled
into direct edges from each writer to each later reader:

  senders (nodes that write)    'input' (token + position embeddings), every attention head
                                'a{L}.h{H}', every MLP 'm{L}'
  receivers (ports that read)   each head's query, key and value input 'a{L}.h{H}<q>' /
                                '<k>' / '<v>', each MLP's input 'm{L}', and 'logits' (the
                                input of the final norm and unembedding)
  edges                         'sender->receiver' for every sender computed before the
                                receiver reads: input and all earlier layers feed a head's
                                q/k/v; an MLP also reads its own layer's heads (not in
                                parallel-attention blocks); logits read every sender.

Grouped-query attention (GQA: Llama 2/3, Mistral, Qwen2, ...; `n_kv_heads` < `n_heads`):
the `n_heads // n_kv_heads` query heads of a group share one key/value head, so the key and
value inputs are ports of the key/value head, not of each query head. Their receivers are
named by group: 'a{L}.g{G}<k>' / 'a{L}.g{G}<v>' is the key / value input of layer L's
key/value head G, which query heads G * group .. (G + 1) * group - 1 read (group =
n_heads // n_kv_heads). Query inputs keep the per-head names 'a{L}.h{H}<q>', and senders
are unchanged (each query head writes its own z @ W_O). The 'g' names make a GQA edge
'a0.h1->a1.g0<k>' impossible to misread as the key of query head 0. Models with one
key/value head per query head (n_kv_heads None or == n_heads) keep the per-head names.

A `Circuit` is a set of edges (with optional scores); it saves to / loads from JSON and
draws itself as a layered graph. Running a model with only some edges is exact edge
patching (`interplab.circuits.edge_patching`).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.errors import InterplabError, closest

PortKind = Literal["q", "k", "v"]
PORTS: tuple[str, ...] = get_args(PortKind)
NodeKind = Literal["input", "head", "mlp", "logits"]
FORMAT = "interplab.circuit"
VERSION = 2
"""Newest circuit-file version this module reads. Version 2 adds `graph.n_kv_heads`
(grouped-query attention); files of graphs without it are still written as version 1, so
older readers keep reading them."""


# ------------------------------------------------------------------ the graph
@dataclass(frozen=True)
class Graph:
    """The edge graph of a model with `n_layers` blocks of `n_heads` heads (+ an MLP each).

    Indexing (used by every [sender, receiver] tensor): senders are ordered input, then per
    layer its heads and its MLP; receivers are ordered per layer: the q inputs of its
    `n_heads` query heads, the k inputs of its `n_kv` key/value heads, their v inputs, the
    MLP input; then logits (`n_kv` = n_heads unless the model uses grouped-query attention).
    Sender s feeds receiver r exactly when s < n_upstream[r] (every receiver reads a prefix
    of the senders).
    """

    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Attention heads per block."""
    has_mlp: bool = True
    """Whether blocks have MLPs (False for attention-only models)."""
    parallel_attn_mlp: bool = False
    """Blocks where attention and MLP both read the block input (GPT-J, GPT-NeoX): an MLP
    then does not read its own layer's heads."""
    n_kv_heads: int | None = None
    """Key/value heads per block under grouped-query attention (must divide `n_heads`);
    None = one per query head. A value equal to `n_heads` is stored as None, so the two
    spellings give equal graphs."""

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InterplabError(f"Graph.{name} must be a positive int, got {value!r}.")
        n_kv = self.n_kv_heads
        if n_kv is not None:
            if isinstance(n_kv, bool) or not isinstance(n_kv, int) or n_kv <= 0:
                raise InterplabError(
                    f"Graph.n_kv_heads must be a positive int or None, got {n_kv!r}."
                )
            if self.n_heads % n_kv:
                raise InterplabError(
                    f"Graph.n_kv_heads={n_kv} must divide n_heads={self.n_heads} (each "
                    "key/value head serves an equal group of query heads)."
                )
            if n_kv == self.n_heads:
                object.__setattr__(self, "n_kv_heads", None)

    @classmethod
    def from_model(cls, model: Any) -> Graph:
        """The graph of a hooked model (TransformerBridge); reads `cfg.n_key_value_heads`
        for grouped-query attention."""
        cfg = model.cfg
        n_kv = getattr(cfg, "n_key_value_heads", None)
        return cls(
            n_layers=int(cfg.n_layers),
            n_heads=int(cfg.n_heads),
            has_mlp=not bool(getattr(cfg, "attn_only", False)),
            parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
            n_kv_heads=None if n_kv is None else int(n_kv),
        )

    # --- sizes and indices -----------------------------------------------------------
    @property
    def n_kv(self) -> int:
        """Key/value heads per block (`n_heads` without grouped-query attention)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv

    def port_heads(self, port: str) -> int:
        """How many receivers of a layer read port `port`: n_heads for q, n_kv for k and v."""
        _check_port(port)
        return self.n_heads if port == "q" else self.n_kv

    @property
    def n_attn_receivers(self) -> int:
        """Attention receivers per layer: n_heads q ports + n_kv k ports + n_kv v ports."""
        return self.n_heads + 2 * self.n_kv

    @property
    def _group(self) -> int:
        return self.n_heads + int(self.has_mlp)

    @property
    def _per_layer(self) -> int:
        return self.n_attn_receivers + int(self.has_mlp)

    def _port_offset(self, port: str) -> int:
        return {"q": 0, "k": self.n_heads, "v": self.n_heads + self.n_kv}[port]

    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * self._group

    @property
    def n_receivers(self) -> int:
        return self.n_layers * self._per_layer + 1

    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * self._group + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * self._group + self.n_heads

    def head_receiver(self, layer: int, head: int, port: str) -> int:
        """The receiver query head `head` reads its `port` input from. Under grouped-query
        attention the k and v receivers are those of its key/value head `head // group_size`
        (shared with the other heads of the group); see `kv_receiver` to index them by
        key/value head."""
        _check_port(port)
        _check_index("head", head, self.n_heads)
        if port == "q":
            return layer * self._per_layer + head
        return self.kv_receiver(layer, head // self.group_size, port)

    def kv_receiver(self, layer: int, kv_head: int, port: str) -> int:
        """The `port` ('k' or 'v') receiver of key/value head `kv_head` (= the query head
        without grouped-query attention)."""
        if port not in ("k", "v"):
            raise InterplabError(f"kv_receiver port must be 'k' or 'v', got {port!r}.")
        _check_index("kv_head", kv_head, self.n_kv)
        return layer * self._per_layer + self._port_offset(port) + kv_head

    def mlp_receiver(self, layer: int) -> int:
        return layer * self._per_layer + self.n_attn_receivers

    @property
    def logits_receiver(self) -> int:
        return self.n_receivers - 1

    def attn_upstream(self, layer: int) -> int:
        """Senders read by the q/k/v inputs of layer `layer`'s heads."""
        return 1 + layer * self._group

    def mlp_upstream(self, layer: int) -> int:
        """Senders read by layer `layer`'s MLP."""
        return 1 + layer * self._group + (0 if self.parallel_attn_mlp else self.n_heads)

    @cached_property
    def senders(self) -> list[str]:
        """Sender names in index order."""
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)]
            if self.has_mlp:
                names.append(f"m{layer}")
        return names

    def kv_name(self, layer: int, kv_head: int) -> str:
        """Node name of a key/value head: 'a{L}.g{G}' under grouped-query attention, else
        the query head's own name 'a{L}.h{G}'."""
        return f"a{layer}.{'h' if self.n_kv_heads is None else 'g'}{kv_head}"

    @cached_property
    def receivers(self) -> list[str]:
        """Receiver (port) names in index order."""
        names = []
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}<q>" for h in range(self.n_heads)]
            for port in ("k", "v"):
                names += [f"{self.kv_name(layer, g)}<{port}>" for g in range(self.n_kv)]
            if self.has_mlp:
                names.append(f"m{layer}")
        return [*names, "logits"]

    @cached_property
    def nodes(self) -> list[str]:
        """Every node name in computation order: input, per layer its key/value head nodes
        (grouped-query attention only: their k and v are computed before the query heads
        that share them), its heads and its MLP; logits last."""
        names = ["input"]
        for layer in range(self.n_layers):
            if self.n_kv_heads is not None:
                names += [self.kv_name(layer, g) for g in range(self.n_kv)]
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)]
            if self.has_mlp:
                names.append(f"m{layer}")
        return [*names, "logits"]

    @cached_property
    def n_upstream(self) -> Int[Tensor, " receiver"]:
        """How many senders (a prefix of `senders`) each receiver reads."""
        counts = []
        for layer in range(self.n_layers):
            counts += [self.attn_upstream(layer)] * self.n_attn_receivers
            if self.has_mlp:
                counts.append(self.mlp_upstream(layer))
        return torch.tensor([*counts, self.n_senders])

    @cached_property
    def valid(self) -> Bool[Tensor, "sender receiver"]:
        """True where sender s feeds receiver r."""
        return torch.arange(self.n_senders)[:, None] < self.n_upstream[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    @cached_property
    def edge_index(self) -> Int[Tensor, "edge 2"]:
        """(sender, receiver) of every edge, receiver-major (all edges into receiver 0, ...)."""
        receiver, sender = self.valid.T.nonzero(as_tuple=True)
        return torch.stack([sender, receiver], dim=1)

    @cached_property
    def edges(self) -> list[str]:
        """Edge names 'sender->receiver' in `edge_index` order."""
        return [f"{self.senders[s]}->{self.receivers[r]}" for s, r in self.edge_index.tolist()]

    @cached_property
    def _sender_ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.senders)}

    @cached_property
    def _receiver_ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.receivers)}

    def edge(self, name: str) -> tuple[int, int]:
        """(sender index, receiver index) of the edge called `name` ('a0.h1->a1.h0<v>')."""
        sender, sep, receiver = name.partition("->")
        s = self._sender_ids.get(sender.strip())
        r = self._receiver_ids.get(receiver.strip())
        if not sep or s is None or r is None or not bool(self.valid[s, r]):
            near = closest(name, self.edges, n=3)
            hint = f" Did you mean: {', '.join(near)}?" if near else ""
            raise InterplabError(
                f"unknown edge {name!r}; expected 'sender->receiver' with a sender computed "
                f"before the receiver, e.g. {self.edges[0]!r}.{hint}"
            )
        return s, r

    def receiver_node(self, receiver: int) -> str:
        """The node a receiver belongs to: 'a1.h0<q>' -> 'a1.h0' (a key/value group's
        'a1.g0<k>' -> 'a1.g0' under grouped-query attention)."""
        return re.sub(r"<[qkv]>$", "", self.receivers[receiver])

    def receiver_senders(self, receiver: int) -> list[int]:
        """The senders whose output is computed from `receiver`'s input: the head itself for
        a q port (and k/v ports without GQA), every query head of the group for a GQA k/v
        port, the MLP for an MLP input, none for logits."""
        if receiver == self.logits_receiver:
            return []
        layer, slot = divmod(receiver, self._per_layer)
        if slot == self.n_attn_receivers:
            return [self.mlp_sender(layer)]
        if slot < self.n_heads:
            return [self.head_sender(layer, slot)]
        kv_head = (slot - self.n_heads) % self.n_kv
        heads = range(kv_head * self.group_size, (kv_head + 1) * self.group_size)
        return [self.head_sender(layer, h) for h in heads]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "has_mlp": self.has_mlp,
            "parallel_attn_mlp": self.parallel_attn_mlp,
        }
        if self.n_kv_heads is not None:  # only GQA graphs carry it: older files stay valid
            data["n_kv_heads"] = self.n_kv_heads
        return data

    def full_mask(self) -> Float[Tensor, "sender receiver"]:
        """Every edge on (the clean model)."""
        return self.valid.float()


def _check_port(port: str) -> None:
    if port not in PORTS:
        raise InterplabError(f"unknown port {port!r}; expected one of {', '.join(PORTS)}.")


def _check_index(what: str, value: int, size: int) -> None:
    if not 0 <= value < size:
        raise InterplabError(f"{what} {value!r} is out of range; expected 0 <= {what} < {size}.")


# ------------------------------------------------------------------ circuits
@dataclass
class Circuit:
    """A set of edges of a `Graph`, with optional per-edge scores.

    `in_circuit[s, r]` says whether edge s -> r is kept; `scores[s, r]` is whatever scored
    it (EAP attribution, ACDC's measured effect, ...), 0 where there is no edge.
    """

    graph: Graph
    """The model graph the edges belong to."""
    in_circuit: Bool[Tensor, "sender receiver"]
    """Which edges the circuit keeps."""
    scores: Float[Tensor, "sender receiver"] | None = None
    """Per-edge scores, when the circuit came from a scoring method."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """How the circuit was found (method, metric, threshold, ...): JSON-serialisable."""

    def __post_init__(self) -> None:
        shape = (self.graph.n_senders, self.graph.n_receivers)
        if tuple(self.in_circuit.shape) != shape:
            raise InterplabError(
                f"in_circuit has shape {tuple(self.in_circuit.shape)}; expected [sender, "
                f"receiver] = {shape} for this graph."
            )
        self.in_circuit = self.in_circuit.bool().cpu() & self.graph.valid
        if self.scores is not None:
            if tuple(self.scores.shape) != shape:
                raise InterplabError(
                    f"scores has shape {tuple(self.scores.shape)}; expected {shape}."
                )
            self.scores = self.scores.detach().float().cpu() * self.graph.valid

    # --- constructors -----------------------------------------------------------------
    @classmethod
    def full(cls, graph: Graph) -> Circuit:
        """Every edge of the graph."""
        return cls(graph, graph.valid.clone())

    @classmethod
    def empty(cls, graph: Graph) -> Circuit:
        """No edges."""
        return cls(graph, torch.zeros_like(graph.valid))

    @classmethod
    def from_edges(cls, graph: Graph, edges: Sequence[str]) -> Circuit:
        """The circuit of the named edges ('a0.h1->logits', ...)."""
        mask = torch.zeros_like(graph.valid)
        for name in edges:
            s, r = graph.edge(name)
            mask[s, r] = True
        return cls(graph, mask)

    @classmethod
    def from_scores(
        cls,
        graph: Graph,
        scores: Float[Tensor, "sender receiver"],
        *,
        top_n: int | None = None,
        threshold: float | None = None,
        absolute: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> Circuit:
        """The `top_n` edges by score, or those with score >= `threshold` (by |score| when
        `absolute`; Syed et al. 2023 and Hanna et al. 2024 rank edges by |score|)."""
        if (top_n is None) == (threshold is None):
            raise InterplabError("give exactly one of top_n= or threshold= to pick edges.")
        key = scores.detach().float().cpu()
        key = key.abs() if absolute else key
        key = torch.where(graph.valid, key, torch.tensor(-math.inf))
        if top_n is not None:
            if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
                raise InterplabError(f"top_n must be a non-negative int, got {top_n!r}.")
            top_n = min(top_n, graph.n_edges)
            mask = torch.zeros(key.numel(), dtype=torch.bool)
            mask[key.flatten().argsort(descending=True, stable=True)[:top_n]] = True
            mask = mask.reshape(key.shape)
        else:
            mask = key >= float(threshold)  # type: ignore[arg-type]
        return cls(graph, mask, scores, dict(metadata or {}))

    # --- views --------------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        return int(self.in_circuit.sum())

    @property
    def edges(self) -> list[str]:
        """Names of the kept edges, receiver-major."""
        kept = self.in_circuit[tuple(self.graph.edge_index.T)]
        return [name for name, keep in zip(self.graph.edges, kept.tolist(), strict=True) if keep]

    @property
    def nodes(self) -> list[str]:
        """Nodes touched by a kept edge (senders and the nodes of receivers), graph order."""
        used = set()
        for s, r in self.in_circuit.nonzero().tolist():
            used.add(self.graph.senders[s])
            used.add(self.graph.receiver_node(r))
        return [n for n in self.graph.nodes if n in used]

    def mask(self) -> Float[Tensor, "sender receiver"]:
        """The circuit as an edge mask for exact edge patching (1 = kept)."""
        return self.in_circuit.float()

    def complement(self) -> Circuit:
        """Every edge of the graph that this circuit does not keep."""
        return Circuit(self.graph, self.graph.valid & ~self.in_circuit, self.scores)

    def score_of(self, edge: str) -> float:
        if self.scores is None:
            raise InterplabError("this circuit has no scores.")
        s, r = self.graph.edge(edge)
        return float(self.scores[s, r])

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The `k` kept edges with the largest |score|, as (name, score)."""
        if self.scores is None:
            return [(name, math.nan) for name in self.edges[:k]]
        kept = self.in_circuit.nonzero()
        values = self.scores[kept[:, 0], kept[:, 1]]
        order = values.abs().argsort(descending=True, stable=True)[:k]
        return [
            (
                f"{self.graph.senders[int(kept[i, 0])]}->{self.graph.receivers[int(kept[i, 1])]}",
                float(values[i]),
            )
            for i in order.tolist()
        ]

    def __repr__(self) -> str:
        return (
            f"Circuit({self.n_edges}/{self.graph.n_edges} edges, {len(self.nodes)} nodes, "
            f"{self.metadata.get('method', 'unscored') if self.metadata else 'unscored'})"
        )

    # --- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON form: the graph, the kept edges (with scores) and, when scored, every edge's
        score."""
        data: dict[str, Any] = {
            "format": FORMAT,
            # version 1 readers read everything but GQA graphs: keep writing 1 for those
            "version": VERSION if self.graph.n_kv_heads is not None else 1,
            "graph": self.graph.to_dict(),
            "edges": self.edges,
            "metadata": self.metadata,
        }
        if self.scores is not None:
            values = self.scores[tuple(self.graph.edge_index.T)].tolist()
            data["scores"] = dict(zip(self.graph.edges, values, strict=True))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Circuit:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InterplabError(
                f"not a circuit file: expected a JSON object with format={FORMAT!r}, got "
                f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}."
            )
        if int(data.get("version", 0)) > VERSION:
            raise InterplabError(
                f"circuit file version {data.get('version')} is newer than this interplab "
                f"reads ({VERSION}); upgrade interplab."
            )
        fields = data.get("graph")
        known = {"n_layers", "n_heads", "has_mlp", "parallel_attn_mlp", "n_kv_heads"}
        if not isinstance(fields, dict) or not set(fields) <= known:
            raise InterplabError(
                f"circuit file has a bad 'graph' entry {fields!r}; expected an object with "
                f"keys among {sorted(known)}."
            )
        graph = Graph(**fields)
        circuit = cls.from_edges(graph, data.get("edges", []))
        if "scores" in data:
            scores = torch.zeros(graph.n_senders, graph.n_receivers)
            for name, value in data["scores"].items():
                scores[graph.edge(name)] = float(value)
            circuit.scores = scores
        circuit.metadata = dict(data.get("metadata", {}))
        return circuit

    def save(self, path: str | os.PathLike) -> Path:
        """Write the circuit as JSON (atomically: temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(self.to_dict(), handle, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Circuit:
        """Read a circuit written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise InterplabError(f"circuit file {str(path)!r} does not exist.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise InterplabError(
                f"circuit file {str(path)!r} is not valid JSON: {error}"
            ) from error
        return cls.from_dict(data)

    # --- drawing -------------------------------------------------------------------------
    def layout(self) -> dict[str, tuple[float, float]]:
        """(x, y) of every node: input at the bottom, then per layer a row of heads and a
        row for the MLP, logits on top. Under grouped-query attention each key/value group
        node sits just below the middle of its query heads."""
        g = self.graph
        pos: dict[str, tuple[float, float]] = {"input": (0.0, 0.0)}
        rows_per_layer = 2 if g.has_mlp else 1
        width = max(g.n_heads - 1, 1)
        for layer in range(g.n_layers):
            y = 1.0 + rows_per_layer * layer
            for h in range(g.n_heads):
                pos[f"a{layer}.h{h}"] = (h / width * 2 - 1 if g.n_heads > 1 else 0.0, y)
            if g.n_kv_heads is not None:
                for kv in range(g.n_kv):
                    heads = range(kv * g.group_size, (kv + 1) * g.group_size)
                    x = sum(pos[f"a{layer}.h{h}"][0] for h in heads) / g.group_size
                    pos[g.kv_name(layer, kv)] = (x, y - 0.45)
            if g.has_mlp:
                pos[f"m{layer}"] = (0.0, y + 1)
        pos["logits"] = (0.0, 1.0 + rows_per_layer * g.n_layers)
        return pos

    def draw(
        self,
        ax: Any = None,
        *,
        title: str | None = None,
        all_nodes: bool = True,
        max_edges: int | None = 500,
    ) -> Any:
        """Draw the circuit as a layered graph (returns the matplotlib Figure).

        Edge width grows with |score| (constant when unscored); colour says which port the
        edge enters (q, k, v, MLP or logits), and scored edges with a negative score are
        dashed. `max_edges` keeps the drawing readable by showing the largest-|score| edges.
        Needs matplotlib (`interplab[viz]`).
        """
        import matplotlib.pyplot as plt
        from matplotlib.collections import LineCollection
        from matplotlib.lines import Line2D

        g = self.graph
        pos = self.layout()
        if ax is None:
            height = 1.2 + 0.9 * (g.n_layers * (2 if g.has_mlp else 1) + 2)
            fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * g.n_heads + 2), min(height, 18)))
        else:
            fig = ax.figure
        kept = self.in_circuit.nonzero()
        if self.scores is not None:
            values = self.scores[kept[:, 0], kept[:, 1]]
        else:
            values = torch.ones(len(kept))
        order = values.abs().argsort(descending=True, stable=True)
        if max_edges is not None:
            order = order[:max_edges]
        top = float(values.abs().max()) if len(values) else 1.0
        colours = {"q": "tab:blue", "k": "tab:green", "v": "tab:red", "mlp": "tab:purple"}
        offsets = {"q": -0.12, "k": 0.0, "v": 0.12}
        segments, widths, colors, styles = [], [], [], []
        for i in order.tolist():
            s, r = int(kept[i, 0]), int(kept[i, 1])
            receiver = g.receivers[r]
            port = receiver[-2] if receiver.endswith(">") else "mlp"
            start = pos[g.senders[s]]
            node = g.receiver_node(r)
            end = pos[node]
            shift = offsets.get(port, 0.0) * (0.5 if ".g" in node else 1.0)  # small group nodes
            end = (end[0] + shift, end[1] - 0.08)
            segments.append(_curve(start, end, bend=-1.0 if r % 2 else 1.0))
            value = float(values[i])
            widths.append(0.4 + 3.6 * abs(value) / (top or 1.0))
            colors.append(colours.get(port, "0.3") if receiver != "logits" else "0.25")
            styles.append("dashed" if self.scores is not None and value < 0 else "solid")
        if segments:
            lines = LineCollection(
                segments, linewidths=widths, colors=colors, linestyles=styles, alpha=0.75
            )
            ax.add_collection(lines)
        used = set(self.nodes)
        if g.n_kv_heads is not None:  # tie each key/value group to the query heads it serves
            for layer in range(g.n_layers):
                for kv in range(g.n_kv):
                    name = g.kv_name(layer, kv)
                    if not all_nodes and name not in used:
                        continue
                    for h in range(kv * g.group_size, (kv + 1) * g.group_size):
                        (x0, y0), (x1, y1) = pos[name], pos[f"a{layer}.h{h}"]
                        ax.plot([x0, x1], [y0, y1], color="0.75", lw=0.6, ls=":", zorder=2)
        for name, (x, y) in pos.items():
            active = name in used
            if not active and not all_nodes:
                continue
            ax.scatter(
                [x],
                [y],
                s=420 if ".g" not in name else 200,
                zorder=3,
                c="white" if not active else ("#ffe9b3" if name[0] == "a" else "#d6e4ff"),
                edgecolors="0.2" if active else "0.8",
            )
            ax.text(
                x,
                y,
                name,
                ha="center",
                va="center",
                fontsize=7 if ".g" not in name else 5,
                zorder=4,
                color="0.1" if active else "0.6",
            )
        xs = [p[0] for p in pos.values()]
        ys = [p[1] for p in pos.values()]
        ax.set_xlim(min(xs) - 0.4, max(xs) + 0.4)
        ax.set_ylim(min(ys) - 0.5, max(ys) + 0.5)
        ax.axis("off")
        handles = [Line2D([], [], color=c, label=p) for p, c in colours.items()]
        handles.append(Line2D([], [], color="0.25", label="logits"))
        ax.legend(handles=handles, loc="upper right", fontsize=7, frameon=False)
        shown = f"{len(order)}/{self.n_edges} edges" if len(order) < self.n_edges else ""
        ax.set_title(title or f"circuit: {self.n_edges} edges, {len(used)} nodes {shown}".strip())
        return fig


def _curve(start: tuple[float, float], end: tuple[float, float], bend: float) -> list:
    """Points of an edge: straight between neighbouring rows; a quadratic Bezier bowed
    sideways when it skips rows, so it does not run through the nodes in between."""
    (x0, y0), (x1, y1) = start, end
    skipped = abs(y1 - y0) - 1.2
    if skipped <= 0:
        return [start, end]
    cx = (x0 + x1) / 2 + bend * min(0.12 * skipped + 0.15, 0.9)
    cy = (y0 + y1) / 2
    t = torch.linspace(0, 1, 16).tolist()
    return [
        (
            (1 - u) ** 2 * x0 + 2 * (1 - u) * u * cx + u**2 * x1,
            (1 - u) ** 2 * y0 + 2 * (1 - u) * u * cy + u**2 * y1,
        )
        for u in t
    ]
