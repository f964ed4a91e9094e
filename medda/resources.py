"""The recipes (`configs/`) and data cards (`data_cards/`) that ship with medda, found from any folder.

The repository's top-level `configs/` and `data_cards/` folders are installed as the packages `medda.configs` and
`medda.data_cards` (pyproject.toml), so a regular or an editable install reads the same files.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Literal

Folder = Literal["configs", "data_cards"]


def bundled(folder: Folder, name: str) -> Path:
    """Path of the shipped file `name` (e.g. "phantom_source.yaml") in `folder`; it may not exist."""
    return Path(str(files(f"medda.{folder}").joinpath(name)))


def user_or_bundled(path: Path, folder: Folder) -> Path:
    """A path given by a user: as given when it exists (relative to the current folder), else the shipped file.

    Only `NAME.yaml` and `FOLDER/NAME.yaml` fall back (so `medda train configs/phantom_source.yaml` works outside
    the repository); any other missing path is returned unchanged, for the caller's "not found" error.
    """
    path = Path(path)
    if path.exists() or path.is_absolute() or path.parts[:-1] not in ((), (folder,)):
        return path
    shipped = bundled(folder, path.name)
    return shipped if shipped.is_file() else path
