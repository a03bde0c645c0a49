# LLaVA-1.5-7B from the Hugging Face hub on a GPU, pruned by PIO-FVLM to a layer average of 64 visual tokens.
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import fvlm

checkpoint = "llava-hf/llava-1.5-7b-hf"  # a hub id or a local folder
model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float16).to("cuda")
processor = AutoProcessor.from_pretrained(checkpoint)

question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}]
prompt = processor.apply_chat_template(question, add_generation_prompt=True)
inputs = processor(images=[Image.open("photo.jpg")], text=[prompt], return_tensors="pt").to("cuda", torch.float16)

with fvlm.prune(model, "pio_fvlm", average=64) as session, torch.no_grad():
    output = model.generate(**inputs, max_new_tokens=32, do_sample=False)

print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print(session.trace.llm_input_visual, session.trace.layer_average)
print([(stage.where, stage.budget) for stage in session.trace.stages])
# prints the answer about your picture, then:
# [576] [64.0]
# [(1, [92]), (10, [54]), (15, [22])]
