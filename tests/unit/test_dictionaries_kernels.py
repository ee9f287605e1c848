"""Sparse kernels == dense reference, in float64 (gradients to 1e-10)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from interplab.dictionaries import (
    BatchTopK,
    Matryoshka,
    SkipTranscoder,
    TopK,
    Transcoder,
    build_dictionary,
)
from interplab.dictionaries.kernels import (
    SparseCode,
    dense_decode,
    dense_encode_selected,
    sparse_decode,
    sparse_encode_selected,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP contention on a shared 2-core machine (this
    runs after any session-wide thread setting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


F64 = torch.float64


def _variable_code(n_rows: int, n_cols: int, seed: int) -> SparseCode:
    """A code with a variable number of entries per row, including empty rows."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_rows, n_cols, generator=g) < 0.3
    mask[1] = False  # an empty row
    flat = mask.reshape(-1).nonzero().squeeze(1)
    values = torch.randn(flat.shape[0], generator=g, dtype=F64)
    return SparseCode.from_flat_indices(
        values, flat[torch.randperm(flat.shape[0], generator=g)], n_rows, n_cols
    )


def test_sparse_code_roundtrip_and_offsets():
    code = _variable_code(6, 9, seed=0)
    dense = code.to_dense()
    rows, cols = dense.nonzero(as_tuple=True)
    assert torch.equal(code.rows, rows) and torch.equal(code.cols, cols)
    counts = (dense != 0).sum(1)
    assert torch.equal(code.offsets(), torch.cumsum(counts, 0) - counts)
    assert code.l0() == (dense > 0).sum() / 6
    assert torch.equal(code.fired(), (dense > 0).any(0))


@pytest.mark.parametrize("kind", ["topk", "variable"])
def test_sparse_decode_matches_dense_in_float64(kind):
    g = torch.Generator().manual_seed(1)
    n_rows, d_sae, d_out = 7, 11, 5
    if kind == "topk":
        pre = torch.randn(n_rows, d_sae, generator=g, dtype=F64)
        values, indices = pre.topk(3)
        code = SparseCode.from_topk(values, indices, d_sae)
    else:
        code = _variable_code(n_rows, d_sae, seed=2)
    W_dec = torch.randn(d_sae, d_out, generator=g, dtype=F64)
    grad_out = torch.randn(n_rows, d_out, generator=g, dtype=F64)
    results = []
    for fn in (sparse_decode, dense_decode):
        values = code.values.clone().requires_grad_()
        W = W_dec.clone().requires_grad_()
        out = fn(code.with_values(values), W)
        out.backward(grad_out)
        results.append((out.detach(), values.grad, W.grad))
    for sparse, dense in zip(*results, strict=True):
        assert torch.allclose(sparse, dense, rtol=0, atol=1e-10)
    # rows of W_dec that were never selected get exactly zero gradient
    unused = torch.ones(d_sae, dtype=torch.bool)
    unused[code.cols] = False
    assert torch.all(results[0][2][unused] == 0)


def test_sparse_encode_selected_matches_dense_in_float64():
    g = torch.Generator().manual_seed(3)
    n_rows, d_in, d_sae = 6, 5, 13
    x = torch.randn(n_rows, d_in, generator=g, dtype=F64)
    W_enc = torch.randn(d_in, d_sae, generator=g, dtype=F64)
    b_enc = torch.randn(d_sae, generator=g, dtype=F64)
    code = _variable_code(n_rows, d_sae, seed=4)
    grad = torch.randn(code.values.shape[0], generator=g, dtype=F64)
    results = []
    for sparse in (True, False):
        xs, W, b = (t.clone().requires_grad_() for t in (x, W_enc, b_enc))
        pre = xs @ W + b
        if sparse:
            out = sparse_encode_selected(
                xs, W, b, pre.detach(), code.rows, code.cols, code.offsets()
            )
        else:
            out = dense_encode_selected(pre, code.rows, code.cols)
        out.backward(grad)
        results.append((out.detach(), xs.grad, W.grad, b.grad))
    for sparse, dense in zip(*results, strict=True):
        assert torch.allclose(sparse, dense, rtol=0, atol=1e-10)


def test_kernels_pass_gradcheck():
    g = torch.Generator().manual_seed(5)
    code = _variable_code(4, 6, seed=6)
    W_dec = torch.randn(6, 3, generator=g, dtype=F64, requires_grad=True)
    values = code.values.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, W: sparse_decode(code.with_values(v), W), (values, W_dec)
    )

    x = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    W_enc = torch.randn(3, 6, generator=g, dtype=F64, requires_grad=True)
    b_enc = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    offsets = code.offsets()

    def encode(x, W, b):
        pre = (x @ W + b).detach()
        return sparse_encode_selected(x, W, b, pre, code.rows, code.cols, offsets)

    assert torch.autograd.gradcheck(encode, (x, W_enc, b_enc))


@pytest.mark.parametrize(
    "config",
    [
        TopK(24, k=4, aux_k=6),
        BatchTopK(24, k=4, aux_k=6),
        Matryoshka(24, k=4, prefixes=(4, 12), aux_k=6),
        Transcoder(TopK(24, k=4, aux_k=6)),
        SkipTranscoder(Matryoshka(24, k=4, prefixes=(8,))),
    ],
    ids=lambda c: (
        type(c).__name__ + ("" if not hasattr(c, "variant") else type(c.variant).__name__)
    ),
)
@pytest.mark.parametrize("training", [True, False])
def test_dictionary_sparse_path_equals_dense_path(config, training):
    """Loss, outputs and every parameter gradient agree to 1e-10 between the two paths,
    including the AuxK loss over dead latents."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 10, generator=g, dtype=F64)
    transcoder = isinstance(config, Transcoder)
    y = torch.randn(16, 8, generator=g, dtype=F64) if transcoder else None
    dead = torch.zeros(24, dtype=torch.bool)
    dead[::3] = True
    grads = {}
    for sparse in (True, False):
        variant = dataclasses.replace(config.variant, use_sparse_kernels=sparse)
        cfg = type(config)(variant) if transcoder else variant
        torch.manual_seed(0)
        d = build_dictionary(cfg, 10, 8 if transcoder else None, dtype=F64)
        with torch.no_grad():
            d.b_dec.normal_(generator=torch.Generator().manual_seed(8))
            if d.skip:
                d.W_skip.normal_(generator=torch.Generator().manual_seed(9))
        d.train(training)
        out = d(x, y, dead_mask=dead)
        out.loss.backward()
        grads[sparse] = (
            out.loss.detach(),
            out.x_hat.detach(),
            {n: p.grad for n, p in d.named_parameters()},
        )
    loss_s, xhat_s, g_s = grads[True]
    loss_d, xhat_d, g_d = grads[False]
    assert torch.allclose(loss_s, loss_d, rtol=0, atol=1e-10)
    assert torch.allclose(xhat_s, xhat_d, rtol=0, atol=1e-10)
    assert g_s.keys() == g_d.keys()
    for name in g_s:
        assert torch.allclose(g_s[name], g_d[name], rtol=0, atol=1e-10), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sparse_path_matches_cpu_and_trains():
    """On CUDA (float64) the sparse kernels agree with the dense path, and a short bf16-autocast
    training run on the GPU stays finite."""
    from interplab.dictionaries import TrainConfig, train_dictionaries

    x = torch.randn(64, 10, dtype=F64, device="cuda")
    dead = torch.zeros(24, dtype=torch.bool, device="cuda")
    dead[::4] = True
    grads = []
    for sparse in (True, False):
        torch.manual_seed(0)
        d = build_dictionary(TopK(24, k=4, use_sparse_kernels=sparse), 10, device="cuda", dtype=F64)
        d(x, dead_mask=dead).loss.backward()
        grads.append([p.grad for p in d.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    batches = (torch.randn(256, 10) for _ in range(10))
    [d] = train_dictionaries(
        [TopK(24, k=4)],
        batches,
        TrainConfig(batch_size=256, total_tokens=2560, lr_warmup_steps=0, progress=False),
        device="cuda",
    )
    assert d.W_dec.is_cuda and torch.isfinite(d.W_dec).all()
