"""What a latent is about: its top-activating token contexts and the tokens it promotes.

Two views that dictionary-feature dashboards show first (Bricken et al. 2023, "Towards
Monosemanticity"; Templeton et al. 2024, "Scaling Monosemanticity"):

* `top_activations(model, dictionary, tokens)`: run the model over token windows, encode the
  hook's activations with the dictionary, and keep each latent's `k` largest activations
  anywhere in the windows, each with the `window` tokens around it and the latent's
  activation on every one of them (for highlighting).
* `logit_effects(model, dictionary)`: the direct effect of each latent's decoder direction on
  the logits, `W_dec @ W_U`, ignoring the final normalisation (its scale depends on the whole
  residual stream and its centring shifts every logit equally, so it changes magnitudes but
  not which tokens rank first); the biggest and smallest entries are the tokens the latent
  promotes and suppresses when added to the residual stream.

Both return typed results that render themselves to self-contained HTML (`to_html`) for
`interplab.runs.Report.html`.
"""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.dictionaries.base import Dictionary
from interplab.errors import InterplabError

__all__ = ["FeatureExample", "LogitEffects", "TopActivations", "logit_effects", "top_activations"]

# Hooks whose activations live in the residual stream (the unembedding's input space).
_RESIDUAL_HOOK = re.compile(
    r"(^hook_embed|^hook_pos_embed|hook_resid_(pre|mid|post)|hook_attn_out|hook_mlp_out)$"
)


# ---------------------------------------------------------------------- results
@dataclass
class FeatureExample:
    """One top-activating token of a latent with the tokens around it."""

    seq: int
    """Row of the `tokens` tensor the example comes from."""
    pos: int
    """Position of the activating token in that row."""
    value: float
    """The latent's activation at (seq, pos)."""
    start: int
    """Position of `tokens[0]` in the row (the context window starts here)."""
    tokens: list[int]
    """Token ids of the context window, in order."""
    text: list[str]
    """Each context token as text (`<id>` when the model has no tokenizer)."""
    acts: list[float]
    """The latent's activation on each context token."""

    @property
    def focus(self) -> int:
        """Index of the activating token within `tokens`."""
        return self.pos - self.start

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "pos": self.pos,
            "value": self.value,
            "start": self.start,
            "tokens": self.tokens,
            "text": self.text,
            "acts": self.acts,
        }


@dataclass
class TopActivations:
    """The `k` largest activations of some latents over a set of token windows."""

    hook_name: str
    """Hook the dictionary read."""
    latents: list[int]
    """Latent indices, in the order of every per-latent field."""
    values: Float[Tensor, "latent k"]
    """The k largest activations of each latent, descending (0 where it fired fewer times)."""
    seq: Int[Tensor, "latent k"]
    """Row of each of them in `tokens`."""
    pos: Int[Tensor, "latent k"]
    """Position of each of them in its row."""
    density: Float[Tensor, " latent"]
    """Fraction of the scanned tokens on which each latent is > 0."""
    n_tokens: int
    """Tokens scanned (BOS positions excluded unless `include_bos`)."""
    window: int
    """Context tokens per example."""
    examples: list[list[FeatureExample]] = field(repr=False)
    """Per latent, its examples with activation > 0, largest first."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per latent its density and examples."""
        return {
            "hook_name": self.hook_name,
            "n_tokens": self.n_tokens,
            "window": self.window,
            "latents": [
                {
                    "latent": latent,
                    "density": float(self.density[i]),
                    "examples": [e.to_dict() for e in self.examples[i]],
                }
                for i, latent in enumerate(self.latents)
            ],
        }

    def to_html(self, effects: LogitEffects | None = None, max_examples: int | None = None) -> str:
        """One block per latent: its density, the tokens it promotes (when `effects` covers
        it) and its top contexts, each token shaded by the latent's activation on it (relative
        to the latent's largest one) and the activating token outlined. Self-contained HTML
        (inline styles only), every token escaped."""
        by_latent = {} if effects is None else effects.by_latent()
        parts = ['<div style="margin:1rem 0">']
        for i, latent in enumerate(self.latents):
            examples = self.examples[i][:max_examples]
            peak = max((e.value for e in examples), default=0.0)
            parts.append(
                '<div style="margin:0 0 1.2rem;padding:.5rem .8rem;border:1px solid #d1d9e0;'
                'border-radius:6px">'
                f"<div><strong>Latent {latent}</strong> "
                f'<span style="color:#59636e">firing density {100 * float(self.density[i]):.3g}%'
                f" · max activation {peak:.3g}</span></div>"
            )
            if latent in by_latent:
                promoted, suppressed = by_latent[latent]
                parts.append(_token_list("promotes", promoted, "#1a7f37"))
                parts.append(_token_list("suppresses", suppressed, "#cf222e"))
            if not examples:
                parts.append('<div style="color:#59636e">never fires on these tokens</div>')
            for example in examples:
                parts.append(_example_html(example, peak))
            parts.append("</div>")
        parts.append("</div>")
        return "".join(parts)


@dataclass
class LogitEffects:
    """Tokens each latent's decoder direction promotes and suppresses through `W_U` (final
    norm ignored; see the module docstring)."""

    latents: list[int]
    """Latent indices, in the order of every per-latent field."""
    top_tokens: Int[Tensor, "latent k"]
    """Token ids with the largest `(W_dec @ W_U)` entries, descending."""
    top_values: Float[Tensor, "latent k"]
    """Those entries (logit change per unit of latent activation)."""
    bottom_tokens: Int[Tensor, "latent k"]
    """Token ids with the smallest entries, ascending."""
    bottom_values: Float[Tensor, "latent k"]
    """Those entries."""
    top_text: list[list[str]]
    """`top_tokens` as text."""
    bottom_text: list[list[str]]
    """`bottom_tokens` as text."""

    def by_latent(self) -> dict[int, tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
        """latent -> ([(promoted token, value)], [(suppressed token, value)])."""
        out = {}
        for i, latent in enumerate(self.latents):
            top = list(zip(self.top_text[i], self.top_values[i].tolist(), strict=True))
            bottom = list(zip(self.bottom_text[i], self.bottom_values[i].tolist(), strict=True))
            out[latent] = (top, bottom)
        return out

    def rows(self, n: int = 5) -> list[dict[str, Any]]:
        """Table rows: latent, its first `n` promoted and suppressed tokens."""
        return [
            {
                "latent": latent,
                "promotes": " ".join(repr(t) for t in self.top_text[i][:n]),
                "suppresses": " ".join(repr(t) for t in self.bottom_text[i][:n]),
            }
            for i, latent in enumerate(self.latents)
        ]


# ---------------------------------------------------------------------- top activations
class _StopForward(Exception):
    """Raised in the hook once its activation is captured: later layers are not needed."""


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InterplabError(f"{name} must be a positive integer, got {value!r}.")


def _check_latents(dictionary: Dictionary, latents: Sequence[int] | None) -> list[int]:
    if latents is None:
        return list(range(dictionary.d_sae))
    chosen = [int(i) for i in latents]
    bad = [i for i in chosen if not 0 <= i < dictionary.d_sae]
    if not chosen or bad:
        raise InterplabError(
            f"latents must be a non-empty list of indices in [0, {dictionary.d_sae}), "
            f"got {list(latents)!r}."
        )
    if len(set(chosen)) != len(chosen):
        raise InterplabError(f"latents repeat an index: {chosen}.")
    return chosen


def _hook_name(dictionary: Dictionary, hook_name: str | None) -> str:
    name = hook_name or dictionary.metadata.get("hook_name")
    if not name:
        raise InterplabError(
            "the dictionary's metadata names no hook_name; pass hook_name=... "
            "(e.g. 'blocks.2.hook_resid_post')."
        )
    return str(name)


def _latent_acts(
    model: Any,
    dictionary: Dictionary,
    hook_name: str,
    tokens: Int[Tensor, "batch pos"],
    latents: list[int],
    device: torch.device,
) -> Float[Tensor, "batch pos latent"]:
    """Activations of `latents` on every position of `tokens` (one early-stopped forward)."""
    captured: list[Tensor] = []

    def grab(act: Tensor, hook: Any) -> None:
        captured.append(act.detach())
        raise _StopForward

    with (
        torch.inference_mode(),
        model.hooks(fwd_hooks=[(hook_name, grab)]),
        contextlib.suppress(_StopForward),
    ):
        model(tokens.to(device))
    if not captured:
        raise InterplabError(f"hook {hook_name!r} did not fire in a forward pass of this model.")
    act = captured[0]
    if act.ndim != 3 or act.shape[-1] != dictionary.d_in:
        raise InterplabError(
            f"hook {hook_name!r} gives activations of shape {tuple(act.shape)}, but the "
            f"dictionary reads [batch, pos, d_in={dictionary.d_in}]: it was trained on another "
            "hook or model."
        )
    with torch.inference_mode():
        x = act.to(device=dictionary.W_enc.device, dtype=dictionary.W_enc.dtype)
        codes = dictionary.encode(x)  # [batch, pos, d_sae]
        if len(latents) != dictionary.d_sae:
            codes = codes[..., torch.tensor(latents, device=codes.device)]
    return codes.float().cpu()


def top_activations(
    model: Any,
    dictionary: Dictionary,
    tokens: Int[Tensor, "seq pos"],
    *,
    hook_name: str | None = None,
    k: int = 10,
    window: int = 12,
    latents: Sequence[int] | None = None,
    batch_size: int = 32,
    include_bos: bool = False,
    device: str | torch.device | None = None,
) -> TopActivations:
    """Each latent's `k` largest activations over `tokens`, with their contexts.

    The model runs over `tokens` in batches of `batch_size` rows (stopping after the hook);
    the hook's activations are encoded with `dictionary` (inference latents, `encode`) and a
    running top-k per latent is kept (ties go to the earlier position). A second pass over
    just the rows that hold a top example reads the latent's activation on every token of its
    context, so memory stays O(latents * k) however many tokens are scanned.

    Args:
        model: a hooked model from `interplab.load_model`.
        dictionary: the dictionary; `hook_name` defaults to its metadata.
        tokens: [seq, pos] token windows, e.g. `interplab.data.corpus.pack(...).ids`.
        hook_name: the hook the dictionary reads.
        k: examples kept per latent.
        window: context tokens per example: the activating token, `window // 4` tokens after
            it and the rest before it (fewer at the edges of a row).
        latents: which latents (default all `d_sae`).
        batch_size: rows per forward pass.
        include_bos: also consider position 0 of every row (the BOS, an outlier that
            dictionaries are usually not trained on; excluded by default, as in
            `interplab.activations`).
        device: where the model runs; None = the model's device. Encoding happens where the
            dictionary lives.
    Returns:
        `TopActivations`; `examples[i]` lists latent `latents[i]`'s examples with activation
        > 0, largest first.
    """
    from interplab.models.hooks import check_hook_names

    if not isinstance(dictionary, Dictionary):
        raise InterplabError(
            f"expected an interplab Dictionary, got {type(dictionary).__name__}; "
            "load one with load_dictionary(path)."
        )
    for name, value in (("k", k), ("window", window), ("batch_size", batch_size)):
        _check_positive_int(name, value)
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.numel() == 0:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise InterplabError(f"tokens must be a non-empty [seq, pos] tensor, got {shape}.")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise InterplabError(f"tokens must hold integer token ids, got dtype {tokens.dtype}.")
    first = 0 if include_bos else 1
    if tokens.shape[1] <= first:
        raise InterplabError(
            f"tokens have {tokens.shape[1]} position(s); without the BOS nothing is left to scan "
            "(pass include_bos=True or longer rows)."
        )
    chosen = _check_latents(dictionary, latents)
    hook_name = _hook_name(dictionary, hook_name)
    check_hook_names(model, [hook_name])
    device = _model_device(model, device)
    tokens = tokens.long().cpu()
    n_seq, n_pos = tokens.shape
    n_lat = len(chosen)

    # pass 1: running top-k of (value, flat index seq * n_pos + pos) per latent
    best_values = torch.full((n_lat, 0), float("-inf"))
    best_index = torch.zeros((n_lat, 0), dtype=torch.long)
    fired = torch.zeros(n_lat, dtype=torch.float64)
    for start in range(0, n_seq, batch_size):
        rows = tokens[start : start + batch_size]
        acts = _latent_acts(model, dictionary, hook_name, rows, chosen, device)
        acts = acts[:, first:]  # [batch, pos', latent]
        fired += (acts > 0).sum((0, 1)).double()
        seq_ids = torch.arange(start, start + rows.shape[0])[:, None]
        flat = (seq_ids * n_pos + torch.arange(first, n_pos)[None, :]).reshape(-1)
        values = torch.cat([best_values, acts.reshape(-1, n_lat).T], dim=1)
        index = torch.cat([best_index, flat.expand(n_lat, -1)], dim=1)
        # a stable descending sort keeps earlier positions first among equal values
        order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
        best_values, best_index = values.gather(1, order), index.gather(1, order)
    n_tokens = n_seq * (n_pos - first)

    # pass 2: the latent's activations across each example's context window
    after = window // 4
    before = window - 1 - after
    text_of = _token_text(model)
    examples: list[list[FeatureExample]] = [[] for _ in chosen]
    wanted = [
        (i, j) for i in range(n_lat) for j in range(best_values.shape[1]) if best_values[i, j] > 0
    ]
    rows_needed = sorted({int(best_index[i, j]) // n_pos for i, j in wanted})
    found: dict[tuple[int, int], FeatureExample] = {}
    for start in range(0, len(rows_needed), batch_size):
        batch_rows = rows_needed[start : start + batch_size]
        acts = _latent_acts(model, dictionary, hook_name, tokens[batch_rows], chosen, device)
        where = {row: b for b, row in enumerate(batch_rows)}
        for i, j in wanted:
            seq, pos = divmod(int(best_index[i, j]), n_pos)
            if seq not in where:
                continue
            lo, hi = max(0, pos - before), min(n_pos, pos + after + 1)
            ids = tokens[seq, lo:hi].tolist()
            found[(i, j)] = FeatureExample(
                seq=seq,
                pos=pos,
                value=float(best_values[i, j]),
                start=lo,
                tokens=ids,
                text=[text_of(t) for t in ids],
                acts=acts[where[seq], lo:hi, i].tolist(),
            )
    for i, j in wanted:
        examples[i].append(found[(i, j)])

    pad = k - best_values.shape[1]  # fewer scanned tokens than k
    if pad > 0:
        best_values = torch.cat([best_values, torch.zeros(n_lat, pad)], dim=1)
        best_index = torch.cat([best_index, torch.full((n_lat, pad), -1)], dim=1)
    seq_t = torch.where(best_index >= 0, best_index // n_pos, -1)
    pos_t = torch.where(best_index >= 0, best_index % n_pos, -1)
    return TopActivations(
        hook_name=hook_name,
        latents=chosen,
        values=best_values.clamp_min(0),
        seq=seq_t,
        pos=pos_t,
        density=(fired / n_tokens).float(),
        n_tokens=n_tokens,
        window=window,
        examples=examples,
    )


def _model_device(model: Any, device: str | torch.device | None) -> torch.device:
    """`device`, or the device the model's weights are on."""
    if device is not None:
        from interplab.models.loading import resolve_device

        return resolve_device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# ---------------------------------------------------------------------- logit effects
def logit_effects(
    model: Any,
    dictionary: Dictionary,
    k: int = 10,
    *,
    latents: Sequence[int] | None = None,
    chunk: int = 1024,
) -> LogitEffects:
    """Tokens each latent promotes and suppresses directly: the rows of `W_dec @ W_U`.

    The final normalisation is ignored (see the module docstring), as is `b_U` (the same for
    every latent). Only meaningful for dictionaries that write into the residual stream:
    `d_out` must equal `d_model`, and when the metadata names the hook it writes to
    (`hook_name_out`, else `hook_name`), that must be a residual-stream hook (`hook_resid_*`,
    `hook_attn_out`, `hook_mlp_out`, `hook_embed`). Computed `chunk` latents at a time.

    Returns:
        `LogitEffects` with the `k` largest and smallest entries per latent.
    """
    from interplab.models.accessor import weights

    if not isinstance(dictionary, Dictionary):
        raise InterplabError(
            f"expected an interplab Dictionary, got {type(dictionary).__name__}; "
            "load one with load_dictionary(path)."
        )
    _check_positive_int("k", k)
    _check_positive_int("chunk", chunk)
    W_U = weights(model).W_U  # [d_model, d_vocab]
    d_model, d_vocab = W_U.shape
    if dictionary.d_out != d_model:
        raise InterplabError(
            f"the dictionary writes d_out={dictionary.d_out} dimensions but the model's "
            f"residual stream has d_model={d_model}; logit effects need a dictionary trained "
            "on a residual-stream hook."
        )
    hook = dictionary.metadata.get("hook_name_out") or dictionary.metadata.get("hook_name")
    if hook and not _RESIDUAL_HOOK.search(str(hook)):
        raise InterplabError(
            f"the dictionary writes to {hook!r}, which is not in the residual stream; logit "
            "effects need hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out or hook_embed."
        )
    if k > d_vocab:
        raise InterplabError(f"k={k} is more than the vocabulary size {d_vocab}.")
    chosen = _check_latents(dictionary, latents)
    index = torch.tensor(chosen, dtype=torch.long)
    tops, top_ids, bottoms, bottom_ids = [], [], [], []
    with torch.no_grad():
        W_U = W_U.float()
        for start in range(0, len(chosen), chunk):
            rows = dictionary.W_dec[index[start : start + chunk].to(dictionary.W_dec.device)]
            effects = rows.float().to(W_U.device) @ W_U  # [chunk, d_vocab]
            top = effects.topk(k, dim=1)
            bottom = effects.topk(k, dim=1, largest=False)
            tops.append(top.values.cpu())
            top_ids.append(top.indices.cpu())
            bottoms.append(bottom.values.cpu())
            bottom_ids.append(bottom.indices.cpu())
    top_tokens, bottom_tokens = torch.cat(top_ids), torch.cat(bottom_ids)
    text_of = _token_text(model)
    return LogitEffects(
        latents=chosen,
        top_tokens=top_tokens,
        top_values=torch.cat(tops),
        bottom_tokens=bottom_tokens,
        bottom_values=torch.cat(bottoms),
        top_text=[[text_of(t) for t in row] for row in top_tokens.tolist()],
        bottom_text=[[text_of(t) for t in row] for row in bottom_tokens.tolist()],
    )


# ---------------------------------------------------------------------- text and HTML
def _token_text(model: Any) -> Callable[[int], str]:
    """Maps a token id to its text with the model's tokenizer (cached), else `<id>`."""
    tokenizer = getattr(model, "tokenizer", None)
    cache: dict[int, str] = {}

    def text(token: int) -> str:
        if token not in cache:
            if tokenizer is None:
                cache[token] = f"<{token}>"
            else:
                try:
                    cache[token] = tokenizer.decode([token], clean_up_tokenization_spaces=False)
                except TypeError:  # a tokenizer without that keyword
                    cache[token] = tokenizer.decode([token])
        return cache[token]

    return text


def _visible(text: str) -> str:
    """Token text with line breaks and tabs made visible, escaped for HTML."""
    return html.escape(text.replace("\n", "\u21b5").replace("\t", "\u21e5"), quote=True)


def _token_list(label: str, tokens: list[tuple[str, float]], colour: str) -> str:
    items = " ".join(
        f'<code title="{value:+.3g}" style="color:{colour};white-space:pre">{_visible(text)}</code>'
        for text, value in tokens
    )
    return f'<div style="font-size:.9rem"><span style="color:#59636e">{label}:</span> {items}</div>'


def _example_html(example: FeatureExample, peak: float) -> str:
    spans = []
    for offset, (text, act) in enumerate(zip(example.text, example.acts, strict=True)):
        alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, act / peak))
        style = f"background:rgba(255,140,0,{alpha:.2f})"
        if offset == example.focus:
            style += ";outline:2px solid #bc4c00;font-weight:600"
        spans.append(f'<span title="{act:.3g}" style="{style}">{_visible(text)}</span>')
    return (
        '<div style="font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem;'
        'white-space:pre;overflow-x:auto;margin:.15rem 0">'
        f'<span style="color:#59636e;display:inline-block;min-width:4.5em">'
        f"{example.value:.3g}</span>" + "".join(spans) + "</div>"
    )
