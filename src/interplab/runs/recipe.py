"""Running a recipe: config from flags -> fresh run folder -> `module.run` -> report on disk.

This is what `interplab run <recipe> --flag value ...` calls. The recipe module (see
`interplab.recipes`) only does the science; folder creation, config.json, status
marking and report writing happen here, the same way for every recipe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from interplab.config import config_from_args, config_help
from interplab.errors import InterplabError
from interplab.runs.folders import start_run
from interplab.runs.report import Report

__all__ = ["RecipeResult", "recipe_help", "run_recipe"]


@dataclasses.dataclass
class RecipeResult:
    """Where a finished recipe run left its outputs."""

    run_dir: Path
    """The run folder (config.json, metrics.jsonl, figures/, report.html, report.json)."""
    report_path: Path
    """The rendered report, `run_dir / "report.html"`."""
    report: Report
    """The report object the recipe returned."""
    config: Any
    """The recipe's `Config` instance the run used."""


def _module(name: str) -> ModuleType:
    from interplab.recipes import recipe_module

    module = recipe_module(name)
    missing = [a for a in ("Config", "run") if not hasattr(module, a)]
    if missing:
        raise InterplabError(
            f"recipe {name!r} (module {module.__name__}) lacks {', '.join(missing)}; a recipe "
            "module defines Config, DESCRIPTION and run(config, run)"
        )
    return module


def run_recipe(
    name: str,
    overrides: Mapping[str, Any] | list[str] | None = None,
    root: str | Path = "runs",
    config: Any = None,
    resume: str | Path | None = None,
) -> RecipeResult:
    """Run recipe `name` in a new run folder under `root` and write its report there.

    The config is `module.Config` built from `overrides` (CLI-style `["--k", "32"]` or
    `{"k": "32"}`), applied on top of `config` when one is given, else on the class
    defaults. With `resume=<run folder>`, that folder is reopened instead (its saved
    config must match). If the recipe raises, status.json records the failure and the
    exception propagates.
    """
    module = _module(name)
    if config is not None and not isinstance(config, module.Config):
        raise InterplabError(
            f"config for recipe {name!r} must be a {module.__name__}.Config, "
            f"got {type(config).__qualname__}"
        )
    config = config_from_args(module.Config, overrides, base=config)
    with start_run(name, config, root=root, resume=resume) as run:
        report = module.run(config, run)
        if not isinstance(report, Report):
            raise InterplabError(
                f"recipe {name!r} returned {type(report).__qualname__}, expected an "
                "interplab.runs.Report"
            )
        report_path = report.write(run.dir / "report.html")
    return RecipeResult(run_dir=run.dir, report_path=report_path, report=report, config=config)


def recipe_help(name: str) -> str:
    """`DESCRIPTION` of recipe `name` followed by its flags (for `interplab run NAME --help`)."""
    module = _module(name)
    description = getattr(module, "DESCRIPTION", "").strip()
    flags = config_help(module.Config)
    return f"{name}: {description}\n\nOptions:\n{flags}" if flags else f"{name}: {description}"
