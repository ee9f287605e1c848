"""The `interplab` command: one command tree mirroring the Python API.

Heavy libraries are imported inside each command, so `interplab --help` answers at once.
Errors about user input (`InterplabError`) print one line and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from interplab.errors import InterplabError

app = typer.Typer(
    name="interplab",
    help="interplab: a fast, tested workbench for mechanistic interpretability.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("models")
def models_command(
    recipes: Annotated[
        bool, typer.Option("--recipes", help="List the organism recipes instead.")
    ] = False,
) -> None:
    """List the bundled model organisms with one-line cards."""
    from interplab.models.organisms import list_organisms

    if recipes:
        from interplab.models.organisms.suite import SUITE

        for spec in SUITE.values():
            typer.echo(f"{spec.name:<22} {spec.description}")
        return
    cards = list_organisms()
    if not cards:
        typer.echo(
            "No model organisms are bundled yet. Load a local HF directory or a ToyConfig instead."
        )
        return
    for card in cards:
        typer.echo(card.one_line())


@app.command("info")
def info_command(
    model: Annotated[str, typer.Argument(help="Organism name, local HF directory, or hub id.")],
    hooks: Annotated[bool, typer.Option("--hooks/--no-hooks", help="List every hook name.")] = True,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N.")] = "cpu",
) -> None:
    """Architecture, sizes and hook names of MODEL."""
    import interplab as il
    from interplab.models.info import model_info

    info = model_info(il.load_model(model, device=device), name=model)
    width = max(len(k) for k, _ in info.summary_rows())
    for key, value in info.summary_rows():
        typer.echo(f"{key:<{width}}  {value}")
    if hooks:
        typer.echo("\nhook names (blocks.0 shown; every block has the same):")
        for name in info.hook_names:
            if not name.startswith("blocks.") or name.startswith("blocks.0."):
                typer.echo(f"  {name}")


@app.command("cache")
def cache_command(
    model: Annotated[str, typer.Argument(help="Organism name, local HF directory, or hub id.")],
    hook: Annotated[list[str], typer.Option("--hook", help="Hook name; repeat for several.")],
    corpus: Annotated[
        str, typer.Option(help="storyworld, python-stdlib, a text file/folder, or a token file.")
    ],
    tokens: Annotated[int, typer.Option(help="Number of token rows to cache per hook.")],
    out: Annotated[Path, typer.Option(help="Cache folder (created; resumed if interrupted).")],
    context_size: Annotated[int, typer.Option(help="Tokens per window, BOS included.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 32,
    shard_tokens: Annotated[int, typer.Option(help="Rows per shard file.")] = 65_536,
    dtype: Annotated[str, typer.Option(help="Storage dtype: float32 or float16.")] = "float32",
    include_bos: Annotated[
        bool, typer.Option(help="Keep the BOS position of each window.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Order of documents when packing the corpus.")] = 0,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if present).")
    ] = None,
) -> None:
    """Cache activations of one or more hook points to memory-mappable shards."""
    import interplab as il

    m = il.load_model(model, device=device)
    store = il.activations(
        m,
        hook,
        corpus,
        tokens,
        context_size=context_size,
        batch_size=batch_size,
        out=out,
        shard_tokens=shard_tokens,
        dtype=dtype,
        include_bos=include_bos,
        seed=seed,
    )
    widths = ", ".join(f"{h} (d={d})" for h, d in store.d.items())
    typer.echo(f"cached {store.n_tokens:,} tokens of {widths}\n-> {out}")


@app.command("scorecard")
def scorecard_command(
    model: Annotated[str, typer.Argument(help="Organism name, local HF directory, or hub id.")],
    phenomenon: Annotated[
        list[str] | None, typer.Option("--phenomenon", help="Score only these (repeatable).")
    ] = None,
    n: Annotated[int, typer.Option(help="Prompts per phenomenon.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the prompts.")] = 0,
    save: Annotated[
        Path | None, typer.Option(help="Also write the scorecard as JSON here.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N.")] = None,
) -> None:
    """Score MODEL on every storyworld phenomenon (a bundled organism: on those of its card),
    on held-out phrasings."""
    import interplab as il
    from interplab.data.tasks.scorecard import scorecard
    from interplab.models.organisms import organism_card, organism_names
    from interplab.runs import atomic_write_json

    if not phenomenon and model in organism_names():
        rows = organism_card(model).data.get("scorecard", {}).get("rows", [])
        phenomenon = [row["phenomenon"] for row in rows] or None
    card = scorecard(
        il.load_model(model, device=device), phenomenon or None, n=n, seed=seed, name=model
    )
    typer.echo(card.format())
    if save is not None:
        atomic_write_json(save, card.to_dict())
        typer.echo(f"-> {save}")


@app.command("train-organism")
def train_organism_command(
    name: Annotated[
        str, typer.Argument(help="Organism recipe name (see `interplab models --recipes`).")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: the bundled folder).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Override the number of steps.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, or auto.")] = "auto",
) -> None:
    """Train a model organism exactly as the bundled one was made (resumes if interrupted)."""
    from interplab.models.organisms.suite import train_organism

    folder = train_organism(name, out, steps=steps, device=device)
    typer.echo(f"-> {folder}")


@app.command(
    "run",
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
)
def run_command(
    ctx: typer.Context,
    recipe: Annotated[str | None, typer.Argument(help="Recipe name; omit to list them.")] = None,
    root: Annotated[Path, typer.Option(help="Folder that holds run folders.")] = Path("runs"),
) -> None:
    """Run a study recipe: `interplab run RECIPE [--field value ...]`; `interplab run RECIPE --help`
    lists its flags."""
    from interplab.recipes import RECIPES, recipe_module

    args = list(ctx.args)
    if recipe in (None, "--help", "-h"):
        typer.echo("Usage: interplab run RECIPE [--field value ...]\n\nRecipes:")
        for name in sorted(RECIPES):
            typer.echo(f"  {name:<26} {getattr(recipe_module(name), 'DESCRIPTION', '')}")
        return
    if "--help" in args or "-h" in args:
        from interplab.runs import recipe_help

        typer.echo(recipe_help(recipe))
        return
    from interplab.runs import run_recipe

    result = run_recipe(recipe, args, root=root)
    typer.echo(f"report: {result.report_path}")


@app.command("demo")
def demo_command(
    root: Annotated[Path, typer.Option(help="Folder that holds run folders.")] = Path("runs"),
    fast: Annotated[bool, typer.Option(help="Smaller settings (for tests).")] = False,
) -> None:
    """The tour: load a model, look inside it, and write one HTML report."""
    from interplab.runs import run_recipe

    result = run_recipe("demo", ["--fast"] if fast else [], root=root)
    typer.echo(f"\nDemo report: {result.report_path.resolve()}")


def _register_dictionary_commands() -> None:
    # Defined in interplab.dictionaries.cli (imports nothing heavy at module level).
    from interplab.dictionaries.cli import compare_command, eval_sae_command, train_sae_command

    app.command("train-sae")(train_sae_command)
    app.command("eval-sae")(eval_sae_command)
    app.command("compare")(compare_command)


_register_dictionary_commands()


def main() -> None:
    """Entry point of the `interplab` script."""
    try:
        app()
    except InterplabError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
