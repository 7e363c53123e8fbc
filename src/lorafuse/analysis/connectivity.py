"""Linear mode connectivity of two experts: loss along ``(1-α) θ_a + α θ_b``.

Two paths, as the Trade-offs paper compares them:

* ``"delta"``: full-rank interpolation of the deltas, ``(1-α) ΔW_a + α ΔW_b`` (the mixture core
  with constant weights; exact, no merged weight formed);
* ``"factors"``: interpolation of the LoRA factors, ``((1-α) B_a + α B_b)((1-α) A_a + α A_b)``
  (what averaging adapters' parameters does; needs equal ranks and scalings), which is not
  the same model between the ends because of the cross-terms.

At α = 0 and α = 1 both are exactly the experts. Losses are per task (each expert's own task
and the union); the oracle line sends each input to its own expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lorafuse.core.encode import Encoded
from lorafuse.core.mixture import ConstantMixer, FactorSet, FactorSource
from lorafuse.core.states import StateCache
from lorafuse.errors import LorafuseError
from lorafuse.eval.report import save_png
from lorafuse.fusion.base import Fusion, evaluate
from lorafuse.library import LoraFactors


def interpolate_factors(a: FactorSource, b: FactorSource, alpha: float) -> FactorSet:
    """The factor-space interpolation of two adapters (equal ranks and scalings)."""
    modules = {}
    for m in a.module_names:
        fa, fb = a.factors(m), b.factors(m)
        if fa.rank != fb.rank or abs(fa.scaling - fb.scaling) > 1e-9:
            raise LorafuseError(f"{m}: factor interpolation needs equal ranks and scalings")
        modules[m] = LoraFactors(
            A=(1 - alpha) * fa.A + alpha * fb.A,
            B=(1 - alpha) * fa.B + alpha * fb.B,
            scaling=fa.scaling,
        )
    return FactorSet(f"interp{alpha:g}", modules)


def path_fusion(a: FactorSource, b: FactorSource, alpha: float, path: str) -> Fusion:
    if path == "delta":
        return Fusion("delta", "merging", [a, b], ConstantMixer(torch.tensor([1 - alpha, alpha])))
    if path == "factors":
        return Fusion(
            "factors", "merging", [interpolate_factors(a, b, alpha)], ConstantMixer(torch.ones(1))
        )
    raise LorafuseError(f"unknown interpolation path {path!r} (delta or factors)")


def connectivity(
    model: torch.nn.Module,
    a: FactorSource,
    b: FactorSource,
    encoded: Sequence[Encoded],
    groups: dict[str, Sequence[int]],
    cache: StateCache,
    *,
    alphas: Sequence[float],
    paths: Sequence[str] = ("delta", "factors"),
) -> dict[str, dict[str, list[float]]]:
    """``{path: {group: [mean loss at each α]}}`` over the examples of each index group."""
    out: dict[str, dict[str, list[float]]] = {p: {g: [] for g in groups} for p in paths}
    for path in paths:
        for alpha in alphas:
            loss = evaluate(model, path_fusion(a, b, alpha, path), encoded, cache).loss
            for g, idx in groups.items():
                out[path][g].append(float(np.mean(loss[list(idx)])))
    return out


def plot_connectivity(
    alphas: Sequence[float],
    curves: dict[str, dict[str, list[float]]],
    oracle: dict[str, float],
    path: str | Path,
    title: str,
) -> Path:
    """One line per (path, task group), dashed oracle levels (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"delta": "-", "factors": ":"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for p, groups in curves.items():
        for (g, ys), c in zip(groups.items(), colors, strict=False):
            ax.plot(alphas, ys, styles.get(p, "-"), color=c, marker="o", ms=3, label=f"{g} ({p})")
    for (g, y), c in zip(oracle.items(), colors, strict=False):
        ax.axhline(y, color=c, ls="--", lw=0.8, label=f"{g} (oracle)")
    ax.set_xlabel("α  (0 = first expert, 1 = second)")
    ax.set_ylabel("mean answer NLL")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return save_png(fig, path)
