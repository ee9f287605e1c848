"""EleutherAI sparsify side of `bench_dictionaries.py`; runs with the peer venv's python
(`benchmarks/.venv-sparsify/bin/python`), never imports interplab, prints one JSON line.

    train --acts A.npy --arch topk --d-sae 4096 --k 32 --lr 4e-4 --batch-size 4096 --tokens N

sparsify's `Trainer` only trains on hooks of a live HuggingFace model, so this driver runs the
same per-step sequence its trainer runs for `loss_fn="fvu"` with the Adam optimizer, on the
rows of A.npy: `SparseCoder.forward(x, dead_mask=...)` -> loss = fvu + auxk_alpha * auxk ->
backward -> `remove_gradient_parallel_to_decoder_directions` -> Adam step ->
`set_decoder_norm_to_unit_norm` -> dead-latent counters. Gradient clipping at 1.0 is added to
match the other libraries in the benchmark.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def train(args: argparse.Namespace) -> dict:
    from sparsify import SparseCoder, SparseCoderConfig

    if args.arch != "topk":
        raise SystemExit("sparsify trains TopK sparse coders only")
    acts = np.load(args.acts)
    n = acts.shape[0] // args.batch_size * args.batch_size
    torch.manual_seed(0)
    sae = SparseCoder(acts.shape[1], SparseCoderConfig(num_latents=args.d_sae, k=args.k))
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    since_fired = torch.zeros(args.d_sae, dtype=torch.long)
    auxk_alpha, dead_threshold = 1 / 32, 10_000_000
    steps = args.tokens // args.batch_size
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(steps):
        offset = step * args.batch_size % n
        x = torch.from_numpy(acts[offset : offset + args.batch_size])
        if step == 0:
            sae.b_dec.data = x.mean(0)  # sparsify initialises b_dec to the first batch's mean
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=since_fired > dead_threshold)
        (out.fvu + auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            since_fired += args.batch_size
            since_fired[out.latent_indices.flatten()] = 0
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    x = torch.from_numpy(acts[:65536])
    with torch.no_grad():
        out = sae(x)
        fvu = float((x - out.sae_out).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        l0 = float((out.latent_acts > 0).sum(-1).float().mean())
    tokens = steps * args.batch_size
    return {
        "library": "sparsify",
        "arch": "topk",
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_cpu_s": tokens / cpu_seconds,
        "fvu": fvu,
        "l0": l0,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--acts", required=True)
    t.add_argument("--arch", default="topk")
    t.add_argument("--d-sae", type=int, default=4096)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--l1", type=float, default=0.0, help="unused (TopK only)")
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--tokens", type=int, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(train(args)))


if __name__ == "__main__":
    main()
