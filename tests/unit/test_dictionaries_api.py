"""train_dictionary end to end on a tiny model: store -> train -> evaluate -> save -> load."""

from __future__ import annotations

import json

import pytest
import torch

import interplab as il
from interplab.dictionaries import TopK, TrainConfig, Transcoder, load_dictionary, save_dictionary
from interplab.dictionaries.api import train_dictionary
from interplab.dictionaries.evaluate import evaluate_dictionary
from interplab.errors import InterplabError
from tests.conftest import make_hf_model, make_tokenizer

HOOK = "blocks.0.hook_resid_post"
MLP_IN, MLP_OUT = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"


def windows(n: int, ctx: int = 32, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(2, 100, (n, ctx), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 0
    return ids


@pytest.fixture(scope="module")
def model():
    return il.load_model(make_hf_model("gpt2"), tokenizer=make_tokenizer(), device="cpu")


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("acts") / "cache"
    return il.activations(
        model,
        [HOOK, MLP_IN, MLP_OUT],
        windows(64),
        64 * 31,
        context_size=32,
        out=out,
        progress=False,
    )


def quick(steps: int, batch: int = 128) -> TrainConfig:
    return TrainConfig(
        batch_size=batch,
        total_tokens=steps * batch,
        lr=3e-3,
        lr_warmup_steps=10,
        log_every=50,
        checkpoint_every=None,
        progress=False,
    )


def test_store_to_trained_topk_to_evaluation_to_files(model, store, tmp_path):
    from interplab.runs import start_run

    with start_run("sae", root=tmp_path) as run:
        sae = train_dictionary(
            store, TopK(256, k=8), hook_name=HOOK, train_config=quick(300), run=run, device="cpu"
        )
    assert sae.metadata["hook_name"] == HOOK and sae.metadata["context_size"] == 32
    assert sae.metadata["model_name"] == store.manifest.model
    assert sae.metadata["interplab_training"]["steps"] == 300
    saved = json.loads((run.dir / "dictionaries" / "topk-256-k8" / "cfg.json").read_text())
    assert saved["metadata"]["hook_name"] == HOOK

    held_out = windows(16, seed=1)
    result = evaluate_dictionary(sae, model, held_out, n_tokens=16 * 31)
    untrained = evaluate_dictionary(
        il.dictionaries.build_dictionary(TopK(256, k=8), 64), model, held_out, hook_name=HOOK
    )
    assert result.fvu < 0.25 < untrained.fvu
    assert result.ce_recovered > 0.5
    assert result.l0 == pytest.approx(8, abs=0.01)

    path = save_dictionary(sae, tmp_path / "saved")
    loaded = load_dictionary(path)
    assert loaded.metadata["hook_name"] == HOOK
    x = store.all(HOOK)[:200]
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))
    again = evaluate_dictionary(loaded, model, held_out, n_tokens=16 * 31)
    assert again.ce_spliced == result.ce_spliced


def test_transcoder_from_a_two_hook_store(model, store):
    tc = train_dictionary(
        store,
        Transcoder(TopK(64, k=4)),
        hook_name=MLP_IN,
        hook_name_out=MLP_OUT,
        train_config=quick(20),
        device="cpu",
    )
    assert (tc.metadata["hook_name"], tc.metadata["hook_name_out"]) == (MLP_IN, MLP_OUT)
    result = evaluate_dictionary(tc, model, windows(4, seed=2))
    assert result.hook_name_out == MLP_OUT and result.n_windows == 4


def test_plain_batches_and_default_length(store):
    x = store.all(HOOK)
    sae = train_dictionary(
        x.split(100),
        TopK(32, k=2),
        train_config=quick(5, batch=64),
        n_tokens=640,
        hook_name=HOOK,
        device="cpu",
    )
    assert sae.d_in == 64 and sae.metadata == {"hook_name": HOOK}


def test_errors(store):
    with pytest.raises(InterplabError, match="pass hook_name"):
        train_dictionary(store, TopK(32, k=2), train_config=quick(2))
    with pytest.raises(InterplabError, match="not in this activation store"):
        train_dictionary(store, TopK(32, k=2), hook_name="blocks.1.hook_resid_post")
    with pytest.raises(InterplabError, match="a transcoder maps one hook"):
        train_dictionary(store, Transcoder(TopK(32, k=2)), hook_name=MLP_IN)
    with pytest.raises(InterplabError, match="hook_name_out is for transcoders"):
        train_dictionary(store, TopK(32, k=2), hook_name=HOOK, hook_name_out=MLP_OUT)
    with pytest.raises(InterplabError, match="single tensor"):
        train_dictionary(store.all(HOOK), TopK(32, k=2))
    with pytest.raises(InterplabError, match="n_tokens"):
        train_dictionary(store, TopK(32, k=2), hook_name=HOOK, n_tokens=0)


# --- CLI commands (registered by interplab.cli; run here through their own typer app) ------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    make_hf_model("gpt2").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    texts = folder / "corpus"
    texts.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(8):
        ids = torch.randint(0, 98, (400,), generator=rng).tolist()
        (texts / f"doc{i}.txt").write_text(" ".join(f"w{j}" for j in ids))
    return folder


def invoke(*args: str):
    from typer.testing import CliRunner

    from interplab.dictionaries.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_train_eval_compare(model_dir, tmp_path):
    corpus = model_dir / "corpus"
    common = ["--corpus", corpus, "--context-size", 32, "--batch-size", 128, "--d-sae", 64]
    common += ["--k", 4, "--eval-tokens", 62, "--out", tmp_path / "runs", "--device", "cpu"]
    out = invoke("train-sae", model_dir, "--hook", HOOK, "--tokens", 1280, *common)
    assert "CE recovered" in out and "dictionary:" in out
    [run_a] = (tmp_path / "runs").glob("*-train-sae")
    folder_a = run_a / "dictionaries" / "topk-64-k4"
    assert load_dictionary(folder_a).metadata["hook_name"] == HOOK
    evaluation = json.loads((run_a / "evaluation.json").read_text())
    assert evaluation["n_tokens"] == 62 and evaluation["metrics"]["l0"] == pytest.approx(4)
    assert (run_a / "figures" / "evaluation-density.png").exists()

    # the same from cached activations, as a ReLU dictionary
    cache = tmp_path / "cache"
    il.activations(
        il.load_model(str(model_dir), device="cpu"),
        HOOK,
        str(corpus),
        1240,
        context_size=32,
        out=cache,
        progress=False,
    )
    out = invoke(
        "train-sae",
        model_dir,
        "--hook",
        HOOK,
        "--store",
        cache,
        "--arch",
        "relu",
        "--l1",
        1.0,
        "--name",
        "relu",
        *common,
    )
    assert "1,152 tokens" in out  # one pass over the cache, cut to whole batches of 128
    [run_b] = [r for r in (tmp_path / "runs").glob("*-train-sae*") if r != run_a]
    folder_b = run_b / "dictionaries" / "relu"

    out = invoke("eval-sae", folder_a, model_dir, "--corpus", corpus, "--tokens", 62,
                 "--context-size", 32, "--out", tmp_path / "evals")  # fmt: skip
    assert f"{evaluation['metrics']['ce_recovered']:.4f}" in out  # same windows, same numbers

    out = invoke("compare", folder_a, folder_a, "--data", cache, "--tokens", 256)
    assert "matched_cosine" in out and "reconstruction_fvu" in out
    out = invoke("compare", folder_a, folder_b, "--data", cache, "--out", tmp_path / "cmp")
    [cmp_run] = (tmp_path / "cmp").glob("*-compare")
    saved = json.loads((cmp_run / "comparison.json").read_text())
    assert saved["names"] == ["topk-64-k4", "relu"]
    assert len(saved["matching"]["a"]) == 64
    assert (cmp_run / "figures" / "max-cosine.png").exists()


def test_cli_errors(model_dir, tmp_path):
    from interplab.dictionaries.cli import make_config

    with pytest.raises(InterplabError, match="--tokens is required"):
        invoke("train-sae", model_dir, "--hook", HOOK, "--out", tmp_path)
    with pytest.raises(InterplabError, match="--l1 applies"):
        make_config("topk", 64, l1=1.0)
    with pytest.raises(InterplabError, match="--l0 applies"):
        make_config("relu", 64, l0=1.0)
    with pytest.raises(InterplabError, match="--skip makes a skip transcoder"):
        make_config("topk", 64, skip=True)
    with pytest.raises(InterplabError, match="unknown dictionary architecture"):
        make_config("sparse", 64)
    assert type(make_config("jumprelu", 64, l0=0.5, transcoder=True, skip=True)).__name__ == (
        "SkipTranscoder"
    )
    assert make_config("matryoshka", 64, k=4).prefixes == (4, 16, 64)


def test_sae_recipe_sweeps_and_reports(model_dir, tmp_path, monkeypatch):
    from interplab.recipes import RECIPES
    from interplab.runs import run_recipe

    monkeypatch.setitem(RECIPES, "sae", "interplab.recipes.sae")
    overrides = {
        "model": str(model_dir), "hook": HOOK, "corpus": str(model_dir / "corpus"),
        "n_tokens": 2048, "eval_tokens": 124, "widths": "32", "ks": "2,4",
        "context_size": 32, "fast": True, "device": "cpu",
    }  # fmt: skip
    result = run_recipe("sae", overrides, root=tmp_path)
    blocks = [b for s in result.report.to_dict()["sections"] for b in s["blocks"]]
    table = next(b for b in blocks if b["type"] == "table")
    assert [r[0] for r in table["rows"]] == ["topk-32-k2", "topk-32-k4"]
    assert [r[1] for r in table["rows"]] == pytest.approx([2.0, 4.0])  # L0 column
    for name in ("topk-32-k2", "topk-32-k4"):
        saved = load_dictionary(result.run_dir / "dictionaries" / name)
        assert saved.metadata["hook_name"] == HOOK
        assert (result.run_dir / f"evaluation-{name}.json").exists()
    assert (result.run_dir / "figures" / "frontier.png").exists()
    with pytest.raises(InterplabError, match="k must not exceed"):
        run_recipe("sae", {**overrides, "ks": "64"}, root=tmp_path)


def test_streamed_batches_do_not_leak_inference_mode():
    """A producer suspended inside torch.inference_mode() (as a store streaming from the
    model is) must not switch autograd off for the training steps in between."""
    from interplab.dictionaries.api import _as_normal_tensors, in_thread

    events = []

    def producer():
        try:
            with torch.inference_mode():
                for i in range(100):
                    yield torch.full((2, 3), float(i))
        finally:
            events.append("closed")

    leaked = producer()
    next(leaked)
    assert torch.is_inference_mode_enabled()  # the bug being avoided, shown directly
    leaked.close()
    assert not torch.is_inference_mode_enabled()

    events.clear()
    stream = _as_normal_tensors(in_thread(producer()))
    w = torch.ones(3, requires_grad=True)
    for i, x in zip(range(3), stream, strict=False):
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
        (x * w).sum().backward()
        assert float(x[0, 0]) == i
    assert torch.equal(w.grad, torch.full((3,), 2.0 * (0 + 1 + 2)))
    stream.close()  # stops the producer thread and runs its cleanup
    assert events == ["closed"]

    def failing():
        yield torch.zeros(1)
        raise InterplabError("corpus ran out")

    with pytest.raises(InterplabError, match="corpus ran out"):
        list(in_thread(failing()))


def test_train_from_a_streaming_store_then_evaluate(model):
    streaming = il.activations(model, HOOK, windows(16), 16 * 31, context_size=32, progress=False)
    sae = train_dictionary(streaming, TopK(32, k=2), train_config=quick(8, batch=64), device="cpu")
    assert sae.metadata == {"hook_name": HOOK}
    # the producer's capture hooks are gone: the model runs whole again
    result = evaluate_dictionary(sae, model, windows(2, seed=3))
    assert result.ce_clean == pytest.approx(
        evaluate_dictionary(sae, model, windows(2, seed=3)).ce_clean
    )
    logits = model(windows(1, seed=3))
    assert logits.shape == (1, 32, 100)
