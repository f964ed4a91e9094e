"""`medda` command line: parse a YAML recipe + key=value overrides, call `medda.api`, print a summary.

User mistakes (bad config, unreadable or inconsistent data) print one sentence and exit with status 2,
without a traceback and without leaving a half-written output folder behind.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from pipelines.audit_cli import register as register_audit_commands
from pipelines.guard import run_guarded

app = typer.Typer(
    name="medda",
    help="Adapt segmentation models to new sites (source-free) and train them from few labelled scans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
card_app = typer.Typer(help="Data cards: validate them and measure class statistics.", no_args_is_help=True)
app.add_typer(card_app, name="card")
register_audit_commands(app)  # audit, compare, promote, server

Overrides = Annotated[list[str] | None, typer.Argument(help="Overrides such as train.iterations=200 data.mode=2d.")]
ConfigPath = Annotated[Path, typer.Argument(help="YAML recipe (see configs/).", show_default=False)]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue the interrupted run of output_dir (its resume.pt and MLflow run); same recipe and overrides.")]

Threads = Annotated[int | None, typer.Option(
    "--threads", min=1, help="torch CPU threads (the same as train.threads=N); default: one per CPU this process may "
    "use (affinity, cgroup quota).")]


def _config(path: Path | None, overrides: list[str] | None, base: dict | None = None, threads: int | None = None):
    """Load a recipe; a missing `configs/NAME.yaml` or `data_cards/NAME.yaml` falls back to the shipped file.

    `threads` (the `--threads` option) is one more override, applied last."""
    from medda.config import load_config
    from medda.resources import user_or_bundled

    overrides = [*(overrides or []), *([f"train.threads={threads}"] if threads is not None else [])]
    cfg = load_config(user_or_bundled(path, "configs") if path else None, overrides, base)
    cfg.data.card = user_or_bundled(cfg.data.card, "data_cards")
    return cfg


@app.command()
def train(config: ConfigPath, overrides: Overrides = None, resume: Resume = False, threads: Threads = None) -> None:
    """Train a segmenter (source training, or semi-supervised with method.name=bcp|mean_teacher)."""
    from medda import api, distributed

    def run() -> None:
        cfg = _config(config, overrides, threads=threads)
        _guarded_dirs.append(cfg.output_dir)
        result = api.train(cfg, resume=resume)
        if not distributed.is_main():  # under torchrun, rank 0 reports
            return
        typer.echo(f"trained {cfg.method.name}: {result.loop.iterations} iterations in {result.loop.seconds:.0f} s")
        if result.loop.best_iteration >= 0:
            what = "label-free score" if result.selection == "label_free" else "validation Dice"
            typer.echo(f"best {what} {result.loop.best_score:.4f} at iteration {result.loop.best_iteration}")
        if result.cross_validation is not None:
            cv = result.cross_validation
            best = dict(cv["mean_val_dice"])[cv["iteration"]]
            typer.echo(f"cross-validation over {len(cv['folds'])} folds: mean held-out Dice {best:.4f} at iteration "
                       f"{cv['iteration']}, where the run on every labelled case stopped")
        typer.echo(f"selected checkpoint ({result.selection}): {result.checkpoint}")
        if result.run_id:
            typer.echo(f"MLflow run: {result.run_id}")

    _run_with_outputs(run)


@app.command("train-ssl")
def train_ssl(config: ConfigPath, overrides: Overrides = None, resume: Resume = False,
              threads: Threads = None) -> None:
    """Semi-supervised training plus its supervised-only twin on the same labelled cases, then a comparison."""
    from pipelines.ssl import run_ssl_with_twin

    _run_with_outputs(lambda: run_ssl_with_twin(_config(config, overrides, threads=threads), _guarded_dirs, typer.echo, resume=resume))


@app.command()
def adapt(
    config: ConfigPath, overrides: Overrides = None,
    methods: Annotated[str | None, typer.Option(help="Sweep: comma-separated methods, nested runs under one parent.")] = None,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Sweep: also evaluate the source and adapted models on data.test.")] = False,
    resume: Resume = False,
    threads: Threads = None,
) -> None:
    """Source-free adaptation of `source_checkpoint` to the unlabelled cases of `data.target`."""
    from medda import api, distributed
    from medda.errors import MeddaError

    def run() -> None:
        cfg = _config(config, overrides, threads=threads)
        _guarded_dirs.append(cfg.output_dir)
        if resume and (methods or evaluate):
            raise MeddaError("--resume continues one adaptation run; a sweep (--methods, --evaluate) cannot be resumed")
        if methods or evaluate:
            distributed.refuse("medda adapt --methods/--evaluate")  # a sweep: before it evaluates anything
            from medda.sweep import adapt_sweep, format_sweep, parse_methods

            sweep = adapt_sweep(cfg, parse_methods(methods or cfg.method.name), evaluate, typer.echo)
            typer.echo(format_sweep(sweep))
            return
        result = api.adapt(cfg, resume=resume)
        if not distributed.is_main():  # under torchrun, rank 0 reports
            return
        typer.echo(f"adapted with {cfg.method.name} (prior: {result.prior_source})")
        if result.collapse:
            typer.echo(f"WARNING: adaptation stopped: {result.collapse}", err=True)
        verdict = "RECOMMENDED" if result.recommended else "NOT recommended (keep the source model)"
        typer.echo(f"adapted model {verdict}: {result.reason}")
        typer.echo(f"adapted checkpoint: {result.adapted}")
        typer.echo(f"use: {result.checkpoint}")

    _run_with_outputs(run)


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A medda checkpoint (.pt).")],
    inputs: Annotated[Path, typer.Argument(help="Images: folder, decathlon JSON or nnU-Net dataset folder.")],
    output: Annotated[Path, typer.Argument(help="Folder for the predicted label maps (NIfTI).")],
    card: Annotated[Path, typer.Option(help="Data card of the input images.")],
    overrides: Overrides = None,
    threads: Threads = None,
) -> None:
    """Predict label maps on the original image grids (sliding window, optional flip TTA)."""
    from medda import api, distributed
    from medda.config import DatasetRef

    def run() -> None:
        cfg = _config(None, overrides, {"data": {"card": str(card)}, "tracking": {"enabled": False}}, threads)
        _guarded_dirs.append(output)
        paths = api.predict(checkpoint, cfg, DatasetRef(path=inputs), output)
        if distributed.is_main():
            kept = f" ({paths.skipped} already there from an interrupted run)" if paths.skipped else ""
            typer.echo(f"wrote {paths.written} predictions to {output}{kept}")

    _run_with_outputs(run)


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A medda checkpoint (.pt).")],
    config: ConfigPath,
    overrides: Overrides = None,
    save_predictions: Annotated[bool, typer.Option(help="Also write the predictions.")] = False,
    threads: Threads = None,
) -> None:
    """Dice, HD95, ASSD and NSD per case and class on `data.test` (mm, or voxels when spacing is unknown)."""
    from medda import api, distributed

    def run() -> None:
        cfg = _config(config, overrides, threads=threads)
        _guarded_dirs.append(cfg.output_dir)
        result = api.evaluate(checkpoint, cfg, write_predictions=save_predictions)
        if distributed.is_main():
            typer.echo(result.table)
            typer.echo(f"per-case table: {cfg.output_dir / 'per_case.csv'}")

    _run_with_outputs(run)


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Working folder for phantoms, checkpoints and tables.")] = Path("demo_out"),
    quick: Annotated[bool, typer.Option(help="Tiny budgets (a smoke run, about a minute).")] = False,
    ssl: Annotated[bool, typer.Option(help="Also train BCP with 2 labelled scans of A next to its supervised-only "
                                      "twin (about 2.5 more minutes).")] = False,
    tracking_uri: Annotated[str, typer.Option(help="MLflow tracking URI.")] = "sqlite:///mlflow.db",
) -> None:
    """The embedded default: phantoms -> train on site A -> evaluate A, D and B -> adapt to D and to B [-> SSL]."""
    from pipelines.demo import run_demo

    _run_with_outputs(lambda: run_demo(output, quick=quick, ssl=ssl, tracking_uri=tracking_uri, echo=typer.echo))


@app.command()
def methods() -> None:
    """List the registered methods."""
    from medda.registry import methods_for

    typer.echo("training / semi-supervised: " + ", ".join(methods_for("training")))
    typer.echo("source-free adaptation:     " + ", ".join(methods_for("adaptation")))


@card_app.command("validate")
def card_validate(card: Annotated[Path, typer.Argument(help="Data card YAML.")]) -> None:
    """Check a data card against the schema and print its digest."""
    from medda.data.cards import load_card
    from medda.resources import user_or_bundled

    def run() -> None:
        c = load_card(user_or_bundled(card, "data_cards"))
        typer.echo(f"{card}: valid ({c.name}, {c.num_classes} classes, digest {c.digest()})")

    _run_with_outputs(run)


@card_app.command("stats")
def card_stats(
    card: Annotated[Path, typer.Argument(help="Data card YAML.")],
    dataset: Annotated[Path, typer.Argument(help="Labelled dataset: folder, decathlon JSON or nnU-Net folder.")],
    split: Annotated[str | None, typer.Option(help="Measure on this split only (e.g. train).")] = None,
    write: Annotated[bool, typer.Option(help="Write the measured class_stats into the card file.")] = False,
) -> None:
    """Measure per-class voxel ratios (per volume and per slice) through the card's preprocessing."""
    from pipelines.card import measure_card_stats

    _run_with_outputs(lambda: measure_card_stats(card, dataset, split, write, typer.echo))


_pre_existing: dict[Path, bool] = {}


class _OutputDirs(list):
    """Output folders registered by commands; remembers which already existed (those are never removed)."""

    def append(self, path: Path) -> None:
        from medda.errors import MeddaError

        path = Path(path)
        # Refused before any work: a file where the folder should be, or a folder nobody may write into.
        if path.exists() and not path.is_dir():
            raise MeddaError(f"{path}: the output folder is an existing file; expected a folder (new or existing)")
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise MeddaError(f"{path}: the output folder cannot be written ({existing} is read-only for this user)")
        _pre_existing[path] = path.exists()
        super().append(path)


_guarded_dirs: list[Path] = _OutputDirs()


def _run_with_outputs(run: Callable[[], object]) -> None:
    """Run a command; output folders it registered and created are removed on a user error.

    Under torchrun (WORLD_SIZE > 1) the command runs inside one process group (`medda.distributed.session`)."""
    from medda import distributed

    first = len(_guarded_dirs)  # earlier commands of this process (tests, notebooks) keep their outputs

    def body() -> None:
        run()  # what it returns (a table, results) is not an exit status

    def remove_new_outputs() -> None:
        for path in _guarded_dirs[first:]:
            if path.exists() and not _pre_existing.get(path, False):
                shutil.rmtree(path, ignore_errors=True)

    with distributed.session():
        run_guarded(body, remove_new_outputs)


def main() -> None:
    if "PYTHONWARNINGS" not in os.environ:
        os.environ["PYTHONWARNINGS"] = "ignore::FutureWarning"  # worker processes
        warnings.filterwarnings("ignore", category=FutureWarning)  # this one: the variable is read at start-up only
    try:
        app()
    except BrokenPipeError:  # e.g. `medda methods | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
