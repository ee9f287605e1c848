"""Run a model once and keep the activations at named hook points (plus the logits)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.models.hooks import check_hook_names


def capture(
    model: Any, tokens: Int[Tensor, "batch pos"], hook_names: Sequence[str]
) -> tuple[Float[Tensor, "batch pos vocab"], dict[str, Tensor]]:
    """Logits of `tokens` and the activation at each of `hook_names`.

    Bridge hook points can fire under their canonical name (`blocks.0.hook_out` for
    `blocks.0.hook_resid_post`), so every activation is keyed by the name that was asked
    for, through a closure, not by `hook.name`. Unknown names raise `InterplabError`;
    optional hook points (e.g. `attn.hook_result`) are switched on.
    """
    names = check_hook_names(model, list(hook_names))
    store: dict[str, Tensor] = {}

    def saver(name: str) -> Callable[[Tensor, Any], None]:
        def keep(act: Tensor, hook: Any) -> None:
            store[name] = act.detach().clone()

        return keep

    with torch.inference_mode(), model.hooks(fwd_hooks=[(n, saver(n)) for n in names]):
        logits = model(tokens)
    return logits, store
