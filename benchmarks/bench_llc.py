"""Local learning coefficient estimation speed and agreement: interplab vs devinterp.

One run, one model, the same settings on both sides:

* the model: the one-layer modular-addition transformer of the grokking recipe's fast
  setting ((a + b) mod 31, 70% of the pairs for training, d_model 64, 4 heads, d_mlp 128,
  no LayerNorm), trained here with `interplab.toys.modular.train_modular` to its end point
  and copied into `ModularTransformer` (a plain nn.Module defined in `_devinterp_driver.py`,
  so both libraries run the same module class on the same weights; its logits are checked
  against interplab's `modular_logits` before timing);
* the estimate: SGLD from the trained weights with the same step size, nβ (n / log n over
  the training pairs), localisation, chains, draws per chain and minibatch size, no burn-in
  (devinterp's LLC averages every step), cross-entropy over the p answers at "=";
  interplab's `estimate_llc` (chains vectorised with vmap) vs devinterp 2's `llc`
  (chains one after another; driven by `_devinterp_driver.py` in the peer venv);
* throughput: SGLD steps per second summed over chains, end to end (init loss plus
  sampling, what a user waits for), wall clock and per CPU-second (steadier on a shared
  machine), and the ratio interplab / devinterp;
* agreement: both estimates with their spread over chains; the difference is compared with
  the combined standard error (the chains are random, so estimates agree statistically, not
  bit for bit).

Peer setup (separate venv, gitignored):

    python3 -m venv benchmarks/.venv-devinterp
    benchmarks/.venv-devinterp/bin/pip install torch==2.13.0 devinterp   # devinterp 2.0.1 tested

Run: python benchmarks/bench_llc.py [--chains 8] [--draws 200] [--batch-size 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _devinterp_driver import ModularTransformer  # noqa: E402

PEER_PYTHON = HERE / ".venv-devinterp" / "bin" / "python"
DRIVER = HERE / "_devinterp_driver.py"
P, D_MODEL, N_HEADS, D_MLP = 31, 64, 4, 128


def trained_model(seed: int) -> tuple[ModularTransformer, torch.Tensor, torch.Tensor]:
    """Train the grokking recipe's fast setting; return the plain-module copy and the
    training equations (tokens [n, 3], labels [n])."""
    from interplab.toys import modular as mod

    config = mod.ModularConfig(
        p=P,
        train_fraction=0.7,
        d_model=D_MODEL,
        n_heads=N_HEADS,
        d_mlp=D_MLP,
        lr=1e-2,
        steps=400,
        eval_every=50,
        checkpoint_every=None,
        seed=seed,
    )
    result = mod.train_modular(config, progress=False)
    bridge = result.model
    w = {k: v.detach() for k, v in mod.modular_weights(bridge).items()}
    plain = ModularTransformer(P + 1, D_MODEL, N_HEADS, D_MLP)
    state = {
        "embed.weight": w["embed.weight"],
        "pos_embed.weight": w["pos_embed.weight"][:3],
        "unembed.weight": w["unembed.weight"],
    }
    for name in "qkvo":
        for kind in ("weight", "bias"):
            state[f"{name}.{kind}"] = w[f"blocks.0.attn.{name}.{kind}"]
    for ours, theirs in (("mlp_in", "in"), ("mlp_out", "out")):
        for kind in ("weight", "bias"):
            state[f"{ours}.{kind}"] = w[f"blocks.0.mlp.{theirs}.{kind}"]
    plain.load_state_dict(state)
    if w["unembed.bias"].abs().max() > 0:
        raise SystemExit("the bridge has a nonzero unembedding bias the plain module lacks")
    data = mod.modular_dataset(config)
    with torch.no_grad():
        reference = mod.modular_logits(bridge, data.train_tokens)
        ours = plain(data.train_tokens)
    error = (reference - ours).abs().max().item()
    if error > 1e-4:
        raise SystemExit(f"plain module disagrees with modular_logits by {error:.2e}")
    print(
        f"model: (a + b) mod {P}, {len(data.train_labels)} training pairs, final train/test "
        f"accuracy {result.train_accuracy[-1]:.3f}/{result.test_accuracy[-1]:.3f}; plain "
        f"module matches modular_logits to {error:.1e}"
    )
    return plain, data.train_tokens, data.train_labels


def run_interplab(model, tokens, labels, args, n_beta: float) -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    from interplab.slt import LLCConfig, estimate_llc

    loader = DataLoader(
        TensorDataset(tokens, labels),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
    )

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x)[:, :P], y)

    config = LLCConfig(
        lr=args.lr,
        localization=args.localization,
        n_beta=n_beta,
        chains=args.chains,
        burn_in=0,
        draws=args.draws,
        seed=args.seed,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    result = estimate_llc(model, loader, loss_fn, config)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    steps = args.chains * args.draws
    return {
        "library": "interplab",
        "llc_mean": result.llc_mean,
        "llc_std": result.llc_std,
        "llc_per_chain": result.llc_per_chain.tolist(),
        "init_loss": result.init_loss,
        "r_hat": result.r_hat,
        "vectorized": result.vectorized,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "sampling_seconds": result.seconds,
        "sgld_steps": steps,
        "steps_per_s": steps / seconds,
        "steps_per_cpu_s": steps / cpu_seconds,
        "threads": torch.get_num_threads(),
    }


def run_devinterp(weights: Path, data: Path, args, n_beta: float) -> dict | None:
    if not PEER_PYTHON.exists():
        print(f"devinterp venv missing ({PEER_PYTHON}); see this file's docstring. Skipped.")
        return None
    command = [
        str(PEER_PYTHON),
        str(DRIVER),
        "--threads",
        str(args.threads),
        "llc",
        "--weights",
        str(weights),
        "--data",
        str(data),
        "--p",
        str(P),
        "--d-model",
        str(D_MODEL),
        "--n-heads",
        str(N_HEADS),
        "--d-mlp",
        str(D_MLP),
        "--lr",
        str(args.lr),
        "--n-beta",
        str(n_beta),
        "--localization",
        str(args.localization),
        "--chains",
        str(args.chains),
        "--draws",
        str(args.draws),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
    ]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-3000:])
        raise SystemExit(f"devinterp driver failed ({out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--localization", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per side")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from safetensors.torch import save_file

    model, tokens, labels = trained_model(args.seed)
    n = len(labels)
    n_beta = n / math.log(n)
    print(
        f"settings: lr {args.lr:g}, nβ {n_beta:.2f} (n / log n, n = {n}), localization "
        f"{args.localization:g}, {args.chains} chains x {args.draws} draws, batch "
        f"{args.batch_size}, no burn-in, {args.threads} thread(s)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        weights, data = Path(tmp) / "model.safetensors", Path(tmp) / "data.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        save_file({"tokens": tokens.contiguous(), "labels": labels.contiguous()}, str(data))
        ours, theirs = [], []
        for _ in range(args.repeats):  # interleaved, so background load hits both alike
            ours.append(run_interplab(model, tokens, labels, args, n_beta))
            peer = run_devinterp(weights, data, args, n_beta)
            if peer is not None:
                theirs.append(peer)

    def best(runs: list[dict]) -> dict:
        return max(runs, key=lambda r: r["steps_per_s"])

    rows = [best(ours)] + ([best(theirs)] if theirs else [])
    print(
        f"\n{'library':<10} {'LLC mean':>9} {'std':>7} {'init loss':>10} "
        f"{'steps/s':>9} {'steps/CPU-s':>12}"
    )
    for r in rows:
        print(
            f"{r['library']:<10} {r['llc_mean']:>9.3f} {r['llc_std']:>7.3f} "
            f"{r['init_loss']:>10.5f} {r['steps_per_s']:>9.1f} {r['steps_per_cpu_s']:>12.1f}"
        )
    summary = {"settings": vars(args) | {"n_beta": n_beta, "n": n}, "interplab": ours}
    if theirs:
        a, b = rows
        se = math.sqrt((a["llc_std"] ** 2 + b["llc_std"] ** 2) / args.chains)
        z = (a["llc_mean"] - b["llc_mean"]) / se if se > 0 else math.inf
        print(
            f"\nthroughput interplab / devinterp: {a['steps_per_s'] / b['steps_per_s']:.2f}x "
            f"wall, {a['steps_per_cpu_s'] / b['steps_per_cpu_s']:.2f}x per CPU-second"
        )
        print(
            f"estimates: {a['llc_mean']:.3f} vs {b['llc_mean']:.3f}, difference "
            f"{a['llc_mean'] - b['llc_mean']:+.3f} = {z:+.2f} combined standard errors "
            f"({'MATCH' if abs(z) < 3 else 'MISMATCH'} at 3 SE); init loss "
            f"{a['init_loss']:.6f} vs {b['init_loss']:.6f}"
        )
        summary |= {
            "devinterp": theirs,
            "ratio_wall": a["steps_per_s"] / b["steps_per_s"],
            "ratio_cpu": a["steps_per_cpu_s"] / b["steps_per_cpu_s"],
            "z": z,
        }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
