"""Adapter for Qwen3-VL: Qwen2-VL's M-RoPE and merged patch grids, per-head q/k norms in every
decoder layer, and DeepStack (vision features added to the visual positions after the first
decoder layers)."""
from __future__ import annotations

import torch

from fvlm.adapters import tiny
from fvlm.adapters.base import LayerInjections
from fvlm.adapters.qwen2_vl import Qwen2VLAdapter, TinyQwen2VL


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL. DeepStack's additions index the unpruned sequence, so the adapter takes them out of
    the language model's call and the session adds each visual token's rows to wherever the token is
    after pruning ([`take_injections`][fvlm.adapters.qwen3_vl.Qwen3VLAdapter.take_injections]): a stage may prune before the last DeepStack layer."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    about = dict(name="Qwen3-VL", classes={"qwen3_vl": "Qwen3VLForConditionalGeneration"},
                 checkpoints={"qwen3_vl": "Qwen/Qwen3-VL-8B-Instruct"},
                 vision="no CLS token: CLS-based vision selectors do not apply")

    def take_injections(self, lm_kwargs):
        rows = lm_kwargs.pop("deepstack_visual_embeds", None)
        where = lm_kwargs.pop("visual_pos_masks", None)
        if rows is None or where is None:
            return None
        where = where.to(torch.bool)
        source = torch.full(where.shape, -1, dtype=torch.long, device=where.device)
        source[where] = torch.arange(int(where.sum()), device=where.device)
        return LayerInjections(list(rows), source)


class TinyQwen3VL(TinyQwen2VL):
    """As Qwen2-VL (same grids and token counts); text layers with q/k norms, and DeepStack features
    from vision blocks 0 and 1 added after decoder layers 0 and 1."""

    model_type, model_class = "qwen3_vl", "Qwen3VLForConditionalGeneration"

    def config(self, num_layers=tiny.NUM_LAYERS):
        from transformers import Qwen3VLConfig

        vision = dict(self.vision, hidden_size=32, intermediate_size=64, out_hidden_size=tiny.TEXT["hidden_size"],
                      num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
        text = tiny.mrope_text(num_layers, head_dim=tiny.TEXT["hidden_size"] // tiny.TEXT["num_attention_heads"])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **self.ids)

    def processor(self, tokenizer):
        from transformers import Qwen2VLImageProcessorPil, Qwen3VLProcessor

        return self._processor(Qwen3VLProcessor, Qwen2VLImageProcessorPil, tokenizer)


Qwen3VLAdapter.tiny = {"qwen3_vl": TinyQwen3VL()}
