"""Fusion methods on the mixture-of-LoRA core: merges, ensembles and routers by name."""

from lorafuse.fusion.base import Ensemble, Fusion, evaluate, installed
from lorafuse.fusion.methods import FUSION_METHODS
from lorafuse.fusion.registry import REGISTRY, FusionMethod, build_fusion

__all__ = [
    "FUSION_METHODS",
    "REGISTRY",
    "Ensemble",
    "Fusion",
    "FusionMethod",
    "build_fusion",
    "evaluate",
    "installed",
]
