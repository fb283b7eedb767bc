"""Synthetic pictures and visual questions of the VLM zoo, rendered in code with numpy.

A scene is 1 to `MAX_OBJECTS` squares of random colours, each filling one cell of a 4 x 4 grid on a
16 x 16 picture (the vision tower's 4 x 4 patches see one cell each). The question ``n`` asks how many
squares there are; colours and positions vary, so the answer must be read off the picture.

Counting per colour (``r``/``v``/``u``: how many red/green/blue squares) was tried first and dropped:
after 1,000 training steps the VLM answered them no better than the most common count (about 0.4,
against 0.99 for ``n``), and a zoo's skills must be learnt cheaply (docs/ZOO.md).

Visual questions are answered in language 1 (``0-9``). Prefixed with the translate mark (``#n``) they
ask for the answer in language 2 (``a-j``): the composition the zoo measures (docs/ZOO.md).
"""

from __future__ import annotations

import random

import numpy as np

from evomerge.zoo.tasks import TRANSLATE_MARK, write_number

GRID = 4
CELL = 4
IMAGE_SIZE = GRID * CELL
MAX_OBJECTS = 9
COLOURS: dict[str, tuple[int, int, int]] = {"r": (220, 40, 40), "v": (40, 190, 60), "u": (50, 80, 230)}
QUESTIONS = ("n",)
BACKGROUND = (24, 24, 24)

Scene = tuple[tuple[int, str], ...]
"""Sorted ``(cell, colour letter)`` pairs: the identity of a picture (held-out pools hold scenes)."""


def draw_scene(rng: random.Random) -> Scene:
    """A random scene: 1..MAX_OBJECTS squares in distinct cells, each of a random colour."""
    count = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(range(GRID * GRID), count)
    return tuple(sorted((cell, rng.choice(tuple(COLOURS))) for cell in cells))


def render(scene: Scene) -> np.ndarray:
    """The scene as a (16, 16, 3) uint8 RGB picture; squares leave a one-pixel margin in their cell."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for cell, colour in scene:
        top, left = (cell // GRID) * CELL, (cell % GRID) * CELL
        image[top : top + CELL - 1, left : left + CELL - 1] = COLOURS[colour]
    return image


def answer(scene: Scene, question: str) -> int:
    """The number a question asks about the scene: how many squares it holds."""
    if question != "n":
        raise ValueError(f"unknown visual question {question!r}")
    return len(scene)


def visual_problem(scene: Scene, question: str, language: int) -> tuple[str, str]:
    """``(question text, answer)``; language 2 is asked with the translate mark in front."""
    text = question if language == 1 else TRANSLATE_MARK + question
    return text, write_number(answer(scene, question), language)


__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "QUESTIONS",
    "Scene",
    "answer",
    "draw_scene",
    "render",
    "visual_problem",
]
