"""Train interplab's model organisms: small GPT-2 / Llama causal LMs on packed token windows.

    from interplab.models.train_lm import LMConfig, TrainLMConfig, train_lm
    result = train_lm(LMConfig(n_layers=2, d_model=128, vocab_size=4096),
                      TrainLMConfig(steps=5000), train_tokens, eval_tokens, "organisms/tiny")

Next-token cross-entropy, AdamW with warmup + cosine decay (`training.schedule`), batches
drawn as a pure function of (seed, step) (`training.data`), checkpoints every
`checkpoint_every` steps that a killed run resumes from with bit-identical results on the
same device (`training.checkpoints`), and a HuggingFace-format output folder
(`config.json`, `model.safetensors`, tokenizer files, `card.json`) that
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interplab.errors import InterplabError
from interplab.models.training.architectures import build_lm, count_parameters
from interplab.models.training.checkpoints import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    remove_checkpoints,
    remove_partial,
    save_pretrained_quietly,
)
from interplab.models.training.config import TRAJECTORY_FIELDS, LMConfig, TrainLMConfig
from interplab.models.training.data import TokenWindows
from interplab.models.training.loop import StepCallback, StepSchedule, TrainLoop, lm_loss
from interplab.models.training.schedule import make_optimizer

__all__ = ["LMConfig", "TrainLMConfig", "TrainResult", "build_lm", "fit_lm", "lm_loss", "train_lm"]


@dataclass
class TrainResult:
    """What a finished `train_lm` run produced."""

    out_dir: Path
    """The HF-format model folder (config.json, model.safetensors, card.json, ...)."""
    final_train_loss: float
    """Mean training loss (nats/token) over the last log window."""
    final_eval_loss: float | None
    """Held-out loss (nats/token) at the end; None without eval tokens."""
    steps: int
    """Optimizer steps of the whole run."""
    tokens: int
    """Training tokens seen (steps x batch_size x window width)."""
    seconds: float
    """Wall time spent training, summed over resumed sessions."""
    resumed_from: int | None = None
    """Step of the checkpoint this call resumed from; None for a fresh start."""


def train_lm(
    model_config: LMConfig,
    train_config: TrainLMConfig,
    train_tokens: Any,
    eval_tokens: Any | None,
    out_dir: str | Path,
    tokenizer: Any | None = None,
    resume: bool = True,
    run: Any | None = None,
    card_extra: dict[str, Any] | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train a `build_lm(model_config)` model on `train_tokens` and save it to `out_dir`.

    `train_tokens` / `eval_tokens`: int token ids as a `[n_windows, width]` tensor, numpy
    array or memmap (width <= n_ctx), or a 1-D stream cut into windows of n_ctx tokens.
    `eval_tokens` may be None (no held-out loss). Every id must be < vocab_size.

    With `resume` and checkpoints in `out_dir/checkpoints`, training continues from the
    newest one (after checking it came from the same configs and data); without `resume`
    those checkpoints are deleted and training starts over. `run` is anything with
    `run.log(step=..., **metrics)` (an `interplab.runs.Run`); it gets train_loss, lr,
    grad_norm, tokens, tokens_per_s every log_every steps and eval_loss at each evaluation.
    `on_step(step, model, metrics)` is called after every step (1-based step count);
    an exception it raises stops training, leaving the checkpoints written so far.
    `card_extra` is merged into card.json (e.g. corpus id and hash).

    A non-finite loss or gradient norm stops training before the update is applied and
    raises an InterplabError naming the step and the last good checkpoint.
    """
    return fit_lm(
        model_config,
        train_config,
        train_tokens,
        eval_tokens,
        out_dir,
        # Called only after fit_lm has validated the arguments.
        init_model=lambda: build_lm(model_config, seed=train_config.seed),
        tokenizer=tokenizer,
        resume=resume,
        run=run,
        card_extra=card_extra,
        on_step=on_step,
    )


def fit_lm(
    model_config: LMConfig,
    train_config: TrainLMConfig,
    train_tokens: Any,
    eval_tokens: Any | None,
    out_dir: str | Path,
    *,
    init_model: Callable[[], nn.Module],
    schedule: StepSchedule | None = None,
    finalize: Callable[[nn.Module], None] | None = None,
    tokenizer: Any | None = None,
    resume: bool = True,
    run: Any | None = None,
    card_extra: dict[str, Any] | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """`train_lm` starting from `init_model()` (called inside the training settings; its
    trainable parameters are the optimizer's), with `schedule` changing the model at given
    steps and `finalize(model)` run before the output folder is written. `model_config`
    describes the model that is saved (card.json, resume checks). Used by fine-tuning
    variants such as `remove_layernorm`; arguments are checked as in `train_lm`.
    """
    _check_arguments(model_config, train_config, tokenizer, run, card_extra, on_step)
    out_dir = Path(out_dir)
    device = _resolve_device(train_config.device)
    train = TokenWindows(
        train_tokens, model_config.n_ctx, model_config.vocab_size, name="train_tokens"
    )
    held_out = None
    if eval_tokens is not None:
        held_out = TokenWindows(
            eval_tokens, model_config.n_ctx, model_config.vocab_size, name="eval_tokens"
        )

    with _torch_settings(train_config, device):
        model = init_model().to(device)
        _set_special_tokens(model, tokenizer)
        optimizer = make_optimizer(model, train_config)
        state, resumed_from = _initial_state(
            out_dir, resume, model, optimizer, model_config, train_config, train
        )
        if schedule is not None and resumed_from is not None:
            schedule.restore(state.step, model)
        loop = TrainLoop(
            model, optimizer, train_config, train, held_out, out_dir, device, run, on_step, schedule
        )
        loop.run(state)
        final_eval = None
        if held_out is not None:
            # The loop evaluates at the last step; a call that found the run already
            # finished (nothing to train) evaluates the loaded model here.
            final_eval = (
                state.last_eval_loss if loop.evaluated_at == state.step else loop.evaluate()
            )

    assert state.last_train_loss is not None  # the last step always closes a log window
    result = TrainResult(
        out_dir=out_dir,
        final_train_loss=state.last_train_loss,
        final_eval_loss=final_eval,
        steps=state.step,
        tokens=state.tokens,
        seconds=state.seconds,
        resumed_from=resumed_from,
    )
    if finalize is not None:
        finalize(model)
    card = _card(model, model_config, train_config, result, device, held_out, card_extra)
    _write_outputs(out_dir, model, tokenizer, card)
    return result


def _initial_state(
    out_dir: Path,
    resume: bool,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_config: LMConfig,
    train_config: TrainLMConfig,
    train: TokenWindows,
) -> tuple[TrainerState, int | None]:
    """A fresh state, or the newest checkpoint's (loaded into model and optimizer)."""
    fresh = TrainerState(
        step=0,
        tokens=0,
        seconds=0.0,
        model_config=_jsonable(asdict(model_config)),
        train_config=_jsonable(asdict(train_config)),
        data_fingerprint=train.fingerprint(),
    )
    remove_partial(out_dir)
    latest = latest_checkpoint(out_dir)
    if latest is None:
        return fresh, None
    if not resume:
        remove_checkpoints(out_dir)
        return fresh, None
    saved = read_state(latest)
    _check_same_run(latest, saved, fresh)
    state = load_checkpoint(latest, model, optimizer)
    # Non-trajectory settings (device, cadence, ...) may change between sessions.
    state.train_config = fresh.train_config
    return state, state.step


def _check_same_run(folder: Path, saved: TrainerState, fresh: TrainerState) -> None:
    differences = [
        f"model_config.{k}: checkpoint {saved.model_config.get(k)!r}, now {v!r}"
        for k, v in fresh.model_config.items()
        if saved.model_config.get(k) != v
    ]
    differences += [
        f"train_config.{k}: checkpoint {saved.train_config.get(k)!r}, now {fresh.train_config[k]!r}"
        for k in TRAJECTORY_FIELDS
        if saved.train_config.get(k) != fresh.train_config[k]
    ]
    if saved.data_fingerprint != fresh.data_fingerprint:
        differences.append("train_tokens differ from the checkpoint's (shape or content)")
    if differences:
        raise InterplabError(
            f"cannot resume from {folder}: it belongs to a different run ("
            + "; ".join(differences)
            + "). Pass resume=False to start over (deletes its checkpoints) or use another out_dir."
        )


def _check_arguments(
    model_config: Any,
    train_config: Any,
    tokenizer: Any,
    run: Any,
    card_extra: Any,
    on_step: Any,
) -> None:
    if not isinstance(model_config, LMConfig):
        raise InterplabError(
            f"model_config must be an LMConfig, got {type(model_config).__name__}."
        )
    if not isinstance(train_config, TrainLMConfig):
        raise InterplabError(
            f"train_config must be a TrainLMConfig, got {type(train_config).__name__}."
        )
    if tokenizer is not None:
        if not callable(getattr(tokenizer, "save_pretrained", None)):
            raise InterplabError(
                f"tokenizer must be a HF tokenizer (PreTrainedTokenizerFast), got {type(tokenizer).__name__}."
            )
        if len(tokenizer) > model_config.vocab_size:
            raise InterplabError(
                f"tokenizer has {len(tokenizer)} tokens but LMConfig.vocab_size is "
                f"{model_config.vocab_size}; expected vocab_size >= len(tokenizer)."
            )
    if run is not None and not callable(getattr(run, "log", None)):
        raise InterplabError(
            f"run must have a log(step=..., **metrics) method, got {type(run).__name__}."
        )
    if on_step is not None and not callable(on_step):
        raise InterplabError(f"on_step must be callable, got {type(on_step).__name__}.")
    if card_extra is not None:
        if not isinstance(card_extra, dict):
            raise InterplabError(f"card_extra must be a dict, got {type(card_extra).__name__}.")
        # "description" has a generated default that card_extra may replace.
        clash = sorted(set(card_extra) & set(_CARD_KEYS) - {"description"})
        if clash:
            raise InterplabError(
                f"card_extra keys {clash} clash with keys the trainer writes to card.json."
            )
        try:
            json.dumps(card_extra)
        except TypeError as error:
            raise InterplabError(f"card_extra must be JSON-serialisable: {error}.") from None


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InterplabError(
            f"TrainLMConfig.device={device!r} but CUDA is not available; use 'cpu' or 'auto'."
        )
    return resolved


@contextlib.contextmanager
def _torch_settings(config: TrainLMConfig, device: torch.device) -> Iterator[None]:
    """Thread count and deterministic algorithms for the duration of training, restored after."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(config.n_threads or _usable_cpus())
    if config.deterministic:
        if device.type == "cuda":
            # cuBLAS needs this to be deterministic; it only takes effect if set before
            # the first cuBLAS call of the process.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # On CUDA some kernels have no deterministic version; warn rather than fail there.
        torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which respects container limits
    that os.cpu_count() ignores)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def _set_special_tokens(model: nn.Module, tokenizer: Any | None) -> None:
    """Copy the tokenizer's BOS/EOS/PAD ids into the model and generation configs (HF's
    defaults, such as GPT-2's 50256, are outside a small vocabulary)."""
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        setattr(model.config, attr, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, attr, value)


_CARD_KEYS = (
    "description", "architecture", "hf_architecture", "n_layers", "d_model", "n_heads", "d_head", "d_mlp",
    "n_ctx", "vocab_size", "attn_only", "layer_norm", "positional", "tie_embeddings",
    "n_params", "n_params_trainable", "steps", "tokens_seen", "seed", "data_seed",
    "final_train_loss", "final_eval_loss", "eval_tokens", "training_seconds",
    "tokens_per_second", "device", "torch_version", "transformers_version",
    "interplab_version", "created_utc", "model_config", "train_config",
)  # fmt: skip


def _card(
    model: nn.Module,
    model_config: LMConfig,
    train_config: TrainLMConfig,
    result: TrainResult,
    device: torch.device,
    held_out: TokenWindows | None,
    card_extra: dict[str, Any] | None,
) -> dict[str, Any]:
    import transformers

    import interplab

    n_params, n_trainable = count_parameters(model)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    eval_tokens = 0
    if held_out is not None:
        eval_tokens = (
            min(held_out.n_windows, train_config.batch_size * train_config.eval_batches)
            * held_out.width
        )
    card = {
        "description": _describe(model_config, result),
        "architecture": model_config.architecture,
        "hf_architecture": type(model).__name__,
        "n_layers": model_config.n_layers,
        "d_model": model_config.d_model,
        "n_heads": model_config.n_heads,
        "d_head": model_config.d_head,
        "d_mlp": None if model_config.attn_only else model_config.d_mlp,
        "n_ctx": model_config.n_ctx,
        "vocab_size": model_config.vocab_size,
        "attn_only": model_config.attn_only,
        "layer_norm": model_config.layer_norm,
        "positional": model_config.positional,
        "tie_embeddings": model_config.tie_embeddings,
        "n_params": n_params,
        "n_params_trainable": n_trainable,
        "steps": result.steps,
        "tokens_seen": result.tokens,
        "seed": train_config.seed,
        "data_seed": train_config.resolved_data_seed,
        "final_train_loss": result.final_train_loss,
        "final_eval_loss": result.final_eval_loss,
        "eval_tokens": eval_tokens,
        "training_seconds": round(result.seconds, 3),
        "tokens_per_second": round(result.tokens / result.seconds, 1)
        if result.seconds > 0
        else None,
        "device": f"{device} ({device_name})",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "interplab_version": interplab.__version__,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model_config": _jsonable(asdict(model_config)),
        "train_config": _jsonable(asdict(train_config)),
    }
    assert set(card) == set(_CARD_KEYS)
    return {**card, **(card_extra or {})}


def _describe(config: LMConfig, result: TrainResult) -> str:
    """One line for `interplab models`, e.g. 'GPT-2, 2 layers, d_model 128, attn-only, 5000 steps'."""
    parts = [
        {"gpt2": "GPT-2", "llama": "Llama"}[config.architecture],
        f"{config.n_layers} layer{'s' if config.n_layers > 1 else ''}",
        f"d_model {config.d_model}",
        f"{config.n_heads} heads",
    ]
    parts += ["attn-only"] if config.attn_only else []
    parts += [] if config.layer_norm else ["no LayerNorm"]
    parts.append(f"{result.steps} steps ({result.tokens:,} tokens)")
    return ", ".join(parts)


def _write_outputs(
    out_dir: Path, model: nn.Module, tokenizer: Any | None, card: dict[str, Any]
) -> None:
    """Write the HF folder into a temporary sibling, then move each file into `out_dir`
    (each replacement is atomic; checkpoints and other files in out_dir are left alone)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-final-", dir=out_dir))
    try:
        save_pretrained_quietly(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        for path in sorted(tmp.iterdir()):
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    """Tuples -> lists, so a config dict equals its JSON round trip."""
    return json.loads(json.dumps(value))
