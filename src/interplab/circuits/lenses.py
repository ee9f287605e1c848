"""Lenses on the residual stream: logit lens, direct logit attribution, attention patterns.

Logit lens (nostalgebraist 2020): read the residual stream entering each block (and the
final one) through the final normalisation and the unembedding, as if the model stopped there.

Direct logit attribution (Elhage et al. 2021; Wang et al. 2022): with the final norm's
scale frozen at its value in the actual run, the logit difference at the answer position is
linear in the final residual stream, which is a sum of component outputs:

    x_final = embed + sum_layer (sum_head z_h @ W_O[h] + b_O) + sum_layer mlp_out

so each head, MLP, the embeddings and the bias terms get an exact share, and the shares sum to
the logit difference read from x_final with that frozen scale (the model's own logit
difference, before any output soft-capping). Weights come from `interplab.weights`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.capture import capture
from interplab.circuits.metrics import Estimate, TaskMetric, answer_ids, check_task, model_device
from interplab.errors import InterplabError, unknown
from interplab.models.accessor import weights

LensScale = Literal["recompute", "cached"]
LENS_SCALES: tuple[str, ...] = get_args(LensScale)


# ------------------------------------------------------------------ final-norm helpers
def _norm_centres(model: Any) -> bool:
    """Whether the final norm subtracts the mean (LayerNorm) or not (RMSNorm / none)."""
    return getattr(model.cfg, "normalization_type", None) in ("LN", "LNPre")


def _has_final_norm(model: Any) -> bool:
    return getattr(model.cfg, "normalization_type", None) is not None and (
        "ln_final.hook_scale" in model.hook_dict
    )


def _soft_cap(model: Any, logits: Tensor) -> Tensor:
    # Gemma 2 soft-caps its output logits; the lens must too to reproduce the model
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0:
        return cap * torch.tanh(logits / cap)
    return logits


# ------------------------------------------------------------------ logit lens
@dataclass
class LogitLensResult:
    """Logits read from the residual stream at each point (entering each block, and final)."""

    logits: Float[Tensor, "point batch pos vocab"]
    """Lens logits; the last point is the final residual stream (= the model's logits)."""
    points: list[str]
    """Hook name of each point: blocks.{l}.hook_resid_pre ..., then the final resid_post."""
    positions: list[int]
    """Token positions kept (the `pos` axis of `logits`)."""
    scale: LensScale
    """'recompute': final norm applied afresh to each point; 'cached': the final norm's scale
    frozen at its value in the actual run (linear in the residual stream)."""

    def log_probs(self) -> Float[Tensor, "point batch pos vocab"]:
        return self.logits.float().log_softmax(-1)

    def top_tokens(self, k: int = 1) -> Int[Tensor, "point batch pos k"]:
        """The `k` highest-scoring tokens at every point and position."""
        return self.logits.topk(k, dim=-1).indices

    def score(self, metric: TaskMetric) -> list[Estimate]:
        """`metric` (e.g. logit difference at the answer positions) at each point."""
        if self.positions != list(range(len(self.positions))):
            raise InterplabError(
                "score() needs every position from 0 (answer positions index into them); "
                "run logit_lens with positions=None."
            )
        return [Estimate.of(v) for v in metric(self.logits)]

    def plot(self, metric: TaskMetric | None = None, example: int = 0) -> Any:
        """With `metric`: its mean ± sem at each point. Without: the log-probability, at each
        point and position of `example`, of the token the model finally predicts."""
        import matplotlib.pyplot as plt

        short = [p.replace("blocks.", "").replace(".hook_", " ") for p in self.points]
        if metric is not None:
            estimates = self.score(metric)
            fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(short)), 3))
            means = [e.mean for e in estimates]
            ax.errorbar(range(len(short)), means, yerr=[e.sem for e in estimates], marker="o")
            ax.set_xticks(range(len(short)), short, rotation=45, ha="right")
            ax.set_ylabel(metric.name)
            ax.set_title(f"logit lens ({self.scale} scale)")
            fig.tight_layout()
            return fig
        logp = self.log_probs()[:, example]  # [point, pos, vocab]
        final = self.logits[-1, example].argmax(-1)  # [pos]
        grid = logp.gather(-1, final[None, :, None].expand(logp.shape[0], -1, 1))[..., 0]
        fig, ax = plt.subplots(figsize=(max(4, 0.4 * len(self.positions) + 2), 3))
        image = ax.imshow(grid.cpu().numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(short)), short)
        ax.set_xticks(range(len(self.positions)), [str(p) for p in self.positions])
        ax.set_xlabel("position")
        ax.set_title("log p(final prediction) by layer")
        fig.colorbar(image, ax=ax)
        return fig


def logit_lens(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    positions: Sequence[int] | None = None,
    scale: LensScale = "recompute",
    device: str | torch.device | None = None,
) -> LogitLensResult:
    """Logit lens over `tokens`: for the residual stream entering every block and the final
    one, `final_norm(x) @ W_U + b_U` (plus the model's output soft-cap, if any).

    Args:
        model: a hooked model.
        tokens: [batch, pos] token ids.
        positions: positions to keep (default all); output logits are
            [n_layers + 1, batch, len(positions), vocab].
        scale: 'recompute' applies the model's final norm module to each point; 'cached'
            divides by the final norm's scale from the actual run (`ln_final.hook_scale`).
        device: where to run; None = the model's device.
    """
    if scale not in LENS_SCALES:
        raise unknown("logit lens scale", str(scale), LENS_SCALES, show_all=True)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise InterplabError(
            f"tokens must be a non-empty [batch, pos] tensor, got shape {tuple(tokens.shape)}."
        )
    device = model_device(model, device)
    n_layers = model.cfg.n_layers
    points = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    points.append(f"blocks.{n_layers - 1}.hook_resid_post")
    names = points + (["ln_final.hook_scale"] if _has_final_norm(model) else [])
    _, acts = capture(model, tokens.to(device), names)
    keep = list(range(tokens.shape[1])) if positions is None else [int(p) for p in positions]
    bad = [p for p in keep if not 0 <= p < tokens.shape[1]]
    if bad or not keep:
        raise InterplabError(
            f"positions {keep} must be non-empty and within 0..{tokens.shape[1] - 1}."
        )
    resid = torch.stack([acts[p] for p in points])[:, :, keep]  # [point, batch, pos, d_model]
    w = weights(model)
    with torch.inference_mode():
        if scale == "recompute":
            normed = _apply_final_norm(model, resid)
        else:
            x = resid - resid.mean(-1, keepdim=True) if _norm_centres(model) else resid
            if _has_final_norm(model):
                x = x / acts["ln_final.hook_scale"][:, keep][None]
            normed = x * w.ln_final_w + w.ln_final_b
        logits = _soft_cap(model, normed @ w.W_U + w.b_U)
    return LogitLensResult(logits=logits, points=points, positions=keep, scale=scale)


def _apply_final_norm(model: Any, resid: Tensor) -> Tensor:
    """The model's own final-norm module on [..., pos, d_model] (identity when it has none)."""
    ln_final = getattr(model, "ln_final", None)
    if ln_final is None or not _has_final_norm(model):
        return resid
    flat = resid.reshape(-1, *resid.shape[-2:])
    return ln_final(flat).reshape(resid.shape)


# ------------------------------------------------------------------ direct logit attribution
@dataclass
class DLAResult:
    """Each component's direct contribution to the logit difference, per example.

    `embed + heads.sum((0, 1)) + attn_bias.sum(0) + mlp.sum(0) + bias == logit_diff`, up to
    the float32 rounding of the model's own residual-stream additions (~1e-7)."""

    heads: Float[Tensor, "layer head batch"]
    """Per-head output z @ W_O[layer, head] through the frozen final norm, dotted with the
    answer direction."""
    attn_bias: Float[Tensor, "layer batch"]
    """The attention output bias b_O of each layer."""
    mlp: Float[Tensor, "layer batch"]
    """Each MLP layer's output (zeros for attention-only models)."""
    embed: Float[Tensor, " batch"]
    """The residual stream entering block 0 (token + positional embeddings)."""
    bias: Float[Tensor, " batch"]
    """Final-norm bias and unembedding bias terms."""
    logit_diff: Float[Tensor, " batch"]
    """The logit difference read from the final residual stream with the frozen scale."""

    def total(self) -> Float[Tensor, " batch"]:
        """Sum of every component's share (equals `logit_diff`)."""
        return (
            self.embed
            + self.heads.sum((0, 1))
            + self.attn_bias.sum(0)
            + self.mlp.sum(0)
            + self.bias
        )

    def head_values(self) -> Float[Tensor, "layer head"]:
        """Mean over examples of each head's share."""
        return self.heads.mean(-1)

    def estimates(self) -> dict[str, Estimate]:
        """Every component's share as an Estimate (mean, std, sem), keyed 'L0H1', 'L0 MLP',
        'L0 b_O', 'embed', 'bias'."""
        out = {"embed": Estimate.of(self.embed)}
        for layer in range(self.heads.shape[0]):
            for head in range(self.heads.shape[1]):
                out[f"L{layer}H{head}"] = Estimate.of(self.heads[layer, head])
            out[f"L{layer} b_O"] = Estimate.of(self.attn_bias[layer])
            out[f"L{layer} MLP"] = Estimate.of(self.mlp[layer])
        out["bias"] = Estimate.of(self.bias)
        return out

    def plot(self) -> Any:
        """Heatmap of head shares [layer, head] and bars of MLP shares per layer."""
        import matplotlib.pyplot as plt

        heads = self.head_values().float().cpu()
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), width_ratios=[2, 1])
        span = float(heads.abs().max()) or 1.0
        image = left.imshow(heads.numpy(), cmap="RdBu", vmin=-span, vmax=span, aspect="auto")
        left.set_xlabel("head")
        left.set_ylabel("layer")
        left.set_title("head DLA (logit diff)")
        fig.colorbar(image, ax=left)
        right.barh(range(self.mlp.shape[0]), self.mlp.mean(-1).float().cpu().numpy())
        right.set_yticks(range(self.mlp.shape[0]))
        right.invert_yaxis()
        right.set_title("MLP DLA")
        fig.tight_layout()
        return fig


def dla_hook_names(model: Any) -> list[str]:
    """Hook names `dla_from_cache` reads."""
    n_layers = model.cfg.n_layers
    names = ["blocks.0.hook_resid_pre", f"blocks.{n_layers - 1}.hook_resid_post"]
    names += [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    if not model.cfg.attn_only:
        names += [f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)]
    if _has_final_norm(model):
        names.append("ln_final.hook_scale")
    return names


def _check_dla_supported(model: Any) -> None:
    # A norm applied to the attention output (Gemma 2's post-attention RMSNorm) sits between
    # the heads and the residual stream, so z @ W_O is not what a head adds to it.
    if any(".ln1_post." in name or ".ln2_post." in name for name in model.hook_dict):
        raise InterplabError(
            "direct logit attribution needs head and MLP outputs that add straight into the "
            "residual stream; this model normalises them after the block (post-attention / "
            "post-MLP norms, as in Gemma 2), which interplab's DLA does not yet decompose."
        )


def dla_from_cache(
    model: Any,
    cache: Any,
    answers: Tensor | Sequence[int | str],
    wrong_answers: Tensor | Sequence[int | str],
    answer_pos: Int[Tensor, " batch"],
) -> DLAResult:
    """Direct logit attribution of the logit difference at `answer_pos` from cached activations
    (`cache[name]` for every name in `dla_hook_names(model)`; an ActivationCache or dict).

    The final norm's scale is frozen at `cache['ln_final.hook_scale']`; per-head outputs are
    z @ W_O from `interplab.weights`. Computed in float64, so the only gap between the sum of
    the shares and the logit difference is the float32 rounding of the cached activations.
    """
    _check_dla_supported(model)
    for name in dla_hook_names(model):
        try:
            cache[name]
        except KeyError as error:
            raise InterplabError(
                f"the cache lacks {name!r}; cache every name in dla_hook_names(model)."
            ) from error
    w = weights(model)
    tokenizer = getattr(model, "tokenizer", None)
    answers = answer_ids(answers, tokenizer)
    wrong = answer_ids(wrong_answers, tokenizer)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    batch = final.shape[0]
    if answer_pos.shape != (batch,) or answers.shape[0] != batch or wrong.shape[0] != batch:
        raise InterplabError(
            f"answers, wrong_answers and answer_pos must each have batch size {batch}; got "
            f"{tuple(answers.shape)}, {tuple(wrong.shape)}, {tuple(answer_pos.shape)}."
        )
    device = final.device
    rows = torch.arange(batch, device=device)
    pos = answer_pos.to(device)

    def at_answer(name: str) -> Tensor:
        return cache[name][rows, pos].double()

    answers, wrong = answers.to(device), wrong.to(device)
    W_U = w.W_U.double()
    b_U = w.b_U.double()
    wrong_2d = wrong.reshape(batch, -1)
    # answer direction in the residual stream (after the norm): [batch, d_model]
    u = W_U.T[answers] - W_U.T[wrong_2d].mean(1)
    b_diff = b_U[answers] - b_U[wrong_2d].mean(1)
    ln_w, ln_b = w.ln_final_w.double(), w.ln_final_b.double()
    direction = u * ln_w
    if _norm_centres(model):  # centring is a symmetric projection: move it onto the direction
        direction = direction - direction.mean(-1, keepdim=True)
    scale = (
        at_answer("ln_final.hook_scale")[:, 0]
        if _has_final_norm(model)
        else torch.ones(batch, dtype=torch.float64, device=device)
    )

    def share(x: Tensor) -> Tensor:  # [..., batch, d_model] -> [..., batch]
        return (x * direction).sum(-1) / scale

    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = torch.zeros(n_layers, n_heads, batch, dtype=torch.float64, device=device)
    attn_bias = torch.zeros(n_layers, batch, dtype=torch.float64, device=device)
    mlp = torch.zeros(n_layers, batch, dtype=torch.float64, device=device)
    W_O, b_O = w.W_O.double(), w.b_O.double()
    for layer in range(n_layers):
        z = at_answer(f"blocks.{layer}.attn.hook_z")  # [batch, head, d_head]
        out = torch.einsum("bhk,hkd->hbd", z, W_O[layer])
        heads[layer] = share(out)
        attn_bias[layer] = share(b_O[layer].expand(batch, -1))
        if not model.cfg.attn_only:
            mlp[layer] = share(at_answer(f"blocks.{layer}.hook_mlp_out"))
    embed = share(at_answer("blocks.0.hook_resid_pre"))
    bias = (u * ln_b).sum(-1) + b_diff
    x = at_answer(f"blocks.{n_layers - 1}.hook_resid_post")
    if _norm_centres(model):
        x = x - x.mean(-1, keepdim=True)
    normed = x / scale[:, None] * ln_w + ln_b
    logit_diff = (normed * u).sum(-1) + b_diff
    return DLAResult(
        heads=heads.cpu(),
        attn_bias=attn_bias.cpu(),
        mlp=mlp.cpu(),
        embed=embed.cpu(),
        bias=bias.cpu(),
        logit_diff=logit_diff.cpu(),
    )


def direct_logit_attribution(
    model: Any,
    task: Any,
    *,
    prompts: Literal["clean", "corrupted"] = "clean",
    device: str | torch.device | None = None,
) -> DLAResult:
    """DLA of the task's logit difference (answers vs wrong answers) on its clean (or
    corrupted) prompts; see `dla_from_cache`."""
    check_task(task)
    if prompts not in ("clean", "corrupted"):
        raise unknown("prompt set", str(prompts), ("clean", "corrupted"), show_all=True)
    _check_dla_supported(model)
    device = model_device(model, device)
    tokens = task.clean_tokens if prompts == "clean" else task.corrupted_tokens
    _, acts = capture(model, tokens.to(device), dla_hook_names(model))
    return dla_from_cache(model, acts, task.answers, task.wrong_answers, task.answer_pos)


# ------------------------------------------------------------------ attention patterns
def plot_attention(
    model: Any,
    prompt: str | Int[Tensor, " pos"] | Int[Tensor, "1 pos"],
    layer: int,
    heads: Sequence[int] | None = None,
    *,
    device: str | torch.device | None = None,
) -> Any:
    """Attention pattern of each head of `layer` on one prompt (query rows, key columns),
    labelled with the prompt's tokens. Returns a matplotlib Figure."""
    import matplotlib.pyplot as plt

    device = model_device(model, device)
    if isinstance(prompt, str):
        if getattr(model, "tokenizer", None) is None:
            raise InterplabError("a string prompt needs a model with a tokenizer; pass token ids.")
        tokens = model.to_tokens(prompt)
    else:
        tokens = prompt.reshape(1, -1) if prompt.ndim == 1 or prompt.shape[0] == 1 else None
        if tokens is None:
            raise InterplabError(
                f"plot_attention takes one prompt; got tokens of shape {tuple(prompt.shape)}."
            )
    if not 0 <= layer < model.cfg.n_layers:
        raise InterplabError(f"layer {layer} must be within 0..{model.cfg.n_layers - 1}.")
    n_heads = model.cfg.n_heads
    heads = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    if not heads or any(not 0 <= h < n_heads for h in heads):
        raise InterplabError(f"heads {heads} must be a non-empty list within 0..{n_heads - 1}.")
    name = f"blocks.{layer}.attn.hook_pattern"
    _, acts = capture(model, tokens.to(device), [name])
    pattern = acts[name][0].float().cpu()  # [head, query, key]
    try:
        labels = [str(t) for t in model.to_str_tokens(tokens[0])]
    except Exception:  # no tokenizer or one without decode: show ids
        labels = [str(int(t)) for t in tokens[0]]
    cols = min(4, len(heads))
    n_rows = math.ceil(len(heads) / cols)
    size = max(2.5, 0.25 * len(labels) + 1)
    fig, axes = plt.subplots(n_rows, cols, figsize=(size * cols, size * n_rows), squeeze=False)
    for ax, head in zip(axes.flat, heads, strict=False):
        ax.imshow(pattern[head].numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"L{layer}H{head}")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for ax in list(axes.flat)[len(heads) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig
