"""`build_dictionary`: the one place that maps a config type to its implementation."""

from __future__ import annotations

import torch

from interplab.dictionaries.base import Dictionary
from interplab.dictionaries.configs import (
    BatchTopK,
    DictionaryConfig,
    Gated,
    JumpReLU,
    Matryoshka,
    ReLU,
    SAEConfig,
    TopK,
    Transcoder,
)
from interplab.dictionaries.gated import GatedDictionary
from interplab.dictionaries.jumprelu import JumpReLUDictionary
from interplab.dictionaries.standard import ReLUDictionary
from interplab.dictionaries.topk import BatchTopKDictionary, MatryoshkaDictionary, TopKDictionary
from interplab.errors import InterplabError

IMPLEMENTATIONS: dict[type[SAEConfig], type[Dictionary]] = {
    ReLU: ReLUDictionary,
    TopK: TopKDictionary,
    BatchTopK: BatchTopKDictionary,
    Matryoshka: MatryoshkaDictionary,
    JumpReLU: JumpReLUDictionary,
    Gated: GatedDictionary,
}


def build_dictionary(
    config: DictionaryConfig,
    d_in: int,
    d_out: int | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Dictionary:
    """A freshly initialised dictionary for inputs of width `d_in` (and targets of width
    `d_out`, transcoders only; default d_in). Weights are random (seed with torch.manual_seed)."""
    if not isinstance(config, SAEConfig | Transcoder) or type(config) is SAEConfig:
        raise InterplabError(
            f"expected a dictionary config ({', '.join(c.__name__ for c in IMPLEMENTATIONS)}, "
            f"Transcoder or SkipTranscoder), got {config!r}."
        )
    implementation = IMPLEMENTATIONS[type(config.variant)]
    return implementation(config, d_in, d_out, device=device, dtype=dtype)
