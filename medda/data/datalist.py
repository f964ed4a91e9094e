"""Datalists: turn a folder, a decathlon-style JSON or an nnU-Net raw dataset into a list of cases.

A case is `{"id": str, "image": str, "label": str (optional)}` with absolute paths. Supported layouts:
- a folder with `images/` (and optionally `labels/`), or `imagesTr/` + `labelsTr/`; files are matched by name;
  a sub-folder of `images/` is read as a DICOM series;
- an nnU-Net raw dataset folder (`dataset.json`, `imagesTr/<case>_0000.nii.gz`, `labelsTr/<case>.nii.gz`,
  optionally `imagesTs/`);
- a MONAI decathlon-style JSON (`{"training": [{"image": ..., "label": ...}], "validation": [...], ...}`),
  with paths relative to the JSON's folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from medda.config import DatasetRef
from medda.data.cards import DataCard
from medda.errors import MeddaError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_NNUNET_CHANNEL = re.compile(r"_(\d{4})$")


def case_id(path: Path | str, nnunet_image: bool = False) -> str:
    """File or folder name without image suffixes (and, for an nnU-Net image, without its channel suffix).

    Only nnU-Net images carry a `_0000` channel suffix; elsewhere (labels, plain folders, JSON lists) a trailing
    `_0001` is part of the case id (`case_0001`), and stripping it would merge or mis-pair cases.
    """
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _NNUNET_CHANNEL.sub("", name) if nnunet_image else name


def _image_files(folder: Path) -> list[Path]:
    items = [p for p in folder.iterdir() if p.is_dir() or p.name.endswith(IMAGE_SUFFIXES)]
    return sorted(p for p in items if not p.name.startswith("."))


def _from_folder(root: Path) -> list[dict]:
    layouts = (("images", "labels"), ("imagesTr", "labelsTr"))
    found = next(((i, lab) for i, lab in layouts if (root / i).is_dir()), None)
    if found is None:
        raise MeddaError(
            f"{root}: expected an 'images/' (or nnU-Net 'imagesTr/') folder, a dataset.json, or a datalist .json file"
        )
    images_name, labels_name = found
    images = root / images_name
    nnunet = (root / "dataset.json").is_file()
    labels_dir = root / labels_name
    label_by_id = {case_id(p): p for p in _image_files(labels_dir)} if labels_dir.is_dir() else {}
    cases = []
    for image in _image_files(images):
        if nnunet and not image.name.split(".")[0].endswith("_0000"):
            continue  # extra modalities (_0001, ...) of a multi-channel nnU-Net case: single-channel for now
        cid = case_id(image, nnunet_image=nnunet)
        case = {"id": cid, "image": str(image)}
        if cid in label_by_id:
            case["label"] = str(label_by_id[cid])
        cases.append(case)
    if not cases:
        raise MeddaError(f"{root / images_name}: no images found (expected {', '.join(IMAGE_SUFFIXES)} files)")
    return cases


def _from_json(path: Path, split: str | None) -> tuple[list[dict], bool]:
    """Cases of a decathlon JSON; returns (cases, split_consumed)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MeddaError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise MeddaError(f"{path}: not a text file; expected a decathlon-style datalist JSON") from None
    if not isinstance(data, dict):
        raise MeddaError(f"{path}: expected a JSON object with a 'training' list (decathlon-style datalist)")
    keys = [k for k in ("training", "validation", "test") if k in data]
    if not keys:
        raise MeddaError(f"{path}: field 'training' missing: expected a decathlon-style datalist")
    use = [split] if split in data else keys
    cases = []
    for key in use:
        if not isinstance(data[key], list):
            raise MeddaError(f"{path}: field '{key}' must be a list of cases ({{\"image\": ..., \"label\": ...}})")
        for i, entry in enumerate(data[key]):
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise MeddaError(f"{path}: field '{key}[{i}].image' missing or not a path")
            if entry.get("label") is not None and not isinstance(entry["label"], str):
                raise MeddaError(f"{path}: field '{key}[{i}].label' must be a path")
            case = {"id": case_id(entry["image"]), "image": str((path.parent / entry["image"]).resolve())}
            if entry.get("label"):
                case["label"] = str((path.parent / entry["label"]).resolve())
            cases.append(case)
    return cases, split in data


def _is_decathlon_folder(root: Path) -> bool:
    """A folder whose dataset.json lists its cases (`"training": [{"image": ...}]`, Decathlon) rather than
    describing an nnU-Net raw dataset (`channel_names`, `file_ending`, cases found by file name)."""
    meta = root / "dataset.json"
    if not meta.is_file():
        return False
    try:
        training = json.loads(meta.read_text(encoding="utf-8")).get("training")
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(training, list) and bool(training) and isinstance(training[0], (dict, str))


def matches(cid: str, ids: set[str]) -> bool:
    """A case belongs to a split if its id equals an entry or starts with entry + '_' (patient -> frames)."""
    if cid in ids:
        return True
    parts = cid.split("_")
    return any("_".join(parts[:n]) in ids for n in range(1, len(parts)))


def read_cases(ref: DatasetRef, card: DataCard, card_path: Path | str = "card") -> list[dict]:
    """Resolve a DatasetRef into cases, checking that every file exists."""
    path = ref.path
    if not path.exists():
        raise MeddaError(f"{path}: dataset path does not exist")
    split_done = False
    if path.is_dir() and _is_decathlon_folder(path):
        path = path / "dataset.json"  # a Medical Segmentation Decathlon task: its dataset.json lists the cases
    if path.is_file() and path.suffix == ".json":
        cases, split_done = _from_json(path, ref.split)
        root = path.parent
    else:
        cases = _from_folder(path)
        root = path
    if ref.split and not split_done:
        ids = set(card.split_ids(ref.split, root, card_path))
        cases = [c for c in cases if matches(c["id"], ids)]
    if ref.exclude_split:
        ids = set(card.split_ids(ref.exclude_split, root, card_path))
        cases = [c for c in cases if not matches(c["id"], ids)]
    if ref.limit:
        cases = cases[: ref.limit]
    if not cases:
        raise MeddaError(f"{path}: no cases left after selecting split '{ref.split}'")
    for case in cases:
        for key in ("image", "label"):
            if key in case and not Path(case[key]).exists():
                raise MeddaError(f"{case[key]}: {key} file of case '{case['id']}' not found")
    return cases


def datalist_digest(cases: list[dict]) -> str:
    """Hash of the case list (ids, file names and sizes): identifies the data a run saw."""
    import hashlib

    h = hashlib.sha256()
    for case in sorted(cases, key=lambda c: c["id"]):
        for key in ("image", "label"):
            if key in case:
                p = Path(case[key])
                size = p.stat().st_size if p.is_file() else 0
                h.update(f"{case['id']}|{key}|{p.name}|{size}\n".encode())
    return h.hexdigest()[:12]
