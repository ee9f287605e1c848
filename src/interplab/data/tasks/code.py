"""Python tasks for code models: close the innermost bracket, close a string with its quote.

`code_brackets`: "    result = sorted(items[index" -> "]". Lines of Python with `depth`
nested brackets (calls `f(`, subscripts `x[`, and bare tuple/list/set displays `(`, `[`,
`{`), stopped right after a complete operand inside the innermost one. Other continuations
(`,`, `.attr`, `+ 1`) are legal Python, so the metric compares the closers only: the right
one (`answers`) against the other two (`wrong_answers`, [batch, 2]). The corrupted prompt
swaps only the innermost opener's kind, keeping the line valid Python: a call becomes a
subscript and back, a display becomes another display.

`code_quotes`: "    mode = config.get('read" -> "'". A string literal opened with `'` or `"`
in a call, a subscript, a comparison or a return; the answer is the same quote character,
the contrast the other one, and the corrupted prompt swaps the opening quote.

Both need a tokenizer whose brackets and quotes are single tokens, with and without a
leading space (interplab's code tokenizer splits every punctuation mark into its own piece).
Identifiers may be several tokens: swapping one bracket or quote character never changes the
token count, which `Pairs.build` checks. `split` has no effect: every identifier here occurs
in the standard library the code organism trains on.
"""

from __future__ import annotations

from typing import Any

import torch

from interplab.data.tasks.base import Pairs, Split, TaskDataset, TokenizerView, check_args, task_rng
from interplab.errors import InterplabError

_SUGGEST = "code_tokenizer()"

CODE_BRACKETS: dict[str, tuple[str, str]] = {
    "paren": ("(", ")"),
    "square": ("[", "]"),
    "curly": ("{", "}"),
}
"""Bracket kind -> (opener, closer) in Python."""

QUOTES: dict[str, str] = {"single": "'", "double": '"'}
"""Quote kind -> character."""

# fmt: off
_NAMES = [
    "name", "value", "key", "data", "items", "path", "result", "line", "text", "args", "node",
    "item", "parts", "index", "count", "size", "obj", "attr", "mode", "prefix", "target",
    "source", "msg", "level", "token", "fields", "values", "keys", "lines", "buf",
]
_CALLEES = [
    "len", "str", "int", "list", "sorted", "tuple", "repr", "print", "min", "max", "self.get",
    "self.format", "os.fspath", "self._check", "cls",
]
_FUNCS = [
    "get_value", "parse", "update", "render", "process", "handle", "load", "build",
]
_WORDS = [
    "utf-8", "name", "value", "ascii", "default", "strict", "read", "write", "error", "ignore",
    "replace", "path", "key", "data", "type", "none", "true", "false",
]
# fmt: on

# (lines before, indentation of the scored line)
_CONTEXTS = (
    ("def {func}(self, {p}):\n", "    "),
    ("", "    "),
    ("    if {p}:\n", "        "),
    ("", ""),
)


def _line_head(rng: Any) -> tuple[int, str]:
    """A context id and the text before the scored statement."""
    context_id = rng.randrange(len(_CONTEXTS))
    before, indent = _CONTEXTS[context_id]
    return context_id, before.format(func=rng.choice(_FUNCS), p=rng.choice(_NAMES)) + indent


def _bracket_expr(rng: Any, stack: list[tuple[str, str]], inner: str) -> tuple[str, list[int]]:
    """Nested openers (form, kind) around `inner`: the text and each opener's char offset."""
    text, opens = "", []
    for level, (form, kind) in enumerate(stack):
        if level and rng.random() < 0.5:
            text += rng.choice(_NAMES) + ", "
        if form == "call":
            text += rng.choice(_CALLEES)
        elif form == "subscript":
            text += rng.choice(_NAMES)
        opens.append(len(text))
        text += CODE_BRACKETS[kind][0]
    return text + inner, opens


def _swap(text: str, at: int, char: str) -> str:
    return text[:at] + char + text[at + 1 :]


def code_brackets(
    tokenizer: Any,
    n: int = 256,
    seed: int = 0,
    split: Split = "heldout",
    prepend_bos: bool = True,
    *,
    depth: int = 2,
    device: str | torch.device | None = None,
) -> TaskDataset:
    """Python lines with `depth` nested brackets; the answer closes the innermost one.

    Each level is a call `f(` (paren), a subscript `x[` (square) or a bare display `(`, `[`,
    `{` (drawn uniformly over the five). The innermost operand is a name, an attribute
    `a.b`, or a number. Metadata: `kinds` and `forms` (outer to inner), `answer_kind`,
    `corrupted_kind`, `wrong_kinds` (the kinds of `wrong_answers`, in order), `open_pos`
    (token position of each opener), `template`.
    """
    task = "code_brackets"
    check_args(task, n, split)
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 4:
        raise InterplabError(f"task {task!r}: depth must be an int in [1, 4], got {depth!r}")
    view = TokenizerView(tokenizer)
    closer_ids = {
        k: view.single(c, "closer", task, _SUGGEST) for k, (_, c) in CODE_BRACKETS.items()
    }
    opener_ids = {
        k: view.single(o, "opener", task, _SUGGEST) for k, (o, _) in CODE_BRACKETS.items()
    }
    for opener, _ in CODE_BRACKETS.values():
        view.single(" " + opener, "opener after a space", task, _SUGGEST)
    forms = [("call", "paren"), ("subscript", "square")] + [("display", k) for k in CODE_BRACKETS]
    rng = task_rng(task, seed, split, depth)
    pairs = Pairs(task, view, prepend_bos)
    for _ in range(n):
        stack = [rng.choice(forms) for _level in range(depth)]
        inner = rng.choice(
            [
                rng.choice(_NAMES),
                f"{rng.choice(_NAMES)}.{rng.choice(_NAMES)}",
                str(rng.randint(0, 99)),
            ]
        )
        expr, opens = _bracket_expr(rng, stack, inner)
        template_id, head = _line_head(rng)
        head += rng.choice([f"{rng.choice(_NAMES)} = ", "return "])
        prompt = head + expr
        form, kind = stack[-1]
        if form == "call":
            other = "square"
        elif form == "subscript":
            other = "paren"
        else:
            other = rng.choice([k for k in CODE_BRACKETS if k != kind])
        inner_at = len(head) + opens[-1]
        corrupted = _swap(prompt, inner_at, CODE_BRACKETS[other][0])
        wrong_kinds = [k for k in CODE_BRACKETS if k != kind]
        open_pos = [pairs.position(prompt, len(head) + o) for o in opens]
        meta = {
            "template": template_id,
            "forms": [f for f, _ in stack],
            "kinds": [k for _, k in stack],
            "answer_kind": kind,
            "corrupted_kind": other,
            "wrong_kinds": wrong_kinds,
            "open_pos": open_pos,
            **{f"_open{i}": p for i, p in enumerate(open_pos)},
            "_expect": {
                f"_open{i}": _opener_token(view, prompt, len(head) + o, opener_ids)
                for i, o in enumerate(opens)
            },
        }
        pairs.add(prompt, corrupted, closer_ids[kind], [closer_ids[k] for k in wrong_kinds], meta)
    dataset = pairs.build(split, device)
    for meta in dataset.metadata:  # the _open{i} keys only served the position check
        for i in range(depth):
            meta.pop(f"_open{i}")
    return dataset


def _opener_token(view: TokenizerView, text: str, at: int, opener_ids: dict[str, int]) -> int:
    """The token id the opener at char `at` should encode to (with its leading space if any)."""
    char = text[at]
    if at > 0 and text[at - 1] == " ":
        return view.single(" " + char, "opener after a space", "code_brackets", _SUGGEST)
    return next(i for k, i in opener_ids.items() if CODE_BRACKETS[k][0] == char)


_QUOTE_FORMS = (
    "{var} = {callee}({q}{word}",
    "{var} = {name}[{q}{word}",
    "if {name} == {q}{word}",
    "return {q}{word}",
    "{var} = {q}{word}",
)


def code_quotes(
    tokenizer: Any,
    n: int = 256,
    seed: int = 0,
    split: Split = "heldout",
    prepend_bos: bool = True,
    *,
    device: str | torch.device | None = None,
) -> TaskDataset:
    """Python lines that open a string with `'` or `"` and stop after its first word; the
    answer is the same quote, the contrast the other quote.

    Metadata: `quote` ('single' / 'double'), `form` (index into the five string contexts:
    call argument, subscript, comparison, return, assignment), `open_pos` (token position of
    the opening quote), `template`.
    """
    task = "code_quotes"
    check_args(task, n, split)
    view = TokenizerView(tokenizer)
    quote_ids = {k: view.single(c, "quote", task, _SUGGEST) for k, c in QUOTES.items()}
    spaced_ids = {
        k: view.single(" " + c, "quote after a space", task, _SUGGEST) for k, c in QUOTES.items()
    }
    rng = task_rng(task, seed, split)
    pairs = Pairs(task, view, prepend_bos)
    for _ in range(n):
        kind = rng.choice(list(QUOTES))
        other = "double" if kind == "single" else "single"
        form_id = rng.randrange(len(_QUOTE_FORMS))
        statement = _QUOTE_FORMS[form_id].format(
            callee=rng.choice(_CALLEES),
            name=rng.choice(_NAMES),
            var=rng.choice(_NAMES),
            q="\x00",
            word=rng.choice(_WORDS),
        )
        template_id, head = _line_head(rng)
        prompt = head + statement.replace("\x00", QUOTES[kind])
        at = len(head) + statement.index("\x00")
        corrupted = _swap(prompt, at, QUOTES[other])
        spaced = prompt[at - 1] == " "
        open_pos = pairs.position(prompt, at)
        meta = {
            "template": template_id,
            "form": form_id,
            "quote": kind,
            "open_pos": open_pos,
            "_expect": {"open_pos": (spaced_ids if spaced else quote_ids)[kind]},
        }
        pairs.add(prompt, corrupted, quote_ids[kind], quote_ids[other], meta)
    return pairs.build(split, device)
