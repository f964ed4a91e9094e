"""`medda` command line on bad input: exit status 2, one sentence naming the file, no traceback, no leftovers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from medda.config import ModelConfig
from medda.models.factory import build_model, save_checkpoint
from pipelines.cli import app, main

REPO = Path(__file__).resolve().parent.parent
CARD = REPO / "data_cards" / "phantom_site_a.yaml"  # label codes 0..3, spacing 1.5 x 1.5 x 3 mm
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])

runner = CliRunner()
PROGRESS_BAR = re.compile(r"\d+%\|")


@pytest.fixture
def workspace(tmp_path, nifti_writer, make_blob_case):
    """Two good cases in images/ + labels/ and a quick training recipe; returns a helper namespace."""
    ds = tmp_path / "dataset"
    for i in range(2):
        image, label = make_blob_case(seed=i)
        nifti_writer(ds / "images" / f"case{i}.nii.gz", image, AFFINE)
        nifti_writer(ds / "labels" / f"case{i}.nii.gz", label, AFFINE)

    def recipe(train_path: Path = ds, **extra) -> Path:
        raw = {
            "data": {"card": str(CARD), "train": {"path": str(train_path)}, "patch_size": [16, 16, 8]},
            "model": {"channels": [8, 16]},
            "train": {"iterations": 1, "batch_size": 1, "amp": "off"},
            "tracking": {"enabled": False},
            "output_dir": str(tmp_path / "out"),
            **extra,
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return SimpleNamespace(
        root=tmp_path,
        dataset=ds,
        out=tmp_path / "out",
        recipe=recipe,
        writer=nifti_writer,
        blob=make_blob_case,
    )


def assert_user_error(result, *needles: str) -> str:
    """Exit 2 with exactly one line 'medda: error: ...' naming every needle, and no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception
    assert "Traceback" not in result.output
    # progress bars (tqdm, redrawn with carriage returns) may precede the message; nothing else may
    lines = [line.strip() for line in re.split(r"[\r\n]", result.output) if line.strip()]
    lines = [line for line in lines if not PROGRESS_BAR.search(line)]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("medda: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_missing_config_file(workspace):
    missing = workspace.root / "nope.yaml"
    result = runner.invoke(app, ["train", str(missing)])
    assert_user_error(result, str(missing), "config file not found")
    assert not workspace.out.exists()


def test_unknown_config_key(workspace):
    recipe = workspace.recipe()
    result = runner.invoke(app, ["train", str(recipe), "train.iteratoins=3"])
    assert_user_error(result, str(recipe), "'train.iteratoins'", "not a known setting")
    assert not workspace.out.exists()


def _missing_image(ws):
    datalist = ws.root / "list.json"
    datalist.write_text(
        json.dumps({"training": [{"image": "dataset/images/case0.nii.gz"}, {"image": "gone.nii.gz"}]})
    )
    return datalist, [str(ws.root / "gone.nii.gz"), "not found"]


def _garbage_image(ws):
    (ws.dataset / "images" / "case1.nii.gz").write_bytes(b"\x00garbage, not gzip, not NIfTI" * 10)
    return ws.dataset, [str(ws.dataset / "images" / "case1.nii.gz"), "could not be read as an image"]


def _shape_mismatch(ws):
    ws.writer(ws.dataset / "labels" / "case1.nii.gz", np.zeros((24, 20, 8), np.uint8), AFFINE)
    return ws.dataset, [str(ws.dataset / "labels" / "case1.nii.gz"), "label grid (24, 20, 8) differs"]


def _affine_mismatch(ws):
    label = np.zeros((24, 24, 8), np.uint8)
    shifted = AFFINE.copy()
    shifted[:3, 3] = [5.0, 0.0, 0.0]
    ws.writer(ws.dataset / "labels" / "case1.nii.gz", label, shifted)
    return ws.dataset, [str(ws.dataset / "labels" / "case1.nii.gz"), "label affine", "differs"]


def _label_outside_map(ws):
    _, label = ws.blob(seed=1)
    label[0, 0, 0] = 7
    label[1, 0, 0] = 250
    ws.writer(ws.dataset / "labels" / "case1.nii.gz", label, AFFINE)
    return ws.dataset, [str(ws.dataset / "labels" / "case1.nii.gz"), "label values [7, 250]", str(CARD)]


def _nan_image(ws):
    image, _ = ws.blob(seed=1)
    image[3, 4, 5] = np.nan
    ws.writer(ws.dataset / "images" / "case1.nii.gz", image, AFFINE)
    return ws.dataset, [str(ws.dataset / "images" / "case1.nii.gz"), "NaN"]


BAD_INPUTS = {
    "missing_image": _missing_image,
    "unreadable_image": _garbage_image,
    "shape_mismatch": _shape_mismatch,
    "affine_mismatch": _affine_mismatch,
    "label_outside_map": _label_outside_map,
    "nan_in_image": _nan_image,
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_data(workspace, kind, hash_files):
    train_path, needles = BAD_INPUTS[kind](workspace)
    recipe = workspace.recipe(train_path)
    before = hash_files(workspace.root)
    result = runner.invoke(app, ["train", str(recipe)])
    assert_user_error(result, *needles)
    assert not workspace.out.exists()
    assert hash_files(workspace.root) == before  # inputs untouched, nothing new written next to them


def test_pre_existing_output_folder_survives_an_error(workspace):
    """A user error must not delete an output folder (and the user's files in it) that existed before."""
    workspace.out.mkdir()
    (workspace.out / "notes.txt").write_text("keep me")
    recipe = workspace.recipe(workspace.root / "does_not_exist")
    result = runner.invoke(app, ["train", str(recipe)])
    assert_user_error(result, "does_not_exist", "does not exist")
    assert (workspace.out / "notes.txt").read_text(encoding="utf-8") == "keep me"


def _tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=[8, 16]), 3, 4)
    meta = {
        "model": ModelConfig(channels=[8, 16]).model_dump(mode="json"),
        "spatial_dims": 3,
        "num_classes": 4,
        "class_names": ["background", "ring", "blob", "rv"],
        "data": {
            "mode": "3d",
            "slice_axis": 2,
            "patch_size": [16, 16, 8],
            "spacing": None,
            "foreground_crop": True,
        },
        "method": "supervised",
    }
    return save_checkpoint(path, model.eval(), meta)


def test_predict_then_failing_command_keeps_earlier_outputs(workspace, hash_files):
    """Commands run in one process (notebooks, tests): a failing command only cleans up its own outputs."""
    ckpt = _tiny_checkpoint(workspace.root / "model.pt")
    preds = workspace.root / "preds"
    before = hash_files(workspace.dataset)
    ok = runner.invoke(
        app,
        [
            "predict",
            str(ckpt),
            str(workspace.dataset),
            str(preds),
            "--card",
            str(CARD),
            "inference.sw_batch_size=1",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in preds.iterdir()) == ["case0.nii.gz", "case1.nii.gz"]
    assert hash_files(workspace.dataset) == before  # predicting never modifies the inputs
    bad = runner.invoke(
        app,
        [
            "predict",
            str(ckpt),
            str(workspace.root / "nowhere"),
            str(workspace.root / "p2"),
            "--card",
            str(CARD),
        ],
    )
    assert_user_error(bad, "nowhere", "does not exist")
    assert not (workspace.root / "p2").exists()
    assert sorted(p.name for p in preds.iterdir()) == ["case0.nii.gz", "case1.nii.gz"]


@pytest.mark.parametrize("problem", ["label_values", "label_affine"])
def test_evaluate_checks_labels_and_cleans_up(workspace, problem, hash_files):
    """Evaluation scores nothing against labels the card cannot read, and leaves no half-written outputs."""
    ckpt = _tiny_checkpoint(workspace.root / "model.pt")
    _, label = workspace.blob(seed=1)
    affine = AFFINE.copy()
    if problem == "label_values":
        label[2, 2, 2] = 9
    else:
        affine[:3, 3] = [0.0, 4.5, 0.0]
    bad_label = workspace.dataset / "labels" / "case1.nii.gz"
    workspace.writer(bad_label, label, affine)
    recipe = workspace.recipe(**{"inference": {"sw_batch_size": 1}})
    before = hash_files(workspace.dataset)
    overrides = [f"data.test={{path: '{workspace.dataset}'}}"]
    # case0 is predicted (and written) before case1 fails: the output folder must still go away
    result = runner.invoke(app, ["evaluate", str(ckpt), str(recipe), *overrides, "--save-predictions"])
    needle = "label values [9]" if problem == "label_values" else "label affine"
    assert_user_error(result, str(bad_label), needle)
    assert not workspace.out.exists()
    assert hash_files(workspace.dataset) == before


def test_predict_with_a_bad_checkpoint(workspace):
    fake = workspace.root / "fake.pt"
    fake.write_bytes(b"not a checkpoint")
    out = workspace.root / "preds"
    result = runner.invoke(app, ["predict", str(fake), str(workspace.dataset), str(out), "--card", str(CARD)])
    assert_user_error(result, str(fake), "not a readable medda checkpoint")
    assert not out.exists()


def test_help_and_methods():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "train-ssl", "adapt", "predict", "evaluate", "demo", "methods", "card"):
        assert command in result.output
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    assert "YAML recipe" in result.output and "overrides" in result.output.lower()
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    assert "bcp" in result.output and "osuda" in result.output and "entropy_prior" in result.output
    result = runner.invoke(app, ["card", "validate", str(CARD)])
    assert result.exit_code == 0 and "valid" in result.output and "4 classes" in result.output


def test_installed_entry_point_help():
    exe = Path(sys.executable).parent / "medda"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert out.returncode == 0 and "adapt" in out.stdout and "Traceback" not in out.stderr


def test_main_prints_only_the_error_line(workspace, nifti_writer, make_blob_case, monkeypatch, capfd):
    """The real entry point: library FutureWarnings must not precede the one-line error on stderr."""
    _, label = make_blob_case(seed=1)
    label[0, 0, 0] = 9
    nifti_writer(workspace.dataset / "labels" / "case1.nii.gz", label, AFFINE)
    monkeypatch.setattr(sys, "argv", ["medda", "train", str(workspace.recipe())])
    monkeypatch.setenv("PYTHONWARNINGS", "")  # recorded, so that main()'s default is undone afterwards
    monkeypatch.delenv("PYTHONWARNINGS")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as exit_:
            main()
    assert exit_.value.code == 2
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medda: error: ") and "label values [9]" in err


@pytest.mark.parametrize("command", ["train", "train-ssl", "adapt", "evaluate", "predict"])
def test_threads_option_is_the_train_threads_override(workspace, monkeypatch, command):
    """`--threads N` reaches the run's config as train.threads=N (and wins over a recipe override); 0 is refused."""
    import pipelines.ssl
    from medda import api
    from medda.config import RunConfig

    seen = []

    def capture(*args, **kwargs):  # record the config's threads and stop before any work
        seen.append(next(a for a in args if isinstance(a, RunConfig)).train.threads)
        raise SystemExit(0)

    for name in ("train", "adapt", "evaluate", "predict"):
        monkeypatch.setattr(api, name, capture)
    monkeypatch.setattr(pipelines.ssl, "run_ssl_with_twin", capture)
    ckpt = str(workspace.root / "model.pt")
    args = {"train": ["train", str(workspace.recipe()), "train.threads=2"],
            "train-ssl": ["train-ssl", str(workspace.recipe())],
            "adapt": ["adapt", str(workspace.recipe())],
            "evaluate": ["evaluate", ckpt, str(workspace.recipe())],
            "predict": ["predict", ckpt, str(workspace.dataset), str(workspace.root / "pred"), "--card", str(CARD)]}
    result = runner.invoke(app, [*args[command], "--threads", "1"])
    assert seen == [1], result.output
    refused = runner.invoke(app, [*args[command], "--threads", "0"])
    assert refused.exit_code == 2 and seen == [1]


@pytest.mark.parametrize(("extra", "needles"), [
    ({"method": {"name": "supervised"}}, ["method.name", "supervised", "bcp", "medda train"]),
    ({"method": {"name": "bcp", "options": {"no_such_option": 1}}}, ["method.options", "no_such_option"]),
    ({"method": {"name": "mean_teacher"}}, ["data.unlabeled", "required"]),
    ({"method": {"name": "bcp"}, "data_unlabeled": "same"}, ["data.unlabeled", "no cases left"]),
])
def test_train_ssl_refuses_bad_ssl_settings_before_the_twin_trains(workspace, monkeypatch, extra, needles):
    """A mistake that only the semi-supervised run would hit is one line before anything trains (issue 13)."""
    from medda import api

    monkeypatch.setattr(api, "train", lambda *a, **k: pytest.fail("the supervised twin started training"))
    recipe = workspace.recipe(method=extra["method"])
    if extra.get("data_unlabeled") == "same":  # the unlabelled pool is the labelled cases: nothing left
        raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        raw["data"]["unlabeled"] = {"path": str(workspace.dataset)}
        recipe.write_text(yaml.safe_dump(raw))
    assert_user_error(runner.invoke(app, ["train-ssl", str(recipe)]), *needles)
    assert not workspace.out.exists()


def test_output_folder_that_is_a_file_or_read_only_is_refused_before_work(workspace, monkeypatch):
    """An output path that is an existing file (or a folder the user cannot write) is one line, not a traceback
    after training (issue 13); the file is left as it was."""
    from medda import api

    monkeypatch.setattr(api, "train", lambda *a, **k: pytest.fail("training started"))
    taken = workspace.root / "taken"
    taken.write_text("mine\n")
    recipe = str(workspace.recipe())
    assert_user_error(runner.invoke(app, ["train", recipe, f"output_dir={taken}"]), str(taken), "existing file")
    ckpt = str(workspace.root / "model.pt")
    result = runner.invoke(app, ["predict", ckpt, str(workspace.dataset), str(taken), "--card", str(CARD)])
    assert_user_error(result, str(taken), "existing file")
    assert taken.read_text(encoding="utf-8") == "mine\n"
    # root may write anywhere, so the read-only case is simulated: the nearest existing folder is not writable
    import pipelines.cli

    real_access = pipelines.cli.os.access
    monkeypatch.setattr(pipelines.cli.os, "access",
                        lambda path, mode: False if Path(path) == workspace.root else real_access(path, mode))
    assert_user_error(runner.invoke(app, ["train", recipe, f"output_dir={workspace.root / 'new' / 'out'}"]),
                      "cannot be written", "read-only")
