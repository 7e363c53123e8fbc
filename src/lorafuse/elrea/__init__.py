"""ELREA: ensembles of low-rank expert adapters (gradient features of a base adapter)."""

from lorafuse.elrea.features import estimate_second_moment, gradient_features
from lorafuse.elrea.lora_grads import (
    TARGETS,
    LoraLinear,
    lora_linears,
    per_example_lora_grads,
    per_example_lora_grads_loop,
)
from lorafuse.elrea.projection import (
    adam_normalise,
    project,
    projection_block,
    second_moment_vector,
)

__all__ = [
    "TARGETS",
    "LoraLinear",
    "adam_normalise",
    "estimate_second_moment",
    "gradient_features",
    "lora_linears",
    "per_example_lora_grads",
    "per_example_lora_grads_loop",
    "project",
    "projection_block",
    "second_moment_vector",
]
