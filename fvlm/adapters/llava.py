"""Adapters for LLaVA-1.5 and LLaVA-NeXT (CLIP-style vision tower with a CLS token)."""
from __future__ import annotations

import torch

from fvlm.adapters.base import BackboneAdapter, ImageGrid, VisionProbe, _run_lengths
from fvlm.selectors.base import Need


class LlavaAdapter(BackboneAdapter):
    """LLaVA-1.5 style: every image is one square grid of ``image_seq_length`` tokens."""

    family = "llava"
    model_types = ("llava",)
    vision_has_cls = True

    def image_grids(self, input_ids, top_kwargs):
        per_image = int(self.model.config.image_seq_length)
        side = int(round(per_image**0.5))
        grids = []
        for row in self.visual_mask(input_ids).cpu():
            total = int(row.sum())
            grids.append([ImageGrid(o, per_image, side, side) for o in range(0, total, per_image)])
        return grids


    def _feature_layer(self):
        tower = self.top.vision_tower
        encoder_layers = getattr(tower, "vision_model", tower).encoder.layers
        index = self.model.config.vision_feature_layer
        if not isinstance(index, int):
            raise ValueError("vision probes need a single vision_feature_layer")
        return encoder_layers[index if index < 0 else index - 1] if index != 0 else None

    def observe(self, store, needs):
        if Need.VISION_ATTENTION not in needs:
            return []

        def layer_input(module, args, kwargs):
            store["vision_layer_input"] = args[0] if args else kwargs["hidden_states"]

        def layer_output(module, args, output):
            store["vision_cls"] = (output[0] if isinstance(output, tuple) else output)[:, 0]

        def projector_input(module, args):
            store["projector_input"] = args[0]

        layer = self._feature_layer()
        return [
            layer.register_forward_pre_hook(layer_input, with_kwargs=True),
            layer.register_forward_hook(layer_output),
            self.top.multi_modal_projector.register_forward_pre_hook(projector_input),
        ]

    def vision_probe(self, store):
        layer = self._feature_layer()
        attn = layer.self_attn
        x = store["vision_layer_input"]
        normed = layer.layer_norm1(x)
        n, t, _ = normed.shape
        heads, hd = attn.num_heads, attn.head_dim
        q = attn.q_proj(normed[:, :1]).view(n, 1, heads, hd).transpose(1, 2)
        k = attn.k_proj(normed).view(n, t, heads, hd).transpose(1, 2)
        probs = (torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scale).softmax(dim=-1)
        features = store["projector_input"]
        patches = features.shape[1]  # CLS dropped by the "default" feature strategy
        if patches != t - 1:
            raise ValueError(f"vision probes expect {t - 1} patch features per image, got {patches}")
        return VisionProbe(
            features=features,
            cls_attention=probs[:, :, 0, 1:].sum(dim=1),
            keys=k[:, :, 1:].mean(dim=1),
            cls_features=store.get("vision_cls"),
        )

    def project(self, features):
        return self.top.multi_modal_projector(features)


class LlavaNextAdapter(BackboneAdapter):
    """LLaVA-NeXT (any-res): per image a base tile grid, then the high-res tiles with newline tokens."""

    family = "llava_next"
    model_types = ("llava_next",)
    vision_has_cls = True

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
