"""interplab: a fast, tested workbench for mechanistic interpretability.

Everything speaks TransformerLens hook names. Heavy submodules (torch, transformers,
TransformerLens) are imported only when a name that needs them is first used, so
`import interplab` and `interplab --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from interplab.errors import InterplabError

__version__ = "0.1.0"

# public name -> "module:attribute" (attribute None means the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "load_model": ("interplab.models", "load_model"),
    "list_organisms": ("interplab.models", "list_organisms"),
    "weights": ("interplab.models", "weights"),
    "activations": ("interplab.data.activations", "activations"),
    "ActivationStore": ("interplab.data.activations", "ActivationStore"),
    "corpus": ("interplab.data.corpus", None),
    "tasks": ("interplab.data.tasks", None),
    "runs": ("interplab.runs", None),
    "run_recipe": ("interplab.runs", "run_recipe"),
    "Report": ("interplab.runs", "Report"),
    "recipes": ("interplab.recipes", None),
    "models": ("interplab.models", None),
    "data": ("interplab.data", None),
    "toys": ("interplab.toys", None),
    "slt": ("interplab.slt", None),
    "train_attention_transcoder": (
        "interplab.dictionaries.attention_transcoder",
        "train_attention_transcoder",
    ),
    "evaluate_attention_transcoder": (
        "interplab.dictionaries.attention_transcoder",
        "evaluate_attention_transcoder",
    ),
    "estimate_llc": ("interplab.slt", "estimate_llc"),
    "LLCConfig": ("interplab.slt", "LLCConfig"),
    "circuits": ("interplab.circuits", None),
    "train_dictionary": ("interplab.dictionaries", "train_dictionary"),
    "train_dictionaries": ("interplab.dictionaries", "train_dictionaries"),
    "evaluate_dictionary": ("interplab.dictionaries", "evaluate_dictionary"),
    "compare_dictionaries": ("interplab.dictionaries", "compare_dictionaries"),
    "load_dictionary": ("interplab.dictionaries", "load_dictionary"),
    "save_dictionary": ("interplab.dictionaries", "save_dictionary"),
    "TopK": ("interplab.dictionaries", "TopK"),
    "BatchTopK": ("interplab.dictionaries", "BatchTopK"),
    "ReLU": ("interplab.dictionaries", "ReLU"),
    "JumpReLU": ("interplab.dictionaries", "JumpReLU"),
    "Gated": ("interplab.dictionaries", "Gated"),
    "Matryoshka": ("interplab.dictionaries", "Matryoshka"),
    "Transcoder": ("interplab.dictionaries", "Transcoder"),
    "SkipTranscoder": ("interplab.dictionaries", "SkipTranscoder"),
    "dictionaries": ("interplab.dictionaries", None),
}

__all__ = ["InterplabError", "__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'interplab' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
