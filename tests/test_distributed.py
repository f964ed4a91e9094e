"""Several processes (torchrun, gloo on CPU): sharded, resumable `medda predict` and `medda evaluate`; DDP training
and adaptation with synchronised batch norm.

The multi-process tests run 2 ranks on five tiny phantom cases (40 x 40 x 16 voxels) and compare with one process
running the same command: every case is written exactly once, the label maps equal the single-process ones,
evaluate's per-case metrics are equal and MLflow holds one run; a rerun after losing some outputs predicts only
those. Commands refused under torchrun are checked too. The first sharded predict and the killed rank launch
`python -m torch.distributed.run --standalone --nproc_per_node 2` itself; the other launches fork their ranks with
torchrun's environment from a process that imported medda once (tests/forked_ranks.py), which saves the start-up of
two interpreters per launch.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from forked_ranks import CLI, run_ranks
from typer.testing import CliRunner

from medda import api, distributed
from medda.config import DatasetRef, ModelConfig, load_config
from medda.errors import MeddaError
from medda.models.factory import build_model, save_checkpoint
from pipelines.cli import app

REPO = Path(__file__).resolve().parent.parent
CARD = REPO / "data_cards" / "phantom_site_a.yaml"
TINY_FOV_MM = (60.0, 60.0, 48.0)
CASES = 5  # odd: the two ranks get 3 and 2 cases
runner = CliRunner()


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=[8, 16]), 3, 4)
    meta = {
        "model": ModelConfig(channels=[8, 16]).model_dump(mode="json"),
        "spatial_dims": 3, "num_classes": 4, "class_names": ["background", "ring", "blob", "rv"],
        "data": {"mode": "3d", "slice_axis": 2, "patch_size": [16, 16, 8], "spacing": None, "foreground_crop": True},
        "card": {"name": "phantom_site_a", "site": "A", "digest": "0" * 12, "spacing": None},
        "method": "supervised",
    }
    return save_checkpoint(path, model.eval(), meta)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    from medda.data.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("distributed")
    data = write_phantom_dataset(root / "data", sites=("A",), cases_per_site=CASES, seed=3, fov_mm=TINY_FOV_MM)
    datalist = data / "A" / "datalist.json"

    def recipe(name: str) -> Path:
        raw = {"data": {"card": str(CARD), "test": {"path": str(datalist)}},
               "inference": {"sw_batch_size": 1},
               "tracking": {"uri": f"sqlite:///{root}/{name}.db"},
               "output_dir": str(root / name)}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return path

    return SimpleNamespace(root=root, datalist=datalist, ckpt=_checkpoint(root / "model.pt"), recipe=recipe)


def _rank_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore",
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MEDDA_TRACKING", None)
    return env


def torchrun(*args: str, nproc: int = 2, timeout: int = 600, program: tuple[str, ...] = CLI
             ) -> subprocess.CompletedProcess:
    """`medda ARGS` (or `program ARGS`) under torchrun itself with `nproc` CPU processes (gloo), one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *program, *args]
    # torchrun's error report can hold non-ASCII bytes: decode them as UTF-8 whatever this process's locale is
    return subprocess.run(cmd, cwd=REPO, env=_rank_env(), capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=timeout, check=False)


def ranks(*args: str, nproc: int = 2, program: tuple[str, ...] = CLI) -> subprocess.CompletedProcess:
    """The same with forked ranks and torchrun's environment (tests/forked_ranks.py: no interpreter start-up and
    MONAI import per rank, which cost about 15 s of CPU each on 2 cores)."""
    return run_ranks(*args, nproc=nproc, program=program, cwd=REPO, env=_rank_env())


def _predictions(folder: Path) -> list[Path]:
    """The label maps in `folder`, not the hidden temporary files of a writer (pathlib's glob matches those too)."""
    return sorted(p for p in folder.glob("*.nii.gz") if not p.name.startswith("."))


def _labels(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for path in _predictions(folder):
        image = nib.load(path)
        out[path.name] = (np.asarray(image.dataobj), image.affine)
    return out


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _predict_args(ws, out: Path) -> list[str]:
    return ["predict", str(ws.ckpt), str(ws.datalist), str(out), "--card", str(CARD), "--threads", "1",
            "inference.sw_batch_size=1"]


# --------------------------------------------------------------------------------------------- one process
def test_single_process_helpers_are_no_ops(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched() and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    with distributed.session():
        assert not distributed.active()  # no process group without torchrun
        distributed.barrier()
        assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
        assert distributed.broadcast_object(3) == 3
    items = [{"id": i} for i in ("c", "a", "b")]
    assert distributed.shard(items) == items  # everything, in the given order
    with pytest.raises(MeddaError, match="boom"):  # raised unchanged
        distributed.gather_results(lambda: (_ for _ in ()).throw(MeddaError("boom")))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not distributed.launched()  # torchrun with one process: still a single process
    distributed.refuse("medda adapt")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_cover_every_case_exactly_once(monkeypatch, world):
    cases = [{"id": f"case{i}"} for i in (7, 3, 0, 9, 1, 4, 2)]
    monkeypatch.setenv("WORLD_SIZE", str(world))
    shares = []
    for r in range(world):
        monkeypatch.setenv("RANK", str(r))
        shares.append(distributed.shard(cases))
    ids = [c["id"] for share in shares for c in share]
    assert sorted(ids) == sorted(c["id"] for c in cases)  # each case exactly once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
    ranked = sorted(c["id"] for c in cases)
    assert [c["id"] for c in shares[0]] == [i for i in (c["id"] for c in cases) if ranked.index(i) % world == 0]


def test_commands_that_are_not_distributed_yet_refuse(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cfg = load_config(None, [f"data.card={CARD}", f"source_checkpoint={tmp_path / 'none.pt'}"])
    from pipelines.ssl import run_ssl_with_twin

    for call, needle in ((lambda: api.adapt(cfg, resume=True), "medda adapt --resume"),
                         (lambda: api.train(cfg, resume=True), "medda train --resume"),
                         (lambda: run_ssl_with_twin(cfg, [], print, resume=True), "medda train-ssl --resume")):
        with pytest.raises(MeddaError, match="not supported under torchrun yet") as err:
            call()
        assert needle in str(err.value) and "\n" not in str(err.value)


def test_predict_resumes_only_what_is_missing_or_broken(ws, tmp_path):
    """One process: a rerun skips complete files of the same model and settings, and redoes the others."""
    from medda.config import RunConfig

    cfg = RunConfig.model_validate({"data": {"card": str(CARD)}, "tracking": {"enabled": False},
                                    "inference": {"sw_batch_size": 1}, "train": {"threads": 1}})
    ref = DatasetRef(path=ws.datalist)
    out = tmp_path / "pred"
    first = api.predict(ws.ckpt, cfg, ref, out)
    assert (first.written, first.skipped) == (CASES, 0) and all(p.is_file() for p in first)
    reference = _labels(out)
    first[0].unlink()
    first[1].write_bytes(b"truncated")
    stamps = {p: p.stat().st_mtime_ns for p in first[2:]}
    again = api.predict(ws.ckpt, cfg, ref, out)
    assert (again.written, again.skipped) == (2, CASES - 2)
    assert {p: p.stat().st_mtime_ns for p in first[2:]} == stamps
    _assert_same_labels(_labels(out), reference)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or ".tmp." in p.name]
    other = cfg.model_copy(update={"inference": cfg.inference.model_copy(update={"overlap": 0.3})})
    assert api.predict(ws.ckpt, other, ref, out).written == CASES  # other settings: nothing is reused


def _assert_same_labels(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, (label, affine) in want.items():
        np.testing.assert_array_equal(got[name][0], label, err_msg=name)
        np.testing.assert_array_equal(got[name][1], affine, err_msg=name)


# --------------------------------------------------------------------------------------------- torchrun
@pytest.fixture(scope="module")
def single(ws) -> SimpleNamespace:
    """The single-process reference: predict and evaluate in this process."""
    out = ws.root / "single_pred"
    result = runner.invoke(app, _predict_args(ws, out))
    assert result.exit_code == 0, result.output
    evaluation = runner.invoke(app, ["evaluate", str(ws.ckpt), str(ws.recipe("single_eval")), "--threads", "1"])
    assert evaluation.exit_code == 0, evaluation.output
    return SimpleNamespace(pred=out, labels=_labels(out), rows=_rows(ws.root / "single_eval" / "per_case.csv"))


@pytest.mark.slow
def test_sharded_predict_writes_every_case_once_and_resumes(ws, single):
    out = ws.root / "ddp_pred"
    run = torchrun(*_predict_args(ws, out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(f"wrote {CASES} predictions") == 1, run.stdout  # rank 0 reports, for all ranks
    _assert_same_labels(_labels(out), single.labels)
    assert len(_predictions(out)) == CASES

    # A crash lost two files (one of each rank) and left one truncated: the rerun writes exactly those three.
    files = _predictions(out)
    files[0].unlink()
    files[1].unlink()
    files[2].write_bytes(b"\x1f\x8b truncated")
    kept = {p: p.stat().st_mtime_ns for p in files[3:]}
    again = ranks(*_predict_args(ws, out))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"wrote 3 predictions to {out} ({CASES - 3} already there" in again.stdout, again.stdout
    assert {p: p.stat().st_mtime_ns for p in files[3:]} == kept  # untouched
    _assert_same_labels(_labels(out), single.labels)
    assert sorted(p.name for p in out.iterdir()) == sorted(single.labels)  # no temporary file left


@pytest.mark.slow
def test_a_killed_rank_costs_only_the_cases_it_had_not_written(ws, single):
    """Rank 1 is SIGKILLed after its first file (tests/kill_one_rank.py); torchrun stops rank 0. Rerunning the
    command predicts exactly the cases without a file, leaves every file written before untouched and removes the
    temporary files of killed writers."""
    out = ws.root / "ddp_killed"
    killed = torchrun(*_predict_args(ws, out), program=(str(REPO / "tests" / "kill_one_rank.py"),))
    assert killed.returncode != 0
    before = {p: p.stat().st_mtime_ns for p in _predictions(out)}
    assert 1 <= len(before) < CASES, killed.stdout + killed.stderr  # rank 1 wrote one of its two cases
    # what a writer killed mid-file leaves (rank 0 may leave one too, when torchrun stops it while it writes)
    stale = out / f".{sorted(single.labels)[0].removesuffix('.nii.gz')}.99999.tmp.nii.gz"
    stale.write_bytes(b"\x1f\x8b half a file")
    again = ranks(*_predict_args(ws, out))
    assert again.returncode == 0, again.stdout + again.stderr
    missing = CASES - len(before)
    assert f"wrote {missing} predictions to {out} ({len(before)} already there" in again.stdout, again.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before  # untouched
    _assert_same_labels(_labels(out), single.labels)
    assert sorted(p.name for p in out.iterdir()) == sorted(single.labels)  # no temporary file left


@pytest.mark.slow
def test_sharded_evaluate_equals_one_process_and_logs_one_run(ws, single):
    from medda.tracking import TrackingStore

    recipe = ws.recipe("ddp_eval")
    run = ranks("evaluate", str(ws.ckpt), str(recipe), "--threads", "1", "--save-predictions")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("per-case table:") == 1, run.stdout  # printed once, by rank 0
    rows = _rows(ws.root / "ddp_eval" / "per_case.csv")
    assert len(rows) == CASES * 3 and rows == single.rows  # same cases, classes, order and values
    _assert_same_labels(_labels(ws.root / "ddp_eval" / "predictions"), single.labels)

    store = TrackingStore(f"sqlite:///{ws.root}/ddp_eval.db")
    (record,) = store.search_runs()
    assert record.status == "FINISHED" and record.tags["medda.command"] == "evaluate"
    reference = TrackingStore(f"sqlite:///{ws.root}/single_eval.db")
    (ref_record,) = reference.search_runs()
    test_metrics = {k: v for k, v in record.metrics.items() if k.startswith("test/")}
    assert test_metrics and test_metrics == {k: v for k, v in ref_record.metrics.items() if k.startswith("test/")}
    # the evidence (best, median, worst case overlays) draws on cases of both ranks, as one process does
    assert store.read_json(record.run_id, "evidence/cases.json") == reference.read_json(ref_record.run_id,
                                                                                        "evidence/cases.json")


@pytest.mark.slow
def test_refused_under_torchrun_with_one_line(ws):
    recipe = ws.recipe("ddp_sweep")
    run = ranks("adapt", str(recipe), f"source_checkpoint={ws.ckpt}", "--methods", "adabn,tent")
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("medda: error:")]
    assert lines and all("medda adapt --methods/--evaluate is not supported under torchrun yet" in line
                         for line in lines), run.stderr
    assert not (ws.root / "ddp_sweep").exists()


# --------------------------------------------------------------------------------------------- DDP training
@pytest.mark.slow
def test_ddp_equals_one_process_on_the_same_global_batch(tmp_path):
    """2 processes x 2 samples (DDP, gloo, synchronised batch norm) == 1 process x 4 samples, the same samples,
    through `run_loop`: supervised training with instance and with batch norm, AdaBN's statistics, Tent's weights;
    mean teacher's and BCP's students and EMA teachers are bit-identical on both processes.

    Synthetic in-memory batches (tests/ddp_equivalence.py) rather than the data pipeline, whose random patches and
    augmentation per process cannot reproduce one process's global batch. Tolerance: atol 1e-5 (measured 1e-7: the
    all-reduce sums the two halves in another order than one batch does). Without the all-reduce of the
    statistics' gradients, Tent's weights differ (by 8e-3 when tried): the comparison can fail.
    """
    import ddp_equivalence

    script = (str(REPO / "tests" / "ddp_equivalence.py"),)
    (tmp_path / "one").mkdir()
    (tmp_path / "ddp").mkdir()
    one = ranks(str(tmp_path / "one"), nproc=1, program=script)  # WORLD_SIZE 1: no process group
    assert one.returncode == 0, one.stderr
    ddp = ranks(str(tmp_path / "ddp"), nproc=2, program=script)
    assert ddp.returncode == 0, ddp.stderr
    for mode in ddp_equivalence.METHODS:
        single = torch.load(tmp_path / "one" / f"{mode}.pt", weights_only=True)
        parallel = torch.load(tmp_path / "ddp" / f"{mode}.pt", weights_only=True)
        start = ddp_equivalence.start_model(mode).state_dict()
        moved = max(float((single[k] - start[k]).abs().max()) for k in single if single[k].is_floating_point())
        assert moved > 1e-3, mode  # training (AdaBN: its statistics) moved the state
        assert single.keys() == parallel.keys()
        for key in single:
            torch.testing.assert_close(parallel[key], single[key], atol=1e-5, rtol=0, msg=f"{mode}: {key}")
        if mode == "adabn":  # statistics only: every parameter bit-identical
            assert all(torch.equal(single[k], start[k]) for k, _ in ddp_equivalence.start_model(mode).named_parameters())
    for mode in ddp_equivalence.TEACHER_METHODS:  # EMA teachers (and students) identical on every rank
        per_rank = [torch.load(tmp_path / "ddp" / f"{mode}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        start = ddp_equivalence.start_model(mode).state_dict()
        for part in ("student", "teacher"):
            assert max(float((per_rank[0][part][k] - start[k]).abs().max()) for k in start
                       if start[k].is_floating_point()) > 1e-3, (mode, part)
            for key in per_rank[0][part]:
                assert torch.equal(per_rank[0][part][key], per_rank[1][part][key]), f"{mode} {part}: {key}"


@pytest.mark.slow
def test_ddp_train_ssl_command_reports_once(ws):
    """`medda train-ssl` (BCP and its twin) under torchrun: two MLflow runs, one report, rank 0's checkpoints."""
    from medda.tracking import TrackingStore

    recipe = ws.recipe("ddp_ssl")
    overrides = [f"data.train={{path: '{ws.datalist}', split: training}}",
                 f"data.unlabeled={{path: '{ws.datalist}', split: validation}}", "data.test=null",
                 "data.patch_size=[16,16,8]", "model.channels=[8,16]", "method.name=bcp",
                 "method.options={pretrain_iterations: 2}", "train.iterations=4", "train.val_every=2",
                 "train.batch_size=2", "train.amp=off"]
    run = ranks("train-ssl", str(recipe), *overrides, "--threads", "1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("no data.test: skipping the comparison") == 1, run.stdout
    assert {p.name for p in (ws.root / "ddp_ssl" / "bcp").glob("*.pt")} >= {"last.pt"}
    records = TrackingStore(f"sqlite:///{ws.root}/ddp_ssl.db").search_runs()
    assert sorted(r.tags["ssl.role"] for r in records) == ["ssl", "supervised_twin"]
    assert all(r.status == "FINISHED" for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tent", "adabn"])
def test_ddp_adapt_command_tracks_and_checkpoints_once(ws, method):
    """`medda adapt` under torchrun: one MLflow run, rank 0's checkpoints, one verdict on stdout. AdaBN's pass over
    5 cases is dealt out unevenly (a process gets an empty last batch)."""
    from medda.models.factory import load_model
    from medda.tracking import TrackingStore

    recipe = ws.recipe(f"ddp_adapt_{method}")
    overrides = [f"source_checkpoint={ws.ckpt}", f"data.target={{path: '{ws.datalist}'}}", "data.test=null",
                 f"method.name={method}", "train.iterations=4", "train.val_every=2", "train.batch_size=1",
                 "train.amp=off"]
    run = ranks("adapt", str(recipe), *overrides, "--threads", "1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(f"adapted with {method}") == 1 and run.stdout.count("adapted model ") == 1, run.stdout
    out = ws.root / f"ddp_adapt_{method}"
    assert {"last.pt", "best.pt"} <= {p.name for p in out.iterdir()}
    load_model(out / "last.pt")
    (record,) = TrackingStore(f"sqlite:///{ws.root}/ddp_adapt_{method}.db").search_runs()
    assert record.status == "FINISHED" and record.tags["medda.command"] == "adapt"
    assert "recommended" in record.tags and "train/loss" in record.metrics


@pytest.mark.slow
def test_ddp_train_command_tracks_and_checkpoints_once(ws):
    """`medda train` under torchrun: one MLflow run, rank 0's checkpoints and finished resume state, one summary."""
    from medda.engine.resume import RESUME_FILE
    from medda.models.factory import load_model
    from medda.tracking import TrackingStore

    recipe = ws.recipe("ddp_train")
    overrides = [f"data.train={{path: '{ws.datalist}', split: training}}",
                 f"data.val={{path: '{ws.datalist}', split: validation}}", "data.test=null",
                 "data.patch_size=[16,16,8]", "model.channels=[8,16]", "model.norm=instance",
                 "train.iterations=4", "train.val_every=2", "train.batch_size=1", "train.amp=off"]
    run = ranks("train", str(recipe), *overrides, "--threads", "1")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("trained supervised: 4 iterations") == 1, run.stdout
    out = ws.root / "ddp_train"
    assert {"best.pt", "last.pt", RESUME_FILE} <= {p.name for p in out.iterdir()}
    assert not list(out.glob(".*.tmp"))
    load_model(out / "last.pt")
    assert "finished" in torch.load(out / RESUME_FILE, weights_only=True)
    (record,) = TrackingStore(f"sqlite:///{ws.root}/ddp_train.db").search_runs()
    assert record.status == "FINISHED" and record.tags["medda.command"] == "train"
    assert {"val/score", "train/loss"} <= set(record.metrics)
