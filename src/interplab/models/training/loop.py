"""The training loop: get the batch of the step, take one AdamW step, log, evaluate,
checkpoint. One `TrainLoop.run` is one session of a run, from the step of the state it is
given (0, or a checkpoint's) to the last step.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor, nn

from interplab.errors import InterplabError
from interplab.models.training.checkpoints import (
    TrainerState,
    latest_checkpoint,
    read_state,
    save_checkpoint,
)
from interplab.models.training.config import TrainLMConfig
from interplab.models.training.data import BatchOrder, TokenWindows, eval_batches
from interplab.models.training.schedule import lr_at

StepCallback = Callable[[int, nn.Module, dict[str, float]], None]
"""`on_step(step, model, metrics)`: called after each optimizer step (1-based count)."""


class StepSchedule(Protocol):
    """Changes to the model that happen at given steps (e.g. removing a LayerNorm).

    They must be a function of the step, so a resumed run can re-apply them."""

    def before_step(self, step: int, model: nn.Module, batch: Int[Tensor, "batch pos"]) -> None:
        """Called before the update of 0-based `step`, with that step's batch."""

    def restore(self, step: int, model: nn.Module) -> None:
        """Called after loading a checkpoint taken after `step` updates: re-apply what
        `before_step` did at earlier steps that the saved weights alone do not carry."""


def lm_loss(model: nn.Module, tokens: Int[Tensor, "batch pos"]) -> Tensor:
    """Mean next-token cross-entropy (nats) of `model` on `tokens` [batch, pos]: position t
    predicts token t + 1, so each window gives pos - 1 predictions."""
    logits_BPV = model(input_ids=tokens, use_cache=False).logits
    return F.cross_entropy(logits_BPV[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


class TrainLoop:
    """One training session: steps from the state's step to config.steps, with the batch
    order of `training.data`, the learning rates of `training.schedule`, logging to `run`
    (anything with `log(step=..., **metrics)`), periodic evaluation and checkpoints."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: TrainLMConfig,
        train: TokenWindows,
        held_out: TokenWindows | None,
        out_dir: Path,
        device: torch.device,
        run: Any | None,
        on_step: StepCallback | None,
        schedule: StepSchedule | None = None,
    ) -> None:
        self.model, self.optimizer, self.config = model, optimizer, config
        self.train, self.out_dir, self.device = train, out_dir, device
        self.logger, self.on_step, self.schedule = run, on_step, schedule
        self.order = BatchOrder(train.n_windows, config.batch_size, config.resolved_data_seed)
        self.eval_data = (
            eval_batches(held_out, config.batch_size, config.eval_batches)
            if held_out is not None
            else []
        )
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.evaluated_at: int | None = None
        """Step of this session's last evaluation."""
        self.bf16 = config.autocast == "bf16" or (
            config.autocast == "auto" and device.type == "cuda"
        )

    def precision(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around a forward pass, or nothing (float32)."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(self, state: TrainerState) -> None:
        """Train until state.step == config.steps, updating `state` in place."""
        from tqdm.auto import tqdm

        config = self.config
        bar = tqdm(
            total=config.steps,
            initial=state.step,
            disable=not config.progress,
            unit="step",
            dynamic_ncols=True,
        )
        self.model.train()
        window_start, window_tokens = time.perf_counter(), 0
        clock = time.perf_counter()
        try:
            while state.step < config.steps:
                lr = lr_at(state.step, config)
                loss, grad_norm = self.step(state.step, lr)
                state.step += 1
                n_tokens = config.batch_size * self.train.width
                state.tokens += n_tokens
                state.pending_losses.append(loss)
                window_tokens += n_tokens
                metrics = {"train_loss": loss, "lr": lr, "grad_norm": grad_norm}
                if state.step % config.log_every == 0 or state.step == config.steps:
                    now = time.perf_counter()
                    tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                    self.log(state, lr, grad_norm, tokens_per_s)
                    bar.set_postfix(
                        loss=f"{state.last_train_loss:.4f}",
                        lr=f"{lr:.2e}",
                        tok_s=f"{tokens_per_s:,.0f}",
                        refresh=False,
                    )
                    window_start, window_tokens = now, 0
                if self.eval_data and _due(state.step, config.eval_every, config.steps):
                    state.last_eval_loss = self.evaluate()
                    self.evaluated_at = state.step
                    metrics["eval_loss"] = state.last_eval_loss
                    if self.logger is not None:
                        self.logger.log(step=state.step, eval_loss=state.last_eval_loss)
                now = time.perf_counter()
                state.seconds, clock = state.seconds + now - clock, now
                if _due(state.step, config.checkpoint_every, config.steps):
                    save_checkpoint(
                        self.out_dir,
                        self.model,
                        self.optimizer,
                        state,
                        keep=config.keep_checkpoints,
                    )
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(state.step, self.model, metrics)
        finally:
            bar.close()

    def step(self, step: int, lr: float) -> tuple[float, float]:
        """One AdamW update on the batch of `step` at learning rate `lr`; returns
        (loss, gradient norm before clipping). Raises before updating if either is not finite."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.train.get(self.order.indices(step)).to(self.device, non_blocking=True)
        if self.schedule is not None:
            self.schedule.before_step(step, self.model, batch)
        with self.precision():
            loss = lm_loss(self.model, batch)
        loss.backward()
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        loss_value = float(loss.detach())
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise self.diverged(step + 1, loss_value, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm

    def log(self, state: TrainerState, lr: float, grad_norm: float, tokens_per_s: float) -> None:
        """Close the log window: its mean loss becomes state.last_train_loss."""
        state.last_train_loss = sum(state.pending_losses) / len(state.pending_losses)
        state.pending_losses = []
        if self.logger is not None:
            self.logger.log(
                step=state.step,
                train_loss=state.last_train_loss,
                lr=lr,
                grad_norm=grad_norm,
                tokens=state.tokens,
                tokens_per_s=tokens_per_s,
            )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token cross-entropy over the held-out batches (token-weighted)."""
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.eval_data:
            batch = batch.to(self.device)
            with self.precision():
                loss = lm_loss(self.model, batch)
            n = batch.shape[0] * (batch.shape[1] - 1)
            total, count = total + float(loss) * n, count + n
        self.model.train()
        return total / count

    def diverged(self, step: int, loss: float, grad_norm: float) -> InterplabError:
        """The error raised when step `step` (1-based) produced a non-finite loss or gradient."""
        latest = latest_checkpoint(self.out_dir)
        where = (
            f"the last good checkpoint is {latest} (step {read_state(latest).step})"
            if latest is not None
            else "no checkpoint was written before it"
        )
        return InterplabError(
            f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; "
            f"stopped before applying the update, and {where}. Lower lr (now peak "
            f"{self.config.lr}), lengthen warmup_steps or tighten grad_clip."
        )


def _due(step: int, every: int | None, last: int) -> bool:
    return step == last or (every is not None and step % every == 0)
