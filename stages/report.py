"""Reads: ``metrics.json`` of every evaluated model. Writes: ``table.md`` (dense vs. each
calibration source), ``summary.csv`` (the data behind the dvc plots) and ``summary.png``.
"""

import csv
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from stages.errors import RacError
from stages.params import Params
from stages.schemas import atomic_path

log = logging.getLogger(__name__)

COLUMNS = ("accuracy", "accuracy_se", "mean_cot_tokens", "p90_cot_tokens", "frac_hit_max", "wall_seconds")


def load_metrics(evaluations: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """``metrics.json`` of each of ``names`` under ``evaluations``."""
    out = {}
    for name in names:
        path = evaluations / name / "metrics.json"
        if not path.is_file():
            raise RacError(f"{str(path)!r} does not exist; run `dvc repro` to evaluate {name!r} first")
        out[name] = json.loads(path.read_text())
    return out


def markdown_table(p: Params, rows: dict[str, dict[str, float]]) -> str:
    """The dense-vs-sources table in Markdown."""
    head = (
        f"Pruner `{p.pruner}` at sparsity {p.sparsity} on `{p.model}` ({p.task}, "
        f"{next(iter(rows.values()))['n_samples']} held-out problems)\n\n"
    )
    lines = [
        "| model | accuracy ± SE | mean CoT tokens | p90 CoT tokens | hit max | wall s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in rows.items():
        lines.append(
            f"| {name} | {m['accuracy']:.3f} ± {m['accuracy_se']:.3f} | {m['mean_cot_tokens']:.1f} | "
            f"{m['p90_cot_tokens']:.0f} | {m['frac_hit_max']:.3f} | {m['wall_seconds']:.1f} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(p: Params, rows: dict[str, dict[str, float]], path: Path) -> None:
    """Bar charts of accuracy and mean CoT length per model, with the max length dashed."""
    names = list(rows)
    fig, (ax_acc, ax_len) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_acc.bar(names, [rows[n]["accuracy"] for n in names], yerr=[rows[n]["accuracy_se"] for n in names])
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_len.bar(names, [rows[n]["mean_cot_tokens"] for n in names], color="tab:orange")
    ax_len.axhline(p.evaluate.max_new_tokens, color="grey", linestyle="--", label="max_new_tokens")
    ax_len.set_ylabel("mean CoT tokens")
    ax_len.legend(loc="lower right")
    fig.suptitle(f"{p.pruner} at sparsity {p.sparsity}: calibration source vs. accuracy and CoT length")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def run(p: Params, evaluations: Path, out: Path) -> None:
    """Write the report of the dense model and every calibration source into ``out``."""
    rows = load_metrics(evaluations, ["dense", *p.sources])
    with atomic_path(out / "summary.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", *COLUMNS])
        writer.writerows([name, *(m[c] for c in COLUMNS)] for name, m in rows.items())
    with atomic_path(out / "summary.png") as tmp:
        plot(p, rows, tmp)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(markdown_table(p, rows))
    log.info("report:\n%s", markdown_table(p, rows))
