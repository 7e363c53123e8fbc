"""Tables and plots of method summaries (the ``summarize`` dicts)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from lorafuse.io import atomic_path


def markdown_table(
    summaries: Mapping[str, dict],
    costs: Mapping[str, Mapping[str, float | None]] | None = None,
    families: Mapping[str, str] | None = None,
) -> str:
    """Methods as rows: family, mean loss ± s.e., accuracy, normalised score, cost columns
    (training s, inference ms per item, stored MB) when given, then accuracy per task."""
    tasks = list(dict.fromkeys(t for s in summaries.values() for t in s["tasks"]))
    cost_cols = (
        [
            ("train_s", "train s", "{:.0f}"),
            ("infer_ms", "ms/item", "{:.1f}"),
            ("stored_mb", "MB", "{:.1f}"),
        ]
        if costs
        else []
    )
    head = ["method"] + (["family"] if families else []) + ["loss ± se", "acc", "norm"]
    head += [label for _, label, _ in cost_cols] + tasks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        norm = f"{s['mean_normalized']:.2f}" if "mean_normalized" in s else "-"
        cells = [name] + ([families.get(name, "reference")] if families else [])
        cells += [
            f"{s['mean_loss']:.3f} ± {s['stderr_loss']:.3f}",
            f"{100 * s['mean_accuracy']:.1f}",
            norm,
        ]
        row_costs = (costs or {}).get(name, {})
        for key, _, fmt in cost_cols:
            value = row_costs.get(key)
            cells.append("-" if value is None else fmt.format(value))
        cells += [
            f"{100 * s['tasks'][t]['accuracy']:.0f}" if t in s["tasks"] else "-" for t in tasks
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


FAMILY_COLORS = {
    "reference": "#8c8c8c",
    "ensembling": "#dd8452",
    "merging": "#4c72b0",
    "routing": "#55a868",
}


def plot_methods(
    summaries: Mapping[str, dict],
    path: str | Path,
    title: str = "",
    families: Mapping[str, str] | None = None,
) -> Path:
    """Bar charts of mean test loss ± s.e. and mean accuracy per method (PNG); with
    ``families``, methods are grouped and coloured by family (reference, ensembling,
    merging, routing), as in the Trade-offs paper's Figure 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fam = {n: (families or {}).get(n, "reference") for n in summaries}
    order = list(FAMILY_COLORS)
    names = sorted(summaries, key=lambda n: order.index(fam[n]) if fam[n] in order else 9)
    colors = [FAMILY_COLORS.get(fam[n], "#999999") for n in names]
    loss = [summaries[n]["mean_loss"] for n in names]
    err = [summaries[n]["stderr_loss"] for n in names]
    acc = [100 * summaries[n]["mean_accuracy"] for n in names]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(3 + 0.55 * len(names), 7), sharex=True)
    ax1.bar(names, loss, yerr=err, capsize=3, color=colors)
    ax1.set_ylabel("mean test loss (answer NLL) ± s.e.")
    ax1.set_yscale("log")
    ax2.bar(names, acc, color=colors)
    ax2.set_ylabel("mean exact match (%)")
    ax2.set_ylim(0, 100)
    ax2.tick_params(axis="x", rotation=40)
    for label in ax2.get_xticklabels():
        label.set_horizontalalignment("right")
    if families:
        present = [f for f in order if f in fam.values()]
        ax1.legend(handles=[Patch(color=FAMILY_COLORS[f], label=f) for f in present], ncol=4)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)


def _html_table(table_md: str) -> str:
    import html

    lines = [ln for ln in table_md.strip().splitlines() if not set(ln) <= set("|-: ")]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(
    title: str,
    intro: str,
    table_md: str,
    images: list[str],
    footer: str,
    sections: Sequence[tuple[str, str, str]] = (),
) -> str:
    """A self-contained HTML page: the Markdown table as an HTML table, then each section
    ``(heading, text, Markdown table)``, then the plots."""
    import html

    extra = "".join(
        f"<h2>{html.escape(h)}</h2><p>{html.escape(text)}</p>{_html_table(md)}"
        for h, text, md in sections
    )
    imgs = "".join(f'<p><img src="{html.escape(i)}" alt="{html.escape(i)}"></p>' for i in images)
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(intro)}</p>{_html_table(table_md)}{extra}{imgs}"
        f"<p>{html.escape(footer)}</p></body></html>\n"
    )


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
    return save_png(fig, path)


def save_png(fig, path: str | Path) -> Path:
    """Write a figure atomically as PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
