"""Resuming interrupted runs: crashes, SIGINT/SIGTERM and SIGKILL at several points of a supervised training, a Tent
adaptation, a mean-teacher run and a BCP run (before, at and after its phase switch), and `train-ssl --resume`.
A resumed run ends with the same weights, bit for bit, as an uninterrupted one with the same seed (CPU, float32,
one thread), continues the same MLflow run and leaves no run RUNNING.

Tiny runs (a 2-level UNet, 16 x 16 x 8 patches, 12 iterations); the two command-line tests signal the command in
another process (forked, tests/forked_ranks.py).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from forked_ranks import Forked
from typer.testing import CliRunner

from medda import api
from medda.config import RunConfig, load_config
from medda.engine.resume import RESUME_FILE
from medda.errors import Interrupted
from medda.methods.bcp import BCP
from medda.methods.mean_teacher import MeanTeacher
from medda.methods.supervised import Supervised
from medda.methods.tent import Tent
from medda.models.factory import read_checkpoint
from pipelines.cli import app

REPO = Path(__file__).resolve().parent.parent
CARD_A = REPO / "data_cards" / "phantom_site_a.yaml"
CARD_B = REPO / "data_cards" / "phantom_site_b.yaml"
ITERATIONS = 12
runner = CliRunner()


def overrides(out: Path, uri: str | None, iterations: int = ITERATIONS) -> list[str]:
    """A tiny, deterministic run (float32, one thread) that writes a resume state every 2 iterations."""
    return [
        "data.patch_size=[16, 16, 8]", "data.samples_per_volume=1", "model.channels=[4, 8]",
        f"train.iterations={iterations}", "train.val_every=4", "train.resume_every=2", "train.batch_size=2",
        "train.amp=off", "train.threads=1", "train.channels_last=false",
        *([f"tracking.uri={uri}", "tracking.experiment=resume", "tracking.system_metrics=false"] if uri
          else ["tracking.enabled=false"]),
        f"output_dir={out}",
    ]


def train_cfg(root: Path, out: Path, uri: str | None = None, *extra: str, iterations: int = ITERATIONS) -> RunConfig:
    datalist = root / "A" / "datalist.json"
    return load_config(None, [
        f"data.card={CARD_A}", f"data.train={{path: '{datalist}', split: training}}",
        f"data.val={{path: '{datalist}', split: validation}}", *overrides(out, uri, iterations), *extra,
    ])


def ssl_cfg(root: Path, out: Path, method: str = "bcp") -> RunConfig:
    # two labelled volumes (BCP halves each batch); the other three cases of site A are the unlabelled ones
    options = "{pretrain_iterations: 4}" if method == "bcp" else "{}"
    return train_cfg(root, out, None, f"data.train={{path: '{root / 'A' / 'datalist.json'}', limit: 2}}",
                     f"data.unlabeled={{path: '{root / 'A' / 'datalist.json'}'}}", f"method.name={method}",
                     f"method.options={options}")


def tent_cfg(root: Path, source: Path, out: Path, uri: str | None = None) -> RunConfig:
    return load_config(None, [
        f"data.card={CARD_B}", f"data.target={{path: '{root / 'B' / 'datalist.json'}'}}", f"source_checkpoint={source}",
        "method.name=tent", "selection.cases=2", *overrides(out, uri),
    ])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


def resume_iteration(out: Path) -> int | None:
    """The iteration of `out`'s resume state (None: none yet, or the run finished)."""
    try:
        state = torch.load(out / RESUME_FILE, map_location="cpu", weights_only=True)
    except (FileNotFoundError, EOFError, RuntimeError):
        return None
    return state["loop"]["iteration"] if "loop" in state else None


def run_status(uri: str, run_id: str) -> str:
    return mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.status


def crash_at(monkeypatch, method: type, iteration: int) -> None:
    """`method.after_step` raises at `iteration`: a crash that saves nothing (the last periodic state remains)."""
    original = method.after_step

    def crash(self, it):
        if it == iteration:
            raise RuntimeError("simulated crash")
        return original(self, it)

    monkeypatch.setattr(method, "after_step", crash)


def crash_then_resume(monkeypatch, method: type, iteration: int, run, cfg: RunConfig):
    """Run `run(cfg)` until the crash at `iteration`, then `run(cfg, resume=True)`; (resumed from, result)."""
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    with monkeypatch.context() as patch:
        crash_at(patch, method, iteration)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(cfg)
    run_id = torch.load(cfg.output_dir / RESUME_FILE, weights_only=True)["run_id"]
    if run_id is not None:
        assert run_status(cfg.tracking.uri, run_id) == "FAILED"  # a crash never leaves its run RUNNING
    start = resume_iteration(cfg.output_dir)
    return start, run(cfg, resume=True)


@pytest.fixture(scope="module")
def reference(phantom_root, tmp_path_factory):
    """Uninterrupted runs: supervised training (also the Tent source model), Tent adaptation, BCP."""
    tmp = tmp_path_factory.mktemp("reference")
    supervised = api.train(train_cfg(phantom_root, tmp / "supervised"))
    tent = api.adapt(tent_cfg(phantom_root, supervised.last, tmp / "tent"))
    bcp = api.train(ssl_cfg(phantom_root, tmp / "bcp"))
    mean_teacher = api.train(ssl_cfg(phantom_root, tmp / "mean_teacher", "mean_teacher"))
    return {"supervised": supervised, "tent": tent, "bcp": bcp, "mean_teacher": mean_teacher,
            "source": supervised.last}


@pytest.mark.parametrize("crash", [1, 5, 11])
def test_supervised_training_resumes_bit_identically_in_the_same_mlflow_run(crash, phantom_root, reference,
                                                                            monkeypatch, tmp_path, mlflow_uri):
    cfg = train_cfg(phantom_root, tmp_path / "run", mlflow_uri)
    start, result = crash_then_resume(monkeypatch, Supervised, crash, api.train, cfg)
    assert start == crash - crash % 2  # the last periodic state before the crash
    assert_same_weights(result.last, reference["supervised"].last)
    assert_same_weights(result.checkpoint, reference["supervised"].checkpoint)
    expected = reference["supervised"].loop
    assert (result.loop.best_iteration, result.loop.best_score) == (expected.best_iteration, expected.best_score)
    assert [h["iteration"] for h in result.loop.history] == [h["iteration"] for h in expected.history]
    runs = mlflow.MlflowClient(tracking_uri=mlflow_uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=mlflow_uri).get_experiment_by_name("resume").experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]  # the crashed run itself was continued
    assert run_status(mlflow_uri, result.run_id) == "FINISHED"
    assert runs[0].data.tags["resume.iteration"] == str(start)


def test_a_finished_run_is_not_trained_again(phantom_root, reference, tmp_path):
    cfg = train_cfg(phantom_root, tmp_path / "run")
    first = api.train(cfg)
    stamp = first.last.stat().st_mtime_ns
    again = api.train(cfg, resume=True)
    assert again == first and first.last.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("crash", [3, 4, 7])  # state 2 (phase 1), exactly at the switch (4), state 6 (phase 2)
def test_bcp_resumes_across_its_phase_switch(crash, phantom_root, reference, monkeypatch, tmp_path):
    cfg = ssl_cfg(phantom_root, tmp_path / "run")
    start, result = crash_then_resume(monkeypatch, BCP, crash, api.train, cfg)
    assert start == crash - crash % 2
    assert_same_weights(result.last, reference["bcp"].last)
    assert result.loop.best_iteration == reference["bcp"].loop.best_iteration


def test_train_ssl_resume_keeps_the_finished_twin_and_continues_the_ssl_run(phantom_root, reference, monkeypatch,
                                                                          tmp_path):
    cfg = ssl_cfg(phantom_root, tmp_path / "run")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    with monkeypatch.context() as patch:
        crash_at(patch, BCP, 7)
        crashed = runner.invoke(app, ["train-ssl", str(recipe)])
    assert isinstance(crashed.exception, RuntimeError)
    twin = cfg.output_dir / "supervised_twin" / "last.pt"
    stamp = twin.stat().st_mtime_ns
    resumed = runner.invoke(app, ["train-ssl", str(recipe), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert twin.stat().st_mtime_ns == stamp  # finished: not trained again
    assert_same_weights(cfg.output_dir / "bcp" / "last.pt", reference["bcp"].last)


def test_mean_teacher_resumes_with_its_teacher_and_noise(phantom_root, reference, monkeypatch, tmp_path):
    cfg = ssl_cfg(phantom_root, tmp_path / "run", "mean_teacher")
    start, result = crash_then_resume(monkeypatch, MeanTeacher, 5, api.train, cfg)
    assert start == 4
    assert_same_weights(result.last, reference["mean_teacher"].last)


def test_tent_adaptation_resumes_with_its_optimiser_and_monitor(phantom_root, reference, monkeypatch, tmp_path):
    cfg = tent_cfg(phantom_root, reference["source"], tmp_path / "run")
    start, result = crash_then_resume(monkeypatch, Tent, 6, api.adapt, cfg)
    assert start == 6
    assert_same_weights(result.adapted, reference["tent"].adapted)
    assert result.history == reference["tent"].history  # the label-free monitor's memory, source score included
    assert (result.recommended, result.reason) == (reference["tent"].recommended, reference["tent"].reason)


def test_sigint_stops_after_the_iteration_marks_the_run_killed_and_resumes(phantom_root, reference, monkeypatch,
                                                                            tmp_path, mlflow_uri):
    cfg = train_cfg(phantom_root, tmp_path / "run", mlflow_uri)
    original = Supervised.after_step

    def interrupt(self, it):
        original(self, it)
        if it == 2:  # Ctrl-C in the middle of iteration 3 (0-based 2): it completes, is saved, the run stops
            os.kill(os.getpid(), signal.SIGINT)

    # a suite started as a background job inherits SIGINT ignored, which medda rightly keeps ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(Supervised, "after_step", interrupt)
            with pytest.raises(Interrupted) as stop:
                api.train(cfg)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stop.value.signum == signal.SIGINT and stop.value.resume == cfg.output_dir / RESUME_FILE
    assert resume_iteration(cfg.output_dir) == 3
    run_id = torch.load(cfg.output_dir / RESUME_FILE, weights_only=True)["run_id"]
    assert run_status(mlflow_uri, run_id) == "KILLED"
    result = api.train(cfg, resume=True)
    assert result.run_id == run_id and run_status(mlflow_uri, run_id) == "FINISHED"
    assert_same_weights(result.last, reference["supervised"].last)


# ------------------------------------------------------------------------------ the command line, real signals
def cli_recipe(root: Path, tmp: Path, uri: str) -> Path:
    """A YAML recipe of the supervised reference run (longer, so that a signal finds it running)."""
    cfg = train_cfg(root, tmp / "run", uri, iterations=60)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    return path


def start_and_signal(recipe: Path, out: Path, signum: int, after: int) -> subprocess.CompletedProcess:
    """`medda train RECIPE` in another process, sent `signum` once its resume state reaches iteration `after`.

    The process is `python -m pipelines.cli` forked from a process that imported medda once (tests/forked_ranks.py):
    what the `medda` console script runs, without 15 s of interpreter start-up (test_cli starts the script itself)."""
    process = Forked("train", str(recipe), cwd=REPO)
    deadline = time.monotonic() + 120
    while (done := resume_iteration(out)) is None or done < after:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never wrote its resume state"
        time.sleep(0.02)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def cli_reference(phantom_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_reference")
    return api.train(train_cfg(phantom_root, tmp / "run", iterations=60))


@pytest.mark.slow  # another process, really signalled
def test_sigterm_to_the_command_kills_the_run_and_resume_finishes_it(phantom_root, cli_reference, tmp_path,
                                                                     mlflow_uri):
    recipe = cli_recipe(phantom_root, tmp_path, mlflow_uri)
    out = tmp_path / "run"
    done = start_and_signal(recipe, out, signal.SIGTERM, after=2)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    lines = [x for x in re.split(r"[\r\n]", done.stderr) if x.startswith("medda:")]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "--resume" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    run_id = torch.load(out / RESUME_FILE, weights_only=True)["run_id"]
    assert run_status(mlflow_uri, run_id) == "KILLED"
    resumed = runner.invoke(app, ["train", str(recipe), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"MLflow run: {run_id}" in resumed.output
    assert run_status(mlflow_uri, run_id) == "FINISHED"
    assert_same_weights(out / "last.pt", cli_reference.last)


@pytest.mark.slow  # another process, really signalled
def test_sigkill_leaves_the_run_running_until_resume_finishes_it(phantom_root, cli_reference, tmp_path, mlflow_uri):
    recipe = cli_recipe(phantom_root, tmp_path, mlflow_uri)
    out = tmp_path / "run"
    done = start_and_signal(recipe, out, signal.SIGKILL, after=4)
    assert done.returncode == -signal.SIGKILL
    run_id = torch.load(out / RESUME_FILE, weights_only=True)["run_id"]
    assert run_status(mlflow_uri, run_id) == "RUNNING"  # nothing can run on SIGKILL
    resumed = runner.invoke(app, ["train", str(recipe), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert run_status(mlflow_uri, run_id) == "FINISHED"
    assert_same_weights(out / "last.pt", cli_reference.last)


# ------------------------------------------------------------------------------ refusals
def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [x.strip() for x in re.split(r"[\r\n]", result.output) if x.strip() and not re.search(r"\d+%\|", x)]
    assert len(lines) == 1 and lines[0].startswith("medda: error: "), result.output
    return lines[0]


def test_resume_with_another_config_or_without_a_state_is_refused(phantom_root, tmp_path):
    cfg = train_cfg(phantom_root, tmp_path / "run")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    line = one_error_line(runner.invoke(app, ["train", str(recipe), "--resume"]))
    assert "no resume state" in line and "without --resume" in line
    assert not cfg.output_dir.exists()  # nothing half-written is left behind
    api.train(cfg)
    line = one_error_line(runner.invoke(app, ["train", str(recipe), "train.iterations=13", "--resume"]))
    assert "another config" in line and "train.iterations" in line
    line = one_error_line(runner.invoke(app, ["adapt", str(recipe), "--resume", "--methods", "tent"]))
    assert "sweep" in line
