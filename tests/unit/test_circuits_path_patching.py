"""Path patching equals hand-built references: the direct effect on the logits computed from
cached activations and the weights (LayerNorm recomputed), activation patching in a 1-layer
attention-only model (where the only path is direct), and receiver q/k/v and MLP inputs
rebuilt by hand from the modified residual stream (LayerNorm and MLP written out)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
import torch.nn.functional as F

import interplab as il
from interplab import circuits as C
from interplab.circuits.path_patching import PathNode, path_patch, path_patch_tokens
from interplab.data.tasks import TaskDataset
from interplab.errors import InterplabError
from interplab.models.accessor import weights
from tests.conftest import VOCAB, make_hf_model

TOL = 1e-5


def make_task(batch=4, pos=7, seed=0):
    """Corrupted prompts differ at positions 1, 3 and 5; one answer comes early."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, VOCAB, (batch, pos), generator=g)
    corrupted = clean.clone()
    for p in (1, 3, 5):
        corrupted[:, p] = torch.randint(1, VOCAB, (batch,), generator=g)
    answer_pos = torch.full((batch,), pos - 1)
    answer_pos[2] = 4
    return TaskDataset(
        name="random",
        prompts=[""] * batch,
        corrupted_prompts=[""] * batch,
        clean_tokens=clean,
        corrupted_tokens=corrupted,
        answers=torch.randint(1, VOCAB, (batch,), generator=g),
        wrong_answers=torch.randint(1, VOCAB, (batch,), generator=g),
        answer_pos=answer_pos,
        metadata=[{}] * batch,
    )


def toy(n_layers=2, attn_only=False, seed=0):
    """float64 so hand references agree to ~1e-12 and 1e-5 tolerances are generous."""
    config = il.models.ToyConfig(
        n_layers=n_layers, d_model=32, n_heads=4, d_vocab=VOCAB, attn_only=attn_only, seed=seed
    )
    model = il.load_model(config, device="cpu", dtype="float64")
    with torch.no_grad():  # larger weights: effects well above rounding
        for name, p in model.named_parameters():
            if p.ndim == 2 and "pos" not in name:
                p.mul_(3.0)
    return model


@pytest.fixture(scope="module")
def model():
    return toy()


@pytest.fixture(scope="module")
def task():
    return make_task()


def ld(task, logits):
    return C.logit_diff(logits, task.answers, task.wrong_answers, task.answer_pos)


def layer_norm(x, w, b, eps):
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w + b


def head_out(cache, w, layer, head):
    return cache[f"blocks.{layer}.attn.hook_z"][:, :, head] @ w.W_O[layer, head]


def caches(model, task):
    with torch.inference_mode():
        _, clean = model.run_with_cache(task.clean_tokens)
        _, corrupted = model.run_with_cache(task.corrupted_tokens)
    return clean, corrupted


# --- (a) receivers = logits: the direct effect, by hand -----------------------------------


def test_logits_receiver_equals_direct_effect_by_hand(model, task):
    clean, corrupted = caches(model, task)
    w = weights(model)
    final = clean["blocks.1.hook_resid_post"]

    def read(x):
        logits = layer_norm(x, w.ln_final_w, w.ln_final_b, model.cfg.eps) @ w.W_U + w.b_U
        return ld(task, logits)

    assert torch.allclose(read(final), ld(task, model(task.clean_tokens)), atol=1e-10)
    expected = torch.stack(
        [
            read(final - head_out(clean, w, layer, head) + head_out(corrupted, w, layer, head))
            for layer in range(2)
            for head in range(4)
        ]
    ).reshape(2, 4, -1)
    got = path_patch(model, task, normalize=False)
    assert got.axes == ("layer", "head") and got.per_example.shape == (2, 4, len(task))
    assert (got.per_example - expected).abs().max() <= TOL
    assert expected.std() > 0.05  # heads differ: the check is not trivially satisfied

    others = {
        "L0.mlp": final - clean["blocks.0.hook_mlp_out"] + corrupted["blocks.0.hook_mlp_out"],
        "embed": final - clean["blocks.0.hook_resid_pre"] + corrupted["blocks.0.hook_resid_pre"],
    }
    got = path_patch(model, task, list(others), "logits", normalize=False, max_batch=len(task))
    for i, x in enumerate(others.values()):
        assert (got.per_example[i] - read(x)).abs().max() <= TOL


# --- (b) one attention-only layer: path patching = activation patching ---------------------


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_one_layer_attention_only_equals_activation_patching(task, direction):
    one = toy(n_layers=1, attn_only=True, seed=1)
    exact = C.patch_heads(one, task, direction=direction, normalize=False)
    for via in ("direct", "mlps"):
        got = path_patch(one, task, direction=direction, via=via, normalize=False, max_batch=5)
        assert (got.per_example - exact.per_example).abs().max() <= TOL
        assert torch.allclose(got.values, exact.values, atol=TOL)
    assert exact.values.std() > 0.01
    normed = path_patch(one, task, direction=direction)
    assert torch.allclose(
        normed.values, C.patch_heads(one, task, direction=direction).values, atol=1e-5
    )


# --- (c) two layers: receiver inputs rebuilt by hand -----------------------------------------


def run_with_receiver(model, task, hook_name, value_fn):
    with torch.inference_mode():
        logits = model.run_with_hooks(task.clean_tokens, fwd_hooks=[(hook_name, value_fn)])
    return ld(task, logits)


def mlp_by_hand(model, w, layer, x):
    hidden = layer_norm(x, w.ln2_w[layer], w.ln2_b[layer], model.cfg.eps) @ w.W_in[layer]
    return F.gelu(hidden + w.b_in[layer]) @ w.W_out[layer] + w.b_out[layer]


@pytest.mark.parametrize("via", ["direct", "mlps"])
@pytest.mark.parametrize("receiver_input", ["q", "k", "v"])
def test_head_to_head_equals_hand_built_receiver_input(model, task, via, receiver_input):
    clean, corrupted = caches(model, task)
    w = weights(model)
    # the hand-written MLP reproduces the model's, so the 'mlps' reference is a reference
    mid = clean["blocks.0.hook_resid_mid"]
    assert torch.allclose(mlp_by_hand(model, w, 0, mid), clean["blocks.0.hook_mlp_out"], atol=1e-10)
    sender, receiver = (0, 2), (1, 1)
    delta = head_out(corrupted, w, *sender) - head_out(clean, w, *sender)
    if via == "direct":  # MLP 0 frozen: x_R = x_clean - out_clean + out_corrupted
        x = clean["blocks.1.hook_resid_pre"] + delta
    else:  # the change also flows through MLP 0
        x = mid + delta + mlp_by_hand(model, w, 0, mid + delta)
    weight = {"q": w.W_Q, "k": w.W_K, "v": w.W_V}[receiver_input][1, receiver[1]]
    bias = {"q": w.b_Q, "k": w.b_K, "v": w.b_V}[receiver_input][1, receiver[1]]
    new = layer_norm(x, w.ln1_w[1], w.ln1_b[1], model.cfg.eps) @ weight + bias

    def replace(act, hook):
        act = act.clone()
        act[:, :, receiver[1]] = new
        return act

    expected = run_with_receiver(model, task, f"blocks.1.attn.hook_{receiver_input}", replace)
    got = path_patch(
        model, task, [sender, "L1H0"], [receiver], receiver_input, via, normalize=False
    )
    assert got.labels["sender"] == ["L0H2", "L1H0"]
    assert (got.per_example[0] - expected).abs().max() <= TOL
    assert (expected - got.clean.per_example).abs().max() > 1e-3  # the path matters
    # a head in the receiver's own layer has no path to it: exactly the clean run
    assert torch.equal(got.per_example[1], got.clean.per_example.to(got.per_example.dtype))


def test_mlp_receiver_equals_hand_built_mlp(model, task):
    clean, corrupted = caches(model, task)
    w = weights(model)
    delta = head_out(corrupted, w, 0, 3) - head_out(clean, w, 0, 3)
    # attention of layer 1 is frozen, so resid_mid of layer 1 moves by the sender's change
    new = mlp_by_hand(model, w, 1, clean["blocks.1.hook_resid_mid"] + delta)
    expected = run_with_receiver(model, task, "blocks.1.hook_mlp_out", lambda act, hook: new)
    got = path_patch(model, task, ["L0H3"], ["L1.mlp"], normalize=False)
    assert (got.per_example[0] - expected).abs().max() <= TOL
    assert (expected - got.clean.per_example).abs().max() > 1e-3


def test_resid_input_patches_q_k_and_v(model, task):
    """'resid' recomputes q, k and v together: equal to patching the three by hand."""
    clean, corrupted = caches(model, task)
    w = weights(model)
    x = clean["blocks.1.hook_resid_pre"] + head_out(corrupted, w, 0, 0) - head_out(clean, w, 0, 0)
    normed = layer_norm(x, w.ln1_w[1], w.ln1_b[1], model.cfg.eps)
    hooks = []
    for name, W, b in (("q", w.W_Q, w.b_Q), ("k", w.W_K, w.b_K), ("v", w.W_V, w.b_V)):
        new = normed @ W[1, 3] + b[1, 3]

        def replace(act, hook, new=new):
            act = act.clone()
            act[:, :, 3] = new
            return act

        hooks.append((f"blocks.1.attn.hook_{name}", replace))
    with torch.inference_mode():
        expected = ld(task, model.run_with_hooks(task.clean_tokens, fwd_hooks=hooks))
    got = path_patch(model, task, ["L0H0"], ["L1H3"], "resid", normalize=False)
    assert (got.per_example[0] - expected).abs().max() <= TOL


def test_batching_and_receiver_sets(model, task):
    """Chunk size does not change results; logits combined with a head receiver adds the
    direct path to the head's effect (and equals neither alone)."""
    one = path_patch(model, task, receivers=["L1H2", "L1.mlp"], max_batch=1, normalize=False)
    many = path_patch(model, task, receivers=["L1H2", "L1.mlp"], max_batch=999, normalize=False)
    assert (one.per_example - many.per_example).abs().max() <= 1e-10
    both = path_patch(model, task, ["L0H1"], ["L1H2", "logits"], normalize=False)
    alone = path_patch(model, task, ["L0H1"], ["L1H2"], normalize=False)
    direct = path_patch(model, task, ["L0H1"], ["logits"], normalize=False)
    assert (both.per_example - alone.per_example).abs().max() > 1e-3
    assert (both.per_example - direct.per_example).abs().max() > 1e-3


def test_grouped_query_key_receivers_share_their_key_value_head():
    """Llama with 4 query heads and 2 key/value heads: a k receiver is its key/value head,
    so query heads 0 and 1 (both reading kv head 0) give the same result and head 2 does not."""
    llama = il.load_model(make_hf_model("llama"), device="cpu")
    with torch.no_grad():
        for p in llama.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    task = make_task()
    res = [
        path_patch(llama, task, ["L0H0", "L0H3"], [f"L1H{h}"], "k", normalize=False)
        for h in (0, 1, 2)
    ]
    assert torch.allclose(res[0].per_example, res[1].per_example, atol=1e-6)
    assert (res[0].per_example - res[2].per_example).abs().max() > 1e-4


def test_result_and_plot(model, task):
    result = path_patch(model, task, receivers=["L1H0"], receiver_input="q")
    assert result.receivers == ["L1H0"] and result.via == "direct"
    assert result.direction == "noise" and result.senders[:2] == ["L0H0", "L0H1"]
    raw = result.per_example.double()
    span = result.clean.mean - result.corrupted.mean
    expected = (raw.mean(-1) - result.corrupted.mean) / span
    assert torch.allclose(result.values.double(), expected, atol=1e-6)
    assert torch.allclose(result.sem.double(), raw.std(-1) / abs(span) / len(task) ** 0.5)
    assert torch.all(result.values[1] == 1.0)  # layer-1 senders: no path, the clean run
    assert len(result.top(3)) == 3
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Figure)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_callable_metric(model, task):
    def logit_diff(logits):
        return ld(task, logits)

    by_task = path_patch(model, task, ["L0H1", "embed"], ["L1H0"], "k", normalize=False)
    by_callable = path_patch_tokens(
        model,
        task.clean_tokens,
        task.corrupted_tokens,
        logit_diff,
        ["L0H1", "embed"],
        ["L1H0"],
        "k",
        normalize=False,
    )
    assert (by_task.per_example - by_callable.per_example).abs().max() <= 1e-10


# --- errors -------------------------------------------------------------------------------


def test_path_patching_errors(model, task):
    with pytest.raises(InterplabError, match="unknown path patching via"):
        path_patch(model, task, via="heads")
    with pytest.raises(InterplabError, match="unknown receiver input"):
        path_patch(model, task, receivers=["L1H0"], receiver_input="query")
    with pytest.raises(InterplabError, match="receiver_input='resid'"):
        path_patch(model, task, receivers="logits", receiver_input="q")
    with pytest.raises(InterplabError, match="unknown patching direction"):
        path_patch(model, task, direction="sideways")
    with pytest.raises(InterplabError, match="cannot be a sender"):
        path_patch(model, task, ["logits"])
    with pytest.raises(InterplabError, match="cannot be a receiver"):
        path_patch(model, task, receivers=["embed"])
    with pytest.raises(InterplabError, match="has layer 5"):
        path_patch(model, task, ["L5H0"])
    with pytest.raises(InterplabError, match="has head 9"):
        path_patch(model, task, receivers=[(1, 9)])
    with pytest.raises(InterplabError, match="cannot use"):
        path_patch(model, task, ["blocks.0.hook_resid_pre"])
    with pytest.raises(InterplabError, match="wrap a single sender"):
        path_patch(model, task, "L0H1")
    with pytest.raises(InterplabError, match="no senders"):
        path_patch(model, task, [])
    with pytest.raises(InterplabError, match="no receivers"):
        path_patch(model, task, receivers=[])
    with pytest.raises(InterplabError, match="max_batch"):
        path_patch(model, task, max_batch=0)
    with pytest.raises(InterplabError, match="no MLP"):
        path_patch(toy(n_layers=1, attn_only=True), task, ["L0.mlp"])
    with pytest.raises(InterplabError, match="expected a TaskDataset"):
        path_patch(model, "ioi")
    assert PathNode("mlp", 1).label == "L1.mlp"
