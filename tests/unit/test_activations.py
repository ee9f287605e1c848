"""Corpora packing and activation collection (streamed and cached), against run_with_cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import interplab as il
from interplab.data.activations import ActivationStore
from interplab.data.corpus import PythonSourceCorpus, TextCorpus, pack, resolve_corpus
from interplab.errors import InterplabError
from tests.conftest import make_hf_model, make_tokenizer

HOOKS = ["blocks.0.hook_resid_post", "blocks.0.mlp.hook_post"]


@pytest.fixture(scope="module")
def model():
    return il.load_model(make_hf_model("gpt2"), tokenizer=make_tokenizer(), device="cpu")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    rng = np.random.default_rng(0)
    for i in range(12):
        words = " ".join(f"w{j}" for j in rng.integers(0, 98, size=60))
        (folder / f"doc{i:02d}.txt").write_text(words)
    return folder


def windows(n: int = 10, ctx: int = 16, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(2, 100, (n, ctx), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 0
    return ids


# --- corpora --------------------------------------------------------------------------------


def test_pack_is_deterministic_and_starts_with_bos(text_dir):
    tok = make_tokenizer()
    a = pack(text_dir, tok, context_size=16, n_windows=20, seed=3)
    b = pack(text_dir, tok, context_size=16, n_windows=20, seed=3)
    c = pack(text_dir, tok, context_size=16, n_windows=20, seed=4)
    assert torch.equal(a.ids, b.ids) and a.content_hash == b.content_hash
    assert a.content_hash != c.content_hash
    assert a.ids.shape == (20, 16) and (a.ids[:, 0] == tok.bos_token_id).all()
    # every document token survives: the stream is the documents joined by EOS, in order
    assert (a.ids[:, 1:] == 1).sum() == 0  # no unknown tokens


def test_python_stdlib_corpus_is_real_code():
    corpus = PythonSourceCorpus()
    assert len(corpus.files) > 100
    first = next(corpus.documents(seed=0))
    assert "def " in first or "import " in first or "class " in first
    assert resolve_corpus("python-stdlib").corpus_id.startswith("python-stdlib:")


def test_token_files(tmp_path):
    from safetensors.torch import save_file

    stream = np.arange(200, dtype=np.int64) % 100
    np.save(tmp_path / "t.npy", stream)
    save_file({"tokens": torch.from_numpy(stream).view(10, 20)}, tmp_path / "t.safetensors")
    a = pack(tmp_path / "t.npy", None, context_size=20, n_windows=10)
    b = pack(tmp_path / "t.safetensors", None, context_size=20, n_windows=10)
    assert torch.equal(a.ids, b.ids) and a.ids[1, 0].item() == 20
    with pytest.raises(InterplabError, match="need"):
        pack(tmp_path / "t.npy", None, context_size=20, n_windows=11)


def test_corpus_errors(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(InterplabError, match="holds no files"):
        TextCorpus(tmp_path)
    (tmp_path / "short.txt").write_text("w1 w2 w3")
    with pytest.raises(InterplabError, match="too short"):
        pack(tmp_path, tok, context_size=16, n_windows=5)
    with pytest.raises(InterplabError, match="unknown corpus"):
        resolve_corpus("no-such-corpus")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(InterplabError, match="not a readable"):
        pack(tmp_path / "bad.npy", None, 4, 1)


# --- streaming ------------------------------------------------------------------------------


def reference(model, ids, hooks, include_bos=False):
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    start = 0 if include_bos else 1
    return {h: cache[h][:, start:].reshape(-1, cache[h].shape[-1]) for h in hooks}


def test_streamed_rows_equal_run_with_cache(model):
    ids = windows()
    store = il.activations(
        model, HOOKS, ids, n_tokens=150, context_size=16, batch_size=4, progress=False
    )
    assert store.d == {HOOKS[0]: 64, HOOKS[1]: 256}
    ref = reference(model, ids, HOOKS)
    for h in HOOKS:
        got = store.all(h)
        assert got.shape == (150, store.d[h])
        assert torch.allclose(got, ref[h][:150], atol=1e-5)


def test_include_bos_and_late_hooks(model):
    ids = windows()
    hooks = ["ln_final.hook_scale", "blocks.1.hook_resid_post"]
    store = il.activations(
        model, hooks, ids, n_tokens=32, context_size=16, include_bos=True, progress=False
    )
    ref = reference(model, ids, hooks, include_bos=True)
    for h in hooks:
        assert torch.allclose(store.all(h), ref[h][:32], atol=1e-5)


def test_forward_stops_after_the_last_needed_hook(model):
    ids = windows()
    later = {"n": 0}

    def count(tensor, hook):
        later["n"] += 1

    with model.hooks(
        fwd_hooks=[("blocks.1.hook_resid_pre", count), ("ln_final.hook_scale", count)]
    ):
        il.activations(
            model, ["blocks.0.hook_attn_out"], ids, n_tokens=60, context_size=16, progress=False
        ).all()
    assert later["n"] == 0
    with model.hooks(fwd_hooks=[("ln_final.hook_scale", count)]):
        il.activations(
            model, ["blocks.1.hook_resid_post"], ids, n_tokens=60, context_size=16, progress=False
        ).all()
    assert later["n"] == 0


def test_shuffled_batches_are_a_permutation(model):
    ids = windows()
    store = il.activations(model, HOOKS, ids, n_tokens=150, context_size=16, progress=False)
    batches = list(store.batches(32, shuffle=True, buffer_tokens=64, seed=1))
    assert [b[HOOKS[0]].shape[0] for b in batches[:-1]] == [32] * (len(batches) - 1)
    rows = torch.cat([b[HOOKS[0]] for b in batches])
    ordered = store.all(HOOKS[0])
    assert not torch.equal(rows, ordered)
    assert torch.allclose(rows.sum(0), ordered.sum(0), atol=1e-3)
    # rows of the two hooks stay aligned: mlp rows follow their residual rows
    mlp = torch.cat([b[HOOKS[1]] for b in batches])
    index = {tuple(r.tolist()): i for i, r in enumerate(ordered)}
    perm = torch.tensor([index[tuple(r.tolist())] for r in rows])
    assert torch.allclose(mlp, store.all(HOOKS[1])[perm], atol=1e-6)


# --- disk cache -----------------------------------------------------------------------------


def test_cache_roundtrip_and_manifest(model, tmp_path):
    ids = windows()
    store = il.activations(
        model,
        HOOKS,
        ids,
        n_tokens=100,
        context_size=16,
        out=tmp_path / "c",
        shard_tokens=32,
        progress=False,
    )
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert (
        manifest["n_tokens"] == 100
        and manifest["shards_done"] == 4
        and manifest["hooks"][HOOKS[0]] == 64
    )
    assert len(manifest["corpus_hash"]) == 64
    ref = reference(model, ids, HOOKS)
    reopened = ActivationStore.open(tmp_path / "c")
    for h in HOOKS:
        assert torch.allclose(reopened.all(h), ref[h][:100], atol=1e-5)
    assert store.shard(HOOKS[0], 3).shape == (4, 64)


def test_interrupted_cache_resumes_to_the_same_result(model, tmp_path):
    ids = windows(n=20)
    kwargs = dict(n_tokens=250, context_size=16, batch_size=2, shard_tokens=40, progress=False)
    full = il.activations(model, HOOKS, ids, out=tmp_path / "full", **kwargs)

    calls = {"n": 0}

    def explode(tensor, hook):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt

    with (
        pytest.raises(KeyboardInterrupt),
        model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", explode)]),
    ):
        il.activations(model, HOOKS, ids, out=tmp_path / "part", **kwargs)
    manifest = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert 0 < manifest["shards_done"] < 7
    with pytest.raises(InterplabError, match="incomplete"):
        ActivationStore.open(tmp_path / "part")
    resumed = il.activations(model, HOOKS, ids, out=tmp_path / "part", **kwargs)
    for h in HOOKS:
        assert torch.allclose(resumed.all(h), full.all(h), atol=0)


def test_refuses_a_folder_holding_another_cache(model, tmp_path):
    ids = windows()
    il.activations(
        model, HOOKS, ids, n_tokens=50, context_size=16, out=tmp_path / "c", progress=False
    )
    before = (tmp_path / "c" / "manifest.json").read_text()
    with pytest.raises(InterplabError, match="different activation cache.*n_tokens"):
        il.activations(
            model, HOOKS, ids, n_tokens=60, context_size=16, out=tmp_path / "c", progress=False
        )
    assert (tmp_path / "c" / "manifest.json").read_text() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InterplabError, match="not empty"):
        il.activations(
            model, HOOKS, ids, n_tokens=50, context_size=16, out=tmp_path / "other", progress=False
        )
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_corrupt_shard_is_reported(model, tmp_path):
    ids = windows()
    il.activations(
        model, HOOKS[:1], ids, n_tokens=50, context_size=16, out=tmp_path / "c", progress=False
    )
    shard = next((tmp_path / "c").rglob("shard-00000.npy"))
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(InterplabError, match="missing or corrupt"):
        ActivationStore.open(tmp_path / "c").all()


def test_activation_errors(model):
    ids = windows()
    with pytest.raises(InterplabError, match="n_tokens must be a positive"):
        il.activations(model, HOOKS, ids, n_tokens=0)
    with pytest.raises(InterplabError, match="Did you mean"):
        il.activations(model, ["blocks.0.hook_resid_pots"], ids, n_tokens=10)
    with pytest.raises(InterplabError, match="longer than the model"):
        il.activations(model, HOOKS, ids, n_tokens=10, context_size=1000)
    with pytest.raises(InterplabError, match="too few or too short"):
        il.activations(model, HOOKS, ids, n_tokens=10_000, context_size=16)
    with pytest.raises(InterplabError, match="hook_z"):
        il.activations(
            model, ["blocks.0.attn.hook_z"], ids, n_tokens=10, context_size=16, progress=False
        ).all()
