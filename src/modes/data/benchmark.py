"""The synthetic vision-language benchmark the bundled model is trained and measured on.

Seeded and procedural (no downloads). Images are 192x192 with two to six coloured shapes on a
3x3 grid plus clutter; the bundled processor turns each into 6x6 = 36 visual tokens, so every
object spans about four of them (redundant visual tokens, as in real VLMs). Eleven skills:
single-object look-ups, counting, relations between two objects, one that needs the image and
a number in the question, and multi-step text reasoning with two-token answers; questions come
in several phrasings. Splits use disjoint seed ranges.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw

from modes.data.sample import Sample
from modes.errors import UsageError

__all__ = [
    "COLORS",
    "IMAGE_SIZE",
    "IMAGE_SKILLS",
    "POSITIONS",
    "SHAPES",
    "SKILLS",
    "SPLITS",
    "TEXT_SKILLS",
    "TOKENS_PER_SIDE",
    "generate_split",
    "make_sample",
    "token_labels",
    "vocabulary",
]

IMAGE_SIZE = 192
GRID = 3
CELL = IMAGE_SIZE // GRID
TOKENS_PER_SIDE = 6
"""Visual tokens per image side after the processor's 16 px patches and 2x2 merge."""
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
NAMES = ("tom", "ann", "bob", "eve")
ITEMS = ("apples", "coins", "books", "cards")
SPLITS = {"train": (0, 400_000), "calibration": (1_000_000, 1024), "test": (2_000_000, 1650)}
"""split -> (first seed, number of samples)."""


@dataclass(frozen=True)
class Scene:
    cells: dict[int, tuple[str, str]]  # grid cell 0..8 -> (colour, shape)

    def unique_objects(self) -> list[tuple[int, tuple[str, str]]]:
        """(cell, object) for objects no other cell repeats, so that naming one is unambiguous."""
        items = list(self.cells.items())
        return [(cell, obj) for cell, obj in items if sum(other == obj for _, other in items) == 1]


def _random_scene(rng: random.Random) -> Scene:
    count = rng.randint(2, 6)
    cells = rng.sample(range(GRID * GRID), count)
    return Scene({cell: (rng.choice(list(COLORS)), rng.choice(SHAPES)) for cell in cells})


def _draw(scene: Scene, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(240, 255) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(6, 18)):  # clutter: small grey specks
        x, y = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE)
        grey = rng.randint(120, 200)
        draw.rectangle((x, y, x + 2, y + 2), fill=(grey, grey, grey))
    for cell, (color, shape) in scene.cells.items():
        row, col = divmod(cell, GRID)
        size = rng.randint(40, 52)  # spans about 2x2 visual tokens of 32 px
        x0 = col * CELL + rng.randint(2, CELL - size - 2)
        y0 = row * CELL + rng.randint(2, CELL - size - 2)
        fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLORS[color])
        box = (x0, y0, x0 + size, y0 + size)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image


# -- image skills: each returns (question, answer) -----------------------------------------------
def _color_at(scene: Scene, rng: random.Random) -> tuple[str, str]:
    cell = rng.choice(list(scene.cells))
    where = POSITIONS[cell]
    question = rng.choice(
        [f"what color is the shape at the {where} ?", f"the shape at the {where} has which color ?"]
    )
    return question, scene.cells[cell][0]


def _shape_at(scene: Scene, rng: random.Random) -> tuple[str, str]:
    cell = rng.choice(list(scene.cells))
    where = POSITIONS[cell]
    question = rng.choice([f"what shape is at the {where} ?", f"which shape do you see at the {where} ?"])
    return question, scene.cells[cell][1]


def _object_at(scene: Scene, rng: random.Random) -> tuple[str, str]:
    cell = rng.randrange(GRID * GRID) if rng.random() < 0.2 else rng.choice(list(scene.cells))
    answer = " ".join(scene.cells[cell]) if cell in scene.cells else "nothing"
    return f"what is at the {POSITIONS[cell]} of the picture ?", answer


def _count_color(scene: Scene, rng: random.Random) -> tuple[str, str]:
    color = rng.choice(list(COLORS))
    count = sum(c == color for c, _ in scene.cells.values())
    question = rng.choice(
        [f"how many {color} shapes are there ?", f"count the {color} shapes in the picture ."]
    )
    return question, str(count)


def _exists(scene: Scene, rng: random.Random) -> tuple[str, str]:
    present = set(scene.cells.values())
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
    else:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    return f"is there a {color} {shape} in the picture ?", "yes" if (color, shape) in present else "no"


def _position_of(scene: Scene, rng: random.Random) -> tuple[str, str]:
    cell, (color, shape) = rng.choice(scene.unique_objects())
    return f"where is the {color} {shape} ?", POSITIONS[cell]


def _relation(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """Is one object left of / right of / above / below another (compares the two cells); "yes"
    half the time, so that answering "no" to every question scores 50%, not the 2/3 of a
    relation drawn at random."""
    (cell_a, a), (cell_b, b) = rng.sample(scene.unique_objects(), 2)
    (row_a, col_a), (row_b, col_b) = divmod(cell_a, GRID), divmod(cell_b, GRID)
    relations = [
        ("left of", col_a < col_b),
        ("right of", col_a > col_b),
        ("above", row_a < row_b),
        ("below", row_a > row_b),
    ]
    wanted = rng.random() < 0.5  # two distinct cells: some relation holds and some does not
    relation, holds = rng.choice([(name, held) for name, held in relations if held == wanted])
    return f"is the {' '.join(a)} {relation} the {' '.join(b)} ?", "yes" if holds else "no"


def _count_plus(scene: Scene, rng: random.Random) -> tuple[str, str]:
    color, extra = rng.choice(list(COLORS)), rng.randint(1, 5)
    count = sum(c == color for c, _ in scene.cells.values())
    return f"if you add {extra} to the number of {color} shapes , what do you get ?", str(count + extra)


# -- text skills: multi-step reasoning -----------------------------------------------------------
def _arithmetic(rng: random.Random) -> tuple[str, str]:
    """Two steps: a plus b, then minus c (kept within 0..18)."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    c = rng.randint(0, min(9, a + b))
    return f"start with {a} , add {b} and then take away {c} . what is the result ?", str(a + b - c)


def _transfer(rng: random.Random) -> tuple[str, str]:
    """Two people, a gift from one to the other: both new amounts, in order (two tokens)."""
    first, second = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    gift = rng.randint(0, b)
    question = (
        f"{first} has {a} {item} and {second} has {b} {item} . {second} gives {gift} {item} to {first} . "
        f"how many {item} do {first} and {second} have now ?"
    )
    return question, f"{a + gift} {b - gift}"


def _sequence(rng: random.Random) -> tuple[str, str]:
    """The two days or letters after / before a given one (two tokens)."""
    kind, items = rng.choice([("days", WEEKDAYS), ("letters", LETTERS)])
    direction = rng.choice(["after", "before"])
    step = 1 if direction == "after" else -1
    if kind == "days":
        index = rng.randrange(len(items))
        answer = [items[(index + step * k) % len(items)] for k in (1, 2)]
    else:
        index = rng.randrange(2, len(items) - 2)
        answer = [items[index + step * k] for k in (1, 2)]
    return f"name the two {kind} that come {direction} {items[index]} , nearest first .", " ".join(answer)


IMAGE_SKILLS: dict[str, Callable[[Scene, random.Random], tuple[str, str]]] = {
    "color_at": _color_at,
    "shape_at": _shape_at,
    "object_at": _object_at,
    "count_color": _count_color,
    "exists": _exists,
    "position_of": _position_of,
    "relation": _relation,  # relations between two objects
    "count_plus": _count_plus,  # needs both the image and the number in the question
}
UNIQUE_OBJECTS_NEEDED = {"position_of": 1, "relation": 2}
"""Skills that name objects: their scenes are drawn again until that many objects are unique."""
TEXT_SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "transfer": _transfer,
    "sequence": _sequence,
}
SKILLS: tuple[str, ...] = (*IMAGE_SKILLS, *TEXT_SKILLS)


def token_labels(seed: int) -> tuple[Image.Image, list[int], list[int]]:
    """A training image with, per visual token (row-major), the colour and shape index of the
    object in its grid cell (index len(...) = empty cell).

    Used to pretrain the bundled model's vision tower, as real VLMs start from a pretrained
    image encoder; drawn from the same scene distribution as the benchmark images.
    """
    rng = random.Random(seed)
    scene = _random_scene(rng)
    colors = list(COLORS)
    color, shape = [], []
    for token in range(TOKENS_PER_SIDE * TOKENS_PER_SIDE):
        row, col = divmod(token, TOKENS_PER_SIDE)
        cell = (row * GRID // TOKENS_PER_SIDE) * GRID + col * GRID // TOKENS_PER_SIDE
        obj = scene.cells.get(cell)
        color.append(colors.index(obj[0]) if obj else len(colors))
        shape.append(SHAPES.index(obj[1]) if obj else len(SHAPES))
    return _draw(scene, rng), color, shape


def make_sample(seed: int, skill: str | None = None) -> Sample:
    """The sample of ``seed``; skills cycle with the seed so every split is balanced."""
    rng = random.Random(seed)
    skill = skill or SKILLS[seed % len(SKILLS)]
    if skill in TEXT_SKILLS:
        question, answer = TEXT_SKILLS[skill](rng)
        return Sample(f"s{seed}", question, answer, skill)
    scene = _random_scene(rng)
    while len(scene.unique_objects()) < UNIQUE_OBJECTS_NEEDED.get(skill, 0):
        scene = _random_scene(rng)
    question, answer = IMAGE_SKILLS[skill](scene, rng)
    return Sample(f"s{seed}", question, answer, skill, _draw(scene, rng))


def generate_split(split: str, limit: int | None = None) -> list[Sample]:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    first, count = SPLITS[split]
    return [make_sample(first + i) for i in range(count if limit is None else min(limit, count))]


def vocabulary() -> list[str]:
    """Every word questions and answers use (the tokenizer's word list)."""
    words = {"?", ".", ",", "yes", "no", "nothing", *COLORS, *SHAPES, *WEEKDAYS, *LETTERS, *NAMES, *ITEMS}
    words |= {w for p in POSITIONS for w in p.split()}
    words |= {str(n) for n in range(0, 20)}
    templates = [
        "what color is the shape at the has which",
        "what shape is at the which do you see",
        "what is at the of the picture",
        "how many shapes are there count the in picture",
        "is there a in the picture",
        "where is the",
        "is the left of right above below",
        "if you add to the number of shapes what do get",
        "start with add and then take away what is the result",
        "has and gives to how many do have now",
        "name the two days letters that come after before nearest first",
    ]
    words |= {w for t in templates for w in t.split()}
    return sorted(words)
