"""Dictionary training speed and numerical agreement: interplab vs SAELens (and sparsify).

One run, the same activations for every library (written once to a temporary .npy file):

* training throughput (tokens/s) of a TopK SAE (d_in 256, 4096 latents, k 32, batches of
  4096 tokens, float32) and of a ReLU + L1 SAE, in interplab and in SAELens (its own
  `SAETrainer`, run by `_saelens_driver.py` with the peer venv's python), plus EleutherAI
  sparsify's TopK (`_sparsify_driver.py`) when its venv exists; ratios interplab / peer;
* the fraction of this machine's measured float32 matmul throughput that training reaches
  (per wall second, and per CPU second, which is steadier when other jobs share the machine),
  counting the dense-equivalent training FLOPs per token, 3 x forward (forward + backward):
  TopK 3 * (2 d_in d_sae + 2 k d_in), ReLU 3 * (2 d_in d_sae + 2 d_sae d_in). interplab's
  TopK backward touches only the k selected encoder columns, so this overstates the work
  it does and the fraction is an upper-bound model, the same for every library;
* agreement: a dictionary trained and saved by interplab is loaded by SAELens
  (`SAE.load_from_disk`); its latents and reconstructions must equal interplab's and the
  metrics (SAELens' explained variance calculator, per-token MSE and L0 vs interplab's
  `reconstruction_metrics`) must agree within 1e-5.

Activations: synthetic by default, sums of a few of 2048 random unit directions with
Zipf-distributed frequencies and exponential magnitudes, plus a mean offset and Gaussian
noise, scaled so E||x||^2 = d_in (what both libraries' activation normalisation targets,
so normalisation is off on both sides). `--model DIR --hook H` uses real activations of a
local model instead (collected with `interplab.activations` on storyworld).

Same hyperparameters on every side: lr 4e-4 (interplab's width rule at 4096 latents),
Adam (0.9, 0.999), gradient-norm clipping at 1.0 (SAELens always clips), AuxK weight 1/32,
L1 coefficient 5. Each library keeps its own recipe otherwise (SAELens' TopK rescales
pre-activations by decoder norms; interplab and sparsify renormalise decoder rows).

Peer setup (separate venvs, gitignored):

    python3 -m venv benchmarks/.venv-saelens
    benchmarks/.venv-saelens/bin/pip install torch==2.13.0 sae-lens
    python3 -m venv benchmarks/.venv-sparsify
    benchmarks/.venv-sparsify/bin/pip install torch==2.13.0 eai-sparsify

Run: python benchmarks/bench_dictionaries.py [--tokens 2097152] [--pool 524288] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
PEERS = {
    "sae_lens": (HERE / ".venv-saelens" / "bin" / "python", HERE / "_saelens_driver.py"),
    "sparsify": (HERE / ".venv-sparsify" / "bin" / "python", HERE / "_sparsify_driver.py"),
}
D_IN, D_SAE, K, BATCH, LR, L1 = 256, 4096, 32, 4096, 4e-4, 5.0


# ---------------------------------------------------------------------------- data
def synthetic_activations(
    n: int, d: int = D_IN, n_features: int = 2048, seed: int = 0
) -> np.ndarray:
    """Sparse sums of feature directions plus structure a real residual stream has."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    frequency = 1.0 / torch.arange(1, n_features + 1).float() ** 0.8  # Zipf-like usage
    active = 12
    out = torch.empty(n, d)
    chunk = 65536
    mean = 0.5 * torch.randn(d, generator=g)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        ids = torch.multinomial(frequency, m * active, replacement=True, generator=g).view(
            m, active
        )
        coef = torch.empty(m, active).exponential_(generator=g) * 2.0
        x = torch.nn.functional.embedding_bag(ids, directions, per_sample_weights=coef, mode="sum")
        out[start : start + m] = x + mean + 0.1 * torch.randn(m, d, generator=g)
    out *= (d / out[:65536].pow(2).sum(1).mean()).sqrt()
    return out.numpy()


def real_activations(model_dir: str, hook: str, n: int) -> np.ndarray:
    import interplab as il

    model = il.load_model(model_dir, device="cpu")
    store = il.activations(model, hook, "storyworld", n, progress=False)
    x = store.all()
    return (x * (x.shape[1] / x[:65536].pow(2).sum(1).mean()).sqrt()).numpy()


def batches(acts: np.ndarray, batch_size: int):
    """Consecutive batches, cycling (the same order the peer drivers use)."""
    n = acts.shape[0] // batch_size * batch_size
    while True:
        for start in range(0, n, batch_size):
            yield torch.from_numpy(acts[start : start + batch_size])


# ---------------------------------------------------------------------------- measuring
def matmul_gflops(size: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Best float32 matmul throughput in GFLOP per wall second and per CPU second (the
    second is what one core sustains, so it is comparable with tokens per CPU-second on a
    machine that other jobs share)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        best_wall = min(best_wall, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - cpu_start)
    flops = 2 * size**3
    return flops / best_wall / 1e9, flops / best_cpu / 1e9


def flops_per_token(arch: str, d_in: int = D_IN, d_sae: int = D_SAE, k: int = K) -> float:
    forward = 2 * d_in * d_sae + (2 * k * d_in if arch == "topk" else 2 * d_sae * d_in)
    return 3 * forward


def fvu_of(dictionary, acts: np.ndarray) -> tuple[float, float]:
    from interplab.dictionaries import reconstruction_metrics

    metrics = reconstruction_metrics(dictionary, torch.from_numpy(acts[:65536]))
    return metrics.fvu, metrics.l0


def train_interplab(arch: str, acts: np.ndarray, tokens: int):
    from interplab.dictionaries import ReLU, TopK, TrainConfig, train_dictionaries

    config = (
        TopK(D_SAE, k=K, aux_coefficient=1 / 32)
        if arch == "topk"
        else ReLU(D_SAE, l1_coefficient=L1)
    )
    train = TrainConfig(
        batch_size=BATCH, total_tokens=tokens, lr=LR, normalize_activations="none",
        max_grad_norm=1.0, checkpoint_every=None, progress=False, log_every=10**9,
    )  # fmt: skip
    torch.manual_seed(0)
    start, cpu_start = time.perf_counter(), time.process_time()
    [dictionary] = train_dictionaries([config], batches(acts, BATCH), train)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    done = train.total_steps * BATCH
    fvu, l0 = fvu_of(dictionary, acts)
    result = {"library": "interplab", "arch": arch, "tokens": done, "seconds": seconds}
    result.update(tokens_per_s=done / seconds, tokens_per_cpu_s=done / cpu_seconds)
    result.update(fvu=fvu, l0=l0, threads=torch.get_num_threads())
    return result, dictionary


def run_peer(peer: str, args: list[str], threads: int = 0) -> dict | None:
    python, driver = PEERS[peer]
    if not python.exists() or not driver.exists():
        return None
    proc = subprocess.run(
        [str(python), str(driver), "--threads", str(threads), *args], capture_output=True, text=True, cwd=HERE.parent,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"},
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"library": peer, "error": " | ".join(tail)}
    return json.loads(lines[-1])


def agreement(dictionary, acts_file: str, acts: np.ndarray, workdir: str, rows: int) -> dict | None:
    """Save `dictionary` with interplab, load and run it in SAELens, compare."""
    from interplab.dictionaries import reconstruction_metrics, save_dictionary

    folder = save_dictionary(dictionary, Path(workdir) / f"dict-{dictionary.variant.architecture}")
    prefix = str(Path(workdir) / "saelens")
    peer = run_peer(
        "sae_lens",
        [
            "evaluate",
            "--acts",
            acts_file,
            "--dictionary",
            str(folder),
            "--rows",
            str(rows),
            "--out",
            prefix,
        ],
    )
    if peer is None or "error" in peer:
        return peer
    x = torch.from_numpy(acts[:rows])
    with torch.no_grad():
        latents = dictionary.encode(x)
        x_hat = dictionary.decode(latents)
    ours = reconstruction_metrics(dictionary, x)
    their_latents = torch.from_numpy(np.load(f"{prefix}-latents.npy"))
    their_x_hat = torch.from_numpy(np.load(f"{prefix}-x_hat.npy"))
    return {
        "architecture": peer["architecture"],
        "explained_variance": (ours.explained_variance, peer["explained_variance"]),
        "mse_per_token": (ours.mse * dictionary.d_out, peer["mse_per_token"]),
        "l0": (ours.l0, peer["l0"]),
        "latents_max_abs_diff": float((latents - their_latents).abs().max()),
        "x_hat_max_abs_diff": float((x_hat - their_x_hat).abs().max()),
        "same_active_latents": bool(torch.equal(latents > 0, their_latents > 0)),
    }


# ---------------------------------------------------------------------------- report
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2_097_152, help="training tokens per run")
    parser.add_argument("--pool", type=int, default=524_288, help="distinct activation rows")
    parser.add_argument("--model", help="local model dir for real activations (default synthetic)")
    parser.add_argument("--hook", default="blocks.1.hook_resid_post")
    parser.add_argument("--archs", default="topk,relu")
    parser.add_argument(
        "--saelens-sparse", action="store_true",
        help="also run SAELens' TopK with use_sparse_activations=True (fails on CPU with "
        "torch 2.13 / sae-lens 6.54: its backward hits aten::view on SparseCPU)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads everywhere (0: default)"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokens < BATCH or args.pool < BATCH:
        parser.error(f"--tokens and --pool must be at least one batch ({BATCH}).")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    peak, peak_cpu = matmul_gflops()
    print(
        f"measured float32 matmul peak: {peak:,.1f} GFLOP/s wall, {peak_cpu:,.1f} GFLOP per "
        "CPU-second (2048^3, best of 5)"
    )
    acts = (
        real_activations(args.model, args.hook, args.pool)
        if args.model
        else synthetic_activations(args.pool)
    )
    d_in = acts.shape[1]
    if d_in != D_IN:
        print(f"note: real activations have d_in={d_in}, not {D_IN}")
    results: dict = {
        "peak_gflops": peak,
        "peak_gflops_per_cpu_s": peak_cpu,
        "tokens": args.tokens,
        "pool": args.pool,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as workdir:
        acts_file = str(Path(workdir) / "acts.npy")
        np.save(acts_file, acts)
        print(
            f"activations: {acts.shape[0]:,} x {d_in} rows ({'real' if args.model else 'synthetic'}) in {acts_file}\n"
        )
        trained = {}
        for arch in args.archs.split(","):
            peer_args = ["train", "--acts", acts_file, "--arch", arch, "--d-sae", str(D_SAE), "--k", str(K),
                         "--l1", str(L1), "--lr", str(LR), "--batch-size", str(BATCH), "--tokens", str(args.tokens)]  # fmt: skip
            ours, trained[arch] = train_interplab(arch, acts, args.tokens)
            rows = [ours]
            peer_runs = [("sae_lens", peer_args)]
            if arch == "topk" and args.saelens_sparse:
                peer_runs.append(("sae_lens", [*peer_args, "--sparse"]))
            if arch == "topk":
                peer_runs.append(("sparsify", peer_args))
            for peer, pargs in peer_runs:
                result = run_peer(peer, pargs, args.threads)
                if result is None:
                    print(
                        f"  ({peer} venv not found: see the setup lines in this file's docstring)"
                    )
                    continue
                rows.append(result)
            _print_runs(arch, rows, peak, peak_cpu, d_in)
            results["runs"].extend(rows)
        for arch, dictionary in trained.items():
            check = agreement(dictionary, acts_file, acts, workdir, rows=65536)
            results[f"agreement_{arch}"] = check
            _print_agreement(arch, check)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\n-> {args.json}")
    return 0


def _label(r: dict) -> str:
    return r["library"] + (" (sparse)" if r.get("sparse_activations") else "")


def _print_runs(arch: str, rows: list[dict], peak: float, peak_cpu: float, d_in: int) -> None:
    flops = flops_per_token(arch, d_in)
    print(
        f"{arch}: d_in {d_in}, d_sae {D_SAE}"
        + (f", k {K}" if arch == "topk" else f", l1 {L1}")
        + f", batch {BATCH}"
    )
    print(
        f"  {'library':<20} {'tokens/s':>10} {'% peak':>7} {'tok/cpu-s':>10} {'% peak':>7}"
        f" {'FVU':>7} {'L0':>6} {'interplab/this':>15} {'(cpu)':>6}"
    )
    ours, ours_cpu = rows[0]["tokens_per_s"], rows[0]["tokens_per_cpu_s"]
    for r in rows:
        if "error" in r:
            print(f"  {_label(r):<20} failed: {r['error']}")
            continue
        tps, cpu = r["tokens_per_s"], r["tokens_per_cpu_s"]
        print(
            f"  {_label(r):<20} {tps:>10,.0f} {100 * tps * flops / (peak * 1e9):>6.1f}% {cpu:>10,.0f} "
            f"{100 * cpu * flops / (peak_cpu * 1e9):>6.1f}% "
            f"{r['fvu']:>7.4f} {r['l0']:>6.1f} {ours / tps:>14.2f}x {ours_cpu / cpu:>5.2f}x"
        )
    print()


def _print_agreement(arch: str, check: dict | None) -> None:
    if check is None:
        print(f"agreement ({arch}): skipped, SAELens venv not found")
        return
    if "error" in check:
        print(f"agreement ({arch}): SAELens failed: {check['error']}")
        return
    print(f"agreement ({arch}, interplab file loaded by SAELens as {check['architecture']}):")
    worst = 0.0
    for key in ("explained_variance", "mse_per_token", "l0"):
        ours, theirs = check[key]
        diff = abs(ours - theirs) / max(1.0, abs(theirs))
        worst = max(worst, diff)
        print(f"  {key:<20} interplab {ours:.7f}  SAELens {theirs:.7f}  rel diff {diff:.1e}")
    print(f"  latents max |diff| {check['latents_max_abs_diff']:.2e}, x_hat max |diff| "
          f"{check['x_hat_max_abs_diff']:.2e}, same active set: {check['same_active_latents']}")  # fmt: skip
    print(f"  {'PASS' if worst <= 1e-5 else 'FAIL'} (tolerance 1e-5)\n")


if __name__ == "__main__":
    sys.exit(main())
