"""Checkpoint folders of the trainer: written atomically, read without unpickling.

`out_dir/checkpoints/step-000500/` holds
- `config.json` + `model.safetensors`: the model at that step, a HuggingFace model folder in
  its own right (so training dynamics can be studied checkpoint by checkpoint);
- `optimizer.safetensors`: AdamW's per-parameter state (`state.<index>.<name>`); the
  hyperparameters of its groups come from the config, and the learning rate is a function
  of the step, so the step number is the whole scheduler state;
- `rng.safetensors`: torch's CPU (and CUDA) generator states;
- `trainer_state.json`: step, tokens seen, time spent, the loss window in progress, the
  configs and a fingerprint of the training data. Written last: a folder without it is
  incomplete and ignored.

A checkpoint is assembled in a temporary sibling folder and renamed into place, so a
killed run never leaves a half-written `step-*` folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from interplab.errors import InterplabError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class TrainerState:
    """Everything besides weights and optimizer moments that a resumed run needs."""

    step: int
    """Optimizer updates done."""
    tokens: int
    """Tokens trained on so far (windows x width)."""
    seconds: float
    """Wall time spent training so far (replayed steps counted once)."""
    pending_losses: list[float] = field(default_factory=list)
    """Training losses of the log window in progress."""
    last_train_loss: float | None = None
    """Mean training loss of the last completed log window."""
    last_eval_loss: float | None = None
    """Held-out loss at the last evaluation."""
    model_config: dict[str, Any] = field(default_factory=dict)
    """The LMConfig, as a dict."""
    train_config: dict[str, Any] = field(default_factory=dict)
    """The TrainLMConfig, as a dict."""
    data_fingerprint: str = ""
    """`TokenWindows.fingerprint()` of the training data."""


def checkpoint_root(out_dir: Path) -> Path:
    """The folder that holds the `step-*` checkpoints of a run."""
    return Path(out_dir) / CHECKPOINTS


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def remove_checkpoints(out_dir: Path) -> None:
    """Delete every checkpoint of a run (used when a run is restarted from scratch)."""
    shutil.rmtree(checkpoint_root(out_dir), ignore_errors=True)


def remove_partial(out_dir: Path) -> None:
    """Delete temporary folders left by a run killed while writing a checkpoint."""
    root = checkpoint_root(out_dir)
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def save_pretrained_quietly(model: nn.Module, folder: Path) -> None:
    """`model.save_pretrained(folder)` (safetensors) without HF's per-save progress bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    *,
    keep: int,
) -> Path:
    """Write the checkpoint of `state.step` atomically and keep only the newest `keep`."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_pretrained_quietly(model, tmp)
        save_file(_optimizer_tensors(optimizer), tmp / "optimizer.safetensors")
        save_file(_rng_tensors(), tmp / "rng.safetensors")
        payload = {"format": FORMAT_VERSION, **asdict(state)}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2))
        if final.exists():  # a rerun rewriting the same step: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{final.name}-", dir=root))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, path in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def read_state(folder: Path) -> TrainerState:
    """The trainer state stored in a checkpoint folder."""
    payload = json.loads((Path(folder) / STATE_FILE).read_text())
    version = payload.pop("format", None)
    if version != FORMAT_VERSION:
        raise InterplabError(
            f"checkpoint {folder} has format {version!r}; this interplab reads format "
            f"{FORMAT_VERSION}."
        )
    return TrainerState(**payload)


def load_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> TrainerState:
    """Load weights, optimizer state and RNG states from `folder` into `model` and
    `optimizer` (built exactly as for the run that wrote it); returns the trainer state."""
    folder = Path(folder)
    state = read_state(folder)
    _load_weights(model, load_file(folder / "model.safetensors"), folder)
    _load_optimizer(optimizer, load_file(folder / "optimizer.safetensors"))
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return state


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Load `folder/model.safetensors` (an HF folder of the same shape) into `model`."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise InterplabError(f"{folder} has no model.safetensors to load weights from.")
    _load_weights(model, load_file(path), Path(folder))


def _load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # HF saves one name of a tied pair (the embedding); the other shares its tensor.
    names_of: dict[int, set[str]] = defaultdict(set)
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of[id(param)].add(name)
    by_name = dict(model.named_parameters(remove_duplicate=False))
    untied_missing = (
        [n for n in missing if not (names_of[id(by_name[n])] - {n}) & tensors.keys()]
        if missing
        else []
    )
    if untied_missing or unexpected:
        raise InterplabError(
            f"checkpoint {folder} does not match the model: missing {untied_missing}, "
            f"unexpected {list(unexpected)}."
        )


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{index}.{name}"] = tensor.detach().cpu().contiguous()
    return tensors


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    per_param: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        per_param[int(index)][name] = tensor
    state_dict = optimizer.state_dict()  # the right param_groups; only the state is replaced
    state_dict["state"] = dict(per_param)
    optimizer.load_state_dict(state_dict)


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i:03d}"] = rng
    return tensors
