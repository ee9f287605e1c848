"""devinterp side of `bench_llc.py`; runs with the peer venv's python
(`benchmarks/.venv-devinterp/bin/python`), never imports interplab, and prints one JSON line.

    llc --weights W.safetensors --data D.safetensors --p 31 --d-model 64 --n-heads 4
        --d-mlp 128 --lr 1e-4 --n-beta 100 --localization 100 --chains 8 --draws 200
        --batch-size 128 [--seed 0]

Loads the benchmark's modular-addition transformer (`ModularTransformer` below, the same
class bench_llc.py gives interplab) from W, the training equations from D (`tokens`
[n, 3] "a b =", `labels` [n]), and estimates its local learning coefficient with devinterp's
own `devinterp.slt.llc.llc` (SGLD, no burn-in, every step drawn). devinterp 2 reads
language-model datasets, so each equation becomes one `input_ids` row [a, b, =, c]; the
per-token loss function it asks for returns the example's cross-entropy over the p answers
at "=", repeated over the row's 3 next-token positions (same mean and gradient as the
per-example loss).

`ModularTransformer` is imported by bench_llc.py too, so this module imports only torch at
the top.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class ModularTransformer(nn.Module):
    """One-layer transformer without LayerNorm on "a b =" (Nanda et al. 2023's shape):
    learned positions, multi-head attention, ReLU MLP, unembedding; returns the logits at
    the last position [batch, d_vocab]. Weight names follow the interplab bridge's
    state dict so its trained weights load directly."""

    def __init__(self, d_vocab: int, d_model: int, n_heads: int, d_mlp: int, n_ctx: int = 3):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.embed = nn.Embedding(d_vocab, d_model)
        self.pos_embed = nn.Embedding(n_ctx, d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.mlp_in = nn.Linear(d_model, d_mlp)
        self.mlp_out = nn.Linear(d_mlp, d_model)
        self.unembed = nn.Linear(d_model, d_vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, S = tokens.shape
        x = self.embed(tokens) + self.pos_embed.weight[:S]
        heads = (self.n_heads, self.d_head)
        q = self.q(x[:, -1]).view(B, *heads)
        k = self.k(x).view(B, S, *heads)
        v = self.v(x).view(B, S, *heads)
        # the last position attends to all S positions: no causal mask needed
        pattern = (torch.einsum("bhd,bshd->bsh", q, k) / math.sqrt(self.d_head)).softmax(dim=1)
        z = torch.einsum("bsh,bshd->bhd", pattern, v).reshape(B, -1)
        resid = x[:, -1] + self.o(z)
        resid = resid + self.mlp_out(F.relu(self.mlp_in(resid)))
        return self.unembed(resid)


def llc(args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from devinterp.slt.llc import llc as devinterp_llc
    from safetensors.torch import load_file

    p = args.p
    model = ModularTransformer(p + 1, args.d_model, args.n_heads, args.d_mlp)
    model.load_state_dict(load_file(args.weights))
    data = load_file(args.data)
    rows = torch.cat([data["tokens"], data["labels"][:, None]], dim=1)
    dataset = Dataset.from_dict({"input_ids": rows.tolist()}).with_format("torch")

    def per_token_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids[:, :3])[:, :p]
        loss = F.cross_entropy(logits, input_ids[:, 3], reduction="none")
        return loss[:, None].expand(-1, input_ids.shape[1] - 1)

    n_batches = len(rows) // args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = devinterp_llc(
            model,
            dataset,
            observables={},
            lr=args.lr,
            n_beta=args.n_beta,
            loss_fn=per_token_loss,
            num_chains=args.chains,
            num_draws=args.draws,
            num_burnin_steps=0,
            batch_size=args.batch_size,
            localization=args.localization,
            num_init_loss_batches=n_batches,  # one pass over the data, like interplab
            init_seed=args.seed,
            device="cpu",
            output_path=str(Path(tmp) / "samples.zarr"),
        )
        llc_mean = float(result.llc_mean)
        llc_per_chain = [float(v) for v in result.llc_per_chain.values]
        init_loss = float(result.init_loss)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    steps = args.chains * args.draws
    return {
        "library": "devinterp",
        "llc_mean": llc_mean,
        "llc_std": float(torch.tensor(llc_per_chain).std()),
        "llc_per_chain": llc_per_chain,
        "init_loss": init_loss,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "sgld_steps": steps,
        "steps_per_s": steps / seconds,
        "steps_per_cpu_s": steps / cpu_seconds,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("llc")
    e.add_argument("--weights", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--p", type=int, required=True)
    e.add_argument("--d-model", type=int, required=True)
    e.add_argument("--n-heads", type=int, required=True)
    e.add_argument("--d-mlp", type=int, required=True)
    e.add_argument("--lr", type=float, required=True)
    e.add_argument("--n-beta", type=float, required=True)
    e.add_argument("--localization", type=float, required=True)
    e.add_argument("--chains", type=int, required=True)
    e.add_argument("--draws", type=int, required=True)
    e.add_argument("--batch-size", type=int, required=True)
    e.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(llc(args)))


if __name__ == "__main__":
    main()
