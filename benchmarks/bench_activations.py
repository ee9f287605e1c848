"""Activation collection throughput: interplab vs a plain HuggingFace forward pass.

Same model, same token windows, same batches, measured in one run. The plain forward is the
ceiling for collecting the last block's residual stream; interplab must reach >= 90% of it
(it stops the forward after the last needed hook, so for earlier hooks it can exceed it).
Peak memory is measured in a fresh subprocess per case (VmHWM) and compared with the model
size plus the returned activations.

    python benchmarks/bench_activations.py [--windows 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def build(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=8, vocab_size=4096, n_positions=256)
    return GPT2LMHeadModel(config).eval()


def windows(n: int, ctx: int = 128) -> torch.Tensor:
    return torch.randint(0, 4096, (n, ctx), generator=torch.Generator().manual_seed(1))


def time_hf(hf, ids, batch_size, attn):
    hf.config._attn_implementation = attn
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, ids.shape[0], batch_size):
            hf(ids[i : i + batch_size], output_hidden_states=True)
    return ids.numel() / (time.perf_counter() - start)


def time_interplab(model, ids, batch_size, hook):
    import interplab as il

    start = time.perf_counter()
    store = il.activations(
        model,
        hook,
        ids,
        n_tokens=ids.numel(),
        context_size=ids.shape[1],
        batch_size=batch_size,
        include_bos=True,
        progress=False,
    )
    rows = 0
    for batch in store.batches(1 << 30, shuffle=False):
        rows += batch[hook].shape[0]
    assert rows == ids.numel()
    return ids.numel() / (time.perf_counter() - start)


def peak_memory_case(case: str, n_windows: int) -> dict:
    """Run one case in a fresh interpreter and report its peak RSS (MiB)."""
    code = f"""
import json, torch, sys
sys.path.insert(0, 'benchmarks')
from bench_activations import build, windows
import interplab as il
torch.set_num_threads({torch.get_num_threads()})
hf = build(); ids = windows({n_windows})
def hwm():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024
model = il.load_model(hf, device='cpu')
with torch.inference_mode():  # warm-up: imports and allocator pools belong to the baseline
    hf(ids[:1])
    il.activations(model, 'blocks.3.hook_resid_post', ids[:1], n_tokens=ids.shape[1],
                   context_size=ids.shape[1], include_bos=True, progress=False).all()
base = hwm()
if '{case}' == 'hf':
    with torch.inference_mode():
        hs = [hf(ids[i:i+32], output_hidden_states=True).hidden_states[-1] for i in range(0, ids.shape[0], 32)]
    out = torch.cat(hs).reshape(-1, 256)
else:
    store = il.activations(model, 'blocks.3.hook_resid_post', ids, n_tokens=ids.numel(),
                           context_size=ids.shape[1], include_bos=True, progress=False)
    out = store.all()
print(json.dumps(dict(base=base, peak=hwm(), out_mib=out.numel()*4/2**20)))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    import interplab as il

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    hf = build()
    model = il.load_model(hf, device="cpu")
    ids = windows(args.windows)
    cases = {
        "hf forward (eager attention, same module)": lambda: time_hf(
            hf, ids, args.batch_size, "eager"
        ),
        "hf forward (sdpa attention)": lambda: time_hf(hf, ids, args.batch_size, "sdpa"),
        "interplab blocks.3.hook_resid_post (last block)": lambda: time_interplab(
            model, ids, args.batch_size, "blocks.3.hook_resid_post"
        ),
        "interplab blocks.1.hook_resid_post (stops early)": lambda: time_interplab(
            model, ids, args.batch_size, "blocks.1.hook_resid_post"
        ),
    }
    # Round-robin over the cases, best of `repeats`: background load hits every case alike.
    for fn in cases.values():
        fn()  # warm-up
        hf.config._attn_implementation = "eager"
    results = dict.fromkeys(cases, 0.0)
    for _ in range(args.repeats):
        for name, fn in cases.items():
            results[name] = max(results[name], fn())
            hf.config._attn_implementation = "eager"
    reference = results["hf forward (eager attention, same module)"]
    print(
        f"\nmodel: GPT-2 4 layers, d_model 256, vocab 4096; {args.windows} windows x 128 tokens, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads, best of {args.repeats}"
    )
    print(f"{'case':<52} {'tokens/s':>10} {'vs hf eager':>12}")
    for name, tps in results.items():
        print(f"{name:<52} {tps:>10,.0f} {tps / reference:>11.2f}x")

    hf_mem = peak_memory_case("hf", args.windows)
    il_mem = peak_memory_case("interplab", args.windows)
    model_mib = sum(p.numel() for p in hf.parameters()) * 4 / 2**20
    print(
        "\npeak memory (fresh process, MiB above the baseline after loading and one warm-up window):"
    )
    for label, mem in (("hf forward", hf_mem), ("interplab", il_mem)):
        used = mem["peak"] - mem["base"]
        budget = 2 * (model_mib + mem["out_mib"])
        print(
            f"  {label:<12} {used:8.1f}  (model {model_mib:.1f} + activations {mem['out_mib']:.1f}; "
            f"2x budget {budget:.1f}: {'OK' if used <= budget else 'OVER'})"
        )


if __name__ == "__main__":
    main()
