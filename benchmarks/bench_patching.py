"""Activation patching speed: interplab's batched sweep vs TransformerLens 4's patching.

All heads by position (`attn.hook_z`, one site per layer x head x position), denoising
(clean -> corrupted), logit difference at the last position. Same model, same prompts, same
metric, one run each; the script checks the two [layer, head, pos] results agree and prints
seconds, patched forward passes per second, and the speed ratio.

TransformerLens's `get_act_patch_attn_head_out_by_pos` runs on a TransformerBridge: one
forward pass of the whole prompt batch per site. It is run under `torch.inference_mode()`,
as a user would, so autograd bookkeeping does not count against it.

    python benchmarks/bench_patching.py [--vocab 50257] [--prompts 16] [--ctx 20]
        [--corruption all|two] [--threads 1] [--max-batch 256]

`--corruption all` draws every corrupted token afresh (no site can be skipped as unchanged);
`two` changes two positions (IOI-like), so sites before the first change are skipped exactly.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def build_model(vocab: int, seed: int = 0):
    """A 4-layer, d_model 256, 8-head GPT-2 built from its config (random weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import interplab as il

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=4, n_embd=256, n_head=8, vocab_size=vocab, n_positions=128, n_ctx=128
    )
    config.bos_token_id = config.eos_token_id = 0
    hf = GPT2LMHeadModel(config).eval()
    return il.load_model(hf, device="cpu")


def build_task(n: int, ctx: int, vocab: int, corruption: str, seed: int = 1):
    from interplab.data.tasks import TaskDataset

    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, vocab, (n, ctx), generator=g)
    if corruption == "all":
        corrupted = torch.randint(1, vocab, (n, ctx), generator=g)
    else:
        corrupted = clean.clone()
        for pos in (ctx // 4, ctx // 2):
            corrupted[:, pos] = torch.randint(1, vocab, (n,), generator=g)
    return TaskDataset(
        name="bench",
        prompts=[""] * n,
        corrupted_prompts=[""] * n,
        clean_tokens=clean,
        corrupted_tokens=corrupted,
        answers=torch.randint(1, vocab, (n,), generator=g),
        wrong_answers=torch.randint(1, vocab, (n,), generator=g),
        answer_pos=torch.full((n,), ctx - 1),
        metadata=[{}] * n,
    )


def run_transformer_lens(model, task):
    from transformer_lens import patching

    from interplab.circuits import logit_diff

    def metric(logits):
        return logit_diff(logits, task.answers, task.wrong_answers, task.answer_pos).mean()

    with torch.inference_mode():
        start, cpu = time.perf_counter(), time.process_time()
        _, cache = model.run_with_cache(task.clean_tokens)
        result = patching.get_act_patch_attn_head_out_by_pos(
            model, task.corrupted_tokens, cache, metric
        )  # [layer, pos, head]
        seconds = (time.perf_counter() - start, time.process_time() - cpu)
    return result.permute(0, 2, 1), seconds


def run_interplab(model, task, max_batch: int):
    from interplab import circuits

    start, cpu = time.perf_counter(), time.process_time()
    result = circuits.patch_heads(
        model, task, "z", by_pos=True, normalize=False, max_batch=max_batch
    )
    return result.values, (time.perf_counter() - start, time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=20)
    parser.add_argument("--corruption", choices=["all", "two"], default="all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    model = build_model(args.vocab)
    task = build_task(args.prompts, args.ctx, args.vocab, args.corruption)
    cfg = model.cfg
    sites = cfg.n_layers * cfg.n_heads * args.ctx
    print(
        f"model: GPT-2 {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
        f"vocab {args.vocab}; {args.prompts} prompts x {args.ctx} tokens; corruption="
        f"{args.corruption}; {sites} sites (layer x head x pos); {args.threads} CPU thread(s)"
    )
    run_interplab(model, build_task(2, 4, args.vocab, "all"), args.max_batch)  # warm-up
    ours, ours_s = run_interplab(model, task, args.max_batch)
    theirs, theirs_s = run_transformer_lens(model, task)
    diff = (ours - theirs).abs().max().item()
    print(f"max |interplab - TransformerLens| = {diff:.2e} (must be <= 1e-5)")
    tokens = sites * task.clean_tokens.numel()
    for label, (wall, cpu) in (("TransformerLens 4", theirs_s), ("interplab batched", ours_s)):
        print(
            f"{label}: {wall:8.2f} s wall, {cpu:8.2f} s CPU  ({sites / wall:6.1f} patched "
            f"runs/s, {tokens / wall:9.0f} tokens/s wall)"
        )
    print(
        f"speed-up: {theirs_s[0] / ours_s[0]:.2f}x wall-clock, {theirs_s[1] / ours_s[1]:.2f}x CPU "
        "time (CPU time is the fairer figure on a shared machine)"
    )
    if diff > 1e-5:
        raise SystemExit("results differ")


if __name__ == "__main__":
    main()
