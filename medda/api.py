"""The only wiring layer: data + model + method + engine + inference + metrics + tracking.

`train` (source training, semi-supervised), `adapt` (source-free adaptation), `predict` and `evaluate`.
The CLI (`pipelines/`) parses a config and calls these; tests call them directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import medda
from medda import distributed, evidence, lineage, metrics
from medda.config import DataConfig, DatasetRef, ModelConfig, OptimConfig, RunConfig, validate
from medda.data.cards import DataCard, load_card
from medda.data.datalist import datalist_digest, read_cases
from medda.data.loading import Data
from medda.data.priors import Prior, measure_class_prior
from medda.data.transforms import (
    inference_chain,
    load_label,
)
from medda.engine.loop import LoopResult, run_loop
from medda.engine.resume import RESUME_FILE, Resume, header, interruptible, read_resume
from medda.errors import MeddaError
from medda.inference import (
    Predictor,
    predict_cases,
    prediction_path,
    readable_prediction,
    remove_stale_temporaries,
    write_prediction,
)
from medda.methods.base import Method, MethodContext
from medda.models.factory import build_model, load_model, save_checkpoint
from medda.registry import get_method, methods_for
from medda.runtime import Runtime, require_compiler, resolve_device
from medda.selection import (
    LabelFreeValidator,
    choose_iteration,
    cross_validation_folds,
    dice_validator,
    recommend,
    snapshot_bn,
)
from medda.tracking import NullTracker, Tracker, make_tracker

PREPROCESSING_FIELDS = ("mode", "slice_axis", "patch_size", "spacing", "foreground_crop")


# --------------------------------------------------------------------------------------------- data
def spacing_for_metrics(card: DataCard, affine: np.ndarray) -> tuple[float, ...] | None:
    """Voxel size in mm for distance metrics, or None (voxels) when the card says spacing is unknown.

    The file's affine is authoritative when it carries a real spacing; a trivial (1, 1, 1) header falls back
    to the card's documented spacing (e.g. copies that lost their header).
    """
    if not card.spacing_known:
        return None
    from_file = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    if np.allclose(from_file, 1.0):
        return tuple(float(s) for s in card.spacing)
    return tuple(float(s) for s in from_file)


def _method_context(cfg: RunConfig, num_classes: int, prior: Prior, total: int) -> MethodContext:
    return MethodContext(
        num_classes=num_classes,
        spatial_dims=2 if cfg.data.mode == "2d" else 3,
        patch_size=tuple(cfg.data.patch_size),
        total_iterations=total,
        class_ratio_prior=torch.tensor(prior.conditional, dtype=torch.float32) if prior.conditional else None,
        class_presence=torch.tensor(prior.presence, dtype=torch.float32) if prior.presence else None,
        seed=cfg.train.seed,
    )


def _build_method(cfg: RunConfig, model: nn.Module, context: MethodContext) -> Method:
    cls = get_method(cfg.method.name)
    options = validate(cls.Config, cfg.method.options, f"config field 'method.options' ({cls.name})")
    # Under torchrun, batch norm normalises training steps with the global batch's statistics (EMA teachers,
    # copies of `model`, too); in one process `model` is unchanged.
    return cls(distributed.sync_batch_norm(model), options, context)


def _method_optim(cfg: RunConfig) -> OptimConfig:
    """The run's optimiser: every field the config sets, the method's reference recipe for the others."""
    given = cfg.optim.model_dump(include=cfg.optim.model_fields_set)
    return OptimConfig.model_validate({**get_method(cfg.method.name).default_optim, **given})


def _checkpoint_meta(cfg: RunConfig, data: Data, num_classes: int, method: str, extra: dict | None = None) -> dict:
    card = data.card
    return {
        "model": cfg.model.model_dump(mode="json"),
        "spatial_dims": 2 if cfg.data.mode == "2d" else 3,
        "num_classes": num_classes,
        "class_names": card.class_names,
        "data": {k: getattr(cfg.data, k) for k in PREPROCESSING_FIELDS},
        "card": {"name": card.name, "site": card.site, "digest": card.digest(), "spacing": card.spacing},
        "class_ratio_prior": {"2d": card.prior("2d"), "3d": card.prior("3d")},  # the card's, for reference
        "method": method,
        "config_digest": cfg.digest(),
        "medda_version": medda.__version__,
        **(extra or {}),
    }


def _log_inputs(tracker: Tracker, data: Data, roles: dict[str, list[dict]]) -> None:
    tracker.log_dataset(f"card:{data.card.name}", data.card.digest(), data.card_path, "data-card")
    for context, cases in roles.items():
        tracker.log_dataset(
            f"{data.card.name}:{context}", datalist_digest(cases), str(Path(cases[0]["image"]).parent), context,
            {"cases": len(cases)}, cases=cases,
        )


def _resume(cfg: RunConfig, resume: bool) -> tuple[Resume, dict | None]:
    """The run's resume-state keeper, and with `resume` the state it continues from (refused when there is none,
    or when it was written for another config). A fresh run overwrites an old state at its first iteration."""
    previous = read_resume(cfg) if resume else None
    loop = previous.get("loop") if previous else None
    return Resume(cfg.output_dir / RESUME_FILE, cfg.train.resume_every or cfg.train.val_every, loop,
                  saved=previous is not None), previous


def _resumed(tracker: Tracker, previous: dict) -> None:
    """A resumed run already holds its config and inputs; it records where it continued."""
    tracker.set_tags({"resume.iteration": previous["loop"]["iteration"]})


def _record(result: TrainResult | AdaptResult) -> dict:
    """A finished run's result as plain data (paths as text) for its final resume state."""
    return json.loads(json.dumps(dataclasses.asdict(result), default=str))


# --------------------------------------------------------------------------------------------- train
@dataclass
class TrainResult:
    checkpoint: Path  # the selected checkpoint (best on validation, or last)
    last: Path
    loop: LoopResult
    run_id: str | None
    selection: str
    # select_by=cross_validation: the folds (held-out case ids, run ids, [iteration, Dice] of every validation),
    # the mean curve and the chosen iteration; None otherwise
    cross_validation: dict | None = None

    @classmethod
    def from_record(cls, r: dict) -> TrainResult:
        best = r["loop"]["best_path"]
        loop = LoopResult(**{**r["loop"], "best_path": Path(best) if best else None,
                             "last_path": Path(r["loop"]["last_path"])})
        return cls(Path(r["checkpoint"]), Path(r["last"]), loop, r["run_id"], r["selection"],
                   r.get("cross_validation"))


@dataclass(frozen=True)
class _Plan:
    """What cross-validation changes in one training run (the default plan changes nothing)."""

    labeled: list[dict] | None = None  # a fold's labelled cases (None: data.train)
    held_out: list[dict] | None = None  # a fold's held-out cases: scored along the run, never selected on
    stop_at: int | None = None  # the final run stops at the chosen iteration
    cross_validation: dict | None = None  # the final run records the folds' result


def _refuse_overlap(cases: list[dict], test_cases: list[dict], field: str) -> None:
    """Refuse evaluation cases that a run also trains or selects on (the same case id or the same image file).

    Args:
        cases: the cases of `data.<field>` (labelled training or validation cases).
        test_cases: the cases of `data.test` (may be empty).
        field: the config field of `cases`, e.g. "train" or "val" (named in the message).

    Raises:
        MeddaError: one line naming both fields and the first shared cases.
    """

    def keys(case: dict) -> set[str]:
        return {case["id"], str(Path(case["image"]).resolve())}

    test_keys = set().union(*(keys(c) for c in test_cases))
    shared = [c["id"] for c in cases if keys(c) & test_keys]
    if shared:
        raise MeddaError(
            f"config: data.{field} and data.test share {len(shared)} case(s) ({', '.join(shared[:3])}); "
            "test cases must never be trained or selected on, so choose disjoint splits"
        )


def label_free_monitor(runtime: Runtime, cfg: RunConfig, data: Data, cases: list[dict],
                       marginal: torch.Tensor | None, model: nn.Module) -> LabelFreeValidator:
    """The label-free monitor of a run (`medda adapt`, `train.select_by=label_free`; docs/methods.md section 7):
    the run's predictor without flips (flip consistency makes its own) on `cases`, `marginal` the prior of its KL
    term, `model`'s batch-norm statistics the source's."""
    no_flips = cfg.inference.model_copy(update={"tta_flips": False})
    return LabelFreeValidator(lambda m: Predictor.on(runtime, m, cfg.data, no_flips, cfg.train.channels_last),
                              data, cases, marginal, snapshot_bn(model), cfg.selection)


def few_label_selection(select_by: str, has_val: bool, can_monitor: bool = False) -> str:
    """The checkpoint rule of a run that trains on labels (README "Model selection with few labels").

    With validation cases the rule is `train.select_by` (best validation Dice, or the last checkpoint). Without
    them it is the last checkpoint of the fixed budget (`train.iterations`, the LR schedule ending there): a few
    labelled target cases are too few to both train and select on, and `data.test` is never used for selection.
    Two rules choose without validation cases: `cross_validation` (over the labelled cases) and `label_free` (the
    label-free monitor on the unlabelled target cases, for a run from a source model: `can_monitor`).

    Raises:
        MeddaError: `select_by` cannot apply to this run.
    """
    if select_by == "label_free":
        if has_val:
            raise MeddaError("config: field 'train.select_by' is label_free, which chooses without labels; with "
                             "data.val set, select_by val_dice chooses on those labels")
        if not can_monitor:
            raise MeddaError("config: field 'train.select_by' is label_free, which scores the unlabelled target cases "
                             "of a run from a source model; set source_checkpoint and data.unlabeled, or select_by "
                             "last or cross_validation")
        return select_by
    if select_by == "cross_validation":
        if has_val:
            raise MeddaError("config: field 'train.select_by' is cross_validation, which holds out the labelled cases "
                             "of data.train in turn; set data.val to null, or select_by to val_dice")
        return select_by
    return select_by if has_val else "last"


def _refuse_class_mismatch(card_path: Path, card: DataCard, meta: dict) -> None:
    """The target card must map to the classes the source model predicts."""
    if card.num_classes != meta["num_classes"]:
        raise MeddaError(
            f"{card_path}: field 'labels' maps to {card.num_classes} classes but the source model predicts "
            f"{meta['num_classes']} ({', '.join(meta['class_names'])})"
        )


def _load_source(path: Path) -> tuple[nn.Module, dict]:
    """A source model and its metadata, refused in one line without the data card it was trained on (its digest
    ties every adapted or fine-tuned model to its source in the audit chain)."""
    model, meta = load_model(path)
    card = meta.get("card")
    if not isinstance(card, dict) or "digest" not in card:
        raise MeddaError(f"{path}: field 'meta.card' missing or without a digest: a source model must record the data "
                         "card it was trained on (checkpoints written by `medda train` do)")
    return model, meta


def _from_source(cfg: RunConfig) -> tuple[RunConfig, nn.Module, dict]:
    """Start from `cfg.source_checkpoint`: its network and weights, its model config and preprocessing geometry.

    The target card keeps its own intensities and label map (as in `adapt`); returns (updated cfg, model, meta).
    """
    model, meta = _load_source(cfg.source_checkpoint)
    cfg = cfg.model_copy(deep=True, update={
        "data": cfg.data.model_copy(update={k: meta["data"][k] for k in PREPROCESSING_FIELDS}),
        "model": ModelConfig.model_validate(meta["model"]),  # already validated by load_model
    })
    return cfg, model, meta


def train(cfg: RunConfig, tracker: Tracker | None = None, tags: dict | None = None, resume: bool = False) -> TrainResult:
    """Train a segmenter with `cfg.method` (supervised, mean teacher, BCP), from scratch or from a source model.

    With `cfg.source_checkpoint` (semi-supervised domain adaptation, few-shot fine-tuning) the network, its weights
    and its preprocessing geometry come from the checkpoint and the label map and intensities from `data.card`, as in
    `adapt`; an EMA teacher (mean teacher, BCP) is a copy of the model, so it starts from the source weights too.
    The checkpoint is selected by `few_label_selection`, never on `data.test`.

    `resume`: continue the interrupted run of `cfg.output_dir` (its resume.pt and MLflow run); a finished run is not
    trained again, its recorded result is returned.

    Under torchrun each process trains on its own batches of `train.batch_size` (labelled and unlabelled streams
    seeded per rank) in one DistributedDataParallel model with synchronised batch norm; EMA teachers follow the
    identical averaged student on every rank, so they stay identical too. Rank 0 alone validates (BCP's second
    stage starts from its choice on every rank), saves checkpoints and the resume state, and logs to MLflow
    (README "Running on several processes (torchrun)").
    """
    if distributed.launched() and resume:
        distributed.refuse("medda train --resume")
    if cfg.train.select_by == "cross_validation":
        distributed.refuse("train.select_by=cross_validation")
    with distributed.session():
        if cfg.train.select_by == "cross_validation":
            return _cross_validated(cfg, tracker, tags, resume)
        return _train(cfg, tracker, tags, resume)


def _cross_validated(cfg: RunConfig, tracker: Tracker | None, tags: dict | None, resume: bool) -> TrainResult:
    """select_by=cross_validation: one run per fold on the other labelled cases, scoring its held-out ones every
    `val_every` iterations (and at BCP's phase switch); then one run on every labelled case that stops at the
    iteration with the best mean held-out Dice, under the LR schedule of the full budget, as in the folds.

    The folds live in `output_dir/cv/fold<i>` and are MLflow runs of their own, tagged `cv.fold` and `cv.held_out`;
    with `resume`, finished folds are not trained again. The final run records the mean curve (`cv/val_dice` by
    iteration), the chosen iteration and the folds' run ids. Costs up to `cv_folds` + 1 trainings.
    """
    data = Data.load(cfg.data)
    labeled = data.cases(cfg.data.train, "train")
    few_label_selection(cfg.train.select_by, bool(cfg.data.val))  # refuses data.val before any fold trains
    test_cases = data.cases(cfg.data.test, "test") if cfg.data.test else []
    _refuse_overlap(labeled, test_cases, "train")
    folds = cross_validation_folds(labeled, cfg.train.cv_folds)
    tracker = tracker or make_tracker(cfg.tracking)
    name = cfg.tracking.run_name or f"train-{cfg.method.name}"
    records, curves = [], []
    for i, held_out in enumerate(folds, start=1):
        held_ids = [c["id"] for c in held_out]
        fold_cfg = cfg.model_copy(deep=True, update={
            "output_dir": cfg.output_dir / "cv" / f"fold{i}",
            "tracking": cfg.tracking.model_copy(update={"run_name": f"{name}-cv{i}"}),
        })
        fold_tags = {**(tags or {}), "cv.fold": f"{i}/{len(folds)}", "cv.held_out": ",".join(held_ids)}
        rest = [c for c in labeled if c["id"] not in held_ids]
        fold = _train(fold_cfg, tracker, fold_tags, _resumes(resume, fold_cfg, first=i == 1),
                      _Plan(labeled=rest, held_out=held_out))
        curve = {int(h["iteration"]): float(h["val/score"]) for h in fold.loop.history}
        curves.append(curve)
        records.append({"held_out": held_ids, "run_id": fold.run_id, "val_dice": sorted(curve.items())})
    chosen, mean = choose_iteration(curves)
    summary = {"folds": records, "mean_val_dice": sorted(mean.items()), "iteration": chosen}
    final = _Plan(stop_at=chosen, cross_validation=summary)
    return _train(cfg, tracker, tags, _resumes(resume, cfg, first=False), final)


def _resumes(resume: bool, cfg: RunConfig, first: bool) -> bool:
    """Whether a stage of cross-validation continues a saved state: the first fold always with `--resume` (refused
    when nothing was saved), a later stage only when it had started before the interruption."""
    return resume and (first or (cfg.output_dir / RESUME_FILE).exists())


def _train(cfg: RunConfig, tracker: Tracker | None, tags: dict | None, resume: bool,
           plan: _Plan = _Plan()) -> TrainResult:
    main = distributed.is_main()
    if cfg.train.compile:
        require_compiler(resolve_device(cfg.train.device))
    source_meta: dict | None = None
    if cfg.source_checkpoint is not None:
        cfg, model, source_meta = _from_source(cfg)
    keeper, previous = _resume(cfg, resume)
    if previous is not None and "finished" in previous:
        return TrainResult.from_record(previous["finished"])
    runtime = Runtime.setup(cfg)
    data = Data.load(cfg.data)
    num_classes = data.card.num_classes
    if source_meta is not None:
        _refuse_class_mismatch(cfg.data.card, data.card, source_meta)
    cls = get_method(cfg.method.name)
    labeled = plan.labeled if plan.labeled is not None else data.cases(cfg.data.train, "train")
    val_cases = plan.held_out or (data.cases(cfg.data.val, "val") if cfg.data.val else [])
    test_cases = data.cases(cfg.data.test, "test") if cfg.data.test else []
    _refuse_overlap(labeled, test_cases, "train")
    _refuse_overlap(val_cases, test_cases, "val")
    # a fold scores its held-out cases but keeps its last checkpoint, as the final run will
    can_monitor = source_meta is not None and cfg.data.unlabeled is not None
    selection = "last" if plan.held_out else few_label_selection(cfg.train.select_by, bool(val_cases), can_monitor)
    streams, lengths = {}, {}
    unlabeled: list[dict] = []
    if "unlabeled" in cls.streams or selection == "label_free":  # label_free: monitored, trained on only by SSL
        labeled_ids = {c["id"] for c in labeled}
        # Labelled cases are never also drawn as unlabelled ones (one pool per case, as in the SSL literature).
        unlabeled = [c for c in data.cases(cfg.data.unlabeled, "unlabeled") if c["id"] not in labeled_ids]
        if not unlabeled:
            raise MeddaError("config: data.unlabeled has no cases left once the labelled ones are removed")
    labeled_batch, unlabeled_batch = cfg.train.batch_size, cfg.train.unlabeled_batch_size or cfg.train.batch_size
    if cls.paired_batches:  # one unlabelled volume per labelled one, also when few labelled or unlabelled cases exist
        paired = min(cfg.train.batch_size, len(labeled), len(unlabeled))
        if cfg.train.unlabeled_batch_size not in (None, paired):
            raise MeddaError(
                f"config: field 'train.unlabeled_batch_size' must equal the labelled batch ({paired} volumes) "
                f"for method '{cls.name}', which pairs each labelled volume with an unlabelled one; leave it unset"
            )
        labeled_batch = unlabeled_batch = paired
    if "labeled" in cls.streams:
        # one seed per process under torchrun (rank 0: the single-process seed), so that processes draw other batches
        streams["labeled"], lengths["labeled"] = data.stream(labeled, True, labeled_batch,
                                                             cfg.train.seed + distributed.rank())
    if "unlabeled" in cls.streams:
        # rank 0: the single-process seed; other ranks far from every rank's labelled seed
        streams["unlabeled"], lengths["unlabeled"] = data.stream(unlabeled, False, unlabeled_batch,
                                                                 cfg.train.seed + 1 + 100_003 * distributed.rank())
    if not cfg.data.cache:  # lazy datasets: every case read now, so a bad one is refused before anything exists
        data.check(unlabeled, False)  # (labelled cases are read by the class-prior measurement below)
        data.check(val_cases, True)
    validate = None
    if (selection == "val_dice" or plan.held_out) and main:  # built before the run (the cache reads every case)
        validate = dice_validator(lambda m: Predictor.on(runtime, m, cfg.data, cfg.inference, cfg.train.channels_last),
                                  data, val_cases)
    if source_meta is None:  # built after the data streams, as always, so seeded initialisations are unchanged
        model = build_model(cfg.model, 2 if cfg.data.mode == "2d" else 3, num_classes)
    # The class prior of the labelled data in the training geometry travels with the checkpoint (adaptation).
    class_prior = measure_class_prior(data.card, cfg.data, labeled, data.card_path)
    prior = Prior.from_record(class_prior, data.card.class_names, "train")
    if selection == "label_free" and main:  # the labelled cases' own class ratios are the prior of the KL term
        validate = label_free_monitor(runtime, cfg, data, unlabeled, torch.tensor(prior.marginal), model)
    context = _method_context(cfg, num_classes, prior, cfg.train.iterations)
    method = _build_method(cfg, model, context)
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    tracker = (tracker or make_tracker(cfg.tracking)) if main else NullTracker(cfg.tracking)

    run_tags = {
        "medda.command": "train", "method": cfg.method.name, "card.digest": data.card.digest(),
        "card.name": data.card.name, "checkpoint.policy": selection,
    }
    if source_meta is not None:
        source_run = source_meta.get("run_id") or ""
        run_tags.update({
            "source.checkpoint": str(cfg.source_checkpoint), "source.card.digest": source_meta["card"]["digest"],
            "source.run_id": source_run, "parent.run_id": source_run, "source_free": "false",
        })
    run_id = previous["run_id"] if previous else None
    with interruptible(keeper), tracker.run(cfg.tracking.run_name or f"train-{cfg.method.name}",
                                            tags={**run_tags, **(tags or {})}, run_id=run_id):
        keeper.header = header(cfg, tracker.run_id)
        if previous is not None:
            _resumed(tracker, previous)
        else:
            tracker.log_config(cfg.model_dump(mode="json"), cfg.digest())
            if plan.cross_validation is not None:
                _log_cross_validation(tracker, plan.cross_validation)
            # Labelled target cases of a fine-tune from a source model are "target-labeled", as in `adapt`.
            fine_tune = source_meta is not None and "unlabeled" not in cls.streams
            labeled_role = lineage.TARGET_LABELED if fine_tune else lineage.labeled_context(cls.streams)
            roles = {labeled_role: labeled, **({"val": val_cases} if val_cases else {})}
            if "unlabeled" in streams:
                roles["train-unlabeled"] = unlabeled
            elif selection == "label_free":
                roles[lineage.MONITOR] = unlabeled
            _log_inputs(tracker, data, roles)

        def save(tag: str, iteration: int) -> Path:
            extra = {"iteration": iteration, "tag": tag, "run_id": tracker.run_id, "class_prior": class_prior}
            if source_meta is not None:
                extra.update({"source_run_id": source_meta.get("run_id"), "source_card": source_meta["card"],
                              "adapted_to": data.card.name})
            meta = _checkpoint_meta(cfg, data, num_classes, cfg.method.name, extra)
            if not main:  # rank 0 writes the run's checkpoints
                return out / f"{tag}.pt"
            return save_checkpoint(out / f"{tag}.pt", method.eval_model(), meta)

        loop = run_loop(method, streams, cfg.train, _method_optim(cfg), runtime.device, runtime.amp, save, validate,
                        tracker.log_metrics, one_pass_length=max(lengths.values()), resume=keeper,
                        validation_use="score" if plan.held_out else
                        "select_in_phase" if selection == "label_free" else "select",
                        stop_at=plan.stop_at)
        loop = distributed.broadcast_object(loop)  # rank 0's validation history and selection, on every process
        chosen = loop.best_path if (selection in ("val_dice", "label_free") and loop.best_path) else loop.last_path
        if selection == "label_free" and main:
            tracker.log_json(validate.state.history, "monitoring/label_free.json")
        tracker.log_metrics({"best_iteration": loop.best_iteration, "train_seconds": loop.seconds})
        tracker.set_tags({"checkpoint.selected": chosen.name})
        if cfg.tracking.log_checkpoint:
            tracker.log_artifact(chosen, "checkpoints")
            source_run_id = (source_meta.get("run_id") or "") if source_meta is not None else None
            lineage.register(tracker, chosen, data.card, cfg, "train", source_run_id=source_run_id)
        result = TrainResult(chosen, loop.last_path, loop, distributed.broadcast_object(tracker.run_id), selection,
                             plan.cross_validation)
        if main:
            keeper.finish(_record(result))
        distributed.barrier()
        return result


def _log_cross_validation(tracker: Tracker, summary: dict) -> None:
    """The folds' mean held-out Dice by iteration, the chosen iteration and the folds' runs (audit)."""
    for it, value in summary["mean_val_dice"]:
        tracker.log_metrics({"cv/val_dice": value}, it)
    tracker.set_tags({"cv.iteration": summary["iteration"], "cv.folds": len(summary["folds"]),
                      "cv.fold_run_ids": ",".join(f["run_id"] or "" for f in summary["folds"])})


# --------------------------------------------------------------------------------------------- adapt
@dataclass
class AdaptResult:
    checkpoint: Path  # the model medda recommends using on the target (adapted or the source itself)
    adapted: Path  # the adapted model chosen by the label-free rule (or last)
    recommended: bool  # adapted model recommended over the source model?
    reason: str
    collapse: str
    source_stats: dict[str, float]
    adapted_stats: dict[str, float]
    history: list[dict] = field(default_factory=list)
    run_id: str | None = None
    prior_source: str = ""

    @classmethod
    def from_record(cls, r: dict) -> AdaptResult:
        return cls(**{**r, "checkpoint": Path(r["checkpoint"]), "adapted": Path(r["adapted"])})


def _prior(cfg: RunConfig, meta: dict, data: Data, target_cases: list[dict]) -> Prior:
    """The class prior of an adaptation run: measured with the source model's training labels in its training
    geometry (stored in the checkpoint), the card's (older checkpoints), a constant, or the oracle."""
    spec, names, k = cfg.method.prior, meta["class_names"], meta["num_classes"]
    if spec.source == "constant":
        if not spec.values or len(spec.values) != k or sum(spec.values) <= 0:
            raise MeddaError(f"config: field 'method.prior.values' needs {k} non-negative class ratios with a "
                             "positive sum for prior.source=constant")
        return Prior([v / sum(spec.values) for v in spec.values], None, "constant")
    if spec.source == "oracle":
        labeled = [c for c in target_cases if "label" in c]
        if not labeled:
            raise MeddaError("config: prior.source=oracle needs labelled target cases (upper-bound experiments only)")
        return Prior.from_record(measure_class_prior(data.card, cfg.data, labeled, data.card_path), names, "oracle")
    if meta.get("class_prior"):
        return Prior.from_record(meta["class_prior"], names, "train")
    stats = (meta.get("class_ratio_prior") or {}).get(cfg.data.mode)  # absent: a checkpoint not from medda train
    return Prior(stats, None, "card") if stats else Prior(None, None, "none")


def _adaptation_method(name: str) -> type[Method]:
    cls = get_method(name)
    if cls.task != "adaptation":
        raise MeddaError(f"config: field 'method.name' is '{name}', which is not an adaptation method; `medda adapt` "
                         f"expects one of: {', '.join(methods_for('adaptation'))} (train semi-supervised methods "
                         "with `medda train-ssl`)")
    return cls


def adapt(cfg: RunConfig, tracker: Tracker | None = None, tags: dict | None = None, resume: bool = False) -> AdaptResult:
    """Adapt a source checkpoint to unlabelled target cases; choose and recommend a model without labels.

    `resume`: continue the interrupted run of `cfg.output_dir`, as in `train`.

    Under torchrun each process adapts on its own target batches (streams seeded `train.seed + rank`; AdaBN's pass
    dealt out batch by batch) in one DistributedDataParallel model whose batch norm uses the statistics of all the
    processes' batches together: the same adaptation as one process on the union of the batches. Rank 0 alone
    monitors without labels, saves checkpoints and logs to MLflow; every process returns its result.
    """
    if distributed.launched() and resume:
        distributed.refuse("medda adapt --resume")
    with distributed.session():
        return _adapt(cfg, tracker, tags, resume)


def _adapt(cfg: RunConfig, tracker: Tracker | None, tags: dict | None, resume: bool) -> AdaptResult:
    main = distributed.is_main()
    cls = _adaptation_method(cfg.method.name)
    if cfg.train.compile:  # OSUDA and AdaBN change batch-norm settings between steps: a recompilation each time
        raise MeddaError("config: field 'train.compile' is true, but `medda adapt` runs eagerly (adaptation methods "
                         "change the network's normalisation between steps); expected false")
    if cfg.source_checkpoint is None:
        raise MeddaError("config: field 'source_checkpoint' is required for adaptation")
    model, meta = _load_source(cfg.source_checkpoint)
    # The model dictates preprocessing geometry; the target card dictates its own intensities and labels.
    cfg = cfg.model_copy(deep=True, update={
        "data": cfg.data.model_copy(update={k: meta["data"][k] for k in PREPROCESSING_FIELDS}),
    })
    keeper, previous = _resume(cfg, resume)
    if previous is not None and "finished" in previous:
        return AdaptResult.from_record(previous["finished"])
    runtime = Runtime.setup(cfg)
    data = Data.load(cfg.data)
    _refuse_class_mismatch(cfg.data.card, data.card, meta)
    target = data.cases(cfg.data.target, "target")
    labeled_target = data.cases(cfg.data.train, "train") if cls.reads_target_labels else []
    if labeled_target:  # a few-shot fine-tune is never evaluated on the cases it trains on
        _refuse_overlap(labeled_target, data.cases(cfg.data.test, "test") if cfg.data.test else [], "train")
    prior = _prior(cfg, meta, data, target)
    method = _build_method(cfg, model, _method_context(cfg, meta["num_classes"], prior, cfg.train.iterations))
    tracker = (tracker or make_tracker(cfg.tracking)) if main else NullTracker(cfg.tracking)
    marginal = torch.tensor(prior.marginal) if prior.marginal else None
    label_free = label_free_monitor(runtime, cfg, data, target, marginal, model)
    streams, length = _adaptation_streams(cls, data, cfg, target, labeled_target)
    if not cfg.data.cache and not cls.one_pass:  # as in `train`: every case read before anything exists
        data.check(target, False)
        data.check(labeled_target, True)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    run_id = previous["run_id"] if previous else None
    with interruptible(keeper), tracker.run(cfg.tracking.run_name or f"adapt-{cfg.method.name}", tags={
            **_adapt_tags(cfg, cls, data, meta, prior.source), **(tags or {})}, run_id=run_id):
        keeper.header = header(cfg, tracker.run_id)
        if previous is not None:
            _resumed(tracker, previous)
        else:
            tracker.log_config(cfg.model_dump(mode="json"), cfg.digest())
            _log_inputs(tracker, data, {"target-adapt": target, **({"target-labeled": labeled_target}
                                                                      if labeled_target else {})})
        save = _adapted_checkpoint_writer(cfg, data, meta, method, tracker, prior.source)
        loop = run_loop(method, streams, cfg.train, _method_optim(cfg), runtime.device, runtime.amp, save,
                        label_free if main else None, tracker.log_metrics, one_pass_length=length,
                        score_initial=True, resume=keeper)
        # rank 0's monitoring history and selection, on every process
        loop, history = distributed.broadcast_object((loop, label_free.state.history))
        choice = recommend(history, loop, cfg.selection, marginal is not None, supervised_cases=len(labeled_target))
        recommended_path = choice.adapted if choice.recommended else Path(cfg.source_checkpoint)
        tracker.set_tags({"recommended": str(choice.recommended).lower(), "recommendation.reason": choice.reason,
                          "collapse": loop.stopped_early or "none"})
        tracker.log_json(history, "monitoring/label_free.json")
        if main:
            evidence.log_adaptation_evidence(tracker, history, cfg.output_dir / "evidence", loop.best_iteration,
                                             loop.stopped_early, cfg.selection.margin, data.card.class_names)
        if cfg.tracking.log_checkpoint:
            tracker.log_artifact(choice.adapted, "checkpoints")
            lineage.register(tracker, choice.adapted, data.card, cfg, "adapt", candidate=choice.recommended,
                             source_run_id=meta.get("run_id") or "",
                             extra={"recommended": str(choice.recommended).lower(), "prior.source": prior.source})
        result = AdaptResult(recommended_path, choice.adapted, choice.recommended, choice.reason, loop.stopped_early,
                             choice.source_stats, choice.chosen_stats, history,
                             distributed.broadcast_object(tracker.run_id), prior.source)
        if main:
            keeper.finish(_record(result))
        distributed.barrier()
        return result


def _adaptation_streams(cls: type[Method], data: Data, cfg: RunConfig, target: list[dict],
                        labeled_target: list[dict]) -> tuple[dict, int]:
    """The method's batch streams and the length of one pass: a complete, ordered pass for one-pass estimators."""
    batch, seed = cfg.train.batch_size, cfg.train.seed + distributed.rank()  # under torchrun: other batches per rank
    if "labeled" in cls.streams:
        stream, length = data.stream(labeled_target, True, batch, seed)
        return {"labeled": stream}, length
    if cls.one_pass:
        stream, length = data.full_pass(target, batch * cfg.data.samples_per_volume)
        return {"unlabeled": stream}, length
    stream, length = data.stream(target, False, batch, seed)
    return {"unlabeled": stream}, length


def _adapt_tags(cfg: RunConfig, cls: type[Method], data: Data, meta: dict, prior_source: str) -> dict:
    tags = {
        "medda.command": "adapt", "method": cfg.method.name, "card.digest": data.card.digest(),
        "card.name": data.card.name, "source.card.digest": meta["card"]["digest"],
        "source.checkpoint": str(cfg.source_checkpoint), "parent.run_id": meta.get("run_id") or "",
        "source_free": str(not cls.reads_target_labels).lower(), "prior.source": prior_source,
        "checkpoint.policy": "last" if cls.reads_target_labels else "label_free",
    }
    if prior_source == "oracle":
        tags["warning.oracle_prior"] = "prior measured from target labels: an upper bound, not source-free"
    return tags


def _adapted_checkpoint_writer(cfg: RunConfig, data: Data, meta: dict, method: Method, tracker: Tracker,
                               prior_source: str):
    """save(tag, iteration) for adapted checkpoints: the source model's config, names and priors carried over."""

    def save(tag: str, iteration: int) -> Path:
        extra = {"iteration": iteration, "tag": tag, "run_id": tracker.run_id, "source_run_id": meta.get("run_id"),
                 "source_card": meta["card"], "adapted_to": data.card.name, "prior.source": prior_source,
                 "class_ratio_prior": meta.get("class_ratio_prior"), "class_prior": meta.get("class_prior")}
        m = _checkpoint_meta(cfg, data, meta["num_classes"], cfg.method.name, extra)
        m["model"], m["class_names"] = meta["model"], meta["class_names"]
        if not distributed.is_main():  # rank 0 writes the run's checkpoints
            return cfg.output_dir / f"{tag}.pt"
        return save_checkpoint(cfg.output_dir / f"{tag}.pt", method.eval_model(), m)

    return save


# --------------------------------------------------------------------------------------------- predict / evaluate
def _predictor_for(
    checkpoint: Path, cfg: RunConfig, runtime: Runtime
) -> tuple[Predictor, DataConfig, dict, DataCard]:
    """The checkpoint's predictor, its preprocessing and the card of the data; refused before any inference
    when the model cannot produce the card's classes or read its images (as `adapt` checks)."""
    model, meta = load_model(checkpoint)
    card = load_card(cfg.data.card)
    if card.num_classes != meta["num_classes"]:
        raise MeddaError(
            f"{cfg.data.card}: field 'labels' maps to {card.num_classes} classes but checkpoint {checkpoint} "
            f"predicts {meta['num_classes']} ({', '.join(meta['class_names'])})"
        )
    in_channels = meta["model"].get("in_channels", 1)
    if in_channels != 1:  # CheckCase refuses anything but single-channel volumes
        raise MeddaError(f"{checkpoint}: field 'meta.model.in_channels' is {in_channels}; expected 1 (medda reads "
                         "single-channel images)")
    model.eval()
    data_cfg = cfg.data.model_copy(update={k: meta["data"][k] for k in PREPROCESSING_FIELDS})
    return Predictor.on(runtime, model, data_cfg, cfg.inference, cfg.train.channels_last), data_cfg, meta, card


class Predictions(list):
    """The prediction files of every case (in case order), with how many this call wrote and how many it found
    already written by an earlier, interrupted call with the same model and settings."""

    written: int = 0
    skipped: int = 0


def prediction_tag(checkpoint: Path, cfg: RunConfig, data_cfg: DataConfig, card: DataCard) -> str:
    """What a prediction was made with, in 38 characters for its NIfTI header (`descrip`): a digest of the
    checkpoint's bytes, the card, the preprocessing and the inference settings."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    key = {"checkpoint": digest.hexdigest(), "card": card.digest(),
           "data": {k: getattr(data_cfg, k) for k in PREPROCESSING_FIELDS},
           "inference": cfg.inference.model_dump(mode="json")}
    return "medda " + hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def predict(checkpoint: Path, cfg: RunConfig, ref: DatasetRef, out_dir: Path) -> Predictions:
    """Predict every case of `ref` and write NIfTI label maps (canonical ids) on the original grids.

    Resumable: each file is written atomically and carries `prediction_tag` in its header; a case whose file is
    already there, readable and tagged with the same checkpoint, card, preprocessing and inference settings is not
    predicted again (any other file of that name is replaced). Under torchrun the cases are split round-robin over
    the processes (`distributed.shard`), so each is predicted by exactly one.
    """
    with distributed.session():
        runtime = Runtime.setup(cfg)
        predictor, data_cfg, _, card = _predictor_for(checkpoint, cfg, runtime)
        cases = read_cases(ref, card, str(cfg.data.card))
        chain = inference_chain(card, data_cfg, False, str(cfg.data.card))
        tag = prediction_tag(checkpoint, cfg, data_cfg, card)
        mine = distributed.shard(cases)
        # temporary files of writers killed in an earlier run (each case has one owner per run)
        remove_stale_temporaries({c["id"] for c in mine}, out_dir)
        todo = [c for c in mine if not readable_prediction(prediction_path(c["id"], out_dir), tag)]

        def work() -> int:
            for pred in predict_cases(predictor, todo, chain, progress=distributed.is_main()):
                write_prediction(pred, out_dir, tag)
            return len(todo)

        written = distributed.gather_results(work)
        paths = Predictions(prediction_path(c["id"], out_dir) for c in cases)
        paths.written = sum(written)
        paths.skipped = len(cases) - paths.written
        return paths


@dataclass
class EvaluationResult:
    rows: list[dict]
    summary: dict[str, float]
    table: str
    units: str
    run_id: str | None


def evaluate(
    checkpoint: Path, cfg: RunConfig, tracker: Tracker | None = None, tags: dict | None = None,
    write_predictions: bool = False,
) -> EvaluationResult:
    """Predict the labelled cases of `data.test` and compute Dice, HD95, ASSD, NSD per case and class.

    Under torchrun each process predicts and scores its share of the cases (`distributed.shard`); the rows are
    gathered on every process in case order, and rank 0 alone logs to MLflow and writes the tables and evidence.
    """
    with distributed.session():
        return _evaluate(checkpoint, cfg, tracker, tags, write_predictions)


def _evaluate(checkpoint: Path, cfg: RunConfig, tracker: Tracker | None, tags: dict | None,
              write_predictions: bool) -> EvaluationResult:
    runtime = Runtime.setup(cfg)
    predictor, data_cfg, meta, card = _predictor_for(checkpoint, cfg, runtime)
    cases = read_cases(cfg.data.test, card, str(cfg.data.card)) if cfg.data.test else None
    if not cases:
        raise MeddaError("config: field 'data.test' is required for evaluation")
    missing = [c["id"] for c in cases if "label" not in c]
    if missing:
        raise MeddaError(f"{cfg.data.test.path}: case '{missing[0]}' has no label file; evaluation needs labels")
    for case in cases:  # every label readable and in the card's map before any inference (read again below)
        load_label(case["label"], card)
    chain = inference_chain(card, data_cfg, False, str(cfg.data.card))
    class_ids = list(range(1, card.num_classes))
    out_dir = cfg.output_dir / "predictions"
    main = distributed.is_main()
    tracker = (tracker or make_tracker(cfg.tracking)) if main else NullTracker(cfg.tracking)
    with interruptible(), tracker.run(cfg.tracking.run_name or f"evaluate-{meta['method']}", tags={
        "medda.command": "evaluate", "method": meta["method"], "card.digest": card.digest(), "card.name": card.name,
        "parent.run_id": meta.get("run_id") or "", "checkpoint": str(checkpoint),
        "checkpoint.tag": meta.get("tag", ""), "eval.digest": datalist_digest(cases), **(tags or {}),
    }):
        used = cfg.model_copy(update={"data": data_cfg})  # the checkpoint's preprocessing, as actually applied
        tracker.log_config(used.model_dump(mode="json"), used.digest())
        tracker.log_dataset(f"{card.name}:eval", datalist_digest(cases), str(Path(cases[0]["image"]).parent), "eval",
                            cases=cases)
        by_id = {c["id"]: c for c in cases}
        keeper = evidence.CaseKeeper(card)  # predictions wait on disk; overlays load only 3 cases

        def work() -> tuple[list[dict], set[str]]:
            rows: list[dict] = []
            units: set[str] = set()
            for pred in predict_cases(predictor, distributed.shard(cases), chain, progress=main):
                label, affine = load_label(by_id[pred.case_id]["label"], card)
                if label.shape != pred.label.shape:
                    raise MeddaError(f"{by_id[pred.case_id]['label']}: label grid {label.shape} differs from its "
                                     "image's")
                if not np.allclose(affine, pred.affine, atol=1e-3, rtol=1e-4):
                    raise MeddaError(f"{by_id[pred.case_id]['label']}: label affine (orientation/spacing/origin) "
                                     "differs from its image's")
                spacing = spacing_for_metrics(card, affine)
                case_rows = metrics.evaluate_case(pred.label, label, class_ids, card.class_names[1:], spacing)
                rows += [{"case": pred.case_id, **r} for r in case_rows]
                keeper.add(by_id[pred.case_id], pred.label)
                units.add("mm" if spacing else "voxels")
                if write_predictions:
                    write_prediction(pred, out_dir)
            return rows, units

        gathered = distributed.gather_results(work)
        per_case: dict[str, list[dict]] = {}
        for part, _ in gathered:
            for row in part:
                per_case.setdefault(row["case"], []).append(row)
        rows = [row for case in cases for row in per_case.get(case["id"], [])]  # case order, as one process
        units = set().union(*(u for _, u in gathered))
        summary = metrics.summarise(rows)
        unit = "/".join(sorted(units))
        if distributed.active():  # the cases drawn as evidence (best, median, worst) go to rank 0
            wanted = evidence.pick_cases(evidence.case_scores(rows))
            handed = distributed.all_gather_object(
                {} if main else {c: keeper.prediction(c) for c in wanted if c in keeper})
            if not main:
                keeper.close()
                return EvaluationResult(rows, summary, metrics.format_table(rows), unit, None)
            for part in handed:
                for case, prediction in part.values():
                    keeper.add(case, prediction)
        tracker.log_metrics({f"test/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        tracker.log_table(rows, "evaluation/per_case.csv")
        tracker.set_tags({"metrics.units": unit})
        evidence.log_evaluation_evidence(tracker, keeper, rows, card.class_names, cfg.output_dir / "evidence", meta,
                                         datalist_digest(cases))
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        metrics.write_table_csv(rows, cfg.output_dir / "per_case.csv")
        return EvaluationResult(rows, summary, metrics.format_table(rows), unit, tracker.run_id)
