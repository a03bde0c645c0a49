"""Answering prompts with a (pruned) VLM: the one generation path of every fvlm entry point.

[`Answerer`][fvlm.answering.Answerer] takes a loaded backbone and its processor, an optional selector and ``generate``
settings. It builds the inputs of a batch of [`Prompt`][fvlm.answering.Prompt] records (the processor's chat
template, left padding, any number of images per prompt), runs ``generate`` under a pruning
session, times the prefill and the decode steps with one [`StepClock`][fvlm.profiling.timing.StepClock],
decodes the new tokens and returns one result per prompt: the answer and its per-sample
efficiency (visual tokens per layer, KV tokens and bytes, prefill / decode time). ``fvlm run``
(through ``FVLMModule``), [`fvlm.builtin.answer`][fvlm.builtin.answer], ``fvlm visualize``,
the benchmarks and the lmms-eval model all answer through it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from fvlm.budget import layer_average
from fvlm.selectors.base import TokenSelector


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
class Prompt:
    """One user turn: its images (PIL, in the order they appear) and its text.

    ``instruction``: the text instruction-conditioned selectors read (``Need.INSTRUCTION``, e.g.
    CDPruner): the raw question without answer-format prompts; ``None`` uses ``text``.
    """

    images: list
    text: str
    instruction: str | None = None


def messages(prompt: Prompt, system: str | None = None) -> list[dict]:
    """The chat messages of a prompt: every image first, then the text (LLaVA's evaluation layout)."""
    content = [{"type": "image"} for _ in prompt.images]
    content.append({"type": "text", "text": prompt.text})
    msgs = [{"role": "user", "content": content}]
    if system:
        msgs.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return msgs


def build_inputs(processor, prompts: Sequence[Prompt], system: str | None = None) -> dict:
    """Processor outputs (tensors only) for a batch of prompts, rendered by the chat template, left-padded."""
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("the processor has no chat template; use a checkpoint that ships one")
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"  # batched generation appends on the right
    texts = [processor.apply_chat_template(messages(p, system), add_generation_prompt=True, tokenize=False)
             for p in prompts]
    images = [img for p in prompts for img in p.images]
    out = processor(images=images or None, text=texts, padding=True, return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def sample_efficiency(adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, trace, steps: int,
                      new_tokens: list[int], dtype: torch.dtype) -> list[dict]:
    """Per-sample visual-token and KV-cache accounting of one generate call.

    ``trace`` is the session's [`Trace`][fvlm.trace.Trace] (``None`` for an unpruned run: every
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
            "layer_average": layer_average(per_layer),
            "visual_per_layer": per_layer,
            "prompt_tokens": prompt[b],
            "new_tokens": new_tokens[b],
            "kv_tokens": sum(kv_per_layer) / len(kv_per_layer),
            "kv_bytes": sum(kv_per_layer) * per_token,
        })
    return out


def _timings(clock, batch: int) -> dict:
    """Per-sample shares of one batch's prefill (the first forward call) and decode steps (the rest)."""
    steps = clock.steps()
    prefill = (steps[0][1] - steps[0][0]) if steps else 0.0
    decode = sum(b - a for a, b in steps[1:])
    return dict(prefill_ms=prefill * 1e3 / batch, decode_ms=decode * 1e3 / batch, batch_prefill_ms=prefill * 1e3,
                batch_decode_ms=decode * 1e3, batch_decode_steps=max(len(steps) - 1, 0), batch_size=batch)


class Answerer:
    """Answers batches of prompts with ``model`` (pruned by ``selector`` when given).

    Args:
        model, processor: a loaded backbone ([`BackboneSpec.load`][fvlm.backbones.BackboneSpec.load]).
        selector: a [`TokenSelector`][fvlm.selectors.base.TokenSelector], or ``None`` for the unpruned model.
        generation: ``generate`` settings ([`GenerationSpec`][fvlm.answering.GenerationSpec] or a keyword dict).
        positions: the session's position policy (``None``: the selector's own).
        fidelity: also answer with the unpruned model (timed apart) and add its answer, the first
            generated token's KL divergence and top-1 agreement and its prefill / decode times to
            each result (doubles the cost).
        first_logprobs: add each prompt's first generated token's log-probabilities (a float32
            CPU tensor over the vocabulary) to its result, as ``first_logprobs``.
        listeners: passed to every pruning session (``on_stage(stage, ctx, selection)``).
        system: a system prompt for every prompt.
    """

    def __init__(self, model, processor, selector: TokenSelector | None = None,
                 generation: GenerationSpec | dict | None = None, positions: str | None = None,
                 fidelity: bool = False, listeners: Sequence = (), system: str | None = None,
                 first_logprobs: bool = False):
        self.model = model
        self.processor = processor
        self.selector = selector
        if isinstance(generation, dict):
            generation = GenerationSpec(**generation)
        self.generation = generation or GenerationSpec()
        self.positions = positions
        self.fidelity = fidelity and selector is not None
        self.listeners = list(listeners)
        self.system = system
        self.first_logprobs = first_logprobs
        self.last_session = None
        self._adapter = None

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def adapter(self):
        if self._adapter is None:
            from fvlm.adapters import adapter_for

            self._adapter = adapter_for(self.model)
        return self._adapter

    def prepare(self) -> None:
        """Settle the selector on this backbone and load its auxiliary models now, so that a wrong
        argument or model path fails before the first batch (sessions then reuse them)."""
        if self.selector is None:
            return
        from fvlm.auxiliary import load_auxiliary

        self.selector.stages(self.adapter().info())
        for spec in self.selector.auxiliary_models():
            load_auxiliary(spec, self.model)

    # -- inputs ----------------------------------------------------------------------------
    def inputs(self, prompts: Sequence[Prompt]) -> dict:
        """The model inputs of a batch of prompts, on the model's device (floats in its dtype)."""
        return self.to_model(build_inputs(self.processor, prompts, self.system))

    def to_model(self, inputs: dict) -> dict:
        dtype, device = self.model.dtype, self.model.device
        return {k: v.to(device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}

    # -- answering -------------------------------------------------------------------------
    def answer(self, prompts: Sequence[Prompt], *, selector: TokenSelector | None = None,
               **generate_kwargs: Any) -> list[dict]:
        """One result per prompt (see [`generate`][fvlm.answering.Answerer.generate])."""
        instructions = [p.text if p.instruction is None else p.instruction for p in prompts]
        return self.generate(self.inputs(prompts), instructions=instructions, selector=selector, **generate_kwargs)

    def answer_all(self, prompts: Sequence[Prompt], batch_size: int, *,
                   selector_for: Callable[[list[int]], TokenSelector] | None = None,
                   **generate_kwargs: Any) -> list[dict]:
        """Results in input order, answered in batches of prompts sorted by text length (ties by
        index), so that left padding is needed only where lengths differ within a batch.

        ``selector_for``: builds the selector of each batch from the indices of its prompts (a
        selector that depends on the samples, e.g. a ground-truth oracle); it replaces ``selector``.
        """
        lengths = [len(self.tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
        results: list[dict | None] = [None] * len(prompts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            chosen = selector_for(chunk) if selector_for is not None else None
            for i, result in zip(chunk, self.answer([prompts[i] for i in chunk], selector=chosen, **generate_kwargs)):
                results[i] = result
        return results  # type: ignore[return-value]

    def generate(self, inputs: dict, instructions: Sequence[str] | None = None, *,
                 selector: TokenSelector | None = None, **generate_kwargs: Any) -> list[dict]:
        """Answer a batch of prepared inputs ([`inputs`][fvlm.answering.Answerer.inputs]);
        ``generate_kwargs`` override the settings. ``instructions``: one per prompt, for
        instruction-conditioned selectors (the session's). ``selector``: prune this batch with it
        instead of the answerer's own.

        Each result holds ``answer`` (the first returned sequence, stripped), ``efficiency`` and,
        with several returns per prompt, ``returns``; with ``fidelity``, ``reference_answer``,
        ``first_token_kl`` and ``first_token_top1`` (and the unpruned pass's times in
        ``efficiency``: ``unpruned_prefill_ms``, ``unpruned_decode_ms``); with ``first_logprobs``,
        ``first_logprobs``.
        """
        from fvlm.profiling.timing import StepClock
        from fvlm.session import PruningSession

        inputs = self.to_model(inputs)
        prompt_len = inputs["input_ids"].shape[1]
        batch = inputs["input_ids"].shape[0]
        kwargs = dict(self.generation.kwargs(), **generate_kwargs)
        selector = self.selector if selector is None else selector
        kwargs.update(return_dict_in_generate=True, output_logits=self.fidelity or self.first_logprobs)
        reference = reference_clock = None
        if self.fidelity:  # the unpruned model on the same batch, timed apart (the speedup's baseline)
            with StepClock(self.model) as reference_clock:
                reference = self.model.generate(**inputs, **kwargs)
        session = None
        if selector is not None:
            session = PruningSession(self.model, selector, positions=self.positions,
                                     instructions=instructions, listeners=self.listeners)
        with session if session is not None else contextlib.nullcontext(), StepClock(self.model) as clock:
            out = self.model.generate(**inputs, **kwargs)
        self.last_session = session
        texts, lengths = self.decode(out.sequences, prompt_len)
        n = len(texts) // batch  # num_return_sequences: each prompt's returns in a row, best first
        steps = max(out.sequences.shape[1] - prompt_len - 1, 0)
        efficiency = sample_efficiency(self.adapter(), inputs["input_ids"], inputs.get("attention_mask"),
                                       session.trace if session is not None else None, steps, lengths[::n],
                                       self.model.dtype)
        timing = _timings(clock, batch)
        if reference_clock is not None:
            unpruned = _timings(reference_clock, batch)
            timing.update(unpruned_prefill_ms=unpruned["prefill_ms"], unpruned_decode_ms=unpruned["decode_ms"],
                          batch_unpruned_decode_steps=unpruned["batch_decode_steps"])
        results = []
        for b in range(batch):
            result: dict[str, Any] = {"answer": texts[b * n], "efficiency": {**efficiency[b], **timing}}
            if n > 1:
                result["returns"] = texts[b * n:(b + 1) * n]
            results.append(result)
        rows = out.logits[0].shape[0] // batch if out.logits is not None else 1  # beams: every row of a prompt starts alike
        if self.first_logprobs:
            logprobs = out.logits[0][::rows].float().log_softmax(dim=-1).cpu()
            for b, result in enumerate(results):
                result["first_logprobs"] = logprobs[b]
        if reference is not None:
            from fvlm.metrics.scoring import first_token_fidelity

            ref_texts, _ = self.decode(reference.sequences, prompt_len)
            kl, top1 = first_token_fidelity(reference.logits[0][::rows], out.logits[0][::rows])
            for b, result in enumerate(results):
                result.update(reference_answer=ref_texts[b * n], first_token_kl=kl[b], first_token_top1=top1[b])
        return results

    def decode(self, sequences: torch.Tensor, prompt_len: int) -> tuple[list[str], list[int]]:
        """``(texts, new-token counts)`` of generated rows: the new tokens up to and including EOS."""
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
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts], lengths
