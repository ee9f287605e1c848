"""Attribution patching (AtP, AtP*) vs exact activation patching on a bundled organism.

For each site grid (head outputs, head keys, by head and by head x position; MLP neurons),
times interplab's exact batched patching and its AtP and AtP* estimates on the same prompts,
and scores the estimates against the exact effects: Pearson correlation of signed effects,
and the top-10 false-negative rate (share of the 10 largest exact |effects| missing from the
10 largest estimates; Kramar et al. 2024). Times are the best of `--repeats` runs.

    python benchmarks/bench_attribution.py [--model storyworld-4l] [--prompts 32]
        [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

GRIDS = [
    ("head outputs", "z", ("head",)),
    ("head outputs x position", "z", ("head", "pos")),
    ("head keys", "k", ("head",)),
    ("head keys x position", "k", ("head", "pos")),
    ("MLP neurons", "mlp_post", ("neuron",)),
]


def best_of(repeats: int, fn):
    """(result of the last run, fastest wall-clock seconds)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="storyworld-4l")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    import interplab as il
    from interplab import circuits as C
    from interplab.data.tasks import ioi

    model = il.load_model(args.model, device="cpu")
    task = ioi(model, n=args.prompts, seed=0)
    print(
        f"{args.model}, IOI held-out, {len(task)} prompts x {task.clean_tokens.shape[1]} tokens, "
        f"{args.threads} thread(s), best of {args.repeats}"
    )
    header = (
        "| sites | exact patching | AtP | AtP* | Pearson AtP / AtP* "
        "| top-10 false negatives AtP / AtP* |"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|")
    for label, component, over in GRIDS:
        exact, t_exact = best_of(
            args.repeats, lambda c=component, o=over: C.patch(model, task, c, o)
        )
        atp, t_atp = best_of(
            args.repeats, lambda c=component, o=over: C.attribute(model, task, c, o, method="atp")
        )
        star, t_star = best_of(
            args.repeats, lambda c=component, o=over: C.attribute(model, task, c, o, method="atp*")
        )
        k = min(10, exact.values.numel())
        first, second = C.compare_to_patching(atp, exact, k), C.compare_to_patching(star, exact, k)
        print(
            f"| {label} ({exact.values.numel()}) | {t_exact:.2f} s | {t_atp:.2f} s | "
            f"{t_star:.2f} s | {first.pearson:.3f} / {second.pearson:.3f} | "
            f"{first.false_negative_rate:.1f} / {second.false_negative_rate:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
