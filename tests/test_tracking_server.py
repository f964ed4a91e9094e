"""The shared tracking server: `medda server` defaults, and an MLflow server backed by PostgreSQL.

The PostgreSQL test starts a private cluster (initdb + pg_ctl, loopback only, trust auth, in a temporary folder)
when the Debian `postgresql` binaries and psycopg2 are available, and skips with the reason otherwise. As root,
postgres runs as the `postgres` user (it refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medda.server import free_port, is_loopback, server_command, start_server, stop_server
from pipelines.cli import app

runner = CliRunner()


def test_server_command_defaults_and_print():
    command = server_command(port=5123)
    joined = " ".join(command)
    assert "--host 127.0.0.1" in joined and "--port 5123" in joined and "--workers 1" in joined
    assert "--backend-store-uri sqlite:///mlflow.db" in joined and "--artifacts-destination mlartifacts" in joined
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and not is_loopback("0.0.0.0")
    out = runner.invoke(app, ["server", "--port", "5123", "--print-command",
                              "--backend-store-uri", "postgresql://medda:s3cret@db:5432/mlflow"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false ")
    assert "s3cret" not in out.output and "postgresql://***@db:5432/mlflow" in out.output


# --------------------------------------------------------------------------------------------- PostgreSQL
def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_postgres(argv: list[str]) -> list[str]:
    """postgres refuses to run as root: run its tools as the `postgres` user then."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *argv]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]


@pytest.fixture
def postgres():
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries not found (Debian: apt-get install postgresql; .ci/run installs them)")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install -e '.[dev]')")
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a 'postgres' user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="medda-pg-"))
    os.chmod(root, 0o755)
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    log = root / "postgres.log"

    def run(argv: list[str]) -> None:
        subprocess.run(_as_postgres(argv), check=True, capture_output=True, timeout=120)

    try:
        run([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "medda", "--no-sync", "-E", "UTF8"])
        run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start", "-o",
             f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -F"])
    except subprocess.CalledProcessError as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a private PostgreSQL cluster: {err.stderr.decode(errors='replace')[-300:]}")
    try:
        run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "medda", "mlflow"])
        yield f"postgresql://medda@127.0.0.1:{port}/mlflow", root
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_mlflow_server_on_postgresql(postgres, tmp_path):
    import psycopg2

    from medda.config import TrackingConfig
    from medda.tracking import Tracker, TrackingStore

    dsn, _ = postgres
    # SQLAlchemy's default PostgreSQL driver is psycopg 3; medda's dev extras install psycopg2.
    backend = dsn.replace("postgresql://", "postgresql+psycopg2://", 1)
    server = start_server(backend_store_uri=backend, artifacts_destination=tmp_path / "artifacts",
                          log=tmp_path / "server.log", cwd=tmp_path, timeout=240)
    try:
        tracker = Tracker(TrackingConfig(uri=server.uri, experiment="pg-test"))
        checkpoint = tmp_path / "best.pt"
        checkpoint.write_bytes(b"weights")
        with tracker.run("train-on-postgres", tags={"medda.command": "train", "card.digest": "abc"}):
            tracker.log_dataset("site:source-train", "d1g3st", str(tmp_path), "source-train",
                                cases=[{"id": "c1", "image": str(checkpoint)}])
            tracker.log_metrics({"loss": 0.5}, step=1)
            tracker.log_artifact(checkpoint, "checkpoints")
            version = tracker.register_checkpoint(checkpoint, "medda-pg-test", {"method": "supervised"})
        store = TrackingStore(server.uri)
        run = store.get_run(tracker.run_id)
        assert run.tags["medda.command"] == "train" and run.metrics["loss"] == 0.5
        assert run.dataset_digest("source-train") == "d1g3st"
        assert store.read_json(run.run_id, "datasets/source-train.json")["cases"][0]["id"] == "c1"
        assert version == {"name": "medda-pg-test", "version": "1"}
        assert store.model_version("medda-pg-test", "candidate")["tags"]["method"] == "supervised"
        # the rows really are in PostgreSQL
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT name FROM runs WHERE run_uuid = %s", (run.run_id,))
            assert cur.fetchone() == ("train-on-postgres",)
            cur.execute("SELECT name FROM registered_models")
            assert ("medda-pg-test",) in cur.fetchall()
    finally:
        stop_server(server)
    assert server.process.poll() is not None
