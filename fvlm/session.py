"""The pruning session: instance-scoped hooks that apply a selector's schedule during prefill."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from fvlm.adapters import adapter_for
from fvlm.adapters.base import BackboneAdapter, LayerInjections
from fvlm.adapters.versions import check_generate_call
from fvlm.auxiliary import load_auxiliary
from fvlm.context import SelectionContext, positions_of
from fvlm.errors import BudgetError, FVLMError, GradientUnavailableError, SelectionError
from fvlm.indexing import KeepMap, build_keep_map, gather_last, gather_mask_columns, gather_seq
from fvlm.registry import create_selector
from fvlm.selectors.base import TokenSelector
from fvlm.trace import StageRecord, Trace
from fvlm.types import POSITION_POLICIES, Need, Selection, Stage, VisionObservation

_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, PruningSession]" = weakref.WeakKeyDictionary()  # model -> session


@dataclass
class _Run:
    """State of one prefill and the decode steps that follow it.

    A forward without a KV cache that continues an earlier prompt (``generate(use_cache=False)``
    feeds prompt + generated tokens again at every step) replays that prompt's prefill: ``origin`` is
    its run, whose ``applied`` stages are reused instead of selecting again.
    """

    prompt_len: int  # S: prompt length at the LLM input, before any pruning
    is_visual: torch.Tensor  # [B, L] in current coordinates
    is_filler: torch.Tensor
    token_valid: torch.Tensor
    original_visual: torch.Tensor  # [B]
    grids: list
    dtype: torch.dtype = torch.float32
    input_ids: torch.Tensor | None = None  # the prompt, and which of its tokens are real
    prompt_valid: torch.Tensor | None = None
    encoder_outputs: Any = None  # the images generate encoded once for all its steps, if passed
    origin: "_Run | None" = None
    applied: list = field(default_factory=list)  # per stage: (keep map, replacing embeddings, source length)
    visual_layout: list | None = None  # per sample VisualLayout (selectors that need the grid)
    instructions: list[str] | None = None
    input_map: KeepMap | None = None
    llm_input_len: int = 0  # L0: length entering layer 0
    groups: list[tuple[int, KeepMap]] = field(default_factory=list)  # (first layer, map in L0 coords)
    in_prefill: bool = True
    steps: int = 0
    layer_input: torch.Tensor | None = None
    layer_kwargs: dict | None = None
    visual_counts: list = field(default_factory=list)  # (first layer, [B] visual count)
    injections: LayerInjections | None = None  # what the family adds after its first layers (DeepStack)
    stages: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    def group_for(self, layer: int) -> KeepMap | None:
        found = None
        for start, keep in self.groups:
            if start <= layer:
                found = keep
        return found


class PruningSession:
    """Applies ``selector`` to ``model`` while active; use through [`fvlm.prune`][fvlm.session.prune].

    All hooks are registered on this model instance on ``__enter__`` and removed on ``__exit__``
    (also when the block raises). Selection happens in prefill only; decode steps run on the pruned
    KV cache, and cache-free steps (``generate(use_cache=False)``) replay the prompt's selection.
    Sessions do not nest: entering a second one on a model that has an active session raises. The
    selector's auxiliary models are loaded on ``__enter__`` (once per backbone,
    [`fvlm.auxiliary`][fvlm.auxiliary]).

    Args:
        model: a Hugging Face VLM of a supported family.
        selector: the [`TokenSelector`][fvlm.selectors.base.TokenSelector] instance to apply.
        positions: `"original"` keeps every kept token's original position id; `"compact"`
            renumbers kept tokens contiguously in sequence order (1-D RoPE families only); `None`
            uses the selector's declared policy (its authors').
        instructions: the instruction text of every prompt of the next calls (selectors that
            declare `Need.INSTRUCTION`, e.g. CDPruner); the attribute may be replaced between calls.
        listeners: objects with `on_stage(stage, ctx, selection)`, called after every stage the
            selector answered (its validated [`Selection`][fvlm.selectors.base.Selection], valid
            indices first), e.g. to record which tokens each stage kept; `listen` adds one.
    """

    def __init__(self, model: nn.Module, selector: TokenSelector, positions: str | None = None,
                 instructions: Sequence[str] | None = None, listeners: Sequence = ()):
        if not isinstance(selector, TokenSelector):
            raise TypeError(f"selector must be a TokenSelector instance, got {type(selector).__name__}")
        if positions is not None and positions not in POSITION_POLICIES:
            raise ValueError(f"positions must be one of {POSITION_POLICIES} or None (the selector's own), "
                             f"got {positions!r}")
        self.model = model
        self.selector = selector
        self.adapter = adapter_for(model)
        self.adapter.check_supported()
        self.info = self.adapter.info()
        self.positions = self._resolved_positions(positions)
        self.schedule = self._validated_schedule(list(selector.stages(self.info)))
        self.instructions = instructions
        self.auxiliary: dict = {}  # loaded on __enter__ (once per backbone: fvlm.auxiliary)
        self.trace: Trace | None = None
        self._run: _Run | None = None
        self._handles: list = []
        self._top_kwargs: dict = {}
        self._observed = VisionObservation()
        self._layer_index = {layer: i for i, layer in enumerate(self.adapter.layers)}
        self.listeners: list = []
        for listener in listeners:
            self.listen(listener)

    def listen(self, listener) -> None:
        """Call ``listener.on_stage(stage, ctx, selection)`` after every stage the selector answers."""
        if not callable(getattr(listener, "on_stage", None)):
            raise TypeError(f"a session listener needs an on_stage(stage, ctx, selection) method; "
                            f"got {type(listener).__name__}")
        self.listeners.append(listener)

    def _resolved_positions(self, requested: str | None) -> str:
        if requested is None:
            declared = getattr(self.selector, "positions", "original")
            if declared not in POSITION_POLICIES:
                raise FVLMError(f"selector {type(self.selector).__name__} declares positions={declared!r}; "
                                f"expected one of {POSITION_POLICIES}")
            return "original" if self.info.mrope else declared
        if requested == "compact" and self.info.mrope:
            raise FVLMError(
                f"positions='compact' is defined for 1-D RoPE; {self.info.family} uses 3-D M-RoPE, "
                "where fvlm keeps original positions (positions='original')"
            )
        return requested

    # -- schedule --------------------------------------------------------------------------
    def _validated_schedule(self, stages: list[Stage]) -> list[Stage]:
        name = type(self.selector).__name__
        if not stages:
            raise FVLMError(f"selector {name} returned an empty stage schedule")
        wheres = [s.where for s in stages]
        if len(set(wheres)) != len(wheres):
            raise FVLMError(f"selector {name} has two stages at the same place: {wheres}")
        last = self.info.num_layers - 1
        for s in stages:
            if isinstance(s.where, int) and s.where > last:
                raise FVLMError(
                    f"selector {name}: stage after layer {s.where} is out of range; "
                    f"{self.info.family} has {self.info.num_layers} decoder layers (use 1..{last})"
                )
        return sorted(stages, key=lambda s: s.order)

    @property
    def layer_stages(self) -> dict[int, Stage]:
        return {s.where: s for s in self.schedule if isinstance(s.where, int)}

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "PruningSession":
        if self._handles:
            raise FVLMError("this pruning session is already active")
        self._check_gradients()
        if Need.INSTRUCTION in self.selector.needs and self.instructions is None:
            raise FVLMError(
                f"selector {type(self.selector).__name__} needs each sample's instruction text: "
                "fvlm.prune(model, selector, instructions=[...]) with one string per prompt "
                "(fvlm run passes every sample's question)")
        other = _ACTIVE.get(self.model)
        if other is not None:
            raise FVLMError(
                f"this model is already pruning (a session with {type(other.selector).__name__} is active); "
                "sessions do not nest: use compose to run several selectors in one session, e.g. "
                "fvlm.prune(model, 'compose', selectors=[...])")
        self.auxiliary = _load_auxiliary(self.selector, self.model)
        try:
            self._attach()
        except BaseException:
            self._detach()
            raise
        _ACTIVE[self.model] = self
        return self

    def __exit__(self, *exc) -> None:
        self._detach()
        self._run = None
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

    def _check_gradients(self) -> None:
        """A selector that needs gradients cannot run under ``torch.inference_mode()``: checked when
        the session is entered and again at each prefill (inference mode may be switched on inside)."""
        if Need.GRADIENT in self.selector.needs and torch.is_inference_mode_enabled():
            raise GradientUnavailableError(
                f"selector {type(self.selector).__name__} needs gradients, which torch.inference_mode() "
                "forbids; call generate under torch.no_grad() instead (Lightning: Trainer(inference_mode=False))"
            )

    def _attach(self) -> None:
        hooks = self._handles
        hooks.extend(self.adapter.observe(self._observed, self.selector.needs))
        layers = self.selector.vision_layers(self.info)
        if layers:
            hooks.extend(self.adapter.observe_layers(self._observed, layers))
        hooks.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        hooks.append(self.adapter.top.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True))
        hooks.append(self.adapter.language_model.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True))
        hooks.append(self.adapter.language_model.register_forward_hook(self._lm_hook, with_kwargs=True))
        first = min(self.layer_stages, default=None)
        injects = type(self.adapter).take_injections is not BackboneAdapter.take_injections
        for i, layer in enumerate(self.adapter.layers):
            if injects:  # before the stage hook on the same layer: a stage prunes the updated states
                hooks.append(layer.register_forward_hook(self._inject_hook(i)))
            if first is not None and i >= first - 1:
                hooks.append(layer.register_forward_pre_hook(self._layer_pre_hook(i), with_kwargs=True))
            if i + 1 in self.layer_stages:
                hooks.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))

    def _detach(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    # -- hooks -----------------------------------------------------------------------------
    def _model_pre_hook(self, module, args, kwargs):
        """Refuse, before anything runs, a generate call the installed transformers gets wrong."""
        if self.adapter.is_prefill(kwargs):
            check_generate_call(module, dict(kwargs, input_ids=args[0]) if args else kwargs, self._uses_cache(kwargs))

    def _top_pre_hook(self, module, args, kwargs):
        self._top_kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if args:
            self._top_kwargs.setdefault("input_ids", args[0])

    def _lm_pre_hook(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise FVLMError("fvlm expects the language model to be called with inputs_embeds")
        injections = self.adapter.take_injections(kwargs)
        if self.adapter.is_prefill(kwargs):
            kwargs = self._prefill(kwargs, embeds)
            self._run.injections = injections
            return args, kwargs
        return args, self._decode(kwargs, embeds.shape[1])

    def _lm_hook(self, module, args, kwargs, output):
        if self._run is not None and self._run.in_prefill:
            self._run.in_prefill = False
            self._run.layer_input = self._run.layer_kwargs = None
            self._run.cache.clear()
            self._observed.clear()  # belongs to this prefill's images; the next call records its own

    def _prefill(self, kwargs: dict, embeds: torch.Tensor) -> dict:
        self._check_gradients()
        input_ids = self._top_kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[1] != embeds.shape[1]:
            raise FVLMError("fvlm locates visual tokens from input_ids: call the model with input_ids, not inputs_embeds")
        bsz, seq = input_ids.shape
        mask = kwargs.get("attention_mask")
        valid = mask.bool() if mask is not None and mask.dim() == 2 else torch.ones_like(input_ids, dtype=torch.bool)
        origin = self._continued(input_ids, valid, kwargs)
        layout = self.adapter.layout(input_ids, self._top_kwargs, self._observed, grids=origin is None)
        is_visual = layout.visual.to(embeds.device) & valid.to(embeds.device)
        run = self._run = _Run(
            prompt_len=seq,
            is_visual=is_visual,
            is_filler=torch.zeros_like(is_visual),
            token_valid=valid,
            original_visual=is_visual.sum(dim=1),
            grids=origin.grids if origin is not None else (layout.grids or []),
            dtype=embeds.dtype,
            input_ids=input_ids,
            prompt_valid=valid,
            encoder_outputs=self._top_kwargs.get("mm_encoder_outputs"),
            origin=origin,
            instructions=self._instructions(input_ids, valid),
        )
        if Need.GRID in self.selector.needs and origin is None:
            run.visual_layout = self.adapter.visual_layout(input_ids, self._top_kwargs, embeds, self._observed)
        for stage in self.schedule:
            if isinstance(stage.where, str):
                keep, embeds = self._apply_stage(stage, embeds)
                run.input_map = keep if run.input_map is None else run.input_map.then(keep)
        run.llm_input_len = embeds.shape[1]
        run.visual_counts.append((0, run.is_visual.sum(dim=1)))
        if run.input_map is not None:
            kwargs["inputs_embeds"] = embeds
            base = mask if mask is not None else torch.ones(bsz, seq, dtype=torch.long, device=embeds.device)
            kwargs["attention_mask"] = gather_mask_columns(base, run.input_map.ordered, seq)
            kwargs["position_ids"] = self._input_positions(kwargs.get("position_ids"), run, embeds.device)
        self._finish_trace()
        return kwargs

    def _instructions(self, input_ids: torch.Tensor, valid: torch.Tensor) -> list[str] | None:
        """The session's instructions, one per batch row. ``generate`` repeats each prompt
        ``num_beams`` times (identical consecutive rows): each instruction then covers its repeats."""
        texts = self.instructions
        if texts is None:
            return None
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise FVLMError("instructions must be a list of strings, one per prompt")
        texts, bsz = list(texts), input_ids.shape[0]
        repeat = bsz // len(texts) if texts and bsz % len(texts) == 0 else 0
        rows = torch.where(valid, input_ids, -1)
        if repeat > 1 and not torch.equal(rows, rows[::repeat].repeat_interleave(repeat, dim=0)):
            repeat = 0
        if not repeat:
            raise FVLMError(f"{len(texts)} instructions for a batch of {bsz} prompts: give one instruction per prompt")
        return [t for t in texts for _ in range(repeat)]

    def _uses_cache(self, kwargs: dict) -> bool:
        use_cache = kwargs.get("use_cache")
        return getattr(self.adapter.text_config, "use_cache", True) if use_cache is None else bool(use_cache)

    def _continued(self, input_ids: torch.Tensor, valid: torch.Tensor, kwargs: dict) -> "_Run | None":
        """The finished prefill this cache-free call continues, or None (a new prompt: select anew).

        A continuation runs without a cache (``use_cache=False``), has the earlier prompt's rows as
        its prefix (same ids, same padding), only text after it, and the same pre-encoded images
        when ``generate`` passes them: what ``generate(use_cache=False)`` does at every step.
        """
        last = self._run
        if last is None or last.in_prefill:
            return None
        origin = last.origin or last
        length = origin.prompt_len
        if self.adapter.cache_of(kwargs) is not None or self._uses_cache(kwargs) or input_ids.shape[1] <= length \
                or input_ids.shape[0] != origin.input_ids.shape[0]:
            return None
        if self._top_kwargs.get("mm_encoder_outputs") is not origin.encoder_outputs:
            return None
        same = torch.equal(input_ids[:, :length], origin.input_ids) and torch.equal(valid[:, :length], origin.prompt_valid)
        return origin if same and not bool(self.adapter.visual_mask(input_ids[:, length:]).any()) else None

    def _input_positions(self, pos, run: _Run, device) -> torch.Tensor:
        if pos is None:
            pos = torch.arange(run.prompt_len, device=device)[None]
        return self._kept_positions(pos, run.input_map, run.prompt_len)

    def _kept_positions(self, pos: torch.Tensor, keep: KeepMap, source_len: int) -> torch.Tensor:
        """Position ids of the kept slots: each token's own id (``original``) or, for ``compact``,
        the ids renumbered contiguously in sequence order (the gaps of dropped tokens closed)."""
        if self.positions == "compact":
            ordered = keep.ordered
            return gather_last(pos, ordered.index) - self._dropped_before(ordered, source_len)
        return gather_last(pos, keep.index)

    def _decode(self, kwargs: dict, new_tokens: int) -> dict:
        run = self._run
        if run is None:
            return kwargs
        run.cache.clear()  # keyed by id() of this call's tensors: never reuse across calls
        run.steps += new_tokens
        self.trace.decode_steps = run.steps
        if run.input_map is not None:
            mask = kwargs.get("attention_mask")
            if mask is None and run.input_map.filler.any():
                total = run.prompt_len + run.steps
                mask = torch.ones(run.input_map.index.shape[0], total, dtype=torch.long, device=run.input_map.index.device)
            if mask is not None:
                kwargs["attention_mask"] = gather_mask_columns(mask, run.input_map.ordered, run.prompt_len)
            if self.positions == "compact" and kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] - self._total_dropped(run.input_map, run.prompt_len)
        return kwargs

    def _layer_pre_hook(self, index: int):
        def hook(module, args, kwargs):
            run = self._run
            if run is None:
                return None
            keep = run.group_for(index)
            if keep is not None:
                kwargs = self._layer_kwargs(module, kwargs, keep, run)
            if run.in_prefill and index + 1 in self.layer_stages and run.origin is None:
                run.layer_input = args[0] if args else kwargs["hidden_states"]
                run.layer_kwargs = kwargs
            return args, kwargs

        return hook

    def _inject_hook(self, index: int):
        def hook(module, args, output):
            run = self._run
            if run is None or not run.in_prefill or run.injections is None or index >= len(run.injections.rows):
                return None
            source = run.injections.source.to(run.is_visual.device)
            for keep in (run.input_map, run.group_for(index)):
                if keep is not None:
                    source = source.gather(1, keep.index).masked_fill(keep.filler, -1)
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = self.adapter.inject(hidden, run.injections.rows[index], source)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs, output):
            run = self._run
            if run is None or not run.in_prefill:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            keep, hidden = self._apply_stage(self.layer_stages[index + 1], hidden)
            previous = run.group_for(index) or KeepMap.identity(*keep.index.shape[:1], run.llm_input_len, hidden.device)
            run.groups.append((index + 1, previous.then(keep)))
            run.visual_counts.append((index + 1, run.is_visual.sum(dim=1)))
            run.cache.clear()
            run.layer_input = run.layer_kwargs = None
            self._finish_trace()
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    # -- stage execution -------------------------------------------------------------------
    def _apply_stage(self, stage: Stage, hidden: torch.Tensor) -> tuple[KeepMap, torch.Tensor]:
        from fvlm.profiling.timing import Interval

        run = self._run
        watch = Interval(hidden.device)
        notes: list[str] = []
        index = self.schedule.index(stage)
        if run.origin is not None:  # a cache-free continuation: the prompt's own selection, extended
            keep, embeddings, length = run.origin.applied[index]
            keep = keep.extended(length, hidden.shape[1])
            budget = torch.tensor(run.origin.stages[index].budget, dtype=torch.long, device=hidden.device)
        elif bool(run.is_visual.any()):
            ctx = SelectionContext(
                selector=self.selector,
                stage=stage,
                stage_index=index,
                info=self.info,
                adapter=self.adapter,
                hidden=hidden,
                is_visual=run.is_visual,
                token_valid=run.token_valid,
                budget=None,
                grids=run.grids,
                layer_input=run.layer_input,
                layer_kwargs=run.layer_kwargs,
                observed=self._observed,
                original_visual=run.original_visual,
                layout=run.visual_layout,
                instructions=run.instructions,
                auxiliary=self.auxiliary,
                notes=notes,
            )
            budget = ctx.budget = self._budget(stage, run, self.selector.stage_budget(ctx))
            selection = self._checked(self.selector.select(ctx), budget, ctx.num_visual, stage.exact)
            visual_index = ctx.visual_index
            for listener in self.listeners:
                listener.on_stage(stage, ctx, selection)
        else:  # no sample has a visual token (text-only prompts): nothing to choose, the selector is not asked
            budget = torch.zeros_like(run.original_visual)
            visual_index = positions_of(run.is_visual)[0]
            selection = Selection(visual_index)
        if run.origin is None:
            keep = build_keep_map(run.is_visual | run.is_filler, visual_index, selection.indices)
            embeddings = selection.embeddings
            run.applied.append((keep, embeddings, hidden.shape[1]))
        new_hidden = gather_seq(hidden, keep.index)
        if embeddings is not None:
            from_sel = keep.source_col >= 0
            replaced = gather_seq(embeddings.to(new_hidden.dtype), keep.source_col.clamp(min=0))
            new_hidden = torch.where(from_sel[..., None], replaced, new_hidden)
        run.is_visual = run.is_visual.gather(1, keep.index) & ~keep.filler
        run.is_filler = keep.filler
        run.token_valid = run.token_valid.gather(1, keep.index) & ~keep.filler
        run.stages.append(StageRecord(stage.where, budget.tolist(), watch.stop(), notes))
        return keep, new_hidden

    def _budget(self, stage: Stage, run: _Run, counts) -> torch.Tensor:
        """The selector's per-sample ``counts`` for ``stage`` ([`TokenSelector.stage_budget`][fvlm.selectors.base.TokenSelector.stage_budget]), checked."""
        now = run.is_visual.sum(dim=1)
        budget = torch.as_tensor(counts, dtype=torch.long, device=now.device)
        budget = torch.where(now > 0, budget, 0)
        over = (budget > now).nonzero().flatten().tolist()
        if over:
            b = over[0]
            raise BudgetError(
                f"selector {type(self.selector).__name__}, stage at {stage.where!r}: budget of "
                f"{int(budget[b])} visual tokens exceeds the {int(now[b])} visual tokens sample {b} has there"
            )
        return budget

    def _checked(self, selection, budget: torch.Tensor, num_visual: torch.Tensor, exact: bool = True) -> Selection:
        name = type(self.selector).__name__
        if isinstance(selection, torch.Tensor):
            selection = Selection(selection)
        idx = selection.indices
        if idx.dim() != 2 or idx.shape[0] != budget.shape[0] or idx.dtype != torch.long:
            raise SelectionError(f"selector {name} must return LongTensor indices [B, K]; got {tuple(idx.shape)} {idx.dtype}")
        ok = idx >= 0
        srt = torch.where(ok, idx, -1 - torch.arange(idx.shape[1], device=idx.device)).sort(dim=1).values
        dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(dim=1)
        count = ok.sum(dim=1)
        wrong_count = count != budget if exact else (count > budget) | ((count < 1) & (budget > 0))
        wrong = wrong_count | (ok & (idx >= num_visual[:, None])).any(dim=1) | dup
        if bool(wrong.any()):
            b = int(wrong.nonzero()[0])
            need = f"{int(budget[b])}" if exact else f"1 to {int(budget[b])}"
            raise SelectionError(
                f"selector {name} returned an invalid selection for sample {b}: {idx[b].tolist()} "
                f"(need {need} unique indices in [0, {int(num_visual[b])}))"
            )
        order = (~ok).long().argsort(dim=1, stable=True)
        emb = selection.embeddings
        if emb is not None:
            emb = emb.gather(1, order[..., None].expand(-1, -1, emb.shape[-1]))
        return Selection(idx.gather(1, order), emb)

    # -- per-layer arguments after an in-LLM stage -----------------------------------------
    def _layer_kwargs(self, module: nn.Module, kwargs: dict, keep: KeepMap, run: _Run) -> dict:
        kwargs = dict(kwargs)
        cache = run.cache
        mask = kwargs.get("attention_mask")
        key = ("mask", id(keep), id(mask))
        if key not in cache:
            cache[key] = self.adapter.pruned_mask(
                self._layer_index[module], mask, keep.ordered, prefill=run.in_prefill, steps=run.steps,
                source_len=run.llm_input_len, dtype=run.dtype)
        kwargs["attention_mask"] = cache[key]
        pos = kwargs.get("position_ids")
        if run.in_prefill:
            pe = kwargs.get("position_embeddings")
            key = ("pe", id(keep), id(pe))
            if key not in cache:
                cache[key] = self._layer_rotary(pe, pos, keep, run)
            kwargs["position_embeddings"], ids = cache[key]
            if pos is not None:
                kwargs["position_ids"] = ids
        elif self.positions == "compact":
            key = ("pe-decode", id(keep), run.steps)
            if key not in cache:
                shifted = pos - self._total_dropped(keep, run.llm_input_len)
                cache[key] = self.adapter.rotary_emb(kwargs["position_embeddings"][0], shifted)
            kwargs["position_embeddings"] = cache[key]
        return kwargs

    def _layer_rotary(self, pe, pos, keep: KeepMap, run: _Run):
        """``(rotary tables, position ids)`` of the kept slots for this layer group's prefill."""
        source = torch.arange(run.llm_input_len, device=keep.index.device)[None] if pos is None else pos
        ids = self._kept_positions(source, keep, run.llm_input_len)
        if self.positions == "compact":
            return self.adapter.rotary_emb(pe[0], ids), ids
        return tuple(gather_seq(t, keep.index) for t in pe), ids

    @staticmethod
    def _dropped_before(keep: KeepMap, source_len: int) -> torch.Tensor:
        """Per kept slot, how many source positions before it were dropped (compact positions)."""
        bsz = keep.index.shape[0]
        kept = torch.zeros(bsz, source_len, dtype=torch.long, device=keep.index.device)
        kept.scatter_add_(1, keep.index, (~keep.filler).long())
        dropped = (1 - kept).cumsum(dim=1) - (1 - kept)
        return dropped.gather(1, keep.index)

    @staticmethod
    def _total_dropped(keep: KeepMap, source_len: int) -> torch.Tensor:
        return (source_len - (~keep.filler).sum(dim=1, keepdim=True)).to(keep.index.dtype)

    # -- trace -----------------------------------------------------------------------------
    def _finish_trace(self) -> None:
        run = self._run
        if run.origin is not None:  # the prompt's trace holds; the new tokens are its decode steps
            self.trace.decode_steps = run.prompt_len - run.origin.prompt_len
            return
        num_layers = self.info.num_layers
        per_layer = []
        lengths = []
        for i in range(num_layers):
            count = [c for start, c in run.visual_counts if start <= i][-1]
            per_layer.append(count)
            keep = run.group_for(i)
            lengths.append(run.llm_input_len if keep is None else keep.index.shape[1])
        counts = torch.stack(per_layer, dim=1).tolist()
        self.trace = Trace(
            positions=self.positions,
            original_visual=run.original_visual.tolist(),
            llm_input_visual=run.visual_counts[0][1].tolist(),
            visual_per_layer=counts,
            prefill_length=lengths,
            stages=list(run.stages),
            decode_steps=run.steps,
        )


def prune(model: nn.Module, selector: TokenSelector | str, /, *, positions: str | None = None,
          instructions: Sequence[str] | None = None, listeners: Sequence = (),
          **selector_kwargs: Any) -> PruningSession:
    """Prune ``model``'s visual tokens with ``selector`` inside a ``with`` block.

    ```python
    with fvlm.prune(model, "pio_fvlm", average=64) as session:
        output = model.generate(**inputs)
    ```

    Args:
        model: a Hugging Face VLM of a supported family (`fvlm list --adapters`).
        selector: a [`TokenSelector`][fvlm.selectors.base.TokenSelector] instance or a registered
            name (`fvlm list`).
        positions: `"original"` or `"compact"` for every selector alike; `None` uses the
            selector's own, its authors' policy (`session.trace.positions` says which one ran).
        instructions: one instruction text per prompt, for instruction-conditioned selectors
            (`fvlm.prune(model, "cdpruner", keep=64, instructions=["What is on the table?"])`).
        listeners: see [`PruningSession`][fvlm.session.PruningSession].
        **selector_kwargs: the selector's arguments when `selector` is a name
            (`fvlm.prune(model, "random", keep=64, seed=0)`).

    Returns:
        The [`PruningSession`][fvlm.session.PruningSession]; its `trace` holds the visual tokens
            per layer, the KV length per layer and the per-stage timings of the last call.
    """
    if isinstance(selector, str):
        selector = create_selector(selector, **selector_kwargs)
    elif selector_kwargs:
        raise TypeError("selector keyword arguments are only accepted with a registered selector name")
    return PruningSession(model, selector, positions=positions, instructions=instructions,
                          listeners=listeners)


def _load_auxiliary(selector: TokenSelector, model: nn.Module) -> dict:
    loaded = {}
    for spec in selector.auxiliary_models():
        if spec.name in loaded:
            raise FVLMError(f"selector {type(selector).__name__} declares two auxiliary models named {spec.name!r}")
        loaded[spec.name] = load_auxiliary(spec, model)
    return loaded
