"""Replace one attention layer with an attention transcoder and look at its heads.

`interplab run attention-transcoder --layer 2` trains an attention transcoder
(`interplab.dictionaries.attention_transcoder`: many rank-1 OV heads on a few shared QK
patterns, top-k heads per position) to reproduce `blocks.L.hook_attn_out` from the layer's
input, evaluates it spliced into the model on held-out text (FVU, CE loss clean / spliced /
zero-ablated, CE recovered, each with a standard error over windows), compares it with the
untrained baseline of the layer's own heads cut into rank-1 pieces and cut to the same k
(where the architecture allows that decomposition), and shows the heads that write the most:
their top activations (destination token, the source token their pattern attends to most),
the tokens their output vector promotes, and their patterns on those contexts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from interplab.errors import InterplabError

DESCRIPTION = (
    "Attention transcoder for one layer: FVU and CE recovered spliced in, vs the layer's "
    "own rank-1 heads; top heads' patterns and tokens."
)


@dataclass
class Config:
    model: str = "storyworld-4l"
    """Organism name or local HF directory."""
    layer: int | None = None
    """Attention layer to replace; None = the middle layer (n_layers // 2)."""
    corpus: str = "storyworld"
    """Corpus for training (seed 0), evaluation (seed 1) and head examples (seed 2)."""
    n_heads: int = 256
    """Rank-1 OV heads of the transcoder."""
    n_qk: int = 8
    """QK groups (attention patterns) shared by the OV heads."""
    k: int = 16
    """OV heads active per position."""
    d_head_qk: int = 16
    """Query/key width of each group."""
    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 8
    """Windows per step."""
    context_size: int = 128
    """Tokens per window, BOS included."""
    lr: float = 3e-3
    """Peak learning rate."""
    qk_init: Literal["auto", "random", "layer"] = "auto"
    """Starting QK groups: the layer's own heads ("layer"), random, or "auto" (layer when
    the architecture allows)."""
    eval_tokens: int = 16_384
    """Held-out positions for the spliced evaluation."""
    n_show: int = 6
    """Heads shown (those that write the most: largest mean |latent|)."""
    examples: int = 4
    """Top activations listed per shown head."""
    fast: bool = False
    """Small settings (for tests)."""
    device: str | None = None
    """cpu, cuda, cuda:N; None = cuda when present."""

    def __post_init__(self) -> None:
        if self.fast:
            self.n_heads, self.n_qk = min(self.n_heads, 32), min(self.n_qk, 4)
            self.k = min(self.k, 4)
            self.steps = min(self.steps, 20)
            self.batch_size = min(self.batch_size, 4)
            self.context_size = min(self.context_size, 32)
            self.eval_tokens = min(self.eval_tokens, 512)
            self.n_show = min(self.n_show, 3)
        for name in ("n_heads", "n_qk", "k", "d_head_qk", "steps", "batch_size", "eval_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InterplabError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("n_show", "examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InterplabError(f"{name} must be an integer >= 0, got {value!r}.")


def run(config: Config, run: Any) -> Any:
    import interplab as il
    from interplab.dictionaries.attention_transcoder import (
        AttentionTrainConfig,
        AttentionTranscoder,
        AttentionTranscoderConfig,
        evaluate_attention_transcoder,
        save_attention_transcoder,
        train_attention_transcoder,
    )
    from interplab.runs import Report

    model = il.load_model(config.model, device=config.device)
    layer = model.cfg.n_layers // 2 if config.layer is None else config.layer
    context = min(config.context_size, int(model.cfg.n_ctx))
    shape = AttentionTranscoderConfig(
        n_heads=config.n_heads, n_qk=config.n_qk, k=config.k, d_head_qk=config.d_head_qk
    )
    train = AttentionTrainConfig(
        steps=config.steps,
        batch_size=config.batch_size,
        context_size=context,
        lr=config.lr,
        qk_init=config.qk_init,
        init_windows=min(64, config.steps * config.batch_size),
        device=config.device,
    )
    clock = time.perf_counter()
    transcoder = train_attention_transcoder(model, layer, config.corpus, shape, train, run=run)
    train_seconds = time.perf_counter() - clock
    transcoder.metadata["model_name"] = config.model
    save_attention_transcoder(transcoder, run.path("attention_transcoder"), overwrite=True)

    def evaluate(t: Any) -> Any:
        return evaluate_attention_transcoder(
            t, model, config.corpus, n_tokens=config.eval_tokens, context_size=context
        )

    result = evaluate(transcoder)
    run.save_json("evaluation", result.to_dict())
    rows = [_row("attention transcoder (trained)", result)]
    baseline_note = ""
    try:
        full = AttentionTranscoder.from_attention_layer(model, layer)
    except InterplabError as error:
        baseline_note = f"No rank-1 baseline for this architecture: {error}"
    else:
        cut = AttentionTranscoder.from_attention_layer(model, layer, k=min(config.k, full.n_heads))
        rows.append(_row(f"layer's own heads as rank-1 pieces, top-{cut.k}", evaluate(cut)))
        rows.append(_row(f"layer's own heads as rank-1 pieces, all {full.n_heads}", evaluate(full)))

    report = Report("Attention transcoder", subtitle=f"{config.model} · attention layer {layer}")
    final = transcoder.metadata["training"]["final"]
    report.text(
        f"An attention transcoder with {config.n_heads} rank-1 OV heads on {config.n_qk} QK "
        f"groups (d_head_qk {config.d_head_qk}), {config.k} heads active per position, trained "
        f"for {config.steps} steps of {config.batch_size} windows x {context} tokens "
        f"({transcoder.metadata['training']['tokens']:,} positions, {train_seconds:.0f} s, "
        f"QK start: {transcoder.metadata['training']['qk_init']}) to reproduce "
        f"`blocks.{layer}.hook_attn_out` from `{transcoder.metadata['hook_name']}`. "
        f"Final training FVU {final.get('fvu', math.nan):.3f}.\n\n"
        f"Evaluation on {result.n_windows} held-out windows (corpus seed 1): each window runs "
        "clean, with the layer's output replaced by the transcoder's, and with it zeroed. "
        "CE recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean). Values are means ± "
        "standard errors over windows; BOS is replaced but left out of the averages."
    )
    report.table(rows, caption="spliced-in evaluation, mean ± sem over windows")
    if baseline_note:
        report.text(baseline_note)
    run.log(step=None, **{k: v for k, v in result.summary().items() if isinstance(v, float)})

    if config.n_show:
        _show_heads(config, run, report, model, transcoder, context)
    report.metrics({"folder": str(Path(run.path("attention_transcoder")))}, caption="saved")
    return report


def _row(name: str, result: Any) -> dict[str, Any]:
    s = result.summary()
    return {
        "model": name,
        "L0": s["l0"],
        "FVU": f"{s['fvu']:.4f} ± {s['fvu_sem']:.4f}",
        "CE clean": f"{s['ce_clean']:.4f}",
        "CE spliced": f"{s['ce_spliced']:.4f} ± {s['ce_spliced_sem']:.4f}",
        "CE zero-ablated": f"{s['ce_zero']:.4f}",
        "CE recovered": f"{s['ce_recovered']:.4f} ± {s['ce_recovered_sem']:.4f}",
        "dead heads": s["dead_fraction"],
    }


def _show_heads(
    config: Config, run: Any, report: Any, model: Any, transcoder: Any, context: int
) -> None:
    """Top activations, promoted tokens and patterns of the heads that write the most."""
    import torch

    from interplab.data.corpus import pack
    from interplab.dictionaries.attention_transcoder import capture_attention_io
    from interplab.models.accessor import weights

    layer = transcoder.metadata["layer"]
    n_windows = max(1, math.ceil(config.eval_tokens / 4 / (context - 1)))
    windows = pack(config.corpus, model.tokenizer, context, n_windows, seed=2).ids
    latents, patterns = [], []
    with torch.no_grad():
        for start in range(0, windows.shape[0], 8):
            x, _ = capture_attention_io(model, windows[start : start + 8], layer)
            x = x.to(transcoder.W_O.device)
            latents.append(transcoder.encode(x).cpu())
            patterns.append(transcoder.patterns(x).cpu())
        z = torch.cat(latents)[:, 1:]  # window pos head (BOS left out)
        pattern = torch.cat(patterns)  # window group dst src
        strength = z.abs().mean((0, 1))
        heads = strength.argsort(descending=True)[: config.n_show].tolist()
        W_U = weights(model).W_U.detach().cpu().float()

    def token(i: int) -> str:
        return repr(model.tokenizer.decode([int(i)]))

    rows, panels = [], []
    for h in heads:
        g = h // transcoder.heads_per_group
        flat = z[..., h].abs().reshape(-1)
        top = flat.topk(min(config.examples, flat.numel())).indices
        examples = []
        for rank, idx in enumerate(top.tolist()):
            w, p = divmod(idx, z.shape[1])
            dst = p + 1
            src = int(pattern[w, g, dst, : dst + 1].argmax())
            examples.append(
                f"{token(windows[w, src])}@{src} -> {token(windows[w, dst])}@{dst} "
                f"(z={float(z[w, p, h]):+.2f})"
            )
            if rank == 0:
                panels.append((h, g, w, dst))
        active = z[..., h] != 0
        sign = 1.0 if float(z[..., h][active].sum()) >= 0 else -1.0
        promoted = (sign * transcoder.W_O[h].detach().cpu().float() @ W_U).topk(5).indices
        rows.append(
            {
                "head": h,
                "QK group": g,
                "density": float(active.float().mean()),
                "mean |z|": float(strength[h]),
                "top activations (source -> destination)": "; ".join(examples),
                "promotes (sign of typical z)": " ".join(token(i) for i in promoted.tolist()),
            }
        )
    report.section("Heads that write the most")
    report.text(
        f"The {len(heads)} heads with the largest mean |latent| over {z.shape[0] * z.shape[1]:,} "
        "fresh positions (corpus seed 2). For each top activation: the source token its "
        "group's pattern attends to most, the destination token, and the latent z. Promoted "
        "tokens are the largest entries of ±W_O[h] @ W_U (ignoring the final LayerNorm, so "
        "they rank tokens rather than give logit changes)."
    )
    report.table(rows)
    run.save_json("heads", rows)
    if panels:
        fig = _pattern_figure(panels, pattern, windows, token)
        run.save_figure("head_patterns", fig)
        report.figure(
            run.path("figures/head_patterns.png"),
            caption="each head's QK-group pattern on the context of its top activation "
            "(rows: destinations, columns: sources; last 16 positions up to the top one)",
        )


def _pattern_figure(panels: list, pattern: Any, windows: Any, token: Any) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (h, g, w, dst) in zip(axes.flat, panels, strict=False):
        lo = max(0, dst - 15)
        block = pattern[w, g, lo : dst + 1, lo : dst + 1].numpy()
        ax.imshow(block, cmap="Blues", vmin=0, vmax=max(float(block.max()), 1e-6))
        labels = [token(t)[1:-1][:8] for t in windows[w, lo : dst + 1].tolist()]
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.set_title(f"head {h} (group {g})", fontsize=9)
    fig.tight_layout()
    return fig
