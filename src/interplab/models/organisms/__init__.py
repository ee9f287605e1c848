"""The registry of bundled model organisms.

Each organism is a folder here in HuggingFace format (config.json, model.safetensors,
tokenizer.json) plus `card.json`: what it was trained on, for how long, and its scorecard.
The registry is the set of folders that hold a card, so adding an organism adds a folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interplab.errors import InterplabError, unknown

ROOT = Path(__file__).parent


@dataclass
class OrganismCard:
    """What `card.json` says about an organism."""

    name: str
    """Registry name, e.g. 'storyworld-4l'."""
    description: str = ""
    """One line: architecture and what it was trained on."""
    data: dict[str, Any] = field(default_factory=dict)
    """The whole card as saved (training data, steps, seed, losses, scorecard)."""

    def one_line(self) -> str:
        loss = self.data.get("final_eval_loss")
        loss_text = f", held-out loss {loss:.3f}" if isinstance(loss, float) else ""
        return f"{self.name}: {self.description}{loss_text}"


def organism_names() -> list[str]:
    """Names of the bundled organisms (folders holding a card.json), sorted."""
    return sorted(p.parent.name for p in ROOT.glob("*/card.json"))


def organism_path(name: str) -> Path:
    """The folder of organism `name`; unknown names list the known ones."""
    if name not in organism_names():
        raise unknown("model organism", name, organism_names(), show_all=True)
    return ROOT / name


def organism_card(name: str) -> OrganismCard:
    """Read the card of organism `name`."""
    path = organism_path(name) / "card.json"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InterplabError(f"{path} is not valid JSON: {error}") from error
    return OrganismCard(name=name, description=data.get("description", ""), data=data)


def list_organisms() -> list[OrganismCard]:
    """Cards of every bundled organism."""
    return [organism_card(name) for name in organism_names()]
