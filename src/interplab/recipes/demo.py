"""The tour: load an organism, read its scorecard, look inside it, and write one report.

`make demo` runs this recipe. It grows with the product: today it loads the model, shows
its scorecard and next-token predictions on an IOI prompt, draws attention patterns, and
caches activations of one hook point to disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DESCRIPTION = (
    "Tour of interplab on a bundled organism: scorecard, predictions, attention, activations."
)


@dataclass
class Config:
    model: str = "storyworld-4l"
    """Organism name or local HF directory to tour."""
    prompt: str = "When Mary and John went to the store, John gave a drink to"
    """Prompt for next-token predictions and attention patterns."""
    hook: str | None = None
    """Hook point whose activations are cached; None = the middle block's resid_post."""
    n_tokens: int = 32_768
    """Activation rows to cache."""
    fast: bool = False
    """Smaller settings (for tests): fewer tokens and prompts."""
    device: str | None = None
    """cpu, cuda, cuda:N; None = cuda when present."""

    def __post_init__(self) -> None:
        if self.fast:
            self.n_tokens = min(self.n_tokens, 4096)


def _load(config: Config) -> tuple[Any, str]:
    """The organism, or a note explaining the fallback when it is not bundled."""
    import interplab as il
    from interplab.models.organisms import organism_names

    if config.model in organism_names() or config.model.startswith((".", "/", "~")):
        return il.load_model(config.model, device=config.device), ""
    from interplab.data.corpus.tokenizer import storyworld_tokenizer, to_hf_tokenizer

    tokenizer = to_hf_tokenizer(storyworld_tokenizer(n_docs=300))
    toy = il.models.ToyConfig(n_layers=2, d_model=64, n_heads=4, d_vocab=len(tokenizer), n_ctx=128)
    note = (
        f"**{config.model} is not bundled in this checkout**, so this tour runs on a small "
        "randomly initialised model with the storyworld tokenizer: the mechanics are real, the "
        "predictions are noise. Train the organism with `interplab train-organism storyworld-4l`."
    )
    return il.load_model(toy, tokenizer=tokenizer, device=config.device), note


def run(config: Config, run: Any) -> Any:
    import torch

    import interplab as il
    from interplab.models.info import model_info
    from interplab.plots import attention_patterns_figure
    from interplab.runs import Report

    model, note = _load(config)
    info = model_info(model, name=config.model)
    report = Report("interplab tour", subtitle=f"model: {config.model}")
    if note:
        report.text(note)

    report.section("The model")
    report.table([{"property": k, "value": v} for k, v in info.summary_rows()])
    card = _card(config.model)
    if card and "scorecard" in card:
        report.section("Scorecard (held-out prompts)")
        from interplab.data.tasks.scorecard import PhenomenonScore, Scorecard

        rows = [PhenomenonScore(**r) for r in card["scorecard"]["rows"]]
        report.table(Scorecard(config.model, rows).table(), caption="from card.json")

    report.section("Next-token predictions")
    tokens = il.models.tokenize(model, config.prompt)
    with torch.inference_mode():
        logits, cache = model.run_with_cache(
            tokens.ids, names_filter=lambda n: n.endswith("hook_pattern")
        )
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(8)
    rows = [
        {"rank": i + 1, "token": repr(model.to_string(int(t))), "probability": float(p)}
        for i, (p, t) in enumerate(zip(top.values, top.indices, strict=True))
    ]
    report.text(f"Prompt: `{config.prompt}`")
    report.table(rows)
    run.save_json("predictions.json", rows)
    print(f"\nTop next tokens after {config.prompt!r}:")
    for row in rows[:5]:
        print(f"  {row['token']:<12} {row['probability']:.3f}")

    report.section("Attention patterns")
    str_tokens = model.to_str_tokens(tokens.ids[0])
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]
        fig = attention_patterns_figure(pattern, str_tokens, title=f"layer {layer}")
        run.save_figure(f"attention-layer{layer}", fig)
        report.figure(
            run.path(f"figures/attention-layer{layer}.png"),
            caption=f"Layer {layer}: every head's pattern",
        )

    report.section("Activations cached to disk")
    hook = config.hook or f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
    store = il.activations(
        model,
        hook,
        "storyworld",
        config.n_tokens,
        context_size=min(128, model.cfg.n_ctx),
        out=run.path("activations"),
    )
    acts = store.all()
    norms = acts.norm(dim=-1)
    stats = {
        "hook": hook,
        "rows": acts.shape[0],
        "d": acts.shape[1],
        "mean norm": float(norms.mean()),
        "norm std": float(norms.std()),
        "folder": str(store.folder),
    }
    report.metrics(stats)
    run.save_json("activations.json", stats)
    return report


def _card(name: str) -> dict[str, Any] | None:
    from interplab.models.organisms import organism_card, organism_names

    return organism_card(name).data if name in organism_names() else None
