"""SAELens side of `bench_dictionaries.py`; runs with the peer venv's python
(`benchmarks/.venv-saelens/bin/python`), never imports interplab, and prints one JSON line.

    train     --acts A.npy --arch topk|relu --d-sae 4096 --k 32 --l1 5 --lr 4e-4
              --batch-size 4096 --tokens N [--sparse]
        Trains SAELens' TopKTrainingSAE / StandardTrainingSAE with its own SAETrainer on the
        rows of A.npy (cycled) and reports tokens/s of the training loop and the final FVU.
    evaluate  --acts A.npy --dictionary DIR --rows N --out PREFIX
        Loads DIR (written by interplab) with SAELens' `SAE.load_from_disk`, runs it on the
        first N rows, reports SAELens' metrics (explained variance with its
        ExplainedVarianceCalculator, per-token MSE as its evals define it, L0) and writes the
        latents and reconstructions to PREFIX-latents.npy / PREFIX-x_hat.npy.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

import numpy as np
import torch


def _rows(acts: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of consecutive rows, cycling over the array (same order as interplab's side)."""
    n = acts.shape[0] // batch_size * batch_size
    while True:
        for start in range(0, n, batch_size):
            yield torch.from_numpy(acts[start : start + batch_size])


def train(args: argparse.Namespace) -> dict:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    acts = np.load(args.acts)
    d_in = acts.shape[1]
    torch.manual_seed(0)
    if args.arch == "topk":
        cfg = TopKTrainingSAEConfig(
            d_in=d_in,
            d_sae=args.d_sae,
            k=args.k,
            aux_loss_coefficient=1 / 32,
            use_sparse_activations=args.sparse,
            dtype="float32",
            device="cpu",
        )
        sae = TopKTrainingSAE(cfg)
    else:
        cfg = StandardTrainingSAEConfig(
            d_in=d_in, d_sae=args.d_sae, l1_coefficient=args.l1, dtype="float32", device="cpu"
        )
        sae = StandardTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.tokens,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr / 10,  # the runner config's default; unused by the constant schedule
        device="cpu",
    )
    trainer = SAETrainer(trainer_cfg, sae, _rows(acts, args.batch_size))
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    # FVU on the first 65536 rows (inference forward, like interplab's side)
    x = torch.from_numpy(acts[:65536])
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
        fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        l0 = float((sae.encode(x) != 0).sum(-1).float().mean())
    return {
        "library": "sae_lens",
        "arch": args.arch,
        "sparse_activations": bool(args.sparse),
        "tokens": trainer.n_training_samples,
        "seconds": seconds,
        "tokens_per_s": trainer.n_training_samples / seconds,
        "tokens_per_cpu_s": trainer.n_training_samples / cpu_seconds,
        "fvu": fvu,
        "l0": l0,
        "threads": torch.get_num_threads(),
    }


def evaluate(args: argparse.Namespace) -> dict:
    from sae_lens import SAE
    from sae_lens.evals import ExplainedVarianceCalculator

    sae = SAE.load_from_disk(args.dictionary, device="cpu")
    x = torch.from_numpy(np.load(args.acts, mmap_mode="r")[: args.rows].copy())
    with torch.no_grad():
        latents = sae.encode(x)
        x_hat = sae.decode(latents)
        forward = sae(x)
    calc = ExplainedVarianceCalculator()
    calc.add_batch(sae_output=x_hat, hidden_acts=x)
    np.save(f"{args.out}-latents.npy", latents.numpy())
    np.save(f"{args.out}-x_hat.npy", x_hat.numpy())
    return {
        "library": "sae_lens",
        "architecture": type(sae).__name__,
        "explained_variance": calc.compute(),
        # SAELens' evals: squared error summed over dimensions, averaged over tokens
        "mse_per_token": float((x - x_hat).pow(2).sum(-1).mean()),
        "l0": float((latents != 0).sum(-1).float().mean()),
        "forward_equals_decode_encode": bool(torch.equal(forward, x_hat)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--acts", required=True)
    t.add_argument("--arch", choices=["topk", "relu"], required=True)
    t.add_argument("--d-sae", type=int, default=4096)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--l1", type=float, default=5.0)
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--tokens", type=int, required=True)
    t.add_argument("--sparse", action="store_true")
    e = sub.add_parser("evaluate")
    e.add_argument("--acts", required=True)
    e.add_argument("--dictionary", required=True)
    e.add_argument("--rows", type=int, default=65536)
    e.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(args) if args.command == "train" else evaluate(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
