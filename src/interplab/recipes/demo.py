"""The tour: load an organism, read its scorecard, look inside it, and write one report.

`make demo` runs this recipe. Sized for about a minute on an idle 2-core CPU (each stage's
wall and CPU seconds are in the report), it
1. loads the organism and shows its scorecard (from card.json),
2. shows next-token predictions and attention patterns on an IOI prompt,
3. patches every attention head on held-out IOI prompts (Wang et al. 2022), clean into
   corrupted, by head and by named position, with a direct logit attribution per head,
4. caches activations of one hook, trains a small TopK SAE on them (Gao et al. 2024) and
   evaluates it spliced into the model (FVU, L0, dead latents, CE loss recovered),
5. shows a few of its latents: their top-activating contexts and the tokens they promote,
and prints where the HTML report is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from interplab.errors import InterplabError
from interplab.recipes._plots import annotate_heads

DESCRIPTION = (
    "Tour of interplab on a bundled organism: scorecard, predictions, attention, IOI head "
    "patching, a small SAE and its features."
)

IOI_ROLES = {"io_pos": "IO", "s1_pos": "S1", "s2_pos": "S2", "end_pos": "END"}
"""IOI metadata position -> label (the names' first and repeated mentions, the last token)."""


@dataclass
class Config:
    model: str = "storyworld-4l"
    """Organism name or local HF directory to tour."""
    prompt: str = "When Mary and John went to the store, John gave a drink to"
    """Prompt for next-token predictions and attention patterns."""
    ioi_n: int = 64
    """IOI prompts patched (clean/corrupted pairs)."""
    ioi_split: Literal["train", "heldout"] = "heldout"
    """IOI frames: 'heldout' ones never occur in the organism's training text."""
    by_pos: bool = True
    """Also patch each head at each position, summarised at the IO, S1, S2 and END tokens."""
    hook: str | None = None
    """Hook point cached and given to the SAE; None = the middle block's resid_post."""
    n_tokens: int = 262_144
    """Activation rows cached to disk (the SAE's training data)."""
    d_sae: int = 1024
    """SAE latents."""
    k: int = 32
    """SAE latents active per token (TopK)."""
    train_tokens: int = 524_288
    """SAE training tokens (passes over the cached rows, reshuffled, when more than n_tokens)."""
    batch_size: int = 4096
    """SAE training tokens per optimizer step."""
    eval_tokens: int = 16_384
    """Held-out tokens for the spliced SAE evaluation."""
    n_features: int = 6
    """Latents shown: two thirds the most frequent non-dense ones, the rest random live ones."""
    feature_tokens: int = 32_768
    """Tokens scanned for the latents' top-activating contexts."""
    examples: int = 6
    """Top-activating contexts shown per latent."""
    seed: int = 0
    """Seed for the IOI prompts, SAE initialisation and the random latents."""
    fast: bool = False
    """Smaller settings (for tests): fewer tokens, prompts and latents; no by-position patching."""
    device: str | None = None
    """cpu, cuda, cuda:N; None = cuda when present."""

    def __post_init__(self) -> None:
        if self.fast:
            self.ioi_n = min(self.ioi_n, 12)
            self.by_pos = False
            self.n_tokens = min(self.n_tokens, 4096)
            self.d_sae = min(self.d_sae, 256)
            self.k = min(self.k, 16)
            self.train_tokens = min(self.train_tokens, 8192)
            self.batch_size = min(self.batch_size, 1024)
            self.eval_tokens = min(self.eval_tokens, 1024)
            self.n_features = min(self.n_features, 3)
            self.feature_tokens = min(self.feature_tokens, 2048)
            self.examples = min(self.examples, 3)
        for name in (
            "ioi_n",
            "n_tokens",
            "d_sae",
            "k",
            "train_tokens",
            "batch_size",
            "eval_tokens",
            "n_features",
            "feature_tokens",
            "examples",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InterplabError(f"{name} must be a positive integer, got {value!r}.")
        if self.ioi_n < 2:
            raise InterplabError(
                f"ioi_n must be at least 2 (a standard error needs two prompts), got {self.ioi_n}."
            )
        if self.k > self.d_sae:
            raise InterplabError(f"k={self.k} must be <= d_sae={self.d_sae}.")
        if self.train_tokens < self.batch_size:
            raise InterplabError(
                f"train_tokens={self.train_tokens} is less than one batch "
                f"(batch_size={self.batch_size})."
            )
        if self.ioi_split not in ("train", "heldout"):
            from interplab.errors import unknown

            raise unknown("IOI split", str(self.ioi_split), ("train", "heldout"), show_all=True)


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
    from interplab.models.info import model_info
    from interplab.runs import Report

    timings: dict[str, dict[str, float]] = {}
    clock, cpu = time.perf_counter(), time.process_time()
    model, note = _load(config)
    timings["load model"] = _elapsed(clock, cpu)
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

    stages = (
        ("predictions and attention", _predictions_and_attention),
        ("IOI head patching", _ioi_heads),
        ("activations", _activations),
        ("SAE training and evaluation", _sae),
        ("features", _features),
    )
    state: dict[str, Any] = {"model": model}
    for label, stage in stages:
        clock, cpu = time.perf_counter(), time.process_time()
        stage(config, run, report, state)
        timings[label] = _elapsed(clock, cpu)

    report.section("Timings")
    report.table(
        [{"stage": k, **v} for k, v in timings.items()],
        caption="seconds per stage of this run: wall clock, and CPU time of this process summed "
        "over its threads (CPU > wall when torch uses several cores; wall >> CPU when the "
        "machine is busy with other work)",
        float_format="{:.2f}",
    )
    run.save_json("timings.json", timings)
    _print_summary(state)
    return report


def _elapsed(clock: float, cpu: float) -> dict[str, float]:
    return {"wall s": time.perf_counter() - clock, "CPU s": time.process_time() - cpu}


# ---------------------------------------------------------------------- stages
def _predictions_and_attention(config: Config, run: Any, report: Any, state: dict) -> None:
    import torch

    import interplab as il
    from interplab.plots import attention_patterns_figure

    model = state["model"]
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


def _ioi_heads(config: Config, run: Any, report: Any, state: dict) -> None:
    """Denoising patch of every head's output (hook_z) on IOI, plus DLA per head."""
    import interplab as il
    from interplab.circuits import Estimate, direct_logit_attribution, patch_heads

    model = state["model"]
    task = il.tasks.ioi(model, n=config.ioi_n, seed=config.seed, split=config.ioi_split)
    heads = patch_heads(model, task, "z")  # [layer, head]: each head at every position
    by_role = _by_role(patch_heads(model, task, "z", by_pos=True), task) if config.by_pos else {}
    clean, corrupted = heads.clean, heads.corrupted
    # clean and corrupted prompts are paired, so the gap's error bar comes from the pairs
    gap = Estimate.of(clean.per_example - corrupted.per_example)
    accuracy = float((clean.per_example > 0).float().mean())
    dla = direct_logit_attribution(model, task)

    grid, grid_sem = heads.values, heads.sem
    n_layers, n_heads = grid.shape
    order = grid.flatten().abs().argsort(descending=True).tolist()
    top_rows = []
    for flat in order[: min(8, n_layers * n_heads)]:
        layer, head = divmod(flat, n_heads)
        share = Estimate.of(dla.heads[layer, head])
        row: dict[str, Any] = {
            "head": f"L{layer}H{head}",
            "recovered": float(grid[layer, head]),
            "± sem": float(grid_sem[layer, head]),
        }
        if by_role:
            at_role = {role: float(mean[layer, head]) for role, (mean, _) in by_role.items()}
            row["strongest at"] = max(at_role, key=lambda r: abs(at_role[r]))
        row["DLA (logit diff)"] = share.mean
        row["DLA ± sem"] = share.sem
        top_rows.append(row)
    state["ioi"] = {"split": config.ioi_split, "n": len(task), "clean": clean, "top": top_rows}

    report.section("IOI: patching attention heads")
    report.text(
        f"{len(task)} IOI prompts from the **{config.ioi_split}** frames (Wang et al. 2022), "
        f"e.g. `{task.prompts[0]}` -> `{model.to_string(int(task.answers[0]))}`, each paired "
        f"with an ABC corruption that renames all three names (`{task.corrupted_prompts[0]}`). "
        "Metric: logit difference IO - S at the last token. Each head's output "
        "(`attn.hook_z`) is patched from the clean run into the corrupted run (denoising), one "
        "head at a time, all heads batched into a few forward passes. *Recovered* is "
        "(patched - corrupted) / (clean - corrupted): 1 means that head alone restores the "
        "clean behaviour."
    )
    report.metrics(
        {
            "logit diff, clean": clean.mean,
            "± sem (clean)": clean.sem,
            "logit diff, corrupted": corrupted.mean,
            "± sem (corrupted)": corrupted.sem,
            "clean - corrupted (paired)": gap.mean,
            "± sem (paired)": gap.sem,
            "clean prompts with IO > S": accuracy,
            "prompts": len(task),
        },
        caption="means over prompts; sem = standard error of the mean",
    )
    report.text(_ioi_reading(clean, gap))
    run.save_figure("ioi-heads", _head_grid_figure(grid, by_role))
    caption = (
        "Denoising patching of each head's output: normalised logit difference recovered "
        "(0 = corrupted, 1 = clean)"
    )
    if by_role:
        caption += (
            "; the other panels patch the head at one named token only (IO, first S, repeated "
            "S, last token), read per prompt since frames differ in length"
        )
    report.figure(run.path("figures/ioi-heads.png"), caption=caption)
    report.table(
        top_rows,
        caption="heads with the largest |recovered| (sem over prompts) and their direct logit "
        "attribution on the clean prompts (final LayerNorm scale frozen at its clean value)",
    )
    run.save_figure("ioi-dla", dla.plot())
    report.figure(
        run.path("figures/ioi-dla.png"),
        caption="Direct logit attribution of the clean logit difference to each head and MLP",
    )
    run.save_json(
        "ioi-heads.json",
        {
            "split": config.ioi_split,
            "n": len(task),
            "clean": {"mean": clean.mean, "sem": clean.sem},
            "corrupted": {"mean": corrupted.mean, "sem": corrupted.sem},
            "gap": {"mean": gap.mean, "sem": gap.sem},
            "recovered": grid.tolist(),
            "recovered_sem": grid_sem.tolist(),
            "by_role": {
                r: {"mean": m.tolist(), "sem": s.tolist()} for r, (m, s) in by_role.items()
            },
            "dla_heads": dla.head_values().tolist(),
            "top_heads": top_rows,
        },
    )


def _by_role(heads: Any, task: Any) -> dict[str, tuple[Any, Any]]:
    """Per named IOI token: the normalised [layer, head] effect of patching a head at that
    token only, as (mean, sem) over prompts. Frames differ in length, so each prompt's
    position is read from the task metadata instead of taking one column of the grid."""
    import torch

    raw = heads.per_example  # [layer, head, pos, batch], unnormalised logit differences
    batch = torch.arange(raw.shape[-1])
    span = heads.clean.mean - heads.corrupted.mean
    out = {}
    for key, role in IOI_ROLES.items():
        where = torch.tensor([meta[key] for meta in task.metadata])
        values = (raw[:, :, where, batch].double() - heads.corrupted.mean) / span
        sem = values.std(-1) / math.sqrt(values.shape[-1])
        out[role] = (values.mean(-1).float(), sem.float())
    return out


def _ioi_reading(clean: Any, gap: Any) -> str:
    """How to read the patching numbers, given what the model does on these prompts."""
    if abs(gap.mean) < 2 * gap.sem:
        return (
            "**Caution:** the clean and corrupted logit differences are within two standard "
            "errors of each other, so the normalised effects below divide by a difference that "
            "is mostly noise."
        )
    if clean.mean <= 0:
        return (
            "**This organism does not solve IOI on these prompts**: its clean logit difference "
            "is negative (it prefers the repeated name). *Recovered* then measures how much a "
            "head restores that clean behaviour, whatever its sign. `--ioi-split train` uses "
            "the frames it was trained on."
        )
    return (
        "The model prefers the indirect object on clean prompts, and the corruption removes "
        "that preference; heads with large *recovered* carry the information that makes the "
        "difference."
    )


def _head_grid_figure(grid: Any, by_role: dict[str, tuple[Any, Any]]) -> Any:
    """Layer x head heatmaps on one colour scale: the whole-head patch, then one per role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("every position", grid)] + [(f"at {r} only", m) for r, (m, _) in by_role.items()]
    span = max(float(p.abs().max()) for _, p in panels) or 1.0
    n_layers, n_heads = grid.shape
    width = 0.45 * n_heads + 1.0
    fig, axes = plt.subplots(
        1, len(panels), figsize=(width * len(panels) + 1.2, 0.45 * n_layers + 1.6), squeeze=False
    )
    image = None
    for ax, (title, values) in zip(axes[0], panels, strict=True):
        image = ax.imshow(values.numpy(), cmap="RdBu", vmin=-span, vmax=span, aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.set_xlabel("head")
        annotate_heads(ax, values, span)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.9, label="recovered")
    return fig


def _activations(config: Config, run: Any, report: Any, state: dict) -> None:
    import interplab as il

    model = state["model"]
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
    report.text(
        "Storyworld text packed into 128-token windows; the BOS position of each window is "
        "left out (an outlier in norm). These rows are the SAE's training data."
    )
    report.metrics(stats)
    run.save_json("activations.json", stats)
    state["store"], state["hook"] = store, hook


def _sae(config: Config, run: Any, report: Any, state: dict) -> None:
    from interplab.dictionaries import TopK, TrainConfig, evaluate_dictionary, train_dictionary

    model, store, hook = state["model"], state["store"], state["hook"]
    train = TrainConfig(
        batch_size=config.batch_size,
        total_tokens=config.train_tokens,
        seed=config.seed,
        checkpoint_every=None,
        log_every=max(1, config.train_tokens // config.batch_size // 20),
    )
    clock = time.perf_counter()
    sae = train_dictionary(
        store,
        TopK(d_sae=config.d_sae, k=config.k),
        train_config=train,
        run=run,
        device=config.device,
        model_name=config.model,
        name="demo-sae",
    )
    train_seconds = time.perf_counter() - clock
    trained_tokens = train.total_steps * train.batch_size
    evaluation = evaluate_dictionary(
        sae,
        model,
        "storyworld",
        n_tokens=config.eval_tokens,
        context_size=min(128, model.cfg.n_ctx),
        name="demo-sae",
    )
    evaluation.save(run, "sae-evaluation")
    s = evaluation.summary()
    state["sae"], state["evaluation"] = sae, evaluation
    state["sae_train"] = {"seconds": train_seconds, "tokens": trained_tokens}

    report.section("A sparse autoencoder")
    passes = trained_tokens / store.n_tokens
    report.text(
        f"A TopK SAE (Gao et al. 2024) with {config.d_sae} latents, {config.k} active per token, "
        f"trained on `{hook}` for {trained_tokens:,} tokens ({passes:.3g} shuffled passes over "
        f"the cached rows) in **{train_seconds:.1f} s**, then evaluated spliced into the model "
        f"on {evaluation.reconstruction.n_tokens:,} tokens of other storyworld windows. "
        "CE recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean): 1 means the "
        "reconstruction loses nothing, 0 means it is as bad as zeroing the activation."
    )
    report.metrics(
        {
            "L0 (active latents per token)": s["l0"],
            "FVU (fraction of variance unexplained)": s["fvu"],
            "explained variance": s["explained_variance"],
            "cosine similarity": s["cosine_similarity"],
            "dead fraction (never fire here)": s["dead_fraction"],
            "dense fraction (fire on > 10% of tokens)": s["dense_fraction"],
            "CE clean (nats)": s["ce_clean"],
            "CE spliced (nats)": s["ce_spliced"],
            "CE zero-ablated (nats)": s["ce_zero"],
            "CE recovered": s["ce_recovered"],
            "KL recovered": s["kl_recovered"],
            "training tokens": trained_tokens,
            "training seconds": round(train_seconds, 2),
        },
        caption="held-out evaluation (BOS positions patched, left out of every average)",
    )
    report.figure(
        run.path("figures/sae-evaluation-density.png"),
        caption="How often each latent fires (log10 of its firing density; dead latents omitted)",
    )


def _features(config: Config, run: Any, report: Any, state: dict) -> None:
    from interplab.data.corpus import pack
    from interplab.dictionaries.features import logit_effects, top_activations

    model, sae, evaluation = state["model"], state["sae"], state["evaluation"]
    chosen, kinds = _pick_latents(
        evaluation.reconstruction.latent_density, config.n_features, config.seed
    )
    if not chosen:
        report.section("Features")
        report.text("No latent fired on the evaluation tokens, so there is nothing to show.")
        state["features"] = []
        return
    context = min(128, model.cfg.n_ctx)
    n_windows = math.ceil(config.feature_tokens / (context - 1))
    # seed 2: windows that neither the SAE (seed 0) nor its evaluation (seed 1) saw
    windows = pack("storyworld", model.tokenizer, context, n_windows, seed=2).ids
    top = top_activations(
        model, sae, windows, k=config.examples, window=12, latents=chosen, device=config.device
    )
    effects = logit_effects(model, sae, k=8, latents=chosen)
    density = evaluation.reconstruction.latent_density
    rows = []
    for i, latent in enumerate(chosen):
        best = top.examples[i][0] if top.examples[i] else None
        rows.append(
            {
                "latent": latent,
                "picked as": kinds[i],
                "density": float(density[latent]),
                "max activation": best.value if best else 0.0,
                "top token": repr(best.text[best.focus]) if best else "",
                "promotes": " ".join(repr(t) for t in effects.top_text[i][:5]),
            }
        )
    state["features"] = rows

    report.section("Features")
    report.text(
        f"{len(chosen)} latents: the most frequent ones that are not dense (fire on at most "
        "10% of tokens) and a few random live ones. For each, its top-activating contexts in "
        f"{top.n_tokens:,} tokens of fresh storyworld text (each token shaded by the latent's "
        "activation, the maximum outlined, the activation value on the left) and the tokens "
        "its decoder direction promotes and suppresses directly: the largest and smallest "
        "entries of `W_dec[latent] @ W_U`. That product **ignores the final LayerNorm** (its "
        "scale depends on the whole residual stream), so the values rank tokens rather than "
        "giving exact logit changes."
    )
    report.table(
        rows, caption="density over the evaluation tokens; promoted tokens from W_dec @ W_U"
    )
    report.html(top.to_html(effects))
    run.save_json("features.json", {**top.to_dict(), "logit_effects": effects.rows(8)})


def _pick_latents(density: Any, n: int, seed: int) -> tuple[list[int], list[str]]:
    """About two thirds of `n` the most frequent live non-dense latents, the rest random live
    ones (seeded); fewer when fewer latents fire."""
    import torch

    live = density > 0
    regular = live & (density <= 0.1)
    n_frequent = n - n // 3
    frequent = [
        int(i)
        for i in density.masked_fill(~regular, -1.0).argsort(descending=True)[:n_frequent]
        if regular[i]
    ]
    rest = [int(i) for i in live.nonzero().flatten() if int(i) not in frequent]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
    random = [rest[j] for j in order[: n - len(frequent)]]
    return frequent + random, ["frequent"] * len(frequent) + ["random"] * len(random)


def _print_summary(state: dict) -> None:
    ioi = state["ioi"]
    clean = ioi["clean"]
    heads = ", ".join(
        f"{r['head']} {r['recovered']:.2f} ± {r['± sem']:.2f}" for r in ioi["top"][:3]
    )
    print(
        f"\nIOI ({ioi['split']} frames, n={ioi['n']}): clean logit diff {clean.mean:.2f} ± "
        f"{clean.sem:.2f}; top heads by logit diff recovered: {heads}"
    )
    s = state["evaluation"].summary()
    train = state["sae_train"]
    print(
        f"SAE on {state['hook']} ({train['tokens']:,} tokens, {train['seconds']:.1f} s): "
        f"FVU {s['fvu']:.3f}, L0 {s['l0']:.1f}, CE recovered {s['ce_recovered']:.3f}, "
        f"dead {s['dead_fraction']:.1%}"
    )
    if state.get("features"):
        shown = ", ".join(f"#{r['latent']} ({r['top token']})" for r in state["features"])
        print(f"Features shown: {shown}")


def _card(name: str) -> dict[str, Any] | None:
    from interplab.models.organisms import organism_card, organism_names

    return organism_card(name).data if name in organism_names() else None
