"""Head roles from attention patterns: previous-token, induction and duplicate-token scores.

Olsson et al. 2022 ("In-context learning and induction heads") find induction heads by where
they attend on a random sequence repeated twice, [BOS] r r: an induction head at the second
copy's token i looks at the token *after* token i's first occurrence (the token it is about
to predict); the previous-token heads it composes with look one position back; duplicate-token
heads (Wang et al. 2022, IOI) look at the earlier occurrence of the current token itself.
With a prefix of p tokens (p = 1 for BOS) and copies of length L, per head and sequence:

  previous-token   mean over t = 2 .. T-1 of pattern[t, t-1]
  induction        mean over i = 0 .. L-2 of pattern[p+L+i, p+i+1]
  duplicate-token  mean over i = 0 .. L-1 of pattern[p+L+i, p+i]

Destination 1 is left out of the previous-token score: its previous token is position 0 (BOS),
where many heads park attention whatever their role. Each score is the fraction of a head's
attention that goes to the role's source position (1 = all of it). The previous-token score
is also computed on natural text when text windows are given ("previous-token (text)").

`head_role_scores` runs the model on batches of such sequences and keeps one value per head
and sequence, so every mean comes with a standard deviation and standard error
(`interplab.circuits.metrics.Estimate`); `classify_heads` turns scores into one role per
head with explicit thresholds.

    scores = head_role_scores(model, n=64, seq_len=20)
    scores["induction"].mean          # [layer, head]
    roles = classify_heads(scores)    # roles.labels("induction") -> ['L2H3', ...]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.circuits.metrics import Estimate, model_device
from interplab.errors import InterplabError, unknown

Role = Literal["previous-token", "induction", "duplicate-token"]
ROLES: tuple[str, ...] = get_args(Role)
TEXT_PREVIOUS = "previous-token (text)"
"""Key of the previous-token score measured on natural text (not used for classification)."""
NO_ROLE = "none"
"""What `classify_heads` calls a head that reaches no threshold."""

DEFAULT_THRESHOLDS: dict[str, float] = {
    "previous-token": 0.2,
    "induction": 0.3,
    "duplicate-token": 0.3,
}
"""Minimum mean attention to the role's source position. Uniform causal attention on a
[BOS] r r sequence of 2 x 20 + 1 tokens gives each source about 2 / 41 = 0.05, so every
default is at least four times the chance level."""


# ------------------------------------------------------------------ closed forms
def previous_token_attention(
    pattern: Float[Tensor, "batch head dst src"],
) -> Float[Tensor, "batch head"]:
    """Mean over destinations t = 2 .. T-1 of the attention from t to t-1."""
    T = pattern.shape[-1]
    if T < 3:
        raise InterplabError(
            f"a previous-token score needs at least 3 positions (destinations from 2), got {T}."
        )
    dst = torch.arange(2, T, device=pattern.device)
    return pattern[..., dst, dst - 1].mean(-1)


def _repeat_offset(T: int, seq_len: int) -> int:
    prefix = T - 2 * seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2 or prefix < 0:
        raise InterplabError(
            f"seq_len={seq_len!r} does not fit sequences of {T} positions: expected an int >= 2 "
            "with 2 * seq_len <= positions (a prefix such as BOS, then the sequence twice)."
        )
    return prefix


def induction_attention(
    pattern: Float[Tensor, "batch head dst src"], seq_len: int
) -> Float[Tensor, "batch head"]:
    """Mean over i = 0 .. L-2 of the attention from the second copy's token i to the first
    copy's token i+1, on [prefix] r r with len(r) = `seq_len` = L."""
    p = _repeat_offset(pattern.shape[-1], seq_len)
    i = torch.arange(seq_len - 1, device=pattern.device)
    return pattern[..., p + seq_len + i, p + i + 1].mean(-1)


def duplicate_token_attention(
    pattern: Float[Tensor, "batch head dst src"], seq_len: int
) -> Float[Tensor, "batch head"]:
    """Mean over i = 0 .. L-1 of the attention from the second copy's token i to the first
    copy's token i (its earlier occurrence), on [prefix] r r with len(r) = `seq_len` = L."""
    p = _repeat_offset(pattern.shape[-1], seq_len)
    i = torch.arange(seq_len, device=pattern.device)
    return pattern[..., p + seq_len + i, p + i].mean(-1)


# ------------------------------------------------------------------ results
def head_label(layer: int, head: int) -> str:
    """'L{layer}H{head}', the label `interplab.circuits.parse_target` reads."""
    return f"L{layer}H{head}"


@dataclass
class HeadScores:
    """One score per attention head, with its spread over sequences."""

    role: str
    """Which score, e.g. 'induction'."""
    per_example: Float[Tensor, "layer head n"] = field(repr=False)
    """The score of every head on every sequence."""
    mean: Float[Tensor, "layer head"]
    """Mean over sequences."""
    std: Float[Tensor, "layer head"]
    """Sample standard deviation over sequences (NaN when n = 1)."""
    sem: Float[Tensor, "layer head"]
    """Standard error of the mean, std / sqrt(n)."""

    @classmethod
    def of(cls, role: str, per_example: Float[Tensor, "layer head n"]) -> HeadScores:
        """Aggregate per-sequence scores (float64 accumulation, like `Estimate.of`)."""
        x = per_example.detach().double().cpu()
        n = x.shape[-1]
        if n == 0:
            raise InterplabError(f"no sequences to score {role!r} on; expected at least one.")
        std = x.std(-1) if n > 1 else torch.full(x.shape[:-1], math.nan, dtype=x.dtype)
        return cls(role, x.float(), x.mean(-1).float(), std.float(), (std / math.sqrt(n)).float())

    @property
    def n(self) -> int:
        return self.per_example.shape[-1]

    def estimate(self, layer: int, head: int) -> Estimate:
        """The score of one head as an `Estimate` (mean, std, sem, n)."""
        return Estimate.of(self.per_example[layer, head])

    def top(self, k: int = 5) -> list[tuple[str, Estimate]]:
        """The `k` heads with the highest mean score, best first, as (label, estimate)."""
        n_heads = self.mean.shape[1]
        order = self.mean.flatten().argsort(descending=True)[:k].tolist()
        return [
            (head_label(*divmod(i, n_heads)), self.estimate(*divmod(i, n_heads))) for i in order
        ]

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """Layer x head heatmap of the mean score (0..1), each cell annotated. Returns the
        matplotlib Figure."""
        import matplotlib.pyplot as plt

        n_layers, n_heads = self.mean.shape
        if ax is None:
            fig, ax = plt.subplots(figsize=(0.6 * n_heads + 1.8, 0.45 * n_layers + 1.3))
        else:
            fig = ax.figure
        image = ax.imshow(self.mean.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
        for layer in range(n_layers):
            for head in range(n_heads):
                v = float(self.mean[layer, head])
                colour = "white" if v > 0.6 else "black"
                ax.text(head, layer, f"{v:.2f}", ha="center", va="center", fontsize=7, color=colour)
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title or f"{self.role} score", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
        return fig


@dataclass
class RoleScores:
    """Every role score of every head of one model (see the module docstring)."""

    scores: dict[str, HeadScores]
    """Role -> per-head scores: 'previous-token', 'induction', 'duplicate-token' on the
    repeated sequences, and 'previous-token (text)' when text windows were given."""
    seq_len: int
    """Length L of the repeated sequence r in [prefix] r r."""
    n: int
    """Repeated sequences scored."""
    n_text: int = 0
    """Text windows scored (0 = none)."""

    def __getitem__(self, role: str) -> HeadScores:
        if role not in self.scores:
            raise unknown("role score", role, self.scores, show_all=True)
        return self.scores[role]

    @property
    def shape(self) -> tuple[int, int]:
        """(n_layers, n_heads)."""
        return tuple(next(iter(self.scores.values())).mean.shape)  # type: ignore[return-value]

    def table(self, heads: list[tuple[int, int]] | None = None) -> list[dict[str, Any]]:
        """One row per head (all heads, or `heads`): every score as 'mean ± sem'."""
        n_layers, n_heads = self.shape
        if heads is None:
            heads = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
        rows = []
        for layer, h in heads:
            row: dict[str, Any] = {"head": head_label(layer, h)}
            for role, s in self.scores.items():
                row[role] = f"{float(s.mean[layer, h]):.3f} ± {float(s.sem[layer, h]):.3f}"
            rows.append(row)
        return rows

    def plot(self, roles: list[str] | None = None) -> Any:
        """One layer x head heatmap per role, side by side. Returns the matplotlib Figure."""
        import matplotlib.pyplot as plt

        roles = list(self.scores) if roles is None else roles
        for role in roles:
            self[role]  # noqa: B018 (raises for unknown roles)
        n_layers, n_heads = self.shape
        width = 0.6 * n_heads + 1.8
        fig, axes = plt.subplots(
            1, len(roles), figsize=(width * len(roles), 0.45 * n_layers + 1.5), squeeze=False
        )
        for ax, role in zip(axes[0], roles, strict=True):
            self[role].plot(ax=ax)
        fig.tight_layout()
        return fig


@dataclass
class HeadRoles:
    """One role per head, from `classify_heads`."""

    roles: list[list[str]]
    """roles[layer][head]: a role name, or 'none'."""
    thresholds: dict[str, float]
    """The threshold each role was held to."""

    def heads(self, role: str) -> list[tuple[int, int]]:
        """(layer, head) of every head given `role`, in layer-then-head order."""
        return [
            (layer, h)
            for layer, row in enumerate(self.roles)
            for h, r in enumerate(row)
            if r == role
        ]

    def labels(self, role: str) -> list[str]:
        """'L{layer}H{head}' of every head given `role`."""
        return [head_label(layer, h) for layer, h in self.heads(role)]

    def to_dict(self) -> dict[str, list[str]]:
        """Role -> head labels, for every role in `thresholds` (empty lists included)."""
        return {role: self.labels(role) for role in self.thresholds}


# ------------------------------------------------------------------ classification
def classify_heads(scores: RoleScores, thresholds: dict[str, float] | None = None) -> HeadRoles:
    """Give each head the role whose score passes its threshold, or 'none'.

    A head is a candidate for a role when its mean score (the fraction of its attention on
    the role's source position, see the module docstring) is at least the role's threshold.
    When several roles pass, the head gets the one with the largest score / threshold
    ratio. Defaults (`DEFAULT_THRESHOLDS`): previous-token 0.2, induction 0.3,
    duplicate-token 0.3. Only the roles named in `thresholds` are considered; the
    previous-token score used is the one on repeated sequences (the same inputs as the
    induction score), not 'previous-token (text)'.
    """
    thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    if not thresholds:
        raise InterplabError("thresholds is empty; expected at least one role -> threshold.")
    for role, value in thresholds.items():
        if role not in ROLES:
            raise unknown("head role", str(role), ROLES, show_all=True)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise InterplabError(
                f"threshold for {role!r} must be a number in (0, 1] (a fraction of attention), "
                f"got {value!r}."
            )
        if role not in scores.scores:
            raise InterplabError(
                f"the scores have no {role!r} score; known: {list(scores.scores)}."
            )
    names = list(thresholds)
    means = torch.stack([scores[r].mean for r in names])  # [role, layer, head]
    limits = torch.tensor([float(thresholds[r]) for r in names]).reshape(-1, 1, 1)
    ratio = torch.where(means >= limits, means / limits, torch.full_like(means, -1.0))
    best = ratio.argmax(0)
    passed = ratio.max(0).values > 0
    roles = [
        [names[int(best[layer, h])] if passed[layer, h] else NO_ROLE for h in range(best.shape[1])]
        for layer in range(best.shape[0])
    ]
    return HeadRoles(roles, {r: float(v) for r, v in thresholds.items()})


# ------------------------------------------------------------------ running a model
def repeated_sequences(
    model: Any, n: int = 64, seq_len: int = 20, seed: int = 0
) -> Int[Tensor, "n pos"]:
    """[BOS] r r for `n` random sequences r of `seq_len` tokens, as the induction scorecard
    builds them (`interplab.data.tasks.scorecard.induction_score`): single-token storyworld
    words when the tokenizer holds most of them whole, else uniform random token ids; a
    model without a tokenizer gets r r (no BOS) over its whole vocabulary."""
    from interplab.data.tasks import repeated_tokens
    from interplab.data.tasks.scorecard import word_repeats

    for name, value in (("n", n), ("seq_len", seq_len)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (1 if name == "n" else 2)
        ):
            raise InterplabError(
                f"{name} must be an int >= {1 if name == 'n' else 2}, got {value!r}."
            )
    if getattr(model, "tokenizer", None) is None:
        # no tokenizer, so no BOS token either: r r over the whole vocabulary
        return repeated_tokens(
            model.cfg.d_vocab, n=n, seq_len=seq_len, seed=seed, prepend_bos=False
        )
    tokens = word_repeats(model, n, seq_len, seed)
    if tokens is None:
        tokens = repeated_tokens(model, n=n, seq_len=seq_len, seed=seed)
    return tokens


def _infer_seq_len(tokens: Tensor, seq_len: int | None) -> int:
    """`seq_len`, or L from the width (odd width: BOS + 2L; even: 2L); checks the repeat."""
    T = tokens.shape[1]
    if seq_len is None:
        seq_len = T // 2
    p = _repeat_offset(T, seq_len)
    first, second = tokens[:, p : p + seq_len], tokens[:, p + seq_len :]
    if not torch.equal(first, second):
        bad = int((first != second).any(1).nonzero()[0])
        raise InterplabError(
            f"repeated tokens row {bad} is not [prefix] r r with len(r) = {seq_len}: its "
            f"last {2 * seq_len} positions are not one sequence twice. Pass seq_len, or "
            "build the rows with repeated_sequences()."
        )
    return seq_len


def head_role_scores(
    model: Any,
    repeated: Int[Tensor, "batch pos"] | None = None,
    text: Int[Tensor, "batch pos"] | None = None,
    *,
    seq_len: int | None = None,
    n: int = 64,
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> RoleScores:
    """Previous-token, induction and duplicate-token scores of every head (Olsson et al. 2022;
    Wang et al. 2022), each a mean over sequences with std and sem.

    Args:
        model: a hooked model with `blocks.{l}.attn.hook_pattern` ([batch, head, dst, src]).
        repeated: [BOS] r r rows (any prefix length with `seq_len`); None = `n` rows built
            by `repeated_sequences(model, n, seq_len or 20, seed)`.
        text: optional natural-text windows [batch, pos] for 'previous-token (text)'.
        seq_len: L, the length of r; None = inferred from the width (odd: BOS + 2L).
        n, seed: used only when `repeated` is None.
        batch_size: sequences per forward pass.
        device: where to run; None = the model's device.

    Returns:
        `RoleScores` with per-head `HeadScores` (mean/std/sem [layer, head], per-example
        [layer, head, n]).
    """
    from interplab.circuits.capture import capture

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise InterplabError(f"batch_size must be a positive int, got {batch_size!r}.")
    device = model_device(model, device)
    if repeated is None:
        repeated = repeated_sequences(model, n, 20 if seq_len is None else seq_len, seed)
    if repeated.ndim != 2 or repeated.is_floating_point():
        raise InterplabError(
            f"repeated tokens must be an integer tensor [batch, pos], got {repeated.dtype} of "
            f"shape {tuple(repeated.shape)}."
        )
    seq_len = _infer_seq_len(repeated, seq_len)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]

    def per_sequence(tokens: Tensor, scorers: dict[str, Any]) -> dict[str, Tensor]:
        """role -> [layer, head, batch] over all rows of `tokens`, one batch at a time."""
        out: dict[str, list[Tensor]] = {role: [] for role in scorers}
        for start in range(0, tokens.shape[0], batch_size):
            _, acts = capture(model, tokens[start : start + batch_size].to(device), names)
            for role, fn in scorers.items():
                # [layer, batch, head] -> [layer, head, batch]
                values = torch.stack([fn(acts[name].float()) for name in names])
                out[role].append(values.permute(0, 2, 1).cpu())
        return {role: torch.cat(parts, -1) for role, parts in out.items()}

    raw = per_sequence(
        repeated,
        {
            "previous-token": previous_token_attention,
            "induction": lambda p: induction_attention(p, seq_len),
            "duplicate-token": lambda p: duplicate_token_attention(p, seq_len),
        },
    )
    n_text = 0
    if text is not None:
        if text.ndim != 2 or text.is_floating_point():
            raise InterplabError(
                f"text tokens must be an integer tensor [batch, pos], got {text.dtype} of shape "
                f"{tuple(text.shape)}."
            )
        raw[TEXT_PREVIOUS] = per_sequence(text, {"p": previous_token_attention})["p"]
        n_text = text.shape[0]
    scores = {role: HeadScores.of(role, values) for role, values in raw.items()}
    return RoleScores(scores, seq_len=seq_len, n=repeated.shape[0], n_text=n_text)
