"""Packaging: the recipes and data cards ship with medda, and a user's own paths still win."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from medda.resources import bundled, user_or_bundled

REPO = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    """pyproject.toml lists packages by hand (for the configs/ and data_cards/ mapping): a new one must be added."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for root in ("medda", "pipelines")
               for p in (REPO / root).rglob("__init__.py")}
    assert on_disk | {"medda.configs", "medda.data_cards"} == listed


def test_bundled_files_are_the_repository_files():
    assert bundled("configs", "phantom_source.yaml").read_text(encoding="utf-8") == (REPO / "configs/phantom_source.yaml").read_text(encoding="utf-8")
    assert bundled("data_cards", "acdc.yaml").read_text(encoding="utf-8") == (REPO / "data_cards/acdc.yaml").read_text(encoding="utf-8")


def test_user_paths_win_and_only_folder_names_fall_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = bundled("configs", "phantom_source.yaml")
    assert user_or_bundled(Path("configs/phantom_source.yaml"), "configs") == shipped
    assert user_or_bundled(Path("phantom_source.yaml"), "configs") == shipped
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/phantom_source.yaml").write_text("mine: 1\n")
    assert user_or_bundled(Path("configs/phantom_source.yaml"), "configs") == Path("configs/phantom_source.yaml")
    # Anything else that is missing stays as given, so the "not found" error names what the user typed.
    for missing in ("elsewhere/phantom_source.yaml", "configs/nope.yaml", str(tmp_path / "phantom_source.yaml")):
        assert user_or_bundled(Path(missing), "configs") == Path(missing)


def test_cli_runs_a_shipped_recipe_from_another_folder(tmp_path, monkeypatch):
    """`medda card validate data_cards/NAME.yaml` outside the repository reads the shipped card."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["card", "validate", "data_cards/phantom_site_a.yaml"])
    assert result.exit_code == 0 and "valid" in result.output


@pytest.mark.slow
def test_wheel_ships_recipes_cards_and_type_marker(tmp_path):
    source = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info/ beside the sources
    for name in ("medda", "pipelines", "configs", "data_cards"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("medda-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"medda/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    expected |= {f"medda/data_cards/{p.name}" for p in (REPO / "data_cards").glob("*.yaml")}
    assert expected and expected <= names
    assert "medda/py.typed" in names and "pipelines/cli.py" in names
