# A FastV-like selector in a few lines: score visual tokens by the attention the last prompt
# token pays them in the layer just before the pruning point, keep the top ones.
import torch

import fvlm
from fvlm import Need, ScoreSelector, Stage
from fvlm.selectors.arguments import check_int, check_keep
from fvlm.testing import tiny_inputs, tiny_model


class LastTokenAttention(ScoreSelector):
    """Keeps the visual tokens the last prompt token attends to most, after `layer` layers."""

    needs = frozenset({Need.ATTENTION})  # declare every probe you read

    def __init__(self, keep: int | float = 0.5, layer: int = 2):  # the typed signature is the config
        self.keep = check_keep(self, keep)  # an int count >= 1 or a fraction in (0, 1]
        self.layer = check_int(self, layer, "layer", minimum=1)

    def stages(self, info):
        return [Stage(self.layer, self.keep)]  # prune once, after `layer` decoder layers

    def score(self, ctx):
        # [B, heads, 1 query row, N visual tokens], recomputed from the layer's own q/k,
        # so this works with SDPA or FlashAttention; average over heads.
        return ctx.attention().mean(dim=1)[:, 0]


model = tiny_model("qwen2_vl")
inputs = tiny_inputs(model, images_per_prompt=(1, 2))
with fvlm.prune(model, LastTokenAttention(keep=6, layer=2)) as session, torch.no_grad():
    model.generate(**inputs, max_new_tokens=3)

# Layers 0-1 saw every visual token, layers 2-3 see 6: the layer average is (2*16 + 2*6) / 4.
assert session.trace.visual_per_layer[0] == [16, 16, 6, 6]
assert session.trace.layer_average[0] == 11.0
