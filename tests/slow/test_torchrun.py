"""`torchrun --nproc_per_node=2 -m interplab train-sae ...` on CPU (gloo), end to end.

Two ranks train a ReLU SAE on a cached activation store, each reading its own rows
(`rank_shard`); the saved dictionary must equal single-process training on the same global
batches (each the concatenation of the ranks' local batches), and only rank 0 writes.
About 15-30 s on a free 2-core CPU: three Python processes import torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

import interplab as il
from interplab.dictionaries import ReLU, TrainConfig, load_dictionary, train_dictionaries
from interplab.dictionaries.api import store_batches
from interplab.dictionaries.distributed import World, rank_shard
from interplab.dictionaries.training import rebatch
from tests.conftest import make_hf_model, make_tokenizer

pytestmark = pytest.mark.slow

HOOK = "blocks.1.hook_resid_post"
BATCH, D_SAE, L1, SEED = 128, 64, 1.0, 0


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny GPT-2 saved as an HF folder and 1,500 cached rows of one hook (6 shards)."""
    root = tmp_path_factory.mktemp("torchrun")
    model_dir = root / "model"
    make_hf_model("gpt2").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    text = " ".join(f"w{i}" for i in torch.randint(0, 98, (3000,), generator=g).tolist())
    (root / "corpus.txt").write_text(text)
    model = il.load_model(str(model_dir), device="cpu")
    store = root / "cache"
    il.activations(
        model, HOOK, str(root / "corpus.txt"), 1500, context_size=32, out=store,
        shard_tokens=256, progress=False,
    )  # fmt: skip
    return model_dir, store


def _global_batches(store_dir: Path, world_size: int):
    """What the ranks train on, step by step: rank r's local batch t is batch t of
    `store_batches` over its shard, cut to BATCH / world_size rows; concatenated in rank order."""
    store = il.ActivationStore.open(store_dir)
    streams = [
        rebatch(
            store_batches(rank_shard(store, World(r, world_size)), HOOK, None, BATCH, SEED),
            BATCH // world_size,
        )
        for r in range(world_size)
    ]
    for parts in zip(*streams, strict=False):
        yield torch.cat([x for x, _ in parts])


def test_torchrun_train_sae_equals_single_process(cache, tmp_path):
    model_dir, store_dir = cache
    runs = tmp_path / "runs"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "interplab", "train-sae", str(model_dir), "--hook", HOOK, "--store", str(store_dir),
        "--arch", "relu", "--l1", str(L1), "--d-sae", str(D_SAE), "--batch-size", str(BATCH),
        "--eval-tokens", "0", "--out", str(runs), "--device", "cpu", "--seed", str(SEED),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("dictionary: ") == 1  # rank 0 alone reports
    assert "tokens of blocks.1.hook_resid_post on 2 ranks" in done.stdout
    [run] = runs.iterdir()  # rank 0 alone made a run folder
    assert (run / "checkpoints" / "checkpoint.pt").exists()
    trained = load_dictionary(run / "dictionaries" / f"relu-{D_SAE}")
    assert trained.metadata["hook_name"] == HOOK

    # The same global batches in one process (1,500 rows: 11 whole steps of 128).
    n_tokens = il.ActivationStore.open(store_dir).n_tokens
    config = TrainConfig(batch_size=BATCH, total_tokens=n_tokens, seed=SEED, progress=False)
    batches = list(islice(_global_batches(store_dir, 2), config.total_steps))
    assert len(batches) == config.total_steps == 11
    [reference] = train_dictionaries([ReLU(D_SAE, l1_coefficient=L1)], batches, config)
    for name, expected in reference.file_tensors().items():
        got = trained.file_tensors()[name]
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), name
    # ... and not what one rank's half of the data alone gives
    [half] = train_dictionaries(
        [ReLU(D_SAE, l1_coefficient=L1)],
        [b[: BATCH // 2] for b in batches],
        TrainConfig(batch_size=BATCH // 2, total_tokens=n_tokens // 2, seed=SEED, progress=False),
    )
    assert not torch.allclose(trained.W_dec, half.W_dec, rtol=1e-4, atol=1e-5)


API_SCRIPT = """
import sys
import interplab as il
from interplab.dictionaries import ReLU, TrainConfig, save_dictionary, train_dictionary
from interplab.dictionaries.distributed import launch

store_dir, out, hook, batch, d_sae, l1, seed = sys.argv[1:]
with launch("cpu") as place:
    store = il.ActivationStore.open(store_dir)  # the whole cache: train_dictionary splits it
    config = TrainConfig(batch_size=int(batch), total_tokens=store.n_tokens, seed=int(seed),
                         progress=False)
    sae = train_dictionary(store, ReLU(int(d_sae), l1_coefficient=float(l1)), hook_name=hook,
                           train_config=config, device="cpu")
    if place.world.is_main:
        save_dictionary(sae, out)
"""


def test_train_dictionary_api_under_torchrun(cache, tmp_path):
    """A user's own script: `train_dictionary` on a whole cached store under torchrun gives
    the data-parallel result (each rank reads its own rows) that the CLI gives."""
    _, store_dir = cache
    script = tmp_path / "train.py"
    script.write_text(API_SCRIPT)
    out = tmp_path / "sae"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(script), str(store_dir), str(out), HOOK, str(BATCH), str(D_SAE), str(L1), str(SEED),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = load_dictionary(out)
    n_tokens = il.ActivationStore.open(store_dir).n_tokens
    config = TrainConfig(batch_size=BATCH, total_tokens=n_tokens, seed=SEED, progress=False)
    batches = list(islice(_global_batches(store_dir, 2), config.total_steps))
    [reference] = train_dictionaries([ReLU(D_SAE, l1_coefficient=L1)], batches, config)
    for name, expected in reference.file_tensors().items():
        assert torch.allclose(trained.file_tensors()[name], expected, rtol=1e-4, atol=1e-5), name
