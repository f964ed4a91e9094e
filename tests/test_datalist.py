"""Datalists: folder, nnU-Net and decathlon-JSON layouts, card splits with patient prefixes, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import toy_card_fields

from medda.config import DatasetRef
from medda.data.cards import DataCard
from medda.data.datalist import case_id, datalist_digest, matches, read_cases
from medda.errors import MeddaError

CARD = DataCard.model_validate(
    toy_card_fields(
        [1.0, 1.0, 1.0], ["fg"], splits={"labeled": {"ids": ["patient001"]}, "test": {"file": "splits/test.txt"}}
    )
)

TINY = np.zeros((4, 4, 2), np.float32)


def touch_images(writer, folder: Path, names: list[str]) -> None:
    for name in names:
        writer(folder / name, TINY)


def ids(cases: list[dict]) -> list[str]:
    return [c["id"] for c in cases]


def test_folder_layout_pairs_images_and_labels(tmp_path, nifti_writer):
    touch_images(nifti_writer, tmp_path / "images", ["b.nii.gz", "a.nii.gz", "c.nii"])
    touch_images(nifti_writer, tmp_path / "labels", ["a.nii.gz", "b.nii.gz"])
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / ".hidden.nii.gz").write_bytes(b"")
    cases = read_cases(DatasetRef(path=tmp_path), CARD)
    assert ids(cases) == ["a", "b", "c"]
    assert cases[0] == {
        "id": "a",
        "image": str(tmp_path / "images" / "a.nii.gz"),
        "label": str(tmp_path / "labels" / "a.nii.gz"),
    }
    assert "label" not in cases[2]  # unlabelled case: no label key at all
    assert all(Path(c["image"]).is_absolute() for c in cases)


def test_folder_with_four_digit_case_numbers(tmp_path, nifti_writer):
    """Plain file names ending in _NNNN are case ids, not nnU-Net channel suffixes."""
    names = ["case_0001.nii.gz", "case_0002.nii.gz"]
    touch_images(nifti_writer, tmp_path / "images", names)
    touch_images(nifti_writer, tmp_path / "labels", names)
    cases = read_cases(DatasetRef(path=tmp_path), CARD)
    assert ids(cases) == ["case_0001", "case_0002"]
    for case in cases:
        assert Path(case["label"]).name == Path(case["image"]).name


def test_nnunet_layout(tmp_path, nifti_writer):
    (tmp_path / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz"})
    )
    touch_images(
        nifti_writer,
        tmp_path / "imagesTr",
        [
            "heart_001_0000.nii.gz",
            "heart_002_0000.nii.gz",
            "heart_002_0001.nii.gz",
            "amos_0005_0000.nii.gz",
        ],
    )
    touch_images(
        nifti_writer, tmp_path / "labelsTr", ["heart_001.nii.gz", "heart_002.nii.gz", "amos_0005.nii.gz"]
    )
    cases = read_cases(DatasetRef(path=tmp_path), CARD)
    assert ids(cases) == ["amos_0005", "heart_001", "heart_002"]  # the extra channel _0001 is not a case
    by_id = {c["id"]: c for c in cases}
    assert by_id["heart_002"]["image"].endswith("imagesTr/heart_002_0000.nii.gz")
    assert by_id["heart_002"]["label"].endswith("labelsTr/heart_002.nii.gz")
    assert by_id["amos_0005"]["label"].endswith("labelsTr/amos_0005.nii.gz")


def test_decathlon_json_relative_paths_and_split_keys(tmp_path, nifti_writer):
    root = tmp_path / "site"
    touch_images(nifti_writer, root / "imagesTr", ["s_000.nii.gz", "s_001.nii.gz", "s_002.nii.gz"])
    touch_images(nifti_writer, root / "labelsTr", ["s_000.nii.gz", "s_001.nii.gz", "s_002.nii.gz"])
    datalist = root / "datalist.json"
    datalist.write_text(
        json.dumps(
            {
                "training": [
                    {"image": "imagesTr/s_000.nii.gz", "label": "labelsTr/s_000.nii.gz"},
                    {"image": "./imagesTr/s_001.nii.gz", "label": "labelsTr/s_001.nii.gz"},
                ],
                "validation": [{"image": "imagesTr/s_002.nii.gz", "label": "labelsTr/s_002.nii.gz"}],
                "test": ["imagesTr/s_002.nii.gz"],
            }
        )
    )
    training = read_cases(DatasetRef(path=datalist, split="training"), CARD)
    assert ids(training) == ["s_000", "s_001"]
    assert training[1]["image"] == str((root / "imagesTr" / "s_001.nii.gz").resolve())
    assert training[1]["label"] == str((root / "labelsTr" / "s_001.nii.gz").resolve())
    assert ids(read_cases(DatasetRef(path=datalist, split="validation"), CARD)) == ["s_002"]
    test = read_cases(DatasetRef(path=datalist, split="test"), CARD)
    assert ids(test) == ["s_002"] and "label" not in test[0]
    assert len(read_cases(DatasetRef(path=datalist), CARD)) == 4  # no split: every key
    assert ids(read_cases(DatasetRef(path=datalist, split="training", limit=1), CARD)) == ["s_000"]


def test_phantom_datalist(phantom_root):
    cases = read_cases(DatasetRef(path=phantom_root / "A" / "datalist.json", split="training"), CARD)
    assert ids(cases) == ["A_000", "A_001", "A_002"]
    assert all(Path(c["label"]).is_file() for c in cases)


@pytest.fixture
def acdc_like(tmp_path, nifti_writer) -> Path:
    names = [f"patient{p:03d}_frame{f:02d}.nii.gz" for p in (1, 2, 10) for f in (1, 12)]
    touch_images(nifti_writer, tmp_path / "images", names)
    touch_images(nifti_writer, tmp_path / "labels", names)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "test.txt").write_text("patient010\n")
    return tmp_path


def test_split_by_patient_prefix(acdc_like):
    labeled = read_cases(DatasetRef(path=acdc_like, split="labeled"), CARD)
    assert ids(labeled) == ["patient001_frame01", "patient001_frame12"]
    test = read_cases(DatasetRef(path=acdc_like, split="test"), CARD)
    assert ids(test) == ["patient010_frame01", "patient010_frame12"]


def test_exclude_split(acdc_like):
    rest = read_cases(DatasetRef(path=acdc_like, exclude_split="labeled"), CARD)
    assert ids(rest) == [
        "patient002_frame01",
        "patient002_frame12",
        "patient010_frame01",
        "patient010_frame12",
    ]
    both = read_cases(DatasetRef(path=acdc_like, split="test", exclude_split="labeled"), CARD)
    assert ids(both) == ["patient010_frame01", "patient010_frame12"]
    with pytest.raises(MeddaError, match="no cases left"):
        read_cases(DatasetRef(path=acdc_like, split="labeled", exclude_split="labeled"), CARD)


def test_prefix_matching_is_on_whole_tokens():
    assert matches("patient001_frame01", {"patient001"})
    assert matches("patient001", {"patient001"})
    assert not matches("patient0011_frame01", {"patient001"})
    assert not matches("patient001", {"patient001_frame01"})
    assert not matches("patient002_frame01", {"patient001"})


def test_unknown_split_names_the_card(acdc_like):
    with pytest.raises(MeddaError, match=r"cards/toy.yaml: field 'splits' has no split 'val'"):
        read_cases(DatasetRef(path=acdc_like, split="val"), CARD, "cards/toy.yaml")


def test_missing_files_are_named(tmp_path, nifti_writer):
    datalist = tmp_path / "list.json"
    nifti_writer(tmp_path / "img.nii.gz", TINY)
    datalist.write_text(json.dumps({"training": [{"image": "img.nii.gz", "label": "lab/missing.nii.gz"}]}))
    with pytest.raises(MeddaError) as err:
        read_cases(DatasetRef(path=datalist), CARD)
    assert (
        str(err.value)
        == f"{(tmp_path / 'lab' / 'missing.nii.gz').resolve()}: label file of case 'img' not found"
    )
    datalist.write_text(json.dumps({"training": [{"image": "nope.nii.gz"}]}))
    with pytest.raises(MeddaError, match=r"nope.nii.gz: image file of case 'nope' not found"):
        read_cases(DatasetRef(path=datalist), CARD)


def test_layout_errors(tmp_path):
    with pytest.raises(MeddaError, match="dataset path does not exist"):
        read_cases(DatasetRef(path=tmp_path / "absent"), CARD)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeddaError, match=r"expected an 'images/'"):
        read_cases(DatasetRef(path=tmp_path / "empty"), CARD)
    (tmp_path / "noimg" / "images").mkdir(parents=True)
    with pytest.raises(MeddaError, match="no images found"):
        read_cases(DatasetRef(path=tmp_path / "noimg"), CARD)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MeddaError, match=r"bad.json: not valid JSON"):
        read_cases(DatasetRef(path=bad), CARD)
    bad.write_text(json.dumps({"cases": []}))
    with pytest.raises(MeddaError, match="field 'training' missing"):
        read_cases(DatasetRef(path=bad), CARD)
    bad.write_text(json.dumps({"training": [{"label": "x.nii.gz"}]}))
    with pytest.raises(MeddaError, match=r"field 'training\[0\].image' missing"):
        read_cases(DatasetRef(path=bad), CARD)


def test_case_id_and_digest(tmp_path, nifti_writer):
    assert case_id("/x/images/abc.nii.gz") == "abc"
    assert case_id("abc.nrrd") == "abc" and case_id("abc.mha") == "abc"
    a = nifti_writer(tmp_path / "a.nii.gz", TINY)
    cases = [{"id": "a", "image": str(a)}]
    digest = datalist_digest(cases)
    assert digest == datalist_digest([dict(c) for c in cases])
    nifti_writer(a, np.ones((5, 4, 2), np.float32))  # same name, other content size
    assert datalist_digest(cases) != digest


def test_decathlon_task_folder_reads_its_dataset_json(tmp_path, nifti_writer):
    """A Medical Segmentation Decathlon task folder (imagesTr + a dataset.json that lists the cases) is not nnU-Net."""
    touch_images(nifti_writer, tmp_path / "imagesTr", ["la_003.nii.gz", "la_004.nii.gz"])
    touch_images(nifti_writer, tmp_path / "labelsTr", ["la_003.nii.gz", "la_004.nii.gz"])
    entries = [{"image": f"./imagesTr/la_00{i}.nii.gz", "label": f"./labelsTr/la_00{i}.nii.gz"} for i in (3, 4)]
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "LeftAtrium", "training": entries, "test": []}))
    cases = read_cases(DatasetRef(path=tmp_path), CARD)
    assert ids(cases) == ["la_003", "la_004"]
    assert all(c["label"].endswith(f"labelsTr/{c['id']}.nii.gz") for c in cases)
