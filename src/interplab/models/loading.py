"""`load_model(spec)`: one entry point from any model description to a hooked model.

Returns a TransformerLens 4 `TransformerBridge`, which wraps the real HuggingFace module
(exact HF numerics) and exposes TransformerLens hook names. Accepted specs, tried in order:

1. a `ToyConfig` (or `TransformerBridgeConfig`): a native model, built offline;
2. a HuggingFace model object already in memory (`PreTrainedModel`);
3. the name of a bundled model organism (`interplab models` lists them);
4. a path to a local directory in HuggingFace format (`config.json` + weights);
5. a hub id such as `"gpt2"` or `"EleutherAI/pythia-70m"`: from the local HF cache, or
   downloaded when the hub is reachable; offline, it fails at once saying so.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from interplab.errors import InterplabError
from interplab.models.toy import ToyConfig

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` means CUDA when present, else CPU. Refuses devices this machine lacks."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InterplabError(
            f"device {device!r} is not a valid torch device; expected 'cpu', 'cuda' or 'cuda:N'."
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InterplabError(
            f"device {device!r} requested but CUDA is not available here; use device='cpu'."
        )
    if (
        resolved.type == "cuda"
        and resolved.index is not None
        and resolved.index >= torch.cuda.device_count()
    ):
        raise InterplabError(
            f"device {device!r}: only {torch.cuda.device_count()} CUDA devices are visible."
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InterplabError(
            f"device {device!r} requested but MPS is not available here; use device='cpu'."
        )
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise InterplabError(
            f"device {device!r} is not supported; expected 'cpu', 'cuda' or 'mps'."
        )
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Accepts a torch dtype or a name like 'float32' / 'bf16'; `None` means float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InterplabError(
                f"dtype {dtype} is not a floating-point type; expected e.g. torch.float32."
            )
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise InterplabError(f"unknown dtype {dtype!r}; expected one of {', '.join(sorted(_DTYPES))}.")


def load_model(
    spec: Any,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    tokenizer: Any = None,
) -> Any:
    """Load `spec` (see module docstring) as a hooked `TransformerBridge` in eval mode.

    Args:
        spec: organism name, local HF directory, hub id, HF model object or `ToyConfig`.
        device: 'cpu', 'cuda', 'cuda:1', ...; None = CUDA when present, else CPU.
        dtype: float32 (default), bfloat16, float16 or float64.
        tokenizer: optional tokenizer to attach (overrides the one found beside the weights).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    with _quiet():
        model = _load(spec, dtype=dtype, tokenizer=tokenizer)
        model = model.to(device)
    from interplab.models.resid_mid import link_resid_mid

    link_resid_mid(model)  # editing hook_resid_mid reaches the skip connection, as in TL
    model.eval()
    return model


@contextmanager
def _quiet() -> Iterator[None]:
    """Loading chatter (transformers' weight-loading bars and advice, TransformerLens's
    "Moving model to device") is not the user's business; errors still propagate."""
    import io
    from contextlib import redirect_stdout

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load(spec: Any, *, dtype: torch.dtype, tokenizer: Any) -> Any:
    from transformer_lens.config import TransformerBridgeConfig

    if isinstance(spec, ToyConfig):
        return _boot_native(spec.to_bridge_config(), dtype, tokenizer)
    if isinstance(spec, TransformerBridgeConfig):
        return _boot_native(spec, dtype, tokenizer)
    if isinstance(spec, torch.nn.Module):
        if not hasattr(spec, "config"):
            raise InterplabError(
                f"cannot load a {type(spec).__name__}: expected a HuggingFace PreTrainedModel "
                "(with a .config), an organism name, a local directory, a hub id or a ToyConfig."
            )
        return _bridge_from_hf(spec.to(dtype), tokenizer)
    if not isinstance(spec, str | Path):
        raise InterplabError(
            f"cannot load a model from {type(spec).__name__}; expected an organism name, a local "
            "directory, a hub id, a HuggingFace model object or a ToyConfig."
        )

    from interplab.models import organisms

    name = str(spec)
    if name in organisms.organism_names():
        return _load_directory(organisms.organism_path(name), dtype, tokenizer)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        return _load_directory(path, dtype, tokenizer)
    return _load_hub(name, dtype, tokenizer)


def _boot_native(config: Any, dtype: torch.dtype, tokenizer: Any) -> Any:
    import transformer_lens.model_bridge.sources  # noqa: F401  (attaches boot_native)
    from transformer_lens.model_bridge import TransformerBridge

    with _in_memory_tokenizer_workaround(tokenizer):
        return TransformerBridge.boot_native(config, tokenizer=tokenizer, dtype=dtype)


def _load_directory(path: Path, dtype: torch.dtype, tokenizer: Any) -> Any:
    from transformers import AutoModelForCausalLM

    if not path.is_dir():
        raise InterplabError(
            f"model directory {str(path)!r} does not exist; expected a folder in HuggingFace format "
            "(config.json + model.safetensors), an organism name (`interplab models`) or a hub id."
        )
    if not (path / "config.json").is_file():
        raise InterplabError(
            f"directory {str(path)!r} has no config.json; expected a HuggingFace model folder "
            "(config.json + model.safetensors [+ tokenizer.json])."
        )
    try:
        # Eager attention so attention patterns are real tensors TransformerLens can hook.
        hf_model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="eager"
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise InterplabError(
            f"could not load the HuggingFace model in {str(path)!r}: {error}"
        ) from error
    if tokenizer is None:
        tokenizer = _local_tokenizer(path)
    return _bridge_from_hf(hf_model, tokenizer, model_name=path.name)


def _local_tokenizer(path: Path) -> Any:
    if not any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _bridge_from_hf(hf_model: Any, tokenizer: Any, model_name: str | None = None) -> Any:
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    config = hf_model.config
    architectures = getattr(config, "architectures", None) or [type(hf_model).__name__]
    architecture = architectures[0]
    if getattr(config, "_attn_implementation", None) not in (None, "eager"):
        config._attn_implementation = "eager"
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    if architecture not in SUPPORTED_ARCHITECTURES:
        raise InterplabError(
            f"TransformerLens has no adapter for architecture {architecture!r}; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}."
        )
    pad = getattr(config, "pad_token_id", None)
    if pad is not None and hasattr(hf_model, "warn_if_padding_and_no_attention_mask"):
        # Organisms use one id for BOS and padding, so every prompt "looks padded" to HF's
        # one-time advice; trigger it here, silenced, so it never reaches the user.
        hf_model.warn_if_padding_and_no_attention_mask(torch.tensor([[pad]]), None)
    with _in_memory_tokenizer_workaround(tokenizer):
        return build_bridge_from_module(
            hf_model,
            architecture=architecture,
            hf_config=config,
            tokenizer=tokenizer,
            model_name=model_name or getattr(config, "_name_or_path", None) or architecture,
        )


@contextmanager
def _in_memory_tokenizer_workaround(tokenizer: Any) -> Iterator[None]:
    """TransformerLens 4.3's `get_tokenizer_with_bos` re-loads the tokenizer from
    `init_kwargs["name_or_path"]`, which a tokenizer built in memory does not have (KeyError).
    Marking it `add_bos_token` makes TL keep the object as it is; TL then measures whether it
    really prepends BOS (`detect_tokenizer_bos_eos`), so behaviour is unchanged. The original
    init kwargs are restored afterwards. `tests/unit/test_models.py` shows the bug."""
    kwargs = getattr(tokenizer, "init_kwargs", None)
    if tokenizer is None or kwargs is None or kwargs.get("name_or_path"):
        yield
        return
    saved = dict(kwargs)
    kwargs.setdefault("name_or_path", "")
    kwargs["add_bos_token"] = True
    try:
        yield
    finally:
        kwargs.clear()
        kwargs.update(saved)


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(model_id: str, dtype: torch.dtype, tokenizer: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from interplab.models import organisms

    def attempt(local_only: bool) -> Any:
        hf_model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=dtype, attn_implementation="eager", local_files_only=local_only
        )
        tok = tokenizer or AutoTokenizer.from_pretrained(model_id, local_files_only=local_only)
        return _bridge_from_hf(hf_model, tok, model_name=model_id)

    try:  # the local HF cache first: no network needed
        return attempt(local_only=True)
    except OSError:
        pass
    if not _hub_reachable():
        known = ", ".join(organisms.organism_names()) or "(none bundled)"
        raise InterplabError(
            f"{model_id!r} is not a bundled organism, not a local directory, and not in the local "
            "HuggingFace cache, and the hub is unreachable (offline). Pass a local directory in "
            f"HuggingFace format instead, e.g. load_model('/path/to/{model_id.split('/')[-1]}'), "
            f"or a bundled organism: {known}."
        )
    try:
        return attempt(local_only=False)
    except OSError as error:
        raise InterplabError(f"could not load {model_id!r} from the hub: {error}") from error
