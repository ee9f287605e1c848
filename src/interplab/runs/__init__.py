"""Run folders, metrics logging, atomic writes, HTML reports and running recipes.

    with il.runs.start_run("sae-sweep", config) as run:   # runs/<timestamp>-sae-sweep/
        run.log(step=100, loss=0.31, l0=30.2)             # metrics.jsonl
        run.save_figure("loss", fig)                      # figures/loss.png
        Report("Sweep").table(rows).write(run.path("report.html"))

Nothing here imports torch, numpy or matplotlib; they are used only when handed in.
"""

from interplab.runs.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from interplab.runs.folders import Run, figure_png, read_metrics, start_run
from interplab.runs.recipe import RecipeResult, recipe_help, run_recipe
from interplab.runs.report import Report

__all__ = [
    "RecipeResult",
    "Report",
    "Run",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "figure_png",
    "read_metrics",
    "recipe_help",
    "run_recipe",
    "start_run",
]
