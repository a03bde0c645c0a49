"""Built-in tiny backbones: a random tiny model of a registered family plus a real processor.

Every backbone adapter provides the tiny model of its families ([`fvlm.adapters.tiny`][fvlm.adapters.tiny]);
``tiny_processor(family)`` builds, without the hub, the same processor class the real checkpoints
use around a character-level tokenizer whose special ids follow the tiny layout (0 pad, 1 bos,
2 eos, 3 image, 4 video, 5 vision start, 6 vision end) and image processors configured to the tiny
vision towers. The placeholder counts the processor writes are exactly the counts the tiny model's
vision tower produces, so ``generate`` runs on real images.

In recipes, ``backbone.path: "tiny:<family>"`` selects one of these (no download); generated
text is gibberish (random weights) but every code path of a real run is exercised.
"""
from __future__ import annotations

from fvlm.adapters import tiny
from fvlm.adapters.tiny import tiny_tokenizer  # noqa: F401  (used by tests and docs)
from fvlm.processors import image_only_class, load_processor_without_video  # noqa: F401

TINY_PREFIX = "tiny:"


def families() -> list[str]:
    """Families with a built-in tiny backbone (model and processor)."""
    return [name for name, spec in tiny.specs().items() if spec.has_processor]


def parse_tiny(path: str) -> str | None:
    """The family of a ``"tiny:<family>"`` backbone path, or ``None`` for any other path."""
    if not path.startswith(TINY_PREFIX):
        return None
    family = path[len(TINY_PREFIX):]
    if family not in families():
        raise ValueError(f"unknown tiny backbone {path!r}; expected one of "
                         f"{', '.join(TINY_PREFIX + f for f in families())}")
    return family


def tiny_processor(family: str):
    """The processor matching ``fvlm.adapters.tiny.tiny_model(family)``, built without the hub."""
    if family not in families():
        raise ValueError(f"unknown family {family!r}; expected one of {tuple(families())}")
    spec = tiny.spec_for(family)
    return spec.processor(tiny_tokenizer(family))


def tiny_backbone(family: str, attn_implementation: str = "sdpa", dtype=None, seed: int = 0,
                  num_layers: int = tiny.NUM_LAYERS):
    """``(model, processor)`` for a built-in tiny backbone."""
    import torch

    model = tiny.tiny_model(family, attn_implementation=attn_implementation, seed=seed,
                            dtype=dtype or torch.float32, num_layers=num_layers)
    return model, tiny_processor(family)
