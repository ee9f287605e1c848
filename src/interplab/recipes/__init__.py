"""The recipe registry: one module per study, run with `interplab run <recipe>`.

A recipe module defines
- `Config`: a dataclass whose fields (with docstrings) become the CLI flags,
- `DESCRIPTION`: one line for `interplab run --help`,
- `run(config: Config, run: interplab.runs.Run) -> interplab.runs.Report`: does the work,
  logs metrics and artifacts into the run folder and returns the report to render.

Modules are imported only when their recipe is run or described, so listing is cheap.
A later capability adds a recipe by adding one line to `RECIPES`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from interplab.errors import unknown

RECIPES: dict[str, str] = {
    "demo": "interplab.recipes.demo",
    "superposition": "interplab.recipes.superposition",
    "grokking": "interplab.recipes.grokking",
    "sae": "interplab.recipes.sae",
    "attention-superposition": "interplab.recipes.attention_superposition",
    "hierarchy": "interplab.recipes.hierarchy",
    "llc": "interplab.recipes.llc",
    "attention-transcoder": "interplab.recipes.attention_transcoder",
    "ioi": "interplab.recipes.ioi",
    "induction": "interplab.recipes.induction",
    "universality": "interplab.recipes.universality",
}


def recipe_module(name: str) -> ModuleType:
    """Import and return the module of recipe `name` (clear error for unknown names)."""
    if name not in RECIPES:
        raise unknown("recipe", name, RECIPES, show_all=True)
    return importlib.import_module(RECIPES[name])


def register(name: str, module: str) -> None:
    """Register an out-of-tree recipe module (e.g. from a research project) under `name`."""
    RECIPES[name] = module
