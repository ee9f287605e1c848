"""`blocks.L.hook_resid_mid` with HookedTransformer's meaning on a TransformerBridge.

In TransformerLens's HookedTransformer the residual stream after attention is one tensor:
the MLP reads it *and* the block adds the MLP output to it, so editing `hook_resid_mid`
changes both `hook_mlp_in` and `hook_resid_post`. A TransformerBridge runs the real
HuggingFace block (`h = h + attn(ln_1(h)); h = h + mlp(ln_2(h))`) and aliases
`hook_resid_mid` to the input hook of `ln_2` (`blocks.L.ln2.hook_in`). An edit there reaches
the MLP but not the skip connection, so the residual stream after the block still carries the
unedited value. Patching, ablating or steering `hook_resid_mid` then gives other numbers
than HookedTransformer does, silently.

`link_resid_mid(model)` restores HookedTransformer's meaning without touching the HF code:
whenever something is hooked on the resid_mid point, the change its hooks made
(`edited - original`, zero for caching hooks) is remembered and added to the block output
before `hook_resid_post`'s own hooks run. The added term also carries gradients, so a
backward hook on `hook_resid_mid` sees the gradient through the skip connection as well as
through the MLP, as in HookedTransformer. An unhooked point costs nothing.

The same HookPoint object is reached as `blocks.L.ln2.hook_in`, which therefore has this
meaning too. `hook_mlp_in` (switch it on with `model.set_use_hook_mlp_in(True)`) stays the
MLP-only input, as in HookedTransformer.
"""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.hook_points import HookPoint


class _Link:
    """The edit made at one block's resid_mid, waiting to be added at its resid_post."""

    __slots__ = ("delta",)

    def __init__(self) -> None:
        self.delta: torch.Tensor | None = None


def _is_hooked(module: torch.nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


class ResidMidHookPoint(HookPoint):
    """The resid_mid HookPoint: remembers what its hooks changed."""

    _link: _Link

    def _call_impl(self, *args: Any, **kwargs: Any) -> Any:
        if not _is_hooked(self) or not args or not isinstance(args[0], torch.Tensor):
            return super()._call_impl(*args, **kwargs)
        original = args[0]
        edited = super()._call_impl(*args, **kwargs)
        if isinstance(edited, torch.Tensor) and edited.shape == original.shape:
            self._link.delta = edited - original
        return edited


class ResidPostHookPoint(HookPoint):
    """The block output HookPoint: adds the resid_mid edit before its own hooks run."""

    _link: _Link

    def _call_impl(self, *args: Any, **kwargs: Any) -> Any:
        delta, self._link.delta = self._link.delta, None
        if delta is not None and args and getattr(args[0], "shape", None) == delta.shape:
            args = (args[0] + delta, *args[1:])
        return super()._call_impl(*args, **kwargs)


class ResidPreHookPoint(HookPoint):
    """The block input HookPoint: forgets any edit left by a forward that stopped early."""

    _link: _Link

    def _call_impl(self, *args: Any, **kwargs: Any) -> Any:
        self._link.delta = None
        return super()._call_impl(*args, **kwargs)


_ROLES = {
    "hook_resid_pre": ResidPreHookPoint,
    "hook_resid_mid": ResidMidHookPoint,
    "hook_resid_post": ResidPostHookPoint,
}


def link_resid_mid(model: Any) -> int:
    """Give every sequential block of a TransformerBridge HookedTransformer's resid_mid
    semantics (see the module docstring). Blocks whose resid_mid alias is missing (parallel
    attention and MLP) or already a real residual tensor are left alone. Returns the number
    of blocks changed; calling it twice changes nothing more."""
    hooks = getattr(model, "hook_dict", None)
    n_layers = getattr(getattr(model, "cfg", None), "n_layers", 0)
    if not isinstance(hooks, dict):
        return 0
    changed = 0
    for layer in range(n_layers):
        points = {role: hooks.get(f"blocks.{layer}.{role}") for role in _ROLES}
        if not all(isinstance(p, HookPoint) for p in points.values()):
            continue
        if len({id(p) for p in points.values()}) != 3:
            continue  # resid_mid shares a tensor with pre/post: nothing to link
        if isinstance(points["hook_resid_mid"], ResidMidHookPoint):
            continue
        if any(type(point) is not HookPoint for point in points.values()):
            continue  # an unexpected subclass: leave the block as it is
        link = _Link()
        for role, point in points.items():
            point.__class__ = _ROLES[role]
            point._link = link
        changed += 1
    return changed
