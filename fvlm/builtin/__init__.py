"""The built-in VLM: a small LLaVA-1.5-style model trained on a synthetic grounded VQA task.

``fvlm.builtin.load()`` returns ``(model, processor)`` from the checkpoint shipped inside the package
(``fvlm/builtin/checkpoint``), offline, with ``from_pretrained``. The model really answers questions
about its images ([`fvlm.builtin.synthetic`][fvlm.builtin.synthetic]), so pruning visibly costs accuracy when the wrong
patches go. `fvlm.builtin.train` reproduces the checkpoint; ``benchmarks/accuracy.py`` and
``fvlm visualize`` use it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

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
    """Processor outputs for single-turn prompts (left padding), pixel values cast to ``dtype``."""
    from fvlm.builtin.model import prompt

    inputs = processor(images=list(images), text=[prompt(q) for q in questions], return_tensors="pt", padding=True)
    if dtype is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs.to(device) if device is not None else inputs


def length_batches(processor, images: Sequence, questions: Sequence[str], batch_size: int, dtype=None,
                   device=None) -> Iterator[tuple[list[int], dict]]:
    """``(indices, processor outputs)`` per batch, prompts sorted by token length (ties by index) so
    that left padding is needed only where lengths differ within a batch."""
    lengths = [len(processor.tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions]
    order = sorted(range(len(questions)), key=lambda i: (lengths[i], i))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield chunk, prompt_inputs(processor, [images[i] for i in chunk], [questions[i] for i in chunk],
                                   dtype=dtype, device=device)


def answer(model, processor, images: Sequence, questions: Sequence[str], batch_size: int = 16,
           max_new_tokens: int = 3) -> list[str]:
    """Greedy answers, one per (image, question), in input order (batched by `length_batches`)."""
    import torch

    out: list[str | None] = [None] * len(questions)
    for chunk, inputs in length_batches(processor, images, questions, batch_size, model.dtype, model.device):
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            out[i] = text.strip()
    return out  # type: ignore[return-value]
