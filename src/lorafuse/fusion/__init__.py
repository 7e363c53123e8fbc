"""Fusion methods on the mixture-of-LoRA core: merges, ensembles and routers by name."""

from lorafuse.fusion.base import Ensemble, Fusion, evaluate, installed
from lorafuse.fusion.methods import FUSION_METHODS, FusionMethod, build_fusion

__all__ = [
    "FUSION_METHODS",
    "Ensemble",
    "Fusion",
    "FusionMethod",
    "build_fusion",
    "evaluate",
    "installed",
]
