"""User-facing errors: one clear sentence, no traceback (the CLI prints it and exits non-zero)."""

from __future__ import annotations

import signal
from pathlib import Path


class MeddaError(Exception):
    """A user's mistake (bad input, bad config). Internal bugs raise ordinary exceptions."""


class InputError(MeddaError):
    """Bad input data or configuration, named by file and field."""

    def __init__(self, what: str | Path | None, field: str | None, expected: str):
        where = ", ".join(p for p in (f"{what}" if what else "", f"field '{field}'" if field else "") if p)
        super().__init__(f"{where}: {expected}" if where else expected)
        self.what, self.field, self.expected = what, field, expected


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run (a KeyboardInterrupt, so that no `except Exception` swallows it).

    `resume` is the run's resume state when one was written (`medda ... --resume` continues from it); the command
    line exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, resume: Path | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.resume = signum, resume
