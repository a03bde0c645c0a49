"""The relational variant of the synthetic task: questions that need a second look at the image.

Same images as `fvlm.builtin.synthetic` (coloured shapes in a 3 x 3 layout, 336 px, 24 x 24
patches) with 5 to 7 objects, and questions built from referring expressions whose later parts
depend on what the earlier parts found in the image:

* ``the red circle`` - the object with that colour and shape (unique in the scene);
* ``the shape in the top left`` - the object in that cell;
* ``the shape left of X`` (``right of``, ``above``, ``below``) - the object in the neighbouring cell;
* ``the twin of X`` - the *other* object with the colour of ``X`` (exactly one in the scene).

Question kinds (`KINDS`), one per record, cycling in that order:

* ``region`` - "what colour is the shape in the top left ?" (one look: the control kind);
* ``rel`` - "what shape is the shape left of the red circle ?" (find the anchor, then its neighbour);
* ``twin`` - "what shape is the twin of the shape in the top left ?" (read a colour, then search
  the image for it);
* ``rel_twin`` - "what shape is the twin of the shape above the blue square ?" (three looks);
* ``twin_rel`` - "what colour is the shape below the twin of the shape in the center ?" (three looks).

The answer is a colour or a shape (the twin's colour is never asked: it is in the question). A
record's ``target`` lists every object the expression passes through (anchor first, answer last):
what an oracle selector keeps. Everything is a pure function of ``(split, seed, index)``.
"""
from __future__ import annotations

import random

from fvlm.builtin import synthetic
from fvlm.builtin.synthetic import COLOURS, SHAPES, Obj

KINDS: tuple[str, ...] = ("region", "rel", "twin", "rel_twin", "twin_rel")
#: Neighbouring cell of each relation as a (row, column) step in the 3 x 3 layout.
RELATIONS: dict[str, tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
MIN_OBJECTS, MAX_OBJECTS = 5, 7


def neighbour(objects: list[Obj], obj: Obj, relation: str) -> Obj | None:
    """The object in the cell next to ``obj`` in the direction of ``relation`` (``None``: empty or off the layout)."""
    dr, dc = RELATIONS[relation]
    row, col = divmod(obj.cell, 3)
    r, c = row + dr, col + dc
    if not (0 <= r < 3 and 0 <= c < 3):
        return None
    return next((o for o in objects if o.cell == r * 3 + c), None)


def twin(objects: list[Obj], obj: Obj) -> Obj | None:
    """The other object with the colour of ``obj`` when there is exactly one, else ``None``."""
    others = [o for o in objects if o is not obj and o.colour == obj.colour]
    return others[0] if len(others) == 1 else None


def _anchors(objects: list[Obj]) -> list[Obj]:
    """Objects whose colour-shape pair is unique in the scene (nameable as ``the red circle``)."""
    return [o for o in objects if sum((p.colour, p.shape) == (o.colour, o.shape) for p in objects) == 1]


def _candidates(objects: list[Obj], kind: str) -> list[tuple[str, list[Obj]]]:
    """Every ``(referring expression, chain of objects)`` of ``kind`` the scene supports."""
    out = []
    if kind == "region":
        return [(f"the shape in the {o.region}", [o]) for o in objects]
    if kind in ("rel", "rel_twin"):
        for a in _anchors(objects):
            for rel in RELATIONS:
                n = neighbour(objects, a, rel)
                if n is None:
                    continue
                expr, chain = f"the shape {rel} the {a.colour} {a.shape}", [a, n]
                if kind == "rel":
                    out.append((expr, chain))
                elif (t := twin(objects, n)) is not None and t is not a:  # the anchor: answer in the question
                    out.append((f"the twin of {expr}", [*chain, t]))
    elif kind in ("twin", "twin_rel"):
        for o in objects:
            t = twin(objects, o)
            if t is None:
                continue
            expr, chain = f"the twin of the shape in the {o.region}", [o, t]
            if kind == "twin":
                out.append((expr, chain))
                continue
            for rel in RELATIONS:
                n = neighbour(objects, t, rel)
                if n is not None:
                    out.append((f"the shape {rel} {expr}", [*chain, n]))
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return out


def relation_listing(objects: list[Obj], anchor: Obj, rng: random.Random) -> str:
    """The four neighbours of ``anchor`` in a random order: ``below green circle , left of empty , ... .``
    (``empty``: no object there, or off the layout)."""
    parts = []
    for rel in rng.sample(list(RELATIONS), len(RELATIONS)):
        n = neighbour(objects, anchor, rel)
        parts.append(f"{rel} {n.colour} {n.shape}" if n is not None else f"{rel} empty")
    return " , ".join(parts) + " ."


def place_listing(objects: list[Obj], rng: random.Random) -> str:
    """Every object's colour, shape and cell, objects in a random order: ``red circle top left , ... .``"""
    return " , ".join(f"{o.colour} {o.shape} {o.region}" for o in rng.sample(objects, len(objects))) + " ."


def twin_listing(objects: list[Obj], rng: random.Random) -> str:
    """Every object's cell with its twin's cell, objects in a random order: ``center bottom left ,
    top right none , ... .`` (``none``: no twin, or more than one other object of its colour)."""
    parts = []
    for o in rng.sample(objects, len(objects)):
        t = twin(objects, o)
        parts.append(f"{o.region} {t.region if t is not None else 'none'}")
    return " , ".join(parts) + " ."


def _question(objects: list[Obj], kind: str, rng: random.Random) -> dict | None:
    candidates = _candidates(objects, kind)
    if not candidates:
        return None
    expr, chain = rng.choice(candidates)
    answer_obj = chain[-1]
    asked = "shape" if kind in ("twin", "rel_twin") else rng.choice(("colour", "shape"))
    return {"question": f"what {asked} is {expr} ?", "answer": getattr(answer_obj, asked), "choices": None,
            "kind": kind, "target": chain}


def make_scene(rng: random.Random) -> list[Obj]:
    """5-7 objects (see `fvlm.builtin.synthetic.make_scene`)."""
    return synthetic.make_scene(rng, MIN_OBJECTS, MAX_OBJECTS)


def _scene_and_question(rng: random.Random, kind: str) -> tuple[list[Obj], dict]:
    while True:  # redraw the scene until it supports a question of this kind (deterministic: same rng)
        objects = make_scene(rng)
        record = _question(objects, kind, rng)
        if record is not None:
            return objects, record


def sample(split: str, index: int, seed: int = 0) -> dict:
    """Record ``index`` of ``split``: ``{id, image, question, answer, choices, kind, objects, target}``."""
    rng = synthetic._rng(split, seed, index, task="relational")
    kind = KINDS[index % len(KINDS)]
    objects, record = _scene_and_question(rng, kind)
    return {"id": f"{split}-{seed}-{index}", "image": synthetic.render(objects), "objects": objects, **record}


def dataset(split: str, n: int, seed: int = 0, start: int = 0) -> list[dict]:
    """Records ``start .. start + n - 1`` of ``split`` (see `sample`)."""
    return [sample(split, i, seed) for i in range(start, start + n)]


def training_scene(index: int, seed: int = 0, questions: int = 10, split: str = "train",
                   description: bool = True, extra_kinds: tuple[str, ...] = KINDS) -> dict:
    """One image with several questions for multi-turn training (see `fvlm.builtin.synthetic.training_scene`).

    The questions cycle through the kinds the scene supports (from a random start); with
    ``description`` the `listing` turns follow them, the cells of the
    colour and shape listings in a random order (so that every item is a region question), then where
    every object is (`place_listing`), the neighbours of a nameable object
    (`relation_listing`) and every object's twin (`twin_listing`): dense supervision of
    the first look and of the two kinds of second look.
    """
    rng = synthetic._rng(split, seed, index, task="relational")
    objects = make_scene(rng)
    kinds = [k for k in extra_kinds if _candidates(objects, k)]
    start = rng.randrange(len(kinds)) if kinds else 0
    qa: list[tuple[str, str]] = []
    for i in range(questions if kinds else 0):
        kind = kinds[(start + i) % len(kinds)]
        for _ in range(4):  # prefer a question not asked yet
            record = _question(objects, kind, rng)
            if (record["question"], record["answer"]) not in qa:
                break
        qa.append((record["question"], record["answer"]))
    if description:  # cells listed in a random order: each item needs its region read, not its place
        for attribute, question in synthetic.LISTINGS.items():
            qa.append((question, synthetic.listing(objects, attribute, cells=rng.sample(range(9), 9))))
        qa.append(("list the places .", place_listing(objects, rng)))
        anchors = _anchors(objects)
        if anchors:
            a = rng.choice(anchors)
            qa.append((f"list the neighbours of the {a.colour} {a.shape} .", relation_listing(objects, a, rng)))
        qa.append(("list the twins .", twin_listing(objects, rng)))
    return {"image": synthetic.render(objects), "objects": objects, "qa": qa}


def vocabulary() -> list[str]:
    """The words of the relational questions plus every word of `fvlm.builtin.synthetic.vocabulary`."""
    words = set(synthetic.vocabulary()) | {"twin", "twins", "of", "left", "right", "above", "below", "neighbours", "none", "places"}
    return sorted(words)
