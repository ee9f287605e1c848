"""The task dataset container and the tokenizer plumbing every task shares.

A task is a set of prompts whose next token has a known right answer, each paired with a
corrupted prompt of the same token length (positions align, so activations can be patched
position by position) whose right answer is different.

BOS convention: with `prepend_bos=True` (the default, as in TransformerLens) every token
sequence starts with the tokenizer's BOS token: its `bos_token_id`, else its
`eos_token_id`, else `<|endoftext|>` (for storyworld tokenizers all three are id 0). Every
position in a dataset (`answer_pos`, `metadata[i]["io_pos"]`, ...) counts that BOS token.
Prompts of different token lengths are right-padded with the pad token (else BOS/EOS); in a
causal model right padding never changes the logits at `answer_pos`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from interplab.data.corpus.tokenizer import EOT
from interplab.errors import InterplabError, unknown

Split = Literal["train", "heldout"]


@dataclass
class TaskDataset:
    """Clean and corrupted prompts with the token ids needed to score a behaviour.

    Row i of `clean_tokens` is `prompts[i]` tokenized (BOS first when `prepend_bos`), right-
    padded to the longest prompt; `corrupted_tokens[i]` has the same length and padding.
    The model's next-token prediction at `answer_pos[i]` is scored: `answers[i]` is correct
    for the clean prompt, `wrong_answers[i]` is the contrast (the corrupted prompt's answer,
    or the tempting wrong token, per task).
    """

    name: str
    """Task name, a key of `interplab.data.tasks.TASKS`."""
    prompts: list[str]
    """Clean prompt texts (without BOS)."""
    corrupted_prompts: list[str]
    """Corrupted prompt texts, token-aligned with `prompts`."""
    clean_tokens: Int[Tensor, "batch pos"]
    """Token ids of the clean prompts, right-padded with `pad_token_id`."""
    corrupted_tokens: Int[Tensor, "batch pos"]
    """Token ids of the corrupted prompts (same shape and padding as `clean_tokens`)."""
    answers: Int[Tensor, " batch"]
    """Correct next token for each clean prompt."""
    wrong_answers: Int[Tensor, "batch ..."]
    """Contrast token(s): shape [batch] or [batch, n_wrong]."""
    answer_pos: Int[Tensor, " batch"]
    """Position whose next-token prediction is scored: the last token of the prompt (for
    `induction`, whose rows hold the scored tokens, the second-to-last)."""
    metadata: list[dict[str, Any]]
    """Per-example details: template id, entities, token positions of the key words."""
    split: Split = "heldout"
    """Which templates / phrasings the prompts use."""
    prepend_bos: bool = True
    """Whether position 0 of every row is the BOS token."""
    pad_token_id: int = 0
    """Id used for right padding."""
    candidate_ids: Int[Tensor, " n_candidates"] | None = None
    """A fixed answer set (e.g. the 100 two-digit year tokens "00".."99" for greater-than)."""
    valid_mask: Bool[Tensor, "batch n_candidates"] | None = None
    """Which of `candidate_ids` are correct answers for each clean prompt."""

    def __post_init__(self) -> None:
        batch = len(self.prompts)
        if self.clean_tokens.ndim != 2 or self.clean_tokens.shape[0] != batch:
            raise InterplabError(
                f"clean_tokens must be [batch={batch}, pos], got {tuple(self.clean_tokens.shape)}"
            )
        if self.corrupted_tokens.shape != self.clean_tokens.shape:
            raise InterplabError(
                f"corrupted_tokens {tuple(self.corrupted_tokens.shape)} must match clean_tokens "
                f"{tuple(self.clean_tokens.shape)}"
            )
        for name in ("corrupted_prompts", "metadata"):
            if len(getattr(self, name)) != batch:
                raise InterplabError(
                    f"{name} has {len(getattr(self, name))} items, expected {batch}"
                )
        for name in ("answers", "wrong_answers", "answer_pos"):
            if getattr(self, name).shape[0] != batch:
                raise InterplabError(f"{name} must have batch size {batch} in dim 0")
        if batch and int(self.answer_pos.max()) >= self.clean_tokens.shape[1]:
            raise InterplabError("answer_pos points past the end of the token rows")
        if self.valid_mask is not None and (
            self.candidate_ids is None or self.valid_mask.shape != (batch, len(self.candidate_ids))
        ):
            raise InterplabError("valid_mask must be [batch, len(candidate_ids)]")

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, index: Sequence[int] | Tensor) -> TaskDataset:
        """The examples at `index` (e.g. those of one template), trimmed of padding no row needs."""
        idx = torch.as_tensor(index, dtype=torch.long)
        rows = idx.tolist()
        width = int(self.answer_pos[idx].max()) + 1 if rows else 0
        width = max(width, _last_real(self.clean_tokens[idx], self.pad_token_id))
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("clean_tokens", "corrupted_tokens"):
                value = value[idx][:, :width]
            elif isinstance(value, Tensor) and f.name != "candidate_ids":
                value = value[idx]
            elif isinstance(value, list):
                value = [value[i] for i in rows]
            picked[f.name] = value
        return TaskDataset(**picked)

    def to(self, device: str | torch.device) -> TaskDataset:
        """A copy with every tensor on `device`."""
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
            for f in fields(self)
        }
        return TaskDataset(**moved)


def _last_real(tokens: Tensor, pad: int) -> int:
    """Smallest width that keeps every non-pad token (padding is only on the right)."""
    if tokens.numel() == 0:
        return 0
    real = (tokens != pad).any(dim=0).nonzero()
    return int(real.max()) + 1 if len(real) else 0


# ---------------------------------------------------------------- tokenizers
class TokenizerView:
    """One interface over a transformers tokenizer, a `tokenizers.Tokenizer`, a model with a
    `.tokenizer`, or any object with `.encode(text)`: encode without special tokens, BOS, pad.
    """

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import Tokenizer

        if getattr(tokenizer, "tokenizer", None) is not None:
            tokenizer = tokenizer.tokenizer  # an interplab / TransformerLens model
        if not hasattr(tokenizer, "encode"):
            raise InterplabError(
                f"expected a tokenizer (or a model with .tokenizer), got {type(tokenizer).__name__}"
            )
        self.tokenizer = tokenizer
        self._raw = isinstance(tokenizer, Tokenizer)
        self._cache: dict[str, list[int]] = {}
        if self._raw:
            eot = tokenizer.token_to_id(EOT)
            self.bos_id: int | None = eot
            self.pad_id: int | None = eot
            self.special_ids: set[int] = {eot} if eot is not None else set()
        else:
            bos = getattr(tokenizer, "bos_token_id", None)
            eos = getattr(tokenizer, "eos_token_id", None)
            pad = getattr(tokenizer, "pad_token_id", None)
            self.bos_id = bos if bos is not None else eos
            self.pad_id = pad if pad is not None else self.bos_id
            self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        if self.bos_id is not None:
            self.special_ids.add(self.bos_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, never adding special tokens."""
        ids = self._cache.get(text)
        if ids is None:
            if self._raw:
                ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            else:
                try:
                    out = self.tokenizer.encode(text, add_special_tokens=False)
                except TypeError:  # a bare .encode(text)
                    out = self.tokenizer.encode(text)
                ids = list(getattr(out, "ids", out))
            if len(self._cache) < 100_000:
                self._cache[text] = ids
        return list(ids)

    def piece(self, token_id: int) -> str:
        """Text of one token (for error messages)."""
        try:
            return self.tokenizer.decode([token_id])
        except Exception:  # a tokenizer without decode: show the id
            return f"<{token_id}>"

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        if self._raw:
            return self.tokenizer.get_vocab_size()
        return len(self.tokenizer)

    def single(
        self, word: str, role: str, task: str, suggest: str = "storyworld_tokenizer()"
    ) -> int:
        """The id of `word` if it is exactly one token; else an InterplabError naming the split
        and suggesting the `interplab.data.corpus.tokenizer` function `suggest`."""
        ids = self.encode(word)
        if len(ids) != 1:
            pieces = [self.piece(i) for i in ids]
            raise InterplabError(
                f"task {task!r} needs the {role} {word!r} as a single token, but this tokenizer "
                f"splits it into {pieces} (ids {ids}). Use a tokenizer that keeps it whole, e.g. "
                f"interplab.data.corpus.tokenizer.{suggest}."
            )
        return ids[0]

    def bos_prefix(self, prepend_bos: bool, task: str) -> list[int]:
        """[BOS] or []."""
        if not prepend_bos:
            return []
        if self.bos_id is None:
            raise InterplabError(
                f"task {task!r}: prepend_bos=True but the tokenizer has no BOS, EOS or {EOT} "
                "token; pass prepend_bos=False"
            )
        return [self.bos_id]


# ---------------------------------------------------------------- shared helpers
def check_args(task: str, n: int, split: str) -> None:
    """Validate the arguments every task takes (n > 0, a known split)."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InterplabError(f"task {task!r}: n must be a positive int, got {n!r}")
    if split not in ("train", "heldout"):
        raise unknown("split", str(split), ("train", "heldout"), show_all=True)


def task_rng(task: str, seed: int, split: str, *extra: object) -> random.Random:
    """A generator seeded from the task name, seed, split and options (stable across runs)."""
    return random.Random("/".join(map(str, (task, seed, split, *extra))))


def pick_template(task: str, templates: Sequence[Any], template: int | None) -> list[Any]:
    """All `templates`, or only number `template` of them."""
    if template is None:
        return list(templates)
    if not isinstance(template, int) or not 0 <= template < len(templates):
        raise InterplabError(
            f"task {task!r}: template must be an index in [0, {len(templates)}), got {template!r}"
        )
    return [templates[template]]


def render(text: str, values: dict[str, str]) -> tuple[str, dict[str, list[int]]]:
    """Fill `text` and return the character offsets where each slot's value starts."""
    out: list[str] = []
    starts: dict[str, list[int]] = {}
    length = 0
    for literal, slot, _, _ in string.Formatter().parse(text):
        out.append(literal)
        length += len(literal)
        if slot:
            starts.setdefault(slot, []).append(length)
            out.append(values[slot])
            length += len(values[slot])
    return "".join(out), starts


@dataclass
class Pairs:
    """Prompts being collected for one dataset."""

    task: str
    view: TokenizerView
    prepend_bos: bool
    prompts: list[str] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    wrong: list[Any] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def position(self, text: str, char_start: int) -> int:
        """Token index (counting BOS) of the word starting at `char_start` in `text`.

        The word's leading space belongs to its token (GPT-2 style), so the tokens before it
        are those of the text before that space.
        """
        cut = char_start - 1 if char_start > 0 and text[char_start - 1] == " " else char_start
        return len(self.view.encode(text[:cut])) + int(self.prepend_bos)

    def add(self, prompt: str, corrupted: str, answer: int, wrong: Any, meta: dict) -> None:
        self.prompts.append(prompt)
        self.corrupted.append(corrupted)
        self.answers.append(answer)
        self.wrong.append(wrong)
        self.metadata.append(meta)

    def build(
        self, split: str, device: str | torch.device | None = None, **extra: Any
    ) -> TaskDataset:
        """Tokenize, check clean/corrupted lengths match, right-pad, and check key positions."""
        bos = self.view.bos_prefix(self.prepend_bos, self.task)
        clean = [bos + self.view.encode(p) for p in self.prompts]
        corrupt = [bos + self.view.encode(p) for p in self.corrupted]
        for c, k, p, q in zip(clean, corrupt, self.prompts, self.corrupted, strict=True):
            if len(c) != len(k):
                raise InterplabError(
                    f"task {self.task!r}: clean and corrupted prompts tokenize to different "
                    f"lengths ({len(c)} vs {len(k)}): {p!r} / {q!r}"
                )
        pad = self.view.pad_id if self.view.pad_id is not None else 0
        width = max(len(c) for c in clean)
        clean_t = torch.tensor([c + [pad] * (width - len(c)) for c in clean], dtype=torch.long)
        corrupt_t = torch.tensor([c + [pad] * (width - len(c)) for c in corrupt], dtype=torch.long)
        answer_pos = torch.tensor([len(c) - 1 for c in clean], dtype=torch.long)
        if "answer_pos" in extra:
            answer_pos = extra.pop("answer_pos")
        self._check_positions(clean_t)
        dataset = TaskDataset(
            name=self.task,
            prompts=self.prompts,
            corrupted_prompts=self.corrupted,
            clean_tokens=clean_t,
            corrupted_tokens=corrupt_t,
            answers=torch.tensor(self.answers, dtype=torch.long),
            wrong_answers=torch.tensor(self.wrong, dtype=torch.long),
            answer_pos=answer_pos,
            metadata=self.metadata,
            split=split,  # type: ignore[arg-type]
            prepend_bos=self.prepend_bos,
            pad_token_id=pad,
            **extra,
        )
        return dataset if device is None else dataset.to(device)

    def _check_positions(self, clean: Tensor) -> None:
        # metadata positions were computed from prefixes; a tokenizer whose pieces cross word
        # boundaries would shift them, so confirm each names the token it claims to
        for row, meta in enumerate(self.metadata):
            for key, token_id in meta.get("_expect", {}).items():
                if int(clean[row, meta[key]]) != token_id:
                    raise InterplabError(
                        f"task {self.task!r}: {key}={meta[key]} does not hold the expected token "
                        f"in {self.prompts[row]!r}; the tokenizer merges across word boundaries"
                    )
            meta.pop("_expect", None)
