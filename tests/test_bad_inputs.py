"""Bad-input corpus (reliability): each wrong input is refused in one line naming the file and the field,
with exit status 2 through the CLI, nothing left in the output folder, and the inputs unchanged.

Kinds: image/label volumes (float, NaN, 4D, 2D, empty labels; overflow after normalisation; a missing label),
incomplete DICOM series, datalist JSON shapes, data-card fields, checkpoints that do not fit the card or their own weights, tracking
URIs, server exposure, and training that diverges (non-finite loss or weights).
"""

from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import file_hashes, toy_card_fields
from typer.testing import CliRunner

from medda.config import ModelConfig, TrackingConfig, load_config
from medda.errors import MeddaError
from medda.models.factory import build_model, save_checkpoint
from pipelines.cli import app

REPO = Path(__file__).resolve().parent.parent
CARD = REPO / "data_cards" / "phantom_site_a.yaml"  # label codes 0..3 (4 classes), spacing 1.5 x 1.5 x 3 mm
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
CLASS_NAMES = ["background", "ring", "blob", "rv"]
PROGRESS_BAR = re.compile(r"\d+%\|")

runner = CliRunner()


def assert_user_error(result, *needles: str) -> str:
    """Exit 2, no traceback, exactly one line `medda: error: ...` holding every needle."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line.strip() for line in re.split(r"[\r\n]", result.output) if line.strip()]
    lines = [line for line in lines if not PROGRESS_BAR.search(line)]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("medda: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def ws(tmp_path, nifti_writer, make_blob_case, hash_files):
    """Two good labelled cases in dataset/images + dataset/labels and a one-iteration training recipe."""
    ds = tmp_path / "dataset"
    for i in range(2):
        image, label = make_blob_case(seed=i)
        nifti_writer(ds / "images" / f"case{i}.nii.gz", image, AFFINE)
        nifti_writer(ds / "labels" / f"case{i}.nii.gz", label, AFFINE)

    def recipe(train_path: Path = ds, **extra) -> Path:
        raw = {
            "data": {"card": str(CARD), "train": {"path": str(train_path)}, "patch_size": [16, 16, 8]},
            "model": {"channels": [8, 16]},
            "train": {"iterations": 1, "batch_size": 1, "amp": "off", "threads": 1},
            "inference": {"sw_batch_size": 1},
            "tracking": {"enabled": False},
            "output_dir": str(tmp_path / "out"),
            **extra,
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return SimpleNamespace(root=tmp_path, dataset=ds, out=tmp_path / "out", recipe=recipe, writer=nifti_writer,
                           blob=make_blob_case, hashes=lambda: hash_files(tmp_path))


def checkpoint(path: Path, num_classes: int = 4, meta_changes: dict | None = None) -> Path:
    """A tiny 3D UNet checkpoint; `meta_changes` overwrite metadata fields (None deletes one)."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(channels=[8, 16])
    model = build_model(model_cfg, 3, num_classes)
    meta = {
        "model": model_cfg.model_dump(mode="json"), "spatial_dims": 3, "num_classes": num_classes,
        "class_names": CLASS_NAMES[:num_classes], "method": "supervised",
        "data": {"mode": "3d", "slice_axis": 2, "patch_size": [16, 16, 8], "spacing": None, "foreground_crop": True},
    }
    for key, value in (meta_changes or {}).items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    return save_checkpoint(path, model.eval(), meta)


# --------------------------------------------------------------------------------------------- image and label files
def _write_case(ws, which: str, array: np.ndarray, dtype=None) -> tuple[Path, list[str]]:
    path = ws.dataset / f"{which}s" / "case1.nii.gz"
    ws.writer(path, array, AFFINE, dtype=dtype)
    return ws.dataset, [str(path)]


def _float_label(ws):
    _, label = ws.blob(seed=1)
    label = label.astype(np.float32)
    label[label == 1] = 1.4
    label[label == 2] = 2.6
    train, needles = _write_case(ws, "label", label)
    return train, [*needles, "non-integer values [1.4, 2.6]"]


def _nan_label(ws):
    _, label = ws.blob(seed=1)
    label = label.astype(np.float32)
    label[0, 0, 0] = np.nan
    train, needles = _write_case(ws, "label", label)
    return train, [*needles, "label map contains NaN"]


def _image_4d(ws):
    image, _ = ws.blob(seed=1)
    train, needles = _write_case(ws, "image", np.stack([image, image], axis=-1))
    return train, [*needles, "2 channels", "expected a single-channel 3D volume"]


def _image_2d(ws):
    image, _ = ws.blob(seed=1)
    train, needles = _write_case(ws, "image", image[:, :, 0])
    return train, [*needles, "2D (24, 24)", "expected a single-channel 3D volume"]


def _label_4d(ws):
    _, label = ws.blob(seed=1)
    train, needles = _write_case(ws, "label", np.stack([label, label, label], axis=-1))
    return train, [*needles, "label map is 3 channels"]


def _image_zero_size(ws):
    train, needles = _write_case(ws, "image", np.zeros((24, 0, 8), np.float32))
    return train, [*needles, "no voxels"]


def _image_inf(ws):
    image, _ = ws.blob(seed=1)
    image[1, 1, 1] = np.inf
    train, needles = _write_case(ws, "image", image)
    return train, [*needles, "NaN or infinite"]


def _intensity_overflow(ws):
    """Finite raw voxels (3e37) whose z-score overflows: only a check after normalisation sees it."""
    image, _ = ws.blob(seed=1)
    image = image.astype(np.float32) * np.float32(3e35)
    train, needles = _write_case(ws, "image", image)
    return train, [*needles, "field 'intensity.method' = zscore", str(CARD)]


def _missing_label(ws):
    (ws.dataset / "labels" / "case1.nii.gz").unlink()
    return ws.dataset, [str(ws.dataset / "images" / "case1.nii.gz"), "case 'case1' has no label file"]


def _dicom_case(ws, drop: str | None = None, duplicate: str | None = None) -> tuple[Path, list[str]]:
    """Case 1 as a DICOM series folder (images/case1/) with one slice removed or written twice."""
    import shutil

    from test_readers import _sitk_image, _write_dicom_series

    image, _ = ws.blob(seed=1)
    (ws.dataset / "images" / "case1.nii.gz").unlink()
    folder = ws.dataset / "images" / "case1"
    _write_dicom_series(_sitk_image(image.astype(np.int16), AFFINE), folder, "1.2.826.0.1.3680043.2.1125.13.1")
    if drop:
        (folder / drop).unlink()
    if duplicate:
        shutil.copy(folder / duplicate, folder / "copy.dcm")
    return ws.dataset, [str(folder), "DICOM slices are not evenly spaced"]


def _datalist(ws, content) -> tuple[Path, list[str]]:
    path = ws.root / "list.json"
    path.write_text(json.dumps(content))
    return path, [str(path)]


def _datalist_top_level_list(ws):
    train, needles = _datalist(ws, [{"image": "dataset/images/case0.nii.gz"}])
    return train, [*needles, "expected a JSON object"]


def _datalist_training_not_a_list(ws):
    train, needles = _datalist(ws, {"training": {"image": "dataset/images/case0.nii.gz"}})
    return train, [*needles, "field 'training' must be a list"]


def _datalist_entry_not_a_case(ws):
    train, needles = _datalist(ws, {"training": [{"image": "dataset/images/case0.nii.gz"}, 5]})
    return train, [*needles, "field 'training[1].image'"]


def _datalist_binary(ws):
    path = ws.root / "list.json"
    path.write_bytes(bytes(range(128, 256)) * 4)
    return path, [str(path), "not a text file"]


TRAINING_INPUTS = {
    "float_label_map": _float_label,
    "nan_label_map": _nan_label,
    "image_4d": _image_4d,
    "image_2d": _image_2d,
    "label_4d": _label_4d,
    "image_zero_size_axis": _image_zero_size,
    "image_infinite": _image_inf,
    "intensity_overflow_after_normalisation": _intensity_overflow,
    "image_without_label": _missing_label,
    "dicom_slice_missing": lambda ws: _dicom_case(ws, drop="slice003.dcm"),
    "dicom_slice_duplicated": lambda ws: _dicom_case(ws, duplicate="slice004.dcm"),
    "datalist_top_level_list": _datalist_top_level_list,
    "datalist_training_not_a_list": _datalist_training_not_a_list,
    "datalist_entry_not_a_case": _datalist_entry_not_a_case,
    "datalist_binary_file": _datalist_binary,
}


@pytest.mark.parametrize("kind", sorted(TRAINING_INPUTS))
def test_training_refuses_bad_data(ws, kind):
    train_path, needles = TRAINING_INPUTS[kind](ws)
    recipe = ws.recipe(train_path)
    before = ws.hashes()
    result = runner.invoke(app, ["train", str(recipe)])
    assert_user_error(result, *needles)
    assert not ws.out.exists()
    assert ws.hashes() == before


@pytest.mark.parametrize("where", ["unlabeled_without_cache", "val"])
def test_a_bad_case_read_late_is_refused_before_a_run_or_folder_exists(ws, where):
    """Cases that would be read only during training (unlabelled cases without the cache; validation cases at the
    first validation) are checked before work starts: one line, no output folder, no MLflow run, inputs unchanged.
    (Labelled training cases are read up front anyway, by the class-prior measurement.)"""
    from medda.tracking import TrackingStore

    _, needles = _intensity_overflow(ws)  # dataset case1: finite voxels whose z-score overflows
    entry = {i: {"image": str(ws.dataset / "images" / f"case{i}.nii.gz"),
                 "label": str(ws.dataset / "labels" / f"case{i}.nii.gz")} for i in (0, 1)}
    datalist = ws.root / "datalist.json"
    datalist.write_text(json.dumps({"training": [entry[0]], "late": [entry[1]]}), encoding="utf-8")
    db = ws.root / "runs.db"
    recipe = ws.recipe(tracking={"enabled": True, "uri": f"sqlite:///{db}"},
                       train={"iterations": 2, "batch_size": 1, "val_every": 1, "amp": "off", "threads": 1})
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    raw["data"]["train"] = {"path": str(datalist), "split": "training"}
    late = {"path": str(datalist), "split": "late"}
    if where == "val":
        raw["data"]["val"] = late
    else:
        raw["data"].update(unlabeled=late, cache=False)
        raw["method"] = {"name": "mean_teacher"}
    recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    before = file_hashes(ws.dataset)
    assert_user_error(runner.invoke(app, ["train", str(recipe)]), *needles)
    assert not ws.out.exists()
    assert not db.exists() or not TrackingStore(f"sqlite:///{db}").search_runs()
    assert file_hashes(ws.dataset) == before


def test_a_full_disk_is_one_line_and_keeps_the_outputs(ws, monkeypatch):
    """ENOSPC while a checkpoint or resume state is written: one line naming the file, exit 2, no half-written
    file, and the output folder kept (a resume state written earlier lets the run continue once space is freed)."""
    import errno
    import os

    import medda.models.factory as factory

    def full(obj, handle, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), handle.name)

    monkeypatch.setattr(factory.torch, "save", full)
    line = assert_user_error(runner.invoke(app, ["train", str(ws.recipe())]), "no space left on the device",
                             "while writing", str(ws.out), "--resume")
    assert ws.out.is_dir(), line
    assert not list(ws.out.glob(".*.tmp"))


# --------------------------------------------------------------------------------------------- data cards
def _card(**changes) -> dict:
    fields = toy_card_fields([1.5, 1.5, 3.0], ["ring", "blob"])
    fields.update(changes)
    return fields


CARDS = {
    "spacing_negative": (_card(spacing=[1.5, -1.5, 3.0]), ["field 'spacing'", "three positive voxel sizes"]),
    "spacing_zero": (_card(spacing=[1.5, 1.5, 0.0]), ["field 'spacing'", "three positive voxel sizes"]),
    "spacing_two_values": (_card(spacing=[1.5, 1.5]), ["field 'spacing'", "three positive voxel sizes"]),
    "labels_empty": (_card(labels=[]), ["field 'labels'", "at least one structure"]),
    "labels_background_only": (_card(labels=[{"code": 0, "id": 0, "name": "background"}]),
                               ["field 'labels'", "at least one structure"]),
}


@pytest.mark.parametrize("kind", sorted(CARDS))
def test_card_validator_refuses(tmp_path, kind):
    fields, needles = CARDS[kind]
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(fields))
    assert_user_error(runner.invoke(app, ["card", "validate", str(path)]), str(path), *needles)


def test_binary_file_as_card(tmp_path):
    path = tmp_path / "card.yaml"
    path.write_bytes(bytes(range(128, 256)) * 4)
    assert_user_error(runner.invoke(app, ["card", "validate", str(path)]), str(path), "not a text file")


# --------------------------------------------------------------------------------------------- checkpoints
CHECKPOINTS = {
    # (checkpoint arguments, needles); the card has 4 classes
    "fewer_classes_than_card": ({"num_classes": 2}, [str(CARD), "field 'labels' maps to 4 classes", "predicts 2"]),
    "meta_classes_differ_from_weights": (
        {"num_classes": 4, "num_classes_meta": 3}, ["does not match its weights", "'meta.num_classes'"]),
    "meta_channels_differ_from_weights": (
        {"model": {**ModelConfig(channels=[8, 16]).model_dump(mode="json"), "in_channels": 2}},
        ["does not match its weights"]),
    "meta_field_missing": ({"spatial_dims": None}, ["field 'meta.spatial_dims' missing"]),
    "meta_mode_contradicts_dims": (
        {"data": {"mode": "2d", "slice_axis": 2, "patch_size": [16, 16], "spacing": None, "foreground_crop": True}},
        ["field 'meta.data.mode' is 2d but 'meta.spatial_dims' is 3"]),
    "meta_model_unknown": ({"model": {"name": "transformer9000"}}, ["'meta.model'", "field 'name'"]),
}


def _bad_checkpoint(ws, kind: str) -> Path:
    changes = dict(CHECKPOINTS[kind][0])
    weights_classes = changes.pop("num_classes", 4)
    if "num_classes_meta" in changes:  # weights for 4 classes, metadata claiming 3
        meta_k = changes.pop("num_classes_meta")
        changes.update(num_classes=meta_k, class_names=CLASS_NAMES[:meta_k])
    return checkpoint(ws.root / "model.pt", weights_classes, changes)


@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_predict_refuses_checkpoint(ws, kind):
    ckpt = _bad_checkpoint(ws, kind)
    before = ws.hashes()
    preds = ws.root / "preds"
    result = runner.invoke(app, ["predict", str(ckpt), str(ws.dataset), str(preds), "--card", str(CARD)])
    assert_user_error(result, *CHECKPOINTS[kind][1])
    assert not preds.exists()
    assert ws.hashes() == before


def test_evaluate_refuses_a_model_with_other_classes(ws):
    ckpt = checkpoint(ws.root / "model.pt", num_classes=2)
    recipe = ws.recipe()
    before = ws.hashes()
    result = runner.invoke(app, ["evaluate", str(ckpt), str(recipe), f"data.test={{path: '{ws.dataset}'}}"])
    assert_user_error(result, str(CARD), "maps to 4 classes", "predicts 2")
    assert not ws.out.exists()
    assert ws.hashes() == before


@pytest.mark.parametrize("problem", ["no_label", "float_label"])
def test_evaluate_checks_labels_before_inference(ws, problem, monkeypatch):
    """The API itself refuses before predicting anything (no predictions folder, no inference call)."""
    from medda import api

    ckpt = checkpoint(ws.root / "model.pt")
    if problem == "no_label":
        (ws.dataset / "labels" / "case1.nii.gz").unlink()
        needles = ["case 'case1' has no label file"]
    else:
        _, label = ws.blob(seed=1)
        ws.writer(ws.dataset / "labels" / "case1.nii.gz", np.where(label == 1, 1.5, label).astype(np.float32), AFFINE)
        needles = [str(ws.dataset / "labels" / "case1.nii.gz"), "non-integer values [1.5]"]
    cfg = load_config(ws.recipe(), [f"data.test={{path: '{ws.dataset}'}}"])
    predicted = []
    monkeypatch.setattr(api, "predict_cases", lambda *a, **k: predicted.append(1) or iter(()))
    with pytest.raises(MeddaError) as err:
        api.evaluate(ckpt, cfg, write_predictions=True)
    assert all(n in str(err.value) for n in needles), str(err.value)
    assert not predicted and not (ws.out / "predictions").exists()


# --------------------------------------------------------------------------------------------- tracking
def _text_file(tmp_path: Path) -> tuple[str, list[str]]:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    return f"sqlite:///{notes}", [str(notes), "not an SQLite database"]


def _plain_text_path(tmp_path: Path) -> tuple[str, list[str]]:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a store\n")
    return str(notes), [str(notes), "names a file, not a tracking store"]


TRACKING_URIS = {
    "sqlite_uri_is_a_text_file": _text_file,
    "path_is_a_text_file": _plain_text_path,
    "unsupported_scheme": lambda tmp: ("ftp://example.org/mlflow", ["unsupported scheme 'ftp://'"]),
    "sqlite_uri_is_a_folder": lambda tmp: (f"sqlite:///{tmp}", [str(tmp), "names a folder"]),
    "sqlite_folder_missing": lambda tmp: (f"sqlite:///{tmp}/nowhere/mlflow.db",
                                          [str(tmp / "nowhere"), "does not exist"]),
}


@pytest.mark.parametrize("kind", sorted(TRACKING_URIS))
def test_tracking_uri_refused(ws, kind):
    uri, needles = TRACKING_URIS[kind](ws.root)
    recipe = ws.recipe()
    before = ws.hashes()
    result = runner.invoke(app, ["train", str(recipe), "tracking.enabled=true", f"tracking.uri={uri}"])
    assert_user_error(result, "tracking.uri", *needles)
    assert not ws.out.exists()
    assert ws.hashes() == before


def _create_run(uri: str, name: str, barrier, results) -> None:
    from medda.tracking import make_tracker

    try:
        barrier.wait(timeout=60)
        tracker = make_tracker(TrackingConfig(uri=uri, experiment="race", system_metrics=False))
        with tracker.run(name):
            tracker.log_metrics({"x": 1.0}, 0)
        results.put(name)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which asserts
        results.put(f"error: {type(err).__name__}: {err}")


def test_two_processes_create_one_new_sqlite_store(tmp_path):
    """MLflow creates a new store's tables without a lock: both first runs must still land."""
    from medda.tracking import TrackingStore

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = multiprocessing.get_context("fork")  # mlflow is already imported: no second import per child
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_create_run, args=(uri, f"run{i}", barrier, results)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    outcomes = sorted(results.get(timeout=5) for _ in workers)
    assert outcomes == ["run0", "run1"], outcomes
    runs = TrackingStore(uri).search_runs(experiments=["race"])
    assert sorted(r.name for r in runs) == ["run0", "run1"] and {r.status for r in runs} == {"FINISHED"}


# --------------------------------------------------------------------------------------------- server
def test_server_refuses_to_expose_without_protection():
    result = runner.invoke(app, ["server", "--host", "0.0.0.0", "--print-command"])
    assert_user_error(result, "--host 0.0.0.0", "--allowed-hosts", "--insecure-expose")
    ok = runner.invoke(app, ["server", "--host", "0.0.0.0", "--allowed-hosts", "mlflow.lab.org,mlflow.lab.org:5000",
                             "--print-command"])
    assert ok.exit_code == 0, ok.output
    assert "--allowed-hosts mlflow.lab.org,mlflow.lab.org:5000" in ok.output
    insisted = runner.invoke(app, ["server", "--host", "0.0.0.0", "--insecure-expose", "--print-command"])
    assert insisted.exit_code == 0 and "--host 0.0.0.0" in insisted.output


def test_server_basic_auth(monkeypatch):
    import importlib.util

    from medda import server

    real = importlib.util.find_spec
    monkeypatch.setattr(server.importlib.util, "find_spec", lambda name: None if name == "flask_wtf" else real(name))
    result = runner.invoke(app, ["server", "--basic-auth", "--print-command"])
    assert_user_error(result, "--basic-auth", "mlflow[auth]")
    monkeypatch.setattr(server.importlib.util, "find_spec", lambda name: object())
    ok = runner.invoke(app, ["server", "--host", "0.0.0.0", "--basic-auth", "--print-command"])
    assert ok.exit_code == 0 and "--app-name basic-auth" in ok.output


# --------------------------------------------------------------------------------------------- compiler
def test_compile_without_a_cpp_compiler_is_refused_before_anything_exists(ws):
    """`train.compile` builds C++ kernels at the first step: a machine without a compiler is told so up front."""
    from torch._inductor import config as inductor_config

    recipe = ws.recipe()
    before = ws.hashes()
    with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler-medda")}):  # inductor's own override API
        result = runner.invoke(app, ["train", str(recipe), "train.compile=true", "train.device=cpu"])
    assert_user_error(result, "'train.compile' is true", "C++ compiler", "expected false")
    assert not ws.out.exists()
    assert ws.hashes() == before


def test_cross_validation_with_validation_cases_is_refused_before_anything_exists(ws):
    recipe = ws.recipe()
    before = ws.hashes()
    result = runner.invoke(app, ["train", str(recipe), "train.select_by=cross_validation",
                                 f"data.val={{path: '{ws.dataset}'}}"])
    assert_user_error(result, "'train.select_by' is cross_validation", "set data.val to null")
    assert not ws.out.exists()
    assert ws.hashes() == before


def test_cross_validation_from_the_command_line_reports_its_choice(ws):
    result = runner.invoke(app, ["train", str(ws.recipe()), "train.select_by=cross_validation"])
    assert result.exit_code == 0, result.output
    assert "cross-validation over 2 folds: mean held-out Dice" in result.output
    assert "at iteration 1, where the run on every labelled case stopped" in result.output
    assert (ws.out / "cv" / "fold1" / "last.pt").exists() and (ws.out / "last.pt").exists()


# --------------------------------------------------------------------------------------------- diverging training
def test_diverging_training_stops_and_saves_nothing(ws):
    recipe = ws.recipe()
    before = ws.hashes()
    result = runner.invoke(app, ["train", str(recipe), "train.iterations=3", "optim.lr=1e30",
                                 "optim.schedule=constant"])
    assert_user_error(result, "training diverged at iteration", "optim.lr")
    assert not ws.out.exists()
    assert ws.hashes() == before


def test_diverging_run_is_failed_and_never_registered(ws, mlflow_uri):
    from medda import api
    from medda.tracking import TrackingStore

    cfg = load_config(ws.recipe(), ["train.iterations=3", "optim.lr=1e30", "optim.schedule=constant",
                                    "tracking.enabled=true", f"tracking.uri={mlflow_uri}",
                                    "tracking.system_metrics=false"])
    with pytest.raises(MeddaError, match="diverged at iteration"):
        api.train(cfg)
    store = TrackingStore(mlflow_uri)
    runs = store.search_runs()
    assert [r.status for r in runs] == ["FAILED"]
    assert store.versions_for_run(runs[0].run_id) == []
    # no checkpoint; the resume state is the last one before the divergence, with finite weights
    assert [p.name for p in ws.out.glob("*.pt")] == ["resume.pt"]
    state = torch.load(ws.out / "resume.pt", weights_only=True)["loop"]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_non_finite_weights_are_never_saved(tmp_path):
    model = build_model(ModelConfig(channels=[8, 16]), 3, 4)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    target = tmp_path / "ckpt" / "best.pt"
    with pytest.raises(MeddaError, match=r"not saved: 1 of \d+ weight tensors hold NaN"):
        save_checkpoint(target, model, {"num_classes": 4})
    assert not (tmp_path / "ckpt").exists()
