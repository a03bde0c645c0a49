import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI cores may be shared


@pytest.fixture(scope="session")
def model_cache():
    """Tiny models are cheap but not free: build each (family, attention, depth) once per run."""
    from fvlm.testing import tiny_model

    cache = {}

    def get(family, attn="sdpa", num_layers=4):
        key = (family, attn, num_layers)
        if key not in cache:
            cache[key] = tiny_model(family, attn_implementation=attn, num_layers=num_layers)
        return cache[key]

    return get
