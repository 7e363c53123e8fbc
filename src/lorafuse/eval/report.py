"""Tables and plots of method summaries (the ``summarize`` dicts)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lorafuse.io import atomic_path


def markdown_table(summaries: Mapping[str, dict]) -> str:
    """Methods as rows: mean loss ± s.e., accuracy, normalised score, accuracy per task."""
    tasks = list(dict.fromkeys(t for s in summaries.values() for t in s["tasks"]))
    head = ["method", "loss ± se", "acc", "norm"] + tasks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        norm = f"{s['mean_normalized']:.2f}" if "mean_normalized" in s else "-"
        cells = [
            name,
            f"{s['mean_loss']:.3f} ± {s['stderr_loss']:.3f}",
            f"{100 * s['mean_accuracy']:.1f}",
            norm,
        ]
        cells += [
            f"{100 * s['tasks'][t]['accuracy']:.0f}" if t in s["tasks"] else "-" for t in tasks
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_methods(summaries: Mapping[str, dict], path: str | Path, title: str = "") -> Path:
    """Bar chart: mean test loss ± s.e. and mean accuracy per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summaries)
    loss = [summaries[n]["mean_loss"] for n in names]
    err = [summaries[n]["stderr_loss"] for n in names]
    acc = [100 * summaries[n]["mean_accuracy"] for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(4 + 1.1 * len(names), 4))
    ax1.bar(names, loss, yerr=err, capsize=4, color="#4c72b0")
    ax1.set_ylabel("mean test loss (answer-token NLL)")
    ax2.bar(names, acc, color="#55a868")
    ax2.set_ylabel("mean exact match (%)")
    ax2.set_ylim(0, 100)
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


def plot_task_heatmap(summaries: Mapping[str, dict], path: str | Path) -> Path:
    """Accuracy of every method on every task, as a heatmap (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summaries)
    tasks = list(dict.fromkeys(t for s in summaries.values() for t in s["tasks"]))
    grid = np.array(
        [
            [100 * summaries[n]["tasks"].get(t, {}).get("accuracy", np.nan) for t in tasks]
            for n in names
        ]
    )
    fig, ax = plt.subplots(figsize=(2 + 0.9 * len(tasks), 1 + 0.45 * len(names)))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(tasks)):
            if not np.isnan(grid[i, j]):
                color = "white" if grid[i, j] < 60 else "black"
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", color=color)
    fig.colorbar(im, ax=ax, label="exact match (%)")
    return _save_png(fig, path)


def _save_png(fig, path: str | Path) -> Path:
    """Write a figure atomically as PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
