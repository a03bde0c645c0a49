"""The pruning session: instance-scoped hooks that apply a selector's schedule during prefill."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fvlm.adapters import adapter_for
from fvlm.adapters.cache import is_prefill_call
from fvlm.context import SelectionContext
from fvlm.errors import BudgetError, FVLMError, GradientUnavailableError, SelectionError
from fvlm.indexing import (
    KeepMap,
    build_keep_map,
    build_mask,
    gather_last,
    gather_mask_columns,
    gather_seq,
    gather_square_mask,
)
from fvlm.selectors.base import Need, Selection, Stage, TokenSelector
from fvlm.trace import StageRecord, Trace

POSITION_POLICIES = ("original", "compact")


@dataclass
class _Run:
    """State of one prefill and the decode steps that follow it."""

    prompt_len: int  # S: prompt length at the LLM input, before any pruning
    is_visual: torch.Tensor  # [B, L] in current coordinates
    is_filler: torch.Tensor
    token_valid: torch.Tensor
    original_visual: torch.Tensor  # [B]
    grids: list
    dtype: torch.dtype = torch.float32
    input_map: KeepMap | None = None
    llm_input_len: int = 0  # L0: length entering layer 0
    groups: list[tuple[int, KeepMap]] = field(default_factory=list)  # (first layer, map in L0 coords)
    in_prefill: bool = True
    steps: int = 0
    layer_input: torch.Tensor | None = None
    layer_kwargs: dict | None = None
    visual_counts: list = field(default_factory=list)  # (first layer, [B] visual count)
    stages: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    def group_for(self, layer: int) -> KeepMap | None:
        found = None
        for start, keep in self.groups:
            if start <= layer:
                found = keep
        return found


class PruningSession:
    """Applies ``selector`` to ``model`` while active; use through :func:`fvlm.prune`.

    All hooks are registered on this model instance on ``__enter__`` and removed on ``__exit__``
    (also when the block raises). Selection happens in prefill only; decode steps run on the pruned
    KV cache. ``positions="original"`` keeps every kept token's original position id (default);
    ``"compact"`` renumbers kept tokens contiguously (1-D RoPE families only).
    """

    def __init__(self, model: nn.Module, selector: TokenSelector, positions: str = "original"):
        if not isinstance(selector, TokenSelector):
            raise TypeError(f"selector must be a TokenSelector instance, got {type(selector).__name__}")
        if positions not in POSITION_POLICIES:
            raise ValueError(f"positions must be one of {POSITION_POLICIES}, got {positions!r}")
        self.model = model
        self.selector = selector
        self.adapter = adapter_for(model)
        self.info = self.adapter.info()
        if positions == "compact" and self.info.mrope:
            raise FVLMError(
                f"positions='compact' is defined for 1-D RoPE; {self.info.family} uses 3-D M-RoPE, "
                "where fvlm keeps original positions (positions='original')"
            )
        self.positions = positions
        self.schedule = self._validated_schedule(list(selector.stages(self.info)))
        self.trace: Trace | None = None
        self._run: _Run | None = None
        self._handles: list = []
        self._top_kwargs: dict = {}
        self._observed: dict = {}

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
        try:
            self._attach()
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._detach()
        self._run = None

    def _attach(self) -> None:
        hooks = self._handles
        hooks.extend(self.adapter.observe(self._observed, self.selector.needs))
        hooks.append(self.adapter.top.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True))
        hooks.append(self.adapter.language_model.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True))
        hooks.append(self.adapter.language_model.register_forward_hook(self._lm_hook, with_kwargs=True))
        first = min(self.layer_stages, default=None)
        for i, layer in enumerate(self.adapter.layers):
            if first is not None and i >= first - 1:
                hooks.append(layer.register_forward_pre_hook(self._layer_pre_hook(i), with_kwargs=True))
            if i + 1 in self.layer_stages:
                hooks.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))

    def _detach(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    # -- hooks -----------------------------------------------------------------------------
    def _top_pre_hook(self, module, args, kwargs):
        self._top_kwargs = {**self._observed, **{k: v for k, v in kwargs.items() if v is not None}}
        if args:
            self._top_kwargs.setdefault("input_ids", args[0])

    def _lm_pre_hook(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise FVLMError("fvlm expects the language model to be called with inputs_embeds")
        if is_prefill_call(kwargs):
            return args, self._prefill(kwargs, embeds)
        return args, self._decode(kwargs, embeds.shape[1])

    def _lm_hook(self, module, args, kwargs, output):
        if self._run is not None and self._run.in_prefill:
            self._run.in_prefill = False
            self._run.layer_input = self._run.layer_kwargs = None
            self._run.cache.clear()

    def _prefill(self, kwargs: dict, embeds: torch.Tensor) -> dict:
        if Need.GRADIENT in self.selector.needs and torch.is_inference_mode_enabled():
            raise GradientUnavailableError(
                f"selector {type(self.selector).__name__} needs gradients, which torch.inference_mode() "
                "forbids; call generate under torch.no_grad() instead (Lightning: Trainer(inference_mode=False))"
            )
        input_ids = self._top_kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[1] != embeds.shape[1]:
            raise FVLMError("fvlm locates visual tokens from input_ids: call the model with input_ids, not inputs_embeds")
        bsz, seq = input_ids.shape
        is_visual = self.adapter.visual_mask(input_ids).to(embeds.device)
        mask = kwargs.get("attention_mask")
        valid = mask.bool() if mask is not None and mask.dim() == 2 else torch.ones_like(is_visual)
        is_visual = is_visual & valid
        run = self._run = _Run(
            prompt_len=seq,
            is_visual=is_visual,
            is_filler=torch.zeros_like(is_visual),
            token_valid=valid,
            original_visual=is_visual.sum(dim=1),
            grids=self.adapter.image_grids(input_ids, self._top_kwargs),
            dtype=embeds.dtype,
        )
        for stage in self.schedule:
            if isinstance(stage.where, str):
                keep, embeds = self._apply_stage(stage, embeds)
                run.input_map = keep if run.input_map is None else run.input_map.then(keep)
        run.llm_input_len = embeds.shape[1]
        run.visual_counts.append((0, run.is_visual.sum(dim=1)))
        if run.input_map is not None:
            kwargs["inputs_embeds"] = embeds
            base = mask if mask is not None else torch.ones(bsz, seq, dtype=torch.long, device=embeds.device)
            kwargs["attention_mask"] = gather_mask_columns(base, run.input_map, seq)
            kwargs["position_ids"] = self._input_positions(kwargs.get("position_ids"), run, embeds.device)
        self._finish_trace()
        return kwargs

    def _input_positions(self, pos, run: _Run, device) -> torch.Tensor:
        if pos is None:
            pos = torch.arange(run.prompt_len, device=device)[None]
        kept = gather_last(pos, run.input_map.index)
        if self.positions == "compact":
            kept = kept - self._dropped_before(run.input_map, run.prompt_len)
        return kept

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
                kwargs["attention_mask"] = gather_mask_columns(mask, run.input_map, run.prompt_len)
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
            if run.in_prefill and index + 1 in self.layer_stages:
                run.layer_input = args[0] if args else kwargs["hidden_states"]
                run.layer_kwargs = kwargs
            return args, kwargs

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
        run = self._run
        if hidden.device.type == "cuda":
            torch.cuda.synchronize(hidden.device)
        start = time.perf_counter()
        budget = self._budget(stage, run)
        ctx = SelectionContext(
            selector=self.selector,
            stage=stage,
            stage_index=self.schedule.index(stage),
            info=self.info,
            adapter=self.adapter,
            hidden=hidden,
            is_visual=run.is_visual,
            token_valid=run.token_valid,
            budget=budget,
            grids=run.grids,
            layer_input=run.layer_input,
            layer_kwargs=run.layer_kwargs,
            observed=self._observed,
        )
        selection = self._checked(self.selector.select(ctx), budget, ctx.num_visual)
        keep = build_keep_map(run.is_visual | run.is_filler, ctx.visual_index, selection.indices)
        new_hidden = gather_seq(hidden, keep.index)
        if selection.embeddings is not None:
            from_sel = keep.source_col >= 0
            replaced = gather_seq(selection.embeddings.to(new_hidden.dtype), keep.source_col.clamp(min=0))
            new_hidden = torch.where(from_sel[..., None], replaced, new_hidden)
        run.is_visual = run.is_visual.gather(1, keep.index) & ~keep.filler
        run.is_filler = keep.filler
        run.token_valid = run.token_valid.gather(1, keep.index) & ~keep.filler
        if hidden.device.type == "cuda":
            torch.cuda.synchronize(hidden.device)
        run.stages.append(StageRecord(stage.where, budget.tolist(), time.perf_counter() - start))
        return keep, new_hidden

    def _budget(self, stage: Stage, run: _Run) -> torch.Tensor:
        now = run.is_visual.sum(dim=1)
        if isinstance(stage.keep, float):
            budget = (run.original_visual.double() * stage.keep).round().long().clamp(min=1)
        else:
            budget = torch.full_like(now, stage.keep)
        budget = torch.where(now > 0, budget, 0)
        over = (budget > now).nonzero().flatten().tolist()
        if over:
            b = over[0]
            raise BudgetError(
                f"selector {type(self.selector).__name__}, stage at {stage.where!r}: budget of "
                f"{int(budget[b])} visual tokens exceeds the {int(now[b])} visual tokens sample {b} has there"
            )
        return budget

    def _checked(self, selection, budget: torch.Tensor, num_visual: torch.Tensor) -> Selection:
        name = type(self.selector).__name__
        if isinstance(selection, torch.Tensor):
            selection = Selection(selection)
        idx = selection.indices
        if idx.dim() != 2 or idx.shape[0] != budget.shape[0] or idx.dtype != torch.long:
            raise SelectionError(f"selector {name} must return LongTensor indices [B, K]; got {tuple(idx.shape)} {idx.dtype}")
        ok = idx >= 0
        srt = torch.where(ok, idx, -1 - torch.arange(idx.shape[1], device=idx.device)).sort(dim=1).values
        dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(dim=1)
        wrong = (ok.sum(dim=1) != budget) | (ok & (idx >= num_visual[:, None])).any(dim=1) | dup
        if bool(wrong.any()):
            b = int(wrong.nonzero()[0])
            raise SelectionError(
                f"selector {name} returned an invalid selection for sample {b}: {idx[b].tolist()} "
                f"(need {int(budget[b])} unique indices in [0, {int(num_visual[b])}))"
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
            cache[key] = self._layer_mask(module, mask, keep, run)
        kwargs["attention_mask"] = cache[key]
        pos = kwargs.get("position_ids")
        if run.in_prefill:
            pe = kwargs.get("position_embeddings")
            key = ("pe", id(keep), id(pe))
            if key not in cache:
                cache[key] = self._layer_rotary(pe, pos, keep, run, kwargs)
            kwargs["position_embeddings"] = cache[key]
            if pos is not None:
                kwargs["position_ids"] = gather_last(pos, keep.index)
        elif self.positions == "compact":
            key = ("pe-decode", id(keep), run.steps)
            if key not in cache:
                shifted = pos - self._total_dropped(keep, run.llm_input_len)
                cache[key] = self.adapter.rotary_emb(kwargs["position_embeddings"][0], shifted)
            kwargs["position_embeddings"] = cache[key]
        return kwargs

    def _layer_rotary(self, pe, pos, keep: KeepMap, run: _Run, kwargs):
        if self.positions == "compact":
            pos = torch.arange(run.llm_input_len, device=keep.index.device)[None] if pos is None else pos
            kept = gather_last(pos, keep.index) - self._dropped_before(keep, run.llm_input_len)
            return self.adapter.rotary_emb(pe[0], kept)
        return tuple(gather_seq(t, keep.index) for t in pe)

    def _layer_mask(self, module, mask, keep: KeepMap, run: _Run):
        length = run.llm_input_len
        if mask is None:
            if not bool(keep.filler.any()):
                return None
            impl = self._attn_impl(module)
            query = keep.index.shape[1] if run.in_prefill else 1
            extra = 0 if run.in_prefill else run.steps
            if impl.startswith("flash"):
                cols = (~keep.filler).long()
                return torch.cat([cols, cols.new_ones(cols.shape[0], extra)], dim=1)
            kind = "float" if impl == "eager" else "bool"
            return build_mask(keep, query, extra, kind, run.dtype)
        if mask.dim() == 4 and run.in_prefill:
            return gather_square_mask(mask, keep)
        return gather_mask_columns(mask, keep, length)

    @staticmethod
    def _attn_impl(module: nn.Module) -> str:
        return getattr(module.self_attn.config, "_attn_implementation", None) or "eager"

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
            original_visual=run.original_visual.tolist(),
            llm_input_visual=run.visual_counts[0][1].tolist(),
            visual_per_layer=counts,
            prefill_length=lengths,
            stages=list(run.stages),
            decode_steps=run.steps,
        )


def prune(model: nn.Module, selector: TokenSelector | str, /, *, positions: str = "original", **selector_kwargs: Any) -> PruningSession:
    """Prune ``model``'s visual tokens with ``selector`` inside a ``with`` block.

    ``selector`` is a :class:`TokenSelector` instance, or a registered name plus keyword arguments
    (``fvlm.prune(model, "random", keep=64, seed=0)``).
    """
    if isinstance(selector, str):
        from fvlm.registry import create_selector

        selector = create_selector(selector, **selector_kwargs)
    elif selector_kwargs:
        raise TypeError("selector keyword arguments are only accepted with a registered selector name")
    return PruningSession(model, selector, positions=positions)
