"""Data cards: schema, digests, label maps, class-ratio priors and named splits."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import toy_card_fields

from medda.data.cards import DataCard, card_to_yaml, load_card
from medda.data.transforms import load_label
from medda.errors import MeddaError

REPO = Path(__file__).resolve().parent.parent
CARD_FILES = sorted((REPO / "data_cards").glob("*.yaml"))

MINIMAL = toy_card_fields([1.0, 1.0, 2.0], ["ring", "blob"])


def write_card(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_repository_cards_exist():
    names = {p.stem for p in CARD_FILES}
    assert {"acdc", "la", "mscmr_bssfp", "phantom_site_a", "phantom_site_b", "phantom_site_c", "phantom_site_d"} <= names


@pytest.mark.parametrize("path", CARD_FILES, ids=lambda p: p.stem)
def test_every_card_validates_with_a_stable_digest(path, tmp_path):
    card = load_card(path)
    assert card.num_classes >= 2 and card.class_names[0] == "background"
    digest = card.digest()
    assert len(digest) == 12 and digest == load_card(path).digest()
    # The same content elsewhere, re-serialised (other key order and YAML style), has the same digest.
    copy_path = tmp_path / "elsewhere" / "copy.yaml"
    copy_path.parent.mkdir()
    copy_path.write_text(card_to_yaml(card))
    assert load_card(copy_path).digest() == digest
    shuffled = dict(reversed(list(yaml.safe_load(path.read_text(encoding="utf-8")).items())))
    assert load_card(write_card(tmp_path / "shuffled.yaml", shuffled)).digest() == digest
    # Any content change changes it.
    changed = card.model_dump(mode="json")
    changed["description"] = changed.get("description", "") + " (edited)"
    assert load_card(write_card(tmp_path / "changed.yaml", changed)).digest() != digest


def test_digest_changes_with_label_map(tmp_path):
    base = load_card(write_card(tmp_path / "a.yaml", MINIMAL)).digest()
    raw = copy.deepcopy(MINIMAL)
    raw["labels"][2]["code"] = 5
    assert load_card(write_card(tmp_path / "b.yaml", raw)).digest() != base
    raw = copy.deepcopy(MINIMAL)
    raw["spacing"] = "unknown"
    assert load_card(write_card(tmp_path / "c.yaml", raw)).digest() != base


def test_mscmr_label_map(tmp_path, nifti_writer):
    card = load_card(REPO / "data_cards" / "mscmr_bssfp.yaml")
    assert card.label_map == {0: 0, 200: 2, 500: 3, 600: 1}
    assert card.needs_remap and card.num_classes == 4
    assert card.class_names == ["background", "RV", "Myo", "LV"]
    codes = np.zeros((6, 5, 3), np.int16)
    codes[1, 1, 1], codes[2, 2, 1], codes[3, 3, 2] = 200, 500, 600
    path = nifti_writer(tmp_path / "lab.nii.gz", codes)
    label, affine = load_label(path, card)
    assert label.shape == codes.shape and affine.shape == (4, 4)
    assert (label[1, 1, 1], label[2, 2, 1], label[3, 3, 2]) == (2, 3, 1)
    assert int(label.sum()) == 6  # everything else stays background


def test_identity_card_needs_no_remap():
    card = DataCard.model_validate(MINIMAL)
    assert not card.needs_remap
    assert card.label_map == {0: 0, 1: 1, 2: 2}


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([(0, 0, "bg"), (1, 1, "a"), (2, 3, "b")], "without gaps, got [0, 1, 3]"),
        ([(0, 1, "a"), (1, 2, "b")], "without gaps, got [1, 2]"),
        ([(0, 0, "bg"), (1, 1, "a"), (1, 2, "b")], "label codes must be unique"),
        ([(0, 0, "bg"), (1, 1, "a"), (2, 1, "b")], "canonical id 1 has two names"),
    ],
)
def test_inconsistent_label_maps_are_refused(tmp_path, labels, message):
    raw = dict(MINIMAL, labels=[{"code": c, "id": i, "name": n} for c, i, n in labels])
    path = write_card(tmp_path / "bad.yaml", raw)
    with pytest.raises(MeddaError) as err:
        load_card(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_two_codes_may_share_a_class():
    raw = dict(
        MINIMAL,
        labels=[
            {"code": 0, "id": 0, "name": "background"},
            {"code": 1, "id": 1, "name": "heart"},
            {"code": 7, "id": 1, "name": "heart"},
        ],
    )
    card = DataCard.model_validate(raw)
    assert card.num_classes == 2 and card.label_map == {0: 0, 1: 1, 7: 1} and card.needs_remap


def test_card_errors_name_the_file(tmp_path):
    with pytest.raises(MeddaError, match="data card not found"):
        load_card(tmp_path / "missing.yaml")
    raw = dict(MINIMAL)
    del raw["licence"]
    with pytest.raises(MeddaError, match=r"field 'licence' is required"):
        load_card(write_card(tmp_path / "nolicence.yaml", raw))
    with pytest.raises(MeddaError, match=r"field 'colour' is not a known setting"):
        load_card(write_card(tmp_path / "extra.yaml", dict(MINIMAL, colour="red")))


def test_prior_normalisation():
    stats = {
        "measured_by": "test",
        "cases": 2,
        "volume": {"background": 0.9, "ring": 0.06, "blob": 0.02},  # sums to 0.98
        "slice": {"background": 1.0, "ring": 0.5},  # blob missing -> 0
    }
    card = DataCard.model_validate(dict(MINIMAL, class_stats=stats))
    volume = card.prior("3d")
    assert volume == pytest.approx([0.9 / 0.98, 0.06 / 0.98, 0.02 / 0.98])
    assert sum(volume) == pytest.approx(1.0)
    assert card.prior("2d") == pytest.approx([1 / 1.5, 0.5 / 1.5, 0.0])
    assert DataCard.model_validate(MINIMAL).prior("3d") is None  # not measured
    zero = dict(stats, volume={"background": 0.0})
    assert DataCard.model_validate(dict(MINIMAL, class_stats=zero)).prior("3d") is None


def test_phantom_card_prior_matches_class_order():
    card = load_card(REPO / "data_cards" / "phantom_site_a.yaml")
    prior = card.prior("3d")
    assert prior is not None and len(prior) == card.num_classes
    assert sum(prior) == pytest.approx(1.0) and prior[0] == max(prior)


def test_split_resolution_from_file_and_ids(tmp_path):
    raw = dict(
        MINIMAL,
        splits={
            "train": {"file": "splits/train.txt"},
            "few": {"ids": ["patient001", "patient007"]},
            "gone": {"file": "splits/missing.txt"},
        },
    )
    card = DataCard.model_validate(raw)
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text(
        "# training patients\npatient001\n\n  patient002  \npatient003\n"
    )
    assert card.split_ids("train", tmp_path) == ["patient001", "patient002", "patient003"]
    assert card.split_ids("few", tmp_path) == ["patient001", "patient007"]
    with pytest.raises(MeddaError, match=r"no split 'test' \(known: few, gone, train\)"):
        card.split_ids("test", tmp_path, "toy.yaml")
    with pytest.raises(MeddaError, match=r"split 'gone' names .*missing.txt, which does not exist"):
        card.split_ids("gone", tmp_path, "toy.yaml")


def test_split_needs_exactly_one_source(tmp_path):
    raw = dict(MINIMAL, splits={"both": {"file": "a.txt", "ids": ["x"]}})
    with pytest.raises(MeddaError, match="exactly one of 'file' or 'ids'"):
        load_card(write_card(tmp_path / "both.yaml", raw))
    raw = dict(MINIMAL, splits={"neither": {}})
    with pytest.raises(MeddaError, match="exactly one of 'file' or 'ids'"):
        load_card(write_card(tmp_path / "neither.yaml", raw))


def test_acdc_splits_resolve_relative_to_the_dataset(tmp_path):
    card = load_card(REPO / "data_cards" / "acdc.yaml")
    assert not card.spacing_known
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "labeled_3_patients.txt").write_text("patient001\npatient021\npatient041\n")
    assert card.split_ids("labeled_3_patients", tmp_path) == ["patient001", "patient021", "patient041"]
