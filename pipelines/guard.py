"""The command line's one error guard: a user mistake prints one line and exits 2; an internal bug keeps its traceback."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import typer

from medda.errors import Interrupted, MeddaError


def user_error(err: BaseException | None) -> str | None:
    """The MeddaError message inside `err` (MONAI wraps transform errors), or None for internal bugs."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MeddaError):
            return str(err)
        err = err.__cause__ or err.__context__
    return None


def disk_full(err: BaseException | None) -> str | None:
    """One line for a full disk or exhausted quota anywhere in `err`'s chain, or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" while writing {err.filename}" if err.filename else ""
            return (f"no space left on the device{where} ({os.strerror(err.errno)}); outputs written so far are kept: "
                    "free some space and run the command again (train, train-ssl and adapt continue with --resume)")
        err = err.__cause__ or err.__context__
    return None


def run_guarded(action: Callable[[], int | None], on_user_error: Callable[[], None] | None = None) -> None:
    """Run a command's body; exit with the status it returns (0 or None: success).

    On a user error, call `on_user_error` (e.g. remove half-written outputs), print `medda: error: MESSAGE` on
    stderr and exit 2. A full disk prints one line and exits 2 too, keeping the outputs (checkpoints are written
    atomically, so none is half-written; the resume state lets the run continue). A run stopped by SIGINT/SIGTERM
    keeps its outputs, prints how to resume it and exits with 128 + the signal number.
    """
    try:
        code = action()
    except Interrupted as stop:
        typer.echo(f"medda: {interrupted_message(stop)}", err=True)
        raise typer.Exit(128 + stop.signum) from None
    except (KeyboardInterrupt, SystemExit, typer.Exit):
        raise
    except BaseException as err:  # noqa: BLE001 - classify, then re-raise internal bugs
        full = disk_full(err)
        if full is not None:  # not the user's input: the outputs (resume states) are kept for the rerun
            typer.echo(f"medda: error: {full}", err=True)
            raise typer.Exit(2) from None
        message = user_error(err)
        if message is None:
            raise
        if on_user_error is not None:
            on_user_error()
        typer.echo(f"medda: error: {message}", err=True)
        raise typer.Exit(2) from None
    if code:
        raise typer.Exit(code)


def interrupted_message(stop: Interrupted) -> str:
    """One line: which signal stopped the run and how to continue it."""
    what = f"stopped by {stop}"
    if stop.resume is None:
        return f"{what} before its first resume state was written; run the command again (without --resume)"
    return f"{what}; resume state {stop.resume}: continue with the same command and overrides plus --resume"
