"""Model loading: HF parity per family, hook names, weight accessors, tokenization, errors."""

from __future__ import annotations

import time

import pytest
import torch

import interplab as il
from interplab.errors import InterplabError
from tests.conftest import FAMILIES, VOCAB, make_hf_model, make_tokenizer

STANDARD_HOOKS = [
    "hook_embed",
    "blocks.{l}.hook_resid_pre",
    "blocks.{l}.hook_resid_mid",
    "blocks.{l}.hook_resid_post",
    "blocks.{l}.attn.hook_q",
    "blocks.{l}.attn.hook_k",
    "blocks.{l}.attn.hook_v",
    "blocks.{l}.attn.hook_z",
    "blocks.{l}.attn.hook_pattern",
    "blocks.{l}.hook_attn_out",
    "blocks.{l}.mlp.hook_pre",
    "blocks.{l}.mlp.hook_post",
    "blocks.{l}.hook_mlp_out",
    "blocks.{l}.ln1.hook_scale",
    "blocks.{l}.ln2.hook_scale",
    "ln_final.hook_scale",
]
# Parallel-residual blocks (GPT-NeoX/Pythia) add attention and MLP outputs to the same
# residual stream: there is no resid_mid between them.
NO_RESID_MID = {"gpt_neox"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_pair(request, tmp_path_factory):
    family = request.param
    hf = make_hf_model(family)
    directory = tmp_path_factory.mktemp(family)
    hf.save_pretrained(directory)
    model = il.load_model(directory, device="cpu")
    return family, hf, model


def test_logits_match_hf(family_pair):
    family, hf, model = family_pair
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4, family


def test_standard_hook_names_present(family_pair):
    family, _, model = family_pair
    names = set(model.hook_dict)
    for layer in range(model.cfg.n_layers):
        for pattern in STANDARD_HOOKS:
            name = pattern.format(l=layer)
            if family in NO_RESID_MID and name.endswith("hook_resid_mid"):
                assert name not in names
                continue
            assert name in names, f"{family}: {name} missing"


def test_in_memory_model_and_directory_agree(family_pair):
    family, hf, model = family_pair
    from_object = il.load_model(hf, device="cpu")
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(from_object(tokens), model(tokens), atol=1e-5)


def test_weights_rebuild_attention_output(family_pair):
    """Each head's output rebuilt from weights + cached pattern/values equals the cached one."""
    family, _, model = family_pair
    w = il.weights(model)
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        x = cache[f"blocks.{layer}.ln1.hook_out"]  # normalised input of the attention block
        v = torch.einsum("bpm,hmd->bphd", x, w.W_V[layer]) + w.b_V[layer]
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch head q k]
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        assert torch.allclose(z, cache[f"blocks.{layer}.attn.hook_z"], atol=1e-5), family
        out = torch.einsum("bphd,hdm->bpm", z, w.W_O[layer]) + w.b_O[layer]
        assert torch.allclose(out, cache[f"blocks.{layer}.attn.hook_out"], atol=1e-5), family
        if model.cfg.positional_embedding_type == "standard":  # no rotary: q is linear in x
            q = torch.einsum("bpm,hmd->bphd", x, w.W_Q[layer]) + w.b_Q[layer]
            assert torch.allclose(q, cache[f"blocks.{layer}.attn.hook_q"], atol=1e-5)


def test_weight_shapes(family_pair):
    family, _, model = family_pair
    w = il.weights(model)
    L, H, D, dh = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head
    for name in ("W_Q", "W_K", "W_V"):
        assert getattr(w, name).shape == (L, H, D, dh), (family, name)
    assert w.W_O.shape == (L, H, dh, D)
    assert w.b_K.shape == (L, H, dh)
    assert w.W_in.shape[:2] == (L, D) and w.W_out.shape[0] == L
    assert w.W_E.shape == (VOCAB, D) and w.W_U.shape == (D, VOCAB)
    assert w.ln1_w.shape == (L, D) and w.ln_final_w.shape == (D,)
    assert (w.W_pos is not None) == (family == "gpt2")


def test_grouped_query_heads_share_kv():
    model = il.load_model(make_hf_model("llama"), device="cpu")
    w = il.weights(model)
    grouped = il.weights(model, expand_kv=False)
    assert grouped.W_K.shape[1] == 2 and w.W_K.shape[1] == 4
    assert torch.equal(w.W_K[:, 0], w.W_K[:, 1]) and torch.equal(w.W_K[:, 1], grouped.W_K[:, 0])
    assert not torch.equal(w.W_K[:, 1], w.W_K[:, 2])


def test_norm_weights_match_hf_module():
    hf = make_hf_model("gpt2")
    model = il.load_model(hf, device="cpu")
    w = il.weights(model)
    assert torch.equal(w.ln1_w[1], hf.transformer.h[1].ln_1.weight)
    assert torch.equal(w.ln2_b[0], hf.transformer.h[0].ln_2.bias)
    assert torch.equal(w.ln_final_w, hf.transformer.ln_f.weight)


@pytest.mark.parametrize(
    "toy",
    [
        il.models.ToyConfig(
            n_layers=1, d_model=32, n_heads=4, attn_only=True, normalization="none", d_vocab=50
        ),
        il.models.ToyConfig(
            n_layers=2, d_model=32, n_heads=2, normalization="RMS", positional="rotary", d_vocab=50
        ),
    ],
)
def test_toy_configs_boot_with_hooks(toy):
    model = il.load_model(toy, device="cpu")
    tokens = torch.randint(0, 50, (2, 7))
    logits, cache = model.run_with_cache(tokens)
    assert logits.shape == (2, 7, 50)
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, toy.n_heads, 7, 7)
    assert ("blocks.0.mlp.hook_post" in cache) == (not toy.attn_only)
    w = il.weights(model)
    assert w.W_Q.shape == (toy.n_layers, toy.n_heads, 32, 32 // toy.n_heads)
    assert (w.W_in is None) == toy.attn_only


def test_toy_config_validation():
    with pytest.raises(InterplabError, match="n_heads"):
        il.models.ToyConfig(d_model=30, n_heads=4)
    with pytest.raises(InterplabError, match="n_layers"):
        il.models.ToyConfig(n_layers=0)


# --- tokenization --------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer_adds_bos", [False, True])
def test_exactly_one_bos(tokenizer_adds_bos):
    tok = make_tokenizer(add_bos_in_post_processor=tokenizer_adds_bos)
    model = il.load_model(make_hf_model("gpt2"), tokenizer=tok, device="cpu")
    ids = model.to_tokens("w1 w2 w3")
    assert ids[0].tolist() == [0, 3, 4, 5]
    assert model.to_tokens("w1 w2 w3", prepend_bos=False)[0].tolist() == [3, 4, 5]
    ours = il.models.tokenize(model, ["w1 w2 w3", "w4"])
    assert ours.ids.tolist() == [[0, 3, 4, 5], [0, 6, 0, 0]]
    assert ours.lengths.tolist() == [4, 2] and ours.last_pos.tolist() == [3, 1]
    left = il.models.tokenize(model, ["w1 w2 w3", "w4"], padding_side="left")
    assert left.ids[1].tolist() == [0, 0, 0, 6] and left.mask[1].tolist() == [0, 0, 1, 1]
    assert model.to_str_tokens("w1 w2")[1:] == ["w1", "w2"]
    assert model.to_string(torch.tensor([3, 4])) == "w1 w2"


def test_tokenize_errors():
    model = il.load_model(make_hf_model("gpt2"), tokenizer=make_tokenizer(), device="cpu")
    with pytest.raises(InterplabError, match="padding_side"):
        il.models.tokenize(model, "w1", padding_side="middle")
    with pytest.raises(InterplabError, match="empty"):
        il.models.tokenize(model, [])


# --- bad input -----------------------------------------------------------------------------


def test_unknown_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(InterplabError, match="local directory"):
        il.load_model("someone/no-such-model-xyz", device="cpu")
    assert time.perf_counter() - start < 20


def test_directory_without_config(tmp_path):
    with pytest.raises(InterplabError, match="no config.json"):
        il.load_model(tmp_path, device="cpu")


def test_missing_directory(tmp_path):
    with pytest.raises(InterplabError, match="does not exist"):
        il.load_model(str(tmp_path / "nope"), device="cpu")


def test_unknown_hook_name_suggests_closest():
    model = il.load_model(make_hf_model("gpt2"), device="cpu")
    with pytest.raises(InterplabError, match=r"blocks\.1\.hook_resid_post"):
        il.models.check_hook_names(model, ["blocks.1.hook_resid_pots"])


def test_bad_device_and_dtype():
    toy = il.models.ToyConfig(n_layers=1, d_model=16, n_heads=2, d_vocab=10)
    if not torch.cuda.is_available():
        with pytest.raises(InterplabError, match="CUDA is not available"):
            il.load_model(toy, device="cuda")
    with pytest.raises(InterplabError, match="not a valid torch device"):
        il.load_model(toy, device="gpu9")
    with pytest.raises(InterplabError, match="unknown dtype"):
        il.load_model(toy, dtype="float8")
    with pytest.raises(InterplabError, match="not a floating-point"):
        il.load_model(toy, dtype=torch.int32)


def test_wrong_spec_type():
    with pytest.raises(InterplabError, match="cannot load a model from int"):
        il.load_model(42)


def test_transformer_lens_in_memory_tokenizer_bug_still_present():
    """TL 4.3 cannot set up a tokenizer built in memory (no name_or_path): interplab works
    around it in `interplab.models.loading`. When this test fails, TL fixed it and the
    workaround can go."""
    from transformer_lens.utilities.tokenize_utils import get_tokenizer_with_bos

    with pytest.raises(KeyError):
        get_tokenizer_with_bos(make_tokenizer())
