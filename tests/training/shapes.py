"""Generated images whose captions say what is in them: colour, shape, count and position.

The dataset the aligner tests train on. Every attribute changes the pixels a lot (a random image
tower's embedding still tells colours and places apart), and each caption names all four, so text
and image can only be matched by reading the caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "one", 2: "two", 3: "three"}
PLACES = ("left", "right", "top", "bottom")


@dataclass(frozen=True)
class ShapeScene:
    """What one image holds; ``caption`` says it in words."""

    colour: str
    shape: str
    count: int
    place: str

    @property
    def caption(self) -> str:
        noun = self.shape if self.count == 1 else f"{self.shape}s"
        return f"{COUNTS[self.count]} {self.colour} {noun} on the {self.place}"


def random_scene(rng: np.random.Generator) -> ShapeScene:
    return ShapeScene(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        count=int(rng.integers(1, 4)),
        place=str(rng.choice(PLACES)),
    )


def draw_scene(scene: ShapeScene, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """The scene on a light, slightly noisy background; sizes and offsets jitter, so no two images match."""
    background = int(rng.integers(200, 236))
    image = Image.new("RGB", (size, size), (background,) * 3)
    draw = ImageDraw.Draw(image)
    half = size // 2
    left, top = {"left": (0, 0), "right": (half, 0), "top": (0, 0), "bottom": (0, half)}[scene.place]
    width, height = (half, size) if scene.place in ("left", "right") else (size, half)
    colour = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[scene.colour])
    for index in range(scene.count):
        radius = int(rng.integers(size // 12, size // 8 + 1))
        if scene.place in ("left", "right"):
            cx = left + width // 2 + int(rng.integers(-2, 3))
            cy = top + (index + 1) * height // (scene.count + 1) + int(rng.integers(-2, 3))
        else:
            cx = left + (index + 1) * width // (scene.count + 1) + int(rng.integers(-2, 3))
            cy = top + height // 2 + int(rng.integers(-2, 3))
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if scene.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif scene.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)
