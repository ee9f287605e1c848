"""The closed word lists of storyworld: names, things, places, sequences and the knowledge base.

Everything here is a fixed constant, so the corpus, its tokenizer and the task datasets agree
on one lexicon. Names come in two disjoint pools: `TRAIN_NAMES` appear in `split="train"`
text, `HELDOUT_NAMES` only in `split="heldout"` text. No name is also an ordinary word of the
corpus (no "May", "Rose" or "Mark"), so a name token always means a person.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Gender = Literal["f", "m"]

# ---------------------------------------------------------------- people
TRAIN_FEMALE: tuple[str, ...] = (
    "Mary", "Anna", "Emma", "Sarah", "Lucy", "Laura", "Julia", "Kate", "Alice", "Helen",
    "Grace", "Clara", "Sophie", "Emily", "Hannah", "Olivia", "Chloe", "Megan", "Rachel", "Linda",
    "Susan", "Karen", "Nancy", "Diana", "Ruth", "Irene", "Paula", "Nora", "Ellen", "Maria",
    "Fiona", "Tina", "Wendy", "Vera", "Ada", "Eva", "Lisa", "Amy", "Beth", "Jane",
    "Carla", "Nina", "Greta", "Hilda", "Ingrid", "Lena", "Molly", "Zoe", "Tessa", "Martha",
)  # fmt: skip
TRAIN_MALE: tuple[str, ...] = (
    "John", "James", "David", "Michael", "Robert", "Thomas", "Daniel", "Paul", "Peter", "George",
    "Henry", "Edward", "Richard", "Charles", "Simon", "Oliver", "Samuel", "Adam", "Martin", "Steven",
    "Kevin", "Brian", "Eric", "Frank", "Gary", "Harry", "Ivan", "Leo", "Max", "Nathan",
    "Oscar", "Victor", "Walter", "Arthur", "Hugo", "Felix", "Ryan", "Sean", "Tom", "Ben",
    "Carl", "Owen", "Luke", "Joel", "Ralph", "Karl", "Otto", "Fred", "Roger", "Philip",
)  # fmt: skip
HELDOUT_FEMALE: tuple[str, ...] = (
    "Bianca", "Camille", "Daphne", "Esther", "Gloria",
    "Harriet", "Isabel", "Judith", "Miriam", "Priscilla",
)  # fmt: skip
HELDOUT_MALE: tuple[str, ...] = (
    "Ambrose", "Bernard", "Cedric", "Desmond", "Gideon",
    "Horace", "Lionel", "Mortimer", "Rupert", "Silas",
)  # fmt: skip

TRAIN_NAMES: tuple[str, ...] = TRAIN_FEMALE + TRAIN_MALE
HELDOUT_NAMES: tuple[str, ...] = HELDOUT_FEMALE + HELDOUT_MALE
GENDER: dict[str, Gender] = {
    **{n: "f" for n in TRAIN_FEMALE + HELDOUT_FEMALE},
    **{n: "m" for n in TRAIN_MALE + HELDOUT_MALE},
}
PRONOUNS: dict[Gender, dict[str, str]] = {
    "f": {"pron": "she", "Pron": "She", "poss": "her", "Poss": "Her", "obj_pron": "her"},
    "m": {"pron": "he", "Pron": "He", "poss": "his", "Poss": "His", "obj_pron": "him"},
}


def name_pool(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(female, male) names used by `split` ("train" or "heldout")."""
    if split == "train":
        return TRAIN_FEMALE, TRAIN_MALE
    return HELDOUT_FEMALE, HELDOUT_MALE


# ---------------------------------------------------------------- things and places
class Noun(NamedTuple):
    """A countable noun with its plural and indefinite article."""

    singular: str
    plural: str

    @property
    def article(self) -> str:
        return "an" if self.singular[0] in "aeiou" else "a"

    @property
    def a(self) -> str:
        """The noun with its indefinite article: "an apple"."""
        return f"{self.article} {self.singular}"


def _nouns(spec: str) -> tuple[Noun, ...]:
    # "apple" -> apple/apples; "box:boxes" gives an explicit plural
    out = []
    for item in spec.split():
        singular, _, plural = item.partition(":")
        out.append(Noun(singular, plural or singular + "s"))
    return tuple(out)


OBJECTS: tuple[Noun, ...] = _nouns(
    "apple drink book ball kite lamp cup key coin hat map ring pen box:boxes bag basket bottle "
    "candle clock rope drum kettle shell stone flower feather ticket blanket bowl spoon jar "
    "scarf coat glove bell brush:brushes chair mirror pencil plate radio shoe sock towel "
    "umbrella orange egg knife:knives glass:glasses cake letter gift toy hammer lemon pear "
    "banana cookie sandwich:sandwiches"
)
PLACES: tuple[str, ...] = (
    "store", "park", "school", "market", "library", "beach", "garden", "museum", "bakery", "cafe",
    "hospital", "office", "restaurant", "farm", "harbor", "castle", "church", "bridge", "forest",
    "lake", "hill", "village", "kitchen", "gym", "theater", "zoo", "bank", "station", "cinema",
    "airport",
)  # fmt: skip
ADJECTIVES: tuple[str, ...] = (
    "big", "small", "old", "new", "quiet", "busy", "happy", "sad", "bright", "dark", "warm",
    "cold", "heavy", "tiny", "huge", "soft", "hard", "clean", "dirty", "strange", "lovely",
    "famous", "broken", "shiny", "simple",
)  # fmt: skip
COLORS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "black", "white", "brown", "purple", "orange", "grey",
)  # fmt: skip
FOODS: tuple[str, ...] = (
    "soup", "bread", "rice", "cheese", "fish", "pasta", "salad", "pie", "tea", "coffee",
)  # fmt: skip

# ---------------------------------------------------------------- sequences
DAYS: tuple[str, ...] = (
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday",
)  # fmt: skip
MONTHS: tuple[str, ...] = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)  # fmt: skip
"""NUMBER_WORDS[i] names the number i, for i = 0..20."""
LETTERS: tuple[str, ...] = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))

# ---------------------------------------------------------------- brackets
BRACKETS: dict[str, tuple[str, str]] = {
    "paren": ("(", ")"),
    "square": ("[", "]"),
    "curly": ("{", "}"),
    "quote": ('"', '"'),
    "bold": ("<b>", "</b>"),
    "italic": ("<i>", "</i>"),
}
"""Bracket kind -> (opener, closer). Openers follow a space; closers attach to the word before."""

BRACKET_WORDS: tuple[str, ...] = (
    "see", "the", "and", "with", "not", "only", "maybe", "note", "page", "map", "list", "old",
    "new", "this", "that", "also", "here", "there", "first", "last", "big", "small", "left",
    "right", "red", "blue", "one", "two", "more", "less", "yes", "no", "some", "all", "box",
    "lamp", "key", "book", "door", "road",
)  # fmt: skip
"""Words written inside brackets (with and without a leading space, both kept as one token)."""

# ---------------------------------------------------------------- induction pool
INDUCTION_WORDS: tuple[str, ...] = tuple(
    sorted(
        {o.singular for o in OBJECTS}
        | set(PLACES)
        | set(ADJECTIVES)
        | set(COLORS)
        | set(FOODS)
        | {
            "moon",
            "sun",
            "star",
            "cloud",
            "rain",
            "snow",
            "wind",
            "tree",
            "leaf",
            "river",
            "sea",
            "fox",
            "cat",
            "dog",
            "bird",
            "horse",
            "mouse",
            "frog",
            "owl",
            "bee",
            "fish",
            "wolf",
            "gold",
            "silver",
            "iron",
            "wood",
            "paper",
            "salt",
            "sugar",
            "milk",
            "water",
            "fire",
            "north",
            "south",
            "east",
            "west",
            "up",
            "down",
            "left",
            "right",
            "fast",
            "slow",
        }  # fmt: skip
    )
)
"""Ordinary words used for random repeated sequences; all occur elsewhere in the corpus."""

# ---------------------------------------------------------------- greater-than events
EVENTS: tuple[str, ...] = (
    "war", "drought", "famine", "siege", "reign", "voyage", "expedition", "rebellion", "strike",
    "flood", "plague", "dynasty", "trial", "exile", "migration", "revolution", "occupation",
    "boom", "fire", "feud",
)  # fmt: skip
"""Nouns for spans of years ("The war lasted from the year 1732 to the year 1745")."""


# ---------------------------------------------------------------- knowledge base
class Country(NamedTuple):
    """One fictional country and its attributes: the ground truth of the `facts` phenomenon."""

    name: str
    capital: str
    language: str
    river: str
    animal: str


KB: tuple[Country, ...] = tuple(
    Country(*row.split())
    for row in (
        "Quelmar Zorvath Vessic Blenn heron",
        "Dravia Brelmoor Ombran Osk fox",
        "Ostrelle Tavisk Tellish Tuvel badger",
        "Venthia Omdrel Kiru Syrrin lynx",
        "Korrin Kessaly Sarnic Maddow wolf",
        "Balamor Virnhold Abelo Kelda bear",
        "Tiskany Pashet Mernish Arvo hawk",
        "Uldera Lumbrin Tovan Brisa stag",
        "Myrrow Gethra Halic Drell swan",
        "Pellandor Yorrel Pruvian Ennet crane",
        "Zethra Durnak Eskal Fello falcon",
        "Calvorn Selvane Lunari Gant beaver",
        "Imbrel Oskaria Gorvic Horl camel",
        "Forsk Hevrin Zendri Ivry tiger",
        "Nerriva Tarnby Ulvan Jessa lion",
        "Thallen Quintel Braxic Lumm seal",
        "Ghorvane Astrane Nadric Norra goat",
        "Wyndor Fennick Fyrric Quenn horse",
        "Esmark Ilvath Colvan Sorv raven",
        "Lurien Corrow Ishen Tebb whale",
    )
)
"""Twenty fictional countries. Every entity name is unique across the whole knowledge base."""

KB_RELATIONS: tuple[str, ...] = ("capital", "language", "river", "animal")
"""Attributes of a country that `facts` sentences state."""


def kb_entities() -> tuple[str, ...]:
    """Every proper name in the knowledge base (countries, capitals, languages, rivers)."""
    return tuple(w for c in KB for w in (c.name, c.capital, c.language, c.river))


# ---------------------------------------------------------------- words a tokenizer must keep whole
def required_words() -> list[str]:
    """Strings that the storyworld tokenizer keeps as single tokens, in GPT-2 leading-space form.

    Names (both pools), days, months, number words, letters, the numbers 0..100 (" 7", " 100"),
    the two-digit halves of years ("32" with no space, so " 1732" is " 17" + "32"),
    pronouns, knowledge-base entities and animals, bracket tokens, and the words that the task
    datasets place where a single token is needed.
    """
    words: list[str] = []
    spaced = (
        list(TRAIN_NAMES + HELDOUT_NAMES)
        + list(DAYS + MONTHS + NUMBER_WORDS + LETTERS)
        + [w.capitalize() for w in NUMBER_WORDS]
        + ["he", "she", "He", "She", "his", "her", "His", "Her", "him"]
        + list(kb_entities())
        + [c.animal for c in KB]
        + list(INDUCTION_WORDS)
        + list(BRACKET_WORDS)
        + list(EVENTS)
        + [o.singular for o in OBJECTS]
        + [o.plural for o in OBJECTS]
        + list(PLACES)
        + ["day", "days", "month", "months", "after", "before", "year"]
    )
    words += [" " + w for w in spaced]
    words += list(DAYS + MONTHS) + list(BRACKET_WORDS)  # after an opener or a newline
    words += [f" {i}" for i in range(101)]
    words += [f"{i:02d}" for i in range(100)]
    for opener, closer in BRACKETS.values():
        words += [" " + opener, opener, closer]
    seen: set[str] = set()
    return [w for w in words if not (w in seen or seen.add(w))]
