"""Adapters for LLaVA-1.5 and LLaVA-NeXT (CLIP-style vision tower with a CLS token)."""
from __future__ import annotations

import torch

from fvlm.adapters.base import (
    BackboneAdapter,
    ImageGrid,
    TokenGrid,
    View,
    VisionProbe,
    VisualLayout,
    _run_lengths,
)
from fvlm.errors import UnsupportedModelError
from fvlm.selectors.base import Need


class ClipTowerAdapter(BackboneAdapter):
    """Shared by the LLaVA families: a CLIP vision tower (CLS + square patch grid) and a projector.

    Views are the tower's input images (LLaVA-1.5) or crops (LLaVA-NeXT), in the tower's batch order.
    """

    vision_has_cls = True

    @property
    def _tower(self):
        tower = self.top.vision_tower
        return getattr(tower, "vision_model", tower)

    def _feature_index(self) -> int | None:
        index = self.model.config.vision_feature_layer
        if not isinstance(index, int):
            raise UnsupportedModelError("vision probes need a single vision_feature_layer")
        if index == 0:
            return None
        return (index if index > 0 else len(self._tower.encoder.layers) + 1 + index) - 1

    def vision_info(self) -> dict:
        depth = len(self._tower.encoder.layers)
        return dict(vision_layers=depth, vision_feature_layer=self._feature_index(),
                    vision_full_attention=tuple(range(depth)))

    def observe(self, store, needs, vision_layers=frozenset()):
        wants_attention = Need.VISION_ATTENTION in needs
        if not (wants_attention or Need.VISION_FEATURES in needs):
            return []

        def projector_io(module, args, output):
            store["projector_input"], store["projector_output"] = args[0], output

        hooks = [self.top.multi_modal_projector.register_forward_hook(projector_io)]
        if wants_attention:
            feature = self._feature_index()
            for index in sorted(set(vision_layers) | ({feature} if feature is not None else set())):
                def layer_input(module, args, kwargs, index=index):
                    store.setdefault("vision_inputs", {})[index] = args[0] if args else kwargs["hidden_states"]

                hooks.append(self._tower.encoder.layers[index].register_forward_pre_hook(layer_input, with_kwargs=True))
        return hooks

    def _cls_rows(self, store: dict, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS-query attention probabilities ``[V, heads, 1 + N]`` (float32) of vision layer ``index``
        and its keys ``[V, heads, 1 + N, hd]``, recomputed from the layer's input (any attention kernel)."""
        inputs = store.get("vision_inputs", {})
        if index not in inputs:
            raise UnsupportedModelError(f"{self.family}: the input of vision layer {index} was not recorded "
                                        "(declare it in the selector's vision_layers)")
        layer = self._tower.encoder.layers[index]
        attn = layer.self_attn
        normed = layer.layer_norm1(inputs[index])
        views, tokens, _ = normed.shape
        heads, hd = attn.num_heads, attn.head_dim
        q = attn.q_proj(normed[:, :1]).view(views, 1, heads, hd).transpose(1, 2)
        k = attn.k_proj(normed).view(views, tokens, heads, hd).transpose(1, 2)
        probs = (torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scale).softmax(dim=-1)
        return probs[:, :, 0], k

    def vision_probe(self, store):
        feature = self._feature_index()
        if feature is None:
            raise UnsupportedModelError(f"{self.family}: vision probes need a vision_feature_layer other than 0")
        probs, k = self._cls_rows(store, feature)
        features = store["projector_input"]
        patches = features.shape[1]  # CLS dropped by the "default" feature strategy
        if patches != probs.shape[-1] - 1:
            raise ValueError(f"vision probes expect {probs.shape[-1] - 1} patch features per image, got {patches}")
        return VisionProbe(features=features, cls_attention=probs[:, :, 1:].sum(dim=1), keys=k[:, :, 1:].mean(dim=1))

    def vision_attention(self, store, layer):
        """CLS-query attention to every patch, per head (softmax over CLS + patches; the CLS column
        is dropped and the rest is not renormalised): ``[heads, N]`` per view."""
        return list(self._cls_rows(store, layer)[0][:, :, 1:])

    def _projector(self, store: dict, key: str, view: View) -> torch.Tensor:
        if key not in store:
            raise UnsupportedModelError(f"{self.family}: projector features were not recorded (Need.VISION_FEATURES)")
        out = store[key][view.source]
        if out.shape[0] != view.rows * view.cols:
            raise UnsupportedModelError(
                f"{self.family}: {out.shape[0]} projector rows for a {view.rows} x {view.cols} view; "
                "view features need vision_feature_select_strategy='default'")
        return out

    def view_features(self, store, view, visual_hidden):
        return self._projector(store, "projector_output", view)

    def view_vision_features(self, store, view):
        return self._projector(store, "projector_input", view)

    @property
    def vision_post_norm(self):
        return self._tower.post_layernorm

    def project(self, features):
        return self.top.multi_modal_projector(features)


class LlavaAdapter(ClipTowerAdapter):
    """LLaVA-1.5 style: every image is one square grid of ``image_seq_length`` tokens."""

    family = "llava"
    model_types = ("llava",)

    def image_grids(self, input_ids, top_kwargs):
        per_image = int(self.model.config.image_seq_length)
        side = int(round(per_image**0.5))
        grids = []
        for row in self.visual_mask(input_ids).cpu():
            total = int(row.sum())
            grids.append([ImageGrid(o, per_image, side, side) for o in range(0, total, per_image)])
        return grids


class LlavaNextAdapter(ClipTowerAdapter):
    """LLaVA-NeXT (any-res): per image a base tile grid, then the high-res tiles with newline tokens."""

    family = "llava_next"
    model_types = ("llava_next",)

    def image_grids(self, input_ids, top_kwargs):
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        grids = []
        for row in self.visual_mask(input_ids).cpu():
            spans, offset = [], 0
            for length in _run_lengths(row):
                spans.append(ImageGrid(offset, length, side, side))
                offset += length
            grids.append(spans)
        return grids

    def visual_layout(self, input_ids, top_kwargs):
        """Crops and grids from the model's own packing: ``pack_image_features`` applied to a tensor
        that holds each crop patch's index (and -1 as the newline) says where every patch lands."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = top_kwargs.get("image_sizes")
        counts = self.visual_mask(input_ids).sum(dim=1).tolist()
        if sizes is None:
            if any(counts):
                raise UnsupportedModelError("llava_next: the visual layout needs the image_sizes of the prompt")
            return [VisualLayout([], [], 0) for _ in counts]
        cfg, vc = self.model.config, self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        n = side * side
        crops = [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                           patch_size=vc.image_size) for s in sizes]
        first = [sum(crops[:i]) for i in range(len(crops))]
        coded = [(torch.arange(c * n, dtype=torch.float64) + f * n).view(c, n, 1) for c, f in zip(crops, first)]
        packed, _ = self.top.pack_image_features(coded, sizes.cpu(), cfg.vision_feature_select_strategy,
                                                 image_newline=torch.tensor([-1.0], dtype=torch.float64))
        images = iter(zip(packed, crops, first))
        layouts = []
        for total in counts:
            grids, views, offset, image = [], [], 0, 0
            while offset < total:
                try:
                    values, num_crops, first_crop = next(images)
                except StopIteration:
                    raise UnsupportedModelError("llava_next: more image tokens in the prompts than packed image "
                                                "features") from None
                code = values[:, 0].long()
                pos = torch.arange(offset, offset + len(code))
                index = torch.full((num_crops * n,), -1, dtype=torch.long)
                index[code[code >= 0] - first_crop * n] = pos[code >= 0]
                views += [View(first_crop + c, image, index[c * n:(c + 1) * n].view(side, side)) for c in range(num_crops)]
                grids.append(TokenGrid(pos[:n].view(side, side)))
                rest, rest_code = pos[n:], code[n:]
                rows = int((rest_code < 0).sum())
                cols = (len(rest) - rows) // rows if rows else 0
                if cols:
                    table = rest.view(rows, cols + 1)
                    grids.append(TokenGrid(table[:, :cols], table[:, cols]))
                offset += len(code)
                image += 1
            if offset != total:
                raise UnsupportedModelError(f"llava_next: a sample has {total} image tokens, the packed images {offset}")
            layouts.append(VisualLayout(grids, views, total))
        return layouts
