"""Reads: ``metrics.json`` of every evaluated model. Writes: ``table.md`` (dense vs. each
calibration source), ``summary.csv`` (the data behind the dvc plots) and ``summary.png``.

The stage's outs hold no wall times, so they are pure functions of the metrics. With ``--experiments`` it
reads ``dvc exp show --json`` instead (metrics and the ``data/timings`` files) and writes the sweep over the
one param (a dotted key such as ``sparsity`` or ``evaluate.max_new_tokens``) in which experiments differ from
the workspace: ``table.md`` (the paper's table 1: rows the key's values, columns source, accuracy ± SE and
evaluation time; then mean CoT length and rambling), ``sweep.csv`` (its first column named by the key; behind
the dvc plots) and ``figure1.png``.
"""

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

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


def _dvc(*args: str) -> str:
    """The stdout of ``dvc ARGS`` in the working directory; its failure is one line."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RacError(f"`dvc {' '.join(args)}` failed ({first}); run rac report --experiments in the project root")
    return proc.stdout


def exp_show() -> list[dict[str, Any]]:
    """``dvc exp show --json`` of the workspace and HEAD, then of every other commit that experiments were run
    from (``dvc exp list -A``): a sweep queued before later commits is still found, without reading the
    metrics of every commit in the history."""
    entries: list[dict[str, Any]] = json.loads(_dvc("exp", "show", "--json"))
    shown = {entry.get("rev") for entry in entries}
    baselines = [line[:-1] for line in _dvc("exp", "list", "-A").splitlines() if line.endswith(":")]
    for baseline in baselines:
        if not any(str(rev).startswith(baseline) for rev in shown):
            entries += json.loads(_dvc("exp", "show", "--json", "--rev", baseline))[1:]  # [0] is the workspace
    return entries


# A param's value as a sweep point: a scalar of params.yaml, or a list or empty mapping as JSON text.
Value = float | int | str | bool | None
Models = dict[str, dict[str, float]]

SWEEP_FIELDS = ("accuracy", "accuracy_se", "wall_seconds", "tokens_per_second", "mean_cot_tokens", "frac_hit_max")
VOLATILE = ("wall_seconds", "tokens_per_second")  # from data/timings: they differ between runs of one model


class Sweep(NamedTuple):
    """Metrics by value of the one swept param ``key`` (dotted), then by model (dense and each source)."""

    key: str
    points: dict[Value, Models]


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Value]:
    """``params`` with nested mappings flattened to dotted keys (``prune.mix.prompt``); a list or an empty mapping
    stays one value, as JSON text."""
    out: dict[str, Value] = {}
    for name, value in params.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{dotted}.")
        elif isinstance(value, list | dict):
            out[dotted] = json.dumps(value)
        else:
            out[dotted] = value
    return out


def _is_number(value: Value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _label(value: Value) -> str:
    """``value`` as a table cell or tick label: floats as ``%g``, strings as they are, the rest as JSON."""
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def _revisions(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every revision in ``dvc exp show --json``: the workspace, baselines, and their experiments."""
    out = []
    for entry in entries:
        out.append(entry)
        for experiment in entry.get("experiments") or []:
            out += _revisions(experiment["revs"])
    return out


def _revision_params(revision: dict[str, Any]) -> dict[str, Value]:
    return flatten(revision["data"]["params"].get("params.yaml", {}).get("data", {}))


def sweep_points(entries: list[dict[str, Any]], sources: list[str], key: str | None) -> Sweep:
    """Metrics of every finished revision whose params differ from the first revision's (the workspace) in one key
    alone, by that key's value, the workspace's own included; ``key`` picks the key where experiments vary several.

    The newest revision wins a tie. Rows ascend by value where every value is a number, else by their text.
    """
    revisions = [r for r in _revisions(entries) if r.get("data") and not r.get("error")]
    if not revisions:
        raise RacError("`dvc exp show` lists no revisions; commit the project and run `dvc exp run` first")
    reference = _revision_params(revisions[0])
    newest_first = sorted(revisions, key=lambda r: r["data"]["timestamp"] or "9999", reverse=True)
    names = ["dense", *sources]
    needed = [path(n) for n in names for path in (_metrics_path, _timings_path)]
    found: list[tuple[str | None, dict[str, Value], Models]] = []  # (the key it varies, its params, its metrics)
    for revision in newest_first:
        values = _revision_params(revision)
        differing = sorted(
            k
            for k in reference.keys() | values.keys()
            if k not in reference or k not in values or reference[k] != values[k]
        )
        if len(differing) > 1:
            log.info(
                "sweep: skipping %s, whose params differ in %d keys (%s%s)",
                revision.get("name") or revision["rev"],
                len(differing),
                ", ".join(differing[:4]),
                ", …" if len(differing) > 4 else "",
            )
            continue
        metrics = revision["data"].get("metrics") or {}
        if any(path not in metrics for path in needed):
            continue
        models = {
            n: metrics[_metrics_path(n)]["data"] | {k: metrics[_timings_path(n)]["data"][k] for k in VOLATILE}
            for n in names
        }
        found.append((differing[0] if differing else None, values, models))
    if not found:
        raise RacError("no finished experiment has metrics for every source; run `dvc queue start` and wait for it")
    varied = sorted({k for k, _, _ in found if k is not None})
    if key is None and len(varied) > 1:
        raise RacError(f"the experiments vary different params {varied}; pass --key with one of them")
    if key is None and not varied:
        raise RacError("no finished experiment differs from the workspace in one param; run `dvc exp run -S KEY=VALUE`")
    if key is not None and key not in reference and key not in varied:
        raise RacError(f"--key {key!r} is not a param of the experiments; pass one of {varied or sorted(reference)}")
    key = key or varied[0]
    points: dict[Value, Models] = {}
    for varies, values, models in found:
        if varies in (None, key):
            points.setdefault(values.get(key), models)  # a key the revision lacks reads as None
    order = sorted(points) if all(map(_is_number, points)) else sorted(points, key=_label)
    return Sweep(key, {value: points[value] for value in order})


def _fields(points: dict[Value, Models]) -> tuple[str, ...]:
    """The fields of each model in the sweep, ``frac_parseable`` too where every model of every point has it."""
    parseable = all("frac_parseable" in m for models in points.values() for m in models.values())
    return (*SWEEP_FIELDS, "frac_parseable") if parseable else SWEEP_FIELDS


def _dense_varies(points: dict[Value, Models]) -> bool:
    """Whether the dense model's metrics (not its wall time) differ between points: the key changes its evaluation."""
    dense = [{k: v for k, v in models["dense"].items() if k not in VOLATILE} for models in points.values()]
    return len({json.dumps(m, sort_keys=True) for m in dense}) > 1


def sweep_table(p: Params, sweep: Sweep) -> str:
    """The paper's table 1 (rows the swept key's values, columns the sources, accuracy ± SE and evaluation time) and
    a CoT length and rambling table, in Markdown; dense is a column where the key changes it, else in the head."""
    key, points = sweep
    parseable = "frac_parseable" in _fields(points)
    columns = ["dense", *p.sources] if _dense_varies(points) else p.sources

    def accuracy(m: dict[str, float]) -> str:
        timing = f"{m['wall_seconds']:.1f} s, {m['tokens_per_second']:.0f} tok/s"
        return f"{m['accuracy']:.3f} ± {m['accuracy_se']:.3f} ({timing})"

    def length(m: dict[str, float]) -> str:
        return f"{m['mean_cot_tokens']:.1f} / {m['frac_hit_max']:.3f}" + (
            f" / {m['frac_parseable']:.3f}" if parseable else ""
        )

    length_title = "Mean CoT tokens / fraction that hit max_new_tokens" + (
        " / fraction with a parseable answer" if parseable else ""
    )
    context = {
        "pruner": f"pruner `{p.pruner}`",
        "sparsity": f"sparsity {p.sparsity:g}",
        "model": f"`{p.model}`",
        "task": p.task,
    }
    problems = ", ".join(sorted({str(models["dense"]["n_problems"]) for models in points.values()}))
    head = f"Sweep of `{key}`: " + ", ".join(text for name, text in context.items() if name != key)
    head += f"; {problems} held-out problems"
    if "dense" not in columns:
        dense = next(iter(points.values()))["dense"]
        head += f"; dense: {accuracy(dense)}, mean CoT / hit max{' / parseable' if parseable else ''} {length(dense)}"
    header = [f"| {key} | " + " | ".join(columns) + " |", "| --- " * (len(columns) + 1) + "|"]
    sections = []
    for title, cell in (("Accuracy ± SE (evaluation wall time, generated tokens/s)", accuracy), (length_title, length)):
        rows = [
            f"| {_label(v)} | " + " | ".join(cell(models[c]) for c in columns) + " |" for v, models in points.items()
        ]
        sections.append(f"{title}\n\n" + "\n".join(header + rows) + "\n")
    return head + "\n\n" + "\n".join(sections)


def plot_sweep(p: Params, sweep: Sweep, path: Path) -> None:
    """The paper's figure 1: accuracy, mean CoT length (which drives the time when generation is not batched away)
    and evaluation time against the swept key, per model (dense grey): lines for a numeric key, else grouped bars."""
    key, points = sweep
    values, names = list(points), ["dense", *p.sources]
    numeric = all(map(_is_number, values))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [("accuracy", "accuracy"), ("mean_cot_tokens", "mean CoT tokens"), ("wall_seconds", "evaluation wall s")]
    for ax, (field, label) in zip(axes, panels, strict=True):
        for i, name in enumerate(names):
            ys = [points[v][name][field] for v in values]
            se = [points[v][name]["accuracy_se"] for v in values] if field == "accuracy" else None
            grey = {"color": "grey"} if name == "dense" else {}
            if numeric:
                style = "--" if name == "dense" else "-"
                ax.errorbar(values, ys, yerr=se, marker="o", capsize=3, linestyle=style, label=name, **grey)
            else:
                xs = [x + (i - (len(names) - 1) / 2) * width for x in range(len(values))]
                ax.bar(xs, ys, width, yerr=se, capsize=3, label=name, **grey)
        if not numeric:
            ax.set_xticks(range(len(values)), [_label(v) for v in values])
        ax.set(xlabel=key, ylabel=label)
    axes[0].set_ylim(0, 1.05)
    if numeric and key == "evaluate.max_new_tokens":
        axes[1].plot(values, values, color="black", linestyle=":", label="max_new_tokens")
    else:
        axes[1].axhline(p.evaluate.max_new_tokens, color="black", linestyle=":", label="max_new_tokens")
    axes[1].legend(loc="best")
    fig.suptitle(f"{p.model}: accuracy, CoT length and evaluation time against {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def run_experiments(p: Params, out: Path, key: str | None) -> None:
    """Write the sweep over ``key`` (or the one key the experiments vary) of the experiments in ``dvc exp show``."""
    sweep = sweep_points(exp_show(), p.sources, key)
    fields, names = _fields(sweep.points), ["dense", *p.sources]
    with atomic_path(out / "sweep.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([sweep.key, *(f"{n}_{c}" for n in names for c in fields)])
        for value, models in sweep.points.items():
            writer.writerow(
                [value if _is_number(value) else _label(value), *(models[n][c] for n in names for c in fields)]
            )
    with atomic_path(out / "figure1.png") as tmp:
        plot_sweep(p, sweep, tmp)
    table = sweep_table(p, sweep)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(table)
    log.info("sweep of %s over %d values:\n%s", sweep.key, len(sweep.points), table)
