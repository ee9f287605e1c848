"""Hook names: the common language. Listing, validating and parsing them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from interplab.errors import InterplabError, closest

_LAYER = re.compile(r"^blocks\.(\d+)\.")


def hook_names(model: Any) -> list[str]:
    """Every hook point name of `model`, in module order (canonical TransformerLens names)."""
    return list(model.hook_dict.keys())


def check_hook_names(model: Any, names: str | Iterable[str]) -> list[str]:
    """Return `names` as a list, or raise naming the first unknown one and the closest valid names."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise InterplabError(
            "no hook names given; expected at least one, e.g. 'blocks.0.hook_resid_post'."
        )
    valid = model.hook_dict
    for name in names:
        if name not in valid:
            near = closest(name, valid.keys(), n=3)
            hint = f" Did you mean: {', '.join(near)}?" if near else ""
            raise InterplabError(
                f"hook name {name!r} is not in this model ({len(valid)} hook points; "
                f"`interplab info MODEL` lists them).{hint}"
            )
    enable_optional_hooks(model, names)
    return names


# Hook points TransformerLens computes only on request (they cost memory or time).
_OPTIONAL = {
    "hook_mlp_in": "set_use_hook_mlp_in",
    "hook_attn_in": "set_use_attn_in",
    "hook_q_input": "set_use_split_qkv_input",
    "hook_k_input": "set_use_split_qkv_input",
    "hook_v_input": "set_use_split_qkv_input",
    "hook_result": "set_use_attn_result",
}


def enable_optional_hooks(model: Any, names: Iterable[str]) -> None:
    """Switch on the optional hook points among `names` (e.g. `attn.hook_result`)."""
    for name in names:
        setter = _OPTIONAL.get(name.rsplit(".", 1)[-1])
        if setter and hasattr(model, setter):
            getattr(model, setter)(True)


def layer_of_hook(name: str, n_layers: int) -> int:
    """The block index a hook lives in: `blocks.3.*` -> 3; before the blocks -> -1;
    after them (ln_final, unembed) -> n_layers."""
    match = _LAYER.match(name)
    if match:
        return int(match.group(1))
    if name.startswith(("hook_embed", "hook_pos_embed", "embed.", "pos_embed.", "hook_tokens")):
        return -1
    return n_layers
