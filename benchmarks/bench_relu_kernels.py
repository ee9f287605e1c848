"""ReLU SAE training pass: dense matmuls vs the sparse kernels, as a function of density.

interplab's ReLU dictionary (`interplab.dictionaries.standard`) computes the encoder
pre-activations without autograd, counts the positive ones, and trains the batch through the
sparse kernels when their fraction is at most `ReLU.sparse_max_density`. This script measures
one forward + backward pass (the part of a training step that differs; the Adam step and the
decoder constraint cost the same either way) at fixed densities, in three modes:

* dense: `use_sparse_kernels=False`, plain autograd (six matmuls per forward + backward);
* dense fallback: `sparse_max_density=0`, the dense branch taken above the threshold (it
  reuses the pre-activations of the density check, so five matmuls plus the one already
  done, and forms fewer [batch, d_sae] temporaries than plain autograd);
* sparse: `sparse_max_density=1`, always the sparse kernels.

The density is set by giving every latent the encoder bias that makes it fire on the
requested fraction of a sample of the inputs. Repetitions are interleaved over densities and
modes so background load hits every case alike, and medians of CPU time (and wall time) are
compared. The crossover printed at the end is where the fallback/sparse ratio crosses 1:
the best `sparse_max_density` for this shape on this machine.

Run: python benchmarks/bench_relu_kernels.py [--d-in 256] [--d-sae 4096] [--batch 4096]
     [--reps 5] [--threads 1] [--densities 0.005,0.01,0.02,0.05,0.1,0.25,0.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time

import torch

from interplab.dictionaries import ReLU, build_dictionary

MODES = {
    "dense": {"use_sparse_kernels": False},
    "dense fallback": {"sparse_max_density": 0.0},
    "sparse": {"sparse_max_density": 1.0},
}


def dictionaries_at_density(density: float, d_in: int, d_sae: int, x: torch.Tensor) -> dict:
    """One dictionary per mode, all with the same weights, b_enc set so each latent fires on
    about `density` of the rows of x."""
    torch.manual_seed(0)
    base = build_dictionary(ReLU(d_sae), d_in)
    with torch.no_grad():
        pre = (x - base.b_dec) @ base.W_enc
        base.b_enc.copy_(-torch.quantile(pre[:2048], 1 - density, dim=0))
    out = {}
    for mode, fields in MODES.items():
        d = build_dictionary(dataclasses.replace(base.variant, **fields), d_in)
        d.load_state_dict(base.state_dict())
        out[mode] = d
    return out


def time_pass(dictionary, x: torch.Tensor) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds, measured density) of one forward + backward."""
    dictionary.zero_grad(set_to_none=True)
    cpu, wall = time.process_time(), time.perf_counter()
    out = dictionary(x)
    out.loss.backward()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu, wall, float(out.l0) / dictionary.d_sae


def crossover(densities: list[float], ratios: list[float]) -> float | None:
    """Density where a (dense path / sparse path) time ratio falls through 1, by log-linear
    interpolation between the measured densities; None if it does not."""
    for i in range(len(densities) - 1):
        (d0, r0), (d1, r1) = (densities[i], ratios[i]), (densities[i + 1], ratios[i + 1])
        if r0 >= 1 > r1:
            t = math.log(r0) / (math.log(r0) - math.log(r1))
            return math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--densities", default="0.005,0.01,0.02,0.05,0.1,0.25,0.5")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    densities = sorted(float(d) for d in args.densities.split(","))
    x = torch.randn(args.batch, args.d_in, generator=torch.Generator().manual_seed(1))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32; d_in "
        f"{args.d_in}, d_sae {args.d_sae}, batch {args.batch}; forward + backward, median of "
        f"{args.reps} interleaved repetitions"
    )
    models = {d: dictionaries_at_density(d, args.d_in, args.d_sae, x) for d in densities}
    for models_at in models.values():  # warm-up (allocator, sparse CSR first-use warning)
        for d in models_at.values():
            time_pass(d, x)
    cpu: dict = {(d, m): [] for d in densities for m in MODES}
    wall: dict = {(d, m): [] for d in densities for m in MODES}
    measured: dict = {}
    for _ in range(args.reps):
        for density in densities:
            for mode, d in models[density].items():
                c, w, measured[density] = time_pass(d, x)
                cpu[density, mode].append(c)
                wall[density, mode].append(w)

    print(f"{'density':>8} {'measured':>9}" + "".join(f" {m + ' ms':>16}" for m in MODES), end="")
    print(f" {'dense/sparse':>13} {'fallback/sparse':>16} {'(wall)':>7}")
    ratios = []
    for density in densities:
        med = {m: statistics.median(cpu[density, m]) for m in MODES}
        med_wall = {m: statistics.median(wall[density, m]) for m in MODES}
        line = f"{density:>8.3f} {measured[density]:>9.4f}"
        line += "".join(f" {1e3 * med[m]:>16.1f}" for m in MODES)
        ratios.append(med["dense fallback"] / med["sparse"])
        wall_ratio = med_wall["dense fallback"] / med_wall["sparse"]
        print(
            line
            + f" {med['dense'] / med['sparse']:>12.2f}x {ratios[-1]:>15.2f}x {wall_ratio:>6.2f}x"
        )
    cross = crossover(densities, ratios)
    print(
        "times are median CPU ms; crossover of the dense fallback and the sparse path:",
        f"density ~{cross:.3f}" if cross is not None else "not within the measured densities",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
