"""What a selector may look at during one stage, computed lazily and cached."""
from __future__ import annotations

import copy
from functools import cached_property
from typing import Any, Callable

import torch

from fvlm.adapters.base import BackboneAdapter, images_per_row
from fvlm.errors import FVLMError
from fvlm.indexing import gather_rows
from fvlm.metrics.flops import value_mixing_pays
from fvlm.selectors.base import TokenSelector
from fvlm.types import ImageGrid, ModelInfo, Need, Stage, View, VisionObservation, VisionProbe, VisualLayout

__all__ = ["SelectionContext", "gather_rows", "positions_of"]


class SelectionContext:
    """Read-only view of the model state at one pruning stage.

    Tensors are batched: ``hidden`` is ``[B, L, D]`` (the current, possibly already pruned,
    sequence); visual tokens are listed per sample in ``visual_index`` (``[B, N]`` positions into the
    sequence, ``-1`` padded, ``visual_valid`` marks real entries). Probes beyond the hidden states
    (attention rows, keys, gradients, decoder layers, grids) must be declared in the selector's
    ``needs``; each use is recorded in ``used``.
    """

    def __init__(
        self,
        *,
        selector: TokenSelector,
        stage: Stage,
        stage_index: int,
        info: ModelInfo,
        adapter: BackboneAdapter,
        hidden: torch.Tensor,
        is_visual: torch.Tensor,
        token_valid: torch.Tensor,
        budget: torch.Tensor,
        grids: list[list[ImageGrid]] | None = None,
        layer_input: torch.Tensor | None = None,
        layer_kwargs: dict[str, Any] | None = None,
        observed: VisionObservation | None = None,
        original_visual: torch.Tensor | None = None,
        layout: list[VisualLayout] | None = None,
        instructions: list[str] | None = None,
        auxiliary: dict[str, torch.nn.Module] | None = None,
        notes: list[str] | None = None,
    ):
        self.selector = selector
        self.stage = stage
        self.stage_index = stage_index
        self.info = info
        self.adapter = adapter
        self.hidden = hidden
        self.is_visual = is_visual
        self.token_valid = token_valid
        self.budget = budget
        self._original_visual = original_visual
        self.used: set[Need] = set()
        self._grids = grids
        self._layer_input = layer_input
        self._layer_kwargs = layer_kwargs or {}
        self._observed = observed or VisionObservation()
        self._layout = layout
        self._instructions = instructions
        self._auxiliary = auxiliary or {}
        self._vision_attention: dict[int, list[torch.Tensor]] = {}
        self.notes = notes if notes is not None else []

    # -- always available ------------------------------------------------------------------
    @property
    def layer(self) -> int | None:
        """Number of decoder layers already applied (``None`` before the LLM)."""
        return self.stage.where if isinstance(self.stage.where, int) else None

    @cached_property
    def visual_index(self) -> torch.Tensor:
        return positions_of(self.is_visual)[0]

    @cached_property
    def visual_valid(self) -> torch.Tensor:
        return positions_of(self.is_visual)[1]

    @cached_property
    def num_visual(self) -> torch.Tensor:
        return self.is_visual.sum(dim=1)

    @property
    def original_visual(self) -> torch.Tensor:
        """``[B]`` visual tokens of each sample before any stage (fractions of ``Stage.keep`` refer to it)."""
        return self.num_visual if self._original_visual is None else self._original_visual

    @property
    def images(self) -> torch.Tensor:
        """``[B]`` images in each sample's prompt."""
        grids = self._grids or [[] for _ in range(self.hidden.shape[0])]
        return torch.tensor([len(g) for g in grids], dtype=torch.long, device=self.hidden.device)

    @cached_property
    def visual_hidden(self) -> torch.Tensor:
        """``[B, N, D]`` hidden states of the visual tokens (zeros in padding slots)."""
        return gather_rows(self.hidden, self.visual_index)

    @cached_property
    def last_index(self) -> torch.Tensor:
        """``[B]`` position of each sample's last real token (the last prompt token)."""
        seq = torch.arange(self.token_valid.shape[1], device=self.token_valid.device)
        return torch.where(self.token_valid, seq, -1).amax(dim=1)

    def for_selector(self, selector: TokenSelector) -> "SelectionContext":
        """A view of this context for one part of a composed selector (its own needs are checked)."""
        view = copy.copy(self)
        view.selector = selector
        return view

    def note(self, text: str) -> None:
        """Record a remark on this stage (e.g. a fallback taken) in the session's trace."""
        self.notes.append(text)

    def auxiliary(self, name: str) -> torch.nn.Module:
        """The auxiliary model ``name`` the selector declared in ``auxiliary_models()``, loaded."""
        if name not in {spec.name for spec in self.selector.auxiliary_models()} or name not in self._auxiliary:
            raise FVLMError(f"selector {type(self.selector).__name__} uses auxiliary model {name!r} but does not "
                            "declare it in auxiliary_models()")
        return self._auxiliary[name]

    # -- declared probes -------------------------------------------------------------------
    def _use(self, need: Need) -> None:
        if need not in self.selector.needs:
            raise FVLMError(
                f"selector {type(self.selector).__name__} uses {need.value!r} but does not declare "
                f"Need.{need.name} in its `needs`"
            )
        self.used.add(need)

    def _require_layer(self, what: str) -> int:
        if self.layer is None or self._layer_input is None:
            raise FVLMError(f"{what} is only available at stages inside the LLM (after a decoder layer)")
        return self.layer - 1

    @cached_property
    def text_valid(self) -> torch.Tensor:
        """``[B, L]`` bool: real (non-padding) text tokens of the prompt."""
        self._use(Need.TEXT)
        return self.token_valid & ~self.is_visual

    @cached_property
    def text_after_visual(self) -> torch.Tensor:
        """``[B, L]`` bool: text tokens that come after the sample's first visual token."""
        self._use(Need.TEXT)
        after = self.is_visual.long().cumsum(dim=1) > 0
        return self.token_valid & ~self.is_visual & after

    def attention(self, rows: torch.Tensor | None = None, *, layer: str = "current", rotary: bool = True) -> torch.Tensor:
        """Attention probabilities ``[B, H, Q, N]`` from query ``rows`` to the visual tokens.

        Rows default to each sample's last prompt token. Recomputed from the q/k projections of the
        layer that just ran (``layer="current"``, on its input) or of the next layer
        (``layer="next"``, on the current hidden states: what that layer will attend to), so it
        works under SDPA / FlashAttention. ``rotary=False`` leaves out the rotary embedding.
        """
        self._use(Need.ATTENTION)
        probs = self.attention_to_all(rows, _checked=True, layer=layer, rotary=rotary)
        index = self.visual_index.clamp(min=0)[:, None, None, :].expand(*probs.shape[:3], -1)
        return probs.gather(3, index) * self.visual_valid[:, None, None, :]

    def attention_to_all(self, rows: torch.Tensor | None = None, _checked: bool = False, *, layer: str = "current",
                         rotary: bool = True) -> torch.Tensor:
        """Attention probabilities ``[B, H, Q, L]`` from query ``rows`` to every position (see [`attention`][fvlm.context.SelectionContext.attention])."""
        if not _checked:
            self._use(Need.ATTENTION)
        if layer not in ("current", "next"):
            raise ValueError(f"layer must be 'current' or 'next', got {layer!r}")
        index = self._require_layer("attention")
        hidden_in = self._layer_input
        if layer == "next":
            index, hidden_in = index + 1, self.hidden
        rows = self.last_index[:, None] if rows is None else rows
        options = {} if rotary else {"rotary": False}
        return self.adapter.attention_rows(
            index, hidden_in, self._layer_kwargs["position_embeddings"], self.token_valid, rows, **options
        )

    def rope_bias(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, Q, N]``: the pruning layer's rotary embedding applied to all-ones queries (at ``rows``)
        and keys (at the visual tokens), their dot product over ``sqrt(head_dim)``.

        This is the purely positional part of an attention logit (SparseVLM+ divides attention by
        it, its "gravity"); the current position ids apply (original or compact).
        """
        self._use(Need.ATTENTION)
        layer = self._require_layer("rope_bias")
        bias = self.adapter.rotary_bias(layer, self._layer_kwargs["position_embeddings"], rows)
        index = self.visual_index.clamp(min=0)[:, None, :].expand(-1, bias.shape[1], -1)
        return bias.gather(2, index) * self.visual_valid[:, None, :]

    def keys(self) -> torch.Tensor:
        """Post-rotary keys ``[B, H_kv, L, head_dim]`` of the pruning layer."""
        self._use(Need.KEYS)
        layer = self._require_layer("keys")
        return self.adapter.key_states(layer, self._layer_input, self._layer_kwargs["position_embeddings"])

    @property
    def grids(self) -> list[list[ImageGrid]]:
        """Per sample, the images among its *original* visual tokens and their patch grids."""
        self._use(Need.GRID)
        return self._grids or []

    @property
    def instructions(self) -> list[str]:
        """The instruction text of every sample (one string per batch row)."""
        self._use(Need.INSTRUCTION)
        if self._instructions is None:
            raise FVLMError(f"selector {type(self.selector).__name__} needs instructions: "
                            "fvlm.prune(model, selector, instructions=[...])")
        return self._instructions

    @property
    def layout(self) -> list[VisualLayout]:
        """Per sample, the grids the LLM sees and the vision tower's views of its *original* visual tokens."""
        self._use(Need.GRID)
        if self._layout is None:
            raise FVLMError("no visual layout was recorded for this call")
        return self._layout

    def _check_before_pruning(self, what: str) -> None:
        if self.stage.where not in ("vision", "input") or self._layout is None or any(
                int(n) != lay.num_visual for n, lay in zip(self.num_visual.tolist(), self._layout)):
            raise FVLMError(f"{what} are only available before any visual token is pruned (a 'vision' or "
                            "'input' stage that comes first)")

    def vision_attention(self, layer: int) -> list[torch.Tensor]:
        """Per view (``View.source`` order), per-head attention scores ``[heads, N]`` of vision layer
        ``layer``, recomputed from the layer's input (any attention kernel); what the score is
        depends on the family ([`fvlm.adapters.base.BackboneAdapter.vision_attention`][fvlm.adapters.base.BackboneAdapter.vision_attention]). The
        layer must be in the selector's ``vision_layers(info)``."""
        self._use(Need.VISION_ATTENTION)
        if layer not in self.selector.vision_layers(self.info):
            raise FVLMError(f"selector {type(self.selector).__name__} reads vision layer {layer} but does not "
                            "list it in vision_layers(info)")
        if layer not in self._vision_attention:
            self._vision_attention[layer] = self.adapter.vision_attention(self._observed, layer)
        return self._vision_attention[layer]

    def view_features(self, b: int, view: View) -> torch.Tensor:
        """LLM-space features ``[rows * cols, D]`` of every patch of ``view`` of sample ``b`` (raster
        order), including patches that never reach the LLM (LLaVA-NeXT crops cut by the unpadding)."""
        self._use(Need.VISION_FEATURES)
        self._check_before_pruning("view features")
        return self.adapter.view_features(self._observed, view, self.visual_hidden[b])

    def view_vision_features(self, view: View) -> torch.Tensor:
        """Vision-tower features ``[rows * cols, Dv]`` of ``view`` before the projector."""
        self._use(Need.VISION_FEATURES)
        self._check_before_pruning("view features")
        return self.adapter.view_vision_features(self._observed, view)

    @property
    def vision_post_norm(self) -> torch.nn.Module:
        """The vision tower's final norm (CLIP's ``post_layernorm``)."""
        self._use(Need.VISION_FEATURES)
        return self.adapter.vision_post_norm

    @cached_property
    def vision(self) -> VisionProbe:
        """Vision-tower view per sample, aligned with ``visual_index``: ``features`` ``[B, N, Dv]``
        (pre-projector), ``cls_attention`` ``[B, N]``, ``keys`` ``[B, N, dk]``, and per image
        ``cls_features`` ``[B, I, Dv]`` (zeros past a sample's images). Only at ``"vision"`` stages
        (before anything is pruned)."""
        self._use(Need.VISION_ATTENTION)
        if self.stage.where != "vision":
            raise FVLMError("vision-tower probes are only available at a 'vision' stage")
        probe = self.adapter.vision_probe(self._observed)
        images, per_image = probe.features.shape[:2]
        rows = images_per_row([per_image] * images, self.num_visual.tolist())  # beams repeat prompts

        def per_sample(t: torch.Tensor) -> torch.Tensor:
            parts = [t[picked].reshape(-1, *t.shape[2:]) for picked in rows]
            return torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)[:, : self.visual_index.shape[1]]

        cls = probe.cls_features
        if cls is not None:
            cls = torch.nn.utils.rnn.pad_sequence([cls[picked] for picked in rows], batch_first=True)
        return VisionProbe(per_sample(probe.features), per_sample(probe.cls_attention), per_sample(probe.keys), cls)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Map vision features (``[..., Dv]``) to LLM input embeddings with the model's projector."""
        self._use(Need.VISION_ATTENTION)
        return self.adapter.project(features)

    def run_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run decoder layer ``index`` on ``hidden`` (current sequence), causally, without a cache."""
        self._use(Need.LAYERS)
        self._require_layer("run_layer")
        return self.adapter.run_layer(index, hidden, self._layer_kwargs)

    def run_layer_rows(self, index: int, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Output ``[B, Q, D]`` of decoder layer ``index`` at ``rows`` (``[B, Q]`` positions) only.

        Equals ``run_layer(index, hidden)`` gathered at ``rows`` (same positions, causal + padding
        mask, no cache), but computes queries, attention output and MLP for the ``Q`` rows only
        (keys and values for all rows): see [`fvlm.adapters.base.BackboneAdapter.rows_forward`][fvlm.adapters.base.BackboneAdapter.rows_forward].
        Values are mixed from the inputs where that costs fewer FLOPs
        ([`fvlm.metrics.flops.value_mixing_pays`][fvlm.metrics.flops.value_mixing_pays]).
        """
        self._use(Need.LAYERS)
        self._require_layer("run_layer_rows")
        return self.adapter.rows_forward(
            index, hidden, self._layer_kwargs["position_embeddings"], self.token_valid, rows,
            value_mixing=value_mixing_pays,
        )

    @property
    def final_norm(self) -> torch.nn.Module:
        self._use(Need.LAYERS)
        return self.adapter.final_norm

    @property
    def lm_head(self) -> torch.nn.Module:
        self._use(Need.LAYERS)
        return self.adapter.lm_head

    @property
    def input_embeddings(self) -> torch.nn.Module:
        """The language model's token-embedding module (``weight`` ``[V, D]``)."""
        self._use(Need.LAYERS)
        return self.adapter.input_embeddings

    def grad(self, objective: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``d objective(X) / dX`` at ``X = hidden`` (a detached leaf; model weights get no gradient).

        The backward computes input gradients only: ``torch.autograd.grad`` with ``inputs=[X]``
        never accumulates into ``.grad`` and only runs the graph nodes on a path from the loss to
        ``X``, so the weight-gradient matmuls of every linear layer (``dL/dW = g^T x``) are skipped
        even though the parameters have ``requires_grad=True``; what remains is the activation
        gradient ``g W`` per layer, the same order of cost as the forward.
        """
        self._use(Need.GRADIENT)  # the session refuses inference mode for gradient selectors
        with torch.enable_grad():
            leaf = self.hidden.detach().clone().requires_grad_(True)
            loss = objective(leaf)
            (grad,) = torch.autograd.grad(loss, leaf)
        return grad


def positions_of(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries per row: ``([B, N] padded with -1, [B, N] valid)``."""
    bsz, seq = mask.shape
    counts = mask.sum(dim=1)
    width = int(counts.max()) if bsz else 0
    ar = torch.arange(seq, device=mask.device)
    order = torch.where(mask, ar, ar + seq).sort(dim=1).values[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, -1), valid
