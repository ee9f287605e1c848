"""evaluate_dictionary: spliced CE/KL against closed-form cases and a manual run_with_hooks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import interplab as il
from interplab.dictionaries import ReLU, TopK, Transcoder, build_dictionary
from interplab.dictionaries.evaluate import evaluate_dictionary, plot_frontier
from interplab.dictionaries.metrics import reconstruction_metrics
from interplab.errors import InterplabError
from tests.conftest import make_hf_model, make_tokenizer

HOOK = "blocks.0.hook_resid_post"
MLP_IN, MLP_OUT = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
D = 64


@pytest.fixture(scope="module")
def model():
    return il.load_model(make_hf_model("gpt2"), tokenizer=make_tokenizer(), device="cpu")


@pytest.fixture(scope="module")
def windows():
    ids = torch.randint(2, 100, (6, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    return ids


def identity_dictionary(d: int = D):
    """An exact identity: latents relu(x), relu(-x); decoder [I; -I] gives x back bit for bit."""
    sae = build_dictionary(ReLU(2 * d, apply_b_dec_to_input=False), d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.metadata["hook_name"] = HOOK
    return sae.eval()


def zero_dictionary(config=None):
    sae = build_dictionary(config or TopK(32, k=4), D)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    return sae.eval()


@torch.no_grad()
def manual_losses(model, tokens, patch):
    """CE over predictions at positions 1..T-2 and KL(clean || patched) over positions 1..T-1."""
    clean = model(tokens).log_softmax(-1)
    patched = model.run_with_hooks(tokens, fwd_hooks=patch).log_softmax(-1)
    ce = F.cross_entropy(patched[:, 1:-1].reshape(-1, patched.shape[-1]), tokens[:, 2:].reshape(-1))
    kl = (clean[:, 1:].exp() * (clean[:, 1:] - patched[:, 1:])).sum(-1).mean()
    return float(ce), float(kl)


def test_identity_recovers_everything_and_zero_nothing(model, windows):
    ident = evaluate_dictionary(identity_dictionary(), model, windows, n_tokens=66, batch_size=4)
    assert ident.n_windows == 6 and ident.reconstruction.n_tokens == 66
    assert ident.n_predictions == 6 * 10
    assert ident.ce_spliced == pytest.approx(ident.ce_clean, abs=1e-6)
    assert ident.ce_recovered == pytest.approx(1.0, abs=1e-5)
    assert ident.kl_spliced == pytest.approx(0.0, abs=1e-7)
    assert ident.kl_recovered == pytest.approx(1.0, abs=1e-5)
    assert ident.fvu == pytest.approx(0.0, abs=1e-10)
    # ablating the residual stream changes the predictions (a random model: only a little)
    assert ident.kl_zero > 1e-3 and abs(ident.ce_zero - ident.ce_clean) > 1e-4

    zero = evaluate_dictionary(zero_dictionary(), model, windows, hook_name=HOOK, n_tokens=66)
    assert zero.ce_recovered == pytest.approx(0.0, abs=1e-6)
    assert zero.kl_recovered == pytest.approx(0.0, abs=1e-6)
    assert zero.ce_clean == pytest.approx(ident.ce_clean, rel=1e-6)  # batching does not matter


def test_spliced_ce_matches_manual_run_with_hooks(model, windows):
    torch.manual_seed(0)
    sae = build_dictionary(TopK(96, k=8), D).eval()
    sae.metadata["hook_name"] = HOOK
    result = evaluate_dictionary(sae, model, windows, n_tokens=66, batch_size=4)

    def splice(act, hook):
        return sae.decode(sae.encode(act))

    ce, kl = manual_losses(model, windows, [(HOOK, splice)])
    ce_zero, kl_zero = manual_losses(model, windows, [(HOOK, lambda a, hook: torch.zeros_like(a))])
    ce_clean = manual_losses(model, windows, [(HOOK, lambda a, hook: a)])[0]
    assert result.ce_spliced == pytest.approx(ce, rel=1e-5)
    assert result.kl_spliced == pytest.approx(kl, rel=1e-4)
    assert result.ce_zero == pytest.approx(ce_zero, rel=1e-5)
    assert result.kl_zero == pytest.approx(kl_zero, rel=1e-4)
    assert result.ce_clean == pytest.approx(ce_clean, rel=1e-5)
    assert result.ce_recovered == pytest.approx((ce_zero - ce) / (ce_zero - ce_clean), rel=1e-4)

    # reconstruction metrics are those of the non-BOS activation rows
    store = il.activations(model, HOOK, windows, 66, context_size=12, progress=False)
    reference = reconstruction_metrics(sae, store.all())
    assert result.reconstruction.fvu == pytest.approx(reference.fvu, rel=1e-5)
    assert result.l0 == pytest.approx(reference.l0, rel=1e-6)


def test_transcoder_replaces_its_output_hook(model, windows):
    torch.manual_seed(1)
    tc = build_dictionary(Transcoder(TopK(48, k=6)), D, D).eval()
    tc.metadata.update(hook_name=MLP_IN, hook_name_out=MLP_OUT)
    result = evaluate_dictionary(tc, model, windows, n_tokens=66, batch_size=6)
    assert result.hook_name_out == MLP_OUT
    captured = {}

    def read(act, hook):
        captured["x"] = act

    def replace(act, hook):
        return tc.decode(tc.encode(captured["x"]))

    ce, kl = manual_losses(model, windows, [(MLP_IN, read), (MLP_OUT, replace)])
    assert result.ce_spliced == pytest.approx(ce, rel=1e-5)
    assert result.kl_spliced == pytest.approx(kl, rel=1e-4)
    zero_ce, _ = manual_losses(model, windows, [(MLP_OUT, lambda a, hook: torch.zeros_like(a))])
    assert result.ce_zero == pytest.approx(zero_ce, rel=1e-5)

    zero = zero_dictionary(Transcoder(TopK(32, k=4)))
    zero.metadata.update(hook_name=MLP_IN, hook_name_out=MLP_OUT)
    assert evaluate_dictionary(zero, model, windows, n_tokens=66).ce_recovered == pytest.approx(
        0.0, abs=1e-6
    )


def test_results_serialise_save_and_plot(model, windows, tmp_path):
    from interplab.runs import start_run

    a = evaluate_dictionary(identity_dictionary(), model, windows, n_tokens=22, name="ident")
    b = evaluate_dictionary(
        zero_dictionary(), model, windows, hook_name=HOOK, n_tokens=22, name="zero"
    )
    with start_run("eval", root=tmp_path) as run:
        a.save(run)
        saved = json.loads((run.dir / "evaluation-ident.json").read_text())
        assert saved["metrics"]["ce_recovered"] == pytest.approx(a.ce_recovered)
        assert len(saved["latent_density"]) == 2 * D
        assert (run.dir / "figures" / "evaluation-ident-density.png").stat().st_size > 0
    fig = plot_frontier([a, b])
    assert len(fig.axes) == 2
    assert list(fig.axes[1].collections[0].get_offsets()[:, 1]) == pytest.approx(
        [a.ce_recovered, b.ce_recovered]
    )
    assert dict(a.table_rows())["CE recovered"] == f"{a.ce_recovered:.4f}"
    import matplotlib.pyplot as plt

    plt.close("all")


def test_errors(model, windows):
    sae = zero_dictionary()
    with pytest.raises(InterplabError, match="names no hook_name"):
        evaluate_dictionary(sae, model, windows)
    with pytest.raises(InterplabError, match="is not in this model"):
        evaluate_dictionary(sae, model, windows, hook_name="blocks.0.hook_nope")
    with pytest.raises(InterplabError, match="only applies to transcoders"):
        evaluate_dictionary(sae, model, windows, hook_name=HOOK, hook_name_out=MLP_OUT)
    tc = zero_dictionary(Transcoder(TopK(32, k=4)))
    with pytest.raises(InterplabError, match="names no hook_name_out"):
        evaluate_dictionary(tc, model, windows, hook_name=MLP_IN)
    with pytest.raises(InterplabError, match="fired before"):
        evaluate_dictionary(tc, model, windows, hook_name=MLP_OUT, hook_name_out=MLP_IN)
    with pytest.raises(InterplabError, match="context_size"):
        evaluate_dictionary(sae, model, windows, hook_name=HOOK, context_size=2)
    with pytest.raises(InterplabError, match="n_tokens"):
        evaluate_dictionary(sae, model, windows, hook_name=HOOK, n_tokens=0)
    with pytest.raises(InterplabError, match="token windows"):
        evaluate_dictionary(sae, model, windows[:, :5], hook_name=HOOK, context_size=12)
    with pytest.raises(InterplabError, match="expected an interplab Dictionary"):
        evaluate_dictionary(torch.nn.Linear(2, 2), model, windows)
    store = il.activations(model, HOOK, windows, 22, context_size=12, progress=False)
    with pytest.raises(InterplabError, match="holds activations only"):
        evaluate_dictionary(sae, model, store, hook_name=HOOK)
    wide = build_dictionary(ReLU(8), 32)
    with pytest.raises(InterplabError, match="d_in=64|width 64"):
        evaluate_dictionary(wide, model, windows, hook_name=HOOK)
