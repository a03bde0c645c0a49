"""Bridges to other tools. Each imports its tool only when used; see ``fvlm.integrations.lmms_eval``."""
from __future__ import annotations


def lmms_eval_manifest():
    """The ``lmms_eval.models`` entry point: registers ``--model fvlm`` (without importing lmms-eval's
    model code until lmms-eval asks for the class)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="fvlm", simple_class_path="fvlm.integrations.lmms_eval.FVLM")
