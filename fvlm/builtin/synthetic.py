"""A seeded, code-generated grounded VQA task: coloured shapes on a 3x3 layout.

Every image is 336 x 336 px (the LLaVA-1.5 input size: a 24 x 24 grid of 14 px patches) with 3 to 5
filled shapes in distinct cells of a 3 x 3 layout. An object has a colour (`COLOURS`), a shape
(`SHAPES`), a size (small, about 3 x 3 patches, or large, about 5 x 5 patches) and a jittered
position inside its cell. Together the objects cover about 5-10 % of the 576 patches, so keeping 32
patches at random usually loses the one the question is about.

Question kinds ([`KINDS`][fvlm.builtin.synthetic.KINDS]), one per record, cycling in that order so every split is balanced:

* ``colour`` - "what colour is the shape in the top left ?" (the answer lives in one cell);
* ``shape`` - "what shape is in the bottom right ?";
* ``count`` - "how many circles are there ?" / "how many red shapes are there ?" (answer ``0``-``5``);
* ``exists`` - "is there a red square ?": exactly half ``yes``; the ``no`` questions are POPE-style
  negatives, half "adversarial" (the colour and the shape both occur, on other objects) and half
  random (any absent colour-shape pair);
* ``choice`` - "where is the blue triangle ? options : A top left , B center , C bottom right"
  (multiple choice over three cells, answer ``A`` / ``B`` / ``C``; the object is unique).

Everything is a pure function of ``(split, seed, index)``: [`sample`][fvlm.builtin.synthetic.sample] draws record ``index`` of a
split from its own ``random.Random`` instance, so records can be generated in any order or in parallel.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from PIL import Image, ImageDraw

IMAGE_SIZE = 336
CELL = IMAGE_SIZE // 3
PATCH = 14
BACKGROUND = (214, 214, 214)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "green": (36, 158, 62),
    "blue": (38, 84, 214),
    "yellow": (236, 196, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SIZES: dict[str, int] = {"small": 3 * PATCH, "large": 5 * PATCH}  # bounding-box side in px
ROWS = ("top", "center", "bottom")
COLS = ("left", "center", "right")
KINDS: tuple[str, ...] = ("colour", "shape", "count", "exists", "choice")
SPLITS: tuple[str, ...] = ("train", "val", "test")
LETTERS = ("A", "B", "C")
MIN_OBJECTS, MAX_OBJECTS = 3, 5


def region_name(cell: int) -> str:
    """Name of cell ``0..8`` (row-major): ``top left``, ``top center``, ..., ``center``, ... ``bottom right``."""
    row, col = divmod(cell, 3)
    if row == 1 and col == 1:
        return "center"
    return f"{ROWS[row]} {COLS[col]}"


REGIONS: tuple[str, ...] = tuple(region_name(c) for c in range(9))


@dataclass(frozen=True)
class Obj:
    """One drawn object; ``box`` is ``(x0, y0, x1, y1)`` in pixels."""

    colour: str
    shape: str
    size: str
    cell: int
    box: tuple[int, int, int, int]

    @property
    def region(self) -> str:
        return region_name(self.cell)

    def patches(self) -> list[int]:
        """Indices (row-major, 24 x 24 grid) of the patches the bounding box touches."""
        side = IMAGE_SIZE // PATCH
        x0, y0, x1, y1 = self.box
        return [r * side + c for r in range(y0 // PATCH, (y1 - 1) // PATCH + 1)
                for c in range(x0 // PATCH, (x1 - 1) // PATCH + 1)]


def _rng(split: str, seed: int, index: int, task: str | None = None) -> random.Random:
    """The generator of one record; ``task`` names a variant task (its own streams)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    stream = f"{split}/{seed}/{index}" if task is None else f"{task}/{split}/{seed}/{index}"
    return random.Random(f"fvlm-synthetic/{stream}")  # str seeds hash deterministically


def make_scene(rng: random.Random, min_objects: int = MIN_OBJECTS, max_objects: int = MAX_OBJECTS) -> list[Obj]:
    """3-5 objects (``min_objects``-``max_objects``) in distinct cells, each with a random colour,
    shape, size and position.

    Objects are aligned to the 14 px patch grid (a small object spans 3 x 3 patches, a large one
    5 x 5) at a random patch offset inside its cell, at least one patch away from the next cell.
    """
    count = rng.randint(min_objects, max_objects)
    cell_patches = CELL // PATCH  # 8
    objects = []
    for cell in sorted(rng.sample(range(9), count)):
        size = rng.choice(tuple(SIZES))
        side = SIZES[size] // PATCH
        row, col = divmod(cell, 3)
        x0 = (col * cell_patches + rng.randrange(0, cell_patches - side)) * PATCH
        y0 = (row * cell_patches + rng.randrange(0, cell_patches - side)) * PATCH
        span = side * PATCH
        objects.append(Obj(rng.choice(tuple(COLOURS)), rng.choice(SHAPES), size, cell, (x0, y0, x0 + span, y0 + span)))
    return objects


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, fill) -> None:
    x0, y0, x1, y1 = obj.box
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)


def render(objects: list[Obj]) -> Image.Image:
    """Draw the scene on a plain grey 336 x 336 RGB canvas."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj, COLOURS[obj.colour])
    return image


def coverage(objects: list[Obj]):
    """``[576, len(objects)]`` array: the fraction of every patch (row-major, 24 x 24 grid) each object covers."""
    import numpy as np

    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for i, obj in enumerate(objects):
        _draw(draw, obj, i + 1)
    side = IMAGE_SIZE // PATCH
    m = np.asarray(mask).reshape(side, PATCH, side, PATCH).transpose(0, 2, 1, 3).reshape(side * side, -1)
    return np.stack([(m == i + 1).mean(axis=1) for i in range(len(objects))], axis=1)


def patch_owner(objects: list[Obj], min_cover: float = 0.25) -> list[int]:
    """Per patch of the 24 x 24 grid (row-major): index of the object covering at least
    ``min_cover`` of it (the most-covering one), or -1 for background."""
    import numpy as np

    cover = coverage(objects)
    best = cover.argmax(axis=1)
    return np.where(cover.max(axis=1) >= min_cover, best, -1).tolist()


def _question(objects: list[Obj], kind: str, rng: random.Random, positive: bool | None = None) -> dict:
    """One question about ``objects``: ``{question, answer, choices, kind, target}``.

    ``target`` lists the objects the answer depends on (used by the visualisation and the tests).
    ``positive`` forces the answer of an ``exists`` question (``None``: random).
    """
    choices = None
    if kind == "colour":
        obj = rng.choice(objects)
        question, answer, target = f"what colour is the shape in the {obj.region} ?", obj.colour, [obj]
    elif kind == "shape":
        obj = rng.choice(objects)
        question, answer, target = f"what shape is in the {obj.region} ?", obj.shape, [obj]
    elif kind == "count":
        if rng.random() < 0.5:
            shape = rng.choice(SHAPES)
            target = [o for o in objects if o.shape == shape]
            question = f"how many {PLURAL[shape]} are there ?"
        else:
            colour = rng.choice(tuple(COLOURS))
            target = [o for o in objects if o.colour == colour]
            question = f"how many {colour} shapes are there ?"
        answer = str(len(target))
    elif kind == "exists":
        present = {(o.colour, o.shape) for o in objects}
        positive = rng.random() < 0.5 if positive is None else positive
        if positive:
            colour, shape = rng.choice(sorted(present))
            target = [o for o in objects if (o.colour, o.shape) == (colour, shape)]
        else:
            colours, shapes = {o.colour for o in objects}, {o.shape for o in objects}
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            adversarial = [(c, s) for c, s in absent if c in colours and s in shapes]
            pool = adversarial if adversarial and rng.random() < 0.5 else absent
            colour, shape = rng.choice(pool)
            target = []
        question, answer = f"is there a {colour} {shape} ?", "yes" if positive else "no"
    elif kind == "choice":
        pairs: dict[tuple[str, str], list[Obj]] = {}
        for o in objects:
            pairs.setdefault((o.colour, o.shape), []).append(o)
        unique = [group[0] for group in pairs.values() if len(group) == 1] or objects
        obj = rng.choice(unique)
        others = rng.sample([c for c in range(9) if c != obj.cell], len(LETTERS) - 1)
        cells = [obj.cell, *others]
        rng.shuffle(cells)
        choices = [region_name(c) for c in cells]
        options = " , ".join(f"{letter} {name}" for letter, name in zip(LETTERS, choices))
        question = f"where is the {obj.colour} {obj.shape} ? options : {options}"
        answer, target = LETTERS[cells.index(obj.cell)], [obj]
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {"question": question, "answer": answer, "choices": choices, "kind": kind, "target": target}


def sample(split: str, index: int, seed: int = 0) -> dict:
    """Record ``index`` of ``split``: ``{id, image, question, answer, choices, kind, objects, target}``.

    The kind cycles through [`KINDS`][fvlm.builtin.synthetic.KINDS] with ``index``; every second ``exists`` record is a ``yes``.
    """
    rng = _rng(split, seed, index)
    objects = make_scene(rng)
    kind = KINDS[index % len(KINDS)]
    positive = (index // len(KINDS)) % 2 == 0 if kind == "exists" else None
    record = _question(objects, kind, rng, positive)
    return {"id": f"{split}-{seed}-{index}", "image": render(objects), "objects": objects, **record}


def dataset(split: str, n: int, seed: int = 0, start: int = 0) -> list[dict]:
    """Records ``start .. start + n - 1`` of ``split`` (see [`sample`][fvlm.builtin.synthetic.sample])."""
    return [sample(split, i, seed) for i in range(start, start + n)]


def iter_dataset(split: str, n: int, seed: int = 0, start: int = 0) -> Iterator[dict]:
    """Lazy version of [`dataset`][fvlm.builtin.synthetic.dataset]."""
    for i in range(start, start + n):
        yield sample(split, i, seed)


LISTINGS = {"colour": "list the colours .", "shape": "list the shapes .", "count colours": "count the colours .",
            "count shapes": "count the shapes .", "pairs": "list the pairs ."}


def listing(objects: list[Obj], attribute: str, cells: list[int] | None = None) -> str:
    """Dense grounded text about a scene (training data; ``attribute`` is a key of [`LISTINGS`][fvlm.builtin.synthetic.LISTINGS]).

    ``colour`` / ``shape``: the attribute of all nine cells in reading order (``top left red , top
    center empty , ... .``; ``cells``: in that order instead); ``count colours`` / ``count shapes``:
    ``red 2 , green 0 , ...``; ``pairs``: ``red circle yes , red square no , ...`` for every
    colour-shape pair.
    """
    if attribute in ("colour", "shape"):
        by_cell = {o.cell: o for o in objects}
        parts = [f"{region_name(c)} {getattr(by_cell[c], attribute) if c in by_cell else 'empty'}"
                 for c in (range(9) if cells is None else cells)]
    elif attribute == "count colours":
        parts = [f"{c} {sum(o.colour == c for o in objects)}" for c in COLOURS]
    elif attribute == "count shapes":
        parts = [f"{s} {sum(o.shape == s for o in objects)}" for s in SHAPES]
    elif attribute == "pairs":
        present = {(o.colour, o.shape) for o in objects}
        parts = [f"{c} {s} {'yes' if (c, s) in present else 'no'}" for c in COLOURS for s in SHAPES]
    else:
        raise ValueError(f"attribute must be one of {tuple(LISTINGS)}, got {attribute!r}")
    return " , ".join(parts) + " ."


def training_scene(index: int, seed: int = 0, questions: int = 6, split: str = "train",
                   description: bool = True, extra_kinds: tuple[str, ...] = KINDS) -> dict:
    """One image with several questions for multi-turn training: ``{image, objects, qa: [(q, a), ...]}``.

    The first ``len(KINDS)`` questions cover every kind once (in a random order), the rest are drawn
    from ``extra_kinds``; ``exists`` questions are yes or no with equal probability. With ``description`` the last
    turns ask for [`listing`][fvlm.builtin.synthetic.listing] of every attribute in [`LISTINGS`][fvlm.builtin.synthetic.LISTINGS] (dense grounded data in the
    role of LLaVA's caption-style alignment data; last, so that no question can be answered from them).
    """
    rng = _rng(split, seed, index)
    objects = make_scene(rng)
    kinds = list(KINDS)
    rng.shuffle(kinds)
    kinds += [rng.choice(extra_kinds) for _ in range(max(0, questions - len(kinds)))]
    qa = []
    for kind in kinds[:questions]:
        record = _question(objects, kind, rng)
        qa.append((record["question"], record["answer"]))
    if description:
        qa += [(question, listing(objects, attribute)) for attribute, question in LISTINGS.items()]
    return {"image": render(objects), "objects": objects, "qa": qa}


def vocabulary() -> list[str]:
    """Every word the questions and answers use (the tokenizer's vocabulary, specials excluded)."""
    words = {"USER", "ASSISTANT", ":", "?", ",", "what", "colour", "is", "the", "shape", "in", "how", "many",
             "are", "there", "shapes", "a", "where", "options", "yes", "no", "list", "colours", ".", "empty", "count", "pairs"}
    words |= set(SIZES)
    words |= set(COLOURS) | set(SHAPES) | set(PLURAL.values()) | set(REGIONS) | set(LETTERS)
    words |= {str(i) for i in range(MAX_OBJECTS + 1)}
    return sorted(words)
