"""Synthetic image-text tasks rendered on the fly with pillow: they make a tiny model learn to see.

Every sample is a pure function of ``(seed, split, index)``: a :class:`Scene` (canvas, background, shapes,
words) is drawn at random, a question about it is asked and the answer is read off the scene, so answers
match the rendered content by construction (``tests/test_train_synthetic.py`` checks it from the pixels).

Tasks (each answer is one of at least four options, so chance is at most 25%):

- ``color``    "What color is the square?"                       -> one of 8 colours
- ``shape``    "What shape is red?"                              -> one of 5 shapes
- ``count``    "How many shapes are there?"                      -> 1 .. 6
- ``position`` "Where is the red circle relative to the blue square?" -> left / right / above / below
- ``read``     "What word is written in the image?"             -> one of 24 words
- ``describe`` "What shapes are in the image?"                   -> "a red circle and a blue square" (left to right)

Held-out split: a scene's canonical description is hashed; 5% of the hash space is held out. Training
samples whose hash falls there are redrawn, held-out samples are drawn until they land there, so the two
splits never share a scene.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (230, 200, 20),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 110, 180),
    "black": (30, 30, 30),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
WORDS = (
    "scout", "apple", "river", "cloud", "tiger", "piano", "lemon", "house", "train", "smile", "ocean",
    "robot", "pizza", "earth", "magic", "light", "storm", "dream", "tulip", "zebra", "candy", "forest",
    "rocket", "garden",
)  # fmt: skip
TASKS = ("color", "shape", "count", "position", "read", "describe")
RELATIONS = ("left", "right", "above", "below")
# Mostly single-tile canvases (cheap); one in twelve multi-tile, so the model also sees tiled image layouts.
CANVASES = ((168, 168),) * 44 + ((252, 168), (336, 252), (336, 336), (448, 336))
HELDOUT_PER_MILLE = 50
MAX_COUNT = 6


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    color: str  # one of COLORS
    cx: int
    cy: int
    size: int  # side of the bounding box, pixels


@dataclass(frozen=True)
class Word:
    text: str
    x: int  # top-left corner of the text's bounding box
    y: int
    font_size: int
    fill: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...] = ()
    words: tuple[Word, ...] = ()

    def key(self) -> str:
        """Canonical description: equal keys render equal images."""
        return repr(self)


@dataclass(frozen=True)
class Sample:
    task: str
    scene: Scene
    question: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False)

    def messages(self, with_answer: bool = True) -> list[dict]:
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}
        if not with_answer:
            return [user]
        return [user, {"role": "assistant", "content": self.answer}]

    def render(self) -> Image.Image:
        return render(self.scene)


# ---------------------------------------------------------------------- rendering
def _font(size: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError) as e:  # pillow < 10.1 or no FreeType
        raise RuntimeError(
            f"synthetic text needs pillow >= 10.1 with FreeType (ImageFont.load_default(size=...)): {e}"
        ) from e


def text_box(text: str, font_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of ``text`` drawn at (0, 0)."""
    return _font(font_size).getbbox(text)


def shape_polygon(shape: Shape) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape (None for circles)."""
    cx, cy, r = shape.cx, shape.cy, shape.size / 2
    if shape.kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape.kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape.kind == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape.kind == "cross":
        a = r / 3  # half the arm width
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
            (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
            (cx - r, cy - a), (cx - a, cy - a),
        ]  # fmt: skip
    if shape.kind == "circle":
        return None
    raise ValueError(f"shape kind {shape.kind!r}; expected one of {SHAPES}")


def render(scene: Scene) -> Image.Image:
    """Draw a scene (no antialiasing, so every shape pixel has exactly its palette colour)."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        fill = COLORS[shape.color]
        polygon = shape_polygon(shape)
        if polygon is None:
            r = shape.size / 2
            draw.ellipse((shape.cx - r, shape.cy - r, shape.cx + r, shape.cy + r), fill=fill)
        else:
            draw.polygon(polygon, fill=fill)
    for word in scene.words:
        left, top, _, _ = text_box(word.text, word.font_size)
        draw.text((word.x - left, word.y - top), word.text, fill=word.fill, font=_font(word.font_size))
    return image


# ---------------------------------------------------------------------- scene sampling
class _Placer:
    """Rejection sampling of non-overlapping boxes on a canvas."""

    def __init__(self, rng: random.Random, width: int, height: int, margin: int = 4):
        self.rng, self.width, self.height, self.margin = rng, width, height, margin
        self.boxes: list[tuple[float, float, float, float]] = []

    def free(self, box) -> bool:
        m = self.margin
        return all(
            box[2] + m <= b[0] or b[2] + m <= box[0] or box[3] + m <= b[1] or b[3] + m <= box[1]
            for b in self.boxes
        )

    def place(self, w: int, h: int, tries: int = 200) -> tuple[int, int] | None:
        """Top-left corner of a free w x h box, or None."""
        m = self.margin
        if w + 2 * m > self.width or h + 2 * m > self.height:
            return None
        for _ in range(tries):
            x = self.rng.randint(m, self.width - w - m)
            y = self.rng.randint(m, self.height - h - m)
            if self.free((x, y, x + w, y + h)):
                self.boxes.append((x, y, x + w, y + h))
                return x, y
        return None


def _background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(232, 252) for _ in range(3))


def _shape_size(rng: random.Random, scene_min: int, many: bool) -> int:
    # At least ~2 ViT patches (14 px) across, so a patch-14 tower sees each shape's outline.
    low, high = (0.15, 0.25) if many else (0.24, 0.4)
    return max(24, int(scene_min * rng.uniform(low, high)))


def _place_shapes(
    rng, placer, specs: list[tuple[str, str]], scene_min: int, many: bool
) -> list[Shape] | None:
    shapes = []
    for kind, color in specs:
        size = _shape_size(rng, scene_min, many)
        corner = placer.place(size, size)
        if corner is None:
            return None
        shapes.append(Shape(kind, color, corner[0] + size // 2, corner[1] + size // 2, size))
    return shapes


def _distractor_word(rng, placer, scene_min: int) -> Word | None:
    """A small word somewhere, like the label in the package's example image."""
    text = rng.choice(WORDS)
    size = max(9, int(scene_min * rng.uniform(0.05, 0.07)))
    left, top, right, bottom = text_box(text, size)
    corner = placer.place(right - left, bottom - top)
    if corner is None:
        return None
    return Word(text, corner[0], corner[1], size, tuple(rng.randint(10, 90) for _ in range(3)))


def _read_font_size(text: str, width: int, height: int, share: float) -> int:
    """Font size at which ``text`` spans about ``share`` of the canvas width (at most 35% of its height):
    the word to read is large and clear, its letters several ViT patches tall."""
    left, top, right, bottom = text_box(text, 100)
    size = 100 * min(share * width / (right - left), 0.35 * height / (bottom - top))
    return max(12, int(size))


def _distinct(rng, pool, n):
    return rng.sample(list(pool), n)


def _describe(shapes: list[Shape]) -> str:
    parts = [f"a {s.color} {s.kind}" for s in sorted(shapes, key=lambda s: s.cx)]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _relation(a: Shape, b: Shape) -> str | None:
    """Where a is relative to b, when one axis clearly dominates (else None)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= 2 * abs(dy) + 8:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx) + 8:
        return "above" if dy < 0 else "below"
    return None


def _draw_task(rng: random.Random, task: str) -> Sample | None:
    """One attempt at a sample of ``task``; None when the random layout did not work out."""
    width, height = rng.choice(CANVASES)
    scene_min = min(width, height)
    placer = _Placer(rng, width, height)
    words: list[Word] = []
    if task == "read":
        text = rng.choice(WORDS)
        size = _read_font_size(text, width, height, rng.uniform(0.55, 0.85))
        left, top, right, bottom = text_box(text, size)
        corner = placer.place(right - left, bottom - top)
        if corner is None:
            return None
        fill = rng.choice([(20, 20, 20), (30, 30, 120), (110, 20, 20), (20, 90, 40)])
        words.append(Word(text, corner[0], corner[1], size, fill))
        specs = [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(rng.randint(0, 2))]
        shapes = _place_shapes(rng, placer, specs, scene_min, many=True)
        if shapes is None:
            return None
        scene = Scene(width, height, _background(rng), tuple(shapes), tuple(words))
        return Sample(task, scene, "What word is written in the image?", text)

    if rng.random() < 0.25:
        word = _distractor_word(rng, placer, scene_min)
        if word is not None:
            words.append(word)
    if task == "count":
        n = rng.randint(1, MAX_COUNT)
        specs = [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(n)]
        shapes = _place_shapes(rng, placer, specs, scene_min, many=True)
        question, answer = "How many shapes are there?", str(n)
    elif task in ("color", "shape", "describe"):
        n = rng.randint(1, 3)
        kinds = _distinct(rng, SHAPES, n)
        colors = _distinct(rng, COLORS, n) if task == "shape" else [rng.choice(list(COLORS)) for _ in kinds]
        shapes = _place_shapes(rng, placer, list(zip(kinds, colors)), scene_min, many=False)
        if shapes is None:
            return None
        target = rng.choice(shapes)
        if task == "color":
            question, answer = f"What color is the {target.kind}?", target.color
        elif task == "shape":
            question, answer = f"What shape is {target.color}?", target.kind
        else:
            xs = sorted(s.cx for s in shapes)
            if any(b - a < 0.15 * width for a, b in zip(xs, xs[1:])):
                return None  # left-to-right order must be unambiguous
            question, answer = "What shapes are in the image?", _describe(shapes)
    elif task == "position":
        pairs = [(k, c) for k in SHAPES for c in COLORS]
        specs = _distinct(rng, pairs, 2)
        shapes = _place_shapes(rng, placer, specs, scene_min, many=False)
        if shapes is None:
            return None
        a, b = shapes
        answer = _relation(a, b)
        if answer is None:
            return None
        question = f"Where is the {a.color} {a.kind} relative to the {b.color} {b.kind}?"
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if shapes is None:
        return None
    scene = Scene(width, height, _background(rng), tuple(shapes), tuple(words))
    return Sample(task, scene, question, answer)


def is_heldout(sample: Sample) -> bool:
    digest = hashlib.sha1(f"{sample.task}|{sample.question}|{sample.scene.key()}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELDOUT_PER_MILLE


class SyntheticTasks:
    """Indexable, infinite stream of synthetic samples: ``tasks[i]`` is a pure function of (seed, split, i).

    ``split``: ``"train"`` or ``"heldout"``. Task ``i`` is ``tasks[i % len(tasks)]``, so every task gets
    the same share.
    """

    def __init__(self, split: str = "train", seed: int = 0, tasks: tuple[str, ...] | list[str] = TASKS):
        if split not in ("train", "heldout"):
            raise ValueError(f"split={split!r}; expected 'train' or 'heldout'")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks {list(tasks)}; expected a non-empty subset of {TASKS}")
        self.split, self.seed, self.tasks = split, seed, tuple(tasks)

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            raise IndexError(f"sample index {index}; expected >= 0")
        task = self.tasks[index % len(self.tasks)]
        want_heldout = self.split == "heldout"
        for attempt in range(100_000):
            rng = random.Random(f"scout-synthetic:{self.seed}:{index}:{attempt}")
            sample = _draw_task(rng, task)
            if sample is not None and is_heldout(sample) == want_heldout:
                return sample
        raise RuntimeError(f"no {self.split} sample for task {task!r} at index {index}")
