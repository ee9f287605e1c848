"""top_activations and logit_effects against brute-force references on a tiny model."""

from __future__ import annotations

import html
import re

import pytest
import torch

import interplab as il
from interplab.dictionaries import ReLU, TopK, Transcoder, build_dictionary
from interplab.dictionaries.features import logit_effects, top_activations
from interplab.errors import InterplabError
from tests.conftest import make_hf_model, make_tokenizer

HOOK = "blocks.0.hook_resid_post"
D = 64


@pytest.fixture(scope="module")
def model():
    return il.load_model(make_hf_model("gpt2"), tokenizer=make_tokenizer(), device="cpu")


@pytest.fixture(scope="module")
def tokens():
    ids = torch.randint(2, 100, (7, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0  # BOS
    return ids


def make_sae(config=None, hook=HOOK, seed=0):
    torch.manual_seed(seed)
    sae = build_dictionary(config or TopK(48, k=6), D)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    sae.metadata["hook_name"] = hook
    return sae.eval()


@torch.no_grad()
def reference_latents(model, sae, tokens, hook=HOOK):
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    return sae.encode(cache[hook])  # [seq, pos, d_sae]


def brute_force_top(acts, latent, k, first):
    """(value, seq, pos) of the k largest activations of `latent`, earlier first among ties."""
    n_seq, n_pos = acts.shape[:2]
    items = [(float(acts[s, p, latent]), s, p) for s in range(n_seq) for p in range(first, n_pos)]
    items.sort(key=lambda t: (-t[0], t[1], t[2]))  # Python's sort is stable; explicit anyway
    return items[:k]


@pytest.mark.parametrize("include_bos", [False, True])
def test_top_activations_match_brute_force(model, tokens, include_bos):
    sae = make_sae()
    acts = reference_latents(model, sae, tokens)
    k, window = 5, 6
    # batch_size 3 splits the 7 rows unevenly, so the running top-k merge is exercised
    result = top_activations(
        model, sae, tokens, k=k, window=window, batch_size=3, include_bos=include_bos
    )
    first = 0 if include_bos else 1
    assert result.latents == list(range(48))
    assert result.n_tokens == 7 * (16 - first)
    density = (acts[:, first:] > 0).float().mean((0, 1))
    torch.testing.assert_close(result.density, density)
    for latent in range(48):
        expected = brute_force_top(acts, latent, k, first)
        torch.testing.assert_close(
            result.values[latent], torch.tensor([v for v, _, _ in expected]), atol=1e-5, rtol=0
        )
        positive = [e for e in expected if e[0] > 0]
        examples = result.examples[latent]
        assert [(e.seq, e.pos) for e in examples] == [(s, p) for _, s, p in positive]
        for example, (value, s, p) in zip(examples, positive, strict=True):
            assert example.value == pytest.approx(value, abs=1e-5)
            # window: 6 tokens, 6 // 4 = 1 after the activating one, 4 before, clipped to the row
            lo, hi = max(0, p - 4), min(16, p + 2)
            assert example.start == lo and example.focus == p - lo
            assert example.tokens == tokens[s, lo:hi].tolist()
            torch.testing.assert_close(
                torch.tensor(example.acts), acts[s, lo:hi, latent], atol=1e-5, rtol=0
            )
            assert example.text == [model.tokenizer.decode([t]) for t in example.tokens]


def test_bos_is_skipped_by_default(model, tokens):
    sae = make_sae()
    result = top_activations(model, sae, tokens, k=3)
    assert all(e.pos >= 1 for examples in result.examples for e in examples)


def test_latent_subset_and_sparse_latents(model, tokens):
    """Encoder biases set so each latent fires on exactly 3 non-BOS tokens: fewer than k
    examples, zeros in `values`, and the example lists keep only positive activations."""
    sae = make_sae(ReLU(32))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
        pre = ((cache[HOOK][:, 1:] - sae.b_dec) @ sae.W_enc).reshape(-1, 32)
        ranked = pre.sort(dim=0, descending=True).values
        sae.b_enc.copy_(-(ranked[2] + ranked[3]) / 2)  # between the 3rd and 4th largest
    acts = reference_latents(model, sae, tokens)
    subset = [31, 4, 17]
    result = top_activations(model, sae, tokens, k=8, latents=subset, window=3)
    assert result.latents == subset
    for i, latent in enumerate(subset):
        n_fired = int((acts[:, 1:, latent] > 0).sum())
        assert n_fired == 3 and len(result.examples[i]) == 3
        assert (result.values[i, n_fired:] == 0).all()
        expected = brute_force_top(acts, latent, 8, 1)
        torch.testing.assert_close(
            result.values[i], torch.tensor([max(v, 0.0) for v, _, _ in expected]), atol=1e-5, rtol=0
        )


def test_more_k_than_tokens_pads(model):
    ids = torch.tensor([[0, 5, 6, 7]])
    result = top_activations(model, make_sae(), ids, k=5, latents=[0])
    assert result.values.shape == (1, 5)
    assert result.seq[0, 3:].tolist() == [-1, -1] and result.values[0, 3:].tolist() == [0, 0]


def test_to_dict_and_html_escape_token_text(model):
    words = [f"w{i}" for i in range(96)] + ["<b>&", "x"]
    tokenizer = make_tokenizer(words)
    tiny = il.load_model(make_hf_model("gpt2"), tokenizer=tokenizer, device="cpu")
    sae = make_sae(ReLU(8))
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every latent fires everywhere
    ids = torch.tensor([[0, 98, 3, 4, 5]])  # id 98 is "<b>&"
    result = top_activations(tiny, sae, ids, k=4, window=8, latents=[0, 1])
    effects = logit_effects(tiny, sae, k=3, latents=[0, 1])
    page = result.to_html(effects)
    assert "<b>&" not in page and html.escape("<b>&") in page
    assert "Latent 0" in page and "Latent 1" in page
    assert re.search(r"<script|https?://|src=", page) is None  # self-contained, no scripts
    data = result.to_dict()
    assert [entry["latent"] for entry in data["latents"]] == [0, 1]
    assert len(data["latents"][0]["examples"]) == 4


def test_logit_effects_match_brute_force(model):
    sae = make_sae()
    k = 4
    effects = logit_effects(model, sae, k, chunk=7)  # chunks that do not divide d_sae
    full = sae.W_dec.detach() @ model.W_U.detach()  # [d_sae, d_vocab]
    assert effects.latents == list(range(48))
    for latent in range(48):
        top = full[latent].sort(descending=True)
        bottom = full[latent].sort()
        assert effects.top_tokens[latent].tolist() == top.indices[:k].tolist()
        assert effects.bottom_tokens[latent].tolist() == bottom.indices[:k].tolist()
        torch.testing.assert_close(effects.top_values[latent], top.values[:k])
        torch.testing.assert_close(effects.bottom_values[latent], bottom.values[:k])
    assert effects.top_text[0] == [model.tokenizer.decode([t]) for t in effects.top_tokens[0]]
    rows = effects.rows(2)
    assert rows[0]["latent"] == 0 and repr(effects.top_text[0][0]) in rows[0]["promotes"]


def test_logit_effects_refuses_non_residual_dictionaries(model):
    mlp = build_dictionary(TopK(16, k=2), 256)  # d_mlp = 4 * 64
    mlp.metadata["hook_name"] = "blocks.0.mlp.hook_post"
    with pytest.raises(InterplabError, match="d_model=64"):
        logit_effects(model, mlp)
    z = make_sae(hook="blocks.0.attn.hook_z")  # same width as d_model, wrong space
    with pytest.raises(InterplabError, match="not in the residual stream"):
        logit_effects(model, z)
    transcoder = build_dictionary(Transcoder(TopK(16, k=2)), D)
    transcoder.metadata.update(hook_name="blocks.0.ln2.hook_normalized", hook_name_out=HOOK)
    assert logit_effects(model, transcoder, 2).top_tokens.shape == (16, 2)


def test_bad_arguments(model, tokens):
    sae = make_sae()
    with pytest.raises(InterplabError, match="k must be a positive integer"):
        top_activations(model, sae, tokens, k=0)
    with pytest.raises(InterplabError, match="window must be a positive integer"):
        top_activations(model, sae, tokens, window=-1)
    with pytest.raises(InterplabError, match="batch_size"):
        top_activations(model, sae, tokens, batch_size=True)
    with pytest.raises(InterplabError, match=r"\[seq, pos\]"):
        top_activations(model, sae, tokens[0])
    with pytest.raises(InterplabError, match="integer token ids"):
        top_activations(model, sae, tokens.float())
    with pytest.raises(InterplabError, match="without the BOS"):
        top_activations(model, sae, tokens[:, :1])
    with pytest.raises(InterplabError, match=r"indices in \[0, 48\)"):
        top_activations(model, sae, tokens, latents=[48])
    with pytest.raises(InterplabError, match="repeat"):
        top_activations(model, sae, tokens, latents=[1, 1])
    with pytest.raises(InterplabError, match="not in this model"):
        top_activations(model, sae, tokens, hook_name="blocks.9.hook_resid_post")
    with pytest.raises(InterplabError, match="d_in=64"):
        top_activations(model, sae, tokens, hook_name="blocks.0.mlp.hook_post")
    bare = make_sae()
    bare.metadata.clear()
    with pytest.raises(InterplabError, match="names no hook_name"):
        top_activations(model, bare, tokens)
    with pytest.raises(InterplabError, match="expected an interplab Dictionary"):
        top_activations(model, object(), tokens)
    with pytest.raises(InterplabError, match="vocabulary size"):
        logit_effects(model, sae, k=1000)
    with pytest.raises(InterplabError, match="k must be a positive integer"):
        logit_effects(model, sae, k=0)
    with pytest.raises(InterplabError, match="expected an interplab Dictionary"):
        logit_effects(model, "sae")
