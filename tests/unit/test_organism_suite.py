"""Recipe helpers of the bundled organisms (interplab.models.organisms.suite)."""

from __future__ import annotations

import pytest
import torch

from interplab.data.corpus.storyworld_vocab import INDUCTION_WORDS
from interplab.errors import InterplabError
from interplab.models.organisms.suite import repeat_windows


class _WordTokenizer:
    """One token per induction word (ids 10, 11, ...); anything else is two tokens."""

    def __init__(self) -> None:
        self.ids = {" " + w: 10 + i for i, w in enumerate(INDUCTION_WORDS)}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.ids[text]] if text in self.ids else [1, 2]


def _is_chain_of_repeats(row: list[int]) -> bool:
    """[BOS] r1 r1 r2 r2 ... with spans of >= 4 words (the last copy may be cut short)."""
    body = row[1:]

    def chain(i: int) -> bool:
        if i == len(body):
            return True
        for span in range(4, len(body) - i + 1):
            copy = body[i + span : i + 2 * span]
            if copy == body[i : i + len(copy)] and (
                len(copy) == span and chain(i + 2 * span) or i + span + len(copy) == len(body)
            ):
                return True
        return False

    return chain(0)


def test_repeat_windows_replaces_the_requested_fraction_with_repeat_chains():
    ids = torch.zeros(200, 64, dtype=torch.long)
    ids[:, 1:] = 5  # the plain windows: BOS then token 5
    out = repeat_windows(ids, _WordTokenizer(), 0.25, seed=3)
    changed = [r for r in range(200) if not torch.equal(out[r], ids[r])]
    assert len(changed) == 50
    assert (out[:, 0] == 0).all()  # every window keeps its BOS
    words = set(_WordTokenizer().ids.values())
    for r in changed:
        row = out[r].tolist()
        assert set(row[1:]) <= words
        assert _is_chain_of_repeats(row), row
    assert torch.equal(out, repeat_windows(ids, _WordTokenizer(), 0.25, seed=3))  # seeded
    assert not torch.equal(out, repeat_windows(ids, _WordTokenizer(), 0.25, seed=4))
    assert torch.equal(ids[:, 1:], torch.full((200, 63), 5))  # the input is not modified


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_repeat_windows_refuses_fractions_outside_the_open_unit_interval(fraction):
    with pytest.raises(InterplabError, match="repeat_windows"):
        repeat_windows(torch.zeros(4, 8, dtype=torch.long), _WordTokenizer(), fraction, 0)
