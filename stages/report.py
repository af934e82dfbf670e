"""Reads: ``metrics.json`` of every evaluated model. Writes: ``table.md`` (dense vs. each
calibration source), ``summary.csv`` (the data behind the dvc plots) and ``summary.png``.

The stage's outs hold no wall times, so they are pure functions of the metrics. With ``--experiments`` it
reads ``dvc exp show --json`` instead (metrics and the ``data/timings`` files) and writes the sparsity sweep:
``table.md`` (the paper's table 1: rows sparsity, columns source, accuracy ± SE and evaluation time;
then mean CoT length and rambling), ``sweep.csv`` (behind the dvc plots) and ``figure1.png``.
"""

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from stages.errors import RacError
from stages.params import Params
from stages.schemas import atomic_path

log = logging.getLogger(__name__)

COLUMNS = ("accuracy", "accuracy_se", "mean_cot_tokens", "p90_cot_tokens", "frac_hit_max")


def load_metrics(evaluations: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """``metrics.json`` of each of ``names`` under ``evaluations``."""
    out = {}
    for name in names:
        path = evaluations / name / "metrics.json"
        if not path.is_file():
            raise RacError(f"{str(path)!r} does not exist; run `dvc repro` to evaluate {name!r} first")
        try:
            out[name] = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise RacError(f"{str(path)!r} is not valid JSON ({err}); rerun `dvc repro -f evaluate@{name}`") from err
    return out


def markdown_table(p: Params, rows: dict[str, dict[str, float]]) -> str:
    """The dense-vs-sources table in Markdown."""
    head = (
        f"Pruner `{p.pruner}` at sparsity {p.sparsity} on `{p.model}` ({p.task}, "
        f"{next(iter(rows.values()))['n_problems']} held-out problems)\n\n"
    )
    lines = [
        "| model | accuracy ± SE | mean CoT tokens | p90 CoT tokens | hit max |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in rows.items():
        lines.append(
            f"| {name} | {m['accuracy']:.3f} ± {m['accuracy_se']:.3f} | {m['mean_cot_tokens']:.1f} | "
            f"{m['p90_cot_tokens']:.0f} | {m['frac_hit_max']:.3f} |"
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


def _metrics_path(name: str) -> str:
    return f"data/evaluate/{name}/metrics.json"


def _timings_path(name: str) -> str:
    return f"data/timings/evaluate-{name}.json"


def exp_show() -> list[dict[str, Any]]:
    """``dvc exp show --json`` of the repository in the working directory."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RacError(f"`dvc exp show --json` failed ({first}); run rac report --experiments in the project root")
    return json.loads(proc.stdout)


def _revisions(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every revision in ``dvc exp show --json``: the workspace, baselines, and their experiments."""
    out = []
    for entry in entries:
        out.append(entry)
        for experiment in entry.get("experiments") or []:
            out += _revisions(experiment["revs"])
    return out


def sweep_points(entries: list[dict[str, Any]], sources: list[str]) -> dict[float, dict[str, dict[str, float]]]:
    """Metrics by sparsity and model (dense and ``sources``) of every finished revision whose params differ from
    the first revision's (the workspace) in ``sparsity`` alone; the newest revision wins a tie."""
    revisions = [r for r in _revisions(entries) if r.get("data") and not r.get("error")]
    if not revisions:
        raise RacError("`dvc exp show` lists no revisions; commit the project and run `dvc exp run` first")

    def params(revision: dict[str, Any]) -> dict[str, Any]:
        return revision["data"]["params"].get("params.yaml", {}).get("data", {})

    reference = {k: v for k, v in params(revisions[0]).items() if k != "sparsity"}
    newest_first = sorted(revisions, key=lambda r: r["data"]["timestamp"] or "9999", reverse=True)
    names = ["dense", *sources]
    points: dict[float, dict[str, dict[str, float]]] = {}
    for revision in newest_first:
        values, metrics = params(revision), revision["data"].get("metrics") or {}
        if {k: v for k, v in values.items() if k != "sparsity"} != reference:
            name = revision.get("name") or revision["rev"]
            log.info("sweep: skipping %s, whose params differ in more than sparsity", name)
            continue
        needed = [path(n) for n in names for path in (_metrics_path, _timings_path)]
        if any(path not in metrics for path in needed) or values["sparsity"] in points:
            continue
        points[values["sparsity"]] = {
            n: metrics[_metrics_path(n)]["data"] | {"wall_seconds": metrics[_timings_path(n)]["data"]["wall_seconds"]}
            for n in names
        }
    if not points:
        raise RacError("no finished experiment has metrics for every source; run `dvc queue start` and wait for it")
    return dict(sorted(points.items()))


def sweep_table(p: Params, points: dict[float, dict[str, dict[str, float]]]) -> str:
    """The paper's table 1 (accuracy ± SE, evaluation time) and a CoT length and rambling table, in Markdown."""
    dense = next(iter(points.values()))["dense"]
    head = (
        f"Pruner `{p.pruner}` on `{p.model}` ({p.task}, {dense['n_problems']} held-out problems); "
        f"dense: {dense['accuracy']:.3f} ± {dense['accuracy_se']:.3f}, {dense['wall_seconds']:.1f} s, "
        f"mean CoT {dense['mean_cot_tokens']:.1f} tokens, hit max {dense['frac_hit_max']:.3f}\n\n"
    )
    columns = " | ".join(p.sources)
    rule = "| --- " * (len(p.sources) + 1) + "|"
    accuracy = [f"| sparsity | {columns} |", rule]
    length = [f"| sparsity | {columns} |", rule]
    for sparsity, models in points.items():
        cells = [models[s] for s in p.sources]
        accuracy.append(
            f"| {sparsity:g} | "
            + " | ".join(f"{m['accuracy']:.3f} ± {m['accuracy_se']:.3f} ({m['wall_seconds']:.1f} s)" for m in cells)
            + " |"
        )
        length.append(
            f"| {sparsity:g} | "
            + " | ".join(f"{m['mean_cot_tokens']:.1f} / {m['frac_hit_max']:.3f}" for m in cells)
            + " |"
        )
    return (
        head
        + "Accuracy ± SE (evaluation wall time)\n\n"
        + "\n".join(accuracy)
        + "\n\nMean CoT tokens / fraction that hit max_new_tokens\n\n"
        + "\n".join(length)
        + "\n"
    )


def plot_sweep(p: Params, points: dict[float, dict[str, dict[str, float]]], path: Path) -> None:
    """The paper's figure 1: accuracy and evaluation time against sparsity, one line per source, dense dashed;
    between them the mean CoT length, which drives the time when generation is not batched away."""
    sparsities = list(points)
    dense = points[sparsities[0]]["dense"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [("accuracy", "accuracy"), ("mean_cot_tokens", "mean CoT tokens"), ("wall_seconds", "evaluation wall s")]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for source in p.sources:
            values = [points[x][source][key] for x in sparsities]
            se = [points[x][source]["accuracy_se"] for x in sparsities] if key == "accuracy" else None
            ax.errorbar(sparsities, values, yerr=se, marker="o", capsize=3, label=source)
        ax.axhline(dense[key], color="grey", linestyle="--", label="dense")
        ax.set(xlabel="sparsity", ylabel=label)
    axes[0].set_ylim(0, 1.05)
    axes[1].axhline(p.evaluate.max_new_tokens, color="black", linestyle=":", label="max_new_tokens")
    axes[1].legend(loc="center right")
    fig.suptitle(f"{p.pruner} on {p.model}: accuracy, CoT length and evaluation time against sparsity")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def run_experiments(p: Params, out: Path) -> None:
    """Write the sparsity sweep of the experiments in ``dvc exp show`` into ``out``."""
    points = sweep_points(exp_show(), p.sources)
    fields = ("accuracy", "accuracy_se", "wall_seconds", "mean_cot_tokens", "frac_hit_max")
    with atomic_path(out / "sweep.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sparsity", *(f"{n}_{c}" for n in ["dense", *p.sources] for c in fields)])
        for sparsity, models in points.items():
            writer.writerow([sparsity, *(models[n][c] for n in ["dense", *p.sources] for c in fields)])
    with atomic_path(out / "figure1.png") as tmp:
        plot_sweep(p, points, tmp)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(sweep_table(p, points))
    log.info("sweep over %d sparsities:\n%s", len(points), sweep_table(p, points))
