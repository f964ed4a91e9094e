"""The command line's one error guard (pipelines/guard.py) and how the commands use it."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from medda.errors import MeddaError
from pipelines.guard import run_guarded, user_error


def test_user_error_found_through_wrapping_exceptions():
    try:
        try:
            raise MeddaError("card.yaml: field 'labels' is missing")
        except MeddaError as inner:
            raise RuntimeError("applying transform") from inner  # as MONAI wraps transform errors
    except RuntimeError as outer:
        assert user_error(outer) == "card.yaml: field 'labels' is missing"
    assert user_error(ValueError("a bug")) is None


def test_user_error_exits_2_after_cleanup(capsys):
    cleaned = []

    def fail() -> None:
        raise MeddaError("recipe.yaml: field 'train.iterations' must be positive")

    with pytest.raises(typer.Exit) as exit_:
        run_guarded(fail, lambda: cleaned.append(True))
    assert exit_.value.exit_code == 2 and cleaned == [True]
    assert capsys.readouterr().err == "medda: error: recipe.yaml: field 'train.iterations' must be positive\n"


def test_internal_bug_keeps_its_traceback_and_outputs():
    cleaned = []
    with pytest.raises(ZeroDivisionError):
        run_guarded(lambda: 1 // 0, lambda: cleaned.append(True))
    assert cleaned == []


def test_returned_status_is_the_exit_status():
    run_guarded(lambda: 0)
    with pytest.raises(typer.Exit) as exit_:
        run_guarded(lambda: 3)
    assert exit_.value.exit_code == 3


def test_a_command_that_returns_a_value_still_exits_0(monkeypatch, tmp_path):
    """`medda demo` returns its table: a value returned by a command body must not become an exit status."""
    import pipelines.demo
    from pipelines.cli import app

    monkeypatch.setattr(pipelines.demo, "run_demo", lambda *args, **kwargs: ["a table line"])
    result = CliRunner().invoke(app, ["demo", "--quick", "--output", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
