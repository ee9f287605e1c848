"""Dictionary commands for the `interplab` CLI: `train-sae`, `eval-sae`, `compare`.

Each is a plain function with typer-annotated options, registered on the main command tree
with one line (`app.command("train-sae")(train_sae_command)`); `app` below holds all three
for running them on their own. Heavy imports happen inside the commands, so importing this
module costs only typer. Flags map 1:1 to the fields of the dictionary configs
(`interplab.dictionaries.configs`), `TrainConfig` and `evaluate_dictionary`.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="dictionaries",
    help="Train, evaluate and compare sparse dictionaries.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Arch(StrEnum):
    """Dictionary variants selectable on the command line."""

    relu = "relu"
    topk = "topk"
    batchtopk = "batchtopk"
    matryoshka = "matryoshka"
    jumprelu = "jumprelu"
    gated = "gated"


def make_config(
    arch: str,
    d_sae: int,
    *,
    k: int = 32,
    l1: float | None = None,
    l0: float | None = None,
    transcoder: bool = False,
    skip: bool = False,
) -> Any:
    """The dictionary config for CLI choices (`--arch`, `--d-sae`, `--k`, `--l1`, `--l0`)."""
    from interplab.dictionaries import configs as c
    from interplab.errors import InterplabError, unknown

    arch = arch.value if isinstance(arch, Arch) else arch
    if arch in ("topk", "batchtopk", "matryoshka"):
        cls = {"topk": c.TopK, "batchtopk": c.BatchTopK, "matryoshka": c.Matryoshka}[arch]
        variant: c.SAEConfig = cls(d_sae, k=k)
    elif arch in ("relu", "gated"):
        cls = c.ReLU if arch == "relu" else c.Gated
        variant = cls(d_sae) if l1 is None else cls(d_sae, l1_coefficient=l1)
    elif arch == "jumprelu":
        variant = c.JumpReLU(d_sae) if l0 is None else c.JumpReLU(d_sae, l0_coefficient=l0)
    else:
        raise unknown("dictionary architecture", arch, [a.value for a in Arch], show_all=True)
    if l1 is not None and arch not in ("relu", "gated"):
        raise InterplabError(f"--l1 applies to relu and gated dictionaries, not {arch!r}.")
    if l0 is not None and arch != "jumprelu":
        raise InterplabError(f"--l0 applies to jumprelu dictionaries, not {arch!r}.")
    if skip and not transcoder:
        raise InterplabError("--skip makes a skip transcoder: also pass --hook-out.")
    if transcoder:
        return c.SkipTranscoder(variant) if skip else c.Transcoder(variant)
    return variant


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"  {key:<{width}}  {value}")


def train_sae_command(
    model: Annotated[str, typer.Argument(help="Organism name, local HF directory, or hub id.")],
    hook: Annotated[str, typer.Option("--hook", help="Hook the dictionary reads.")],
    tokens: Annotated[
        int | None,
        typer.Option(help="Training tokens (default with --store: one pass over the cache)."),
    ] = None,
    corpus: Annotated[
        str, typer.Option(help="Corpus for activations (without --store) and for evaluation.")
    ] = "storyworld",
    arch: Annotated[Arch, typer.Option(help="Dictionary variant.")] = Arch.topk,
    d_sae: Annotated[int, typer.Option(help="Number of latents.")] = 4096,
    k: Annotated[int, typer.Option(help="Active latents per token (TopK family).")] = 32,
    l1: Annotated[
        float | None, typer.Option(help="L1 coefficient (relu, gated); default the config's.")
    ] = None,
    l0: Annotated[
        float | None, typer.Option(help="L0 coefficient (jumprelu); default the config's.")
    ] = None,
    hook_out: Annotated[
        str | None,
        typer.Option(help="Train a transcoder predicting this hook (e.g. blocks.L.hook_mlp_out)."),
    ] = None,
    skip: Annotated[bool, typer.Option(help="Skip transcoder (needs --hook-out).")] = False,
    store: Annotated[
        Path | None, typer.Option(help="Cached activations (`interplab cache`) to train on.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Tokens per optimizer step.")] = 4096,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: width-scaled).")] = None,
    context_size: Annotated[int, typer.Option(help="Tokens per window, BOS included.")] = 128,
    eval_tokens: Annotated[
        int, typer.Option(help="Tokens for the spliced evaluation afterwards; 0 skips it.")
    ] = 32_768,
    out: Annotated[Path, typer.Option(help="Folder that holds run folders.")] = Path("runs"),
    name: Annotated[str | None, typer.Option(help="Dictionary name in the run.")] = None,
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
    device: Annotated[
        str | None,
        typer.Option(help="cpu, cuda, cuda:N (under torchrun: cpu or cuda = cuda:LOCAL_RANK)."),
    ] = None,
) -> None:
    """Train a sparse dictionary on one hook of MODEL, evaluate it spliced in, save a run.

    Launched by `torchrun --nproc_per_node=N -m interplab train-sae ...` it trains
    data-parallel (gloo on CPU, NCCL on CUDA): each rank reads its own part of the cache (or
    streams its own token windows), gradients are averaged over ranks, and rank 0 alone
    writes the run, its checkpoints and the dictionary, shows progress and evaluates.
    """
    from interplab.dictionaries.distributed import launch

    config = make_config(arch, d_sae, k=k, l1=l1, l0=l0, transcoder=hook_out is not None, skip=skip)
    with launch(device) as place:
        _train_sae(
            place, config, model, hook, hook_out, tokens, corpus, store, batch_size, lr,
            context_size, eval_tokens, out, name, seed,
        )  # fmt: skip


def _train_sae(
    place: Any,
    config: Any,
    model: str,
    hook: str,
    hook_out: str | None,
    tokens: int | None,
    corpus: str,
    store: Path | None,
    batch_size: int,
    lr: float | None,
    context_size: int,
    eval_tokens: int,
    out: Path,
    name: str | None,
    seed: int,
) -> None:
    """The body of `train-sae` on one rank (`place`: this process's rank and device)."""
    from contextlib import nullcontext
    from dataclasses import replace

    import interplab as il
    from interplab.dictionaries.api import train_dictionary
    from interplab.dictionaries.configs import describe
    from interplab.dictionaries.distributed import broadcast_object, rank_shard
    from interplab.dictionaries.training import TrainConfig
    from interplab.errors import InterplabError
    from interplab.runs import start_run

    world, device = place.world, place.device
    hooks = [hook] if hook_out is None else [hook, hook_out]
    loaded: list[Any] = []

    def the_model() -> Any:  # loaded only where needed: streaming, or rank 0's evaluation
        if not loaded:
            loaded.append(il.load_model(model, device=device))
        return loaded[0]

    if store is not None:
        acts = il.ActivationStore.open(store)
        missing = [h for h in hooks if h not in acts.hooks]
        if missing:
            raise InterplabError(
                f"the cache in {store} holds {', '.join(acts.hooks)}, not {', '.join(missing)}."
            )
        n_tokens = tokens or acts.n_tokens
        acts = rank_shard(acts, world)
    else:
        if tokens is None:
            raise InterplabError("--tokens is required when activations are not read from --store.")
        n_tokens = tokens
        acts = _streamed_activations(the_model(), hooks, corpus, tokens, context_size, world)
    if world.is_main and eval_tokens > 0:
        the_model()  # a bad MODEL fails now, not after training
    train_config = TrainConfig(batch_size=batch_size, total_tokens=n_tokens, lr=lr, seed=seed)
    member = name or describe(config)
    settings = {
        "model": model, "hook": hook, "hook_out": hook_out, "corpus": corpus,
        "store": str(store) if store else None, "tokens": n_tokens, "config": config.to_dict(),
        "train": train_config, "eval_tokens": eval_tokens, "context_size": context_size,
        "world_size": world.size,
    }  # fmt: skip
    # Rank 0 owns the run folder; the other ranks only need its checkpoint path, so that
    # every rank agrees on when to checkpoint and whether to resume.
    run_context = start_run("train-sae", settings, root=out) if world.is_main else nullcontext()
    with run_context as run:
        run_dir = Path(broadcast_object(str(run.dir) if run is not None else None, world))
        if run is None:
            train_config = replace(train_config, checkpoint_dir=str(run_dir / "checkpoints"))
        dictionary = train_dictionary(
            acts,
            config,
            hook_name=hook,
            hook_name_out=hook_out,
            train_config=train_config,
            run=run,
            device=device,
            model_name=model,
            name=member,
        )
        if run is None:
            return
        folder = run.dir / "dictionaries" / member
        trained = train_config.total_steps * train_config.batch_size
        ranks = f" on {world.size} ranks" if world.distributed else ""
        typer.echo(f"trained {member} on {trained:,} tokens of {hook}{ranks}")
        if eval_tokens > 0:
            from interplab.dictionaries.evaluate import evaluate_dictionary

            m = the_model()
            result = evaluate_dictionary(
                dictionary,
                m,
                corpus,
                n_tokens=eval_tokens,
                context_size=min(context_size, m.cfg.n_ctx),
                name=member,
            )
            result.save(run, "evaluation")
            _print_table(result.table_rows())
    typer.echo(f"dictionary: {folder}\nrun: {run.dir}")


def _streamed_activations(
    model: Any, hooks: list[str], corpus: str, tokens: int, context_size: int, world: Any
) -> Any:
    """A store streaming `tokens` rows from the model; under torchrun each rank gets every
    world.size-th window of the packed corpus, so ranks run disjoint forward passes."""
    import interplab as il

    if not world.distributed:
        return il.activations(model, hooks, corpus, tokens, context_size=context_size)
    import math

    from interplab.data.corpus import pack
    from interplab.errors import InterplabError

    if context_size > model.cfg.n_ctx:
        raise InterplabError(
            f"context_size {context_size} is longer than the model's context ({model.cfg.n_ctx})."
        )
    per_window = context_size - 1  # the BOS position is not a training row
    n_windows = math.ceil(tokens / per_window)
    if n_windows < world.size:
        raise InterplabError(
            f"--tokens {tokens} fills {n_windows} window(s) of {context_size}; "
            f"{world.size} ranks need at least one each."
        )
    windows = pack(corpus, getattr(model, "tokenizer", None), context_size, n_windows).ids
    mine = windows[world.rank :: world.size]
    return il.activations(
        model,
        hooks,
        mine,
        mine.shape[0] * per_window,
        context_size=context_size,
        progress=world.is_main,
    )


def eval_sae_command(
    dictionary: Annotated[Path, typer.Argument(help="Dictionary folder (SAELens layout).")],
    model: Annotated[str, typer.Argument(help="Organism name, local HF directory, or hub id.")],
    corpus: Annotated[str, typer.Option(help="Corpus to evaluate on.")] = "storyworld",
    tokens: Annotated[int, typer.Option(help="Non-BOS token positions to evaluate.")] = 32_768,
    hook: Annotated[str | None, typer.Option(help="Hook (default: the file's metadata).")] = None,
    hook_out: Annotated[
        str | None, typer.Option(help="Transcoder output hook (default: the metadata).")
    ] = None,
    context_size: Annotated[int, typer.Option(help="Tokens per window, BOS included.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    out: Annotated[
        Path | None, typer.Option(help="Also write a run folder (JSON, figure) under here.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N.")] = None,
) -> None:
    """Evaluate a saved dictionary spliced into MODEL: FVU, L0, CE/KL recovered."""
    import interplab as il
    from interplab.dictionaries.evaluate import evaluate_dictionary
    from interplab.dictionaries.io import load_dictionary
    from interplab.runs import start_run

    m = il.load_model(model, device=device)
    d = load_dictionary(dictionary, device=next(m.parameters()).device)
    kwargs = dict(
        hook_name=hook,
        hook_name_out=hook_out,
        n_tokens=tokens,
        context_size=min(context_size, m.cfg.n_ctx),
        batch_size=batch_size,
        name=dictionary.name,
    )
    if out is None:
        result = evaluate_dictionary(d, m, corpus, **kwargs)
        _print_table(result.table_rows())
        return
    settings = {"dictionary": str(dictionary), "model": model, "corpus": corpus, **kwargs}
    with start_run("eval-sae", settings, root=out) as run:
        result = evaluate_dictionary(d, m, corpus, **kwargs)
        result.save(run, "evaluation")
    _print_table(result.table_rows())
    typer.echo(f"run: {run.dir}")


def compare_command(
    a: Annotated[Path, typer.Argument(help="First dictionary folder.")],
    b: Annotated[Path, typer.Argument(help="Second dictionary folder.")],
    data: Annotated[
        Path | None, typer.Option(help="Activation cache for the functional comparison.")
    ] = None,
    tokens: Annotated[int, typer.Option(help="Rows of --data used.")] = 16_384,
    out: Annotated[
        Path | None, typer.Option(help="Also write a run folder (JSON, figures) under here.")
    ] = None,
) -> None:
    """Compare two dictionaries: shared latents, matching, rotation, functional agreement."""
    import interplab as il
    from interplab.dictionaries.compare import compare_dictionaries
    from interplab.dictionaries.io import load_dictionary
    from interplab.runs import start_run

    da, db = load_dictionary(a), load_dictionary(b)
    rows = None
    if data is not None:
        acts = il.ActivationStore.open(data)
        hook = da.metadata.get("hook_name")
        if len(acts.hooks) > 1 and hook not in acts.hooks:
            from interplab.errors import InterplabError

            raise InterplabError(
                f"the cache in {data} holds {', '.join(acts.hooks)}; none is {a.name}'s hook "
                f"{hook!r}."
            )
        hook = hook if hook in acts.hooks else acts.hooks[0]
        rows = next(acts.batches(tokens, shuffle=False))[hook]
    result = compare_dictionaries(da, db, rows, max_tokens=tokens, names=(a.name, b.name))
    _print_table(result.table_rows())
    if out is not None:
        with start_run("compare", {"a": str(a), "b": str(b), "data": str(data)}, root=out) as run:
            run.save_json("comparison", result.to_dict())
            run.save_figure("max-cosine", result.plot_max_cosine())
            run.save_figure("matched-cosine", result.plot_matched().figure)
        typer.echo(f"run: {run.dir}")


app.command("train-sae")(train_sae_command)
app.command("eval-sae")(eval_sae_command)
app.command("compare")(compare_command)

__all__ = ["app", "compare_command", "eval_sae_command", "make_config", "train_sae_command"]
