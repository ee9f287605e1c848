"""Sentence templates of storyworld, each family split into training and held-out templates.

A template is a `str.format` pattern with named slots ("{A}", "{IO}", "{country}", ...).
Held-out templates (`heldout=True`) are frames that never occur in `split="train"` text; every
word they use does occur there (in other frames), so a model trained on storyworld has trained
embeddings for all of their tokens and only the phrasing is new. The task datasets
(`interplab.data.tasks`) build prompts from the same templates: the prompt is the rendered
template cut just before its answer slot.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class Template:
    """One sentence frame."""

    text: str
    """`str.format` pattern, e.g. "When {A} and {B} went to the {place}, {S} gave {a_obj} to {IO}."."""
    heldout: bool = False
    """Reserved for `split="heldout"` text and held-out task prompts."""

    @property
    def slots(self) -> tuple[str, ...]:
        """Slot names in order of appearance (a repeated slot is listed each time)."""
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.text) if f)

    def prefix(self, slot: str) -> str:
        """The pattern up to (not including) the first occurrence of `slot` and the space before it."""
        cut = self.text.index("{" + slot + "}")
        return self.text[:cut].rstrip(" ")

    @property
    def starts_with_slot(self) -> bool:
        """Whether the sentence begins with a slot (its first word then has no leading space)."""
        return self.text.startswith("{")

    def regex(self) -> re.Pattern[str]:
        """A pattern matching any rendering of this template, one named group per slot.

        Every storyworld slot value is one word, except `a_obj` ("an apple") and `now`
        ("this month"); a repeated slot must repeat its first value.
        """
        parts, seen = [], set()
        for literal, field, _, _ in string.Formatter().parse(self.text):
            parts.append(re.escape(literal))
            if field in seen:
                parts.append(f"(?P={field})")
            elif field:
                seen.add(field)
                parts.append(f"(?P<{field}>{_SLOT_PATTERNS.get(field, _WORD)})")
        return re.compile("".join(parts))


_WORD = r"[\w']+"
_SLOT_PATTERNS = {"a_obj": r"an? [\w']+", "now": r"today|this month"}


def _family(train: list[str], heldout: list[str]) -> tuple[Template, ...]:
    return tuple([Template(t) for t in train] + [Template(t, heldout=True) for t in heldout])


def for_split(family: tuple[Template, ...], split: Split) -> tuple[Template, ...]:
    """The templates of `family` that `split` uses."""
    return tuple(t for t in family if t.heldout == (split == "heldout"))


# ---------------------------------------------------------------- indirect object identification
# Slots: A and B (first mentions), S (the repeated subject), IO (the answer), place, obj, a_obj, day.
# Every template opens with a literal word, so both first mentions are " Name" tokens.
IOI: tuple[Template, ...] = _family(
    train=[
        "When {A} and {B} went to the {place}, {S} gave {a_obj} to {IO}.",
        "After {A} and {B} went to the {place}, {S} gave {a_obj} to {IO}.",
        "When {A} and {B} got {a_obj} at the {place}, {S} decided to give it to {IO}.",
        "While {A} and {B} were working at the {place}, {S} gave {a_obj} to {IO}.",
        "Then, {A} and {B} went to the {place}. {S} gave {a_obj} to {IO}.",
        "Then, {A} and {B} had a long argument, and afterwards {S} said sorry to {IO}.",
        "After the lunch, {A} and {B} went to the {place}. {S} gave {a_obj} to {IO}.",
        "When {A} and {B} arrived at the {place}, {S} handed {a_obj} to {IO}.",
        "Friends {A} and {B} found {a_obj} at the {place}. {S} gave it to {IO}.",
        "Today {A} and {B} were at the {place}. {S} threw the {obj} to {IO}.",
        "The {place} was busy when {A} and {B} arrived. {S} passed the {obj} to {IO}.",
        "On {day}, {A} and {B} visited the {place}, and {S} brought {a_obj} for {IO}.",
        "Yesterday {A} and {B} cleaned the {place}. Later, {S} showed the {obj} to {IO}.",
        "Since {A} and {B} were hungry at the {place}, {S} offered {a_obj} to {IO}.",
        "Later, {A} and {B} walked home from the {place}, and {S} lent {a_obj} to {IO}.",
        "After {A} and {B} left the {place}, {S} wrote a letter to {IO}.",
        "When {A} and {B} met at the {place}, {S} sold {a_obj} to {IO}.",
        "At the {place}, {A} and {B} found {a_obj}, and {S} gave it to {IO}.",
    ],
    heldout=[
        "As soon as {A} and {B} reached the {place}, {S} tossed {a_obj} over to {IO}.",
        "Later that evening, {A} and {B} rested at the {place}, so {S} mailed {a_obj} to {IO}.",
        "Because {A} and {B} were bored at the {place}, {S} told a secret to {IO}.",
        "In the morning {A} and {B} stood near the {place}, and {S} returned the {obj} to {IO}.",
        "Before {A} and {B} went into the {place}, {S} carried the {obj} over to {IO}.",
        "It was late when {A} and {B} reached the {place}, but {S} still gave {a_obj} to {IO}.",
    ],
)

# Training IOI text is mostly composed from parts: opener + "{A} and {B}" + event + joint +
# "{S}" + action + "{IO}." (about 20 x 25 x 6 x 30 frames), so a model meets the structure in
# thousands of phrasings and learns the rule rather than 18 frames. No part below comes from
# a held-out frame: their verbs ("tossed", "mailed", "told a secret", "returned", "carried")
# and openers ("As soon as", "Before", "Because", "It was late", "In the morning", "Later that
# evening") never occur in training IOI sentences, so held-out frames stay unseen wholes.
# fmt: off
IOI_OPENERS: tuple[str, ...] = (
    "When", "After", "While", "Once", "Then,", "Today", "Yesterday", "Later,", "On {day},",
    "After the lunch,", "Since", "At the {place},", "One day", "That day", "After school,",
    "Last {day},", "At noon", "Soon", "In the evening", "After dinner,",
)
IOI_EVENTS: tuple[str, ...] = (
    "went to the {place}", "got {a_obj} at the {place}", "were working at the {place}",
    "arrived at the {place}", "met at the {place}", "left the {place}", "cleaned the {place}",
    "walked home from the {place}", "were hungry at the {place}", "found {a_obj} at the {place}",
    "had a long argument", "visited the {place}", "were at the {place}", "sat in the {place}",
    "played near the {place}", "ate {food} at the {place}", "came back from the {place}",
    "waited at the {place}", "looked around the {place}", "talked for a while",
    "opened the {place}", "painted the {place}", "shared {food} at the {place}",
    "ran to the {place}", "were happy at the {place}",
)
IOI_SUBORDINATE: tuple[str, ...] = ("When", "After", "While", "Once", "Since")
IOI_JOINTS: tuple[str, ...] = (", ", ". ", ", and ", ", so ", ". Later, ", ", and afterwards ")
IOI_ACTIONS: tuple[str, ...] = (
    "gave {a_obj} to", "handed {a_obj} to", "threw the {obj} to", "passed the {obj} to",
    "showed the {obj} to", "offered {a_obj} to", "lent {a_obj} to", "wrote a letter to",
    "sold {a_obj} to", "brought {a_obj} for", "said sorry to", "decided to give it to",
    "gave it to", "sent {a_obj} to", "read a story to", "waved to", "smiled at", "talked to",
    "sang a song for", "made {a_obj} for", "bought {a_obj} for", "explained the plan to",
    "gave the {obj} to", "baked {food} for", "sold the {obj} to", "handed the {obj} over to",
    "showed {a_obj} to", "wanted to give the {obj} to", "said goodbye to", "offered the {obj} to",
)
# fmt: on


def compose_ioi(opener: str, event: str, joint: str, action: str) -> str:
    """One composed IOI frame, e.g. ("When", "met at the {place}", ", ", "gave {a_obj} to") ->
    "When {A} and {B} met at the {place}, {S} gave {a_obj} to {IO}."."""
    return f"{opener} {{A}} and {{B}} {event}{joint}{{S}} {action} {{IO}}."


# ---------------------------------------------------------------- pronoun agreement
# Slots: name, pron (answer: " he" / " she"), obj, a_obj, place, food, day.
PRONOUN: tuple[Template, ...] = _family(
    train=[
        "Yesterday {name} was tired, so {pron} went home early.",
        "When {name} saw the {obj}, {pron} smiled.",
        "After {name} ate the {food}, {pron} went to the {place}.",
        "Because {name} was hungry, {pron} bought some {food}.",
        "Today {name} said that {pron} liked the {place}.",
        "In the end {name} lost the {obj}, and {pron} looked for it everywhere.",
        "Then {name} called home to say that {pron} would be late.",
        "When {name} opened the {obj}, {pron} was surprised.",
        "At the {place}, {name} felt happy because {pron} had found {a_obj}.",
        "On {day} {name} woke up early, and {pron} went for a walk.",
    ],
    heldout=[
        "Although {name} was busy, {pron} found time to read.",
        "The moment {name} heard the news, {pron} ran outside.",
        "Every time {name} visits the {place}, {pron} buys {a_obj}.",
    ],
)

# ---------------------------------------------------------------- knowledge base (facts)
# Slots: country, x (the attribute value for the relation), name.
FACTS: dict[str, tuple[Template, ...]] = {
    "capital": _family(
        train=[
            "{x} is the capital of {country}.",
            "The capital of {country} is {x}.",
            "The capital city of {country} is {x}.",
            "Everyone knows that {x} is the capital of {country}.",
            "{name} flew to {x}, the capital of {country}.",
            "Many people in {country} live in {x}, the capital.",
            "If you go to {country}, visit {x}, its capital.",
        ],
        heldout=[
            "In {country}, the capital is {x}.",
            "Of all the cities in {country}, the most important one is the capital, {x}.",
        ],
    ),
    "language": _family(
        train=[
            "In {country}, people speak {x}.",
            "The language of {country} is {x}.",
            "{x} is spoken in {country}.",
            "Most people in {country} speak {x}.",
            "{name} learned {x} while living in {country}.",
            "The main language spoken in {country} is {x}.",
        ],
        heldout=[
            "If you travel to {country}, you will hear people speaking {x}.",
            "Children in {country} learn to read and write in {x}.",
        ],
    ),
    "river": _family(
        train=[
            "The {x} river flows through {country}.",
            "The river that flows through {country} is the {x}.",
            "{country} is crossed by the {x} river.",
            "The {x} is the longest river in {country}.",
            "{name} went fishing in the {x} river in {country}.",
            "The main river of {country} is the {x}.",
        ],
        heldout=[
            "Boats on the {x} river carry goods across {country}.",
            "Running through the middle of {country} is the {x} river.",
        ],
    ),
    "animal": _family(
        train=[
            "The national animal of {country} is the {x}.",
            "The {x} is the national animal of {country}.",
            "In {country}, the {x} is a national symbol.",
            "The flag of {country} shows a {x}.",
        ],
        heldout=[
            "On the coins of {country} there is a picture of a {x}.",
            "People in {country} are proud of the {x}, their national animal.",
        ],
    ),
}

# ---------------------------------------------------------------- day / month offsets
# Slots: n (number word), unit ("day(s)" / "month(s)"), now ("today" / "this month"), d (start), a (answer).
# Each entry is a pair of templates: (moving forward, moving backward).
OFFSET: tuple[tuple[Template, Template], ...] = tuple(
    (Template(after, heldout=h), Template(before, heldout=h))
    for after, before, h in [
        ("So {n} {unit} after {d} is {a}.", "So {n} {unit} before {d} is {a}.", False),
        (
            "If {now} is {d}, then in {n} {unit} it will be {a}.",
            "If {now} is {d}, then {n} {unit} ago it was {a}.",
            False,
        ),
        (
            "Counting {n} {unit} forward from {d} gives {a}.",
            "Counting {n} {unit} back from {d} gives {a}.",
            False,
        ),
        (
            "We know that {n} {unit} after {d} comes {a}.",
            "We know that {n} {unit} before {d} comes {a}.",
            False,
        ),
        (
            "Starting on {d} and waiting {n} {unit}, you reach {a}.",
            "Starting on {d} and going back {n} {unit}, you reach {a}.",
            True,
        ),
        (
            "Add {n} {unit} to {d} and you get {a}.",
            "Take {n} {unit} away from {d} and you get {a}.",
            True,
        ),
    ]
)

# ---------------------------------------------------------------- greater-than
# Slots: event, y1 (start year), y2 (a later year of the same century).
GREATER_THAN: tuple[Template, ...] = _family(
    train=[
        "The {event} lasted from the year {y1} to the year {y2}.",
        "The {event} began in {y1} and ended in {y2}.",
        "The {event} lasted from {y1} to {y2}.",
        "From {y1} to {y2}, the {event} changed everything.",
        "The {event} started in the year {y1} and was over by the year {y2}.",
        "Historians date the {event} from {y1} to {y2}.",
    ],
    heldout=[
        "The {event} persisted from the year {y1} up until the year {y2}.",
        "The {event}, which broke out in {y1}, came to an end in {y2}.",
    ],
)

# ---------------------------------------------------------------- narrative glue (both splits)
# Slots: name, Pron, pron, poss, place, obj, a_obj, objs, adj, color, day, month, food, num.
# Besides carrying the story, these sentences make every word of the held-out frames above
# occur in training text (in other frames), so held-out prompts contain no untrained token.
NARRATIVE: tuple[str, ...] = (
    "{name} walked to the {place}.",
    "It was a {adj} day in {month}.",
    "The {obj} was {color}.",
    "{Pron} liked the {place} very much.",
    "{name} tossed the {obj} into the air.",
    "It was late in the evening.",
    "{name} rested for a while.",
    "{name} mailed a card to a friend.",
    "{Pron} was bored.",
    "{name} told a long story about the {place}.",
    "Nobody knew the secret.",
    "The morning was {adj}.",
    "{name} stood near the window.",
    "{name} returned home on {day}.",
    "{Pron} carried {a_obj} over the bridge.",
    "The rain persisted until the morning.",
    "A fire broke out near the {place}.",
    "Then the summer came to an end.",
    "{name} still remembers the {place}.",
    "As soon as the sun rose, the birds began to sing.",
    "{name} reached the top of the hill.",
    "Although the road was long, the trip was fun.",
    "{Pron} found time to read a book.",
    "The moment had come.",
    "{name} heard the news from a friend.",
    "The children ran outside.",
    "Every {day}, {name} visits the {place}.",
    "{name} buys {food} at the {place}.",
    "Boats carry goods across the sea.",
    "Children learn to read and write at school.",
    "There is a picture of a {color} {obj} on the coins.",
    "{name} was proud of {poss} {obj}.",
    "The {obj} was in the middle of the room.",
    "Running is good for you.",
    "Of all the {objs}, {name} liked the {color} one best.",
    "The most important thing is to be kind.",
    "{name} heard people speaking in the street.",
    "If you travel far, you will hear many stories.",
    "Take the {obj} away from the table.",
    "Add some salt to the {food}.",
    "Starting today, {name} will get up early.",
    "{Pron} was waiting for the bus.",
    "Going back home, {name} saw {a_obj}.",
    "In the end everyone was happy.",
    "{name} went into the {place} with {poss} {obj}.",
    "The {place} was {adj} and {adj2}.",
    "{name} had {num} {objs}.",
    "{Pron} put the {obj} on the table.",
    "{name} has seen many cities, but the {place} here is the best.",
    "{name} looked at the {color} {obj} for a long time.",
    "Before lunch, {name} read a book.",
    "The {obj}, which was {color}, sat on the shelf.",
    "People say that the {place} is {adj}.",
    "The children played with their {objs}.",
    "It takes an hour to reach the {place}.",
    "{Pron} was going to the {place}.",
)
