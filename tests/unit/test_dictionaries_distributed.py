"""Two gloo processes on CPU train the same dictionaries as one process on the
concatenated batches (gradient averaging of mean losses over equal half-batches); the
torchrun launch (process group from the environment) and per-rank shards of a cache."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from interplab.dictionaries import (
    Gated,
    JumpReLU,
    Matryoshka,
    ReLU,
    TopK,
    TrainConfig,
    train_dictionaries,
)
from interplab.dictionaries.distributed import (
    World,
    all_reduce_,
    broadcast_object,
    launch,
    rank_device,
    rank_rows,
    rank_shard,
)
from interplab.dictionaries.training import _agree_to_resume
from interplab.errors import InterplabError

ROWS, D_IN, STEPS = 64, 12, 8


def _configs():
    # Every variant whose loss is a mean of per-token terms is exactly equivalent; BatchTopK
    # (top k * batch over the local batch) is not, and is not tested here.
    return [
        TopK(32, k=2, aux_k=4),
        ReLU(32, l1_coefficient=0.5),
        Matryoshka(32, k=2, prefixes=(8,)),
        JumpReLU(32, l0_coefficient=0.05),
        Gated(32, l1_coefficient=0.5),
    ]


def _train_config(checkpoint_dir: str) -> TrainConfig:
    return TrainConfig(
        batch_size=2 * ROWS,
        total_tokens=2 * ROWS * STEPS,
        lr=5e-3,
        lr_warmup_steps=0,
        log_every=3,
        checkpoint_every=3,
        checkpoint_dir=checkpoint_dir,
        dead_tokens_threshold=2 * ROWS * 3,  # latents die quickly, so AuxK is exercised
        progress=False,
    )


def _global_batches():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(24, D_IN, generator=g, dtype=torch.float64)
    for _ in range(STEPS):
        idx = torch.rand(2 * ROWS, 24, generator=g).topk(2).indices
        coef = torch.rand(2 * ROWS, 2, generator=g, dtype=torch.float64) + 0.5
        yield torch.zeros(2 * ROWS, 24, dtype=torch.float64).scatter_(1, idx, coef) @ truth + 1.0


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        shard = (batch[rank * ROWS : (rank + 1) * ROWS] for batch in _global_batches())
        dictionaries = train_dictionaries(
            _configs(), shard, _train_config(str(Path(out) / "ck")), dtype=torch.float64
        )
        torch.save([d.state_dict() for d in dictionaries], Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_gloo_ranks_equal_single_process(tmp_path):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The reference first: it also performs torch's lazy imports (the first Adam step
        # imports torch._dynamo), which forked workers then inherit instead of repeating.
        single = train_dictionaries(
            _configs(),
            _global_batches(),
            _train_config(str(tmp_path / "single")),
            dtype=torch.float64,
        )
        # fork avoids re-importing torch in the workers; they set one thread before any
        # tensor work, as DataLoader workers do.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(
            _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method
        )
    finally:
        torch.set_num_threads(previous)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for i, reference in enumerate(single):
        for name, expected in reference.state_dict().items():
            # both ranks hold identical weights, equal to single-process training
            assert torch.equal(ranks[0][i][name], ranks[1][i][name]), name
            assert torch.allclose(ranks[0][i][name], expected, rtol=1e-9, atol=1e-11), (i, name)
    assert (tmp_path / "ck" / "checkpoint.pt").exists()  # written by rank 0


# --- torchrun launch and data shards ------------------------------------------------------


def _launch_worker(rank: int, world: int, port: int, out: str) -> None:
    """What torchrun gives each process: RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    with launch("cpu") as place:
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        value = torch.tensor([float(rank + 1)])
        all_reduce_(value, place.world)
        shared = broadcast_object(f"from rank {place.world.rank}", place.world)
        result = (place.world.rank, place.world.size, str(place.device), value.item(), shared)
        # ranks must agree on resuming: a checkpoint that only rank 0 sees is refused
        agreed = _agree_to_resume(True, place.world, place.device)
        try:
            _agree_to_resume(rank == 0, place.world, place.device)
            refused = ""
        except InterplabError as error:
            refused = str(error)
        result = (*result, agreed, "exists on some ranks only" in refused)
    torch.save({"result": result, "destroyed": not dist.is_initialized()}, Path(out) / f"{rank}.pt")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_launch_joins_the_torchrun_process_group(tmp_path):
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _launch_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
        start_method=method,
    )  # fmt: skip
    for rank in range(2):
        saved = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert saved["result"] == (rank, 2, "cpu", 3.0, "from rank 0", True, True)
        assert saved["destroyed"]


def test_launch_outside_torchrun_is_a_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with launch("cpu") as place:
        assert place.world == World(0, 1) and place.device == torch.device("cpu")
        assert not dist.is_initialized()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1: nothing to join
    with launch("cpu") as place:
        assert place.world == World(0, 1) and not dist.is_initialized()


def test_rank_device():
    assert rank_device("cpu", 3) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert rank_device(None, 1) == torch.device("cpu")
    with pytest.raises(InterplabError, match="names one GPU.*cuda:LOCAL_RANK"):
        rank_device("cuda:1", 0)
    with pytest.raises(InterplabError, match="not a valid torch device"):
        rank_device("gpu0", 0)


@pytest.mark.parametrize("n", [0, 1, 7, 64])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_rank_rows_split_rows_into_contiguous_blocks(n, size):
    blocks = [rank_rows(n, World(rank, size)) for rank in range(size)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    lengths = [stop - start for start, stop in blocks]
    assert max(lengths) - min(lengths) <= 1


def test_rank_shard_splits_a_cached_store(tmp_path):
    import interplab as il
    from interplab.models import ToyConfig

    model = il.load_model(ToyConfig(n_layers=1, d_model=8, n_heads=2, d_vocab=20), device="cpu")
    windows = torch.randint(0, 20, (40, 9), generator=torch.Generator().manual_seed(0))
    hook = "blocks.0.hook_resid_post"
    # 300 rows in shards of 64: four full shards and one of 44 rows
    store = il.activations(
        model, hook, windows, 300, context_size=9, out=tmp_path, shard_tokens=64, progress=False
    )
    everything = store.all()
    parts = [rank_shard(store, World(rank, 3)) for rank in range(3)]
    rows = [torch.cat([b[hook] for b in p.batches(50, shuffle=False)]) for p in parts]
    assert [p.n_tokens for p in parts] == [r.shape[0] for r in rows]
    assert sum(p.n_tokens for p in parts) == 300
    # disjoint and complete: the ranks' rows are a permutation of all rows
    merged = torch.cat(rows)
    order = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    assert torch.equal(order(merged), order(everything))
    # rank 1 reads the middle third of every shard file
    assert torch.equal(rows[1][:21], everything[21:42])
    # shuffled passes on a shard stay within it
    shuffled = torch.cat([b[hook] for b in parts[2].batches(32, shuffle=True, seed=3)])
    assert torch.equal(order(shuffled), order(rows[2]))
    assert rank_shard(store, World(0, 1)) is store
    streamed = il.activations(model, hook, windows, 100, context_size=9, progress=False)
    with pytest.raises(InterplabError, match="splits a cached activation store"):
        rank_shard(streamed, World(0, 2))
