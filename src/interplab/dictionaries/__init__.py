"""interplab.dictionaries: sparse dictionaries (SAEs, transcoders) trained on activations.

Variants (one config dataclass each): `ReLU`, `TopK`, `BatchTopK`, `JumpReLU`, `Gated`,
`Matryoshka`, and `Transcoder(variant)` / `SkipTranscoder(variant)` around any of them.

    from interplab.dictionaries import TopK, TrainConfig, train_dictionaries, save_dictionary
    [sae] = train_dictionaries([TopK(d_sae=4096, k=32)], batches, TrainConfig(total_tokens=10**7))
    save_dictionary(sae, "out/topk", {"model_name": "organism-4l", "hook_name": "blocks.2.hook_resid_post"})

From an activation store, with evaluation spliced into the model and comparison:

    sae = train_dictionary(store, TopK(d_sae=4096, k=32))   # hook/model names into metadata
    evaluate_dictionary(sae, model, "storyworld")            # FVU, L0, CE/KL recovered
    compare_dictionaries(sae, other, data=acts)              # shared latents, matching, rotation

Names are imported lazily, so `import interplab.dictionaries` does not load torch until a
name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    "SAEConfig": "configs",
    "ReLU": "configs",
    "TopK": "configs",
    "BatchTopK": "configs",
    "Matryoshka": "configs",
    "JumpReLU": "configs",
    "Gated": "configs",
    "Transcoder": "configs",
    "SkipTranscoder": "configs",
    "DictionaryConfig": "configs",
    "config_from_dict": "configs",
    "Dictionary": "base",
    "DictionaryOutput": "base",
    "geometric_median": "base",
    "build_dictionary": "build",
    "SparseCode": "kernels",
    "TrainConfig": "training",
    "train_dictionaries": "training",
    "ReconstructionMetrics": "metrics",
    "reconstruction_metrics": "metrics",
    "save_dictionary": "io",
    "load_dictionary": "io",
    "train_dictionary": "api",
    "DictionaryEvaluation": "evaluate",
    "evaluate_dictionary": "evaluate",
    "plot_frontier": "evaluate",
    "Comparison": "compare",
    "compare_dictionaries": "compare",
    "OpposingPairs": "compare",
    "opposing_pairs": "compare",
    "top_activations": "features",
    "logit_effects": "features",
    "TopActivations": "features",
    "LogitEffects": "features",
    "FeatureExample": "features",
    "AttentionTranscoder": "attention_transcoder",
    "AttentionTranscoderConfig": "attention_transcoder",
    "AttentionTrainConfig": "attention_transcoder",
    "AttentionTranscoderEvaluation": "attention_transcoder",
    "AttentionTranscoderOutput": "attention_transcoder",
    "SplicedRun": "attention_transcoder",
    "train_attention_transcoder": "attention_transcoder",
    "fit_attention_transcoder": "attention_transcoder",
    "evaluate_attention_transcoder": "attention_transcoder",
    "run_with_attention_transcoder": "attention_transcoder",
    "ablate_heads": "attention_transcoder",
    "steer_heads": "attention_transcoder",
    "save_attention_transcoder": "attention_transcoder",
    "load_attention_transcoder": "attention_transcoder",
}

__all__ = [
    "AttentionTranscoder",
    "AttentionTranscoderConfig",
    "AttentionTrainConfig",
    "AttentionTranscoderEvaluation",
    "AttentionTranscoderOutput",
    "SplicedRun",
    "train_attention_transcoder",
    "fit_attention_transcoder",
    "evaluate_attention_transcoder",
    "run_with_attention_transcoder",
    "ablate_heads",
    "steer_heads",
    "save_attention_transcoder",
    "load_attention_transcoder",
    "BatchTopK",
    "Comparison",
    "Dictionary",
    "DictionaryConfig",
    "DictionaryEvaluation",
    "DictionaryOutput",
    "FeatureExample",
    "LogitEffects",
    "TopActivations",
    "Gated",
    "JumpReLU",
    "Matryoshka",
    "OpposingPairs",
    "ReLU",
    "ReconstructionMetrics",
    "SAEConfig",
    "SkipTranscoder",
    "SparseCode",
    "TopK",
    "TrainConfig",
    "Transcoder",
    "build_dictionary",
    "compare_dictionaries",
    "config_from_dict",
    "evaluate_dictionary",
    "geometric_median",
    "load_dictionary",
    "logit_effects",
    "opposing_pairs",
    "plot_frontier",
    "reconstruction_metrics",
    "save_dictionary",
    "top_activations",
    "train_dictionaries",
    "train_dictionary",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'interplab.dictionaries' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"interplab.dictionaries.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from interplab.dictionaries.api import train_dictionary
    from interplab.dictionaries.attention_transcoder import (
        AttentionTrainConfig,
        AttentionTranscoder,
        AttentionTranscoderConfig,
        AttentionTranscoderEvaluation,
        AttentionTranscoderOutput,
        SplicedRun,
        ablate_heads,
        evaluate_attention_transcoder,
        fit_attention_transcoder,
        load_attention_transcoder,
        run_with_attention_transcoder,
        save_attention_transcoder,
        steer_heads,
        train_attention_transcoder,
    )
    from interplab.dictionaries.base import Dictionary, DictionaryOutput, geometric_median
    from interplab.dictionaries.build import build_dictionary
    from interplab.dictionaries.compare import (
        Comparison,
        OpposingPairs,
        compare_dictionaries,
        opposing_pairs,
    )
    from interplab.dictionaries.configs import (
        BatchTopK,
        DictionaryConfig,
        Gated,
        JumpReLU,
        Matryoshka,
        ReLU,
        SAEConfig,
        SkipTranscoder,
        TopK,
        Transcoder,
        config_from_dict,
    )
    from interplab.dictionaries.evaluate import (
        DictionaryEvaluation,
        evaluate_dictionary,
        plot_frontier,
    )
    from interplab.dictionaries.features import (
        FeatureExample,
        LogitEffects,
        TopActivations,
        logit_effects,
        top_activations,
    )
    from interplab.dictionaries.io import load_dictionary, save_dictionary
    from interplab.dictionaries.kernels import SparseCode
    from interplab.dictionaries.metrics import ReconstructionMetrics, reconstruction_metrics
    from interplab.dictionaries.training import TrainConfig, train_dictionaries
