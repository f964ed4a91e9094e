"""User-facing errors: one clear sentence, no traceback (the CLI prints it and exits non-zero)."""

from __future__ import annotations

from pathlib import Path


class MeddaError(Exception):
    """A user's mistake (bad input, bad config). Internal bugs raise ordinary exceptions."""


class InputError(MeddaError):
    """Bad input data or configuration, named by file and field."""

    def __init__(self, what: str | Path | None, field: str | None, expected: str):
        where = ", ".join(p for p in (f"{what}" if what else "", f"field '{field}'" if field else "") if p)
        super().__init__(f"{where}: {expected}" if where else expected)
        self.what, self.field, self.expected = what, field, expected
