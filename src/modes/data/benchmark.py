"""The synthetic vision-language benchmark the bundled model is trained and measured on.

Seeded and procedural (no downloads): 96x96 images with coloured shapes on a 3x3 grid plus
clutter, and short questions with one- or two-word answers. Skills cover image-only
reasoning, text-only reasoning and one that needs both, so that skipping can hurt each
modality differently. Splits use disjoint seed ranges.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw

from modes.data.sample import Sample

__all__ = [
    "COLORS",
    "IMAGE_SIZE",
    "POSITIONS",
    "SHAPES",
    "SKILLS",
    "SPLITS",
    "cell_labels",
    "generate_split",
    "make_sample",
    "vocabulary",
]

IMAGE_SIZE = 96
GRID = 3
CELL = IMAGE_SIZE // GRID
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
SPLITS = {"train": (0, 200_000), "calibration": (1_000_000, 1024), "test": (2_000_000, 1600)}
"""split -> (first seed, number of samples)."""


@dataclass(frozen=True)
class Scene:
    cells: dict[int, tuple[str, str]]  # grid cell 0..8 -> (colour, shape)


def _random_scene(rng: random.Random) -> Scene:
    count = rng.randint(2, 6)
    cells = rng.sample(range(GRID * GRID), count)
    return Scene({cell: (rng.choice(list(COLORS)), rng.choice(SHAPES)) for cell in cells})


def _draw(scene: Scene, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(240, 255) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(4, 12)):  # clutter: small grey specks
        x, y = rng.randrange(IMAGE_SIZE), rng.randrange(IMAGE_SIZE)
        grey = rng.randint(120, 200)
        draw.rectangle((x, y, x + 1, y + 1), fill=(grey, grey, grey))
    for cell, (color, shape) in scene.cells.items():
        row, col = divmod(cell, GRID)
        size = rng.randint(16, 22)
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


# -- skills: each returns (question, answer, needs_image) ----------------------------------------
def _color_at(scene: Scene, rng: random.Random) -> tuple[str, str]:
    cell = rng.choice(list(scene.cells))
    return f"what color is the shape at the {POSITIONS[cell]} ?", scene.cells[cell][0]


def _shape_at(scene: Scene, rng: random.Random) -> tuple[str, str]:
    cell = rng.choice(list(scene.cells))
    return f"what shape is at the {POSITIONS[cell]} ?", scene.cells[cell][1]


def _count_color(scene: Scene, rng: random.Random) -> tuple[str, str]:
    color = rng.choice(list(COLORS))
    count = sum(c == color for c, _ in scene.cells.values())
    return f"how many {color} shapes are there ?", str(count)


def _exists(scene: Scene, rng: random.Random) -> tuple[str, str]:
    present = set(scene.cells.values())
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
    else:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    return f"is there a {color} {shape} ?", "yes" if (color, shape) in present else "no"


def _position_of(scene: Scene, rng: random.Random) -> tuple[str, str]:
    items = list(scene.cells.items())
    unique = [(cell, cs) for cell, cs in items if sum(other == cs for _, other in items) == 1]
    cell, (color, shape) = rng.choice(unique or items)
    return f"where is the {color} {shape} ?", POSITIONS[cell]


def _count_plus(scene: Scene, rng: random.Random) -> tuple[str, str]:
    color, extra = rng.choice(list(COLORS)), rng.randint(1, 5)
    count = sum(c == color for c, _ in scene.cells.values())
    return f"how many {color} shapes plus {extra} ?", str(count + extra)


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"what is {a} plus {b} ?", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"what is {a} minus {b} ?", str(a - b)


def _sequence(rng: random.Random) -> tuple[str, str]:
    kind, items = rng.choice([("day", WEEKDAYS), ("letter", LETTERS)])
    direction = rng.choice(["after", "before"])
    if kind == "day":
        index = rng.randrange(len(items))
        answer = items[(index + (1 if direction == "after" else -1)) % len(items)]
    else:
        index = rng.randrange(1, len(items) - 1)
        answer = items[index + (1 if direction == "after" else -1)]
    return f"what {kind} comes {direction} {items[index]} ?", answer


IMAGE_SKILLS: dict[str, Callable[[Scene, random.Random], tuple[str, str]]] = {
    "color_at": _color_at,
    "shape_at": _shape_at,
    "count_color": _count_color,
    "exists": _exists,
    "position_of": _position_of,
    "count_plus": _count_plus,  # needs both the image and the number in the question
}
TEXT_SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "sequence": _sequence,
}
SKILLS: tuple[str, ...] = (*IMAGE_SKILLS, *TEXT_SKILLS)


def cell_labels(seed: int) -> tuple[Image.Image, list[int], list[int]]:
    """A training image with, per grid cell (row-major), its colour and shape index (len = empty).

    Used to pretrain the bundled model's vision tower, as real VLMs start from a pretrained
    image encoder; drawn from the same scene distribution as the benchmark images.
    """
    rng = random.Random(seed)
    scene = _random_scene(rng)
    colors, empty = list(COLORS), GRID * GRID
    color = [colors.index(scene.cells[c][0]) if c in scene.cells else len(colors) for c in range(empty)]
    shape = [SHAPES.index(scene.cells[c][1]) if c in scene.cells else len(SHAPES) for c in range(empty)]
    return _draw(scene, rng), color, shape


def make_sample(seed: int, skill: str | None = None) -> Sample:
    """The sample of ``seed``; skills cycle with the seed so every split is balanced."""
    rng = random.Random(seed)
    skill = skill or SKILLS[seed % len(SKILLS)]
    if skill in TEXT_SKILLS:
        question, answer = TEXT_SKILLS[skill](rng)
        return Sample(f"s{seed}", question, answer, skill)
    scene = _random_scene(rng)
    question, answer = IMAGE_SKILLS[skill](scene, rng)
    return Sample(f"s{seed}", question, answer, skill, _draw(scene, rng))


def generate_split(split: str, limit: int | None = None) -> list[Sample]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    first, count = SPLITS[split]
    return [make_sample(first + i) for i in range(count if limit is None else min(limit, count))]


def vocabulary() -> list[str]:
    """Every word questions and answers use (the tokenizer's word list)."""
    words = {"?", "yes", "no", *COLORS, *SHAPES, *WEEKDAYS, *LETTERS}
    words |= {w for p in POSITIONS for w in p.split()}
    words |= {str(n) for n in range(0, 20)}
    templates = [
        "what color is the shape at the",
        "what shape is at the",
        "how many shapes are there plus",
        "is there a",
        "where is the",
        "what is plus minus",
        "what day letter comes after before",
    ]
    words |= {w for t in templates for w in t.split()}
    return sorted(words)
