"""``FVLMModule``: a thin Lightning shell over [`Answerer`][fvlm.answering.Answerer].

The backbone is described by a [`BackboneSpec`][fvlm.backbones.BackboneSpec] (a local folder, a hub
id, the trained ``"builtin"`` model or a random ``"tiny:<family>"`` model) and loaded lazily in
``configure_model`` together with its processor. ``predict_step`` and ``test_step`` answer a
collated batch through the answerer (the one generation path fvlm has) and return one record per
sample (the generated answer, its score where references exist, fidelity to the unpruned model
when asked, and per-sample efficiency); callbacks write and aggregate them. Without a selector the
module is the unpruned reference.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from lightning.pytorch import LightningModule

from fvlm.answering import Answerer, GenerationSpec, sample_efficiency  # noqa: F401  (re-exported)
from fvlm.backbones import DTYPES, BackboneSpec  # noqa: F401  (re-exported)
from fvlm.lightning.data import instruction_text
from fvlm.metrics.scoring import score_sample
from fvlm.selectors.base import Need, TokenSelector
from fvlm.selectors.spec import SelectorSpec, resolve_selector_class, selector_arguments, selector_label  # noqa: F401


class FVLMModule(LightningModule):
    """Answers VQA batches with a (pruned) VLM.

    Args:
        backbone: the VLM and its processor (loaded in ``configure_model``).
        selector: ``{name: ..., args: {...}}`` ([`SelectorSpec`][fvlm.selectors.spec.SelectorSpec],
            the one recipe syntax), or ``None`` for the unpruned reference; from Python also a built
            ``TokenSelector`` instance.
        generation: ``generate`` settings.
        positions: position ids of kept tokens, for any selector; ``None``: the selector's own.
            That is its authors' policy, what the paper recipes reproduce.
        fidelity: also run (and time) the unpruned model on every batch: its answer, the KL and
            top-1 agreement of the first generated token, the speedup. It judges a method without
            reference answers and doubles the generation cost.
        on_error: ``raise`` (default) stops the run when generation fails; ``record`` writes the
            error and goes on. A resumed run retries a batch that raised; ``record`` retries a
            failing batch one sample at a time (the data module collates each sample alone, see
            [`single_batch`][fvlm.lightning.data.VQADataModule.single_batch]) and records the
            error on the samples that fail alone; samples answered alone carry the batch's error
            as ``batch_error``. Unreadable images are always recorded, never raised.
    """

    def __init__(self, backbone: BackboneSpec, selector: Optional[SelectorSpec] = None,
                 generation: GenerationSpec = GenerationSpec(),
                 positions: Optional[Literal["original", "compact"]] = None,
                 fidelity: bool = False, on_error: Literal["raise", "record"] = "raise"):
        super().__init__()
        if isinstance(backbone, dict):
            backbone = BackboneSpec(**backbone)
        if isinstance(selector, dict):
            selector = SelectorSpec(**selector)
        if on_error not in ("raise", "record"):
            raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
        self.backbone = backbone
        self.selector: TokenSelector | None = selector.build() if isinstance(selector, SelectorSpec) else selector
        self.selector_name = selector.name if isinstance(selector, SelectorSpec) else selector_label(self.selector)
        self.generation = GenerationSpec(**generation) if isinstance(generation, dict) else generation
        self.positions = positions
        self.fidelity_requested = fidelity
        self.fidelity = fidelity and self.selector is not None
        self.on_error = on_error
        self.model = None
        self.processor = None
        self._answerer: Answerer | None = None

    def use_selector(self, selector: TokenSelector | None, name: str | None = None) -> None:
        """Prune with an already built ``selector`` (``fvlm run`` builds a recipe's selector once)."""
        self.selector = selector
        self.selector_name = name or selector_label(selector)
        self.fidelity = self.fidelity_requested and selector is not None
        self._answerer = None

    @property
    def needs_gradients(self) -> bool:
        return self.selector is not None and Need.GRADIENT in getattr(self.selector, "needs", frozenset())

    def describe(self) -> dict[str, Any]:
        """What a run summary records about the method: selector, its full arguments, position policy."""
        session = self._answerer.last_session if self._answerer is not None else None
        positions = session.positions if session is not None else self.positions or getattr(self.selector, "positions", None)
        return {"selector": self.selector_name, "selector_args": selector_arguments(self.selector),
                "positions": positions if self.selector is not None else None}

    # -- loading ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is None:
            self.model, self.processor = self.backbone.load()
            self.answerer.prepare()  # a missing auxiliary model fails now, not at the first batch

    @property
    def answerer(self) -> Answerer:
        if self._answerer is None or self._answerer.model is not self.model:
            self._answerer = Answerer(self.model, self.processor, self.selector, self.generation,
                                      positions=self.positions, fidelity=self.fidelity)
        return self._answerer

    # -- steps -----------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return self.answer(batch)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        records = self.answer(batch)
        scores = [float(r["score"]) for r in records if r.get("score") is not None]
        # Sums, logged on every step by every rank (a skipped log would stall the DDP reduction);
        # accuracy = test/correct / test/scored. summary.json has the exact per-metric scores.
        self.log("test/correct", sum(scores), reduce_fx="sum", sync_dist=True, batch_size=1)
        self.log("test/scored", float(len(scores)), reduce_fx="sum", sync_dist=True, batch_size=1)
        return records

    def answer(self, batch: dict) -> list[dict]:
        """Records for every sample of a collated batch (failed samples carry ``error``)."""
        records = [self._record(s, error=s["error"]) for s in batch.get("failed", [])]
        samples = batch.get("samples", [])
        if batch.get("inputs") is None or not samples:
            return records
        try:
            try:
                results = self.answerer.generate(batch["inputs"], [instruction_text(s) for s in samples])
                return records + [self._record(s, **r) for s, r in zip(samples, results)]
            except StopIteration as exc:  # would end Lightning's loop as if the data ran out
                raise RuntimeError(f"generation raised StopIteration {exc!r}") from exc
        except Exception as exc:
            if self.on_error == "raise":
                raise
            error = f"{type(exc).__name__}: {exc}"
            single = getattr(getattr(self._trainer, "datamodule", None), "single_batch", None)
            if len(samples) == 1 or single is None:
                return records + [self._record(s, error=error) for s in samples]
            alone = [r for s in samples for r in self.answer(single(s))]
            return records + [r if "error" in r else {**r, "batch_error": error} for r in alone]

    def _record(self, sample: dict, **fields) -> dict:
        rec = {"id": sample["id"], "question": sample["question"], "images": sample.get("image_paths", []),
               "answers": sample.get("answers", []), "selector": self.selector_name}
        if sample.get("choices"):
            rec["choices"] = sample["choices"]
        if sample.get("extra"):
            rec["extra"] = sample["extra"]
        rec.update(fields)
        if "answer" in rec and rec.get("answers"):
            rec["metric"], rec["score"] = score_sample(rec["answer"], rec["answers"], rec.get("choices"),
                                                       sample.get("metric") or "auto")
        return rec
