"""Token windows and the deterministic batch order of the trainer.

Training data is a set of fixed-length windows: a `[n_windows, width]` array (torch tensor,
numpy array or numpy memmap, width <= n_ctx), or a 1-D token stream cut into consecutive
windows of n_ctx tokens (the tail that does not fill a window is dropped). Windows are
read lazily by index, so a memmap larger than memory is never loaded whole.

The batch of step s is a pure function of (seed, s): sample number i = s * batch_size + j
is window perm_e[i mod n_windows] of epoch e = i // n_windows, where perm_e is a random
permutation seeded by (seed, e). A run resumed at step s therefore sees exactly the
batches the uninterrupted run saw, without any saved sampler state.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from interplab.errors import InterplabError


class TokenWindows:
    """Fixed-length windows of token ids over a tensor, array or memmap, read by index."""

    def __init__(self, tokens: Any, n_ctx: int, vocab_size: int, *, name: str = "tokens") -> None:
        if isinstance(tokens, Tensor):
            if (
                tokens.dtype.is_floating_point
                or tokens.dtype.is_complex
                or tokens.dtype == torch.bool
            ):
                raise InterplabError(
                    f"{name} must hold integer token ids, got dtype {tokens.dtype}."
                )
            array: Tensor | np.ndarray = tokens.detach().cpu()
        elif isinstance(tokens, np.ndarray):
            if not np.issubdtype(tokens.dtype, np.integer):
                raise InterplabError(
                    f"{name} must hold integer token ids, got dtype {tokens.dtype}."
                )
            array = tokens
        else:
            raise InterplabError(
                f"{name} must be a torch tensor, numpy array or numpy memmap of token ids, "
                f"got {type(tokens).__name__}."
            )
        if array.ndim == 1:
            n_windows = array.shape[0] // n_ctx
            if n_windows == 0:
                raise InterplabError(
                    f"{name} is a stream of {array.shape[0]} tokens, shorter than one window "
                    f"of n_ctx={n_ctx} tokens."
                )
            # A view, not a copy: memmaps stay on disk.
            array = array[: n_windows * n_ctx].reshape(n_windows, n_ctx)
        elif array.ndim == 2:
            if not 2 <= array.shape[1] <= n_ctx:
                raise InterplabError(
                    f"{name} has windows of {array.shape[1]} tokens; expected between 2 and "
                    f"n_ctx={n_ctx} (shape [n_windows, n_ctx])."
                )
            if array.shape[0] == 0:
                raise InterplabError(f"{name} holds no windows (shape {tuple(array.shape)}).")
        else:
            raise InterplabError(
                f"{name} must be 1-D (a token stream) or 2-D ([n_windows, n_ctx]), got "
                f"shape {tuple(array.shape)}."
            )
        low, high = _min_max(array)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise InterplabError(
                f"{name} holds token id {bad}; expected ids in [0, vocab_size={vocab_size})."
            )
        self.array = array
        self.n_windows, self.width = int(array.shape[0]), int(array.shape[1])

    def get(self, index: Int[Tensor, " batch"]) -> Int[Tensor, "batch width"]:
        """The windows at `index`, as an int64 tensor on the CPU."""
        if isinstance(self.array, Tensor):
            return self.array[index].long()
        return torch.from_numpy(np.asarray(self.array[index.numpy()], dtype=np.int64))

    def fingerprint(self) -> str:
        """A cheap identity of the data (shape and the first and last windows), stored in
        checkpoints so a resumed run notices it was given different tokens."""
        digest = hashlib.sha256(f"{self.n_windows}x{self.width}".encode())
        for i in sorted({0, self.n_windows - 1}):
            digest.update(self.get(torch.tensor([i])).numpy().tobytes())
        return digest.hexdigest()[:16]


def _min_max(array: Tensor | np.ndarray, chunk_rows: int = 1 << 16) -> tuple[int, int]:
    # Chunked so a memmap is streamed through memory rather than loaded at once.
    low, high = None, None
    for start in range(0, array.shape[0], chunk_rows):
        part = array[start : start + chunk_rows]
        part_low, part_high = int(part.min()), int(part.max())
        low = part_low if low is None else min(low, part_low)
        high = part_high if high is None else max(high, part_high)
    assert low is not None and high is not None
    return low, high


class BatchOrder:
    """Window indices of each training step: a fresh permutation of all windows per epoch."""

    def __init__(self, n_windows: int, batch_size: int, seed: int) -> None:
        self.n_windows, self.batch_size, self.seed = n_windows, batch_size, seed
        self._perms: dict[int, Tensor] = {}

    def permutation(self, epoch: int) -> Int[Tensor, " n_windows"]:
        """The order of the windows in `epoch`, seeded by (seed, epoch)."""
        if epoch not in self._perms:
            # SeedSequence mixes (seed, epoch) so that, unlike seed + epoch, nearby seeds do
            # not share shifted copies of one another's orders.
            mixed = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
            generator = torch.Generator().manual_seed(int(mixed) & ((1 << 63) - 1))
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(self.n_windows, generator=generator)
        return self._perms[epoch]

    def indices(self, step: int) -> Int[Tensor, " batch"]:
        """Window indices of the batch of `step` (0-based)."""
        sample = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epoch, offset = sample // self.n_windows, sample % self.n_windows
        out = torch.empty_like(sample)
        for e in epoch.unique().tolist():
            mask = epoch == e
            out[mask] = self.permutation(e)[offset[mask]]
        return out


def eval_batches(windows: TokenWindows, batch_size: int, n_batches: int) -> list[Tensor]:
    """The held-out batches: the first n_batches * batch_size windows in order (fewer if
    there are fewer windows), so every evaluation scores the same tokens."""
    n = min(windows.n_windows, batch_size * n_batches)
    return [
        windows.get(torch.arange(start, min(start + batch_size, n)))
        for start in range(0, n, batch_size)
    ]
