"""A shared MLflow tracking server for a team: `medda server` (the `mlflow server` command, with safe defaults).

Defaults: bound to 127.0.0.1 (loopback: nothing outside this machine can reach it). Another interface
(`--host 0.0.0.0`) is refused unless the host names clients use are listed (`--allowed-hosts`, MLflow's
DNS-rebinding check), MLflow's basic-auth app is on (`--basic-auth`), or the user insists (`--insecure-expose`,
e.g. behind an authenticating reverse proxy): MLflow's server itself has no authentication. SQLite backend store
(`sqlite:///mlflow.db`; PostgreSQL for teams: `postgresql+psycopg2://user@host:5432/db`, password from PGPASSWORD
or ~/.pgpass, never on the command line), artifacts served by the server from `./mlartifacts`, one worker,
and MLflow's background job execution off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: medda needs none).

Runs point at it with `tracking.uri=http://127.0.0.1:5000`; medda refuses to start a run when that server
is unreachable unless `tracking.fallback_uri` is set (see `medda.tracking.resolve_uri`).

This module starts the server as a subprocess (`python -m mlflow server`); it never imports mlflow.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from medda.errors import MeddaError
from medda.tracking import _redact, server_reachable

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_server_options(host: str, allowed_hosts: str = "", basic_auth: bool = False, insecure: bool = False) -> None:
    """Refuse to bind a non-loopback interface without a host allow-list, basic auth or an explicit insistence,
    and basic auth without the package MLflow's auth app needs."""
    if basic_auth and importlib.util.find_spec("flask_wtf") is None:
        raise MeddaError("--basic-auth: MLflow's basic-auth app needs Flask-WTF; install it with "
                         "pip install 'mlflow[auth]'")
    if is_loopback(host) or allowed_hosts.strip() or basic_auth or insecure:
        return
    raise MeddaError(
        f"--host {host}: refusing to expose an MLflow server without authentication; give --allowed-hosts "
        "(the host names clients use, e.g. mlflow.lab.org:5000), --basic-auth, or --insecure-expose "
        "(behind a firewall or an authenticating reverse proxy)"
    )


def server_command(
    port: int = 5000, host: str = LOOPBACK, backend_store_uri: str = "sqlite:///mlflow.db",
    artifacts_destination: str | Path = "mlartifacts", workers: int = 1, allowed_hosts: str = "",
    basic_auth: bool = False,
) -> list[str]:
    """The `mlflow server` command line (artifacts proxied by the server, so clients need no storage access).

    Args:
        allowed_hosts: comma-separated Host headers MLflow accepts (its DNS-rebinding check; default there:
            localhost and private IPs), e.g. "mlflow.lab.org,mlflow.lab.org:5000".
        basic_auth: run MLflow's basic-auth app (users and permissions in its own database).
    """
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
        "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(artifacts_destination),
        "--workers", str(workers),
    ]
    if allowed_hosts.strip():
        command += ["--allowed-hosts", allowed_hosts.strip()]
    if basic_auth:
        command += ["--app-name", "basic-auth"]
    return command


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def printable(command: list[str]) -> str:
    """The command as a reviewer may see it (credentials in URIs redacted)."""
    return " ".join(_redact({"v": c})["v"] if "://" in c else c for c in command)


@dataclass
class ServerProcess:
    process: subprocess.Popen
    uri: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def start_server(
    port: int | None = None, host: str = LOOPBACK, backend_store_uri: str = "sqlite:///mlflow.db",
    artifacts_destination: str | Path = "mlartifacts", workers: int = 1, log: Path | None = None,
    timeout: float = 120.0, cwd: Path | None = None, allowed_hosts: str = "", insecure: bool = False,
) -> ServerProcess:
    """Start `mlflow server` in its own process group and wait until /health answers (or fail with its log)."""
    check_server_options(host, allowed_hosts, insecure=insecure)
    port = port or free_port(host if is_loopback(host) else LOOPBACK)
    log = log or Path(cwd or ".") / f"mlflow-server-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = server_command(port, host, backend_store_uri, artifacts_destination, workers, allowed_hosts)
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=server_env(), cwd=cwd,
                                   start_new_session=True)  # own process group: stopped as a whole, by PID
    uri = f"http://{LOOPBACK if host in ('0.0.0.0', '::') else host}:{port}"
    server = ServerProcess(process, uri, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            raise MeddaError(f"mlflow server exited with status {process.returncode}:\n" + "\n".join(tail))
        if server_reachable(uri, timeout=1.0):
            return server
        time.sleep(0.25)
    stop_server(server)
    raise MeddaError(f"mlflow server did not answer on {uri} within {timeout:.0f} s (log: {log})")


def stop_server(server: ServerProcess, timeout: float = 15.0) -> None:
    """SIGTERM the server's process group (its uvicorn workers too), SIGKILL if it does not stop."""
    process = server.process
    try:
        os.killpg(process.pid, signal.SIGTERM)  # start_new_session: the group id is the server's PID
    except ProcessLookupError:
        if process.poll() is None:
            process.wait(timeout)
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # workers of the group may outlive the leader briefly
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(5)
