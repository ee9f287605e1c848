"""Evaluate a dictionary spliced into its model: reconstruction quality and downstream loss.

`evaluate_dictionary(dictionary, model, corpus)` runs the model over packed windows of a
corpus. Every forward pass carries three copies of each window batch:

* clean: the model as it is;
* spliced: the hook activation replaced by the dictionary's reconstruction;
* zero: the hook activation replaced by zeros (zero ablation).

For an autoencoder the reconstruction replaces the activation it read (`hook_name`). For a
transcoder the dictionary reads `hook_name` (e.g. `blocks.L.mlp.hook_in`, the MLP input) and
its output replaces `hook_name_out` (e.g. `blocks.L.hook_mlp_out`) in the same forward pass;
zero ablation then zeroes `hook_name_out`.

Definitions follow SAELens' evaluation (`ce_loss_score`, `kl_div_score`):

* ce_clean / ce_spliced / ce_zero: mean next-token cross-entropy (nats).
* ce_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean): 1 means the reconstruction
  loses nothing, 0 means it is as bad as deleting the activation.
* kl_spliced / kl_zero: mean KL(P_clean || P_patched) of the next-token distributions.
* kl_recovered = (kl_zero - kl_spliced) / kl_zero.

BOS: every position is patched (also the window's BOS at position 0), but position 0 is left
out of every average: of the CE and KL terms (so CE averages the predictions made at
positions 1..T-2 and KL positions 1..T-1) and of the reconstruction metrics (the activation
rows are those of an `ActivationStore` with `include_bos=False`). The BOS activation is an
outlier in norm that dictionaries are usually not trained on, and its next-token prediction
carries no information about the text. (SAELens, given `ignore_tokens`, instead leaves those
tokens unpatched and drops every position holding one of them; with the BOS excluded the
averaged positions are the same here, but the BOS activation is patched, so a dictionary
that mangles it is charged for what that does to later positions.)

Reconstruction metrics (`interplab.dictionaries.metrics.reconstruction_metrics`) are computed
on the clean activations captured in the same passes, so they are fresh, held-out rows when
the corpus windows differ from the training data (the default `seed=1` packs documents in a
different order than the default seed 0 of `interplab.activations`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.dictionaries.base import Dictionary
from interplab.dictionaries.configs import Transcoder
from interplab.dictionaries.metrics import ReconstructionMetrics, reconstruction_metrics
from interplab.errors import InterplabError


@dataclass
class DictionaryEvaluation:
    """Reconstruction quality and spliced-in downstream loss of one dictionary (see module
    docstring for the definitions)."""

    hook_name: str
    """Hook the dictionary reads."""
    hook_name_out: str
    """Hook its reconstruction replaces (= hook_name for autoencoders)."""
    n_windows: int
    """Token windows evaluated."""
    context_size: int
    """Tokens per window (BOS included)."""
    n_predictions: int
    """Next-token predictions in the CE averages (BOS position and last position excluded)."""
    reconstruction: ReconstructionMetrics
    """FVU, MSE, L0, density, ... on the clean activations of every non-BOS position."""
    ce_clean: float
    """Mean next-token cross-entropy of the unmodified model."""
    ce_spliced: float
    """Mean cross-entropy with the reconstruction patched in."""
    ce_zero: float
    """Mean cross-entropy with the hook zero-ablated."""
    kl_spliced: float
    """Mean KL(P_clean || P_spliced) over non-BOS positions."""
    kl_zero: float
    """Mean KL(P_clean || P_zero) over non-BOS positions."""
    name: str = "dictionary"
    """Label for tables and plots."""

    @property
    def ce_recovered(self) -> float:
        """(ce_zero - ce_spliced) / (ce_zero - ce_clean); nan when zero ablation costs nothing."""
        gap = self.ce_zero - self.ce_clean
        return (self.ce_zero - self.ce_spliced) / gap if gap != 0 else float("nan")

    @property
    def ce_delta(self) -> float:
        """ce_spliced - ce_clean: the loss the reconstruction adds."""
        return self.ce_spliced - self.ce_clean

    @property
    def kl_recovered(self) -> float:
        """(kl_zero - kl_spliced) / kl_zero; nan when zero ablation changes nothing."""
        return (
            (self.kl_zero - self.kl_spliced) / self.kl_zero if self.kl_zero != 0 else float("nan")
        )

    @property
    def l0(self) -> float:
        """Mean active latents per token."""
        return self.reconstruction.l0

    @property
    def fvu(self) -> float:
        """Fraction of variance unexplained."""
        return self.reconstruction.fvu

    def summary(self) -> dict[str, float]:
        """Scalar metrics for tables and logs."""
        return {
            **self.reconstruction.summary(),
            "ce_clean": self.ce_clean,
            "ce_spliced": self.ce_spliced,
            "ce_zero": self.ce_zero,
            "ce_delta": self.ce_delta,
            "ce_recovered": self.ce_recovered,
            "kl_spliced": self.kl_spliced,
            "kl_zero": self.kl_zero,
            "kl_recovered": self.kl_recovered,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the summary, the setup, and the per-latent firing densities."""
        return {
            "name": self.name,
            "hook_name": self.hook_name,
            "hook_name_out": self.hook_name_out,
            "n_windows": self.n_windows,
            "context_size": self.context_size,
            "n_tokens": self.reconstruction.n_tokens,
            "n_predictions": self.n_predictions,
            "bos": "patched, excluded from every average",
            "metrics": {k: _json_float(v) for k, v in self.summary().items()},
            "latent_density": [float(v) for v in self.reconstruction.latent_density.tolist()],
        }

    def table_rows(self) -> list[tuple[str, str]]:
        """(metric, formatted value) rows for a short printed table."""
        s = self.summary()
        return [
            ("tokens", f"{self.reconstruction.n_tokens:,}"),
            ("L0", f"{s['l0']:.2f}"),
            ("FVU", f"{s['fvu']:.4f}"),
            ("explained variance", f"{s['explained_variance']:.4f}"),
            ("cosine similarity", f"{s['cosine_similarity']:.4f}"),
            ("dead fraction", f"{s['dead_fraction']:.3f}"),
            ("CE clean", f"{s['ce_clean']:.4f}"),
            ("CE spliced", f"{s['ce_spliced']:.4f}"),
            ("CE zero-ablated", f"{s['ce_zero']:.4f}"),
            ("CE recovered", f"{s['ce_recovered']:.4f}"),
            ("KL spliced", f"{s['kl_spliced']:.5f}"),
            ("KL recovered", f"{s['kl_recovered']:.4f}"),
        ]

    def plot_density(self, ax: Any = None, bins: int = 50) -> Any:
        """Histogram of log10 latent firing density (matplotlib)."""
        ax = self.reconstruction.plot_density(ax=ax, bins=bins)
        ax.set_title(f"{self.name}: " + ax.get_title())
        return ax

    def save(self, run: Any, name: str | None = None) -> None:
        """Write `<name>.json` and `figures/<name>-density.png` into `run` (an
        `interplab.runs.Run`); `name` defaults to `evaluation` (or `evaluation-<self.name>`)."""
        stem = name or ("evaluation" if self.name == "dictionary" else f"evaluation-{self.name}")
        run.save_json(stem, self.to_dict())
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:  # plotting is optional
            return
        fig, ax = plt.subplots(figsize=(5, 3))
        self.plot_density(ax=ax)
        fig.tight_layout()
        run.save_figure(f"{stem}-density", fig)


def _json_float(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def plot_frontier(evaluations: Sequence[DictionaryEvaluation], axes: Any = None) -> Any:
    """Sparsity-fidelity frontier of a sweep: L0 vs FVU and L0 vs CE recovered, one point per
    evaluation (labelled by `name`). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    if not evaluations:
        raise InterplabError("plot_frontier needs at least one DictionaryEvaluation.")
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    else:
        fig = axes[0].figure
    l0 = [e.l0 for e in evaluations]
    for ax, key, label in (
        (axes[0], "fvu", "FVU (lower is better)"),
        (axes[1], "ce_recovered", "CE loss recovered"),
    ):
        values = [getattr(e, key) for e in evaluations]
        ax.scatter(l0, values)
        for e, x, y in zip(evaluations, l0, values, strict=True):
            ax.annotate(e.name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- evaluation
def _token_windows(
    model: Any, corpus: Any, n_tokens: int, context_size: int, seed: int
) -> Int[Tensor, "window pos"]:
    """Windows of `context_size` tokens holding at least `n_tokens` non-BOS positions."""
    from interplab.data.activations import ActivationStore
    from interplab.data.corpus import pack

    if isinstance(corpus, ActivationStore):
        where = f" (built from corpus {corpus.manifest.corpus_id!r})" if corpus.manifest else ""
        raise InterplabError(
            f"evaluate_dictionary needs tokens to run the model on, and an ActivationStore{where} "
            "holds activations only: pass the corpus (e.g. 'storyworld') or token windows instead. "
            "For reconstruction metrics on stored rows use reconstruction_metrics(dictionary, "
            "store.all())."
        )
    n_windows = math.ceil(n_tokens / (context_size - 1))
    if isinstance(corpus, Tensor):
        if corpus.ndim != 2 or corpus.shape[1] < context_size or corpus.shape[0] < 1:
            raise InterplabError(
                f"token windows must be a [window, pos] tensor with at least {context_size} "
                f"positions, got shape {tuple(corpus.shape)}."
            )
        return corpus[:n_windows, :context_size].long()
    return pack(corpus, getattr(model, "tokenizer", None), context_size, n_windows, seed=seed).ids


def _resolve_hooks(
    dictionary: Dictionary, hook_name: str | None, hook_name_out: str | None
) -> tuple[str, str]:
    """The hook the dictionary reads and the one its reconstruction replaces."""
    hook_name = hook_name or dictionary.metadata.get("hook_name")
    if not hook_name:
        raise InterplabError(
            "the dictionary's metadata names no hook_name; pass hook_name=... "
            "(e.g. 'blocks.2.hook_resid_post')."
        )
    if isinstance(dictionary.config, Transcoder):
        hook_name_out = hook_name_out or dictionary.metadata.get("hook_name_out")
        if not hook_name_out:
            raise InterplabError(
                "a transcoder replaces its output hook: its metadata names no hook_name_out; "
                "pass hook_name_out=... (e.g. 'blocks.2.hook_mlp_out')."
            )
    elif hook_name_out is not None and hook_name_out != hook_name:
        raise InterplabError(
            f"hook_name_out={hook_name_out!r} only applies to transcoders; an autoencoder "
            f"replaces the activation it reads ({hook_name!r})."
        )
    else:
        hook_name_out = hook_name
    return hook_name, hook_name_out


class _Splicer:
    """Forward hooks that capture the clean activations of the first third of a stacked batch
    and overwrite the other two thirds with the reconstruction and with zeros."""

    def __init__(self, dictionary: Dictionary, hook_name: str, hook_name_out: str, n: int):
        self.dictionary = dictionary
        self.hook_name, self.hook_name_out = hook_name, hook_name_out
        self.n = n
        self.x: Tensor | None = None
        self.y: Tensor | None = None

    def set_batch(self, n: int) -> None:
        self.n = n
        self.x = self.y = None

    def _reconstruct(self, x: Tensor) -> Tensor:
        d = self.dictionary
        if x.shape[-1] != d.d_in:
            raise InterplabError(
                f"hook {self.hook_name!r} has width {x.shape[-1]}, but the dictionary reads "
                f"d_in={d.d_in}: it was trained on another hook or model."
            )
        flat = x.reshape(-1, d.d_in).to(device=d.W_dec.device, dtype=d.W_dec.dtype)
        latents = d.encode(flat)
        x_hat = d.decode(latents, flat if d.skip else None)
        return x_hat.reshape(*x.shape[:-1], d.d_out)

    def read(self, act: Tensor, hook: Any) -> None:
        # Bridge hook names are aliases, so the hook is keyed by the requested name here.
        self.x = act[: self.n].detach()

    def replace(self, act: Tensor, hook: Any) -> Tensor:
        n = self.n
        if self.hook_name == self.hook_name_out:
            self.x = act[:n].detach()
        if self.x is None:
            raise InterplabError(
                f"hook {self.hook_name_out!r} fired before {self.hook_name!r}: a transcoder must "
                "read a hook that comes earlier in the forward pass than the one it replaces."
            )
        if act.shape[-1] != self.dictionary.d_out:
            raise InterplabError(
                f"hook {self.hook_name_out!r} has width {act.shape[-1]}, but the dictionary "
                f"outputs d_out={self.dictionary.d_out}."
            )
        self.y = act[:n].detach()
        x_hat = self._reconstruct(self.x).to(device=act.device, dtype=act.dtype)
        out = act.clone()
        out[n : 2 * n] = x_hat
        out[2 * n :] = 0
        return out

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        if self.hook_name == self.hook_name_out:
            return [(self.hook_name, self.replace)]
        return [(self.hook_name, self.read), (self.hook_name_out, self.replace)]


def _loss_terms(
    logits: Float[Tensor, "three_batch pos vocab"], tokens: Int[Tensor, "batch pos"], n: int
) -> dict[str, Tensor]:
    """Summed CE (clean, spliced, zero) over predictions at positions 1..T-2 and summed KL
    (spliced, zero) over positions 1..T-1, in float64."""
    logp = logits.float().log_softmax(-1)
    clean, spliced, zero = logp[:n], logp[n : 2 * n], logp[2 * n :]
    targets = tokens[:, 2:]

    def ce(lp: Tensor) -> Tensor:
        picked = lp[:, 1:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return -picked.double().sum()

    p_clean = clean[:, 1:].exp()

    def kl(lp: Tensor) -> Tensor:
        return (p_clean * (clean[:, 1:] - lp[:, 1:])).sum(-1).double().sum()

    return {
        "ce_clean": ce(clean),
        "ce_spliced": ce(spliced),
        "ce_zero": ce(zero),
        "kl_spliced": kl(spliced),
        "kl_zero": kl(zero),
    }


@torch.no_grad()
def evaluate_dictionary(
    dictionary: Dictionary,
    model: Any,
    corpus: Any = "storyworld",
    *,
    hook_name: str | None = None,
    hook_name_out: str | None = None,
    n_tokens: int = 32_768,
    context_size: int | None = None,
    batch_size: int = 8,
    seed: int = 1,
    device: torch.device | str | None = None,
    run: Any = None,
    name: str | None = None,
    progress: bool = False,
) -> DictionaryEvaluation:
    """Reconstruction metrics and spliced-in CE/KL of `dictionary` in `model` (see the module
    docstring for every definition, SAELens' conventions, and the BOS choice).

    Args:
        dictionary: the dictionary; `hook_name` (and `hook_name_out` for transcoders) default
            to its metadata.
        model: a hooked model from `interplab.load_model`.
        corpus: a corpus spec ('storyworld', 'python-stdlib', a text/token file) or token
            windows `[window, pos]` (position 0 is treated as BOS).
        n_tokens: non-BOS token positions to evaluate (rounded up to whole windows).
        context_size: tokens per window, BOS included; None = the width of given token
            windows, else min(128, the model's context).
        batch_size: windows per forward pass; each pass runs 3 * batch_size sequences (clean,
            spliced, zero-ablated) and holds their [3 * batch_size, pos, vocab] logits
            (lower it for large vocabularies).
        seed: packing seed of the corpus (1: a different document order from the default seed
            0 that `interplab.activations` trains on).
        device: move the dictionary there first (in place); None leaves it where it is.
            The model stays put; activations move between the two as needed.
        run: an `interplab.runs.Run`: the result is saved there (JSON and density figure).
        name: label of this dictionary in tables, plots and file names.
    Returns:
        A `DictionaryEvaluation`.
    """
    from interplab.models.hooks import check_hook_names

    if not isinstance(dictionary, Dictionary):
        raise InterplabError(
            f"expected an interplab Dictionary, got {type(dictionary).__name__}; "
            "load one with load_dictionary(path)."
        )
    for label, value, low in (("n_tokens", n_tokens, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InterplabError(f"{label} must be a positive integer, got {value!r}.")
    if context_size is None:
        context_size = corpus.shape[-1] if isinstance(corpus, Tensor) else min(128, model.cfg.n_ctx)
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 3:
        raise InterplabError(
            f"context_size must be an integer >= 3 (BOS, one input, one target), got {context_size!r}."
        )
    if context_size > model.cfg.n_ctx:
        raise InterplabError(
            f"context_size {context_size} is longer than the model's context ({model.cfg.n_ctx})."
        )
    hook_name, hook_name_out = _resolve_hooks(dictionary, hook_name, hook_name_out)
    check_hook_names(model, [hook_name, hook_name_out])
    if device is not None:
        from interplab.models.loading import resolve_device

        dictionary = dictionary.to(resolve_device(device))

    windows = _token_windows(model, corpus, n_tokens, context_size, seed)
    model_device = next(model.parameters()).device
    splicer = _Splicer(dictionary, hook_name, hook_name_out, batch_size)
    sums: dict[str, Tensor] = {}
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    n_predictions = 0
    was_training = dictionary.training
    dictionary.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=windows.shape[0], unit="window", desc="evaluate")
    try:
        with model.hooks(fwd_hooks=splicer.fwd_hooks()):
            for start in range(0, windows.shape[0], batch_size):
                tokens = windows[start : start + batch_size].to(model_device)
                n = tokens.shape[0]
                splicer.set_batch(n)
                logits = model(tokens.repeat(3, 1))
                if splicer.x is None or splicer.y is None:
                    raise InterplabError(
                        f"hook {hook_name_out!r} did not fire in a forward pass of this model."
                    )
                for key, value in _loss_terms(logits, tokens, n).items():
                    sums[key] = sums.get(key, 0) + value.cpu()
                n_predictions += n * (tokens.shape[1] - 2)
                xs.append(splicer.x[:, 1:].reshape(-1, dictionary.d_in).float().cpu())
                if hook_name_out != hook_name:
                    ys.append(splicer.y[:, 1:].reshape(-1, dictionary.d_out).float().cpu())
                if bar is not None:
                    bar.update(n)
    finally:
        dictionary.train(was_training)
        if bar is not None:
            bar.close()

    n_positions = windows.shape[0] * (windows.shape[1] - 1)
    x_all = torch.cat(xs)
    y_all = torch.cat(ys) if ys else None
    recon = reconstruction_metrics(dictionary, x_all, y_all)
    result = DictionaryEvaluation(
        hook_name=hook_name,
        hook_name_out=hook_name_out,
        n_windows=int(windows.shape[0]),
        context_size=int(windows.shape[1]),
        n_predictions=n_predictions,
        reconstruction=recon,
        ce_clean=float(sums["ce_clean"]) / n_predictions,
        ce_spliced=float(sums["ce_spliced"]) / n_predictions,
        ce_zero=float(sums["ce_zero"]) / n_predictions,
        kl_spliced=float(sums["kl_spliced"]) / n_positions,
        kl_zero=float(sums["kl_zero"]) / n_positions,
        name=name or "dictionary",
    )
    if run is not None:
        result.save(run)
    return result


__all__ = ["DictionaryEvaluation", "evaluate_dictionary", "plot_frontier"]
