"""Local VQA-style data sets: records from JSONL / JSON, inputs built by the backbone's processor.

Record format (one JSON object per line of a ``.jsonl`` file, or a JSON list / ``{"data": [...]}``)::

    {"id": "q17", "image": "images/17.jpg", "question": "Is there a dog?", "answers": ["yes"]}
    {"id": "q18", "images": ["a.png", "b.png"], "question": "Which is larger?",
     "choices": ["the left one", "the right one"], "answer": "B", "category": "spatial"}

* ``id`` (required, unique; ints become strings), ``question`` (required).
* ``image`` (a path or list of paths) or ``images`` (list); relative paths are resolved against
  ``image_root`` (default: the data file's folder). No image: a text-only sample.
* ``answers`` (list) or ``answer`` (one value): references, optional (fidelity-only data sets).
* ``choices`` (optional list): a multiple-choice question; the reference is an option letter, a
  0-based index or the option text.
* ``metric`` (optional): overrides the data module's metric for this sample.
* Any other key is passed through to the prediction line under ``extra``; ``category`` there also
  gets its own accuracy in the run's summary.

A sample whose images are missing or unreadable is not dropped: it reaches the model's step as a
*failed* sample and is written to the predictions with its ``error``; the run goes on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

from jsonargparse.typing import Path_fr, path_type

Path_dr = path_type("dr")  # a readable folder; relative paths in a recipe resolve next to it
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from fvlm.metrics.scoring import METRICS, choice_letter

MetricName = Literal["auto", "vqa", "exact_match", "yes_no", "multiple_choice"]
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
_KNOWN = {"id", "image", "images", "question", "answers", "answer", "choices", "metric"}


def load_records(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[dict]:
    """Validated records of a JSONL / JSON VQA file (image paths made absolute)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        raw = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from None
    else:
        raw = json.loads(text)
        if isinstance(raw, dict):
            raw = raw.get("data", raw.get("questions"))
        if not isinstance(raw, list):
            raise ValueError(f"{path}: a JSON data file must hold a list of records (or {{'data': [...]}})")
    root = Path(image_root) if image_root is not None else path.parent
    records, seen = [], set()
    for n, rec in enumerate(raw, 1):
        where = f"{path} record {n}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
        if rec.get("id") is None or not isinstance(rec.get("question"), str):
            raise ValueError(f"{where}: every record needs an 'id' and a string 'question'")
        rid = str(rec["id"])
        if rid in seen:
            raise ValueError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        images = rec.get("images", rec.get("image")) or []
        images = [images] if isinstance(images, str) else list(images)
        answers = rec.get("answers", rec.get("answer"))
        answers = [] if answers is None else answers if isinstance(answers, list) else [answers]
        choices = rec.get("choices")
        if choices is not None and not (isinstance(choices, list) and choices):
            raise ValueError(f"{where}: 'choices' must be a non-empty list")
        metric = rec.get("metric")
        if metric is not None and metric not in ("auto", *METRICS):
            raise ValueError(f"{where}: unknown metric {metric!r}; expected 'auto' or one of {METRICS}")
        records.append({
            "id": rid,
            "question": rec["question"],
            "image_paths": [os.path.normpath(p if Path(p).is_absolute() else root / p) for p in images],
            "answers": answers,
            "choices": [str(c) for c in choices] if choices else None,
            "metric": metric,
            "extra": {k: v for k, v in rec.items() if k not in _KNOWN},
        })
    return records


def instruction_text(rec: dict) -> str:
    """The sample's instruction as instruction-conditioned selectors read it (CDPruner's CLIP text):
    the question and, for multiple choice, the ``A. ...`` option lines; no chat template and no
    answer-format prompt."""
    parts = [rec["question"]]
    if rec.get("choices"):
        parts += [f"{choice_letter(i)}. {c}" for i, c in enumerate(rec["choices"])]
    return "\n".join(parts)


def load_image(path: str):
    """An RGB PIL image, fully decoded (a truncated file fails here, not in the processor)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


class VQADataset(Dataset):
    """Records with their images loaded; a failure to load becomes the sample's ``error``."""

    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = dict(self.records[index])
        images = []
        for path in rec["image_paths"]:
            try:
                images.append(load_image(path))
            except Exception as exc:  # missing, corrupt or unsupported image: reported, never fatal
                rec["error"] = f"{type(exc).__name__}: cannot load image {path}: {exc}"
                return rec
        rec["images"] = images
        return rec


def _meta(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "images"}


class VQACollator:
    """Turns samples into padded model inputs ([`fvlm.answering.build_inputs`][fvlm.answering.build_inputs]: the processor
    and its chat template, left padding).

    Returns ``{"inputs": dict of tensors or None, "samples": [...], "failed": [...]}``: ``samples``
    describe the rows of ``inputs`` (in order), ``failed`` the samples that could not be prepared
    (with ``error``). A processor failure on the whole batch is retried sample by sample, so one
    bad sample does not take the others down.
    """

    def __init__(self, processor, short_answer_prompt: str = SHORT_ANSWER_PROMPT,
                 choice_prompt: str = CHOICE_PROMPT, system_prompt: str | None = None):
        if processor is None:
            raise ValueError("VQACollator needs the backbone's processor")
        self.processor = processor
        self.short_answer_prompt = short_answer_prompt
        self.choice_prompt = choice_prompt
        self.system_prompt = system_prompt

    def prompt_text(self, rec: dict) -> str:
        """The user turn: [`instruction_text`][fvlm.lightning.data.instruction_text] plus the answer-format prompt."""
        suffix = self.choice_prompt if rec.get("choices") else self.short_answer_prompt
        return "\n".join([instruction_text(rec), suffix]) if suffix else instruction_text(rec)

    def _encode(self, samples: list[dict]) -> dict:
        from fvlm.answering import Prompt, build_inputs

        return build_inputs(self.processor, [Prompt(s["images"], self.prompt_text(s)) for s in samples],
                            self.system_prompt)

    def __call__(self, batch: list[dict]) -> dict:
        failed = [_meta(s) for s in batch if s.get("error")]
        good = [s for s in batch if not s.get("error")]
        if good:
            try:
                inputs = self._encode(good)
            except Exception:
                keep = []
                for s in good:
                    try:
                        self._encode([s])
                        keep.append(s)
                    except Exception as exc:
                        failed.append(dict(_meta(s), error=f"{type(exc).__name__}: {exc}"))
                good = keep
                inputs = self._encode(good) if good else None
        else:
            inputs = None
        return {"inputs": inputs, "samples": [_meta(s) for s in good], "failed": failed}


class VQADataModule(LightningDataModule):
    """A local VQA file for ``Trainer.predict`` / ``Trainer.test`` (the same loader for both).

    ``path``: JSONL / JSON file (in a recipe, a relative path is looked up next to the recipe file
    first, then in the working directory), or ``builtin:<split>`` for the built-in synthetic task
    ([`fvlm.builtin.data`][fvlm.builtin.data]: ``limit`` records, default 500, written once to a cache folder);
    ``image_root``: base of relative image paths (default: the data file's folder); ``limit``: use
    the first N records; ``metric``: how samples are scored ("auto" picks per sample, see
    [`fvlm.metrics.scoring`][fvlm.metrics.scoring]); ``short_answer_prompt`` / ``choice_prompt``: appended to open and
    multiple-choice questions (LLaVA-1.5's evaluation prompts by default; "" to disable).

    The processor comes from the attached [`FVLMModule`][fvlm.lightning.module.FVLMModule] (loaded in its
    ``configure_model``), or is set with ``datamodule.processor = ...``. ``skip_ids`` (set by
    [`PredictionWriter`][fvlm.lightning.callbacks.PredictionWriter] when resuming) is left out of the loaders.
    """

    def __init__(self, path: Union[Path_fr, str], image_root: Optional[Union[Path_dr, str]] = None,
                 batch_size: int = 1, num_workers: int = 0,
                 limit: Optional[int] = None, metric: MetricName = "auto",
                 short_answer_prompt: str = SHORT_ANSWER_PROMPT, choice_prompt: str = CHOICE_PROMPT,
                 system_prompt: Optional[str] = None):
        super().__init__()
        for key, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                  ("limit", 1 if limit is None else limit, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"data.{key} must be an int >= {least}" + (" (or null: every record)" if key == "limit"
                                 else "") + f", got {value!r}")
        self.path = os.fspath(path)
        self.image_root = None if image_root is None else os.fspath(image_root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.limit = limit
        self.metric = metric
        self.short_answer_prompt = short_answer_prompt
        self.choice_prompt = choice_prompt
        self.system_prompt = system_prompt
        self.processor: Any = None
        self.skip_ids: set[str] = set()
        self.records: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.records is None:
            from fvlm.builtin.data import materialize, parse

            path, builtin = self.path, parse(self.path)
            if builtin is not None:  # builtin:<split>: the synthetic task, written to disk once
                path = materialize(builtin[0], n=self.limit or 500, seed=builtin[1])
            records = load_records(path, self.image_root)
            records = records[: self.limit] if self.limit is not None else records
            for rec in records:
                rec["metric"] = rec["metric"] or self.metric
            self.records = records

    @property
    def ids(self) -> list[str]:
        """All sample ids in data-set order (including skipped ones)."""
        self.setup()
        return [r["id"] for r in self.records]

    def _processor(self):
        if self.processor is not None:
            return self.processor
        module = self.trainer.lightning_module if self.trainer is not None else None
        processor = getattr(module, "processor", None)
        if processor is None:
            raise RuntimeError("VQADataModule has no processor: attach it to an FVLMModule through a Trainer "
                               "or set datamodule.processor")
        return processor

    def collator(self) -> VQACollator:
        return VQACollator(self._processor(), self.short_answer_prompt, self.choice_prompt, self.system_prompt)

    def single_batch(self, sample: dict) -> dict:
        """One sample (a collated batch's ``samples`` entry) collated alone, its images read again:
        what [`FVLMModule`][fvlm.lightning.module.FVLMModule] retries with when a batch fails under
        ``on_error: record``."""
        return self.collator()([VQADataset([sample])[0]])

    def dataset(self) -> VQADataset:
        self.setup()
        return VQADataset([r for r in self.records if r["id"] not in self.skip_ids])

    def _loader(self) -> DataLoader:
        return DataLoader(self.dataset(), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self.collator())

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()
