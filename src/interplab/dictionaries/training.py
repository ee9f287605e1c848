"""Train several dictionaries on one stream of activation batches.

One pass over the data trains a whole sweep (widths, k, variants) at once: every batch is
fed to every dictionary, each with its own Adam optimizer. A step is

    get batch -> check it -> forward + backward each dictionary -> agree that all is finite
    -> average gradients over ranks -> constrain decoder -> Adam step -> update dead counters
    -> maybe log -> maybe checkpoint

Data: `batches` yields tensors `x [..., d_in]` or pairs `(x, y)` (transcoders) of any size;
they are flattened to tokens and re-cut into batches of exactly `batch_size / world_size`
rows. With `normalize_activations="expected_average_only_in"` inputs (and targets) are
scaled so their mean squared norm is d_in (d_out), as in Anthropic's April 2024 update; the
scale comes from the first batch and is folded back into the weights at the end, so the
returned dictionaries work on raw activations (their decoder rows then have norm 1/scale).

Distributed: under an initialised `torch.distributed` process group (e.g. `torchrun ... -m
interplab train-sae`, which joins it with `distributed.launch`) each rank reads its own
shard (its own `batches`; `distributed.rank_shard` splits a cached store), gradients are
averaged before each step, dead-latent counters and BatchTopK thresholds are synchronised,
and rank 0 logs and saves (checkpoints go to a path every rank must see). For losses that are
means over tokens of per-token terms this equals single-process training on the
concatenated batches: ReLU, TopK (incl. AuxK, whose dead mask is global), Matryoshka,
JumpReLU, Gated and their transcoders. BatchTopK is not equivalent: its top k * batch is
taken over each rank's local batch.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from interplab.dictionaries.base import Dictionary
from interplab.dictionaries.build import build_dictionary
from interplab.dictionaries.configs import DictionaryConfig, SAEConfig, Transcoder, describe
from interplab.dictionaries.distributed import (
    World,
    all_reduce_,
    average_float_buffers_,
    average_gradients_,
    barrier,
    broadcast_module_,
    current_world,
    gather_rows,
)
from interplab.errors import InterplabError

Normalization = Literal["none", "expected_average_only_in"]
CHECKPOINT_FILE = "checkpoint.pt"


class RunLike(Protocol):
    """What the trainer needs from a run (`interplab.runs.Run` provides it)."""

    def log(self, step: int, **metrics: float) -> None: ...

    def path(self, name: str) -> Path: ...


@dataclass
class TrainConfig:
    """Optimisation settings shared by every dictionary of a sweep."""

    batch_size: int = 4096
    """Tokens per optimizer step, summed over all ranks."""
    total_tokens: int = 50_000_000
    """Training length; the learning-rate schedule is laid out over total_tokens // batch_size
    steps. Training stops early (with a warning in the log) if the batches run out."""
    lr: float | None = None
    """Adam learning rate. None picks 2e-4 / sqrt(d_sae / 2^14) per dictionary, the width
    scaling Gao et al. (2024) fit for TopK SAEs (2e-4 at 16k latents, larger when narrower)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam (beta1, beta2)."""
    adam_eps: float = 6.25e-10
    """Adam epsilon (Gao et al. 2024 use 6.25e-10: with small gradients 1e-8 damps updates)."""
    lr_warmup_steps: int = 1000
    """Linear learning-rate warmup, capped at 5% of the steps so short runs still train."""
    lr_decay_fraction: float = 0.2
    """Linear decay of the learning rate to 0 over this final fraction of the steps."""
    sparsity_warmup_fraction: float = 0.05
    """Linear warmup of the sparsity coefficient (L1 / L0) over this first fraction of the
    steps (Anthropic, April 2024 update)."""
    max_grad_norm: float | None = None
    """Clip each dictionary's gradient norm to this value; None = no clipping."""
    normalize_activations: Normalization = "expected_average_only_in"
    """"expected_average_only_in" scales inputs (and targets) so E||x||^2 = d_in, estimated on
    the first batch and folded into the weights at the end; "none" trains on raw values."""
    dead_tokens_threshold: int = 10_000_000
    """A latent that has not fired for this many tokens is dead: it is counted in
    `dead_fraction` and trained by the AuxK loss (TopK family). Gao et al. use 10M."""
    log_every: int = 100
    """Steps between metric logs (averaged over the steps since the last log)."""
    checkpoint_every: int | None = 1000
    """Steps between checkpoints (also written at the end); None = only at the end."""
    checkpoint_dir: str | None = None
    """Folder for `checkpoint.pt` when no run is given; None and no run = no checkpoints."""
    resume: bool = True
    """Continue from an existing checkpoint (the batch source is replayed from its start and
    the batches already trained on are skipped)."""
    seed: int = 0
    """Seed for initialisation (torch.manual_seed before the dictionaries are built)."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""
    autocast: bool = True
    """On CUDA, run forward passes under bfloat16 autocast (sparse kernels stay float32)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "total_tokens", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InterplabError(f"{name} must be a positive integer, got {value!r}.")
        if self.total_tokens < self.batch_size:
            raise InterplabError(
                f"total_tokens={self.total_tokens} is less than one batch (batch_size={self.batch_size})."
            )
        if self.lr is not None and not self.lr > 0:
            raise InterplabError(f"lr must be > 0 or None, got {self.lr!r}.")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise InterplabError(
                f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}."
            )
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        if self.lr_warmup_steps < 0:
            raise InterplabError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps!r}.")
        for name in ("lr_decay_fraction", "sparsity_warmup_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise InterplabError(f"{name} must be in [0, 1], got {value!r}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InterplabError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}.")
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise InterplabError(
                f"normalize_activations must be 'none' or 'expected_average_only_in', "
                f"got {self.normalize_activations!r}."
            )
        if self.dead_tokens_threshold <= 0:
            raise InterplabError(
                f"dead_tokens_threshold must be > 0, got {self.dead_tokens_threshold!r}."
            )
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise InterplabError(
                f"checkpoint_every must be > 0 or None, got {self.checkpoint_every!r}."
            )

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the schedule."""
        return self.total_tokens // self.batch_size

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at 0-based `step`: linear warmup, flat, linear decay to 0."""
        total = self.total_steps
        warmup = min(self.lr_warmup_steps, max(1, int(0.05 * total))) if self.lr_warmup_steps else 0
        factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
        decay_steps = int(self.lr_decay_fraction * total)
        if decay_steps and step >= total - decay_steps:
            factor *= (total - step) / decay_steps
        return factor

    def sparsity_factor(self, step: int) -> float:
        """Sparsity-coefficient multiplier at 0-based `step` (linear warmup to 1)."""
        warmup = int(self.sparsity_warmup_fraction * self.total_steps)
        return min(1.0, (step + 1) / warmup) if warmup else 1.0

    def default_lr(self, d_sae: int) -> float:
        """The learning rate used for a dictionary of width d_sae."""
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)

    def schedule_fingerprint(self) -> dict[str, Any]:
        """Fields that must match for a checkpoint to be resumed."""
        skip = {"log_every", "checkpoint_every", "checkpoint_dir", "resume", "progress", "autocast"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


# ---------------------------------------------------------------------------- data
def _split_item(item: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(item, Tensor):
        return item, None
    if (
        isinstance(item, tuple | list)
        and len(item) == 2
        and all(isinstance(t, Tensor) for t in item)
    ):
        return item[0], item[1]
    raise InterplabError(
        f"batches must yield tensors x [..., d_in] or pairs (x, y) of tensors, got {type(item).__name__}."
    )


def rebatch(batches: Iterable[Any], rows: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Flatten each yielded tensor (or pair) to [tokens, d] and re-cut the stream into
    batches of exactly `rows` tokens (a final partial batch is dropped)."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    held = 0
    paired: bool | None = None
    for item in batches:
        x, y = _split_item(item)
        if paired is None:
            paired = y is not None
        elif paired != (y is not None):
            raise InterplabError("batches mix plain tensors and (x, y) pairs; yield one kind.")
        x = x.reshape(-1, x.shape[-1])
        if y is not None:
            y = y.reshape(-1, y.shape[-1])
            if y.shape[0] != x.shape[0]:
                raise InterplabError(
                    f"x and y hold different numbers of tokens: {x.shape[0]} and {y.shape[0]}."
                )
            ys.append(y)
        xs.append(x)
        held += x.shape[0]
        while held >= rows:
            x_all = torch.cat(xs) if len(xs) > 1 else xs[0]
            y_all = (torch.cat(ys) if len(ys) > 1 else ys[0]) if paired else None
            yield x_all[:rows], (y_all[:rows] if y_all is not None else None)
            xs = [x_all[rows:]]
            ys = [y_all[rows:]] if y_all is not None else []
            held -= rows


def _mean_sq_norm_scale(sample: Tensor) -> float:
    """sqrt(d / E||v||^2): the factor that makes the mean squared norm equal d."""
    mean_sq = sample.to(torch.float64).pow(2).sum(-1).mean().item()
    if not mean_sq > 0 or not math.isfinite(mean_sq):
        raise InterplabError(
            f"cannot normalise activations whose mean squared norm is {mean_sq}; "
            "use normalize_activations='none' or check the data."
        )
    return math.sqrt(sample.shape[-1] / mean_sq)


# ---------------------------------------------------------------------------- state
@dataclass
class _Member:
    """One dictionary of the sweep and its training state."""

    name: str
    dictionary: Dictionary
    optimizer: torch.optim.Optimizer
    base_lr: float
    tokens_since_fired: Tensor
    sums: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    scale_in: float = 1.0
    scale_out: float = 1.0
    checkpoint_step: int | None = None


def _checkpoint_path(run: RunLike | None, cfg: TrainConfig) -> Path | None:
    if run is not None:
        return Path(run.path("checkpoints")) / CHECKPOINT_FILE
    if cfg.checkpoint_dir is not None:
        return Path(cfg.checkpoint_dir) / CHECKPOINT_FILE
    return None


def _fingerprint(
    configs: Sequence[DictionaryConfig], names: Sequence[str], cfg: TrainConfig, world: World
) -> dict[str, Any]:
    return {
        "configs": [c.to_dict() for c in configs],
        "names": list(names),
        "train": cfg.schedule_fingerprint(),
        "world_size": world.size,
    }


def _save_checkpoint(
    path: Path, members: list[_Member], state: _State, fingerprint: dict[str, Any]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "interplab-dictionary-checkpoint-1",
        "fingerprint": fingerprint,
        "step": state.step,
        "tokens": state.tokens,
        "scale_in": state.scale_in,
        "scale_out": state.scale_out,
        "dictionaries": [m.dictionary.state_dict() for m in members],
        "optimizers": [m.optimizer.state_dict() for m in members],
        "tokens_since_fired": [m.tokens_since_fired for m in members],
        "rng": torch.get_rng_state(),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    state.checkpoint_step = state.step


def _load_checkpoint(
    path: Path, members: list[_Member], state: _State, fingerprint: dict[str, Any]
) -> None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt pickles
        raise InterplabError(
            f"could not read checkpoint {path}: {error}. Delete it or set resume=False."
        ) from error
    if payload.get("fingerprint") != fingerprint:
        raise InterplabError(
            f"checkpoint {path} was written for different dictionaries or training settings; "
            "delete it, point checkpoint_dir elsewhere, or set resume=False."
        )
    try:
        for member, weights, optim, counters in zip(
            members,
            payload["dictionaries"],
            payload["optimizers"],
            payload["tokens_since_fired"],
            strict=True,
        ):
            member.dictionary.load_state_dict(weights)
            member.optimizer.load_state_dict(optim)
            member.tokens_since_fired.copy_(counters)
    except (RuntimeError, ValueError, KeyError) as error:
        raise InterplabError(
            f"checkpoint {path} does not fit these dictionaries (different activation widths?): "
            f"{error}. Delete it or set resume=False."
        ) from error
    state.step, state.tokens = int(payload["step"]), int(payload["tokens"])
    state.scale_in, state.scale_out = float(payload["scale_in"]), float(payload["scale_out"])
    state.checkpoint_step = state.step
    torch.set_rng_state(payload["rng"])


# ---------------------------------------------------------------------------- the loop
def _names(configs: Sequence[DictionaryConfig], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(configs):
            raise InterplabError(f"got {len(names)} names for {len(configs)} dictionaries.")
        if len(set(names)) != len(names):
            raise InterplabError(f"dictionary names must be unique, got {list(names)}.")
        return list(names)
    base = [describe(c) for c in configs]
    return [n if base.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(base)]


def _stop(reason: str, step: int, path: Path | None, state: _State) -> InterplabError:
    if path is not None and state.checkpoint_step is not None:
        kept = f"The last good checkpoint (step {state.checkpoint_step}) was kept at {path}."
    else:
        kept = "No checkpoint had been written, so nothing was saved."
    return InterplabError(f"training stopped at step {step}: {reason}. {kept}")


def _accumulate(member: _Member, out: Any, target: Tensor, dead_fraction: Tensor) -> None:
    with torch.no_grad():
        values = {"loss": out.loss.detach(), "l0": out.l0, "dead_fraction": dead_fraction}
        values.update({k: v.detach() for k, v in out.losses.items()})
        values["fvu_num"] = (out.x_hat.detach() - target).pow(2).sum()
        values["fvu_den"] = (target - target.mean(0)).pow(2).sum()
        values["steps"] = target.new_ones(())
        for key, value in values.items():
            value = value.to(torch.float64)
            member.sums[key] = member.sums[key] + value if key in member.sums else value


def _collect_metrics(members: list[_Member], world: World) -> dict[str, float]:
    keys = [(i, k) for i, m in enumerate(members) for k in sorted(m.sums)]
    if not keys:
        return {}
    flat = torch.stack([members[i].sums[k] for i, k in keys])
    all_reduce_(flat, world)
    totals: dict[int, dict[str, float]] = {}
    for (i, k), v in zip(keys, flat.tolist(), strict=True):
        totals.setdefault(i, {})[k] = v
    metrics: dict[str, float] = {}
    for i, member in enumerate(members):
        t = totals[i]
        steps = max(t.pop("steps"), 1.0)
        num, den = t.pop("fvu_num"), t.pop("fvu_den")
        metrics[f"{member.name}/fvu"] = num / den if den > 0 else float("nan")
        for k, v in t.items():
            # loss terms are averaged over ranks and steps; dead_fraction is identical on ranks
            metrics[f"{member.name}/{k}"] = v / steps / world.size
        member.sums.clear()
    return metrics


def _progress_text(metrics: dict[str, float], members: list[_Member], tok_per_s: float) -> str:
    parts = []
    for m in members[:3]:
        parts.append(
            f"{m.name}: fvu {metrics.get(f'{m.name}/fvu', float('nan')):.3f} "
            f"l0 {metrics.get(f'{m.name}/l0', float('nan')):.1f} "
            f"dead {metrics.get(f'{m.name}/dead_fraction', float('nan')):.2f}"
        )
    if len(members) > 3:
        parts.append(f"+{len(members) - 3} more")
    parts.append(f"{tok_per_s:,.0f} tok/s")
    return " | ".join(parts)


def train_dictionaries(
    configs: Sequence[DictionaryConfig],
    batches: Iterable[Tensor] | Iterable[tuple[Tensor, Tensor]],
    train_config: TrainConfig | None = None,
    *,
    run: RunLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    names: Sequence[str] | None = None,
) -> list[Dictionary]:
    """Train one dictionary per config on a shared stream of activation batches.

    `batches` yields `x [..., d_in]` (autoencoders) or `(x, y)` pairs (transcoders; every
    config then maps x to y); d_in/d_out are read from the first batch. `run` (duck-typed:
    `log(step=..., **metrics)`, `path(name)`) receives metrics every `log_every` steps, holds
    the checkpoint (`checkpoints/checkpoint.pt`) and the final dictionaries
    (`dictionaries/<name>/`, SAELens layout). Returns the trained dictionaries in eval mode,
    working on raw (unnormalised) activations.

    Raises InterplabError on NaN/inf inputs or losses; the last checkpoint is kept.
    """
    cfg = train_config or TrainConfig()
    configs = list(configs)
    if not configs:
        raise InterplabError("train_dictionaries needs at least one dictionary config.")
    for config in configs:
        if not isinstance(config, SAEConfig | Transcoder) or type(config) is SAEConfig:
            raise InterplabError(f"expected dictionary configs, got {config!r}.")
    member_names = _names(configs, names)
    world = current_world()
    if cfg.batch_size % world.size:
        raise InterplabError(
            f"batch_size={cfg.batch_size} must be divisible by the world size {world.size}."
        )
    device = torch.device(device) if device is not None else torch.device("cpu")
    local_rows = cfg.batch_size // world.size
    ckpt_path = _checkpoint_path(run, cfg)
    fingerprint = _fingerprint(configs, member_names, cfg, world)

    stream = rebatch(batches, local_rows)
    try:
        first_x, first_y = next(stream)
    except StopIteration:
        raise InterplabError(
            f"batches yielded fewer than {local_rows} tokens; nothing to train on."
        ) from None
    paired = first_y is not None
    if not paired and any(isinstance(c, Transcoder) for c in configs):
        raise InterplabError("transcoders need (x, y) batches; batches yielded plain tensors.")
    d_in = first_x.shape[-1]
    d_out = first_y.shape[-1] if first_y is not None else None

    torch.manual_seed(cfg.seed)
    members = _build_members(configs, member_names, d_in, d_out, cfg, device, dtype)
    state = _State()
    if _agree_to_resume(cfg.resume and ckpt_path is not None and ckpt_path.exists(), world, device):
        assert ckpt_path is not None
        _load_checkpoint(ckpt_path, members, state, fingerprint)
    else:
        _initialise(members, first_x, first_y, cfg, state, world, device, dtype)

    total = cfg.total_steps
    bar = None
    if cfg.progress and world.is_main and state.step < total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state.step, desc="dictionaries", unit="step")
    use_autocast = cfg.autocast and device.type == "cuda"
    clock = _Clock(time.perf_counter(), state.tokens)
    try:
        if state.step < total:
            for x, y in _remaining_batches(stream, (first_x, first_y), state.step):
                x = x.to(device=device, dtype=dtype, non_blocking=True) * state.scale_in
                if y is not None:
                    y = y.to(device=device, dtype=dtype, non_blocking=True) * state.scale_out
                _train_step(members, x, y, cfg, state, world, ckpt_path, use_autocast)
                state.step += 1
                state.tokens += cfg.batch_size
                if bar is not None:
                    bar.update(1)
                if state.step % cfg.log_every == 0 or state.step == total:
                    _log_metrics(members, state, cfg, world, run, bar, clock)
                if state.step == total:
                    break
                every = cfg.checkpoint_every
                if ckpt_path is not None and every is not None and state.step % every == 0:
                    _checkpoint(ckpt_path, members, state, fingerprint, world)
    finally:
        if bar is not None:
            bar.close()

    if ckpt_path is not None and state.checkpoint_step != state.step:
        _checkpoint(ckpt_path, members, state, fingerprint, world)
    if state.step < total and world.is_main:
        warnings.warn(
            f"the batches ran out after {state.step} of {total} steps ({state.tokens:,} tokens); "
            "the learning-rate schedule did not finish.",
            stacklevel=2,
        )
        if run is not None:
            run.log(step=state.step, stopped_early_at_tokens=float(state.tokens))
    return _finish(members, state, run, world)


def _agree_to_resume(found: bool, world: World, device: torch.device) -> bool:
    """Whether to resume; every rank must see the checkpoint, else ranks would take different
    paths (load vs initialise) and wait on each other's collectives forever."""
    if not world.distributed:
        return found
    votes = torch.tensor([float(found), float(not found)], device=device)
    all_reduce_(votes, world, op="max")
    if bool(votes[0]) and bool(votes[1]):
        raise InterplabError(
            "the checkpoint exists on some ranks only; put checkpoint_dir (or the run folder) "
            "on a filesystem every rank shares, or set resume=False."
        )
    return found


def _build_members(
    configs: list[DictionaryConfig],
    names: list[str],
    d_in: int,
    d_out: int | None,
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> list[_Member]:
    """A fresh dictionary, Adam optimizer and dead-latent counter per config."""
    members = []
    for name, config in zip(names, configs, strict=True):
        d_target = d_out if isinstance(config, Transcoder) else None
        dictionary = build_dictionary(config, d_in, d_target, device=device, dtype=dtype)
        lr = cfg.default_lr(dictionary.d_sae)
        optimizer = torch.optim.Adam(
            dictionary.parameters(), lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps
        )
        counters = torch.zeros(dictionary.d_sae, dtype=torch.int64, device=device)
        members.append(_Member(name, dictionary, optimizer, lr, counters))
    return members


def _remaining_batches(
    stream: Iterator[tuple[Tensor, Tensor | None]],
    first: tuple[Tensor, Tensor | None],
    step: int,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """The batches still to train on: the stream is replayed from its start after a resume,
    so `first` (batch 0) and batches 1 .. step - 1 are skipped."""
    if step == 0:
        yield first
    else:
        for _ in range(step - 1):
            if next(stream, None) is None:
                return
    yield from stream


@dataclass
class _Clock:
    """Time and token count at the last log, for tokens/s."""

    time: float
    tokens: int


def _log_metrics(
    members: list[_Member],
    state: _State,
    cfg: TrainConfig,
    world: World,
    run: RunLike | None,
    bar: Any,
    clock: _Clock,
) -> None:
    """Average the metrics since the last log over steps and ranks; rank 0 reports them."""
    now = time.perf_counter()
    tok_per_s = (state.tokens - clock.tokens) / max(now - clock.time, 1e-9)
    clock.time, clock.tokens = now, state.tokens
    metrics = _collect_metrics(members, world)  # a collective: every rank takes part
    if not world.is_main:
        return
    for m in members:
        metrics[f"{m.name}/lr"] = m.base_lr * cfg.lr_factor(state.step - 1)
    metrics["tokens"] = float(state.tokens)
    metrics["tokens_per_s"] = tok_per_s
    if run is not None:
        run.log(step=state.step, **metrics)
    if bar is not None:
        bar.set_postfix_str(_progress_text(metrics, members, tok_per_s))


def _finish(
    members: list[_Member], state: _State, run: RunLike | None, world: World
) -> list[Dictionary]:
    """Fold the activation scales into the weights, switch to eval mode, save into the run."""
    for m in members:
        is_transcoder = isinstance(m.dictionary.config, Transcoder)
        scale_out = state.scale_out if is_transcoder else state.scale_in
        m.dictionary.fold_activation_scale_(state.scale_in, scale_out)
        m.dictionary.eval()
    if run is not None and world.is_main:
        from interplab.dictionaries.io import save_dictionary

        for m in members:
            metadata = {"interplab_training": {"tokens": state.tokens, "steps": state.step}}
            save_dictionary(
                m.dictionary, Path(run.path("dictionaries")) / m.name, metadata, overwrite=True
            )
    barrier(world)
    return [m.dictionary for m in members]


def _checkpoint(
    path: Path, members: list[_Member], state: _State, fingerprint: dict[str, Any], world: World
) -> None:
    if world.is_main:
        _save_checkpoint(path, members, state, fingerprint)
    else:
        state.checkpoint_step = state.step
    barrier(world)


@torch.no_grad()
def _initialise(
    members: list[_Member],
    first_x: Tensor,
    first_y: Tensor | None,
    cfg: TrainConfig,
    state: _State,
    world: World,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Activation scales and b_dec from the first global batch; identical weights on ranks."""
    sample_x = gather_rows(first_x.to(device=device, dtype=dtype), world)
    sample_y = (
        gather_rows(first_y.to(device=device, dtype=dtype), world) if first_y is not None else None
    )
    if not torch.isfinite(sample_x).all() or (
        sample_y is not None and not torch.isfinite(sample_y).all()
    ):
        raise _stop("the first batch contains NaN or inf values", 0, None, state)
    if cfg.normalize_activations == "expected_average_only_in":
        state.scale_in = _mean_sq_norm_scale(sample_x)
        state.scale_out = _mean_sq_norm_scale(sample_y) if sample_y is not None else state.scale_in
    for m in members:
        if isinstance(m.dictionary.config, Transcoder):
            assert sample_y is not None
            target = sample_y * state.scale_out
        else:
            target = sample_x * state.scale_in
        m.dictionary.init_b_dec_(target)
        broadcast_module_(m.dictionary, world)


def _train_step(
    members: list[_Member],
    x: Tensor,
    y: Tensor | None,
    cfg: TrainConfig,
    state: _State,
    world: World,
    ckpt_path: Path | None,
    use_autocast: bool,
) -> None:
    step = state.step
    bad_input = ~torch.isfinite(x).all()
    if y is not None:
        bad_input = bad_input | ~torch.isfinite(y).all()
    if not world.distributed and bool(bad_input):
        raise _stop("the batch contains NaN or inf values", step, ckpt_path, state)

    sparsity = cfg.sparsity_factor(step)
    bad_loss = torch.zeros((), dtype=torch.bool, device=x.device)
    fired = []
    outputs = []
    for m in members:
        d = m.dictionary
        y_arg = y if isinstance(d.config, Transcoder) else None
        dead = m.tokens_since_fired >= cfg.dead_tokens_threshold
        m.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_autocast):
            out = d(x, y_arg, sparsity_scale=sparsity, dead_mask=dead)
        out.loss.backward()
        bad_loss = bad_loss | ~torch.isfinite(out.loss.detach())
        fired.append(out.fired)
        outputs.append((out, y_arg if y_arg is not None else x, dead))

    # One MAX all-reduce carries both failure flags and every dictionary's fired mask, so all
    # ranks agree on stopping and on which latents are dead.
    signals = torch.cat(
        [torch.stack([bad_input, bad_loss]).to(torch.float32), torch.cat(fired).to(torch.float32)]
    )
    all_reduce_(signals, world, op="max")
    if bool(signals[0]):
        raise _stop("a batch contains NaN or inf values", step, ckpt_path, state)
    if bool(signals[1]):
        which = [
            m.name
            for m, (o, _, _) in zip(members, outputs, strict=True)
            if not torch.isfinite(o.loss)
        ]
        raise _stop(
            f"non-finite loss ({', '.join(which) or 'on another rank'}); lower the learning rate "
            "or check the activations",
            step,
            ckpt_path,
            state,
        )
    fired_split = (signals[2:] > 0).split([m.dictionary.d_sae for m in members])

    average_gradients_([m.dictionary for m in members], world)
    lr_factor = cfg.lr_factor(step)
    for i, m in enumerate(members):
        d = m.dictionary
        d.remove_parallel_grad_()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(d.parameters(), cfg.max_grad_norm)
        for group in m.optimizer.param_groups:
            group["lr"] = m.base_lr * lr_factor
        m.optimizer.step()
        d.normalize_decoder_()
        m.tokens_since_fired.add_(cfg.batch_size).masked_fill_(fired_split[i], 0)
        out, target, dead = outputs[i]
        _accumulate(m, out, target, dead.float().mean())
    average_float_buffers_([m.dictionary for m in members], world)
