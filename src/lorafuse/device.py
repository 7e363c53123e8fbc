"""Which torch device a command runs on: ``--device`` / ``$LORAFUSE_DEVICE``, else CUDA
when present, else the CPU. Every tensor is then made on (or moved to) the model's device.
"""

from __future__ import annotations

import os

import torch

from lorafuse.errors import LorafuseError

DEVICE_ENV = "LORAFUSE_DEVICE"


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's parameters are (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """``None`` -> ``$LORAFUSE_DEVICE`` or ``auto``; ``auto`` -> ``cuda`` if present, else
    ``cpu``; anything else is a torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or os.environ.get(DEVICE_ENV) or "auto").strip()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise LorafuseError(
            f"--device: unknown device {spec!r} (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LorafuseError(f"--device {spec}: CUDA is not available to this torch build")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise LorafuseError(f"--device {spec}: only {torch.cuda.device_count()} GPUs")
    return device
