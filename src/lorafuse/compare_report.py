"""The report of ``lorafuse compare`` (serial or on Ray): the comparisons the papers make,
the table rows are collected in, and ``results.json`` / ``report.md`` / ``report.html`` /
plots written from a filled table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorafuse.eval.harness import ExampleScores
from lorafuse.eval.paired import ALPHA, compare_pairs, paired_table
from lorafuse.eval.report import html_report, markdown_table, plot_methods, plot_task_heatmap
from lorafuse.eval.run import ORACLE_ROW, summaries_of, versions
from lorafuse.io import atomic_write_json, atomic_write_text
from lorafuse.training.library import MULTITASK
from lorafuse.workspace import Workspace

__all__ = ["PAIRED", "PAIRED_INTRO", "Table", "write_compare"]

# The comparisons the papers make, as (claim, a, b): paired tests across tasks of the rows'
# per-task losses (``eval.paired``), where both rows were run.
PAIRED: tuple[tuple[str, str, str], ...] = (
    ("learned vs uniform merge", "learned_global", "uniform_average"),
    ("learned vs uniform merge", "learned_per_layer", "uniform_average"),
    ("learned vs uniform merge", "lorahub", "uniform_average"),
    ("routing vs merging", "arrow", "uniform_average"),
    ("routing vs merging", "learned_router", "learned_global"),
    ("ensembling vs merging", "ensemble_prob", "uniform_average"),
    ("probabilities vs logits", "ensemble_prob", "ensemble_logit"),
    ("learned vs uniform ensemble", "ensemble_learned", "ensemble_prob"),
    ("full-rank vs low-rank average", "uniform_average", "lowrank_average"),
    ("Twin vs experts", "twin", ORACLE_ROW),
    ("Twin vs its shared merge", "twin", "task_arithmetic"),
    ("ELREA vs multi-task adapter", "elrea", MULTITASK),
    ("ELREA vs uniform weights", "elrea", "elrea_uniform"),
    ("ELREA vs random clusters", "elrea", "elrea_random"),
    ("clustering vs routing", "hc_arrow", "arrow"),
)


@dataclass
class Table:
    """Scores, families and costs of every row, in display order."""

    scores: dict[str, ExampleScores] = field(default_factory=dict)
    family: dict[str, str] = field(default_factory=dict)
    costs: dict[str, dict[str, float | None]] = field(default_factory=dict)
    info: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # rows left out, and why

    def add(self, row: str, family: str, scores: ExampleScores, **costs: float | None) -> None:
        self.scores[row] = scores
        self.family[row] = family
        self.costs[row] = costs


PAIRED_INTRO = (
    "Each task is one pair of per-task mean losses (a - b < 0: a is better), both rows on "
    "the same items (a row on an item budget against the other on those items). Wilcoxon "
    "signed-rank and paired t-test (scipy, two-sided); the verdict is the Wilcoxon test at "
    f"{ALPHA} for each comparison alone; Holm p adjusts it over all the comparisons below."
)


def write_compare(
    ws: Workspace, out: Path, table: Table, timings: dict[str, float], *, seed: int, title: str
) -> dict:
    """results.json, report.md/.html and the plots of a filled table; returns the results."""
    examples = ws.examples("test")
    reference = table.scores.get(ORACLE_ROW)
    summaries = summaries_of(examples, table.scores, reference=reference)
    for row, s in summaries.items():
        s["family"] = table.family[row]
        s["costs"] = table.costs[row]
        if row in table.info:
            s["info"] = table.info[row]
    md = markdown_table(summaries, table.costs, table.family)
    tests = compare_pairs(table.scores, [ex.task for ex in examples], PAIRED)
    results = {
        "methods": summaries,
        "paired_tests": tests,
        "seed": seed,
        "library": str(ws.library),
        "timings": timings,
        "config": {
            "base_model": ws.base.name,
            "forward": ws.forward.describe(),
            "split": "test",
            "library_config": ws.manifest.config,
        },
        "versions": versions(),
        "notes": table.notes,
    }
    for note in table.notes:
        print(f"note: {note}", flush=True)
    title = title or "lorafuse compare"
    atomic_write_json(out / "results.json", results)
    plot_methods(
        summaries, out / "methods.png", title=f"{title} (test split)", families=table.family
    )
    plot_task_heatmap(summaries, out / "tasks.png")
    intro = (
        f"Library {ws.library}; {len(examples)} test examples over {len(ws.suite.tasks)} tasks. "
        "loss = mean answer-token NLL (answer + end-of-turn) ± standard error across tasks; "
        "acc = greedy exact match (%); norm = accuracy / own expert's accuracy; costs: "
        "training s (experts' own training not counted except for the oracle and multi-task "
        "rows), inference ms per item on this machine, stored MB."
    )
    if table.notes:
        intro += "\n\n" + "\n".join(f"- Note: {n}" for n in table.notes)
    footer = "Timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    paired = ("Paired tests across tasks", PAIRED_INTRO, paired_table(tests))
    atomic_write_text(
        out / "report.md",
        f"# {title}\n\n{intro}\n\n{md}\n\n## {paired[0]}\n\n{paired[1]}\n\n{paired[2]}\n\n"
        f"![methods](methods.png)\n\n![tasks](tasks.png)\n\n{footer}\n",
    )
    images = ["methods.png", "tasks.png"]
    atomic_write_text(
        out / "report.html", html_report(title, intro, md, images, footer, sections=[paired])
    )
    results["table"] = md
    return results
