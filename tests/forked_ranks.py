"""Helper of the multi-process and command-line tests (not a test module): programs started as `python -m MODULE ARGS`
or `python SCRIPT ARGS` would start them, but forked from a server process that has imported torch, MONAI, MLflow
and medda once; and N ranks of such a program with torchrun's environment.

A fresh interpreter spends about 15 s of CPU importing MONAI (which imports all of its submodules) on a 2-core
machine, and torchrun starts one per rank: a dozen launches cost minutes of suite time. Here each process forks from
a `multiprocessing` forkserver that imported those modules once, so a launch costs the work of the command. The
program runs as its own `__main__` (`runpy`) with the given environment, its stdout and stderr go to files, and the
interpreter's atexit handlers run at its end, as at a normal exit. Ranks get what torchrun gives a worker (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS=1), and, as torchrun does, the
others are stopped when one fails. Tests that depend on torchrun itself (its launcher, how it stops the other ranks
of a killed one) or on the installed console script still start those.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

PRELOAD = ["torch", "torch.distributed", "monai", "mlflow", "medda.api", "medda.engine.loop", "pipelines.cli"]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)
CLI = ("-m", "pipelines.cli")


def _program_main(program: tuple[str, ...], args: list[str], env: dict[str, str], cwd: str, log: str) -> None:
    """The child: the environment, stdout/stderr to `log`.out/.err, then the program as its own __main__."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, suffix in ((1, "out"), (2, "err")):
        handle = os.open(f"{log}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115 - lives as long as the child
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False, buffering=1)  # noqa: SIM115
    code = 0
    try:
        if program[0] == "-m":
            sys.argv = [program[1], *args]
            runpy.run_module(program[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [program[0], *args]
            sys.path.insert(0, str(Path(program[0]).resolve().parent))
            runpy.run_path(program[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported as the interpreter reports an uncaught exception
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what a normal interpreter exit runs (multiprocessing children skip it)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Forked:
    """One forked program, with the part of `subprocess.Popen`'s interface the tests use."""

    def __init__(self, *args: str, program: tuple[str, ...] = CLI, cwd: Path | str = ".",
                 env: dict[str, str] | None = None):
        self.args = [*program, *args]
        self._logs = tempfile.mkdtemp(prefix="medda-forked-")
        env = dict(os.environ if env is None else env)
        self.process = _CONTEXT.Process(target=_program_main, args=(program, list(args), env, str(Path(cwd).resolve()),
                                                                    f"{self._logs}/log"))
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code; -N when killed by signal N; None while running."""
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s (what torchrun does to the other workers of a failed one)."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end (stopped and TimeoutExpired after `timeout` s); its stdout and stderr."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.stop()
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.output()

    def output(self) -> tuple[str, str]:
        out, err = (Path(f"{self._logs}/log.{s}").read_text(encoding="utf-8", errors="replace") for s in ("out", "err"))
        shutil.rmtree(self._logs, ignore_errors=True)
        return out, err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(*args: str, nproc: int = 2, timeout: float = 600, program: tuple[str, ...] = CLI,
              cwd: Path | str = ".", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Like `torchrun --standalone --nproc_per_node=NPROC PROGRAM ARGS`: every rank's stdout and stderr, rank by rank,
    and the first failing rank's exit code (0 when all succeeded; -N for a rank killed by signal N)."""
    env = dict(os.environ if env is None else env)
    port = _free_port()
    ranks = [
        Forked(*args, program=program, cwd=cwd, env={
            **env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
        for rank in range(nproc)
    ]
    deadline = time.monotonic() + timeout
    failed = None  # the first rank seen failing
    while any(r.returncode is None for r in ranks) and failed is None and time.monotonic() < deadline:
        failed = next((r.returncode for r in ranks if r.returncode not in (None, 0)), None)
        time.sleep(0.05)
    timed_out = failed is None and any(r.returncode is None for r in ranks)
    for rank in ranks:
        rank.stop()
    outputs = [rank.output() for rank in ranks]
    if timed_out:
        raise subprocess.TimeoutExpired(["ranks", *args], timeout)
    if failed is None:
        failed = next((r.returncode for r in ranks if r.returncode != 0), 0)
    return subprocess.CompletedProcess(["ranks", *args], failed, "".join(o[0] for o in outputs),
                                       "".join(o[1] for o in outputs))
