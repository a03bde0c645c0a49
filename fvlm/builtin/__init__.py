"""The built-in VLM: a small LLaVA-1.5-style model trained on a synthetic grounded VQA task.

``fvlm.builtin.load()`` returns ``(model, processor)`` from the checkpoint shipped inside the package
(``fvlm/builtin/checkpoint``), offline, with ``from_pretrained``. The model really answers questions
about its images ([`fvlm.builtin.synthetic`][fvlm.builtin.synthetic]), so pruning visibly costs accuracy when the wrong
patches go. `fvlm.builtin.train` reproduces the checkpoint; ``benchmarks/accuracy.py`` and
``fvlm visualize`` use it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
#: Shipped checkpoints by name (``builtin.load("grounded")``); the first is the default.
CHECKPOINTS = {"grounded": CHECKPOINT}
#: Question generator of each task (the ``task`` a checkpoint's ``training.json`` names).
TASKS = {"grounded": "fvlm.builtin.synthetic", "relational": "fvlm.builtin.relational"}


def folder_of(path: str | Path | None = None) -> Path:
    """The checkpoint folder of a shipped checkpoint's name, or ``path`` itself (``None``: the default)."""
    if path is None:
        return CHECKPOINT
    return CHECKPOINTS.get(str(path), Path(path))


def task_of(path: str | Path | None = None):
    """The question generator module a checkpoint was trained on (from its ``training.json``)."""
    import importlib
    import json

    record = folder_of(path) / "training.json"
    settings = json.loads(record.read_text()).get("settings", {}) if record.is_file() else {}
    return importlib.import_module(TASKS[settings.get("task", "grounded")])


def load(path: str | Path | None = None, dtype=None, attn_implementation: str = "sdpa", device: str | None = None):
    """Load the built-in model and its processor: ``(LlavaForConditionalGeneration, LlavaProcessor)``.

    ``path`` is the name of a shipped checkpoint (`CHECKPOINTS`) or a folder; it defaults to the
    grounded checkpoint. ``dtype`` defaults to float32. The model is in eval mode with greedy
    generation defaults; the processor pads on the left.
    """
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from fvlm.errors import FVLMError

    folder = folder_of(path)
    if not (folder / "config.json").is_file():
        raise FVLMError(f"no built-in checkpoint at {folder} (train one with `python -m fvlm.builtin.train --out {folder}`)")
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype or torch.float32, attn_implementation=attn_implementation, local_files_only=True,
    )
    if device is not None:
        model.to(device)
    model.eval()
    processor = LlavaProcessor.from_pretrained(folder, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return model, processor


def prompt_inputs(processor, images: Sequence, questions: Sequence[str], dtype=None, device=None) -> dict:
    """Processor outputs for single-turn prompts, one image each (left padding), pixel values cast to ``dtype``."""
    from fvlm.answering import Prompt, build_inputs

    inputs = build_inputs(processor, [Prompt([image], q) for image, q in zip(images, questions)])
    if dtype is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return {k: v.to(device) for k, v in inputs.items()} if device is not None else inputs


def answer(model, processor, images: Sequence, questions: Sequence[str], batch_size: int = 16,
           max_new_tokens: int = 3, selector=None) -> list[str]:
    """Greedy answers, one per (image, question), in input order, pruned by ``selector`` when given
    (batches of prompts sorted by length:
    [`Answerer.answer_all`][fvlm.answering.Answerer.answer_all])."""
    return [r["answer"] for r in answer_records(model, processor, images, questions, batch_size, max_new_tokens,
                                                selector)]


def answer_records(model, processor, images: Sequence, questions: Sequence[str], batch_size: int = 16,
                   max_new_tokens: int = 3, selector=None, positions: str | None = None) -> list[dict]:
    """As [`answer`][fvlm.builtin.answer], with each answer's efficiency record (``{"answer",
    "efficiency"}`` per question). Each question is also its prompt's instruction (instruction-conditioned selectors); ``positions``:
    the session's position policy (``None``: the selector's own)."""
    import torch

    from fvlm.answering import Answerer, Prompt

    answerer = Answerer(model, processor, selector, generation={"max_new_tokens": max_new_tokens}, positions=positions)
    with torch.no_grad():
        return answerer.answer_all([Prompt([im], q) for im, q in zip(images, questions)], batch_size)
