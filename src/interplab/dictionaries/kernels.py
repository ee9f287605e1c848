"""Sparse kernels for TopK-style dictionaries.

With k active latents out of d_sae per token, only the encoder pre-activation `x @ W_enc`
(needed to pick the top k) and the top-k itself are dense. Everything after the selection
touches only the B * k selected (token, latent) pairs (Gao et al. 2024, section 5 "kernels"):

* decode: `x_hat[b] = sum_j values[b, j] * W_dec[cols[b, j]]` is `embedding_bag`; its backward
  into `W_dec` is a sparse-transpose-times-dense product (only selected rows get gradient) and
  into the values a sampled dot product `<grad[b], W_dec[cols[b, j]]>`;
* encode backward: the gradient of the selected pre-activations flows into only the selected
  columns of `W_enc` (`dW_enc = x^T @ sparse_grad`), into `b_enc` by index-add, and into `x`
  as another `embedding_bag` over the rows of `W_enc.T`.

Sparse latents are a `SparseCode`: coordinates sorted by row (token), so both fixed-k TopK
and the variable number of latents per token of BatchTopK share the same kernels. Dense
references (`dense_decode`, `dense_encode_selected`) compute the same numbers with plain
matmuls; the tests compare gradients of the two in float64.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass(frozen=True)
class SparseCode:
    """Sparse latent activations: `values[n]` at (`rows[n]`, `cols[n]`), rows sorted ascending.

    `n_rows` is the number of tokens and `n_cols` the number of latents (d_sae). At most one
    entry per (row, col) pair.
    """

    values: Float[Tensor, " nnz"]
    rows: Int[Tensor, " nnz"]
    cols: Int[Tensor, " nnz"]
    n_rows: int
    n_cols: int

    @classmethod
    def from_topk(
        cls, values: Float[Tensor, "batch k"], indices: Int[Tensor, "batch k"], n_cols: int
    ) -> SparseCode:
        """The code of a per-token top-k selection (`values[b, j]` at latent `indices[b, j]`)."""
        n_rows, k = indices.shape
        rows = torch.arange(n_rows, device=indices.device).repeat_interleave(k)
        return cls(values.reshape(-1), rows, indices.reshape(-1), n_rows, n_cols)

    @classmethod
    def from_flat_indices(
        cls,
        values: Float[Tensor, " nnz"],
        flat_indices: Int[Tensor, " nnz"],
        n_rows: int,
        n_cols: int,
    ) -> SparseCode:
        """The code of entries given by flat indices into a [n_rows, n_cols] matrix (any order)."""
        order = torch.argsort(flat_indices)
        flat = flat_indices[order]
        return cls(values[order], flat // n_cols, flat % n_cols, n_rows, n_cols)

    def offsets(self) -> Int[Tensor, " n_rows"]:
        """Index of each row's first entry (the `offsets` of `embedding_bag`)."""
        counts = torch.bincount(self.rows, minlength=self.n_rows)
        return torch.cumsum(counts, 0) - counts

    def with_values(self, values: Float[Tensor, " nnz"]) -> SparseCode:
        """The same coordinates with new values."""
        return SparseCode(values, self.rows, self.cols, self.n_rows, self.n_cols)

    def to_dense(self) -> Float[Tensor, "n_rows n_cols"]:
        """Dense [n_rows, n_cols] matrix (differentiable in `values`)."""
        dense = self.values.new_zeros(self.n_rows, self.n_cols)
        return dense.index_put((self.rows, self.cols), self.values)

    def fired(self) -> Bool[Tensor, " n_cols"]:
        """Bool mask of the latents with at least one positive value."""
        mask = torch.zeros(self.n_cols, dtype=torch.bool, device=self.cols.device)
        return mask.index_fill_(0, self.cols[self.values > 0], True)

    def l0(self) -> Tensor:
        """Mean number of positive latents per token."""
        return (self.values > 0).sum() / max(self.n_rows, 1)


def _quiet_sparse(fn: Any) -> Any:
    """Run `fn` with PyTorch's one-time 'sparse CSR support is in beta' warning silenced."""

    def wrapped(*args: Any) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            return fn(*args)

    return wrapped


@_quiet_sparse
def _transpose_times(
    cols: Tensor, values: Tensor, offsets: Tensor, n_rows: int, n_cols: int, dense: Tensor
) -> Tensor:
    """S^T @ dense for the row-sorted sparse [n_rows, n_cols] matrix S: [n_cols, d].

    S is built as CSR straight from the row offsets and multiplied through its transpose (a
    CSC view of the same buffers). On CPU PyTorch converts that view back to CSR, sorting the
    entries by column on every call; a column order shared per SparseCode would avoid it.
    """
    crow = torch.cat([offsets, offsets.new_tensor([cols.shape[0]])])
    matrix = torch.sparse_csr_tensor(crow, cols, values.to(dense.dtype), size=(n_rows, n_cols))
    return matrix.t() @ dense


@_quiet_sparse
def _sampled_dots(cols: Tensor, offsets: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """`out[n] = <a[row of n], b[cols[n]]>` (rows given by `offsets`) without materialising a
    [nnz, d] gather: a sampled dense-dense matmul on the CSR pattern."""
    nnz = cols.shape[0]
    crow = torch.cat([offsets, offsets.new_tensor([nnz])])
    pattern = torch.sparse_csr_tensor(crow, cols, a.new_zeros(nnz), size=(a.shape[0], b.shape[0]))
    return torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values()


class _SparseDecode(torch.autograd.Function):
    """x_hat = S @ W_dec for sparse S; gradients touch only the selected rows of W_dec."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx: Any, values: Tensor, W_dec: Tensor, cols: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(values, W_dec, cols, offsets)
        return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        values, W_dec, cols, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = _sampled_dots(cols, offsets, grad_out, W_dec)
        if ctx.needs_input_grad[1]:
            grad_W_dec = _transpose_times(
                cols, values, offsets, grad_out.shape[0], W_dec.shape[0], grad_out
            )
        return grad_values, grad_W_dec, None, None


class _SelectedEncode(torch.autograd.Function):
    """Selected pre-activations `pre[rows, cols]` of `pre = x @ W_enc + b_enc`.

    The dense `pre` is computed by the caller without autograd (it is needed for the top-k
    anyway); this function only gathers it, and its backward builds the encoder gradients from
    the selected entries alone.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(
        ctx: Any,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        pre: Tensor,
        rows: Tensor,
        cols: Tensor,
        offsets: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(x, W_enc, cols, offsets)
        ctx.d_sae = b_enc.shape[0]
        return pre[rows, cols].to(x.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad_selected: Tensor) -> tuple[Tensor | None, ...]:
        x, W_enc, cols, offsets = ctx.saved_tensors
        grad_x = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[0]:
            # grad_x[b] = sum_j g[b, j] * W_enc[:, cols[b, j]]: an embedding_bag over W_enc.T
            grad_x = F.embedding_bag(
                cols, W_enc.T.contiguous(), offsets, mode="sum", per_sample_weights=grad_selected
            )
        if ctx.needs_input_grad[1]:
            grad_W_enc = _transpose_times(
                cols, grad_selected, offsets, x.shape[0], ctx.d_sae, x.contiguous()
            ).T.contiguous()
        if ctx.needs_input_grad[2]:
            grad_b_enc = grad_selected.new_zeros(ctx.d_sae).index_add_(0, cols, grad_selected)
        return grad_x, grad_W_enc, grad_b_enc, None, None, None, None


def sparse_decode(
    code: SparseCode, W_dec: Float[Tensor, "d_sae d_out"]
) -> Float[Tensor, "batch d_out"]:
    """`code @ W_dec` via `embedding_bag`; backward into W_dec touches only selected rows."""
    return _SparseDecode.apply(code.values, W_dec, code.cols, code.offsets())


def dense_decode(
    code: SparseCode, W_dec: Float[Tensor, "d_sae d_out"]
) -> Float[Tensor, "batch d_out"]:
    """Reference for `sparse_decode`: materialise the dense latents and matmul."""
    return code.to_dense() @ W_dec


def sparse_encode_selected(
    x: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    pre: Float[Tensor, "batch d_sae"],
    rows: Int[Tensor, " nnz"],
    cols: Int[Tensor, " nnz"],
    offsets: Int[Tensor, " batch"],
) -> Float[Tensor, " nnz"]:
    """`(x @ W_enc + b_enc)[rows, cols]`, given `pre = x @ W_enc + b_enc` computed without
    autograd; the backward costs O(nnz * d_in) instead of O(batch * d_sae * d_in)."""
    return _SelectedEncode.apply(x, W_enc, b_enc, pre.detach(), rows, cols, offsets)


def dense_encode_selected(
    pre: Float[Tensor, "batch d_sae"], rows: Int[Tensor, " nnz"], cols: Int[Tensor, " nnz"]
) -> Float[Tensor, " nnz"]:
    """Reference for `sparse_encode_selected`: gather from a `pre` that carries autograd."""
    return pre[rows, cols]


__all__ = [
    "SparseCode",
    "dense_decode",
    "dense_encode_selected",
    "sparse_decode",
    "sparse_encode_selected",
]
