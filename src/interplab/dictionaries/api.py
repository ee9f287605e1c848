"""`train_dictionary`: one dictionary from an activation store, in one call.

    store = il.activations(model, "blocks.2.hook_resid_post", "storyworld", n_tokens=2_000_000)
    sae = il.train_dictionary(store, il.dictionaries.TopK(d_sae=4096, k=32))

It is `train_dictionaries` (the sweep trainer) for a single config, plus what a store knows:
the batches come from `store.tensors(batch_size, shuffle=True)` (re-shuffled and replayed
when training asks for more tokens than the store holds), and the hook and model names go
into the dictionary's metadata, so `evaluate_dictionary` and saved files know where it
belongs.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interplab.dictionaries.base import Dictionary
from interplab.dictionaries.configs import DictionaryConfig, Transcoder, describe
from interplab.dictionaries.training import RunLike, TrainConfig, train_dictionaries
from interplab.errors import InterplabError


def _pick_hooks(
    store: Any, config: DictionaryConfig, hook_name: str | None, hook_name_out: str | None
) -> tuple[str, str | None]:
    """The store hook the dictionary reads and, for transcoders, the one it predicts."""
    hooks = list(store.hooks)
    for label, name in (("hook_name", hook_name), ("hook_name_out", hook_name_out)):
        if name is not None and name not in hooks:
            raise InterplabError(
                f"{label}={name!r} is not in this activation store; it holds {', '.join(hooks)}."
            )
    if isinstance(config, Transcoder):
        if hook_name is None or hook_name_out is None:
            raise InterplabError(
                "a transcoder maps one hook to another: pass hook_name (its input) and "
                f"hook_name_out (its target), both from the store's hooks {hooks}."
            )
        return hook_name, hook_name_out
    if hook_name_out is not None:
        raise InterplabError(
            "hook_name_out is for transcoders; wrap the config in Transcoder(...) to predict "
            "one hook from another."
        )
    if hook_name is None:
        if len(hooks) != 1:
            raise InterplabError(
                f"this activation store holds {len(hooks)} hooks ({', '.join(hooks)}); "
                "pass hook_name=... to choose one."
            )
        hook_name = hooks[0]
    return hook_name, None


def _passes(
    store: Any, hook_name: str, hook_name_out: str | None, batch_size: int, seed: int
) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
    epoch = 0
    while True:
        for batch in store.batches(batch_size, shuffle=True, seed=seed + epoch):
            if hook_name_out is None:
                yield batch[hook_name]
            else:
                yield batch[hook_name], batch[hook_name_out]
        epoch += 1


_DONE = object()


def in_thread(items: Iterator[Any], prefetch: int = 2) -> Iterator[Any]:
    """Run the iterator `items` in a background thread and yield what it yields.

    A store that streams from the model suspends its generator inside the model's forward
    context (`torch.inference_mode()` and the capture hooks), and that thread-local mode
    would otherwise stay switched on in the consumer between batches, so training steps
    would build no autograd graph. In its own thread the producer's modes stay there; the
    forward passes also overlap with training. Closing this generator stops the producer
    (closing `items`, which removes its hooks) and waits for the thread to end.
    """
    buffer: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    break
            put(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            put(error)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="interplab-activations", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def store_batches(
    store: Any, hook_name: str, hook_name_out: str | None, batch_size: int, seed: int
) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
    """Shuffled passes over the store, each with a new seed, for as long as training asks.

    A store that streams from the model is read in a background thread (see `in_thread`).
    """
    passes = _passes(store, hook_name, hook_name_out, batch_size, seed)
    return _as_normal_tensors(in_thread(passes)) if store.folder is None else passes


def _as_normal_tensors(stream: Iterator[Any]) -> Iterator[Any]:
    """Clone tensors made under inference mode (they cannot enter autograd), then close
    `stream` when this generator is closed."""
    try:
        for item in stream:
            if isinstance(item, Tensor):
                yield item.clone()
            else:
                yield tuple(t.clone() for t in item)
    finally:
        stream.close()


def _this_ranks_part(store: Any) -> Any:
    """Under torchrun, this rank's rows of a cached store (a store already split, or one that
    streams from the model, is left as it is: streaming ranks choose their own windows)."""
    from interplab.dictionaries.distributed import RankShard, current_world, rank_shard

    world = current_world()
    if not world.distributed or isinstance(store, RankShard) or store.folder is None:
        return store
    return rank_shard(store, world)


def _saved_training_metadata(run: RunLike, name: str) -> dict[str, Any]:
    cfg_file = Path(run.path("dictionaries")) / name / "cfg.json"
    if not cfg_file.exists():
        return {}
    metadata = json.loads(cfg_file.read_text()).get("metadata", {})
    return {k: v for k, v in metadata.items() if k == "interplab_training"}


def train_dictionary(
    data: Any,
    config: DictionaryConfig,
    *,
    hook_name: str | None = None,
    hook_name_out: str | None = None,
    train_config: TrainConfig | None = None,
    n_tokens: int | None = None,
    run: RunLike | None = None,
    device: torch.device | str | None = None,
    model_name: str | None = None,
    name: str | None = None,
) -> Dictionary:
    """Train one dictionary on activations.

    Args:
        data: an `ActivationStore` (streamed or cached), or any iterable of activation
            batches `x [..., d_in]` / pairs `(x, y)` that `train_dictionaries` accepts.
        config: the dictionary config, e.g. `TopK(d_sae=4096, k=32)` or
            `Transcoder(TopK(4096, k=32))`.
        hook_name: the store hook to train on (default: the store's only hook); for a
            transcoder its input hook. Recorded in the metadata.
        hook_name_out: a transcoder's target hook (must be in the store).
        train_config: optimisation settings (batch size, lr, ...); default `TrainConfig()`.
        n_tokens: training tokens; overrides `train_config.total_tokens`. Default: the
            train_config's total when one is given, else one pass over the store.
        run: an `interplab.runs.Run` for metrics, checkpoints and the saved dictionary
            (`dictionaries/<name>/`, with the hook metadata). Under torchrun give it on rank
            0 only (None elsewhere): rank 0 alone writes.
        device: where to train; None = CUDA when present, else CPU.
        model_name: recorded in the metadata (default: the cached store's model).
        name: the dictionary's name in the run (default e.g. `topk-4096-k32`).
    Returns:
        The trained dictionary (eval mode, working on raw activations) with `metadata` set.

    Under an initialised `torch.distributed` process group (a script started with `torchrun`
    that called `interplab.dictionaries.distributed.launch`), training is data-parallel: a
    cached store is split so each rank reads its own rows (`rank_shard`), gradients are
    averaged, and every rank returns the same dictionary.
    """
    from interplab.data.activations import ActivationStore
    from interplab.models.loading import resolve_device

    if n_tokens is not None and (
        isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0
    ):
        raise InterplabError(f"n_tokens must be a positive integer or None, got {n_tokens!r}.")
    metadata: dict[str, Any] = {}
    if isinstance(data, ActivationStore):
        data = _this_ranks_part(data)
        hook_name, hook_name_out = _pick_hooks(data, config, hook_name, hook_name_out)
        if n_tokens is None and train_config is None:
            n_tokens = data.n_tokens
        cfg = train_config or TrainConfig()
        if n_tokens is not None:
            cfg = replace(cfg, total_tokens=n_tokens)
        batches: Iterable[Any] = store_batches(
            data, hook_name, hook_name_out, cfg.batch_size, cfg.seed
        )
        if data.manifest is not None:
            metadata["context_size"] = data.manifest.context_size
            model_name = model_name or data.manifest.model
    else:
        if isinstance(data, Tensor):
            raise InterplabError(
                "data is a single tensor; pass an iterable of batches (e.g. [x] or "
                "x.split(4096)) or an ActivationStore."
            )
        cfg = train_config or TrainConfig()
        if n_tokens is not None:
            cfg = replace(cfg, total_tokens=n_tokens)
        batches = data
    if hook_name is not None:
        metadata["hook_name"] = hook_name
    if hook_name_out is not None:
        metadata["hook_name_out"] = hook_name_out
    if model_name is not None:
        metadata["model_name"] = model_name

    member = name or describe(config)
    try:
        [dictionary] = train_dictionaries(
            [config], batches, cfg, run=run, device=resolve_device(device), names=[member]
        )
    finally:
        close = getattr(batches, "close", None)
        if close is not None:  # stop a background producer before the model is used again
            close()
    dictionary.metadata.update(metadata)
    if run is not None:
        from interplab.dictionaries.io import save_dictionary

        # The trainer saved the file before the hook metadata was known: write it again.
        extra = _saved_training_metadata(run, member)
        save_dictionary(dictionary, Path(run.path("dictionaries")) / member, extra, overwrite=True)
        dictionary.metadata.update(extra)
    return dictionary


__all__ = ["in_thread", "store_batches", "train_dictionary"]
