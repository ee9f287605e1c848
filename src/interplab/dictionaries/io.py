"""Dictionary files: SAELens' layout (read and written) and EleutherAI sparsify's (read).

SAELens layout, one folder per dictionary:

    cfg.json                  {"architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input",
                               "normalize_activations", "k" (topk), "d_out" (transcoders),
                               "metadata": {"model_name", "hook_name", "hook_name_out", ...}}
    sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc, b_dec,
                              threshold (jumprelu), b_gate/r_mag/b_mag (gated), W_skip [d_out, d_in]

Architectures use SAELens' names where SAELens has the variant (standard, topk, jumprelu,
gated, transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder) and the
same pattern otherwise (topk_transcoder, gated_skip_transcoder, ...). BatchTopK is saved as
its inference form, a jumprelu (as SAELens does), and Matryoshka as a topk; the exact
interplab config rides along in `metadata.interplab_config`, so interplab reloads the same
variant while SAELens reads the file as the plain inference architecture.

sparsify layout: `cfg.json` with `k`, `num_latents` / `expansion_factor`, `d_in`,
`transcode`, `skip_connection`, and `sae.safetensors` with `encoder.weight [d_sae, d_in]`,
`encoder.bias`, `W_dec [d_sae, d_out]`, `b_dec`, optional `W_skip [d_out, d_in]`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from interplab.dictionaries.base import Dictionary
from interplab.dictionaries.build import build_dictionary
from interplab.dictionaries.configs import (
    DictionaryConfig,
    Gated,
    JumpReLU,
    ReLU,
    SAEConfig,
    SkipTranscoder,
    TopK,
    Transcoder,
    config_from_dict,
)
from interplab.errors import InterplabError, unknown

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"

_BASE_VARIANTS: dict[str, type[SAEConfig]] = {
    "standard": ReLU,
    "topk": TopK,
    "jumprelu": JumpReLU,
    "gated": Gated,
}
# SAELens 5 kept provenance at the top level of cfg.json instead of under "metadata".
_LEGACY_METADATA_KEYS = (
    "model_name",
    "hook_name",
    "hook_layer",
    "hook_head_index",
    "hook_name_out",
    "context_size",
    "dataset_path",
    "prepend_bos",
    "model_from_pretrained_kwargs",
    "sae_lens_training_version",
)


def architecture_name(base: str, transcoder: bool, skip: bool) -> str:
    """File architecture name for a base activation ("standard", "topk", ...)."""
    if not transcoder:
        return base
    prefix = "" if base == "standard" else f"{base}_"
    return f"{prefix}{'skip_' if skip else ''}transcoder"


KNOWN_ARCHITECTURES: tuple[str, ...] = tuple(
    architecture_name(base, transcoder, skip)
    for base in _BASE_VARIANTS
    for transcoder, skip in ((False, False), (True, False), (True, True))
)


def file_architecture(config: DictionaryConfig) -> str:
    """The cfg.json `architecture` a dictionary with this config is saved under."""
    transcoder = isinstance(config, Transcoder)
    return architecture_name(config.variant.architecture, transcoder, transcoder and config.skip)


def _parse_architecture(name: str) -> tuple[str, bool, bool]:
    if name not in KNOWN_ARCHITECTURES:
        raise unknown("dictionary architecture", name, KNOWN_ARCHITECTURES, show_all=True)
    for base in _BASE_VARIANTS:
        for transcoder, skip in ((False, False), (True, False), (True, True)):
            if architecture_name(base, transcoder, skip) == name:
                return base, transcoder, skip
    raise AssertionError(name)  # pragma: no cover


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: object) -> torch.dtype | None:
    if not isinstance(name, str):
        return None
    value = getattr(torch, name.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None


# ---------------------------------------------------------------------------- saving
def dictionary_cfg(
    dictionary: Dictionary, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The cfg.json contents for `dictionary` (SAELens fields + interplab config)."""
    config = dictionary.config
    cfg: dict[str, Any] = {
        "architecture": file_architecture(config),
        "d_in": dictionary.d_in,
        "d_sae": dictionary.d_sae,
        "dtype": _dtype_name(dictionary.W_dec.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": dictionary.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if config.variant.architecture == "topk":
        cfg["k"] = config.variant.k  # type: ignore[attr-defined]
        cfg["rescale_acts_by_decoder_norm"] = False
    if isinstance(config, Transcoder):
        cfg["d_out"] = dictionary.d_out
    from interplab import __version__

    cfg["metadata"] = {
        **dictionary.metadata,
        **(metadata or {}),
        "interplab_version": __version__,
        "interplab_config": config.to_dict(),
    }
    return cfg


def _same_dictionary(path: Path, cfg_text: str, tensors: dict[str, Tensor]) -> bool:
    try:
        if (path / CFG_FILE).read_text() != cfg_text:
            return False
        existing = load_file(str(path / WEIGHTS_FILE))
    except (OSError, SafetensorError):
        return False
    return existing.keys() == tensors.keys() and all(
        existing[k].dtype == v.dtype and torch.equal(existing[k], v) for k, v in tensors.items()
    )


def save_dictionary(
    dictionary: Dictionary,
    path: str | os.PathLike[str],
    metadata: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `dictionary` to folder `path` in SAELens' layout, atomically (a temporary folder
    renamed into place). `metadata` (e.g. model_name, hook_name, hook_name_out) is merged into
    `dictionary.metadata`. An existing folder holding the same dictionary is left as it is; a
    different one is only replaced with `overwrite=True`. Returns the folder."""
    path = Path(path)
    cfg = dictionary_cfg(dictionary, metadata)
    try:
        cfg_text = json.dumps(cfg, indent=2)
    except TypeError as error:
        raise InterplabError(f"dictionary metadata must be JSON-serialisable: {error}.") from error
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in dictionary.file_tensors().items()}
    if path.exists():
        if not path.is_dir():
            raise InterplabError(
                f"cannot save a dictionary to {path}: it exists and is not a folder."
            )
        if any(path.iterdir()) and not overwrite:
            if _same_dictionary(path, cfg_text, tensors):
                return path
            raise InterplabError(
                f"{path} already holds a different dictionary (or other files); "
                "pass overwrite=True to replace it."
            )
    return write_folder(path, cfg_text, tensors)


def write_folder(path: Path, cfg_text: str, tensors: dict[str, Any]) -> Path:
    """Write cfg.json and the weights into `path` atomically: a temporary sibling folder is
    filled and renamed into place, so a crash never leaves a half-written dictionary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{token}"
    tmp.mkdir()
    try:
        (tmp / CFG_FILE).write_text(cfg_text)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if path.exists():
            old = path.parent / f".{path.name}.old-{token}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------- loading
def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise InterplabError(f"{file} is not valid JSON: {error}.") from error
    if not isinstance(data, dict):
        raise InterplabError(f"{file} must hold a JSON object, got {type(data).__name__}.")
    return data


def _read_tensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise InterplabError(
            f"could not read {file}: {error}. The file may be truncated or corrupt."
        ) from error


def _int_field(cfg: dict[str, Any], key: str, file: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InterplabError(f"{file}: field {key!r} must be a positive integer, got {value!r}.")
    return value


def load_dictionary(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    activation_scale: float | None = None,
) -> Dictionary:
    """Load a dictionary folder in SAELens' layout (`cfg.json` + `sae_weights.safetensors`) or
    sparsify's (`cfg.json` + `sae.safetensors`). `dtype` defaults to the stored one.
    A folder written by `save_attention_transcoder` loads as an `AttentionTranscoder`.

    A SAELens file trained with `normalize_activations="expected_average_only_in"` whose
    scale was not folded into the weights expects pre-scaled inputs; pass that scale as
    `activation_scale` and it is folded in. Returns the dictionary in eval mode.
    """
    folder = Path(path)
    if not folder.exists():
        raise InterplabError(f"no dictionary at {folder}: the folder does not exist.")
    if not folder.is_dir():
        raise InterplabError(f"expected a dictionary folder, got the file {folder}.")
    cfg_file = folder / CFG_FILE
    if cfg_file.exists() and _is_attention_transcoder(cfg_file):
        from interplab.dictionaries.attention_transcoder import load_attention_transcoder

        if activation_scale is not None:
            raise InterplabError(
                f"{folder} holds an attention transcoder: its files carry no activation "
                "scale to fold, so activation_scale must be None."
            )
        return load_attention_transcoder(folder, device=device, dtype=dtype)  # type: ignore[return-value]
    if (folder / WEIGHTS_FILE).exists():
        weights_file, loader = folder / WEIGHTS_FILE, _load_saelens
    elif (folder / SPARSIFY_WEIGHTS_FILE).exists():
        weights_file, loader = folder / SPARSIFY_WEIGHTS_FILE, _load_sparsify
    else:
        raise InterplabError(
            f"no weights in {folder}: expected {WEIGHTS_FILE} (SAELens layout) "
            f"or {SPARSIFY_WEIGHTS_FILE} (sparsify layout)."
        )
    if not cfg_file.exists():
        raise InterplabError(f"missing {cfg_file}: a dictionary folder needs its config.")
    cfg = _read_json(cfg_file)
    tensors = _read_tensors(weights_file)
    dictionary = loader(cfg, tensors, cfg_file, device, dtype, activation_scale)
    return dictionary.eval()


def _is_attention_transcoder(cfg_file: Path) -> bool:
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return False  # the regular path reports the bad file
    return isinstance(cfg, dict) and cfg.get("architecture") == "attention_transcoder"


def _fill(dictionary: Dictionary, tensors: dict[str, Tensor], weights_name: str) -> None:
    expected = set(dictionary.file_tensors())
    extra = sorted(set(tensors) - expected)
    if extra:
        raise InterplabError(
            f"{weights_name}: unexpected tensors {extra} for architecture "
            f"{file_architecture(dictionary.config)!r} (expected {sorted(expected)})."
        )
    try:
        dictionary.load_file_tensors_(tensors)
    except InterplabError as error:
        raise InterplabError(f"{weights_name}: {error}") from None


def _load_saelens(
    cfg: dict[str, Any],
    tensors: dict[str, Tensor],
    cfg_file: Path,
    device: Any,
    dtype: torch.dtype | None,
    activation_scale: float | None,
) -> Dictionary:
    weights_name = str(cfg_file.parent / WEIGHTS_FILE)
    architecture = cfg.get("architecture", "standard")
    if not isinstance(architecture, str):
        raise InterplabError(f"{cfg_file}: 'architecture' must be a string, got {architecture!r}.")
    legacy_kwargs = cfg.get("activation_fn_kwargs") or {}
    if architecture == "standard" and cfg.get("activation_fn_str") == "topk":
        architecture = "topk"  # SAELens 5 stored TopK SAEs as "standard" + activation_fn_str
        cfg = {**cfg, "k": cfg.get("k", legacy_kwargs.get("k"))}
    base, transcoder, skip = _parse_architecture(architecture)
    d_in = _int_field(cfg, "d_in", cfg_file)
    d_sae = _int_field(cfg, "d_sae", cfg_file)
    d_out = _int_field(cfg, "d_out", cfg_file) if transcoder else d_in

    metadata = dict(cfg.get("metadata") or {})
    if not metadata:
        metadata = {k: cfg[k] for k in _LEGACY_METADATA_KEYS if k in cfg}
    saved_config = metadata.pop("interplab_config", None)
    metadata.pop("interplab_version", None)
    if saved_config is not None:
        config = config_from_dict(saved_config)
        if file_architecture(config) != architecture:
            raise InterplabError(
                f"{cfg_file}: architecture {architecture!r} disagrees with its interplab_config "
                f"(which is saved as {file_architecture(config)!r})."
            )
    else:
        apply_b_dec = cfg.get("apply_b_dec_to_input", not transcoder)
        kwargs: dict[str, Any] = {"apply_b_dec_to_input": bool(apply_b_dec)}
        if base == "topk":
            kwargs["k"] = _int_field(cfg, "k", cfg_file)
        variant = _BASE_VARIANTS[base](d_sae, **kwargs)
        config = (
            (SkipTranscoder(variant) if skip else Transcoder(variant)) if transcoder else variant
        )
    if config.variant.d_sae != d_sae:
        raise InterplabError(
            f"{cfg_file}: d_sae={d_sae} disagrees with its interplab_config (d_sae={config.variant.d_sae})."
        )

    normalization = cfg.get("normalize_activations", "none")
    if normalization not in ("none", "expected_average_only_in"):
        raise InterplabError(
            f"{cfg_file}: normalize_activations={normalization!r} is not supported; "
            "expected 'none' or 'expected_average_only_in'."
        )
    if normalization == "expected_average_only_in" and activation_scale is None:
        raise InterplabError(
            f"{cfg_file}: this dictionary expects inputs scaled by a constant it does not store "
            "(normalize_activations='expected_average_only_in'); pass activation_scale=..."
        )

    tensors = dict(tensors)
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    target_dtype = (
        dtype or _parse_dtype(cfg.get("dtype")) or tensors.get("W_dec", torch.empty(0)).dtype
    )
    dictionary = build_dictionary(
        config, d_in, d_out if transcoder else None, device=device, dtype=target_dtype
    )
    _fold_legacy_scales(tensors, cfg, dictionary)
    _fill(dictionary, tensors, weights_name)
    if normalization == "expected_average_only_in":
        assert activation_scale is not None
        dictionary.fold_activation_scale_(activation_scale, activation_scale)
    dictionary.metadata = metadata
    return dictionary


def _fold_legacy_scales(
    tensors: dict[str, Tensor], cfg: dict[str, Any], dictionary: Dictionary
) -> None:
    """Fold SAELens' optional per-latent rescalings into W_enc / W_dec so the plain forward
    pass reproduces them."""
    with torch.no_grad():
        if "scaling_factor" in tensors:  # SAELens 5 finetuning scale: (f * s) @ W_dec
            scale = tensors.pop("scaling_factor").to(torch.float64)
            tensors["W_dec"] = (tensors["W_dec"].to(torch.float64) * scale[:, None]).to(
                tensors["W_dec"].dtype
            )
        if cfg.get("rescale_acts_by_decoder_norm") and dictionary.variant.architecture == "topk":
            # TopK ranks pre * ||W_dec_i|| and decodes with W_dec_i / ||W_dec_i||.
            W_dec = tensors["W_dec"].to(torch.float64)
            norms = W_dec.norm(dim=1)
            dtype = tensors["W_dec"].dtype
            tensors["W_enc"] = (tensors["W_enc"].to(torch.float64) * norms).to(dtype)
            tensors["b_enc"] = (tensors["b_enc"].to(torch.float64) * norms).to(dtype)
            tensors["W_dec"] = (W_dec / norms[:, None].clamp_min(1e-12)).to(dtype)


def _load_sparsify(
    cfg: dict[str, Any],
    tensors: dict[str, Tensor],
    cfg_file: Path,
    device: Any,
    dtype: torch.dtype | None,
    activation_scale: float | None,
) -> Dictionary:
    weights_name = str(cfg_file.parent / SPARSIFY_WEIGHTS_FILE)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise InterplabError(
            f"{cfg_file}: sparsify activation {activation!r} is not supported; expected 'topk'."
        )
    for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
        if name not in tensors:
            raise InterplabError(f"{weights_name}: missing tensor {name!r} (sparsify layout).")
    encoder = tensors["encoder.weight"]
    d_in = cfg.get("d_in") or encoder.shape[1]
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in <= 0:
        raise InterplabError(f"{cfg_file}: field 'd_in' must be a positive integer, got {d_in!r}.")
    num_latents = cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor") or 0)
    if num_latents <= 0:
        raise InterplabError(f"{cfg_file}: needs 'num_latents' or 'expansion_factor'.")
    k = _int_field(cfg, "k", cfg_file)
    if tuple(encoder.shape) != (num_latents, d_in):
        raise InterplabError(
            f"{weights_name}: tensor 'encoder.weight' has shape {tuple(encoder.shape)}, "
            f"expected ({num_latents}, {d_in}) from {cfg_file.name}."
        )
    transcode = bool(cfg.get("transcode", False))
    skip = "W_skip" in tensors or bool(cfg.get("skip_connection", False))
    d_out = tensors["W_dec"].shape[-1]
    variant = TopK(num_latents, k=k, apply_b_dec_to_input=not transcode)
    config: DictionaryConfig = variant
    if skip:
        config = SkipTranscoder(variant)
    elif transcode:
        config = Transcoder(variant)
    renamed = {
        "W_enc": encoder.T.contiguous(),
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    if "W_skip" in tensors:
        renamed["W_skip"] = tensors["W_skip"]
    extra = sorted(set(tensors) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip"})
    if extra:
        raise InterplabError(f"{weights_name}: unexpected tensors {extra} (sparsify layout).")
    dictionary = build_dictionary(
        config,
        d_in,
        d_out if isinstance(config, Transcoder) else None,
        device=device,
        dtype=dtype or encoder.dtype,
    )
    _fill(dictionary, renamed, weights_name)
    if activation_scale is not None:
        dictionary.fold_activation_scale_(activation_scale, activation_scale)
    dictionary.metadata = {"source_format": "sparsify"}
    return dictionary
