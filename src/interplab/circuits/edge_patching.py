"""Exact edge patching: run a model as its edge graph, with any edges ablated.

A mask gives each edge of the `Graph` a weight in [0, 1]. In one forward pass on the clean
prompts every receiver rebuilds its own input from the residual stream:

    x_v = resid_v - sum_u (1 - mask[u, v]) * (out_u - ablated_u)

where `resid_v` is the residual stream the receiver would normally read in this (patched)
run, `out_u` is sender u's output in this run and `ablated_u` its output on the corrupted
prompts (or its mean). With mask 1 the edge carries u's own output; with 0 it carries the
ablated one; everything outside the graph (biases) is shared. All-ones masks leave the run
untouched (the clean logits), all-zero masks give the corrupted run. Heads read their q, k
and v inputs separately, so the engine recomputes q/k/v per head from the rebuilt inputs
(the block's first norm, then W_Q/W_K/W_V; checked against the model's own q/k/v once);
head outputs are z @ W_O per head. Many masks run in one forward pass as stacked copies.
Under grouped-query attention the k and v inputs are rebuilt per key/value head (the
graph's 'a{L}.g{G}<k>' / '<v>' receivers) and handed to the model at `hook_k` / `hook_v`,
which hold one entry per key/value head; the model itself then shares each with the query
heads of its group, exactly as in an unpatched run.

The same hooks can put zero "probe" tensors at every receiver input, so one backward pass
gives d metric / d x_v for every receiver at once (what EAP needs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.graph import PORTS, Circuit, Graph
from interplab.errors import InterplabError

Ablation = Literal["corrupted", "mean"]
ABLATIONS: tuple[str, ...] = get_args(Ablation)


@dataclass
class GraphRun:
    """What one edge-level forward pass produced."""

    logits: Float[Tensor, "rows pos vocab"]
    """Logits; at the answer positions only (pos = 1) when `answer_pos` was given."""
    outputs: Float[Tensor, "rows pos sender d_model"] | None
    """Every sender's output in this run (detached), when `record` was asked for."""
    acts: dict[str, Tensor]
    """Raw activations at the hook names asked for with `keep` (detached)."""
    probes: dict[int, Tensor]
    """Zero tensors added to receiver inputs, keyed by the first receiver index of each
    group (a layer's q, k or v ports [rows, pos, head, d_model], head counting query heads
    for q and key/value heads for k and v; an MLP [rows, pos, d_model]; logits [rows,
    d_model] or [rows, pos, d_model]); their gradients are d metric / d x_v."""


class EdgeModel:
    """A hooked model run as its edge graph (see module docstring).

    Hook points used (TransformerLens names): `blocks.L.hook_resid_pre` (the input sender;
    the residual stream heads read), `blocks.L.attn.hook_q/k/v` (rebuilt per query head /
    per key/value head), `blocks.L.attn.hook_z` (head outputs z @ W_O),
    `blocks.L.hook_mlp_in` / `blocks.L.hook_mlp_out`, and `ln_final.hook_in` (the logits
    receiver).
    """

    def __init__(self, model: Any, graph: Graph | None = None) -> None:
        from interplab.models.accessor import weights
        from interplab.models.hooks import check_hook_names

        self.model = model
        self.graph = graph or Graph.from_model(model)
        if self.graph != Graph.from_model(model):
            raise InterplabError(
                f"graph {self.graph} does not match the model's {Graph.from_model(model)}."
            )
        g = self.graph
        names = ["ln_final.hook_in", "unembed.hook_in"]
        for layer in range(g.n_layers):
            names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_z"]
            names += [f"blocks.{layer}.attn.hook_{p}" for p in PORTS]
            if g.has_mlp:
                names += [f"blocks.{layer}.hook_mlp_in", f"blocks.{layer}.hook_mlp_out"]
        check_hook_names(model, names)  # also switches on hook_mlp_in
        w = weights(model)
        # The accessor repeats K/V weights per query head for GQA models (query head h reads
        # key/value head h // group; biases the model lacks are zeros of that expanded
        # shape), but the graph's k/v receivers and the model's hook_k/hook_v are per
        # key/value head: keep one entry per key/value head.
        n_kv = g.n_kv
        self.W = {  # q: [layer, head, d_model, d_head]; k, v: [layer, kv_head, d_model, d_head]
            "q": w.W_Q,
            "k": _per_kv_head(w.W_K, n_kv),
            "v": _per_kv_head(w.W_V, n_kv),
        }
        self.b = {  # [layer, head or kv_head, d_head]
            "q": w.b_Q,
            "k": _per_kv_head(w.b_K, n_kv),
            "v": _per_kv_head(w.b_V, n_kv),
        }
        self.W_O = w.W_O  # [layer, head, d_head, d_model]
        self.b_O0 = w.b_O[0]
        self.ln1 = [_norm_fn(block) for block in model.blocks]
        self._check_rebuild()

    @property
    def device(self) -> torch.device:
        return self.W_O.device

    def _check_rebuild(self) -> None:
        """The graph's assumptions, checked on one short prompt: the per-head q/k/v rebuild
        (first norm, then W_Q/W_K/W_V; k and v per key/value head under grouped-query
        attention) reproduces the model's own q/k/v, the attention output
        is sum_h z_h @ W_O[h] + b_O, and the block adds its attention and MLP outputs to the
        residual stream unchanged. Each fails for architectures the graph cannot describe
        (extra steps before the projections, post-attention norms, ...)."""
        tokens = torch.arange(min(6, int(self.model.cfg.d_vocab)), device=self.device)[None]
        names = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.0.attn.hook_z"]
        names += ["blocks.0.hook_attn_out"] + [f"blocks.0.attn.hook_{p}" for p in PORTS]
        if self.graph.has_mlp:
            names.append("blocks.0.hook_mlp_out")
        seen: dict[str, Tensor] = {}

        def keep(name: str) -> Callable:
            def fn(x: Tensor, hook: Any) -> None:
                seen[name] = x.detach()

            return fn

        with torch.no_grad():
            with self.model.hooks(fwd_hooks=[(n, keep(n)) for n in names]):
                self.model(tokens)
            normed = self.ln1[0](seen["blocks.0.hook_resid_pre"])
        what = type(self.model.blocks[0].attn).__name__
        for port in PORTS:
            rebuilt = torch.einsum("bpd,hde->bphe", normed, self.W[port][0]) + self.b[port][0]
            actual = seen[f"blocks.0.attn.hook_{port}"]
            if actual.ndim != 4 or actual.shape[2] != self.graph.port_heads(port):
                raise InterplabError(
                    f"this model's blocks.0.attn.hook_{port} has shape {tuple(actual.shape)}; "
                    f"edge-level graphs expect [batch, pos, {self.graph.port_heads(port)}, "
                    f"d_head] (one entry per {'query' if port == 'q' else 'key/value'} head) "
                    f"({what})."
                )
            if not _close(rebuilt, actual):
                raise InterplabError(
                    f"cannot rebuild this model's per-head {port} inputs from the residual "
                    f"stream (first norm, then W_{port.upper()}): edge-level graphs do not "
                    f"support its attention ({what})."
                )
        heads = torch.einsum("bphe,hed->bpd", seen["blocks.0.attn.hook_z"], self.W_O[0])
        attn_out = seen["blocks.0.hook_attn_out"]
        written = seen["blocks.0.hook_resid_post"] - seen["blocks.0.hook_resid_pre"]
        mlp_out = seen.get("blocks.0.hook_mlp_out", torch.zeros_like(attn_out))
        if not _close(heads + self.b_O0, attn_out) or not _close(attn_out + mlp_out, written):
            raise InterplabError(
                "this model's residual stream is not the sum of its heads' z @ W_O and its MLP "
                f"outputs (e.g. norms after attention); edge-level graphs do not support it ({what})."
            )

    # --- sender outputs ------------------------------------------------------------------
    def run(
        self,
        tokens: Int[Tensor, "batch pos"],
        masks: Float[Tensor, "n sender receiver"] | None = None,
        ablated: Float[Tensor, "batch_or_1 pos sender d_model"] | None = None,
        *,
        answer_pos: Int[Tensor, " batch"] | None = None,
        probes: bool = False,
        record: bool = False,
        replace: dict[str, Tensor] | None = None,
        copies: int | None = None,
        keep: Sequence[str] = (),
    ) -> GraphRun:
        """One forward pass of `n` masked copies of `tokens` (rows copy-major: row c*batch+b).

        Args:
            tokens: the prompts every copy runs on (the clean ones).
            masks: per copy, the weight of every edge (1 = the run's own sender output,
                0 = `ablated`); None = no edge is patched.
            ablated: sender outputs edges carry when masked off (corrupted run or mean).
            answer_pos: when given, the logits receiver and the unembedding are evaluated
                at these positions only (logits [rows, 1, vocab]).
            probes: add zero tensors requiring grad at every receiver input.
            record: return every sender's output.
            replace: hook name -> value that replaces the activation (e.g. interpolated
                inputs for integrated gradients); rows must match.
            copies: number of copies when `masks` is None (default 1).
            keep: hook names whose activations (as the model used them) to return.
        """
        n = masks.shape[0] if masks is not None else (copies or 1)
        if masks is not None:
            expected = (self.graph.n_senders, self.graph.n_receivers)
            if masks.ndim != 3 or tuple(masks.shape[1:]) != expected:
                raise InterplabError(
                    f"masks must be [n, sender, receiver] = [n, {expected[0]}, {expected[1]}], "
                    f"got {tuple(masks.shape)}."
                )
            if ablated is None:
                raise InterplabError("masked runs need the ablated sender outputs (ablated=).")
        state = _RunState(self, tokens, n, masks, ablated, answer_pos, probes, record, replace)
        acts: dict[str, Tensor] = {}

        def keeper(name: str) -> Callable:
            def fn(x: Tensor, hook: Any) -> None:
                acts[name] = x.detach()

            return fn

        # the keepers go last, so they see the activation after the graph's own hooks
        hooks = state.hooks() + [(name, keeper(name)) for name in keep]
        with self.model.hooks(fwd_hooks=hooks):
            logits = self.model(tokens.repeat(n, 1))
        outputs = torch.cat(state.outputs, dim=2) if record else None
        return GraphRun(logits=logits, outputs=outputs, acts=acts, probes=state.probes)

    def sender_outputs(
        self, tokens: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos sender d_model"]:
        """Every sender's output on `tokens` (no patching). Computed under `no_grad` rather
        than `inference_mode`, so the result can enter later autograd runs as a constant."""
        with torch.no_grad():
            out = self.run(tokens, record=True).outputs
        assert out is not None
        return out


def _per_kv_head(w: Tensor, n_kv: int) -> Tensor:
    """K/V weights [layer, head, ...] (repeated per query head, as the accessor gives them
    for GQA models) or [layer, kv_head, ...] -> [layer, kv_head, ...]. Query head h reads
    key/value head h // group, so the repeated copies are every group-th entry."""
    assert w.shape[1] % n_kv == 0, (tuple(w.shape), n_kv)  # Graph checked n_heads % n_kv
    return w[:, :: w.shape[1] // n_kv]


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-3 * (1.0 + float(b.abs().max())))


def _norm_fn(block: Any) -> Callable[[Tensor], Tensor]:
    """The block's first normalisation as a plain function (identity when it has none).
    The raw module runs on any leading shape, e.g. per-head inputs [rows, pos, head, d]."""
    ln1 = getattr(block, "ln1", None)
    module = getattr(ln1, "original_component", None) if ln1 is not None else None
    if module is None:
        return lambda x: x
    return module


class _RunState:
    """The hooks of one `EdgeModel.run` and the buffers they share."""

    def __init__(
        self,
        em: EdgeModel,
        tokens: Tensor,
        n: int,
        masks: Tensor | None,
        ablated: Tensor | None,
        answer_pos: Tensor | None,
        probes: bool,
        record: bool,
        replace: dict[str, Tensor] | None,
    ) -> None:
        self.em, self.g = em, em.graph
        self.n, self.batch, self.pos = n, tokens.shape[0], tokens.shape[1]
        self.rows = n * self.batch
        self.answer_pos = answer_pos
        self.use_probes, self.record = probes, record
        self.replace = replace or {}
        self.outputs: list[Tensor] = []
        self.probes: dict[int, Tensor] = {}
        self.resid: dict[int, Tensor] = {}
        self.off: Tensor | None = None  # 1 - masks: how much of each edge is ablated
        # out_u - ablated_u, sender-major [n, sender, batch, pos, d] so that every receiver's
        # sum over senders is one batched matmul over a prefix view, with no copy
        self.delta: Tensor | None = None
        self.ablated = None if ablated is None else ablated.movedim(2, 0)  # [sender, b|1, pos, d]
        if masks is not None:
            assert ablated is not None
            self.off = (1.0 - masks.to(em.device, em.W_O.dtype)) * self.g.valid.to(em.device)
            d = int(em.W_O.shape[-1])
            # every sender is written (in order) before a receiver reads its prefix
            self.delta = torch.empty(
                n, self.g.n_senders, self.batch, self.pos, d, device=em.device, dtype=em.W_O.dtype
            )

    # --- helpers ------------------------------------------------------------------------
    def _send(self, start: int, out: Tensor) -> None:
        """Sender outputs out [rows, pos, k, d] for senders start .. start + k."""
        k = out.shape[2]
        if self.record:
            self.outputs.append(out.detach())
        if self.delta is not None:
            assert self.ablated is not None
            base = self.ablated[start : start + k, :, : self.pos].to(out)  # [k, b|1, pos, d]
            shaped = out.reshape(self.n, self.batch, self.pos, k, -1).movedim(3, 1)
            self.delta[:, start : start + k] = shaped - base[None]

    def _removed(self, off: Tensor, upstream: int) -> Tensor:
        """sum_u off[n, u, r] * delta[n, u] for each receiver r: [n, r, batch, pos, d]."""
        assert self.delta is not None
        flat = self.delta[:, :upstream].flatten(2)  # [n, upstream, batch*pos*d], a view
        return torch.bmm(off.transpose(1, 2), flat).reshape(
            self.n, off.shape[2], self.batch, self.pos, -1
        )

    def _off(self, receivers: slice, upstream: int) -> Tensor | None:
        """[n, upstream, k] ablated fraction of each edge into `receivers`, None if all 0."""
        if self.off is None:
            return None
        off = self.off[:, :upstream, receivers]
        return off if bool((off != 0).any()) else None

    def _probe(self, key: int, like: Tensor) -> Tensor:
        probe = torch.zeros_like(like, requires_grad=True)
        self.probes[key] = probe
        return probe

    # --- hooks --------------------------------------------------------------------------
    def hooks(self) -> list[tuple[str, Callable]]:
        hooks: list[tuple[str, Callable]] = []
        for layer in range(self.g.n_layers):
            hooks.append((f"blocks.{layer}.hook_resid_pre", self._on_resid_pre(layer)))
            for port in PORTS:
                hooks.append((f"blocks.{layer}.attn.hook_{port}", self._on_qkv(layer, port)))
            hooks.append((f"blocks.{layer}.attn.hook_z", self._on_z(layer)))
            if self.g.has_mlp:
                hooks.append((f"blocks.{layer}.hook_mlp_in", self._on_mlp_in(layer)))
                hooks.append((f"blocks.{layer}.hook_mlp_out", self._on_mlp_out(layer)))
        hooks.append(("ln_final.hook_in", self._on_logits))
        if self.answer_pos is not None:
            hooks.append(("unembed.hook_in", self._on_unembed))
        return hooks

    def _replaced(self, x: Tensor, hook: Any, name: str) -> Tensor:
        value = self.replace.get(name)
        return x if value is None else value.to(x)

    def _on_resid_pre(self, layer: int) -> Callable:
        name = f"blocks.{layer}.hook_resid_pre"

        def fn(x: Tensor, hook: Any) -> Tensor:
            x = self._replaced(x, hook, name)
            if layer == 0:
                self._send(0, x[:, :, None])
            self.resid[layer] = x
            return x

        return fn

    def _on_qkv(self, layer: int, port: str) -> Callable:
        g = self.g
        first = g.head_receiver(layer, 0, port)
        heads = g.port_heads(port)  # query heads for q; key/value heads for k and v
        receivers = slice(first, first + heads)
        upstream = g.attn_upstream(layer)

        def fn(x: Tensor, hook: Any) -> Tensor:
            off = self._off(receivers, upstream)
            if off is None and not self.use_probes:
                return x
            resid = self.resid[layer]  # [rows, pos, d]
            if off is not None:
                # head-major inputs [n, head, batch, pos, d]: no copy of the big delta buffer
                shaped = resid.reshape(self.n, 1, self.batch, self.pos, -1)
                inputs = shaped - self._removed(off, upstream)
                if self.use_probes:  # probes keep the [rows, pos, head, d] layout
                    probe = self._probe(first, resid[:, :, None].expand(-1, -1, heads, -1))
                    inputs = inputs + probe.reshape(
                        self.n, self.batch, self.pos, heads, -1
                    ).permute(0, 3, 1, 2, 4)
                normed = self.em.ln1[layer](inputs)
                out = torch.einsum("nhbpd,hde->nbphe", normed, self.em.W[port][layer])
                out = out.reshape(self.rows, self.pos, heads, -1)
            else:
                inputs = resid[:, :, None, :].expand(-1, -1, heads, -1)
                if self.use_probes:
                    inputs = inputs + self._probe(first, inputs)
                normed = self.em.ln1[layer](inputs)
                out = torch.einsum("bphd,hde->bphe", normed, self.em.W[port][layer])
            return (out + self.em.b[port][layer]).to(x.dtype)

        return fn

    def _on_z(self, layer: int) -> Callable:
        name = f"blocks.{layer}.attn.hook_z"
        start = self.g.head_sender(layer, 0)

        def fn(z: Tensor, hook: Any) -> Tensor:
            z = self._replaced(z, hook, name)
            if self.record or self.delta is not None:
                self._send(start, torch.einsum("bphe,hed->bphd", z, self.em.W_O[layer]))
            return z

        return fn

    def _on_mlp_in(self, layer: int) -> Callable:
        g = self.g
        receiver = g.mlp_receiver(layer)
        upstream = g.mlp_upstream(layer)

        def fn(x: Tensor, hook: Any) -> Tensor:
            off = self._off(slice(receiver, receiver + 1), upstream)
            if off is not None:
                x = x - self._removed(off, upstream).reshape(x.shape)
            if self.use_probes:
                x = x + self._probe(receiver, x)
            return x

        return fn

    def _on_mlp_out(self, layer: int) -> Callable:
        name = f"blocks.{layer}.hook_mlp_out"
        start = self.g.mlp_sender(layer)

        def fn(x: Tensor, hook: Any) -> Tensor:
            x = self._replaced(x, hook, name)
            self._send(start, x[:, :, None])
            return x

        return fn

    def _on_logits(self, x: Tensor, hook: Any) -> Tensor:
        g = self.g
        receiver = g.logits_receiver
        off = self._off(slice(receiver, receiver + 1), g.n_senders)
        if self.answer_pos is not None:
            # the metric reads the answer positions only: rebuild (and probe) those rows
            rows = torch.arange(self.rows, device=x.device)
            where = self.answer_pos.to(x.device).repeat(self.n)
            picked = x[rows, where]  # [rows, d]
            if off is not None:
                assert self.delta is not None
                at = self.answer_pos.to(x.device)
                delta = self.delta[:, :, torch.arange(self.batch), at]  # [n, sender, batch, d]
                removed = torch.einsum("nsbd,ns->nbd", delta, off[..., 0])
                picked = picked - removed.reshape(picked.shape)
            if self.use_probes:
                picked = picked + self._probe(receiver, picked)
            return x.index_put((rows, where), picked) if off is not None or self.use_probes else x
        if off is not None:
            x = x - self._removed(off, g.n_senders).reshape(x.shape)
        if self.use_probes:
            x = x + self._probe(receiver, x)
        return x

    def _on_unembed(self, x: Tensor, hook: Any) -> Tensor:
        # the unembedding (most of a small model's compute) runs on the answer rows alone;
        # done here, after the final norm, because some models reshape right after it
        assert self.answer_pos is not None
        rows = torch.arange(self.rows, device=x.device)
        return x[rows, self.answer_pos.to(x.device).repeat(self.n)][:, None]


# ------------------------------------------------------------------ bound to a task
class EdgePatcher:
    """Exact edge patching on a `TaskDataset`: the metric with any set of edge masks.

    Runs on the task's clean prompts; a masked-off edge carries the sender's output on the
    corrupted prompts (`ablation='corrupted'`) or its per-position mean over `reference`
    prompts (`'mean'`; default reference: the corrupted prompts, the task's own
    "uninformative" distribution as in Wang et al. 2022). Prompts are cut after the last
    answer position (a causal model's later positions cannot reach the metric).
    """

    def __init__(
        self,
        model: Any,
        task: Any,
        *,
        metric: Any = "logit_diff",
        ablation: Ablation = "corrupted",
        reference: Int[Tensor, "n_ref pos"] | None = None,
        max_batch: int = 256,
        device: str | torch.device | None = None,
    ) -> None:
        from interplab.circuits.metrics import check_task, model_device

        check_task(task)
        if ablation not in ABLATIONS:
            from interplab.errors import unknown

            raise unknown("ablation", str(ablation), ABLATIONS, show_all=True)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch <= 0:
            raise InterplabError(f"max_batch must be a positive int, got {max_batch!r}.")
        self.device = model_device(model, device)
        self.model = model
        self.em = EdgeModel(model)
        self.graph = self.em.graph
        task = task.to(self.device)
        width = int(task.answer_pos.max()) + 1
        self.tokens = task.clean_tokens[:, :width]
        self.corrupted_tokens = task.corrupted_tokens[:, :width]
        self.answer_pos = task.answer_pos
        self.batch = self.tokens.shape[0]
        self.max_batch = max_batch
        self.ablation = ablation
        self.metric = _task_metric(model, task, metric)
        self.reference: Tensor | None = None
        """Prompts whose mean sender outputs 'mean' ablation uses (cut to the task width)."""
        if ablation == "corrupted":
            self.ablated = self.em.sender_outputs(self.corrupted_tokens)
        else:
            ref = self.corrupted_tokens if reference is None else reference.to(self.device)
            if ref.ndim != 2 or ref.shape[0] == 0 or ref.shape[1] < width:
                raise InterplabError(
                    f"reference prompts must be [n_ref, pos >= {width}] tokens, got shape "
                    f"{tuple(ref.shape)}."
                )
            self.reference = ref[:, :width]
            self.ablated = self.em.sender_outputs(self.reference).mean(0, keepdim=True)

    @cached_property
    def _ends(self) -> tuple[Any, Any]:
        from interplab.circuits.metrics import Estimate

        full = self.graph.full_mask()
        ends = self.values(torch.stack([full, torch.zeros_like(full)]))
        return Estimate.of(ends[0]), Estimate.of(ends[1])

    @property
    def clean(self) -> Any:
        """`Estimate` of the metric with every edge kept (the clean run)."""
        return self._ends[0]

    @property
    def empty(self) -> Any:
        """`Estimate` of the metric with every edge ablated."""
        return self._ends[1]

    def values(self, masks: Float[Tensor, "n sender receiver"]) -> Float[Tensor, "n batch"]:
        """The metric per mask and example; `max_batch` rows per forward pass."""
        masks = _check_masks(masks, self.graph)
        per = max(1, self.max_batch // self.batch)
        out = []
        with torch.inference_mode():
            for start in range(0, masks.shape[0], per):
                chunk = masks[start : start + per].to(self.device)
                run = self.em.run(self.tokens, chunk, self.ablated, answer_pos=self.answer_pos)
                n = chunk.shape[0]
                answer = run.logits[:, 0].reshape(n, self.batch, -1)
                out.append(self.metric.from_answer_logits(answer))
        return torch.cat(out).cpu()

    def logits(
        self, masks: Float[Tensor, "n sender receiver"]
    ) -> Float[Tensor, "n batch pos vocab"]:
        """Full logits (every position of the cut prompts) per mask."""
        masks = _check_masks(masks, self.graph)
        with torch.inference_mode():
            run = self.em.run(self.tokens, masks.to(self.device), self.ablated)
        return run.logits.reshape(masks.shape[0], self.batch, *run.logits.shape[1:])

    def circuit_values(self, circuit: Circuit) -> Float[Tensor, " batch"]:
        """The metric with exactly `circuit`'s edges kept."""
        _check_graph(circuit.graph, self.graph)
        return self.values(circuit.mask()[None])[0]


def _check_masks(masks: Tensor, graph: Graph) -> Tensor:
    if masks.ndim == 2:
        masks = masks[None]
    expected = (graph.n_senders, graph.n_receivers)
    if masks.ndim != 3 or tuple(masks.shape[1:]) != expected:
        raise InterplabError(
            f"masks must be [n, sender, receiver] = [n, {expected[0]}, {expected[1]}] (or one "
            f"[sender, receiver] mask), got {tuple(masks.shape)}."
        )
    if masks.shape[0] == 0:
        raise InterplabError("no masks given; expected at least one [sender, receiver] mask.")
    return masks if masks.is_floating_point() else masks.float()


def _check_graph(graph: Graph, expected: Graph) -> None:
    if graph != expected:
        raise InterplabError(f"the circuit's graph {graph} is not this model's graph {expected}.")


def _task_metric(model: Any, task: Any, metric: Any) -> Any:
    """A `TaskMetric` from a metric name or a `TaskMetric` (edge patching reads its answer
    positions, so a bare callable is refused)."""
    from interplab.circuits.metrics import TaskMetric
    from interplab.circuits.patching import bind_metric

    if not isinstance(metric, str | TaskMetric):
        raise InterplabError(
            f"metric must be a metric name ('logit_diff', 'kl', ...) or a TaskMetric, got "
            f"{type(metric).__name__}."
        )
    return bind_metric(model, task, metric)
