# Several stages in one schedule: a vision-side stage, then a stage inside the LLM.
import torch

import fvlm
from fvlm.testing import tiny_inputs, tiny_model

model = tiny_model("llava")
inputs = tiny_inputs(model, images_per_prompt=(1, 1))
selector = fvlm.create_selector("compose", selectors=[
    {"name": "vscan_encoder", "args": {"keep": 8, "local_layer": 0, "window": 2}},  # 16 -> 8 before the LLM
    {"name": "random", "args": {"keep": 4, "layer": 2, "seed": 0}},  # 8 -> 4 after 2 layers
])
with fvlm.prune(model, selector) as session, torch.no_grad():
    model.generate(**inputs, max_new_tokens=3)

assert session.trace.llm_input_visual == [8, 8]
assert session.trace.visual_per_layer[0] == [8, 8, 4, 4]
