"""The synthetic task as an fvlm data set on disk (JSONL + PNG), for recipes and ``fvlm run``.

``data.path: builtin:test`` in a recipe (also ``builtin:val`` / ``builtin:train``, optionally with a
seed: ``builtin:test:3``) makes `VQADataModule` call
[`materialize`][fvlm.builtin.data.materialize], which writes the split's records once into a cache folder and returns the
JSONL file; from there the run reads images from disk exactly like any other local data set.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from fvlm.builtin import synthetic

PREFIX = "builtin:"
#: Version of the files [`materialize`][fvlm.builtin.data.materialize] writes (part of the cache folder name: a change in
#: the record format or the generator never reuses stale files).
FORMAT = 2
#: Scoring of each question kind (``yes_no`` adds POPE's precision / recall / F1 to the summary).
METRIC = {"colour": "exact_match", "shape": "exact_match", "count": "exact_match", "exists": "yes_no",
          "choice": "exact_match"}


def parse(path: str) -> tuple[str, int] | None:
    """``(split, seed)`` of a ``"builtin:<split>[:<seed>]"`` data path, ``None`` for any other path."""
    if not str(path).startswith(PREFIX):
        return None
    split, _, seed = str(path)[len(PREFIX):].partition(":")
    if split not in synthetic.SPLITS or (seed and not seed.isdigit()):
        raise ValueError(f"unknown built-in data set {path!r}; expected builtin:<split>[:<seed>] with split in "
                         f"{synthetic.SPLITS} and an integer seed")
    return split, int(seed or 0)


def cache_root() -> Path:
    """Where materialised splits go: ``$FVLM_CACHE`` or ``~/.cache/fvlm``."""
    return Path(os.environ.get("FVLM_CACHE") or Path.home() / ".cache" / "fvlm")


def materialize(split: str, n: int, seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """Write records ``0 .. n-1`` of ``split`` (PNG images + ``data.jsonl``) and return the JSONL path.

    Idempotent: an existing complete folder is reused (the JSONL is written last, atomically).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    folder = Path(root) if root is not None else cache_root() / "builtin" / f"v{FORMAT}" / f"{split}-{seed}-{n}"
    target = folder / "data.jsonl"
    if target.is_file():
        return target
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for record in synthetic.iter_dataset(split, n, seed=seed):
        image = f"images/{record['id']}.png"
        record["image"].save(folder / image)
        lines.append(json.dumps({
            "id": record["id"], "image": image, "question": record["question"], "answer": record["answer"],
            "metric": METRIC[record["kind"]], "category": record["kind"],
        }))
    partial = folder / f".data.jsonl.{os.getpid()}"
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    partial.replace(target)
    return target
