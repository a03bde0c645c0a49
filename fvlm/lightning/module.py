"""``FVLMModule``: a VLM backbone that answers batches with ``generate`` under a pruning session.

The backbone is described by a :class:`BackboneSpec` (a local folder, a hub id, the trained
``"builtin"`` model or a random ``"tiny:<family>"`` model) and loaded lazily in ``configure_model`` together with its processor.
``predict_step`` and ``test_step`` return one record per sample (the generated answer, its score
where references exist, fidelity to the unpruned model when asked, and per-sample efficiency from
the session's trace); callbacks write and aggregate them. Without a selector the module is the
unpruned reference.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from jsonargparse.typing import path_type
from lightning.pytorch import LightningModule

from fvlm.errors import FVLMError, UnknownSelectorError, UsageError
from fvlm.metrics.scoring import first_token_fidelity, score_sample
from fvlm.selectors.base import Need, TokenSelector

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


Path_any = path_type("")  # a path or a name, no checks: relative paths in a recipe remember its folder


def _locate(path) -> tuple[str, list[str]]:
    """``(folder or name, places looked in)``: a relative folder next to the recipe that named it
    first, then in the working directory; anything else is returned as given (a hub id, ``builtin``)."""
    import os

    relative = os.fspath(getattr(path, "relative", path))
    if os.path.isabs(relative):
        return relative, [relative]
    places = [os.path.abspath(relative)]
    if isinstance(path, Path_any):
        places.insert(0, os.fspath(path.absolute))
    places = list(dict.fromkeys(places))
    return next((p for p in places if os.path.isdir(p)), relative), places


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dataclass
class BackboneSpec:
    """Which VLM to load and how.

    ``path``: a local checkpoint folder, a hub id, ``"builtin"`` (the trained model shipped with
    fvlm, :mod:`fvlm.builtin`), or ``"tiny:llava"`` / ``"tiny:llava_next"`` / ``"tiny:qwen2_vl"`` /
    ``"tiny:qwen2_5_vl"`` (built-in random tiny model + processor, no download). In a recipe, a
    relative folder is looked up next to the recipe file first, then in the working directory (as
    ``data.path``); a name that is neither is a hub id. :meth:`check` reads the checkpoint's config
    before anything is loaded.
    ``dtype``: ``auto`` (the checkpoint's; float32 for tiny models), ``float32``,
    ``float16`` or ``bfloat16``. ``attn_implementation``: ``sdpa``, ``eager``,
    ``flash_attention_2``, ... (``None``: transformers' default). ``processor_path`` defaults to
    ``path``. ``model_kwargs`` / ``processor_kwargs`` go to ``from_pretrained``. ``seed`` and
    ``num_layers`` apply to tiny models only.
    """

    path: Union[Path_any, str]
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    attn_implementation: Optional[str] = "sdpa"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    processor_path: Optional[Union[Path_any, str]] = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    num_layers: Optional[int] = None

    def __post_init__(self):
        self.path, self._looked_in = _locate(self.path)
        if self.processor_path is not None:
            self.processor_path = _locate(self.processor_path)[0]

    def check(self):
        """Read the checkpoint's config and check that fvlm can prune it, before loading any weights.

        Raises :class:`~fvlm.errors.UsageError` for a folder that does not exist (naming where it
        was looked for) or a hub id that can be read neither from the local cache nor the hub, and
        :class:`~fvlm.errors.UnsupportedModelError` for a model family without a backbone adapter.
        Returns the config (``None`` for ``builtin`` and ``tiny:`` backbones).
        """
        from fvlm.adapters import adapter_class_for_config
        from fvlm.tiny_backbones import parse_tiny

        if self.path == "builtin" or parse_tiny(self.path) is not None:
            return None
        config = self._read_config()
        adapter_class_for_config(config)
        return config

    def _read_config(self):
        import os

        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.utils import HFValidationError, validate_repo_id
        from transformers import AutoConfig

        kwargs = dict(revision=self.revision, trust_remote_code=self.trust_remote_code)
        missing = f"no such checkpoint folder: {self.path} (looked in {', '.join(self._looked_in)})"
        if os.path.isdir(self.path):
            try:
                return AutoConfig.from_pretrained(self.path, **kwargs)
            except (OSError, ValueError) as exc:
                raise UsageError(f"checkpoint folder {self.path}: cannot read its config: {_first_line(exc)}") from None
        try:
            validate_repo_id(self.path)
        except HFValidationError:
            raise UsageError(missing) from None
        cached = isinstance(try_to_load_from_cache(self.path, "config.json", revision=self.revision), str)
        if not cached and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            raise UsageError(f"{missing}; nor is {self.path!r} a hub model in the local cache (HF_HUB_OFFLINE is set)")
        try:
            return AutoConfig.from_pretrained(self.path, local_files_only=cached, **kwargs)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{missing}; as a hub id: {_first_line(exc)}") from None

    def load(self):
        """``(model, processor)``; the model is in eval mode with gradients off for its weights."""
        from fvlm.tiny_backbones import parse_tiny, tiny_backbone

        self.check()
        family = parse_tiny(self.path)
        if self.path == "builtin":
            from fvlm import builtin

            model, processor = builtin.load(dtype=DTYPES.get(self.dtype, torch.float32),
                                            attn_implementation=self.attn_implementation or "sdpa")
        elif family is not None:
            kwargs = {} if self.num_layers is None else {"num_layers": self.num_layers}
            model, processor = tiny_backbone(family, attn_implementation=self.attn_implementation or "sdpa",
                                             dtype=DTYPES.get(self.dtype, torch.float32), seed=self.seed, **kwargs)
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            kwargs = dict(self.model_kwargs)
            if self.attn_implementation is not None:
                kwargs["attn_implementation"] = self.attn_implementation
            model = AutoModelForImageTextToText.from_pretrained(
                self.path, dtype=DTYPES.get(self.dtype, "auto"), revision=self.revision,
                trust_remote_code=self.trust_remote_code, **kwargs)
            processor = self._load_processor(AutoProcessor)
        model.eval().requires_grad_(False)
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"
        gen = model.generation_config
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return model, processor


    def _load_processor(self, auto):
        from fvlm.processors import load_processor_without_video

        path = self.processor_path or self.path
        kwargs = dict(revision=self.revision, trust_remote_code=self.trust_remote_code, **self.processor_kwargs)
        try:
            return auto.from_pretrained(path, **kwargs)
        except (ImportError, OSError):  # e.g. Qwen-VL's video processor without torchvision
            processor = load_processor_without_video(path, **kwargs)
            if processor is None:
                raise
            return processor


@dataclass
class GenerationSpec:
    """Arguments of ``model.generate`` (greedy by default, as in the papers' evaluations).

    ``extra`` takes any other ``generate`` keyword (e.g. ``{repetition_penalty: 1.1}``).
    """

    max_new_tokens: int = 16
    do_sample: bool = False
    num_beams: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        out = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, num_beams=self.num_beams)
        if self.temperature is not None:
            out["temperature"] = self.temperature
        if self.top_p is not None:
            out["top_p"] = self.top_p
        out.update(self.extra)
        return out


@dataclass
class SelectorSpec:
    """A selector by registered name (``fvlm list``) or dotted class path, with its arguments.

    In a recipe: ``selector: {name: random, args: {keep: 0.25, seed: 0}}``. (The jsonargparse form
    ``{class_path: ..., init_args: ...}`` is accepted by :class:`FVLMModule` as well.)
    """

    name: str
    args: dict[str, Any] = field(default_factory=dict)

    def selector_class(self) -> type:
        return resolve_selector_class(self.name)

    def build(self) -> TokenSelector:
        from fvlm.registry import SELECTORS

        cls = self.selector_class()
        if self.name in SELECTORS.names():
            return SELECTORS.create(self.name, **self.args)
        return cls(**self.args)


def resolve_selector_class(name: str) -> type:
    """The selector class of a registered short name or a dotted ``module.Class`` path."""
    from fvlm.registry import SELECTORS

    if name in SELECTORS.names() or "." not in name:
        return SELECTORS.get_class(name)  # unknown names raise UnknownSelectorError with suggestions
    module, _, attr = name.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownSelectorError(f"cannot import selector class {name!r}: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, TokenSelector)):
        raise UnknownSelectorError(f"{name!r} is not a TokenSelector subclass")
    return obj


def selector_label(selector: TokenSelector | None) -> str:
    """The registered name of a selector instance's class (else its class name); "none" for None."""
    if selector is None:
        return "none"
    from fvlm.registry import SELECTORS

    for name in SELECTORS.names():
        try:
            if SELECTORS.get_class(name) is type(selector):
                return name
        except Exception:  # a broken or conflicting plugin cannot be this selector
            continue
    return type(selector).__name__


def sample_efficiency(adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, trace, steps: int,
                      new_tokens: list[int], dtype: torch.dtype) -> list[dict]:
    """Per-sample visual-token and KV-cache accounting of one generate call.

    ``trace`` is the session's :class:`~fvlm.trace.Trace` (``None`` for an unpruned run: every
    layer sees every visual token). ``steps`` is the number of decode tokens that entered the
    cache (generated length - 1). KV counts exclude padding: per layer, the sample's text tokens,
    its visual tokens in that layer's input and the decode tokens. When ``generate`` repeated every
    prompt (beams, several returns), the trace has that many rows per sample: the first is used.
    """
    info = adapter.info()
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    visual = (adapter.visual_mask(input_ids) & valid).sum(dim=1).tolist()
    prompt = valid.sum(dim=1).tolist()
    per_token = 2 * info.num_kv_heads * info.head_dim * torch.empty((), dtype=dtype).element_size()  # K+V, one layer
    out = []
    copies = len(trace.original_visual) // max(len(visual), 1) if trace is not None else 1
    for b, n_vis in enumerate(visual):
        if trace is not None:
            per_layer = list(trace.visual_per_layer[b * copies])
            llm_input = trace.llm_input_visual[b * copies]
        else:
            per_layer = [n_vis] * info.num_layers
            llm_input = n_vis
        text = prompt[b] - n_vis
        kv_per_layer = [text + v + steps for v in per_layer]
        out.append({
            "visual_tokens": n_vis,
            "llm_input_visual": llm_input,
            "layer_average": sum(per_layer) / len(per_layer),
            "visual_per_layer": per_layer,
            "prompt_tokens": prompt[b],
            "new_tokens": new_tokens[b],
            "kv_tokens": sum(kv_per_layer) / len(kv_per_layer),
            "kv_bytes": sum(kv_per_layer) * per_token,
        })
    return out


class FVLMModule(LightningModule):
    """Answers VQA batches with a (pruned) VLM.

    Args:
        backbone: the VLM and its processor (loaded in ``configure_model``).
        selector: ``{name: ..., args: {...}}`` (:class:`SelectorSpec`), a ``TokenSelector`` instance
            (``class_path`` / ``init_args`` in a recipe), or ``None`` for the unpruned reference.
        generation: ``generate`` settings.
        positions: position ids of kept tokens: ``original`` or ``compact`` for any selector; ``None``
            (default) uses the selector's own (its authors' policy, what the paper recipes reproduce).
        fidelity: also run the unpruned model on every batch and record its answer, the KL
            divergence and top-1 agreement of the first generated token (judges a method without
            reference answers; doubles the generation cost).
        on_error: ``raise`` (default) stops the run when generation fails (a resumed run retries
            the batch); ``record`` retries a failing batch one sample at a time (the data module
            collates each sample alone, see :meth:`~fvlm.lightning.data.VQADataModule.single_batch`),
            writes the error on the samples that fail alone and goes on; samples answered alone carry
            the batch's error as ``batch_error``. Unreadable images are always recorded, never raised.
    """

    def __init__(self, backbone: BackboneSpec, selector: Optional[Union[SelectorSpec, TokenSelector]] = None,
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
        self.selector_spec = selector if isinstance(selector, SelectorSpec) else None
        self.selector: TokenSelector | None = selector.build() if isinstance(selector, SelectorSpec) else selector
        self.selector_name = self.selector_spec.name if self.selector_spec else selector_label(self.selector)
        self.generation = GenerationSpec(**generation) if isinstance(generation, dict) else generation
        self.positions = positions
        self.fidelity = fidelity and self.selector is not None
        self.on_error = on_error
        self.model = None
        self.processor = None
        self.measuring = True  # read by EfficiencyMonitor: False while the unpruned fidelity pass runs
        self._adapter_cache = None

    @property
    def needs_gradients(self) -> bool:
        return self.selector is not None and Need.GRADIENT in getattr(self.selector, "needs", frozenset())

    # -- loading ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is None:
            self.model, self.processor = self.backbone.load()
            if self.selector is not None:  # a missing auxiliary model fails now, not at the first batch
                from fvlm.auxiliary import load_auxiliary

                self.selector.stages(self._adapter().info())
                for spec in self.selector.auxiliary_models():
                    load_auxiliary(spec, self.model)

    def _adapter(self):
        if self._adapter_cache is None:
            from fvlm.adapters import adapter_for

            self._adapter_cache = adapter_for(self.model)
        return self._adapter_cache

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
        if self.needs_gradients and torch.is_inference_mode_enabled():
            raise FVLMError(
                f"selector {self.selector_name!r} needs gradients, but prediction runs under "
                "torch.inference_mode(): use Trainer(inference_mode=False) (fvlm run does this unless the "
                "recipe sets trainer.inference_mode: true)")
        try:
            try:
                return records + self._generate(batch["inputs"], samples)
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

    def _inputs(self, inputs: dict) -> dict:
        dtype = self.model.dtype
        return {k: v.to(self.model.device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}

    def _decode(self, sequences: torch.Tensor, prompt_len: int) -> tuple[list[str], list[int]]:
        new = sequences[:, prompt_len:]
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        lengths = []
        for row in new.tolist():
            n = len(row)
            for i, tok in enumerate(row):
                if tok in eos:
                    n = i + 1
                    break
            lengths.append(n)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts], lengths

    def _generate(self, inputs: dict, samples: list[dict]) -> list[dict]:
        from fvlm.lightning.data import instruction_text
        from fvlm.session import prune

        inputs = self._inputs(inputs)
        prompt_len = inputs["input_ids"].shape[1]
        kwargs = dict(self.generation.kwargs(), return_dict_in_generate=True, output_logits=self.fidelity)
        reference = None
        if self.fidelity:
            self.measuring = False
            try:
                reference = self.model.generate(**inputs, **kwargs)
            finally:
                self.measuring = True
        session = None if self.selector is None else prune(
            self.model, self.selector, positions=self.positions, instructions=[instruction_text(s) for s in samples])
        with session if session is not None else contextlib.nullcontext():
            out = self.model.generate(**inputs, **kwargs)
        texts, lengths = self._decode(out.sequences, prompt_len)
        n = len(texts) // len(samples)  # num_return_sequences: each sample's returns in a row, best first
        steps = max(out.sequences.shape[1] - prompt_len - 1, 0)
        eff = sample_efficiency(self._adapter(), inputs["input_ids"], inputs.get("attention_mask"),
                                session.trace if session is not None else None, steps, lengths[::n], self.model.dtype)
        records = []
        for b, sample in enumerate(samples):
            fields: dict[str, Any] = {"answer": texts[b * n], "efficiency": eff[b]}
            if n > 1:
                fields["returns"] = texts[b * n:(b + 1) * n]
            records.append(fields)
        if reference is not None:
            ref_texts, _ = self._decode(reference.sequences, prompt_len)
            rows = out.logits[0].shape[0] // len(samples)  # beams: every row of a sample starts alike
            kl, top1 = first_token_fidelity(reference.logits[0][::rows], out.logits[0][::rows])
            for b, fields in enumerate(records):
                fields.update(reference_answer=ref_texts[b * n], first_token_kl=kl[b], first_token_top1=top1[b])
        return [self._record(s, **f) for s, f in zip(samples, records)]
