"""Synthetic scenes of large coloured shapes, and the language that refers to them.

A scene is 1-4 non-overlapping shapes (circle, square, triangle, star) of distinct colours on a
plain or lightly noisy light background, 320x240 or 240x320. Shapes are big and every text
generated here names exactly one shape (or, for group texts, exactly the listed shapes), so a
tiny model can learn the task on a CPU. Everything is a pure function of the generator passed
in; :mod:`utils.data.synthetic_writer` writes scenes in the real on-disk formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from utils.data.rng import choose

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star")
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((320, 240), (240, 320))  # (width, height)
MIN_RADIUS, MAX_RADIUS = 30, 58
POSITION_MARGIN = 30  # pixels a shape must lead the others by to be "leftmost" etc.
SIZE_RATIO = 1.4  # area ratio to the runner-up to be "largest" / "smallest"

KIND_REASONS: dict[str, list[tuple[str, str]]] = {
    "circle": [
        ("What would you pick up if you wanted the round thing?", "circles are round"),
        ("Which shape could roll like a ball?", "a circle is round, so it could roll"),
        ("Which object in the picture has no corners at all?", "a circle has no corners"),
    ],
    "square": [
        ("Which shape has four equal sides?", "a square has four equal sides"),
        ("Which object looks like a box seen from the front?", "a box seen from the front is a square"),
    ],
    "triangle": [
        ("Which shape has exactly three corners?", "a triangle has three corners"),
        ("Which object looks like a slice of pizza?", "a slice of pizza is shaped like a triangle"),
    ],
    "star": [
        ("Which shape would you draw in the night sky?", "stars shine in the night sky"),
        ("Which object has five points?", "a star has five points"),
    ],
}
COLOUR_REASONS: dict[str, list[tuple[str, str]]] = {
    "red": [("Which shape has the colour of a ripe tomato?", "ripe tomatoes are red"),
            ("Which object is the colour of a fire truck?", "fire trucks are red")],
    "green": [("Which shape is the colour of fresh grass?", "fresh grass is green"),
              ("Which object has the colour of a lime?", "limes are green")],
    "blue": [("Which shape has the colour of a clear sky?", "a clear sky is blue"),
             ("Which object is the colour of the deep sea?", "the deep sea is blue")],
    "yellow": [("Which object has the colour of a banana?", "bananas are yellow"),
               ("Which shape is the colour of the sun in a child's drawing?", "children draw the sun yellow")],
    "purple": [("Which shape is the colour of grapes?", "grapes are purple"),
               ("Which object has the colour of lavender flowers?", "lavender flowers are purple")],
    "orange": [("Which shape has the colour of a pumpkin?", "pumpkins are orange"),
               ("Which object is the colour of a carrot?", "carrots are orange")],
}
EXTREME_REASONS: dict[str, tuple[str, str]] = {
    "largest": ("Which shape takes up the most space in the picture?", "it is the largest shape"),
    "smallest": ("Which shape would be easiest to hide behind your thumb?", "it is the smallest shape"),
    "leftmost": ("Reading the picture from left to right, which shape do you see first?", "it is the leftmost shape"),
    "rightmost": ("Which shape is closest to the right edge of the picture?", "it is the rightmost shape"),
    "topmost": ("Which shape sits highest in the picture?", "it is the shape at the top"),
    "bottommost": ("Which shape is nearest to the bottom of the picture?", "it is the shape at the bottom"),
}
EXTREME_PHRASES: dict[str, tuple[str, ...]] = {
    "largest": ("the largest shape", "the biggest shape"),
    "smallest": ("the smallest shape", "the tiniest shape"),
    "leftmost": ("the leftmost shape", "the shape on the left"),
    "rightmost": ("the rightmost shape", "the shape on the right"),
    "topmost": ("the shape at the top", "the topmost shape"),
    "bottommost": ("the shape at the bottom", "the bottommost shape"),
}
RELATIONS: dict[str, str] = {"left": "left of", "right": "right of", "above": "above", "below": "below"}


@dataclass(frozen=True)
class Shape:
    """One filled polygon of a scene."""

    kind: str
    colour: str
    center: tuple[int, int]  # (x, y)
    radius: int
    polygon: np.ndarray  # N x 2 int32 (x, y) vertices

    @property
    def name(self) -> str:
        """Colour and kind, e.g. ``"red circle"`` (unique within a scene)."""
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """A background and its shapes; ``noise_seed`` fixes the background noise (0: plain)."""

    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    noise_seed: int

    def mask(self, index: int) -> np.ndarray:
        """``H x W`` uint8 mask (0/1) of shape ``index``, exactly as drawn."""
        mask = np.zeros((self.height, self.width), dtype=np.uint8)
        cv2.fillPoly(mask, [self.shapes[index].polygon], 1)
        return mask

    def areas(self) -> list[int]:
        """Pixel area of each shape."""
        return [int(self.mask(index).sum()) for index in range(len(self.shapes))]


def shape_polygon(kind: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """Integer vertices of a shape centred at (cx, cy) whose circumradius is ``radius``."""
    if kind == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    elif kind == "square":
        half = radius / np.sqrt(2)
        points = np.array(
            [[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half], [cx - half, cy + half]]
        )
    elif kind == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    elif kind == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; known: {SHAPE_KINDS}")
    return np.round(points).astype(np.int32)


def make_scene(rng: np.random.Generator, max_shapes: int = 4) -> Scene:
    """Draw a scene: size, background, 1-``max_shapes`` non-overlapping shapes of distinct colours."""
    width, height = choose(rng, IMAGE_SIZES)
    grey = int(rng.integers(215, 250))
    background = (grey, grey, grey)
    count = int(rng.integers(1, max_shapes + 1))
    colours = [str(colour) for colour in rng.permutation(list(COLOURS))[:count]]
    shapes: list[Shape] = []
    for colour in colours:
        for _ in range(200):
            radius = int(rng.integers(MIN_RADIUS, MAX_RADIUS + 1))
            cx = int(rng.integers(radius + 4, width - radius - 4))
            cy = int(rng.integers(radius + 4, height - radius - 4))
            if all((cx - s.center[0]) ** 2 + (cy - s.center[1]) ** 2 > (radius + s.radius + 8) ** 2 for s in shapes):
                kind = choose(rng, SHAPE_KINDS)
                shapes.append(Shape(kind, colour, (cx, cy), radius, shape_polygon(kind, cx, cy, radius)))
                break
    noise_seed = int(rng.integers(1, 2**31)) if rng.random() < 0.5 else 0
    return Scene(width, height, background, tuple(shapes), noise_seed)


def render_scene(scene: Scene) -> np.ndarray:
    """The scene as an ``H x W x 3`` uint8 RGB image (shapes drawn with their exact masks)."""
    image = np.empty((scene.height, scene.width, 3), dtype=np.uint8)
    image[:] = scene.background
    for shape in scene.shapes:
        cv2.fillPoly(image, [shape.polygon], COLOURS[shape.colour])
    if scene.noise_seed:
        noise = np.random.default_rng(scene.noise_seed).normal(0, 3.0, image.shape)
        image = np.clip(image.astype(np.float64) + noise, 0, 255).astype(np.uint8)
    return image


def extremes(scene: Scene, index: int) -> list[str]:
    """Which unambiguous extremes shape ``index`` is (``"largest"``, ``"leftmost"`` ...)."""
    if len(scene.shapes) < 2:
        return []
    found = []
    areas = scene.areas()
    others = [area for i, area in enumerate(areas) if i != index]
    if areas[index] >= SIZE_RATIO * max(others):
        found.append("largest")
    if areas[index] * SIZE_RATIO <= min(others):
        found.append("smallest")
    xs = [shape.center[0] for shape in scene.shapes]
    ys = [shape.center[1] for shape in scene.shapes]
    other_xs = [x for i, x in enumerate(xs) if i != index]
    other_ys = [y for i, y in enumerate(ys) if i != index]
    if xs[index] + POSITION_MARGIN <= min(other_xs):
        found.append("leftmost")
    if xs[index] - POSITION_MARGIN >= max(other_xs):
        found.append("rightmost")
    if ys[index] + POSITION_MARGIN <= min(other_ys):
        found.append("topmost")
    if ys[index] - POSITION_MARGIN >= max(other_ys):
        found.append("bottommost")
    return found


def _is_unique_kind(scene: Scene, index: int) -> bool:
    return sum(shape.kind == scene.shapes[index].kind for shape in scene.shapes) == 1


def relation_phrases(scene: Scene, index: int) -> list[str]:
    """"the shape left of the blue square"-style phrases that single out shape ``index``."""
    phrases = []
    target = scene.shapes[index]
    for anchor_index, anchor in enumerate(scene.shapes):
        if anchor_index == index:
            continue
        offsets = {
            "left": lambda s: anchor.center[0] - s.center[0],
            "right": lambda s: s.center[0] - anchor.center[0],
            "above": lambda s: anchor.center[1] - s.center[1],
            "below": lambda s: s.center[1] - anchor.center[1],
        }
        for relation, offset in offsets.items():
            matching = [i for i, s in enumerate(scene.shapes) if i != anchor_index and offset(s) > 0]
            if matching == [index] and offset(target) >= POSITION_MARGIN:
                phrases.append(f"the shape {RELATIONS[relation]} the {anchor.name}")
    return phrases


def referring_expressions(scene: Scene, index: int) -> list[str]:
    """Short texts naming exactly shape ``index`` (colour, kind, position, size, relations)."""
    shape = scene.shapes[index]
    texts = [f"the {shape.name}", f"the {shape.colour} shape", f"{shape.name}"]
    if _is_unique_kind(scene, index):
        texts.append(f"the {shape.kind}")
    for extreme in extremes(scene, index):
        texts.extend(EXTREME_PHRASES[extreme])
    texts.extend(relation_phrases(scene, index))
    return texts


def _reasons(scene: Scene, index: int) -> list[tuple[str, str, str]]:
    """(query, reason, short phrase) for every reasoning query whose answer is exactly shape ``index``."""
    shape = scene.shapes[index]
    found: list[tuple[str, str, str]] = []
    if _is_unique_kind(scene, index):
        found.extend((query, reason, f"the {shape.kind}") for query, reason in KIND_REASONS[shape.kind])
    found.extend((query, reason, f"the {shape.colour} shape") for query, reason in COLOUR_REASONS[shape.colour])
    for extreme in extremes(scene, index):
        found.append((*EXTREME_REASONS[extreme], EXTREME_PHRASES[extreme][0]))
    return found


def reasoning_queries(scene: Scene, index: int) -> list[tuple[str, str]]:
    """(query, explanation) pairs whose answer is exactly shape ``index``."""
    name = scene.shapes[index].name
    return [(query, f"The {name} is the answer, because {reason}.") for query, reason, _ in _reasons(scene, index)]


def reasoning_phrases(scene: Scene, index: int) -> dict[str, str]:
    """For each of :func:`reasoning_queries`, the short phrase it amounts to, worked out from the
    words alone ("the red shape" for "Which shape has the colour of a ripe tomato?"): what a
    named answer calls the target (``--answer_style named``), so that answering needs no more
    looking at the image than the query's own short form does."""
    return {query: phrase for query, _, phrase in _reasons(scene, index)}


def group_expressions(scene: Scene) -> list[tuple[str, list[int]]]:
    """Texts naming two or more shapes at once, with the shapes they name."""
    groups: list[tuple[str, list[int]]] = []
    for kind in SHAPE_KINDS:
        members = [i for i, shape in enumerate(scene.shapes) if shape.kind == kind]
        if len(members) >= 2:
            groups.append((f"all the {kind}s", members))
    if len(scene.shapes) >= 2:
        groups.append(("all the shapes", list(range(len(scene.shapes)))))
    return groups


def absent_expression(scene: Scene, rng: np.random.Generator) -> str:
    """A text naming a shape that is not in the scene (a colour absent from it)."""
    present = {shape.colour for shape in scene.shapes}
    colour = choose(rng, [colour for colour in COLOURS if colour not in present])
    return f"the {colour} {choose(rng, SHAPE_KINDS)}"


def with_article(phrase: str) -> str:
    """``"a red circle"`` / ``"an orange star"``."""
    return f"{'an' if phrase[:1] in 'aeiou' else 'a'} {phrase}"


def vqa_turns(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """2-4 question/answer pairs about counts, colours, kinds and presence."""
    count = len(scene.shapes)
    candidates = [
        ("How many shapes are in the image?", "There is one shape." if count == 1 else f"There are {count} shapes."),
    ]
    for index, shape in enumerate(scene.shapes):
        if _is_unique_kind(scene, index):
            candidates.append((f"What colour is the {shape.kind}?", f"The {shape.kind} is {shape.colour}."))
        candidates.append(
            (f"What shape is the {shape.colour} object?", f"The {shape.colour} object is {with_article(shape.kind)}.")
        )
        if "largest" in extremes(scene, index):
            candidates.append(("Which shape is the largest?", f"The {shape.name} is the largest."))
    absent = absent_expression(scene, rng).removeprefix("the ")
    candidates.append((f"Is there {with_article(absent)} in the image?", "No, there is not."))
    present = choose(rng, scene.shapes)
    candidates.append((f"Is there {with_article(present.name)} in the image?", "Yes, there is."))
    order = rng.permutation(len(candidates))[: int(rng.integers(2, 5))]
    return [candidates[int(i)] for i in order]
