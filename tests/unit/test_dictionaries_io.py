"""Dictionary files: SAELens layout round trips, reading SAELens / sparsify files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from interplab.dictionaries import (
    BatchTopK,
    Gated,
    JumpReLU,
    Matryoshka,
    ReLU,
    SkipTranscoder,
    TopK,
    Transcoder,
    build_dictionary,
    load_dictionary,
    save_dictionary,
)
from interplab.dictionaries.io import KNOWN_ARCHITECTURES
from interplab.errors import InterplabError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP contention on a shared 2-core machine (this
    runs after any session-wide thread setting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


CONFIGS = [
    ReLU(16),
    TopK(16, k=3),
    BatchTopK(16, k=3),
    JumpReLU(16, threshold_param="log"),
    JumpReLU(16),
    Gated(16),
    Matryoshka(16, k=3, prefixes=(4,)),
    Transcoder(TopK(16, k=3)),
    Transcoder(ReLU(16)),
    SkipTranscoder(JumpReLU(16)),
    SkipTranscoder(Gated(16)),
]
ARCHITECTURES = [
    "standard",
    "topk",
    "jumprelu",
    "jumprelu",
    "jumprelu",
    "gated",
    "topk",
    "topk_transcoder",
    "transcoder",
    "jumprelu_skip_transcoder",
    "gated_skip_transcoder",
]


def _randomised(config, seed=0):
    torch.manual_seed(seed)
    transcoder = isinstance(config, Transcoder)
    d = build_dictionary(config, 8, 6 if transcoder else None)
    with torch.no_grad():
        for param in d.parameters():
            param.add_(0.1 * torch.randn_like(param))
        if isinstance(config.variant, BatchTopK):
            d.threshold.fill_(0.2)
    return d.eval()


@pytest.mark.parametrize(
    ("config", "architecture"), list(zip(CONFIGS, ARCHITECTURES, strict=True)), ids=str
)
def test_roundtrip_gives_identical_outputs(tmp_path, config, architecture):
    d = _randomised(config)
    x = torch.randn(20, 8)
    path = save_dictionary(
        d, tmp_path / "dict", {"model_name": "toy", "hook_name": "blocks.0.hook_resid_post"}
    )
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == architecture
    assert cfg["d_in"] == 8 and cfg["d_sae"] == 16 and cfg["dtype"] == "float32"
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    if isinstance(config, Transcoder):
        assert cfg["d_out"] == 6 and cfg["apply_b_dec_to_input"] is False
    if architecture.startswith("topk"):
        assert cfg["k"] == 3
    loaded = load_dictionary(path)
    assert type(loaded) is type(d) and loaded.config == config
    assert loaded.metadata["model_name"] == "toy"
    assert not loaded.training
    latents = d.encode(x)
    assert torch.equal(loaded.encode(x), latents)
    assert torch.equal(loaded.decode(latents, x), d.decode(latents, x))
    assert not list(tmp_path.glob(".dict*"))  # no temporary folders left behind


def test_save_refuses_to_overwrite_a_different_dictionary(tmp_path):
    a, b = _randomised(TopK(16, k=3), seed=0), _randomised(TopK(16, k=3), seed=1)
    save_dictionary(a, tmp_path / "d")
    save_dictionary(a, tmp_path / "d")  # identical: no-op
    with pytest.raises(InterplabError, match="already holds a different dictionary"):
        save_dictionary(b, tmp_path / "d")
    assert torch.equal(load_dictionary(tmp_path / "d").W_enc, a.W_enc)
    save_dictionary(b, tmp_path / "d", overwrite=True)
    assert torch.equal(load_dictionary(tmp_path / "d").W_enc, b.W_enc)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InterplabError, match="not a folder"):
        save_dictionary(a, tmp_path / "file")
    with pytest.raises(InterplabError, match="JSON-serialisable"):
        save_dictionary(a, tmp_path / "e", {"bad": object()})


def _write_saelens(folder: Path, cfg: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors")
    )
    return folder


def _random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_reads_saelens_standard_jumprelu_gated_skip_transcoder(tmp_path):
    d_in, d_sae = 5, 7
    x = _random(9, d_in, seed=0)
    W_enc, W_dec = _random(d_in, d_sae, seed=1), _random(d_sae, d_in, seed=2)
    b_enc, b_dec = _random(d_sae, seed=3), _random(d_in, seed=4)
    base = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "normalize_activations": "none"}

    std = load_dictionary(
        _write_saelens(
            tmp_path / "std",
            {
                **base,
                "architecture": "standard",
                "apply_b_dec_to_input": True,
                "metadata": {"hook_name": "h"},
            },
            {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec},
        )
    )
    expected = torch.relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec
    assert torch.allclose(std.decode(std.encode(x)), expected, atol=1e-6)
    assert std.metadata == {"hook_name": "h"}

    threshold = torch.rand(d_sae) * 0.5
    jump = load_dictionary(
        _write_saelens(
            tmp_path / "jump",
            {**base, "architecture": "jumprelu", "apply_b_dec_to_input": False},
            {
                "W_enc": W_enc,
                "W_dec": W_dec,
                "b_enc": b_enc,
                "b_dec": b_dec,
                "threshold": threshold,
            },
        )
    )
    pre = x @ W_enc + b_enc
    assert torch.allclose(jump.encode(x), pre.relu() * (pre > threshold))

    b_gate, r_mag, b_mag = _random(d_sae, seed=5), _random(d_sae, seed=6), _random(d_sae, seed=7)
    gated = load_dictionary(
        _write_saelens(
            tmp_path / "gated",
            {**base, "architecture": "gated", "apply_b_dec_to_input": True},
            {
                "W_enc": W_enc,
                "W_dec": W_dec,
                "b_dec": b_dec,
                "b_gate": b_gate,
                "r_mag": r_mag,
                "b_mag": b_mag,
            },
        )
    )
    xc = x - b_dec
    gate = (xc @ W_enc + b_gate) > 0
    mag = (xc @ (W_enc * r_mag.exp()) + b_mag).relu()
    assert torch.allclose(gated.encode(x), gate * mag, atol=1e-6)

    W_skip = _random(3, d_in, seed=8)
    W_dec3, b_dec3 = _random(d_sae, 3, seed=9), _random(3, seed=10)
    skip = load_dictionary(
        _write_saelens(
            tmp_path / "skip",
            {
                **base,
                "architecture": "skip_transcoder",
                "d_out": 3,
                "apply_b_dec_to_input": False,
                "metadata": {"hook_name_out": "blocks.0.hook_mlp_out"},
            },
            {"W_enc": W_enc, "W_dec": W_dec3, "b_enc": b_enc, "b_dec": b_dec3, "W_skip": W_skip},
        )
    )
    expected = torch.relu(x @ W_enc + b_enc) @ W_dec3 + b_dec3 + x @ W_skip.T
    assert torch.allclose(skip.decode(skip.encode(x), x), expected, atol=1e-5)
    assert skip.metadata["hook_name_out"] == "blocks.0.hook_mlp_out"


def test_reads_saelens_topk_variants(tmp_path):
    d_in, d_sae, k = 5, 9, 2
    x = _random(11, d_in, seed=0)
    W_enc, b_enc = _random(d_in, d_sae, seed=1), _random(d_sae, seed=3)
    W_dec, b_dec = (
        _random(d_sae, d_in, seed=2) * torch.linspace(0.5, 2, d_sae)[:, None],
        _random(d_in, seed=4),
    )
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    base = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "apply_b_dec_to_input": True}

    def topk_reference(pre, W):
        top = pre.topk(k)
        return torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()) @ W + b_dec

    pre = (x - b_dec) @ W_enc + b_enc
    plain = load_dictionary(
        _write_saelens(tmp_path / "v6", {**base, "architecture": "topk", "k": k}, tensors)
    )
    assert torch.allclose(plain.decode(plain.encode(x)), topk_reference(pre, W_dec), atol=1e-5)
    # SAELens 5: "standard" + activation_fn_str, with a finetuning scaling_factor tensor
    scale = torch.linspace(0.5, 1.5, d_sae)
    legacy = load_dictionary(
        _write_saelens(
            tmp_path / "v5",
            {
                **base,
                "architecture": "standard",
                "activation_fn_str": "topk",
                "activation_fn_kwargs": {"k": k},
                "model_name": "gpt2",
                "hook_name": "blocks.1.hook_resid_pre",
            },
            {**tensors, "scaling_factor": scale},
        )
    )
    assert torch.allclose(
        legacy.decode(legacy.encode(x)), topk_reference(pre, W_dec * scale[:, None]), atol=1e-5
    )
    assert legacy.metadata["hook_name"] == "blocks.1.hook_resid_pre"
    # rescale_acts_by_decoder_norm: rank by pre * ||W_dec_i||, decode with unit rows
    norms = W_dec.norm(dim=1)
    rescaled = load_dictionary(
        _write_saelens(
            tmp_path / "rescaled",
            {**base, "architecture": "topk", "k": k, "rescale_acts_by_decoder_norm": True},
            tensors,
        )
    )
    assert torch.allclose(
        rescaled.decode(rescaled.encode(x)),
        topk_reference(pre * norms, W_dec / norms[:, None]),
        atol=1e-5,
    )
    # expected_average_only_in without folding: inputs must be pre-scaled by a known factor
    folder = _write_saelens(
        tmp_path / "scaled",
        {
            **base,
            "architecture": "topk",
            "k": k,
            "normalize_activations": "expected_average_only_in",
        },
        tensors,
    )
    with pytest.raises(InterplabError, match="pass activation_scale"):
        load_dictionary(folder)
    scaled = load_dictionary(folder, activation_scale=2.0)
    assert torch.allclose(
        scaled.decode(scaled.encode(x)),
        topk_reference((2 * x - b_dec) @ W_enc + b_enc, W_dec) / 2,
        atol=1e-5,
    )


def test_reads_sparsify_layout(tmp_path):
    d_in, n_latents, k = 6, 12, 3
    x = _random(10, d_in, seed=0)
    enc_w, enc_b = _random(n_latents, d_in, seed=1), _random(n_latents, seed=2)
    W_dec, b_dec = _random(n_latents, d_in, seed=3), _random(d_in, seed=4)
    folder = tmp_path / "layers.3"
    folder.mkdir()
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "activation": "topk",
                "expansion_factor": 2,
                "normalize_decoder": True,
                "num_latents": 0,
                "k": k,
                "multi_topk": False,
                "skip_connection": False,
                "d_in": d_in,
            }
        )
    )
    save_file(
        {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
        str(folder / "sae.safetensors"),
    )
    sae = load_dictionary(folder)
    # sparsify: relu(linear(x - b_dec)), top-k, sum of selected decoder rows + b_dec
    acts = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    top = acts.topk(k)
    expected = (top.values[..., None] * W_dec[top.indices]).sum(1) + b_dec
    assert torch.allclose(sae.decode(sae.encode(x)), expected, atol=1e-5)
    assert isinstance(sae.config, TopK) and sae.config.k == k and sae.d_sae == n_latents

    tc = tmp_path / "transcoder"
    tc.mkdir()
    W_skip = _random(d_in, d_in, seed=5)
    (tc / "cfg.json").write_text(
        json.dumps(
            {
                "k": k,
                "num_latents": n_latents,
                "transcode": True,
                "skip_connection": True,
                "d_in": d_in,
            }
        )
    )
    save_file(
        {
            "encoder.weight": enc_w,
            "encoder.bias": enc_b,
            "W_dec": W_dec,
            "b_dec": b_dec,
            "W_skip": W_skip,
        },
        str(tc / "sae.safetensors"),
    )
    transcoder = load_dictionary(tc)
    acts = torch.relu(x @ enc_w.T + enc_b)
    top = acts.topk(k)
    expected = (top.values[..., None] * W_dec[top.indices]).sum(1) + b_dec + x @ W_skip.T
    assert torch.allclose(transcoder.decode(transcoder.encode(x), x), expected, atol=1e-5)


def test_load_errors(tmp_path):
    with pytest.raises(InterplabError, match="does not exist"):
        load_dictionary(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InterplabError, match="no weights in"):
        load_dictionary(empty)

    d = _randomised(TopK(16, k=3))
    good = save_dictionary(d, tmp_path / "good")

    def variant(name, edit_cfg=None, edit_tensors=None, truncate=False):
        folder = tmp_path / name
        folder.mkdir()
        cfg = json.loads((good / "cfg.json").read_text())
        if edit_cfg:
            edit_cfg(cfg)
        (folder / "cfg.json").write_text(json.dumps(cfg))
        data = (good / "sae_weights.safetensors").read_bytes()
        if truncate:
            data = data[: len(data) // 2]
        (folder / "sae_weights.safetensors").write_bytes(data)
        return folder

    def unknown_arch(cfg):
        cfg["architecture"] = "topkk"
        del cfg["metadata"]["interplab_config"]

    with pytest.raises(InterplabError, match="unknown dictionary architecture 'topkk'") as info:
        load_dictionary(variant("arch", unknown_arch))
    assert all(name in str(info.value) for name in KNOWN_ARCHITECTURES)

    folder = variant("trunc", truncate=True)
    with pytest.raises(
        InterplabError,
        match=r"could not read .*trunc.*sae_weights.safetensors.*truncated or corrupt",
    ):
        load_dictionary(folder)

    def wrong_d_in(cfg):
        cfg["d_in"] = 9

    with pytest.raises(
        InterplabError, match=r"tensor 'W_enc' has shape \(8, 16\), expected \(9, 16\)"
    ):
        load_dictionary(variant("shape", wrong_d_in))

    def wrong_d_sae(cfg):
        cfg["d_sae"] = 15

    with pytest.raises(InterplabError, match="d_sae=15 disagrees"):
        load_dictionary(variant("dsae", wrong_d_sae))

    no_cfg = variant("nocfg")
    (no_cfg / "cfg.json").unlink()
    with pytest.raises(InterplabError, match="missing .*cfg.json"):
        load_dictionary(no_cfg)

    bad_json = variant("json")
    (bad_json / "cfg.json").write_text("{not json")
    with pytest.raises(InterplabError, match="not valid JSON"):
        load_dictionary(bad_json)

    def layer_norm(cfg):
        cfg["normalize_activations"] = "layer_norm"

    with pytest.raises(InterplabError, match="normalize_activations='layer_norm' is not supported"):
        load_dictionary(variant("ln", layer_norm))

    extra = variant("extra")
    tensors = {k: v for k, v in d.file_tensors().items()}
    save_file({**tensors, "surprise": torch.zeros(2)}, str(extra / "sae_weights.safetensors"))
    with pytest.raises(InterplabError, match=r"unexpected tensors \['surprise'\]"):
        load_dictionary(extra)

    missing = variant("missingtensor")
    save_file(
        {k: v for k, v in tensors.items() if k != "b_enc"}, str(missing / "sae_weights.safetensors")
    )
    with pytest.raises(InterplabError, match="missing tensor 'b_enc'"):
        load_dictionary(missing)
