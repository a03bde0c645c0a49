"""Lightning integration: the pruning module, VQA data, and run callbacks (``fvlm run`` builds on these)."""
from __future__ import annotations

from fvlm.lightning.callbacks import EfficiencyMonitor, PredictionWriter, StopOnSigterm
from fvlm.lightning.data import VQADataModule, VQADataset
from fvlm.lightning.module import BackboneSpec, FVLMModule, GenerationSpec, SelectorSpec

__all__ = [
    "BackboneSpec",
    "EfficiencyMonitor",
    "FVLMModule",
    "GenerationSpec",
    "PredictionWriter",
    "SelectorSpec",
    "StopOnSigterm",
    "VQADataModule",
    "VQADataset",
]
