"""Train a small sweep of sparse dictionaries on one hook of a model and report the frontier.

`interplab run sae --model DIR --hook blocks.1.hook_resid_post --widths 1024,4096 --ks 16,32`
caches activations of the hook into the run folder, trains every (width, k) dictionary in
one pass over the data (`train_dictionaries`), evaluates each spliced into the model
(`evaluate_dictionary`: FVU, L0, dead latents, CE/KL recovered), and reports a table and the
L0-vs-FVU and L0-vs-CE-recovered frontier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from interplab.errors import InterplabError

DESCRIPTION = "Sweep sparse dictionaries (widths x k) on one hook; table + sparsity frontier."


@dataclass
class Config:
    model: str = "storyworld-4l"
    """Organism name or local HF directory."""
    hook: str | None = None
    """Hook to train on; None = the middle block's resid_post."""
    corpus: str = "storyworld"
    """Corpus for training activations and for evaluation (packed with another seed)."""
    n_tokens: int = 2_000_000
    """Training tokens (cached once; every dictionary sees each token once)."""
    arch: Literal["topk", "batchtopk", "matryoshka"] = "topk"
    """TopK-family variant of every dictionary in the sweep."""
    widths: tuple[int, ...] = (1024, 4096)
    """Dictionary widths d_sae."""
    ks: tuple[int, ...] = (16, 32, 64)
    """Active latents per token."""
    batch_size: int = 4096
    """Tokens per optimizer step."""
    eval_tokens: int = 32_768
    """Tokens for each spliced evaluation."""
    context_size: int = 128
    """Tokens per window, BOS included."""
    fast: bool = False
    """Small settings (for tests): few tokens."""
    device: str | None = None
    """cpu, cuda, cuda:N; None = cuda when present."""

    def __post_init__(self) -> None:
        if self.fast:
            self.n_tokens = min(self.n_tokens, 16_384)
            self.eval_tokens = min(self.eval_tokens, 2048)
            self.batch_size = min(self.batch_size, 512)
        if not self.widths or not self.ks:
            raise InterplabError("widths and ks must each name at least one value.")
        bad = [(w, k) for w in self.widths for k in self.ks if k > w]
        if bad:
            raise InterplabError(f"k must not exceed the width; these pairs do: {bad}.")


def run(config: Config, run: Any) -> Any:
    import interplab as il
    from interplab.dictionaries import TrainConfig, save_dictionary, train_dictionaries
    from interplab.dictionaries.api import store_batches
    from interplab.dictionaries.cli import make_config
    from interplab.dictionaries.configs import describe
    from interplab.dictionaries.evaluate import evaluate_dictionary, plot_frontier
    from interplab.models.loading import resolve_device
    from interplab.runs import Report

    model = il.load_model(config.model, device=config.device)
    hook = config.hook or f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
    context_size = min(config.context_size, model.cfg.n_ctx)
    store = il.activations(
        model,
        hook,
        config.corpus,
        config.n_tokens,
        context_size=context_size,
        out=run.path("activations"),
    )
    configs = [make_config(config.arch, w, k=k) for w in config.widths for k in config.ks]
    names = [describe(c) for c in configs]
    train = TrainConfig(batch_size=config.batch_size, total_tokens=config.n_tokens)
    batches = store_batches(store, hook, None, train.batch_size, train.seed)
    try:
        dictionaries = train_dictionaries(
            configs,
            batches,
            train,
            run=run,
            device=resolve_device(config.device),
            names=names,
        )
    finally:
        batches.close()

    report = Report("Sparse dictionary sweep", subtitle=f"{config.model} · {hook}")
    rows, evaluations = [], []
    for name, dictionary in zip(names, dictionaries, strict=True):
        dictionary.metadata.update(hook_name=hook, model_name=config.model)
        save_dictionary(dictionary, Path(run.path("dictionaries")) / name, overwrite=True)
        result = evaluate_dictionary(
            dictionary,
            model,
            config.corpus,
            n_tokens=config.eval_tokens,
            context_size=context_size,
            name=name,
        )
        result.save(run)
        evaluations.append(result)
        s = result.summary()
        rows.append(
            {
                "dictionary": name,
                "L0": s["l0"],
                "FVU": s["fvu"],
                "CE recovered": s["ce_recovered"],
                "KL recovered": s["kl_recovered"],
                "CE spliced - clean": s["ce_delta"],
                "dead": s["dead_fraction"],
            }
        )
        run.log(step=None, dictionary=name, **s)
    report.text(
        f"{len(configs)} dictionaries trained on {train.total_steps * train.batch_size:,} "
        f"tokens of `{hook}`, evaluated on {config.eval_tokens:,} held-out positions "
        "(BOS patched, excluded from averages). CE recovered = (CE_zero - CE_spliced) / "
        "(CE_zero - CE_clean)."
    )
    report.table(rows)
    fig = plot_frontier(evaluations)
    run.save_figure("frontier", fig)
    report.figure(run.path("figures/frontier.png"), caption="Sparsity vs fidelity")
    clean = evaluations[0]
    report.metrics(
        {"CE clean": clean.ce_clean, "CE zero-ablated": clean.ce_zero},
        caption="model loss without and with the hook zeroed",
    )
    return report
