"""Training settings, validated and recorded with every adapter."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TrainConfig(BaseModel):
    """LoRA expert training. ``top_layers`` = how many of the last layers get LoRA (0 = all)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    top_layers: int = Field(6, ge=0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    seed: int = 0
    checkpoint_every: int = Field(25, ge=1)
