"""Stage 2 of xmei (the LQ-Former + LoRA Qwen model, training, generation, evaluation) and the
Python API of prediction: ``from xmei import Predictor`` (xmei.predictor), imported on first use
so that ``import xmei`` and its leaves (errors, labels, config) stay cheap."""
from __future__ import annotations

__all__ = ["Prediction", "Predictor"]


def __getattr__(name: str):
    if name in __all__:
        from xmei import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'xmei' has no attribute {name!r}")
