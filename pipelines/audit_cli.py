"""`medda audit | compare | promote | server`: auditing through MLflow (registered on the main app by `register`).

Reading commands take `--tracking-uri` (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db). User mistakes
(unknown run, unreachable server, missing reason) print one sentence and exit with status 2.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipelines.guard import run_guarded

TrackingUri = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)."),
]


def _store(uri: str | None):
    from medda.tracking import TrackingStore, default_uri

    return TrackingStore(uri or default_uri())


def audit(
    ref: Annotated[str, typer.Argument(help="A run id, or a registered model: models:/<name>/<version> or models:/<name>@<alias>.",
                                       show_default=False)],
    out: Annotated[Path, typer.Option(help="Folder for the reports.")] = Path("audit"),
    tracking_uri: TrackingUri = None,
    strict: Annotated[bool, typer.Option(help="Exit with status 3 when the report has warnings (for CI gates).")] = False,
) -> None:
    """Reconstruct a result's chain (run -> parent runs -> data -> config -> code) with evidence and warnings."""

    def run() -> int:
        from medda.audit import build_audit, write_report

        report = build_audit(_store(tracking_uri), ref)
        html_path, md_path = write_report(report, out)
        for step in report.chain:
            typer.echo(f"  {step.label}")
        for finding in report.findings:
            typer.echo(f"{finding.level.upper()}: [{finding.code}] {finding.message}")
        typer.echo(f"report: {html_path} (self-contained)\nmarkdown: {md_path}")
        return 3 if strict and report.warnings else 0

    run_guarded(run)


def compare(
    experiment: Annotated[list[str] | None, typer.Option("--experiment", help="Experiment name (repeatable; default all).")] = None,
    target_card_digest: Annotated[str | None, typer.Option(help="Only evaluations on this target data card digest.")] = None,
    eval_digest: Annotated[str | None, typer.Option(help="Only evaluations of this datalist digest (same cases/labels).")] = None,
    before: Annotated[str | None, typer.Option(help="Per-case mode: evaluation run of the source model.")] = None,
    after: Annotated[str | None, typer.Option(help="Per-case mode: evaluation run of the adapted model.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Per-case mode: also write the before/after plot (PNG).")] = None,
    csv: Annotated[Path | None, typer.Option(help="Also write the table as CSV.")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Methods x metrics of evaluation runs on the same target and labels (or one before/after pair per case)."""

    def run() -> None:
        from medda import audit as audit_mod
        from medda.errors import MeddaError
        from medda.metrics import write_table_csv

        store = _store(tracking_uri)
        if before or after:
            if not (before and after):
                raise MeddaError("compare: give both --before and --after (evaluation run ids)")
            rows = audit_mod.compare_before_after(store, before, after)
            typer.echo(audit_mod.format_before_after(rows))
            if plot:
                from medda.evidence import before_after_figure

                typer.echo(f"plot: {before_after_figure(rows, plot)}")
        else:
            groups = audit_mod.compare(store, experiment, target_card_digest, eval_digest)
            typer.echo(audit_mod.format_compare(groups))
            rows = [{"target": g.card_name, "card_digest": g.card_digest, "eval_digest": g.eval_digest, **r}
                    for g in groups for r in g.rows]
        if csv and rows:
            typer.echo(f"csv: {write_table_csv(rows, csv)}")

    run_guarded(run)


def promote(
    model: Annotated[str, typer.Argument(help="Registered model name (e.g. medda-phantom_site_b-ring-blob-rv).",
                                         show_default=False)],
    version: Annotated[str, typer.Argument(help="Version number to promote.", show_default=False)],
    alias: Annotated[str, typer.Option(help="Alias to move to this version.")] = "champion",
    reason: Annotated[str, typer.Option(help="Why (recorded on the version with who and when).", show_default=False)] = "",
    tracking_uri: TrackingUri = None,
) -> None:
    """Move an alias (default `champion`) to a model version, recording who and why as model-version tags."""

    def run() -> None:
        record = _store(tracking_uri).promote(model, version, alias, reason, getpass.getuser())
        moved = f" (was version {record['previous']})" if record["previous"] and record["previous"] != record["version"] else ""
        typer.echo(f"{record['name']}@{record['alias']} -> version {record['version']}{moved}; "
                   f"recorded by {record['by']} at {record['at']}: {record['reason']}")

    run_guarded(run)


def server(
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface; 127.0.0.1 keeps the server on this machine.")] = "127.0.0.1",
    backend_store_uri: Annotated[str, typer.Option(help="sqlite:///mlflow.db, or postgresql+psycopg2://user@host:5432/db for teams (password: PGPASSWORD).")] = "sqlite:///mlflow.db",
    artifacts_destination: Annotated[str, typer.Option(help="Where the server stores artifacts.")] = "mlartifacts",
    workers: Annotated[int, typer.Option(help="Server worker processes.")] = 1,
    allowed_hosts: Annotated[str, typer.Option(help="Comma-separated host names clients use (MLflow's DNS-rebinding check), e.g. mlflow.lab.org,mlflow.lab.org:5000.")] = "",
    basic_auth: Annotated[bool, typer.Option(help="MLflow's basic-auth app: users and passwords (needs pip install 'mlflow[auth]').")] = False,
    insecure_expose: Annotated[bool, typer.Option(help="Allow a non-loopback --host without --allowed-hosts or --basic-auth (behind an authenticating proxy).")] = False,
    print_command: Annotated[bool, typer.Option(help="Only print the command that would run.")] = False,
) -> None:
    """Run a shared MLflow tracking server (foreground; Ctrl-C stops it). Runs use tracking.uri=http://HOST:PORT."""
    from medda.server import check_server_options, is_loopback, printable, server_command, server_env

    run_guarded(lambda: check_server_options(host, allowed_hosts, basic_auth, insecure_expose))
    command = server_command(port, host, backend_store_uri, artifacts_destination, workers, allowed_hosts, basic_auth)
    if print_command:
        typer.echo("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false " + printable(command))
        return
    if not is_loopback(host) and not basic_auth:
        typer.echo(f"WARNING: binding to {host} without --basic-auth: anyone who can reach this port can read and "
                   f"change runs and models", err=True)
    typer.echo(f"MLflow server on http://{host}:{port} (store {printable([backend_store_uri])}); "
               f"runs: tracking.uri=http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}")
    sys.stdout.flush()
    os.execvpe(command[0], command, server_env())


def register(app: typer.Typer) -> None:
    """Add the auditing commands to the `medda` app."""
    app.command()(audit)
    app.command()(compare)
    app.command()(promote)
    app.command()(server)
