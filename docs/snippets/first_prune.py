# Prune a built-in tiny LLaVA (random weights, no download) and read the trace.
import torch

import fvlm
from fvlm.testing import tiny_inputs, tiny_model

model = tiny_model("llava")  # a real LlavaForConditionalGeneration, built from config
inputs = tiny_inputs(model, images_per_prompt=(1, 2))  # 2 prompts, 1 and 2 images, left padding

with fvlm.prune(model, "random", keep=8, seed=0) as session, torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=4)

print(session.trace)
assert session.trace.original_visual == [16, 32]  # 16 visual tokens per image
assert session.trace.llm_input_visual == [8, 8]  # the same budget for every sample
