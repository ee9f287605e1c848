"""Models: the one place interplab touches TransformerLens and transformers loading APIs.

`load_model(spec)` returns a TransformerLens 4 `TransformerBridge` for a bundled organism,
a local HuggingFace directory, an in-memory HF model, a hub id (when reachable) or a toy
config. Everything else in interplab is written against hook names and tensors.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_model": "interplab.models.loading",
    "ToyConfig": "interplab.models.toy",
    "list_organisms": "interplab.models.organisms",
    "organism_path": "interplab.models.organisms",
    "OrganismCard": "interplab.models.organisms",
    "ModelWeights": "interplab.models.accessor",
    "weights": "interplab.models.accessor",
    "hook_names": "interplab.models.hooks",
    "check_hook_names": "interplab.models.hooks",
    "layer_of_hook": "interplab.models.hooks",
    "model_info": "interplab.models.info",
    "ModelInfo": "interplab.models.info",
    "tokenize": "interplab.models.tokens",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'interplab.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
