"""Indirect object identification: the circuit workflow of Wang et al. 2022 on an organism.

`interplab run ioi` follows "Interpretability in the Wild" (Wang et al. 2022) step by step
on held-out IOI prompts (`interplab.tasks.ioi`, ABBA and BABA orders, each with an ABC
corruption that renames all three name mentions):

1. the task: clean and corrupted logit difference IO - S and accuracy;
2. where the logit difference comes from: direct logit attribution (DLA) per head and MLP,
   and knocking out each head (corrupted -> clean activation patching), also per position;
3. name movers: heads with a large positive direct effect whose OV circuit copies the name
   it reads (copy score), and for each its attention from END to IO versus S1 / S2;
   negative name movers (negative direct effect, anti-copying OV) when present;
4. S-inhibition heads: path patching from every head into the name movers' queries;
5. duplicate-token and induction heads: attention from S2 to S1 and to S1 + 1, and path
   patching into the S-inhibition heads' keys and values where any head is upstream of them;
6. the found heads, with every MLP and the embeddings, as a node-induced `Circuit`, drawn,
   and its faithfulness under mean ablation (per-template means over the ABC prompts, as in
   Wang et al.) against random circuits with as many heads and the EAP top-edges circuit
   with as many edges.

Roles come from the scores and the thresholds in `Config`; no head is named in advance.
Every mean over prompts is shown with its standard error. Path patching lets a sender's
change pass through MLPs (Wang et al. freeze only the other attention heads).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from interplab.errors import InterplabError
from interplab.recipes._plots import annotate_heads

DESCRIPTION = (
    "IOI circuit (Wang et al. 2022) on an organism: DLA, head patching, name movers, "
    "S-inhibition and duplicate-token heads, the found circuit and its faithfulness."
)

ROLES = {"io_pos": "IO", "s1_pos": "S1", "s2_pos": "S2", "end_pos": "END"}
"""IOI metadata position -> label (the names' first and repeated mentions, the last token)."""

ATTENTION = {
    "END->IO": ("end_pos", "io_pos"),
    "END->S1": ("end_pos", "s1_pos"),
    "END->S2": ("end_pos", "s2_pos"),
    "S2->S1": ("s2_pos", "s1_pos"),
    "S2->S1+1": ("s2_pos", "s1_next"),
}
"""Attention scores read per prompt: (query position, key position) by metadata key."""


@dataclass
class Config:
    model: str = "storyworld-4l"
    """Organism name or local HF directory."""
    n: int = 128
    """IOI prompts (clean / ABC-corrupted pairs), half ABBA, half BABA on average."""
    split: Literal["train", "heldout"] = "heldout"
    """IOI frames: 'heldout' ones never occur in the organism's training text."""
    seed: int = 0
    """Seed for the prompts and the random baseline circuits."""
    by_pos: bool = True
    """Also knock out each head at each position, read at the IO, S1, S2 and END tokens."""
    direct_threshold: float = 0.05
    """A head has a direct effect when |its DLA| >= this fraction of the clean logit diff."""
    copy_z: float = 2.0
    """A head copies (anti-copies) names when its mean name-logit advantage is at least this
    many standard errors above (below) zero."""
    copy_k: int = 5
    """Copy score: fraction of prompts whose IO name is in the top copy_k of the task's names
    when the head's OV circuit reads the IO position (Wang et al. use top 5)."""
    path_threshold: float = 0.1
    """A path patching effect counts when the normalised logit diff drops by at least this
    much (1 = the whole clean - corrupted gap)."""
    attention_threshold: float = 0.2
    """Duplicate-token (S2 -> S1) and induction (S2 -> S1 + 1) heads: mean attention at least
    this."""
    n_random: int = 20
    """Random circuits (as many heads, drawn uniformly) for the faithfulness baseline."""
    eap: bool = True
    """Also score every edge with EAP and test the top edges as a circuit of the same size."""
    max_batch: int = 512
    """Most rows (prompt copies) per forward pass in patching sweeps."""
    fast: bool = False
    """Small settings (for tests): 24 prompts, no per-position patching, 5 random circuits."""
    device: str | None = None
    """cpu, cuda, cuda:N; None = cuda when present."""

    def __post_init__(self) -> None:
        if self.fast:
            self.n = min(self.n, 24)
            self.by_pos = False
            self.n_random = min(self.n_random, 5)
        for name in ("n", "copy_k", "n_random", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InterplabError(f"{name} must be a positive integer, got {value!r}.")
        if self.n < 2:
            raise InterplabError(
                f"n must be at least 2 (a standard error needs two prompts), got {self.n}."
            )
        for name in ("direct_threshold", "copy_z", "path_threshold", "attention_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InterplabError(f"{name} must be a number >= 0, got {value!r}.")
            if not math.isfinite(value):
                raise InterplabError(f"{name} must be finite, got {value!r}.")
        if self.attention_threshold > 1:
            raise InterplabError(
                f"attention_threshold is an attention probability in [0, 1], got "
                f"{self.attention_threshold!r}."
            )
        if self.split not in ("train", "heldout"):
            from interplab.errors import unknown

            raise unknown("IOI split", str(self.split), ("train", "heldout"), show_all=True)


# ---------------------------------------------------------------------- typed results
@dataclass
class HeadRoles:
    """Which heads the scores put in which role (labels 'L1H2'), and the circuit's heads."""

    name_movers: list[str] = field(default_factory=list)
    """Direct effect >= threshold and a copying OV circuit."""
    negative_name_movers: list[str] = field(default_factory=list)
    """Direct effect <= -threshold and an anti-copying OV circuit."""
    s_suppressors: list[str] = field(default_factory=list)
    """Direct effect >= threshold and an anti-copying OV circuit: to raise IO - S while
    writing minus the name it reads, such a head must read S (cf. copy suppression,
    McDougall et al. 2023)."""
    other_direct: list[str] = field(default_factory=list)
    """|Direct effect| >= threshold otherwise (the OV circuit neither copies nor anti-copies
    significantly, or it copies while lowering IO - S)."""
    s_inhibition: list[str] = field(default_factory=list)
    """Path patching into the name movers' queries >= threshold."""
    via_mlps: list[str] = field(default_factory=list)
    """Path patching to the logits through MLPs (no other head) >= threshold, in no role above."""
    upstream: dict[str, str] = field(default_factory=dict)
    """Heads whose path into the S-inhibition heads' keys or values >= threshold, with their
    kind: 'duplicate token', 'induction' or 'other'."""

    def role_of(self) -> dict[str, str]:
        """Head label -> its role (first match in the order the fields are listed)."""
        out: dict[str, str] = {}
        for role, heads in (
            ("name mover", self.name_movers),
            ("negative name mover", self.negative_name_movers),
            ("S-inhibition", self.s_inhibition),
            ("S-suppression", self.s_suppressors),
            ("direct, other", self.other_direct),
            ("to logits via MLPs", self.via_mlps),
        ):
            for head in heads:
                out.setdefault(head, role)
        for head, kind in self.upstream.items():
            out.setdefault(head, f"upstream ({kind})")
        return out

    @property
    def circuit_heads(self) -> list[str]:
        """Every head with a role, in layer / head order."""
        return sorted(self.role_of(), key=_head_key)


def _head_key(label: str) -> tuple[int, int]:
    layer, head = label[1:].split("H")
    return int(layer), int(head)


def _label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


# ---------------------------------------------------------------------- the recipe
def run(config: Config, run: Any) -> Any:
    import torch

    import interplab as il
    from interplab.runs import Report

    timings: dict[str, dict[str, float]] = {}
    with _timed(timings, "load model and prompts"):
        model = il.load_model(config.model, device=config.device)
        task = il.tasks.ioi(model, n=config.n, seed=config.seed, split=config.split)
    report = Report(
        "Indirect object identification: finding the circuit",
        subtitle=f"model: {config.model} · {len(task)} {config.split} IOI prompts",
    )
    report.text(
        'The workflow of Wang et al. 2022 ("Interpretability in the Wild") run on this '
        "organism. Every number below is a mean over prompts with its standard error (sem); "
        "effects on the logit difference are normalised so that 1 is the whole clean - "
        "corrupted gap. Roles are assigned from the scores with the thresholds listed in "
        "each section (`interplab run ioi --help` shows the flags); a small model need not "
        "have every role of GPT-2 small's circuit, and the last section says which were "
        "found."
    )
    state: dict[str, Any] = {"model": model, "task": task, "pos": _positions(task)}
    with torch.inference_mode():
        state["acts"] = _activations(model, task)
    stages = (
        ("1 task", _task_step),
        ("2 DLA and head patching", _heads_step),
        ("3 name movers", _name_mover_step),
        ("4 S-inhibition", _s_inhibition_step),
        ("5 duplicate-token and induction", _duplicate_step),
        ("6 circuit and faithfulness", _circuit_step),
        ("7 self-repair", _self_repair_step),
    )
    for label, stage in stages:
        with _timed(timings, label):
            stage(config, run, report, state)
    _summary(config, report, state)

    report.section("Timings")
    report.table(
        [{"stage": k, **v} for k, v in timings.items()],
        caption="seconds per stage: wall clock and CPU time of this process (all threads)",
        float_format="{:.2f}",
    )
    run.save_json("timings.json", timings)
    run.save_json("ioi-circuit.json", _results_json(state))
    roles = state["roles"]
    print(f"IOI circuit heads: {', '.join(roles.circuit_heads) or '(none)'}")
    faith = state["faithfulness"]
    print(
        f"faithfulness {faith['found'].mean:.3f} ± {faith['found'].sem:.3f} (sem); random "
        f"circuits {faith['random_mean']:.3f} ± {faith['random_std']:.3f} (std)"
    )
    return report


@contextmanager
def _timed(timings: dict[str, dict[str, float]], label: str) -> Iterator[None]:
    clock, cpu = time.perf_counter(), time.process_time()
    yield
    timings[label] = {"wall s": time.perf_counter() - clock, "CPU s": time.process_time() - cpu}


# ---------------------------------------------------------------------- shared measurements
def _positions(task: Any) -> dict[str, Any]:
    """Per-prompt token positions [batch] of IO, S1, S2, END and the token after S1."""
    import torch

    out = {key: torch.tensor([m[key] for m in task.metadata]) for key in ROLES}
    out["s1_next"] = out["s1_pos"] + 1
    return out


def _activations(model: Any, task: Any) -> dict[str, Any]:
    """Clean-run patterns, values, head outputs and final-norm scale; ABC-run patterns."""
    from interplab.circuits.capture import capture

    n_layers = model.cfg.n_layers
    names = [f"blocks.{layer}.attn.hook_{kind}" for layer in range(n_layers) for kind in "vz"]
    patterns = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    extra = ["ln_final.hook_scale"] if "ln_final.hook_scale" in model.hook_dict else []
    device = next(model.parameters()).device
    _, clean = capture(model, task.clean_tokens.to(device), names + patterns + extra)
    _, corrupted = capture(model, task.corrupted_tokens.to(device), patterns)
    return {"clean": clean, "corrupted": corrupted}


def _attention(model: Any, acts: dict[str, Any], pos: dict[str, Any]) -> dict[str, Any]:
    """Attention probability per (query, key) pair of `ATTENTION`: [layer, head, batch]."""
    import torch

    rows = torch.arange(pos["end_pos"].shape[0])
    out = {}
    for name, (query, key) in ATTENTION.items():
        per_layer = []
        for layer in range(model.cfg.n_layers):
            pattern = acts[f"blocks.{layer}.attn.hook_pattern"].float().cpu()  # b h q k
            per_layer.append(pattern[rows, :, pos[query], pos[key]].T)  # [head, batch]
        out[name] = torch.stack(per_layer)
    return out


def _estimates(values: Any) -> tuple[Any, Any]:
    """Mean and sem over the last axis (examples) of a [..., batch] tensor."""
    x = values.double()
    n = x.shape[-1]
    mean = x.mean(-1)
    sem = x.std(-1) / math.sqrt(n) if n > 1 else mean * math.nan
    return mean.float(), sem.float()


def _centred(model: Any, x: Any) -> Any:
    """`x` [..., d_model] centred as the final norm centres its input (LayerNorm does, RMSNorm
    does not), so that a fixed readout vector reads it like the model does."""
    if getattr(model.cfg, "normalization_type", None) in ("LN", "LNPre"):
        return x - x.mean(-1, keepdim=True)
    return x


def _paired_drop(result: Any) -> Any:
    """Per example, how much a noising patch lowers the logit diff, on the normalised scale:
    (clean_b - patched_b) / (clean - corrupted). [..., batch]. Pairing with each prompt's own
    clean value removes the prompt-to-prompt spread from the error bars."""
    span = result.clean.mean - result.corrupted.mean
    if span == 0 or not math.isfinite(span):
        raise InterplabError(
            "the corruption does not change the logit difference on these prompts, so no "
            "effect can be normalised; try --split train or more prompts."
        )
    clean = result.clean.per_example.double()
    return (clean - result.per_example.double()) / span


def _copy_scores(
    model: Any, task: Any, acts: dict[str, Any], pos: dict[str, Any], k: int
) -> dict[str, Any]:
    """Copy scores of every head's OV circuit at the IO position (Wang et al. 2022, sec. 3.1).

    The head's value vector at the IO token (what it would move if it attended there) goes
    through W_O, the final norm's weight (centred, scale left out: ranks do not depend on it)
    and the unembedding. Restricted to the task's name tokens, the IO name's logit gives
    - `copy`: fraction of prompts where the IO name is in the top k names (Wang et al. use
      the residual after the first MLP and the whole vocabulary; a 4-layer model's heads rank
      a name far below other tokens, so names are compared with names);
    - `anti`: the same for the negated output (negative copying);
    - `advantage`: the IO name's logit minus the mean name logit, in standard deviations of
      the name logits, [layer, head, batch] (> 0: the head copies the name).
    """
    import torch

    from interplab.models.accessor import weights

    w = weights(model)
    names = torch.unique(torch.cat([task.answers.cpu(), task.wrong_answers.reshape(-1).cpu()]))
    own = (names[None, :] == task.answers.cpu()[:, None]).float().argmax(1)  # [batch]
    readout = (w.ln_final_w.float()[:, None] * w.W_U.float()[:, names]).cpu()  # d_model names
    rows = torch.arange(len(task))
    copy, anti, advantage = [], [], []
    for layer in range(model.cfg.n_layers):
        v = acts[f"blocks.{layer}.attn.hook_v"].float().cpu()[rows, pos["io_pos"]]  # b kv d_head
        # grouped-query attention: query head h reads key/value head h // group
        v = v.repeat_interleave(model.cfg.n_heads // v.shape[1], dim=1)
        out = _centred(model, torch.einsum("bhe,hed->bhd", v, w.W_O[layer].float().cpu()))
        logits = out @ readout  # [batch, head, names]
        mine = logits.gather(-1, own[:, None, None].expand(-1, logits.shape[1], 1))
        higher = (logits > mine).sum(-1)  # [batch, head]
        lower = (logits < mine).sum(-1)
        copy.append((higher < k).float().mean(0))
        anti.append((lower < k).float().mean(0))
        z = (mine[..., 0] - logits.mean(-1)) / logits.std(-1).clamp_min(1e-12)
        advantage.append(z.T)  # [head, batch]
    return {
        "copy": torch.stack(copy),
        "anti": torch.stack(anti),
        "advantage": torch.stack(advantage),
        "n_names": len(names),
        "chance": min(1.0, k / len(names)),
    }


# ---------------------------------------------------------------------- 1. the task
def _task_step(config: Config, run: Any, report: Any, state: dict) -> None:
    import torch

    from interplab.circuits import Estimate, answer_logits, score

    model, task = state["model"], state["task"]
    diff = score(model, task, "logit_diff")
    top1 = score(model, task, "accuracy")
    with torch.inference_mode():
        device = next(model.parameters()).device
        logits = model(task.clean_tokens.to(device))
        predicted = answer_logits(logits, task.answer_pos.to(device)).argmax(-1).cpu()
    common = torch.mode(predicted).values
    count = int((predicted == common).sum())
    state["score"] = diff
    gap = Estimate.of(diff.clean.per_example - diff.corrupted.per_example)
    if diff.clean.mean - diff.corrupted.mean == 0:
        raise InterplabError("clean and corrupted logit differences are equal; nothing to explain.")
    abba = torch.tensor([m["order"] == "ABBA" for m in task.metadata])
    rows = []
    for label, mask in (("all", torch.ones_like(abba)), ("ABBA", abba), ("BABA", ~abba)):
        if int(mask.sum()) < 2:
            continue
        clean = Estimate.of(diff.clean.per_example[mask])
        corrupted = Estimate.of(diff.corrupted.per_example[mask])
        rows.append(
            {
                "prompts": label,
                "n": clean.n,
                "clean logit diff": clean.mean,
                "± sem": clean.sem,
                "corrupted logit diff": corrupted.mean,
                "± sem ": corrupted.sem,
                "IO > S (clean)": float((diff.clean.per_example[mask] > 0).float().mean()),
                "top-1 = IO (clean)": float(top1.clean.per_example[mask].mean()),
            }
        )
    report.section("1. The task")
    meta = task.metadata[0]
    report.text(
        f"{len(task)} IOI prompts from the **{config.split}** frames (seed {config.seed}), "
        f"{int(abba.sum())} ABBA and {int((~abba).sum())} BABA, e.g. `{task.prompts[0]}` -> "
        f"`{model.to_string(int(task.answers[0]))}` (IO {meta['io']}, S {meta['s']}). The "
        f"corrupted twin renames all three name mentions (ABC: `{task.corrupted_prompts[0]}`), "
        "so it carries no information about who the IO is. Metric: logit(IO) - logit(S) at the "
        f"last token (END). Clean: **{diff.clean.mean:.3f} ± {diff.clean.sem:.3f}**; "
        f"corrupted: {diff.corrupted.mean:.3f} ± {diff.corrupted.sem:.3f}; paired gap "
        f"{gap.mean:.3f} ± {gap.sem:.3f} (std over prompts {diff.clean.std:.2f}). The model "
        f"ranks IO above S on {rows[0]['IO > S (clean)']:.0%} of the clean prompts and puts IO "
        f"first among all tokens on {rows[0]['top-1 = IO (clean)']:.0%} (its most frequent "
        f"top-1 prediction is `{model.to_string(int(common))}`, on {count} of {len(task)} "
        "prompts): the logit difference, not the top-1 token, is what the circuit explains."
    )
    report.table(rows, caption="logit difference IO - S per prompt order (mean, sem)")
    run.save_figure("task", _task_figure(diff, abba))
    report.figure(
        run.path("figures/task.png"),
        caption="Per-prompt logit difference IO - S on the clean and the ABC-corrupted prompts",
    )
    run.log(
        step=None,
        logit_diff_clean=diff.clean.mean,
        logit_diff_clean_sem=diff.clean.sem,
        logit_diff_corrupted=diff.corrupted.mean,
        accuracy_io_over_s=rows[0]["IO > S (clean)"],
    )


def _task_figure(diff: Any, abba: Any) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    clean, corrupted = diff.clean.per_example, diff.corrupted.per_example
    low = float(min(clean.min(), corrupted.min()))
    high = float(max(clean.max(), corrupted.max()))
    bins = [low + (high - low) * i / 30 for i in range(31)]
    ax.hist(corrupted.numpy(), bins=bins, alpha=0.5, label="corrupted (ABC)", color="0.5")
    ax.hist(clean[abba].numpy(), bins=bins, alpha=0.6, label="clean ABBA", color="tab:blue")
    ax.hist(clean[~abba].numpy(), bins=bins, alpha=0.6, label="clean BABA", color="tab:orange")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("logit(IO) - logit(S)")
    ax.set_ylabel("prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------- 2. DLA and patching
def _heads_step(config: Config, run: Any, report: Any, state: dict) -> None:
    import torch

    from interplab.circuits import direct_logit_attribution, patch_heads

    model, task = state["model"], state["task"]
    dla = direct_logit_attribution(model, task)
    state["dla"] = dla
    knock = patch_heads(model, task, "z", direction="noise", max_batch=config.max_batch)
    drop_mean, drop_sem = _estimates(_paired_drop(knock))
    state["knockout"] = (drop_mean, drop_sem)
    by_role = {}
    if config.by_pos:
        per_pos = patch_heads(
            model, task, "z", by_pos=True, direction="noise", max_batch=config.max_batch
        )
        drops = _paired_drop(per_pos)  # [layer, head, pos, batch]
        batch = torch.arange(drops.shape[-1])
        for key, role in ROLES.items():
            by_role[role] = _estimates(drops[:, :, state["pos"][key], batch])
    state["knockout_by_role"] = by_role

    clean = state["score"].clean.mean
    mlp = dla.mlp.double()
    report.section("2. Direct logit attribution and head knockouts")
    heads_total = float(dla.heads.sum((0, 1)).mean())
    report.text(
        "**Direct logit attribution** splits the clean logit difference exactly into each "
        "head's and MLP's share (final LayerNorm scale frozen at its clean value). Of "
        f"{clean:.3f}, the heads together write {heads_total:.3f} directly and the MLPs "
        + ", ".join(
            f"MLP{i} {float(mlp[i].mean()):.3f} ± {float(mlp[i].std() / math.sqrt(mlp.shape[1])):.3f}"
            for i in range(mlp.shape[0])
        )
        + ".\n\n**Knockouts**: each head's output (`attn.hook_z`) is replaced by its value on "
        "the ABC prompt (corrupted -> clean, i.e. noising), one head at a time. The number is "
        "the drop of the logit difference, normalised by the clean - corrupted gap and paired "
        "per prompt: 1 = the head's corruption alone removes the whole behaviour, 0 = no "
        "effect."
    )
    run.save_figure("dla", dla.plot())
    report.figure(
        run.path("figures/dla.png"),
        caption="Direct logit attribution of the clean logit difference: each head (left, "
        "mean over prompts) and each MLP (right)",
    )
    panels = [("knockout, all positions", drop_mean)]
    panels += [(f"knockout at {role} only", m) for role, (m, _) in by_role.items()]
    run.save_figure("knockouts", _grid_figure(panels, "drop of normalised logit diff"))
    caption = "Drop of the normalised logit difference when one head is corrupted"
    if by_role:
        caption += (
            "; the other panels corrupt the head at one token only (IO, S1, S2, END), read "
            "per prompt since frames differ in length"
        )
    report.figure(run.path("figures/knockouts.png"), caption=caption)
    dla_mean, dla_sem = _estimates(dla.heads)
    rows = []
    order = drop_mean.flatten().abs().argsort(descending=True).tolist()
    n_heads = model.cfg.n_heads
    for flat in order[:8]:
        layer, head = divmod(flat, n_heads)
        row = {
            "head": _label(layer, head),
            "knockout drop": float(drop_mean[layer, head]),
            "± sem": float(drop_sem[layer, head]),
            "DLA": float(dla_mean[layer, head]),
            "DLA ± sem": float(dla_sem[layer, head]),
        }
        for role, (m, _s) in by_role.items():
            row[f"at {role}"] = float(m[layer, head])
        rows.append(row)
    report.table(rows, caption="the heads whose knockout matters most (sem over prompts)")


def _grid_figure(panels: list[tuple[str, Any]], label: str, shared: bool = True) -> Any:
    """Layer x head heatmaps side by side, each value written in its cell; one symmetric
    colour scale for all panels (`shared`) or one per panel."""
    import matplotlib.pyplot as plt

    top = max(float(v.abs().max()) for _, v in panels) or 1.0
    n_layers, n_heads = panels[0][1].shape
    width = 0.45 * n_heads + (1.0 if shared else 1.8)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(width * len(panels) + 1.4, 0.45 * n_layers + 1.7), squeeze=False
    )
    image = None
    for ax, (title, values) in zip(axes[0], panels, strict=True):
        grid = values.float().cpu().numpy()
        span = top if shared else (float(abs(grid).max()) or 1.0)
        image = ax.imshow(grid, cmap="RdBu", vmin=-span, vmax=span, aspect="auto")
        if not shared:
            fig.colorbar(image, ax=ax, shrink=0.9)
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.set_xlabel("head")
        annotate_heads(ax, grid, span)
    axes[0][0].set_ylabel("layer")
    if shared:
        fig.colorbar(image, ax=list(axes[0]), shrink=0.9, label=label)
    return fig


# ---------------------------------------------------------------------- 3. name movers
def _name_mover_step(config: Config, run: Any, report: Any, state: dict) -> None:
    from interplab.circuits import path_patch

    model, task, pos = state["model"], state["task"], state["pos"]
    acts = state["acts"]["clean"]
    attention = _attention(model, acts, pos)
    state["attention"] = attention
    state["attention_abc"] = _attention(model, state["acts"]["corrupted"], pos)
    copy = _copy_scores(model, task, acts, pos, config.copy_k)
    state["copy"] = copy
    logits_path = path_patch(
        model, task, None, "logits", via="mlps", direction="noise", max_batch=config.max_batch
    )
    state["logits_path"] = _estimates(_paired_drop(logits_path))
    dla_mean, _ = _estimates(state["dla"].heads)
    adv_mean, adv_sem = _estimates(copy["advantage"])
    clean = state["score"].clean.mean
    cut = config.direct_threshold * abs(clean)
    roles = _direct_roles(dla_mean, adv_mean / adv_sem.clamp_min(1e-12), cut, config.copy_z)
    state["roles"] = roles

    report.section("3. Name movers")
    report.text(
        "Wang et al. find name movers as heads with a large direct effect on the logits that "
        "attend from END to the IO name and copy it. Here a head is a **name mover** when its "
        f"direct logit attribution is at least {config.direct_threshold:g} x the clean logit "
        f"diff (>= {cut:.3f}) and its OV circuit copies names: the IO name's logit, when the "
        "head's value at the IO token is read through W_O and the unembedding, is above the "
        f"mean name logit by >= {config.copy_z:g} standard errors over prompts (the "
        f"*advantage*, in standard deviations of the {copy['n_names']} name logits). A "
        "**negative name mover** has DLA <= -threshold and an anti-copying OV circuit; an "
        "**S-suppression head** has DLA >= threshold and an anti-copying OV circuit (to raise "
        "IO - S while writing minus the name it reads, it must read S). The "
        f"copy score (Wang et al.) is the fraction of prompts whose IO name is in the top "
        f"{config.copy_k} of the names (chance {copy['chance']:.2f}); attention is never used "
        "to select, so the END -> IO versus END -> S attention below is a test of the role. "
        "The *path to logits* column is the drop when only the head's path to the logits "
        "(through MLPs, not through other heads) is corrupted."
    )
    lines = []
    for kind, heads in (
        ("name movers", roles.name_movers),
        ("negative name movers", roles.negative_name_movers),
        ("S-suppression heads", roles.s_suppressors),
        ("other heads with a direct effect", roles.other_direct),
    ):
        lines.append(f"- {kind}: {', '.join(heads) if heads else 'none'}")
    report.text("\n".join(lines))
    path_mean, _ = state["logits_path"]
    att_rows = _head_rows(state)
    state["head_rows"] = att_rows
    report.table(
        sorted(att_rows, key=lambda r: -abs(r["DLA"])),
        caption="every head, by |DLA|: direct effect, path to logits (normalised drop), "
        "attention from END (mean probability), copy scores",
        float_format="{:.3f}",
    )
    panels = [
        ("DLA / clean logit diff", dla_mean / abs(clean)),
        ("path to logits (drop)", path_mean),
        ("OV copy advantage (std)", adv_mean),
    ]
    run.save_figure("name-mover-scores", _grid_figure(panels, "", shared=False))
    report.figure(
        run.path("figures/name-mover-scores.png"),
        caption="Direct effect (DLA as a fraction of the clean logit diff), path-patching drop "
        "to the logits, and the OV copy advantage (standard deviations of the name logits); "
        "each panel has its own colour scale",
    )
    movers = roles.name_movers + roles.negative_name_movers + roles.s_suppressors
    if movers:
        run.save_figure("name-mover-attention", _mover_figure(model, state, movers))
        report.figure(
            run.path("figures/name-mover-attention.png"),
            caption="Name movers, negative name movers and S-suppression heads. Top: mean "
            "attention from END to IO, S1 and S2 (± sem). Bottom: per "
            "prompt, attention to a name against the head's direct write onto that name's "
            "logit (its output at END dotted with the name's unembedding through the frozen "
            "final norm), as in Wang et al. Fig. 3",
        )
        lines = []
        for head in movers:
            row = next(r for r in att_rows if r["head"] == head)
            io, s1, s2 = row["END->IO"], row["END->S1"], row["END->S2"]
            wants_io = head not in roles.s_suppressors
            if (io > max(s1, s2)) == wants_io:
                verdict = "attends as its role predicts: " + (
                    "more to IO than to either S mention" if wants_io else "more to S than to IO"
                )
            else:
                verdict = (
                    "**does not** attend as its role predicts (" + ("IO" if wants_io else "S") + ")"
                )
            lines.append(
                f"- {head}: END -> IO {io:.3f} ± {row['END->IO ± sem']:.3f}, END -> S1 "
                f"{s1:.3f} ± {row['END->S1 ± sem']:.3f}, END -> S2 {s2:.3f} ± "
                f"{row['END->S2 ± sem']:.3f} ({verdict}); copy score "
                f"{row['copy score']:.2f} (chance {copy['chance']:.2f}), advantage "
                f"{row['advantage']:.2f} ± {row['advantage ± sem']:.2f}"
            )
        report.text("\n".join(lines))
    else:
        report.text(
            "No head passes both criteria, so no name mover is reported; the table shows how "
            "close each head comes."
        )
    share = float(state["dla"].mlp.sum(0).mean())
    report.text(
        f"Reading: the MLPs write {share:.3f} of the {clean:.3f} clean logit difference "
        "directly, so in this model the heads' job is partly to bring name information to "
        "END, where MLPs turn it into logits; the *path to logits* column counts that route "
        "(heads whose effect travels through MLPs show a large path drop and a small DLA)."
    )


def _direct_roles(dla: Any, copy_t: Any, cut: float, copy_z: float) -> HeadRoles:
    """Roles from the direct effect (DLA [layer, head]) and the OV copy advantage in standard
    errors (`copy_t`): the sign of each says which name the head must read to have its
    effect, so attention stays free to test the role."""
    roles = HeadRoles()
    n_layers, n_heads = dla.shape
    for layer in range(n_layers):
        for head in range(n_heads):
            d, t = float(dla[layer, head]), float(copy_t[layer, head])
            label = _label(layer, head)
            if d >= cut and t >= copy_z:
                roles.name_movers.append(label)
            elif d <= -cut and t <= -copy_z:
                roles.negative_name_movers.append(label)
            elif d >= cut and t <= -copy_z:
                roles.s_suppressors.append(label)
            elif abs(d) >= cut:
                roles.other_direct.append(label)
    return roles


def _head_rows(state: dict) -> list[dict[str, Any]]:
    """One row per head: DLA, path to logits, attention from END, copy scores (mean, sem)."""
    dla_mean, dla_sem = _estimates(state["dla"].heads)
    path_mean, path_sem = state["logits_path"]
    adv_mean, adv_sem = _estimates(state["copy"]["advantage"])
    attention, copy = state["attention"], state["copy"]
    rows = []
    for layer in range(dla_mean.shape[0]):
        for head in range(dla_mean.shape[1]):
            row: dict[str, Any] = {"head": _label(layer, head)}
            row["DLA"] = float(dla_mean[layer, head])
            row["DLA ± sem"] = float(dla_sem[layer, head])
            row["path to logits"] = float(path_mean[layer, head])
            row["path ± sem"] = float(path_sem[layer, head])
            for name in ("END->IO", "END->S1", "END->S2"):
                mean, sem = _estimates(attention[name][layer, head])
                row[name] = float(mean)
                row[f"{name} ± sem"] = float(sem)
            row["copy score"] = float(copy["copy"][layer, head])
            row["negative copy score"] = float(copy["anti"][layer, head])
            row["advantage"] = float(adv_mean[layer, head])
            row["advantage ± sem"] = float(adv_sem[layer, head])
            rows.append(row)
    return rows


def _mover_figure(model: Any, state: dict, heads: list[str]) -> Any:
    import matplotlib.pyplot as plt
    import torch

    from interplab.models.accessor import weights

    task, pos, attention = state["task"], state["pos"], state["attention"]
    acts = state["acts"]["clean"]
    w = weights(model)
    rows = torch.arange(len(task))
    end = pos["end_pos"]
    scale = acts.get("ln_final.hook_scale")
    scale = scale.float().cpu()[rows, end, 0] if scale is not None else torch.ones(len(task))
    fig, axes = plt.subplots(2, len(heads), figsize=(3.6 * len(heads) + 0.5, 6.4), squeeze=False)
    for i, label in enumerate(heads):
        layer, head = _head_key(label)
        ax = axes[0][i]
        names = ("END->IO", "END->S1", "END->S2")
        est = [_estimates(attention[n][layer, head]) for n in names]
        ax.bar(
            range(3),
            [float(m) for m, _ in est],
            yerr=[float(s) for _, s in est],
            capsize=3,
            color=["tab:green", "tab:red", "tab:purple"],
        )
        ax.set_xticks(range(3), ["IO", "S1", "S2"])
        ax.set_ylabel("attention from END")
        ax.set_title(label)
        z = acts[f"blocks.{layer}.attn.hook_z"].float().cpu()[rows, end, head]  # [batch, d_head]
        out = _centred(model, z @ w.W_O[layer, head].float().cpu())
        lnw = w.ln_final_w.float().cpu()
        W_U = w.W_U.float().cpu()
        ax = axes[1][i]
        for name, key, tokens, colour in (
            ("IO", "END->IO", task.answers.cpu(), "tab:green"),
            ("S", "END->S2", task.wrong_answers.reshape(len(task), -1)[:, 0].cpu(), "tab:red"),
        ):
            written = ((out * lnw) * W_U[:, tokens].T).sum(-1) / scale
            ax.scatter(
                attention[key][layer, head].numpy(),
                written.numpy(),
                s=8,
                alpha=0.6,
                color=colour,
                label=f"{name} ({key})",
            )
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel("attention probability")
        ax.set_ylabel("direct write on the name's logit")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------- 4. S-inhibition
def _s_inhibition_step(config: Config, run: Any, report: Any, state: dict) -> None:
    from interplab.circuits import path_patch

    model, task, roles = state["model"], state["task"], state["roles"]
    report.section("4. S-inhibition heads")
    movers = roles.name_movers
    state["into_movers"] = None
    if not movers:
        report.text(
            "There are no name movers, so there are no name-mover queries to path patch into; "
            "S-inhibition heads cannot be identified this way."
        )
        return
    first = min(_head_key(h)[0] for h in movers)
    if first == 0:
        report.text(
            f"The name movers ({', '.join(movers)}) include layer 0, so no head can write "
            "into their queries."
        )
        return
    result = path_patch(
        model, task, None, movers, "q", via="mlps", direction="noise", max_batch=config.max_batch
    )
    drop_mean, drop_sem = _estimates(_paired_drop(result))
    state["into_movers"] = (drop_mean, drop_sem)
    attention, abc = state["attention"], state["attention_abc"]
    rows = []
    n_layers, n_heads = drop_mean.shape
    for layer in range(min(n_layers, max(_head_key(h)[0] for h in movers))):
        for head in range(n_heads):
            label = _label(layer, head)
            d = float(drop_mean[layer, head])
            if d >= config.path_threshold and label not in movers:
                roles.s_inhibition.append(label)
            s2, _ = _estimates(attention["END->S2"][layer, head])
            io, _ = _estimates(attention["END->IO"][layer, head])
            s2_abc, s2_abc_sem = _estimates(abc["END->S2"][layer, head])
            rows.append(
                {
                    "head": label,
                    "path into name-mover q": d,
                    "± sem": float(drop_sem[layer, head]),
                    "END->S2": float(s2),
                    "END->IO": float(io),
                    "END->S2 on ABC prompts": float(s2_abc),
                    "ABC ± sem": float(s2_abc_sem),
                }
            )
    rows.sort(key=lambda r: -r["path into name-mover q"])
    report.text(
        "Path patching (Wang et al. 2022): each head's output is set to its ABC-prompt value "
        "and that change may reach the name movers' **queries** only (directly or through "
        "MLPs; every other head is frozen at its clean output). An **S-inhibition head** "
        f"lowers the normalised logit difference by >= {config.path_threshold:g} this way. "
        "Found: "
        + (", ".join(roles.s_inhibition) if roles.s_inhibition else "none")
        + ". Wang et al.'s S-inhibition heads attend from END to S2; the last column repeats "
        "that attention on the ABC prompts, which have no repeated name: if it stays as high, "
        "the head finds S2 by position (the last name before END) rather than by duplication."
    )
    lines = []
    for label in roles.s_inhibition:
        layer, head = _head_key(label)
        clean_att = attention["END->S2"][layer, head]
        abc_att = abc["END->S2"][layer, head]
        diff_mean, diff_sem = _estimates(clean_att - abc_att)
        ratio = float(abc_att.mean() / clean_att.mean().clamp_min(1e-12))
        lines.append(
            f"- {label}: END -> S2 {float(clean_att.mean()):.3f} on clean prompts, "
            f"{float(abc_att.mean()):.3f} on ABC prompts at the same position ({ratio:.0%} of "
            f"it; paired difference {float(diff_mean):.3f} ± {float(diff_sem):.3f})"
        )
    if lines:
        report.text("\n".join(lines))
    run.save_figure(
        "s-inhibition", _grid_figure([("path into name-mover queries", drop_mean)], "drop")
    )
    report.figure(
        run.path("figures/s-inhibition.png"),
        caption=f"Drop of the normalised logit difference when a head's path into the queries "
        f"of {', '.join(movers)} is corrupted (heads at or after the name movers' layer have "
        "no such path: 0)",
    )
    report.table(rows, caption="heads upstream of the name movers (mean, sem over prompts)")


# ---------------------------------------------------------------------- 5. duplicate / induction
def _duplicate_step(config: Config, run: Any, report: Any, state: dict) -> None:
    from interplab.circuits import path_patch

    model, task, roles, pos = state["model"], state["task"], state["roles"], state["pos"]
    attention = state["attention"]
    dup_mean, dup_sem = _estimates(attention["S2->S1"])
    ind_mean, ind_sem = _estimates(attention["S2->S1+1"])
    uniform = float((1.0 / (pos["s2_pos"].double() + 1)).mean())
    n_layers, n_heads = dup_mean.shape
    dup = [
        _label(layer, head)
        for layer in range(n_layers)
        for head in range(n_heads)
        if dup_mean[layer, head] >= config.attention_threshold
    ]
    ind = [
        _label(layer, head)
        for layer in range(n_layers)
        for head in range(n_heads)
        if ind_mean[layer, head] >= config.attention_threshold
    ]
    state["duplicate_heads"], state["induction_heads"] = dup, ind
    report.section("5. Duplicate-token and induction heads")
    report.text(
        "Duplicate-token heads attend from S2 to its earlier copy S1; induction heads attend "
        "from S2 to the token after S1. Both tell later heads that S is repeated. Threshold: "
        f"mean attention >= {config.attention_threshold:g} (uniform attention over the "
        f"prefix would give {uniform:.3f} on average). Duplicate-token heads: "
        f"{', '.join(dup) or 'none'}; induction heads: {', '.join(ind) or 'none'}."
    )
    run.save_figure(
        "duplicate-induction",
        _grid_figure(
            [("S2 -> S1 (duplicate)", dup_mean), ("S2 -> S1+1 (induction)", ind_mean)], "attention"
        ),
    )
    report.figure(
        run.path("figures/duplicate-induction.png"),
        caption="Mean attention from S2 to S1 and from S2 to the token after S1, per head",
    )
    rows = [
        {
            "head": _label(layer, head),
            "S2->S1": float(dup_mean[layer, head]),
            "± sem": float(dup_sem[layer, head]),
            "S2->S1+1": float(ind_mean[layer, head]),
            "± sem ": float(ind_sem[layer, head]),
        }
        for layer in range(n_layers)
        for head in range(n_heads)
    ]
    rows.sort(key=lambda r: -max(r["S2->S1"], r["S2->S1+1"]))
    report.table(rows[:8], caption="the heads attending most from S2 to S1 or S1 + 1")
    targets = [h for h in roles.s_inhibition if _head_key(h)[0] > 0]
    state["into_s_inhibition"] = {}
    if not roles.s_inhibition:
        report.text(
            "No S-inhibition heads were found, so there is nothing to path patch into; the "
            "attention scores above are reported without a causal test."
        )
        return
    if not targets:
        report.text(
            f"The S-inhibition heads ({', '.join(roles.s_inhibition)}) are in layer 0, so no "
            "head is upstream of them: in this model whatever marks S as the name to inhibit "
            "does not need an earlier duplicate-token or induction head (see the ABC column "
            "of section 4). The attention scores above are therefore not part of the circuit."
        )
        return
    drops = {}
    for port in ("k", "v"):
        result = path_patch(
            model,
            task,
            None,
            targets,
            port,
            via="mlps",
            direction="noise",
            max_batch=config.max_batch,
        )
        drops[port] = _estimates(_paired_drop(result))
    state["into_s_inhibition"] = drops
    last = max(_head_key(h)[0] for h in targets)
    for layer in range(last):
        for head in range(n_heads):
            label = _label(layer, head)
            effect = max(float(drops[p][0][layer, head]) for p in drops)
            if effect < config.path_threshold or label in roles.s_inhibition:
                continue
            kind = "duplicate token" if label in dup else "induction" if label in ind else "other"
            roles.upstream[label] = kind
    report.text(
        f"Path patching into the keys and the values of {', '.join(targets)} (the "
        "S-inhibition heads with heads upstream): heads whose drop is >= "
        f"{config.path_threshold:g} join the circuit as upstream heads: "
        + (", ".join(f"{h} ({k})" for h, k in roles.upstream.items()) or "none")
        + "."
    )
    panels = [(f"path into S-inhibition {p}", drops[p][0]) for p in drops]
    run.save_figure("into-s-inhibition", _grid_figure(panels, "drop"))
    report.figure(
        run.path("figures/into-s-inhibition.png"),
        caption="Drop of the normalised logit difference when a head's path into the "
        "S-inhibition heads' keys (left) or values (right) is corrupted",
    )


# ---------------------------------------------------------------------- 6. the circuit
def _circuit_step(config: Config, run: Any, report: Any, state: dict) -> None:
    import torch

    from interplab.circuits import Circuit, Estimate, Graph

    model, task, roles = state["model"], state["task"], state["roles"]
    # the logits path through MLPs is a role too, so heads acting only via MLPs are kept
    path_mean, _ = state["logits_path"]
    known = set(roles.role_of())
    for layer in range(path_mean.shape[0]):
        for head in range(path_mean.shape[1]):
            label = _label(layer, head)
            if abs(float(path_mean[layer, head])) >= config.path_threshold and label not in known:
                roles.via_mlps.append(label)
    graph = Graph.from_model(model)
    heads = roles.circuit_heads
    found = _node_circuit(graph, heads, {"method": "ioi recipe", "heads": heads})
    mlps_only = _node_circuit(graph, [], {"method": "MLPs and embeddings only"})
    generator = torch.Generator().manual_seed(config.seed)
    n_total = graph.n_layers * graph.n_heads
    random_sets = []
    for _ in range(config.n_random):
        pick = torch.randperm(n_total, generator=generator)[: len(heads)].tolist()
        random_sets.append([_label(*divmod(i, graph.n_heads)) for i in pick])
    random_circuits = [_node_circuit(graph, s, {"method": "random"}) for s in random_sets]
    groups = _template_groups(task)
    eap_circuit = None
    if config.eap:
        scores = _eap_scores(model, task, groups)
        eap_circuit = Circuit.from_scores(
            graph, scores, top_n=found.n_edges, metadata={"method": "eap", "ablation": "mean"}
        )
    masks = [graph.full_mask(), torch.zeros_like(graph.full_mask()), found.mask()]
    masks += [found.complement().mask(), mlps_only.mask()]
    masks += [c.mask() for c in random_circuits]
    if eap_circuit is not None:
        masks.append(eap_circuit.mask())
    raw = _patched_values(model, task, groups, torch.stack(masks), config.max_batch)
    clean, empty = Estimate.of(raw[0]), Estimate.of(raw[1])
    span = clean.mean - empty.mean
    if span == 0 or not math.isfinite(span):
        raise InterplabError(
            "mean-ablating every edge leaves the logit difference unchanged; faithfulness "
            "cannot be normalised on these prompts."
        )

    def normalised(values: Any) -> Any:
        return Estimate.of((values.double() - empty.mean) / span)

    found_f = normalised(raw[2])
    complement_f = normalised(raw[3])
    mlps_f = normalised(raw[4])
    random_f = [normalised(raw[5 + i]) for i in range(len(random_circuits))]
    random_means = torch.tensor([e.mean for e in random_f], dtype=torch.float64)
    random_std = float(random_means.std()) if len(random_f) > 1 else math.nan
    eap_f = normalised(raw[-1]) if eap_circuit is not None else None
    beaten = int((random_means >= found_f.mean).sum())
    state["faithfulness"] = {
        "found": found_f,
        "complement": complement_f,
        "mlps_only": mlps_f,
        "random": random_f,
        "random_sets": random_sets,
        "random_mean": float(random_means.mean()),
        "random_std": random_std,
        "random_at_least_found": beaten,
        "eap": eap_f,
        "clean": clean,
        "empty": empty,
        "circuit": found,
        "eap_circuit": eap_circuit,
    }
    found.save(run.path("circuit.json"))
    if eap_circuit is not None:
        eap_circuit.save(run.path("eap-circuit.json"))

    report.section("6. The circuit and its faithfulness")
    role_of = roles.role_of()
    report.text(
        f"The circuit keeps the {len(heads)} heads found above ("
        + (", ".join(f"{h}: {role_of[h]}" for h in heads) or "none")
        + f"), every MLP and the embeddings: all {found.n_edges} edges of the model's graph "
        f"between them (of {graph.n_edges}). Heads whose path to the logits through MLPs "
        f"drops the logit diff by >= {config.path_threshold:g} but that have no other role "
        "are kept as 'to logits via MLPs'.\n\n"
        "**Faithfulness** (exact edge patching, `interplab.circuits.edge_patching`): every "
        "edge outside the circuit carries its sender's **mean output** over the ABC prompts of "
        "the same template (Wang et al. 2022), position by position; normalised so that 0 is "
        "every edge mean-ablated and 1 the clean model. Clean logit diff "
        f"{clean.mean:.3f} ± {clean.sem:.3f}; all edges ablated {empty.mean:.3f} ± "
        f"{empty.sem:.3f}.\n\n"
        f"- found circuit: **{found_f.mean:.3f} ± {found_f.sem:.3f}** (raw logit diff "
        f"{float(raw[2].mean()):.3f}, {found_f.mean:.0%} of the behaviour)\n"
        f"- {len(random_f)} random circuits with {len(heads)} heads (same MLPs and "
        f"embeddings): {float(random_means.mean()):.3f} ± {random_std:.3f} (std over "
        f"circuits); {beaten} of {len(random_f)} reach the found circuit\n"
        f"- MLPs and embeddings with no head: {mlps_f.mean:.3f} ± {mlps_f.sem:.3f}\n"
        f"- complement (every edge not in the circuit, the circuit's edges ablated): "
        f"{complement_f.mean:.3f} ± {complement_f.sem:.3f}"
        + (
            f"\n- EAP top {eap_circuit.n_edges} edges (as many edges; EAP with the same mean "
            f"ablation): {eap_f.mean:.3f} ± {eap_f.sem:.3f}"
            if eap_f is not None and eap_circuit is not None
            else ""
        )
    )
    run.save_figure("circuit", found.draw(title=f"found IOI circuit: {', '.join(heads)}"))
    report.figure(
        run.path("figures/circuit.png"),
        caption="The found circuit: the chosen heads, every MLP and the embeddings, with all "
        "graph edges between them (colour: the port an edge enters)",
    )
    run.save_figure("faithfulness", _faithfulness_figure(state["faithfulness"]))
    report.figure(
        run.path("figures/faithfulness.png"),
        caption="Faithfulness under mean ablation (± sem over prompts; random circuits: one "
        "dot each, bar = their mean)",
    )
    run.log(
        step=None,
        faithfulness=found_f.mean,
        faithfulness_sem=found_f.sem,
        faithfulness_random=float(random_means.mean()),
        n_circuit_heads=len(heads),
    )


def _self_repair_step(config: Config, run: Any, report: Any, state: dict) -> None:
    """Direct vs total effect of every head under resample ablation (interplab.circuits.
    self_repair): the exact split of the difference over later heads, MLPs and the final
    norm's scale."""
    from interplab.circuits import self_repair

    repair = self_repair(state["model"], state["task"], ablation="resample")
    state["self_repair"] = repair
    report.section("7. Self-repair")
    report.text(
        "Each head is resample-ablated on its own (its output taken from the prompt's "
        "corrupted twin). Its *direct* effect is the change of the logit difference through "
        "the unembedding with the final norm's scale frozen; the *total* effect is the change "
        "the model actually shows. The difference (compensation) splits exactly over later "
        "heads, later MLPs and the change of the final norm's scale (McGrath et al. 2023; "
        "Rushing & Nanda 2024). A compensation opposite in sign to the direct effect is "
        "self-repair; the same sign is amplification."
    )
    rows = sorted(repair.table(), key=lambda r: -abs(float(r.get("direct", 0.0))))
    report.table(
        rows[:8],
        caption="heads by |direct effect| (mean ± sem over prompts)",
        float_format="{:.3f}",
    )
    fig = repair.plot()
    run.save_figure("self_repair", fig)
    report.figure(run.path("figures/self_repair.png"), "direct vs total effect of each head")
    label = max(repair.heads, key=lambda h: abs(repair.direct(h).mean))
    fig = repair.plot_split(label)
    run.save_figure("self_repair_split", fig)
    report.figure(
        run.path("figures/self_repair_split.png"),
        f"where {label}'s compensation comes from (downstream heads, MLPs, final-norm scale)",
    )
    direct, total = repair.direct(label), repair.total(label)
    kind = "self-repair" if direct.mean * (total.mean - direct.mean) < 0 else "amplification"
    report.text(
        f"The head with the largest direct effect, {label}: direct {direct.mean:+.3f} ± "
        f"{direct.sem:.3f}, total {total.mean:+.3f} ± {total.sem:.3f} (sem): the rest of the "
        f"model gives {kind} (repair fraction {repair.repair_fraction(label):+.2f}; 1 = "
        "fully made up for, 0 = none, < 0 = amplified)."
    )


def _node_circuit(graph: Any, heads: list[str], metadata: dict[str, Any]) -> Any:
    """Every edge of `graph` among the embeddings, every MLP, `heads` and the logits."""
    import torch

    from interplab.circuits import Circuit

    send = torch.zeros(graph.n_senders, dtype=torch.bool)
    receive = torch.zeros(graph.n_receivers, dtype=torch.bool)
    send[0] = True
    receive[graph.logits_receiver] = True
    if graph.has_mlp:
        for layer in range(graph.n_layers):
            send[graph.mlp_sender(layer)] = True
            receive[graph.mlp_receiver(layer)] = True
    for label in heads:
        layer, head = _head_key(label)
        send[graph.head_sender(layer, head)] = True
        for port in ("q", "k", "v"):
            receive[graph.head_receiver(layer, head, port)] = True
    return Circuit(graph, send[:, None] & receive[None, :], metadata=dict(metadata))


def _template_groups(task: Any) -> list[list[int]]:
    """Prompt indices per template: mean ablation averages over one template's ABC prompts,
    so every position's mean is taken over tokens that play the same part."""
    groups: dict[int, list[int]] = {}
    for i, meta in enumerate(task.metadata):
        groups.setdefault(int(meta["template"]), []).append(i)
    return [groups[k] for k in sorted(groups)]


def _patched_values(
    model: Any, task: Any, groups: list[list[int]], masks: Any, max_batch: int
) -> Any:
    """Logit diff per mask and prompt [mask, batch] (prompt order of `task`), each template
    group mean-ablated with its own ABC prompts."""
    import torch

    from interplab.circuits.edge_patching import EdgePatcher

    out = torch.zeros(masks.shape[0], len(task), dtype=torch.float64)
    for index in groups:
        sub = task.select(index)
        patcher = EdgePatcher(
            model, sub, ablation="mean", reference=sub.corrupted_tokens, max_batch=max_batch
        )
        out[:, index] = patcher.values(masks).double()
    return out


def _eap_scores(model: Any, task: Any, groups: list[list[int]]) -> Any:
    """EAP scores (Syed et al. 2023) [sender, receiver], per template with that template's
    mean ablation, averaged over all prompts."""
    import torch

    from interplab.circuits import eap

    total = None
    for index in groups:
        sub = task.select(index)
        scores = eap(model, sub, ablation="mean", reference=sub.corrupted_tokens).per_example
        part = scores.double().sum(0)
        total = part if total is None else total + part
    assert total is not None
    return (total / len(task)).float().to(torch.float32)


def _faithfulness_figure(faith: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    bars = [("found circuit", faith["found"])]
    if faith["eap"] is not None:
        bars.append(("EAP, same #edges", faith["eap"]))
    bars += [("MLPs + embeddings", faith["mlps_only"]), ("complement", faith["complement"])]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    labels = [b[0] for b in bars] + ["random, same #heads"]
    for i, (_, est) in enumerate(bars):
        ax.barh(i, est.mean, xerr=est.sem, color="tab:blue" if i == 0 else "0.6", capsize=3)
    i = len(bars)
    random_means = [e.mean for e in faith["random"]]
    ax.barh(i, faith["random_mean"], color="0.85")
    ax.scatter(random_means, [i] * len(random_means), color="black", s=10, zorder=3)
    ax.axvline(1, color="tab:green", lw=1, ls="--", label="clean model")
    ax.axvline(0, color="tab:red", lw=1, ls="--", label="all edges ablated")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("faithfulness (normalised logit diff)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------- summary and outputs
def _summary(config: Config, report: Any, state: dict) -> None:
    roles, faith = state["roles"], state["faithfulness"]
    found = [
        ("name movers", roles.name_movers),
        ("negative name movers", roles.negative_name_movers),
        ("S-suppression heads", roles.s_suppressors),
        ("S-inhibition heads", roles.s_inhibition),
        ("duplicate-token / induction heads upstream of S-inhibition", list(roles.upstream)),
        ("other direct-effect heads", roles.other_direct),
        ("heads acting on the logits through MLPs", roles.via_mlps),
    ]
    lines = [
        f"- {kind}: {', '.join(heads) if heads else '**none found**'}" for kind, heads in found
    ]
    attention_only = sorted(
        set(state["duplicate_heads"] + state["induction_heads"]) - set(roles.upstream),
        key=_head_key,
    )
    report.section("Summary: which roles this model has")
    report.text(
        "\n".join(lines)
        + "\n\n"
        + (
            f"Heads with duplicate-token or induction attention but no causal path into "
            f"S-inhibition: {', '.join(attention_only)}. "
            if attention_only
            else ""
        )
        + f"The circuit of {len(roles.circuit_heads)} heads plus all MLPs and the embeddings "
        f"reaches faithfulness {faith['found'].mean:.3f} ± {faith['found'].sem:.3f} under mean "
        f"ablation, against {faith['random_mean']:.3f} ± {faith['random_std']:.3f} (std) for "
        f"random circuits with as many heads and {faith['mlps_only'].mean:.3f} with no head at "
        "all. This is a 4-layer, 4-head model, so the roles are compressed into few layers and "
        "the MLPs write most of the logit difference; the thresholds "
        f"(direct {config.direct_threshold:g} x clean logit diff, copy {config.copy_z:g} sem, "
        f"path {config.path_threshold:g}, attention {config.attention_threshold:g}) decide the "
        "borderline heads, and the tables above show every head's scores."
    )


def _results_json(state: dict) -> dict[str, Any]:
    """The numbers the report shows, as data (for tests and later analysis)."""
    roles, faith, score = state["roles"], state["faithfulness"], state["score"]

    def est(e: Any) -> dict[str, float] | None:
        return None if e is None else {"mean": e.mean, "sem": e.sem, "std": e.std, "n": e.n}

    return {
        "logit_diff": {"clean": est(score.clean), "corrupted": est(score.corrupted)},
        "roles": {
            "name_movers": roles.name_movers,
            "negative_name_movers": roles.negative_name_movers,
            "s_suppressors": roles.s_suppressors,
            "other_direct": roles.other_direct,
            "s_inhibition": roles.s_inhibition,
            "via_mlps": roles.via_mlps,
            "upstream": roles.upstream,
            "duplicate_token_attention": state["duplicate_heads"],
            "induction_attention": state["induction_heads"],
            "circuit_heads": roles.circuit_heads,
        },
        "heads": state["head_rows"],
        "faithfulness": {
            "found": est(faith["found"]),
            "complement": est(faith["complement"]),
            "mlps_only": est(faith["mlps_only"]),
            "random": [est(e) for e in faith["random"]],
            "random_sets": faith["random_sets"],
            "random_mean": faith["random_mean"],
            "random_std": faith["random_std"],
            "random_at_least_found": faith["random_at_least_found"],
            "eap": est(faith["eap"]),
            "clean": est(faith["clean"]),
            "empty": est(faith["empty"]),
            "n_edges": faith["circuit"].n_edges,
        },
        "self_repair": state["self_repair"].to_dict() if "self_repair" in state else None,
    }
