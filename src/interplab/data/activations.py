"""Activation collection: stream hook-point activations from a model, or cache them on disk.

`activations(model, hooks, corpus, n_tokens, ...)` runs the model over packed windows of
`corpus` (see `interplab.data.corpus`), capturing every requested hook point in the same
forward pass, which stops right after the last of them fires. Activations are flattened
to rows `[tokens, d]`; window position 0 (BOS, an outlier in norm) is dropped unless
`include_bos=True`.

Without `out`, the returned `ActivationStore` streams: each pass over it runs the model.
With `out`, activations are written once to a folder of fixed-size `.npy` shards plus
`manifest.json`, and read back by memory map, shuffled or in order. An interrupted cache
resumes where it stopped; a folder holding a different cache is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interplab.errors import InterplabError

FORMAT_VERSION = 1
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class CacheManifest:
    """What a cache folder holds (`manifest.json`)."""

    model: str
    hooks: dict[str, int]
    """hook name -> width d of its rows."""
    dtype: Literal["float32", "float16"]
    n_tokens: int
    """Rows per hook when complete."""
    context_size: int
    include_bos: bool
    corpus_id: str
    corpus_hash: str
    """sha256 of the packed token windows."""
    shard_tokens: int
    """Rows per shard (the last shard may be shorter)."""
    shards_done: int = 0
    """Shards fully written (resume point)."""
    format_version: int = FORMAT_VERSION

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_tokens / self.shard_tokens)

    @property
    def complete(self) -> bool:
        return self.shards_done >= self.n_shards

    def request_key(self) -> dict[str, Any]:
        """The fields that must agree for a folder to serve a request."""
        key = asdict(self)
        key.pop("shards_done")
        return key


def _hook_dir(hook: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", hook)


def _windows_needed(n_tokens: int, context_size: int, include_bos: bool) -> int:
    per_window = context_size if include_bos else context_size - 1
    return math.ceil(n_tokens / per_window)


class ActivationStore:
    """Activations of one or more hook points, streamed from a model or read from a cache.

    Iterate with `batches(batch_size, shuffle=...)`; each batch is a dict hook -> `[batch, d]`
    tensor (or just the tensor, for a single-hook store, via `tensors(...)`).
    """

    def __init__(
        self,
        hooks: list[str],
        d: dict[str, int],
        n_tokens: int,
        *,
        producer: Any = None,
        folder: Path | None = None,
        manifest: CacheManifest | None = None,
    ) -> None:
        self.hooks = hooks
        self.d = d
        self.n_tokens = n_tokens
        self._producer = producer
        self.folder = folder
        self.manifest = manifest

    # --- opening a cache ----------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path) -> ActivationStore:
        """Open a complete cache folder written by `activations(..., out=folder)`."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise InterplabError(f"{folder} is not an activation cache (no manifest.json).")
        if not manifest.complete:
            raise InterplabError(
                f"the cache in {folder} is incomplete ({manifest.shards_done}/{manifest.n_shards} shards); "
                "run the same `interplab cache` command again to resume it."
            )
        return cls(
            list(manifest.hooks),
            dict(manifest.hooks),
            manifest.n_tokens,
            folder=folder,
            manifest=manifest,
        )

    @property
    def d_in(self) -> int:
        if len(self.hooks) != 1:
            raise InterplabError(f"this store holds {len(self.hooks)} hooks; ask for one by name.")
        return self.d[self.hooks[0]]

    # --- reading ------------------------------------------------------------------------
    def shard(self, hook: str, index: int) -> np.ndarray:
        """Memory-mapped rows of one shard of one hook."""
        if self.folder is None:
            raise InterplabError("this store streams from the model; it has no shards on disk.")
        path = self.folder / _hook_dir(hook) / f"shard-{index:05d}.npy"
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise InterplabError(
                f"activation shard {path} is missing or corrupt: {error}"
            ) from error

    def _chunks(self, shuffle: bool, seed: int) -> Iterator[dict[str, Tensor]]:
        """Blocks of rows (a shard from disk, or a forward batch when streaming)."""
        if self.folder is None:
            yield from self._producer()
            return
        order = list(range(self.manifest.n_shards))
        if shuffle:
            order = torch.randperm(
                len(order), generator=torch.Generator().manual_seed(seed)
            ).tolist()
        for index in order:
            yield {
                h: torch.from_numpy(np.array(self.shard(h, index), dtype=np.float32))
                for h in self.hooks
            }

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        buffer_tokens: int = 1 << 18,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
    ) -> Iterator[dict[str, Float[Tensor, "batch d"]]]:
        """One pass over all rows in batches of `batch_size` rows.

        With `shuffle`, rows are mixed through a buffer of `buffer_tokens` rows (and shards are
        visited in a seeded random order), so neighbouring tokens of one document rarely share
        a batch. Rows of all hooks stay aligned (row i of each hook is the same token).
        """
        if batch_size <= 0:
            raise InterplabError(f"batch_size must be positive, got {batch_size}.")
        generator = torch.Generator().manual_seed(seed)
        buffer: dict[str, list[Tensor]] = {h: [] for h in self.hooks}
        held = 0

        def drain(final: bool) -> Iterator[dict[str, Tensor]]:
            nonlocal held
            rows = {h: torch.cat(buffer[h]) for h in self.hooks}
            if shuffle:
                perm = torch.randperm(held, generator=generator)
                rows = {h: r[perm] for h, r in rows.items()}
            # Mid-stream, emit only whole batches and (when shuffling) keep half the buffer
            # so later rows mix with earlier ones.
            keep = buffer_tokens // 2 if shuffle else 0
            n_out = held if final else (held - keep) // batch_size * batch_size
            for start in range(0, n_out, batch_size):
                stop = min(start + batch_size, n_out)
                if stop - start < batch_size and drop_last:
                    break
                yield {h: r[start:stop].to(device) for h, r in rows.items()}
            for h in self.hooks:
                buffer[h] = [rows[h][n_out:]]
            held -= n_out

        for chunk in self._chunks(shuffle, seed):
            for h in self.hooks:
                buffer[h].append(chunk[h])
            held += chunk[self.hooks[0]].shape[0]
            if held >= buffer_tokens:
                yield from drain(final=False)
        if held:
            yield from drain(final=True)

    def tensors(self, batch_size: int, **kwargs: Any) -> Iterator[Float[Tensor, "batch d"]]:
        """Like `batches` for a single-hook store, yielding the tensor itself."""
        hook = self.hooks[0] if len(self.hooks) == 1 else None
        if hook is None:
            raise InterplabError(
                f"this store holds {len(self.hooks)} hooks; use batches() instead."
            )
        for batch in self.batches(batch_size, **kwargs):
            yield batch[hook]

    def all(self, hook: str | None = None) -> Float[Tensor, "rows d"]:
        """Every row of one hook, in order, as one tensor (for small stores)."""
        hook = hook or self.hooks[0]
        if hook not in self.hooks:
            raise InterplabError(
                f"hook {hook!r} is not in this store; it holds {', '.join(self.hooks)}."
            )
        return torch.cat([b[hook] for b in self.batches(1 << 16, shuffle=False)])


@dataclass
class _Collector:
    """Runs the model over token windows and captures hook activations."""

    model: Any
    hooks: list[str]
    windows: Tensor
    batch_size: int
    include_bos: bool
    n_tokens: int
    progress: bool
    last_hook: str
    """The requested hook that fires last: the forward pass stops right after it."""
    captured: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = next(self.model.parameters()).device

    def _capture(self, name: str) -> Any:
        # Bridge hook names are aliases (hook_resid_post -> hook_out): key by the requested name.
        def capture(tensor: Tensor, hook: Any) -> None:
            self.captured[name] = tensor.detach()
            if name == self.last_hook:
                raise _StopForward

        return capture

    def forward_batches(self, start_window: int = 0) -> Iterator[dict[str, Tensor]]:
        """Rows per hook for each batch of windows, from `start_window` on, up to n_tokens rows."""
        per_window = self.windows.shape[1] - (0 if self.include_bos else 1)
        emitted = start_window * per_window
        bar = tqdm(
            total=self.n_tokens,
            initial=min(emitted, self.n_tokens),
            unit="tok",
            unit_scale=True,
            desc="activations",
            disable=not self.progress,
        )
        fwd_hooks = [(h, self._capture(h)) for h in self.hooks]
        for start in range(start_window, self.windows.shape[0], self.batch_size):
            if emitted >= self.n_tokens:
                break
            tokens = self.windows[start : start + self.batch_size].to(self.device)
            self.captured.clear()
            # Inference mode and the capture hooks cover the forward pass only, never the
            # yield: the consumer (e.g. dictionary training) needs autograd and a clean model.
            with (
                torch.inference_mode(),
                self.model.hooks(fwd_hooks=fwd_hooks),
                contextlib.suppress(_StopForward),
            ):
                self.model(tokens)
            rows = {}
            for h in self.hooks:
                act = self.captured[h]
                if act.ndim != 3:
                    raise InterplabError(
                        f"hook {h!r} gives activations of shape {tuple(act.shape)}; activation stores "
                        "hold [batch, pos, d] hooks (for per-head hooks such as hook_z, flatten heads "
                        "yourself or pick a residual/MLP hook)."
                    )
                if not self.include_bos:
                    act = act[:, 1:]
                rows[h] = act.reshape(-1, act.shape[-1]).float().cpu().clone()
            self.captured.clear()
            take = min(rows[self.hooks[0]].shape[0], self.n_tokens - emitted)
            emitted += take
            bar.update(take)
            yield {h: r[:take] for h, r in rows.items()}
        bar.close()


class _StopForward(Exception):
    """Raised inside the last needed hook to skip the rest of the forward pass."""


def _probe(model: Any, hooks: list[str], windows: Tensor) -> tuple[dict[str, int], str]:
    """Width of each hook's rows, and which requested hook fires last (one tiny forward)."""
    captured: dict[str, Tensor] = {}

    def grab(name: str) -> Any:
        def capture(tensor: Tensor, hook: Any) -> None:
            captured[name] = tensor
            if len(captured) == len(hooks):
                raise _StopForward

        return capture

    device = next(model.parameters()).device
    with (
        torch.inference_mode(),
        model.hooks(fwd_hooks=[(h, grab(h)) for h in hooks]),
        contextlib.suppress(_StopForward),
    ):
        model(windows[:1, : min(8, windows.shape[1])].to(device))
    missing = [h for h in hooks if h not in captured]
    if missing:
        raise InterplabError(f"hook points {missing} did not fire in a forward pass of this model.")
    return {h: int(captured[h].shape[-1]) for h in hooks}, list(captured)[-1]


def read_manifest(folder: Path) -> CacheManifest | None:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        return None
    try:
        return CacheManifest(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as error:
        raise InterplabError(f"{path} is corrupt or from another tool: {error}") from error


def activations(
    model: Any,
    hooks: str | list[str],
    corpus: Any,
    n_tokens: int,
    *,
    context_size: int = 128,
    batch_size: int = 32,
    out: str | Path | None = None,
    shard_tokens: int = 65_536,
    dtype: Literal["float32", "float16"] = "float32",
    include_bos: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> ActivationStore:
    """Collect activations of `hooks` over `n_tokens` tokens of `corpus`.

    Args:
        model: a hooked model from `interplab.load_model`.
        hooks: one hook name or several; all are captured from the same forward pass.
        corpus: anything `interplab.data.corpus.resolve_corpus` accepts ('storyworld',
            'python-stdlib', a text file/folder, a .npy/.safetensors token file), or a
            LongTensor of token windows `[window, pos]`.
        n_tokens: rows per hook.
        context_size: tokens per window (BOS included).
        batch_size: windows per forward pass.
        out: cache folder; None streams from the model on every pass.
        shard_tokens: rows per shard on disk.
        dtype: storage dtype of the cache.
        include_bos: keep position 0 of each window.
        seed: order of documents when packing the corpus.
    Returns:
        An `ActivationStore`.
    """
    from interplab.data.corpus import PackedTokens, pack, tokens_hash
    from interplab.models.hooks import check_hook_names

    hooks = check_hook_names(model, hooks)
    if len(set(hooks)) != len(hooks):
        raise InterplabError(f"hook names repeat: {hooks}.")
    if not isinstance(n_tokens, int) or n_tokens <= 0:
        raise InterplabError(f"n_tokens must be a positive integer, got {n_tokens!r}.")
    if batch_size <= 0:
        raise InterplabError(f"batch_size must be positive, got {batch_size}.")
    if dtype not in _NP_DTYPES:
        raise InterplabError(f"dtype must be one of {', '.join(_NP_DTYPES)}, got {dtype!r}.")
    n_ctx = model.cfg.n_ctx
    if context_size > n_ctx:
        raise InterplabError(
            f"context_size {context_size} is longer than the model's context ({n_ctx})."
        )

    n_windows = _windows_needed(n_tokens, context_size, include_bos)
    if isinstance(corpus, Tensor):
        if corpus.ndim != 2 or corpus.shape[0] < n_windows or corpus.shape[1] < context_size:
            raise InterplabError(
                f"token windows of shape {tuple(corpus.shape)} are too few or too short: {n_tokens:,} "
                f"tokens need {n_windows} windows of at least {context_size} tokens."
            )
        ids = corpus[:n_windows, :context_size].long()
        packed = PackedTokens(ids, "tensor", tokens_hash(ids))
    else:
        packed = pack(corpus, getattr(model, "tokenizer", None), context_size, n_windows, seed=seed)

    widths, last_hook = _probe(model, hooks, packed.ids)
    collector = _Collector(
        model, hooks, packed.ids, batch_size, include_bos, n_tokens, progress, last_hook
    )

    if out is None:
        return ActivationStore(hooks, widths, n_tokens, producer=collector.forward_batches)

    manifest = CacheManifest(
        model=str(getattr(model.cfg, "model_name", "model")),
        hooks=widths,
        dtype=dtype,
        n_tokens=n_tokens,
        context_size=context_size,
        include_bos=include_bos,
        corpus_id=packed.corpus_id,
        corpus_hash=packed.content_hash,
        shard_tokens=shard_tokens,
    )
    _write_cache(Path(out), manifest, collector, context_size - (0 if include_bos else 1))
    return ActivationStore.open(out)


def _write_cache(
    folder: Path, manifest: CacheManifest, collector: _Collector, rows_per_window: int
) -> None:
    from interplab.runs import atomic_path, atomic_write_json

    existing = read_manifest(folder)
    if existing is not None:
        if existing.request_key() != manifest.request_key():
            differing = sorted(
                k for k, v in manifest.request_key().items() if existing.request_key().get(k) != v
            )
            raise InterplabError(
                f"{folder} already holds a different activation cache (differs in: {', '.join(differing)}); "
                "refusing to overwrite it. Choose another --out folder."
            )
        manifest.shards_done = existing.shards_done
        if manifest.complete:
            return
    elif folder.exists() and any(folder.iterdir()):
        raise InterplabError(
            f"{folder} exists and is not empty; refusing to write an activation cache into it."
        )
    folder.mkdir(parents=True, exist_ok=True)
    for h in manifest.hooks:
        (folder / _hook_dir(h)).mkdir(exist_ok=True)
    atomic_write_json(folder / "manifest.json", asdict(manifest))

    # Resume at a shard boundary: restart from the window holding the first missing row.
    start_row = manifest.shards_done * manifest.shard_tokens
    start_window = start_row // rows_per_window
    skip = start_row - start_window * rows_per_window
    pending: dict[str, list[Tensor]] = {h: [] for h in manifest.hooks}
    held = 0
    np_dtype = _NP_DTYPES[manifest.dtype]

    def flush(n: int) -> None:
        nonlocal held
        for h in manifest.hooks:
            rows = torch.cat(pending[h])
            shard = folder / _hook_dir(h) / f"shard-{manifest.shards_done:05d}.npy"
            with atomic_path(shard) as tmp:
                np.save(tmp, rows[:n].numpy().astype(np_dtype))
            pending[h] = [rows[n:]]
        held -= n
        manifest.shards_done += 1
        atomic_write_json(folder / "manifest.json", asdict(manifest))

    for rows in collector.forward_batches(start_window):
        if skip:
            cut = min(skip, rows[collector.hooks[0]].shape[0])
            rows = {h: r[cut:] for h, r in rows.items()}
            skip -= cut
        for h in manifest.hooks:
            pending[h].append(rows[h])
        held += rows[collector.hooks[0]].shape[0]
        while held >= manifest.shard_tokens:
            flush(manifest.shard_tokens)
    if held:
        flush(held)
