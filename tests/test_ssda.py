"""Semi-supervised domain adaptation on phantoms: start `train` from a source model, few labels at the new site.

A small 3D UNet is trained on phantom site A (the source model). Site B (shifted contrast, bias, noise, spacing)
is the new site: ONE labelled training case, the other training cases unlabelled, three test cases. BCP started
from the source checkpoint must beat the source model on B's test cases. Around it: the preprocessing and network
come from the checkpoint, the run records its source, a class-count mismatch, a test set that overlaps the
labelled or validation cases are refused in one line, and without validation cases the checkpoint is selected by
the few-label rule (the last one of the fixed budget) without reading a test image.

Measured with exactly this test (CPU, fp32; BCP train.seed 0-3 via MEDDA_SSDA_SEED), mean B test Dice over
ring/blob/rv: source model 0.231; BCP from source 0.428 / 0.367 / 0.384 / 0.460 (gain >= 0.136). MARGIN leaves
room for thread/CPU nondeterminism. Runtime: about 25 s for the whole file on one free core.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import yaml
from monai.data.image_reader import NibabelReader

from medda import api, selection
from medda.config import load_config
from medda.data.phantoms import write_phantom_dataset
from medda.errors import MeddaError
from medda.models.factory import read_checkpoint
from medda.tracking import NullTracker
from pipelines.ssl import run_ssl_with_twin

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
CARD_A = REPO / "data_cards" / "phantom_site_a.yaml"
CARD_B = REPO / "data_cards" / "phantom_site_b.yaml"
FOV = (60.0, 60.0, 48.0)  # site A: 40 x 40 x 16 voxels, site B: 48 x 48 x 12
TINY = ["train.threads=1", "train.amp=off", "model.channels=[8,16,32]", "data.patch_size=[32,32,16]",
        "inference.sw_batch_size=2", "tracking.enabled=false"]
SSDA_ITERATIONS = 40
# BCP from the source model with one labelled B case must exceed the source model's B test Dice by this much.
MARGIN = 0.08


class RecordingTracker(NullTracker):
    """Records the run tags and the dataset contexts instead of sending them to MLflow."""

    def __init__(self):
        super().__init__()
        self.tags: dict[str, str] = {}
        self.contexts: dict[str, int] = {}

    @contextlib.contextmanager
    def run(self, name, tags=None, nested=False, run_id=None):
        self.tags.update(tags or {})
        yield self

    def log_dataset(self, name, digest, source, context, tags=None, cases=None):
        if cases:  # case lists, not the data card
            self.contexts[context] = len(cases)


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ssda")
    a = write_phantom_dataset(root / "a", ("A",), cases_per_site=5, seed=1, fov_mm=FOV)  # 3 train / 1 val / 1 test
    b = write_phantom_dataset(root / "b", ("B",), cases_per_site=8, seed=2, fov_mm=FOV,
                              split=(0.5, 0.125, 0.375))  # 4 train / 1 val / 3 test
    return {"A": a / "A" / "datalist.json", "B": b / "B" / "datalist.json"}


@pytest.fixture(scope="module")
def source(sites, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("source")
    cfg = load_config(REPO / "configs" / "phantom_source.yaml", [
        f"data.card={CARD_A}", *[f"data.{r}.path={sites['A']}" for r in ("train", "val", "test")],
        "train.iterations=60", "train.val_every=30", *TINY, f"output_dir={out}",
    ])
    return api.train(cfg).checkpoint


def _target_cfg(sites: dict[str, Path], source: Path | None, out: Path, method: str, extra: list[str] = ()):
    datalist = sites["B"]
    return load_config(REPO / "configs" / "phantom_ssl.yaml", [
        f"data.card={CARD_B}",
        f"data.train={{path: '{datalist}', split: training, limit: 1}}",
        f"data.unlabeled={{path: '{datalist}', split: training}}",
        "data.val=null",
        f"data.test={{path: '{datalist}', split: test}}",
        *([f"source_checkpoint={source}"] if source else []),
        f"method.name={method}", "method.options={}",
        f"train.iterations={SSDA_ITERATIONS}", f"train.val_every={SSDA_ITERATIONS}", *TINY, f"output_dir={out}",
        *extra,
    ])


def _test_dice(checkpoint: Path, cfg, out: Path) -> float:
    return api.evaluate(checkpoint, cfg.model_copy(update={"output_dir": out})).summary["dice/mean"]


@pytest.mark.slow
def test_bcp_from_source_with_one_label_beats_the_source_model(sites, source, tmp_path):
    cfg = _target_cfg(sites, source, tmp_path / "bcp", "bcp", ["data.augment=false", "data.patch_size=[24,24,8]",
                                                               f"method.options.pretrain_iterations={SSDA_ITERATIONS // 4}",
                                                               f"train.seed={os.environ.get('MEDDA_SSDA_SEED', '0')}"])
    tracker = RecordingTracker()
    result = api.train(cfg, tracker=tracker)

    meta = read_checkpoint(result.checkpoint)["meta"]
    source_meta = read_checkpoint(source)["meta"]
    # The network and the preprocessing geometry are the source model's (patch 32x32x16, not the recipe's 24x24x8).
    assert meta["model"] == source_meta["model"] and meta["data"] == source_meta["data"]
    assert meta["source_card"]["name"] == "phantom_site_a" and meta["adapted_to"] == "phantom_site_b"
    assert tracker.tags["source.checkpoint"] == str(source) and tracker.tags["source_free"] == "false"
    assert tracker.contexts == {"train-labeled": 1, "train-unlabeled": 3}
    # No validation cases: the few-label rule keeps the last checkpoint of the budget.
    assert result.selection == "last" and result.checkpoint == result.last
    source_dice = _test_dice(source, cfg, tmp_path / "eval_source")
    bcp_dice = _test_dice(result.checkpoint, cfg, tmp_path / "eval_bcp")
    print(f"B test Dice: source {source_dice:.3f}, BCP from source {bcp_dice:.3f}")
    assert bcp_dice >= source_dice + MARGIN, f"B test Dice: source {source_dice:.3f}, BCP from source {bcp_dice:.3f}"


def test_teacher_starts_from_the_source_weights(sites, source, tmp_path, monkeypatch):
    built = {}
    original = api._build_method

    def spy(cfg, model, context):
        built["method"] = original(cfg, model, context)
        raise MeddaError("stop after building the method")

    monkeypatch.setattr(api, "_build_method", spy)
    with pytest.raises(MeddaError, match="stop after"):
        api.train(_target_cfg(sites, source, tmp_path, "mean_teacher"))
    weights = read_checkpoint(source)["state_dict"]
    teacher = built["method"].teacher.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in weights.items())


def test_fine_tune_is_recorded_as_target_labelled(sites, source, tmp_path):
    tracker = RecordingTracker()
    cfg = _target_cfg(sites, source, tmp_path, "finetune_fewshot", ["train.iterations=2", "train.val_every=2"])
    result = api.train(cfg, tracker=tracker)
    assert tracker.contexts == {"target-labeled": 1}
    assert tracker.tags["parent.run_id"] == tracker.tags["source.run_id"]
    assert tracker.tags["checkpoint.policy"] == "last" and result.checkpoint.name == "last.pt"


def test_train_ssl_from_source_evaluates_the_source_its_fine_tune_and_the_ssl_run(sites, source, tmp_path):
    echoed: list[str] = []
    cfg = _target_cfg(sites, source, tmp_path, "mean_teacher", ["train.iterations=2", "train.val_every=2"])
    results = run_ssl_with_twin(cfg, [], echoed.append)
    assert set(results) == {"supervised", "mean_teacher"}
    # No data.val: one checkpoint per run (the last), evaluated once, next to the untouched source model.
    heads = [text.strip().split(",")[0] for text in echoed]
    assert heads == ["source (no training", "supervised (last", "mean_teacher (last"]


def test_train_ssl_with_label_free_selection_evaluates_each_runs_choice(sites, source, tmp_path):
    """Both runs (the twin too) keep the monitor's choice; no verdict between them is printed (the scores rank one
    run's checkpoints, not two methods)."""
    echoed: list[str] = []
    cfg = _target_cfg(sites, source, tmp_path, "mean_teacher", ["train.iterations=4", "train.val_every=2",
                                                                "train.select_by=label_free", "selection.cases=1"])
    results = run_ssl_with_twin(cfg, [], echoed.append)
    assert all(r.selection == "label_free" for r in results.values())
    assert not any("prefers" in text for text in echoed)
    heads = [text.strip().split(",")[0] for text in echoed]
    for name, result in results.items():  # the chosen checkpoint is evaluated under its policy's name
        policy = "label_free" if result.checkpoint != result.last else "last"
        assert f"{name} ({policy}" in heads


def test_selection_without_validation_never_reads_the_test_cases(sites, tmp_path, monkeypatch):
    opened: list[str] = []
    original = NibabelReader.read

    def spy(self, data, **kwargs):
        opened.extend(str(n) for n in (data if isinstance(data, (list, tuple)) else [data]))
        return original(self, data, **kwargs)

    monkeypatch.setattr(NibabelReader, "read", spy)
    cfg = _target_cfg(sites, None, tmp_path, "supervised", ["train.iterations=2", "train.val_every=1"])
    result = api.train(cfg)
    assert result.selection == "last" and result.checkpoint == result.last and result.loop.best_iteration == -1
    test_images = {Path(c["image"]).name for c in api.Data.load(cfg.data).cases(cfg.data.test, "test")}
    assert opened and not test_images & {Path(f).name for f in opened}


def test_few_label_selection_rule():
    assert api.few_label_selection("val_dice", has_val=True) == "val_dice"
    assert api.few_label_selection("last", has_val=True) == "last"
    assert api.few_label_selection("val_dice", has_val=False) == "last"
    assert api.few_label_selection("cross_validation", has_val=False) == "cross_validation"
    assert api.few_label_selection("label_free", has_val=False, can_monitor=True) == "label_free"
    with pytest.raises(MeddaError, match="train.select_by' is label_free, which chooses without labels; with data.val"):
        api.few_label_selection("label_free", has_val=True, can_monitor=True)
    with pytest.raises(MeddaError, match="scores the unlabelled target cases of a run from a source model"):
        api.few_label_selection("label_free", has_val=False)
    with pytest.raises(MeddaError, match="holds out the labelled cases of data.train in turn; set data.val to null"):
        api.few_label_selection("cross_validation", has_val=True)


def test_label_free_selection_keeps_the_stage_2_checkpoint_the_monitor_scores_best(sites, source, tmp_path):
    """select_by=label_free (a source model, one labelled case, unlabelled cases): the label-free monitor scores the
    unlabelled cases every val_every iterations with the labelled case's class ratios as its prior; the chosen
    checkpoint is the best-scoring one of BCP's stage 2, which starts from the last stage-1 weights."""
    tracker = RecordingTracker()
    cfg = _target_cfg(sites, source, tmp_path, "bcp", [
        "data.augment=false", "method.options.pretrain_iterations=4", "train.iterations=12", "train.val_every=2",
        "train.select_by=label_free", "selection.cases=2",
    ])
    result = api.train(cfg, tracker=tracker)
    history = result.loop.history
    assert [h["iteration"] for h in history] == [2, 4, 6, 8, 10, 12]
    stage_2 = [h for h in history if h["iteration"] > 4]  # the selection restarts with the phase
    best = max(stage_2, key=lambda h: (h["val/score"], -h["iteration"]))
    assert result.selection == "label_free" and tracker.tags["checkpoint.policy"] == "label_free"
    assert result.loop.best_iteration == best["iteration"] and result.checkpoint.name == "best.pt"
    assert read_checkpoint(result.checkpoint)["meta"]["iteration"] == best["iteration"]
    for h in history:  # flip consistency minus the KL to the labelled case's ratios, as in `medda adapt`
        assert h["val/score"] == pytest.approx(h["monitor/flip_consistency"] - h["monitor/prior_kl"])
    labelled = api.Data.load(cfg.data).cases(cfg.data.train, "train")
    assert tracker.contexts == {"train-labeled": 1, "train-unlabeled": 3}
    class_prior = read_checkpoint(result.checkpoint)["meta"]["class_prior"]
    assert class_prior["cases"] == len(labelled)
    # the KL is taken to the labelled case's marginal class ratios (not the source model's prior)
    from medda.methods.losses import kl_divergence

    marginal = torch.tensor([class_prior["marginal"][name] for name in class_prior["marginal"]])
    source_marginal = read_checkpoint(source)["meta"]["class_prior"]["marginal"]
    assert list(class_prior["marginal"].values()) != list(source_marginal.values())
    source_tensor = torch.tensor(list(source_marginal.values()))
    to_source = []
    for h in history:  # (the checkpoint's prior is stored rounded to 6 decimals)
        ratios = torch.tensor([h[f"monitor/ratio/{c}"] for c in range(len(marginal))])
        assert h["monitor/prior_kl"] == pytest.approx(float(kl_divergence(ratios, marginal)), rel=2e-3)
        to_source.append(abs(h["monitor/prior_kl"] / float(kl_divergence(ratios, source_tensor)) - 1))
    assert max(to_source) > 1e-2  # the source model's prior would have given other values


def test_label_free_selection_of_a_fine_tune_only_monitors_the_unlabelled_cases(sites, source, tmp_path):
    tracker = RecordingTracker()
    cfg = _target_cfg(sites, source, tmp_path, "supervised", ["train.iterations=4", "train.val_every=2",
                                                              "train.select_by=label_free", "selection.cases=1"])
    result = api.train(cfg, tracker=tracker)
    assert tracker.contexts == {"target-labeled": 1, "monitor": 3}  # monitored, never trained on
    assert result.selection == "label_free" and [h["iteration"] for h in result.loop.history] == [2, 4]


def test_label_free_selection_without_a_source_model_is_refused_before_training(sites, tmp_path):
    cfg = _target_cfg(sites, None, tmp_path, "bcp", ["train.select_by=label_free"])
    with pytest.raises(MeddaError, match="label_free, which scores the unlabelled target cases") as err:
        api.train(cfg)
    assert "\n" not in str(err.value) and not any(tmp_path.iterdir())


def test_cross_validation_folds_hold_out_every_case_once():
    cases = [{"id": f"c{i}"} for i in range(7)]
    assert [[c["id"] for c in f] for f in selection.cross_validation_folds(cases[:3], 5)] == [["c0"], ["c1"], ["c2"]]
    folds = selection.cross_validation_folds(cases, 3)
    assert [[c["id"] for c in f] for f in folds] == [["c0", "c3", "c6"], ["c1", "c4"], ["c2", "c5"]]
    with pytest.raises(MeddaError, match="needs at least 2 labelled cases in data.train \\(found 1\\)"):
        selection.cross_validation_folds(cases[:1], 5)


def test_choose_iteration_maximises_the_mean_over_folds_and_prefers_the_earliest_tie():
    # fold 1 peaks at 20, fold 2 at 30; the mean (0.6, 0.7, 0.7, 0.5) peaks at 20 and 30: the earlier one wins.
    # Iteration 40 is missing from fold 2 (it stopped early) and is no candidate.
    curves = [{10: 0.5, 20: 0.8, 30: 0.6, 40: 0.9}, {10: 0.7, 20: 0.6, 30: 0.8}]
    chosen, mean = selection.choose_iteration(curves)
    assert chosen == 20 and mean == pytest.approx({10: 0.6, 20: 0.7, 30: 0.7})


def test_cross_validation_trains_a_fold_per_labelled_case_then_stops_where_the_folds_score_best(sites, source,
                                                                                                 tmp_path):
    cfg = _target_cfg(sites, source, tmp_path, "supervised", [
        f"data.train={{path: '{sites['B']}', split: training, limit: 2}}", "data.unlabeled=null",
        "data.augment=false", "train.iterations=12", "train.val_every=3", "train.select_by=cross_validation",
    ])
    tracker = RecordingTracker()
    result = api.train(cfg, tracker=tracker)
    cv = result.cross_validation
    ids = [c["id"] for c in api.Data.load(cfg.data).cases(cfg.data.train, "train")]
    assert [f["held_out"] for f in cv["folds"]] == [[ids[0]], [ids[1]]]
    # each fold scored its held-out case every val_every iterations; the mean curve's best iteration is chosen
    assert [[it for it, _ in f["val_dice"]] for f in cv["folds"]] == [[3, 6, 9, 12]] * 2
    mean = dict(cv["mean_val_dice"])
    assert cv["iteration"] == max(mean, key=lambda it: (mean[it], -it))
    for it, value in mean.items():
        assert value == pytest.approx(sum(dict(f["val_dice"])[it] for f in cv["folds"]) / 2)
    # the final run trained on both labelled cases and stopped at the chosen iteration, keeping that checkpoint
    assert result.selection == "cross_validation" and result.checkpoint == result.last
    assert result.loop.iterations == cv["iteration"]
    assert read_checkpoint(result.checkpoint)["meta"]["iteration"] == cv["iteration"]
    assert (tmp_path / "cv" / "fold1" / "last.pt").exists() and (tmp_path / "cv" / "fold2" / "last.pt").exists()
    assert not list((tmp_path / "cv").glob("fold*/best.pt"))  # a fold only scores: no model is selected there
    assert tracker.tags["cv.fold"] == "2/2" and tracker.tags["checkpoint.policy"] == "cross_validation"


def test_cross_validation_verdict_ranks_the_twins_only_beyond_its_resolution():
    from pipelines.ssl import CV_RESOLUTION, cross_validation_verdict

    def result(score: float, iteration: int, cv: bool = True) -> api.TrainResult:
        summary = {"folds": [{}, {}, {}], "mean_val_dice": [[iteration, score]], "iteration": iteration}
        return api.TrainResult(Path("x"), Path("x"), None, None, "cross_validation", summary if cv else None)

    verdict = cross_validation_verdict({"supervised": result(0.78, 900), "bcp": result(0.79, 1300)})
    assert verdict == ("cross-validation (3 folds over the labelled cases): supervised 0.7800 at iteration 900, "
                       "bcp 0.7900 at iteration 1300; it prefers bcp over supervised")
    close = cross_validation_verdict({"supervised": result(0.70, 600), "bcp": result(0.70 + CV_RESOLUTION / 2, 700)})
    assert close.endswith("so the folds do not separate them")
    assert cross_validation_verdict({"supervised": result(0.7, 600, cv=False), "bcp": result(0.8, 700)}) is None


def test_cross_validation_with_one_labelled_case_is_refused_before_training(sites, source, tmp_path):
    cfg = _target_cfg(sites, source, tmp_path, "supervised", ["data.unlabeled=null",
                                                               "train.select_by=cross_validation"])
    with pytest.raises(MeddaError, match="needs at least 2 labelled cases") as err:
        api.train(cfg)
    assert "\n" not in str(err.value) and not any(tmp_path.iterdir())


@pytest.mark.parametrize("field", ["train", "val"])
def test_test_set_overlapping_labelled_or_validation_cases_is_refused(sites, tmp_path, field):
    datalist = sites["B"]
    cfg = _target_cfg(sites, None, tmp_path, "supervised", [
        f"data.{field}={{path: '{datalist}', split: test, limit: 1}}",
    ])
    with pytest.raises(MeddaError, match=f"data.{field} and data.test share 1 case") as err:
        api.train(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "last.pt").exists()  # refused before any training


def test_refuse_overlap_matches_ids_and_image_files(tmp_path):
    a, b = {"id": "x", "image": str(tmp_path / "x.nii.gz")}, {"id": "y", "image": str(tmp_path / "y.nii.gz")}
    api._refuse_overlap([a], [b], "train")  # disjoint: accepted
    api._refuse_overlap([a], [], "train")
    with pytest.raises(MeddaError, match="data.train and data.test share 1 case"):
        api._refuse_overlap([a], [{"id": "other", "image": a["image"]}], "train")  # the same file under another id
    with pytest.raises(MeddaError, match=r"share 1 case\(s\) \(x\)"):
        api._refuse_overlap([a, b], [{"id": "x", "image": str(tmp_path / "copy.nii.gz")}], "train")


def test_class_count_mismatch_is_refused(sites, source, tmp_path):
    card = yaml.safe_load(CARD_B.read_text(encoding="utf-8"))
    card["labels"] = card["labels"][:3]  # background, ring, blob: 3 classes against the source model's 4
    card_path = tmp_path / "three_classes.yaml"
    card_path.write_text(yaml.safe_dump(card))
    cfg = _target_cfg(sites, source, tmp_path / "out", "bcp", [f"data.card={card_path}"])
    with pytest.raises(MeddaError, match="maps to 3 classes but the source model predicts 4") as err:
        api.train(cfg)
    assert str(card_path) in str(err.value) and "\n" not in str(err.value)


def test_bcp_pairs_batches_when_fewer_unlabelled_than_labelled_cases(sites, tmp_path):
    """3 labelled B cases, 1 unlabelled left, batch 2: BCP pairs 1 + 1 volume per step instead of failing at its
    first step on mismatched halves (found with a 5-case demo)."""
    cfg = _target_cfg(sites, None, tmp_path / "bcp", "bcp", [
        f"data.train={{path: '{sites['B']}', split: training, limit: 3}}", "train.batch_size=2",
        "train.iterations=4", "train.val_every=4", "method.options.pretrain_iterations=1"])
    result = api.train(cfg)
    assert result.loop.iterations == 4 and result.last.is_file()
