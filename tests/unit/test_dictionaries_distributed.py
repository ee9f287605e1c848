"""Two gloo processes on CPU train the same dictionaries as one process on the
concatenated batches (gradient averaging of mean losses over equal half-batches)."""

from __future__ import annotations

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
