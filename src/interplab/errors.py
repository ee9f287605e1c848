"""Errors that name the bad value and what was expected.

Every user-facing failure in interplab raises an `InterplabError` (a `ValueError`), so
the CLI can print one clear line instead of a stack trace, and callers can catch one type.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InterplabError(ValueError):
    """A problem with what the user asked for: the message says what was wrong and what was expected."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The up-to-`n` entries of `choices` that look most like `name` (difflib ratio)."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)


def unknown(
    kind: str, name: str, choices: Iterable[str], *, show_all: bool = False
) -> InterplabError:
    """An error for a name that is not among `choices`, suggesting the nearest valid ones.

    With `show_all`, the message lists every valid choice (for short lists such as organisms).
    """
    choices = sorted(choices)
    message = f"unknown {kind} {name!r}."
    if show_all:
        message += f" Known: {', '.join(choices) if choices else '(none)'}."
    else:
        near = closest(name, choices)
        if near:
            message += f" Did you mean: {', '.join(near)}?"
        message += f" ({len(choices)} valid names.)"
    return InterplabError(message)
