"""The phenomenon blocks of storyworld: each writes a few sentences of one phenomenon.

A document (`storyworld.generate_document`) is a cast of people plus a sequence of blocks;
`BLOCKS[name](doc)` returns the sentences of one block, drawing everything from `doc.rng`,
so a document is a pure function of its seed. See `storyworld`'s module docstring for what
each phenomenon looks like, and `storyworld_templates` for the frames.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from interplab.data.corpus import storyworld_templates as T
from interplab.data.corpus import storyworld_vocab as V


# ---------------------------------------------------------------- per-split resources
@dataclass(frozen=True)
class Resources:
    """The names and frames one split draws from."""

    names: tuple[str, ...]
    ioi: tuple[T.Template, ...]
    compose_ioi: bool
    """Whether IOI sentences are also composed from parts (training text only)."""
    pronoun: tuple[T.Template, ...]
    facts: dict[str, tuple[T.Template, ...]]
    offset: tuple[tuple[T.Template, T.Template], ...]
    greater_than: tuple[T.Template, ...]


@cache
def resources(split: str) -> Resources:
    female, male = V.name_pool(split)
    heldout = split == "heldout"
    return Resources(
        names=female + male,
        ioi=T.for_split(T.IOI, split),  # type: ignore[arg-type]
        compose_ioi=not heldout,
        pronoun=T.for_split(T.PRONOUN, split),  # type: ignore[arg-type]
        facts={r: T.for_split(f, split) for r, f in T.FACTS.items()},  # type: ignore[arg-type]
        offset=tuple(p for p in T.OFFSET if p[0].heldout == heldout),
        greater_than=T.for_split(T.GREATER_THAN, split),  # type: ignore[arg-type]
    )


@cache
def _slots(text: str) -> tuple[str, ...]:
    # ordered (not a set): slots are filled in this order from the document's RNG, and set
    # order would change with PYTHONHASHSEED
    return tuple(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(text) if f))


_NARRATIVE_NAMED = tuple(t for t in T.NARRATIVE if "{name}" in t)
_BRACKET_KINDS = tuple(V.BRACKETS)


def _join(items: list[str]) -> str:
    """ "a, b, c and d" (or a plain comma list, which the caller chooses)."""
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]


class Doc:
    """The state of one document while it is written: its cast, sentences and pending repeats."""

    def __init__(self, rng: random.Random, res: Resources) -> None:
        self.rng = rng
        self.res = res
        self.cast = rng.sample(res.names, rng.randint(2, 4))
        self.history: list[str] = []
        self.pending: list[list] = []  # [blocks still to wait, sentence]

    def person(self) -> str:
        return self.rng.choice(self.cast)

    def fill(self, text: str, **given: str) -> str:
        """Render a template, drawing every slot not in `given` (one person per sentence)."""
        rng = self.rng
        name = given.get("name") or self.person()
        pron = V.PRONOUNS[V.GENDER[name]]
        values: dict[str, str] = {}
        for slot in _slots(text):
            if slot in given:
                continue
            if slot == "name":
                values[slot] = name
            elif slot in pron:
                values[slot] = pron[slot]
            elif slot == "place":
                values[slot] = rng.choice(V.PLACES)
            elif slot in ("obj", "a_obj", "objs"):
                noun = rng.choice(V.OBJECTS)
                values[slot] = {"obj": noun.singular, "a_obj": noun.a, "objs": noun.plural}[slot]
            elif slot in ("adj", "adj2"):
                values[slot] = rng.choice(V.ADJECTIVES)
            elif slot == "color":
                values[slot] = rng.choice(V.COLORS)
            elif slot == "day":
                values[slot] = rng.choice(V.DAYS)
            elif slot == "month":
                values[slot] = rng.choice(V.MONTHS)
            elif slot == "food":
                values[slot] = rng.choice(V.FOODS)
            elif slot == "num":
                values[slot] = V.NUMBER_WORDS[rng.randint(2, 12)]
            else:  # a template slot without a filler is a bug in this module, not user input
                raise KeyError(f"storyworld has no filler for slot {slot!r} in {text!r}")
        return text.format(**values, **given)

    def later(self, sentence: str) -> None:
        """Emit `sentence` after one to three more blocks (a long-range repeat)."""
        self.pending.append([self.rng.randint(1, 3), sentence])


# ---------------------------------------------------------------- phenomenon blocks
def _narrative(d: Doc) -> list[str]:
    rng = d.rng
    name = d.person()
    out = [d.fill(rng.choice(_NARRATIVE_NAMED), name=name)]
    for _ in range(rng.randint(1, 3)):
        out.append(d.fill(rng.choice(T.NARRATIVE), name=name))
    return out


def _ioi(d: Doc) -> list[str]:
    rng = d.rng
    io, s = rng.sample(d.cast, 2)
    a, b = (io, s) if rng.random() < 0.5 else (s, io)  # ABBA or BABA
    if d.res.compose_ioi and rng.random() < 0.75:
        opener, event = rng.choice(T.IOI_OPENERS), rng.choice(T.IOI_EVENTS)
        # a subordinate clause ("When A and B ...") needs a plain comma before the main one
        joint = ", " if opener in T.IOI_SUBORDINATE else rng.choice(T.IOI_JOINTS)
        frame = T.compose_ioi(opener, event, joint, rng.choice(T.IOI_ACTIONS))
    else:
        frame = rng.choice(d.res.ioi).text
    out = [d.fill(frame, A=a, B=b, S=s, IO=io)]
    if rng.random() < 0.5:
        out.append(
            d.fill(rng.choice(["{name} said thank you.", "{Pron} was very happy."]), name=io)
        )
    return out


def _random_words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(V.INDUCTION_WORDS, rng.randint(lo, hi))


def _uncued_repeat(rng: random.Random) -> str:
    """Words drawn WITH replacement (so a word may recur inside the span) and the span written
    again with no cue phrase. Without such spans a model learns "copy only when told to" and
    no general induction: cued lists alone taught storyworld v1 models to predict that a listed
    word does not come back."""
    span = rng.choices(V.INDUCTION_WORDS, k=rng.randint(3, 40))
    text = " ".join(span)
    copies = rng.randint(2, 3) if len(span) <= 16 else 2
    if rng.random() < 0.5:  # as sentences
        return " ".join([text.capitalize() + "."] + [text + "." for _ in range(copies - 1)])
    return " ".join([text] * copies) + "."  # one run-on stream, as in [BOS] r r probes


def _induction(d: Doc) -> list[str]:
    rng = d.rng
    name = d.person()
    if rng.random() < 0.6:
        return [_uncued_repeat(rng)]
    form = rng.randrange(5)
    if form == 4:  # quote an earlier sentence verbatim
        quotable = [s for s in d.history if '"' not in s]
        if quotable:
            quoted = rng.choice(quotable).rstrip(".")
            return [d.fill('{name} said it again: "{q}."', name=name, q=quoted)]
        form = 0
    if form == 0:
        seq = " ".join(_random_words(rng, 4, 12))
        d.later(d.fill("Later, {pron} read the list again: {seq}.", name=name, seq=seq))
        return [d.fill("{name} wrote down a strange list: {seq}.", name=name, seq=seq)]
    if form == 1:
        parts = [
            rng.choice(V.LETTERS) if rng.random() < 0.5 else str(rng.randint(0, 99))
            for _ in range(rng.randint(3, 7))
        ]
        code = " ".join(parts)
        d.later(d.fill("{name} typed the code {code} and the door opened.", name=name, code=code))
        return [d.fill("The code for the {obj} was {code}.", name=name, code=code)]
    if form == 2:
        chant = " ".join(_random_words(rng, 2, 5))
        times = rng.randint(2, 3)
        who = rng.choice(["The parrot", "The crowd", "The children", name])
        return [f"{who} kept saying: " + ", ".join([chant] * times) + "."]
    roll = rng.sample(d.res.names, rng.randint(3, 6))
    listed = ", ".join(roll)
    d.later("The next day the teacher called out: " + listed + ".")
    return ["The teacher called out: " + listed + "."]


def _cyclic(items: tuple[str, ...], start: int, k: int, step: int = 1) -> list[str]:
    return [items[(start + step * i) % len(items)] for i in range(k)]


def _successor(d: Doc) -> list[str]:
    rng = d.rng
    name = d.person()
    form = rng.randrange(9)
    join = _join if rng.random() < 0.5 else ", ".join
    if form == 0:
        days = join(_cyclic(V.DAYS, rng.randrange(7), rng.randint(3, 7)))
        frame = rng.choice(["{name} works on ", "The shop is open on ", "The days were "])
        return [d.fill(frame + days + ".", name=name)]
    if form == 1:
        months = join(_cyclic(V.MONTHS, rng.randrange(12), rng.randint(3, 8)))
        frame = rng.choice(["{name} traveled in ", "The months were ", "It rained in "])
        return [d.fill(frame + months + ".", name=name)]
    if form == 2:
        k = rng.randint(3, 8)
        start = rng.randint(0, 20 - k + 1)
        frame = rng.choice(["{name} counted: ", "The children counted: "])
        return [d.fill(frame + join(list(V.NUMBER_WORDS[start : start + k])) + ".")]
    if form == 3:
        k = rng.randint(3, 8)
        start = rng.randint(0, 100 - k + 1)
        numbers = join([str(start + i) for i in range(k)])
        return [
            rng.choice(["The rooms were numbered ", "The pages were ", "Count: "]) + numbers + "."
        ]
    if form == 4:
        k = rng.randint(3, 8)
        start = rng.randint(0, 26 - k)
        return ["The letters " + join(list(V.LETTERS[start : start + k])) + " were on the board."]
    if form == 5:  # countdown
        top = rng.randint(3, 20)
        stop = rng.randint(0, top - 2)
        if rng.random() < 0.5:
            items = [V.NUMBER_WORDS[i] for i in range(top, stop - 1, -1)]
        else:
            items = [str(i) for i in range(top, stop - 1, -1)]
        return [d.fill("{name} counted down: " + ", ".join(items) + ".", name=name)]
    if form == 6:  # diary over consecutive days
        start = rng.randrange(7)
        out = [d.fill("On " + V.DAYS[start] + ", {name} went to the {place}.", name=name)]
        for i in range(1, rng.randint(2, 4)):
            day = V.DAYS[(start + i) % 7]
            out.append(d.fill("On " + day + ", {pron} " + rng.choice(_DIARY) + ".", name=name))
        return out
    if form == 7:
        kind = rng.choice(["day", "month", "number", "letter"])
        items = {
            "day": V.DAYS,
            "month": V.MONTHS,
            "number": V.NUMBER_WORDS,
            "letter": V.LETTERS,
        }[kind]
        i = rng.randrange(len(items) - (0 if kind in ("day", "month") else 1))
        x, y = items[i], items[(i + 1) % len(items)]
        frame = rng.choice(["The {k} after {x} is {y}.", "After {x} comes {y}."])
        return [frame.format(k=kind, x=x, y=y)]
    days = list(V.DAYS) if rng.random() < 0.5 else list(V.MONTHS)
    what = "days of the week" if len(days) == 7 else "months of the year"
    return [f"The {what} are " + _join(days) + "."]


_DIARY = (
    "visited the {place}",
    "stayed at home",
    "cleaned the {place}",
    "bought {a_obj}",
    "met a friend",
    "read a book",
)


def _offsets(d: Doc) -> list[str]:
    rng = d.rng
    after, before = rng.choice(d.res.offset)
    forward = rng.random() < 0.5
    if rng.random() < 0.55:
        items, unit, now, n = V.DAYS, "day", "today", rng.randint(1, 6)
    else:
        items, unit, now, n = V.MONTHS, "month", "this month", rng.randint(1, 11)
    start = rng.randrange(len(items))
    answer = items[(start + (n if forward else -n)) % len(items)]
    return [
        (after if forward else before).text.format(
            n=V.NUMBER_WORDS[n],
            unit=unit if n == 1 else unit + "s",
            now=now,
            d=items[start],
            a=answer,
        )
    ]


def _years(rng: random.Random) -> tuple[int, int]:
    century = rng.randint(11, 19)
    yy1 = rng.randint(1, 98)
    yy2 = rng.randint(yy1 + 1, 99)
    return century * 100 + yy1, century * 100 + yy2


def _greater_than(d: Doc) -> list[str]:
    rng = d.rng
    y1, y2 = _years(rng)
    event = rng.choice(V.EVENTS)
    out = [rng.choice(d.res.greater_than).text.format(event=event, y1=y1, y2=y2)]
    if rng.random() < 0.3:
        out.append(d.fill("{name} was born in " + str(rng.randint(1100, 1999)) + "."))
    return out


def bracket_expression(rng: random.Random, depth: int, *, in_quote: bool = False) -> str:
    """A random nested bracket expression, e.g. '(see [the map {page two}] here)'.

    Openers attach to the following word and closers to the preceding one, as in prose;
    quotes never nest inside quotes (a quote inside a quote would be ambiguous).
    """
    kinds = [k for k in _BRACKET_KINDS if not (in_quote and k == "quote")]
    kind = rng.choice(kinds)
    opener, closer = V.BRACKETS[kind]
    words = [rng.choice(V.BRACKET_WORDS) for _ in range(rng.randint(1, 3))]
    if depth > 1:
        inner = bracket_expression(rng, depth - 1, in_quote=in_quote or kind == "quote")
        cut = rng.randint(1, len(words))
        words = words[:cut] + [inner] + words[cut:]
    return opener + " ".join(words) + closer


def _brackets(d: Doc) -> list[str]:
    rng = d.rng
    out = []
    for _ in range(rng.randint(1, 2)):
        expr = bracket_expression(rng, rng.randint(1, 3))
        frame = rng.choice(
            ["The note said {e}.", "{name} wrote {e} on the {obj}.", "The sign read {e}."]
        )
        out.append(d.fill(frame, e=expr))
    return out


def _facts(d: Doc) -> list[str]:
    rng = d.rng
    out = []
    for _ in range(rng.randint(1, 3)):
        country = rng.choice(V.KB)
        relation = rng.choice(V.KB_RELATIONS)
        template = rng.choice(d.res.facts[relation])
        out.append(d.fill(template.text, country=country.name, x=getattr(country, relation)))
    return out


def _pronouns(d: Doc) -> list[str]:
    rng = d.rng
    return [
        d.fill(rng.choice(d.res.pronoun).text, name=d.person()) for _ in range(rng.randint(1, 2))
    ]


def _counting(d: Doc) -> list[str]:
    rng = d.rng
    noun = rng.choice(V.OBJECTS)
    k = rng.randint(3, 8)
    if rng.random() < 0.5:
        items = [
            f"{V.NUMBER_WORDS[i]} {noun.singular if i == 1 else noun.plural}"
            for i in range(1, k + 1)
        ]
        return [d.fill("{name} counted the " + noun.plural + ": " + _join(items) + ".")]
    items = [f"{i} {noun.singular if i == 1 else noun.plural}" for i in range(1, k + 1)]
    return ["The list said: " + ", ".join(items) + "."]


BLOCKS: dict[str, Callable[[Doc], list[str]]] = {
    "narrative": _narrative,
    "ioi": _ioi,
    "induction": _induction,
    "successor": _successor,
    "offsets": _offsets,
    "greater_than": _greater_than,
    "brackets": _brackets,
    "facts": _facts,
    "pronouns": _pronouns,
    "counting": _counting,
}
