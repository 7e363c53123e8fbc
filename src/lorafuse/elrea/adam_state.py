"""The base adapter's Adam state, for step 2 of an ELREA feature (Adam normalisation).

ELREA (its eq. 5, after LESS, Xia et al. 2024) normalises an example's gradient ``g`` by
Adam's update direction, as if ``g`` were the next step's gradient:

    m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2,   t = step + 1
    feature = (m' / (1 - b1^t)) / (sqrt(v' / (1 - b2^t)) + eps)

with ``m`` / ``v`` the optimizer's ``exp_avg`` / ``exp_avg_sq`` after ``step`` steps. That
needs the optimizer state, which adapters are usually saved without; then only the second
moment is used, ``g / (sqrt(v) + eps)``, with ``v`` given or estimated
(:func:`~lorafuse.elrea.features.estimate_second_moment`). :class:`AdamMoments` says which.

An adapter's optimizer state is read from ``optimizer_state.safetensors`` in its folder
(:func:`save_adam_state` writes it, e.g. from :func:`optimizer_moments` after training).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorafuse.elrea.lora_grads import _canonical
from lorafuse.errors import LorafuseError
from lorafuse.io import atomic_path

OPTIMIZER_FILE = "optimizer_state.safetensors"
BETAS = (0.9, 0.999)  # torch's Adam / AdamW defaults, when a state does not say


@dataclass(frozen=True)
class AdamMoments:
    """Adam's moments per LoRA weight (canonical names as in ``adapter_model.safetensors``).

    ``m is None``: second moment only (``normalisation == "second_moment"``); else both
    (``"adam_update"``), with the optimizer's ``step`` count and ``betas``."""

    v: dict[str, torch.Tensor]
    m: dict[str, torch.Tensor] | None = None
    step: int = 0
    betas: tuple[float, float] = BETAS

    @property
    def normalisation(self) -> str:
        return "second_moment" if self.m is None else "adam_update"

    def digest(self) -> str:
        """A hash of everything the features depend on (the moments, step and betas)."""
        text = _tensors_digest(self.v)
        if self.m is not None:
            text += f"|m:{_tensors_digest(self.m)}|step:{self.step}|betas:{list(self.betas)}"
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def _tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    return "".join(
        f"{k}:{hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]}"
        for k, t in sorted(tensors.items())
    )


def adam_moments(
    adam_state: AdamMoments | Mapping[str, torch.Tensor | Mapping] | None,
) -> AdamMoments | None:
    """The moments of an ``adam_state`` argument: weight name -> ``exp_avg_sq`` tensor, or ->
    an optimizer's per-parameter state (``exp_avg_sq``, and ``exp_avg`` with ``step``).

    The first moment is used only when every weight's state has ``exp_avg`` and ``step``
    (one step count); otherwise the second moment alone."""
    if adam_state is None or isinstance(adam_state, AdamMoments):
        return adam_state
    states = {_canonical(k): s for k, s in adam_state.items()}
    v = {k: (s.get("exp_avg_sq") if isinstance(s, Mapping) else s) for k, s in states.items()}
    bad = [k for k, t in v.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise LorafuseError(f"adam_state has no exp_avg_sq tensor for {bad[0]}")
    full = all(
        isinstance(s, Mapping)
        and isinstance(s.get("exp_avg"), torch.Tensor)
        and s["exp_avg"].numel() == v[k].numel()
        and "step" in s
        for k, s in states.items()
    )
    if not full:
        return AdamMoments(v)
    steps = {int(torch.as_tensor(s["step"]).item()) for s in states.values()}
    if len(steps) != 1:
        raise LorafuseError(f"adam_state has different step counts {sorted(steps)}")
    m = {k: s["exp_avg"] for k, s in states.items()}
    return AdamMoments(v, m, steps.pop())


def optimizer_moments(optimizer: torch.optim.Optimizer, model: nn.Module) -> AdamMoments:
    """Both moments of a torch Adam / AdamW after training ``model``'s LoRA weights."""
    states: dict[str, dict] = {}
    betas = BETAS
    for name, p in model.named_parameters():
        if "lora_" in name and p in optimizer.state:
            states[name] = optimizer.state[p]
    for group in optimizer.param_groups:
        betas = tuple(group.get("betas", betas))  # type: ignore[assignment]
    moments = adam_moments(states)
    if moments is None or moments.m is None:
        raise LorafuseError("the optimizer holds no Adam state (exp_avg, exp_avg_sq, step)")
    return AdamMoments(moments.v, moments.m, moments.step, (float(betas[0]), float(betas[1])))


def save_adam_state(adapter_dir: str | Path, moments: AdamMoments) -> Path:
    """Write ``moments`` (both) next to an adapter's weights, atomically."""
    if moments.m is None:
        raise ValueError("save_adam_state needs both moments")
    tensors = {f"{k}.exp_avg_sq": t for k, t in moments.v.items()}
    tensors |= {f"{k}.exp_avg": t for k, t in moments.m.items()}
    meta = {
        "step": str(moments.step),
        "beta1": str(moments.betas[0]),
        "beta2": str(moments.betas[1]),
    }
    file = Path(adapter_dir) / OPTIMIZER_FILE
    with atomic_path(file) as tmp:
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tmp), meta)
    return file


def load_adam_state(adapter_dir: str | Path) -> AdamMoments | None:
    """The adapter's saved optimizer state, or None when it has none."""
    file = Path(adapter_dir) / OPTIMIZER_FILE
    if not file.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(file), "pt") as fh:
        meta = fh.metadata() or {}
    tensors = load_file(str(file))
    v = {k[: -len(".exp_avg_sq")]: t for k, t in tensors.items() if k.endswith(".exp_avg_sq")}
    m = {k[: -len(".exp_avg")]: t for k, t in tensors.items() if k.endswith(".exp_avg")}
    if not v or set(v) != set(m) or "step" not in meta:
        raise LorafuseError(f"{file}: not an Adam state (exp_avg and exp_avg_sq per weight, step)")
    betas = (float(meta.get("beta1", BETAS[0])), float(meta.get("beta2", BETAS[1])))
    return AdamMoments(v, m, int(meta["step"]), betas)


__all__ = [
    "OPTIMIZER_FILE",
    "AdamMoments",
    "adam_moments",
    "load_adam_state",
    "optimizer_moments",
    "save_adam_state",
]
