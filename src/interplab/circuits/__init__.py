"""Circuits: metrics, ablations, lenses (logit lens, DLA) and batched activation patching.

    import interplab as il
    ioi = il.tasks.ioi(model, n=64, seed=0)
    il.circuits.score(model, ioi)                              # clean / corrupted logit diff
    heads = il.circuits.patch_heads(model, ioi, by_pos=True)   # [layer, head, pos]
    heads.plot()
    dla = il.circuits.direct_logit_attribution(model, ioi)     # per head / MLP / embed shares
    logits = il.circuits.ablate(model, ioi.clean_tokens, ["L1H3"], "mean", ioi.corrupted_tokens)
    repair = il.circuits.self_repair(model, ioi)               # direct vs total effect per head
    repair.plot(); repair.plot_split("L1H2")

Everything is written against TransformerLens hook names, so it runs on any
`interplab.load_model` model.
"""

from __future__ import annotations

from interplab.circuits.ablation import (
    ABLATION_KINDS,
    AblationKind,
    Head,
    HookSite,
    LayerOutput,
    Neuron,
    Target,
    ablate,
    ablation_hooks,
    parse_target,
)
from interplab.circuits.acdc import acdc
from interplab.circuits.attribution import (
    ATTRIBUTION_METHODS,
    AttributionComparison,
    AttributionMethod,
    AttributionResult,
    attribute,
    attribute_heads,
    attribute_mlp,
    attribute_neurons,
    attribute_residual,
    attribute_tokens,
    compare_to_patching,
)
from interplab.circuits.capture import capture
from interplab.circuits.eap import EdgeAttribution, eap, eap_ig, exact_edge_scores
from interplab.circuits.edge_patching import EdgeModel, EdgePatcher
from interplab.circuits.faithfulness import Faithfulness, faithfulness, faithfulness_curve
from interplab.circuits.graph import Circuit, Graph
from interplab.circuits.lenses import (
    DLAResult,
    LogitLensResult,
    direct_logit_attribution,
    dla_from_cache,
    dla_hook_names,
    logit_lens,
    plot_attention,
)
from interplab.circuits.metrics import (
    METRIC_KINDS,
    Estimate,
    MetricKind,
    MetricResult,
    TaskMetric,
    accuracy,
    answer_ids,
    answer_logits,
    answer_logprob,
    answer_prob,
    kl_div,
    logit_diff,
    normalize,
    score,
    task_metric,
)
from interplab.circuits.patching import (
    COMPONENTS,
    Component,
    Direction,
    PatchingResult,
    patch,
    patch_attn,
    patch_heads,
    patch_mlp,
    patch_neurons,
    patch_residual,
    patch_tokens,
)
from interplab.circuits.path_patching import (
    RECEIVER_INPUTS,
    VIAS,
    PathNode,
    PathPatchingResult,
    ReceiverInput,
    Via,
    path_patch,
    path_patch_tokens,
)
from interplab.circuits.roles import (
    DEFAULT_THRESHOLDS,
    ROLES,
    HeadRoles,
    HeadScores,
    Role,
    RoleScores,
    classify_heads,
    duplicate_token_attention,
    head_role_scores,
    induction_attention,
    previous_token_attention,
    repeated_sequences,
)
from interplab.circuits.self_repair import (
    SELF_REPAIR_ABLATIONS,
    SelfRepairAblation,
    SelfRepairResult,
    self_repair,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ROLES",
    "HeadRoles",
    "HeadScores",
    "Role",
    "RoleScores",
    "classify_heads",
    "duplicate_token_attention",
    "head_role_scores",
    "induction_attention",
    "previous_token_attention",
    "repeated_sequences",
    "SELF_REPAIR_ABLATIONS",
    "SelfRepairAblation",
    "SelfRepairResult",
    "self_repair",
    "Circuit",
    "EdgeAttribution",
    "EdgeModel",
    "EdgePatcher",
    "Faithfulness",
    "Graph",
    "acdc",
    "eap",
    "eap_ig",
    "exact_edge_scores",
    "faithfulness",
    "faithfulness_curve",
    "ATTRIBUTION_METHODS",
    "RECEIVER_INPUTS",
    "VIAS",
    "AttributionComparison",
    "AttributionMethod",
    "AttributionResult",
    "PathNode",
    "PathPatchingResult",
    "ReceiverInput",
    "Via",
    "attribute",
    "attribute_heads",
    "attribute_mlp",
    "attribute_neurons",
    "attribute_residual",
    "attribute_tokens",
    "compare_to_patching",
    "path_patch",
    "path_patch_tokens",
    "ABLATION_KINDS",
    "COMPONENTS",
    "METRIC_KINDS",
    "AblationKind",
    "Component",
    "DLAResult",
    "Direction",
    "Estimate",
    "Head",
    "HookSite",
    "LayerOutput",
    "LogitLensResult",
    "MetricKind",
    "MetricResult",
    "Neuron",
    "PatchingResult",
    "Target",
    "TaskMetric",
    "ablate",
    "ablation_hooks",
    "accuracy",
    "answer_ids",
    "answer_logits",
    "answer_logprob",
    "answer_prob",
    "capture",
    "direct_logit_attribution",
    "dla_from_cache",
    "dla_hook_names",
    "kl_div",
    "logit_diff",
    "logit_lens",
    "normalize",
    "parse_target",
    "patch",
    "patch_attn",
    "patch_heads",
    "patch_mlp",
    "patch_neurons",
    "patch_residual",
    "patch_tokens",
    "plot_attention",
    "score",
    "task_metric",
]
