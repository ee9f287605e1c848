"""`hook_resid_mid` on a TransformerBridge behaves as in HookedTransformer (see
interplab.models.resid_mid): an edit reaches both the MLP and the skip connection, and its
gradient covers both paths."""

from __future__ import annotations

import pytest
import torch

import interplab as il
from interplab.models.resid_mid import ResidMidHookPoint, link_resid_mid
from tests.conftest import make_hf_model, make_tokenizer

FAMILIES = ["gpt2", "llama", "gemma2"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return il.load_model(make_hf_model(request.param), tokenizer=make_tokenizer(), device="cpu")


def _tokens():
    return torch.randint(1, 90, (2, 7), generator=torch.Generator().manual_seed(0))


def _run(model, hooks, names):
    seen = {}

    def keeper(name):
        def keep(x, hook):
            seen[name] = x.detach().clone()

        return keep

    model.run_with_hooks(_tokens(), fwd_hooks=hooks + [(n, keeper(n)) for n in names])
    return seen


def test_zeroed_resid_mid_leaves_only_the_mlp_output(model):
    layer = 1
    seen = _run(
        model,
        [(f"blocks.{layer}.hook_resid_mid", lambda x, hook: torch.zeros_like(x))],
        [f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_mlp_out"],
    )
    # HookedTransformer: resid_post = resid_mid + mlp_out with resid_mid = 0
    post, mlp = seen[f"blocks.{layer}.hook_resid_post"], seen[f"blocks.{layer}.hook_mlp_out"]
    torch.testing.assert_close(post, mlp, atol=1e-5, rtol=0)


def test_steering_resid_mid_shifts_resid_post_by_the_edit_plus_the_mlp_change(model):
    layer = 0
    steer = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    names = [f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out"]
    names.append(f"blocks.{layer}.hook_resid_post")
    clean = _run(model, [], names)
    steered = _run(model, [(names[0], lambda x, hook: x + steer)], names[1:])
    expected = clean[names[0]] + steer + steered[names[1]]
    torch.testing.assert_close(steered[names[2]], expected, atol=1e-5, rtol=1e-5)


def test_gradient_at_resid_mid_matches_a_finite_difference_of_the_edit(model):
    """The backward hook's gradient and the forward edit agree: d loss / d eps of
    `resid_mid + eps * v` equals <grad, v>, which needs the skip path in both."""
    model = model.to(torch.float64)
    try:
        name = "blocks.0.hook_resid_mid"
        grads = {}

        def keep_grad(g, hook):
            grads["g"] = g.detach().clone()

        model.add_hook(name, keep_grad, dir="bwd")
        try:
            loss = model(_tokens(), return_type="loss")
            loss.backward()
        finally:
            model.reset_hooks()
        v = torch.randn_like(grads["g"], generator=torch.Generator().manual_seed(2))
        eps = 1e-3

        def loss_at(e):
            with torch.no_grad():
                return model.run_with_hooks(
                    _tokens(), return_type="loss", fwd_hooks=[(name, lambda x, hook: x + e * v)]
                ).item()

        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        analytic = (grads["g"] * v).sum().item()
        # rel 2e-3: llama and gemma2 keep some tables in float32; a missing skip path is O(1)
        assert numeric == pytest.approx(analytic, rel=2e-3, abs=1e-9)
    finally:
        model.zero_grad(set_to_none=True)
        model.to(torch.float32)


def test_unhooked_model_is_unchanged_and_linking_twice_does_nothing(model):
    assert isinstance(model.hook_dict["blocks.0.hook_resid_mid"], ResidMidHookPoint)
    assert link_resid_mid(model) == 0
    with torch.no_grad():
        logits = model(_tokens())
        hf = model.original_model(_tokens()).logits
    torch.testing.assert_close(logits, hf, atol=1e-5, rtol=1e-5)


def test_an_edit_left_by_a_failed_forward_is_not_added_to_the_next_run(model):
    """A forward that dies between resid_mid and resid_post leaves its edit behind; the next
    run must not add it."""

    def fail(x, hook):
        raise RuntimeError("stop")

    with torch.no_grad():
        clean = model(_tokens())
        model.add_hook("blocks.0.hook_resid_mid", lambda x, hook: x + 100.0)
        model.add_hook("blocks.0.hook_mlp_out", fail)
        with pytest.raises(RuntimeError, match="stop"):
            model(_tokens())
        model.reset_hooks()
        again = model(_tokens())
    torch.testing.assert_close(again, clean)
