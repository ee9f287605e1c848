"""Ablations: zero equals removing the weights, mean uses the reference mean, resample draws
reference rows, targets parse, and bad input is refused."""

from __future__ import annotations

import copy

import pytest
import torch

import interplab as il
from interplab import circuits as C
from interplab.errors import InterplabError
from tests.conftest import VOCAB, make_hf_model


def enlarge(hf, factor=4.0):
    """Scale every weight matrix so random-init effects are well above float noise."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 2 and "wpe" not in name:
                p.mul_(factor)
    return hf


@pytest.fixture(scope="module")
def gpt2_pair():
    torch.set_num_threads(1)
    hf = enlarge(make_hf_model("gpt2"))
    return hf, il.load_model(copy.deepcopy(hf), device="cpu")


@pytest.fixture(scope="module")
def llama_pair():
    hf = enlarge(make_hf_model("llama"))
    return hf, il.load_model(copy.deepcopy(hf), device="cpu")


def tokens(batch=3, pos=7, seed=0):
    return torch.randint(1, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def test_zero_head_equals_removing_its_output_weights(gpt2_pair, llama_pair):
    ids = tokens()
    for family, (hf, model) in (("gpt2", gpt2_pair), ("llama", llama_pair)):
        layer, head = 1, 2
        d_head = model.cfg.d_head
        masked = copy.deepcopy(hf)
        with torch.no_grad():
            cols = slice(head * d_head, (head + 1) * d_head)
            if family == "gpt2":  # Conv1D weight is [in, out]: the head's rows of c_proj
                masked.transformer.h[layer].attn.c_proj.weight[cols] = 0
            else:  # nn.Linear weight is [out, in]: the head's columns of o_proj
                masked.model.layers[layer].self_attn.o_proj.weight[:, cols] = 0
            expected = masked(ids).logits
            plain = hf(ids).logits
        got = C.ablate(model, ids, [C.Head(layer, head)], "zero")
        assert (got - expected).abs().max() < 1e-5, family
        assert (got - plain).abs().max() > 1e-2, family  # the ablation did something


def test_zero_neuron_equals_removing_its_output_row(gpt2_pair):
    hf, model = gpt2_pair
    ids = tokens()
    masked = copy.deepcopy(hf)
    with torch.no_grad():
        masked.transformer.h[0].mlp.c_proj.weight[17] = 0
        masked.transformer.h[0].mlp.c_proj.weight[40] = 0
        expected = masked(ids).logits
    got = C.ablate(model, ids, ["L0N17", C.Neuron(0, 40)], "zero")
    assert (got - expected).abs().max() < 1e-5


def test_zero_layer_output_equals_manual_hook(gpt2_pair):
    _, model = gpt2_pair
    ids = tokens()

    def zero(act, hook):
        return torch.zeros_like(act)

    with torch.no_grad():
        expected = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_mlp_out", zero)])
    got = C.ablate(model, ids, "L1.mlp", "zero")
    assert torch.allclose(got, expected, atol=1e-6)


def test_mean_ablation_uses_the_reference_mean(gpt2_pair):
    _, model = gpt2_pair
    ids, reference = tokens(seed=1), tokens(batch=5, pos=9, seed=2)
    name = "blocks.1.attn.hook_z"
    with torch.no_grad():
        _, cache = model.run_with_cache(reference)
        _, own = model.run_with_cache(ids)
    mean = cache[name].mean(0)[: ids.shape[1]]  # per position, over reference prompts
    ((hook_name, fn),) = C.ablation_hooks(model, [C.Head(1, 3)], "mean", reference)
    assert hook_name == name
    out = fn(own[name], None)
    assert torch.allclose(out[:, :, 3], mean[None, :, 3].expand(3, -1, -1), atol=1e-6)
    assert torch.equal(out[:, :, :3], own[name][:, :, :3])  # other heads untouched

    def manual(act, hook):
        act = act.clone()
        act[:, :, 3] = mean[:, 3]
        return act

    with torch.no_grad():
        expected = model.run_with_hooks(ids, fwd_hooks=[(name, manual)])
    got = C.ablate(model, ids, "L1H3", "mean", reference)
    assert torch.allclose(got, expected, atol=1e-5)

    ((_, pooled),) = C.ablation_hooks(model, ["L1H3"], "mean", reference, per_position=False)
    out = pooled(own[name], None)
    assert torch.allclose(out[0, 0, 3], cache[name][:, :, 3].mean((0, 1)), atol=1e-6)
    assert torch.allclose(out[2, 5, 3], cache[name][:, :, 3].mean((0, 1)), atol=1e-6)


def test_resample_draws_reference_rows(gpt2_pair):
    _, model = gpt2_pair
    ids, reference = tokens(batch=4, seed=3), tokens(batch=6, pos=7, seed=4)
    name = "blocks.0.mlp.hook_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(reference)
        _, own = model.run_with_cache(ids)
    ((_, fn),) = C.ablation_hooks(model, ["L0N5", "L0N9"], "resample", reference, seed=0)
    out = fn(own[name], None)
    ref = cache[name]
    for row in range(4):
        # both neurons come from one reference row, the same one
        match = [
            r
            for r in range(6)
            if torch.allclose(out[row, :, 5], ref[r, :, 5])
            and torch.allclose(out[row, :, 9], ref[r, :, 9])
        ]
        assert match, row
    ((_, again),) = C.ablation_hooks(model, ["L0N5", "L0N9"], "resample", reference, seed=0)
    assert torch.equal(again(own[name], None), out)  # seeded


def test_parse_targets():
    assert C.parse_target("L3H2") == C.Head(3, 2)
    assert C.parse_target("L1N40") == C.Neuron(1, 40)
    assert C.parse_target("L2.mlp") == C.LayerOutput(2, "mlp")
    assert C.parse_target("blocks.0.hook_resid_mid") == C.HookSite("blocks.0.hook_resid_mid")
    site = C.HookSite("blocks.0.hook_resid_post", (slice(None), 4))
    assert C.ablation.target_site(site) == ("blocks.0.hook_resid_post", (slice(None), 4))


# --- errors ------------------------------------------------------------------------------


def test_ablation_errors(gpt2_pair):
    _, model = gpt2_pair
    ids = tokens()
    with pytest.raises(InterplabError, match=r"blocks\.0\.hook_resid_post"):
        C.ablate(model, ids, C.HookSite("blocks.0.hook_resid_pots"), "zero")
    with pytest.raises(InterplabError, match="heads 0..3"):
        C.ablate(model, ids, C.Head(0, 9), "zero")
    with pytest.raises(InterplabError, match="layers 0..1"):
        C.ablate(model, ids, "L5H0", "zero")
    with pytest.raises(InterplabError, match="reference="):
        C.ablate(model, ids, "L0H0", "mean")
    with pytest.raises(InterplabError, match="unknown ablation kind"):
        C.ablate(model, ids, "L0H0", "mena")
    with pytest.raises(InterplabError, match="no ablation targets"):
        C.ablate(model, ids, [], "zero")
    with pytest.raises(InterplabError, match="at least as long"):
        C.ablate(model, ids, "L0H0", "mean", reference=tokens(pos=3))
    with pytest.raises(InterplabError, match="out of range"):
        C.ablate(model, ids, C.HookSite("blocks.0.hook_resid_post", (slice(None), 999)), "zero")
    with pytest.raises(InterplabError, match="unknown layer part"):
        C.LayerOutput(0, "ffn")


def test_neuron_on_attention_only_model_is_refused():
    toy = il.load_model(
        il.models.ToyConfig(n_layers=1, d_model=16, n_heads=2, attn_only=True, d_vocab=20),
        device="cpu",
    )
    with pytest.raises(InterplabError, match="mlp.hook_post"):
        C.ablate(toy, torch.zeros(1, 4, dtype=torch.long), C.HookSite("blocks.0.mlp.hook_post"))
