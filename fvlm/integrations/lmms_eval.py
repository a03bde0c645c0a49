"""fvlm as an lmms-eval model: ``lmms-eval --model fvlm --model_args pretrained=...,selector=...``.

Install with ``pip install 'fvlm[lmms]'``; the ``lmms_eval.models`` entry point registers the
model, so every lmms-eval task that generates text (``output_type: generate_until``: GQA, MME,
POPE, MMBench, ScienceQA, TextVQA, VQAv2, SEED, ...) runs on any backbone fvlm supports, pruned by
any registered selector, and is scored by lmms-eval's own scorers. Tested with lmms-eval 0.7.3.

Model arguments (``--model_args k=v,...``):

* ``pretrained``: a checkpoint folder, a hub id, ``builtin`` or ``tiny:<family>``
  ([`BackboneSpec`][fvlm.backbones.BackboneSpec]); ``dtype``, ``attn_implementation``, ``revision``,
  ``trust_remote_code`` as there.
* ``recipe``: an ``fvlm run`` recipe (e.g. ``recipes/llava-1.5-7b/pio_fvlm-64.yaml``) whose model
  section gives the backbone, the selector and the position policy (``pretrained`` then replaces
  its checkpoint path); the task keeps its own generation settings.
* ``selector`` (a registered name or dotted class path; ``none`` or left out: unpruned) and
  ``selector_args`` (a JSON / YAML mapping, e.g. ``'{"average": 64}'``); ``positions``
  (``original`` / ``compact``; default: the selector's own).
* ``instruction_field``: the document field holding each sample's raw question, the instruction
  that instruction-conditioned selectors read (CDPruner); default: the task's prompt text as the
  model receives it (with the task's answer-format wording).
* ``batch_size`` (here or lmms-eval's ``--batch_size``; prompts of one batch share the task's
  generation settings), ``device`` (default: CUDA when available).
* ``output``: a folder for ``summary.json`` (selector, full arguments, position policy, layer
  average, efficiency means), the same shape as ``fvlm run`` writes, so ``fvlm compare`` reads it.

Answers go through [`fvlm.answering.Answerer`][fvlm.answering.Answerer] (the chat template of the checkpoint, every
image first, then the task's text). Each response carries its efficiency (visual tokens per layer,
KV bytes, prefill / decode time) in lmms-eval's per-sample ``token_counts`` (``--log_samples``);
the run's means are logged and written to ``output`` when the evaluation ends.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger

from fvlm.answering import Answerer, Prompt
from fvlm.backbones import BackboneSpec
from fvlm.errors import UsageError
from fvlm.selectors.spec import SelectorSpec, selector_arguments, selector_label

SUPPORTED_VERSIONS = ">=0.7.3,<0.8"  # tested with 0.7.3; fvlm[lmms] declares the same range
IMAGE_TOKEN = "<image>"  # some task texts hold it; fvlm places the images itself


@dataclass
class FVLMTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus fvlm's efficiency record (``fvlm`` in the sample log)."""

    fvlm: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "fvlm": self.fvlm}


def _selector(selector: Optional[str], selector_args: Any):
    if isinstance(selector_args, str):
        import yaml

        selector_args = yaml.safe_load(selector_args) if selector_args.strip() else {}
    if selector_args is not None and not isinstance(selector_args, dict):
        raise UsageError(f"selector_args must be a JSON mapping such as '{{\"keep\": 64}}', got {selector_args!r}")
    if selector in (None, "", "none"):
        if selector_args:
            raise UsageError("selector_args given without a selector")
        return None
    return SelectorSpec(name=str(selector), args=dict(selector_args or {})).build()


def _check_version() -> None:
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    found = version("lmms_eval")
    if found not in SpecifierSet(SUPPORTED_VERSIONS):
        logger.warning(f"fvlm's lmms-eval model is tested with lmms-eval {SUPPORTED_VERSIONS}; this is {found}")


def _from_recipe(recipe: str, pretrained: Optional[str]):
    """``(backbone, selector, selector name, positions)`` of an ``fvlm run`` recipe's model section
    (``pretrained`` replaces its backbone path); the task keeps its own generation settings."""
    from fvlm.commands import run as run_cmd

    argv = ["-c", recipe, "--data.path", "unused"]
    if pretrained is not None:
        argv += ["--model.backbone.path", str(pretrained)]
    parser, cfg, selector, _ = run_cmd.parse(argv)
    module = run_cmd.instantiate(parser, cfg, selector).model
    return module.backbone, module.selector, module.selector_name, module.positions


def generation_kwargs(gen_kwargs: dict) -> tuple[dict, list[str]]:
    """``(generate keywords, stop strings)`` of a task's ``generation_kwargs``.

    ``temperature`` 0 (or absent) means greedy unless ``do_sample`` says otherwise; ``until`` stops
    (the answer is cut at the first stop string); ``image_aspect_ratio`` and other keys ``generate``
    does not take are left out.
    """
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    out: dict[str, Any] = {}
    if "max_new_tokens" in kwargs:
        out["max_new_tokens"] = int(kwargs["max_new_tokens"])
    temperature = float(kwargs.get("temperature") or 0.0)
    do_sample = bool(kwargs.get("do_sample", temperature > 0))
    out["do_sample"] = do_sample
    if do_sample:
        out["temperature"] = temperature or 1.0
        if kwargs.get("top_p") is not None:
            out["top_p"] = float(kwargs["top_p"])
    if kwargs.get("num_beams") is not None:
        out["num_beams"] = int(kwargs["num_beams"])
    return out, until


def cut_at_stops(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)].strip() if cuts else text


class FVLM(lmms):
    """lmms-eval model answering through fvlm's [`Answerer`][fvlm.answering.Answerer] (see the module docs)."""

    is_simple = True

    def __init__(self, pretrained: Optional[str] = None, selector: Optional[str] = None, selector_args: Any = None,
                 positions: Optional[str] = None, recipe: Optional[str] = None, dtype: str = "auto",
                 attn_implementation: str = "sdpa", revision: Optional[str] = None, trust_remote_code: bool = False,
                 device: Optional[str] = None, batch_size: int | str = 1, max_batch_size: Optional[int] = None,
                 output: Optional[str] = None, instruction_field: Optional[str] = None, **unknown: Any) -> None:
        super().__init__()
        _check_version()
        if unknown:
            raise UsageError(f"fvlm model: unknown model_args {sorted(unknown)}; see fvlm.integrations.lmms_eval")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("the fvlm lmms-eval model runs in one process; start one lmms-eval per device")
        if str(batch_size).startswith("auto") or int(batch_size) < 1:
            raise UsageError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if positions not in (None, "original", "compact"):
            raise UsageError(f"positions must be 'original' or 'compact', got {positions!r}")
        if recipe is not None:  # before the model: a bad recipe or argument fails fast
            if selector is not None or selector_args is not None or positions is not None:
                raise UsageError("recipe= sets the selector and positions: leave out selector, selector_args, positions")
            self.backbone, self.selector, self.selector_name, positions = _from_recipe(str(recipe), pretrained)
        else:
            if pretrained is None:
                raise UsageError("give pretrained=<checkpoint folder, hub id, builtin or tiny:<family>> or recipe=<file>")
            self.selector = _selector(selector, selector_args)
            self.selector_name = str(selector) if self.selector is not None else "none"
            self.backbone = BackboneSpec(str(pretrained), dtype=dtype, attn_implementation=attn_implementation,
                                         revision=revision, trust_remote_code=bool(trust_remote_code))
        self.backbone.check()
        model, processor = self.backbone.load()
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(self._device)
        self._model = model
        self.batch_size_per_gpu = int(batch_size)
        self.output = Path(output) if output else None
        self.instruction_field = instruction_field
        self.answerer = Answerer(model, processor, self.selector, generation={"max_new_tokens": 1024},
                                 positions=positions)
        self.answerer.prepare()  # a missing auxiliary model fails now, not at the first batch
        self.efficiency: list[dict] = []

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """``model_args`` win over lmms-eval's own options (``--batch_size``, ``--device``)."""
        args = lmms_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def model(self):
        return self._model

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    # -- requests --------------------------------------------------------------------------
    def _prompt(self, context: str, doc_to_visual, doc: dict) -> Prompt:
        images = []
        for item in list(doc_to_visual(doc) or []):
            if not hasattr(item, "convert"):
                raise UsageError(f"the fvlm model answers about images; this task gives {type(item).__name__} "
                                 "(video and audio tasks are not supported)")
            images.append(item.convert("RGB"))
        field = self.instruction_field
        if field is not None and field not in doc:
            raise UsageError(f"instruction_field={field!r}: the task's documents have no such field "
                             f"(they have {sorted(doc)})")
        return Prompt(images, context.replace(IMAGE_TOKEN, "").strip(), None if field is None else str(doc[field]))

    def generate_until(self, requests) -> list:
        tokenizer = self.answerer.tokenizer

        def order(args):
            return -len(tokenizer(args[0], add_special_tokens=False)["input_ids"]), args[0]

        reorder = lmms_utils.Collator([r.args for r in requests], order, grouping=True)
        results = []
        for chunk in reorder.get_batched(n=self.batch_size, batch_fn=None):
            contexts, gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            prompts = [self._prompt(ctx, fn, self.task_dict[task][split][doc_id])
                       for ctx, fn, doc_id, task, split in zip(contexts, doc_to_visual, doc_ids, tasks, splits)]
            kwargs, stops = generation_kwargs(gen_kwargs[0])
            for answer in self.answerer.answer(prompts, **kwargs):
                eff = answer["efficiency"]
                self.efficiency.append({"efficiency": eff})
                counts = FVLMTokenCounts(input_tokens=eff["prompt_tokens"], output_tokens=eff["new_tokens"],
                                         fvlm=dict(eff, selector=self.selector_name))
                results.append(GenerationResult(cut_at_stops(answer["answer"], stops), counts))
        return reorder.get_original(results)

    def loglikelihood(self, requests):
        raise NotImplementedError("the fvlm model implements generate_until only (the tasks of the papers' tables); "
                                  "log-likelihood tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the fvlm model does not support multi-round generation")

    # -- end of the evaluation ------------------------------------------------------------
    def summary(self) -> dict:
        """What ``fvlm compare`` reads: the method and the efficiency means over every answer so far."""
        from fvlm.metrics.scoring import summarize_efficiency

        session = self.answerer.last_session
        efficiency = summarize_efficiency(self.efficiency)
        return {
            "selector": self.selector_name if self.selector is not None else selector_label(None),
            "selector_args": selector_arguments(self.selector),
            "positions": session.positions if session is not None else None,
            "layer_average": efficiency.get("layer_average"),
            "backbone": self.backbone.path,
            "samples": len(self.efficiency),
            "accuracy": None,
            "efficiency": efficiency,
            "source": "lmms-eval",
        }

    def clean(self):
        if self.efficiency:
            summary = self.summary()
            eff = summary["efficiency"]
            logger.info(f"fvlm efficiency ({summary['selector']}, {summary['samples']} answers): layer average "
                        f"{eff.get('layer_average'):.1f} visual tokens, KV {eff.get('kv_bytes', 0) / 2**20:.2f} MiB "
                        f"per sample, prefill {eff.get('prefill_ms', 0):.1f} ms per sample")
            if self.output is not None:
                self.output.mkdir(parents=True, exist_ok=True)
                (self.output / "summary.json").write_text(json.dumps(summary, indent=2))
        super().clean()
