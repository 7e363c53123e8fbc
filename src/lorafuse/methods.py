"""Every fusion method the application offers, by name: each layer's own table, joined here
(above both ``fusion`` and ``elrea``) into the one registry ``fusion.registry.REGISTRY``.

Import this module before building methods by name (``build_fusion``), listing them
(``lorafuse methods``) or comparing them (``compare``).
"""

from __future__ import annotations

from lorafuse.elrea.methods import ELREA_METHODS
from lorafuse.fusion.methods import FUSION_METHODS, RECENT_MERGES, STATIC_MERGES
from lorafuse.fusion.registry import REGISTRY, FusionMethod, build_fusion, register_fusion

register_fusion(FUSION_METHODS.values())
register_fusion(ELREA_METHODS.values())

METHODS: dict[str, FusionMethod] = REGISTRY  # the one registry, now complete

__all__ = ["METHODS", "RECENT_MERGES", "STATIC_MERGES", "FusionMethod", "build_fusion"]
