"""The only wiring layer: data + model + method + engine + inference + metrics + tracking.

`train` (source training, semi-supervised), `adapt` (source-free adaptation), `predict` and `evaluate`.
The CLI (`pipelines/`) parses a config and calls these; tests call them directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.utils import set_determinism
from torch import nn

import medda
from medda import evidence, lineage, metrics
from medda.config import DataConfig, DatasetRef, InferenceConfig, RunConfig
from medda.data.cards import DataCard, load_card
from medda.data.datalist import datalist_digest, read_cases
from medda.data.transforms import (
    inference_chain,
    labeled_train_chain,
    load_label,
    unlabeled_train_chain,
)
from medda.engine.loop import LoopResult, Validation, run_loop
from medda.errors import MeddaError
from medda.inference import Predictor, autocast_dtype, predict_cases, resolve_device, write_prediction
from medda.methods.base import Method, MethodContext, batchnorm_layers
from medda.models.factory import build_model, load_model, save_checkpoint
from medda.monitoring import MonitorConfig, MonitorState, collapse_reason, score, snapshot_bn, summarise
from medda.registry import get_method
from medda.tracking import Tracker, make_tracker

PREPROCESSING_FIELDS = ("mode", "slice_axis", "patch_size", "spacing", "foreground_crop")


# --------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    card: DataCard
    card_path: str
    config: DataConfig

    @classmethod
    def load(cls, config: DataConfig) -> Data:
        return cls(load_card(config.card), str(config.card), config)

    def cases(self, ref: DatasetRef | None, role: str) -> list[dict]:
        if ref is None:
            raise MeddaError(f"config: field 'data.{role}' is required for this command")
        return read_cases(ref, self.card, self.card_path)

    def dataset(self, cases: list[dict], chain) -> Dataset:
        if self.config.cache:
            return CacheDataset(cases, chain, cache_rate=1.0, num_workers=0, progress=False)
        return Dataset(cases, chain)

    def stream(self, cases: list[dict], labeled: bool, batch_size: int, seed: int) -> tuple[Iterator[dict], int]:
        """An endless iterator of training batches and the number of batches in one pass."""
        if labeled:
            chain = labeled_train_chain(self.card, self.config, self.card_path)
        else:
            cases = [{"id": c["id"], "image": c["image"]} for c in cases]  # the label path never enters
            chain = unlabeled_train_chain(self.card, self.config, self.card_path)
        dataset = self.dataset(cases, chain)
        generator = torch.Generator().manual_seed(seed)
        batch_size = min(batch_size, len(dataset))
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator,
            num_workers=self.config.num_workers, persistent_workers=self.config.num_workers > 0,
        )

        def endless() -> Iterator[dict]:
            while True:
                yield from loader

        return endless(), len(loader)


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


# --------------------------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    device: torch.device
    amp: torch.dtype | None

    @classmethod
    def setup(cls, cfg: RunConfig) -> Runtime:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        set_determinism(cfg.train.seed)
        device = resolve_device(cfg.train.device)
        return cls(device, autocast_dtype(cfg.train.amp, device))

    def predictor(self, model: nn.Module, data: DataConfig, inference: InferenceConfig, channels_last: bool) -> Predictor:
        return Predictor(model.to(self.device), data, inference, self.device, self.amp, channels_last)


def _method_context(cfg: RunConfig, num_classes: int, prior: list[float] | None, total: int) -> MethodContext:
    return MethodContext(
        num_classes=num_classes,
        spatial_dims=2 if cfg.data.mode == "2d" else 3,
        patch_size=tuple(cfg.data.patch_size),
        total_iterations=total,
        class_ratio_prior=torch.tensor(prior, dtype=torch.float32) if prior else None,
        seed=cfg.train.seed,
    )


def _build_method(cfg: RunConfig, model: nn.Module, context: MethodContext) -> Method:
    cls = get_method(cfg.method.name)
    from medda.config import validate

    options = validate(cls.Config, cfg.method.options, f"config field 'method.options' ({cls.name})")
    return cls(model, options, context)


def _checkpoint_meta(cfg: RunConfig, data: Data, num_classes: int, method: str, extra: dict | None = None) -> dict:
    card = data.card
    return {
        "model": cfg.model.model_dump(mode="json"),
        "spatial_dims": 2 if cfg.data.mode == "2d" else 3,
        "num_classes": num_classes,
        "class_names": card.class_names,
        "data": {k: getattr(cfg.data, k) for k in PREPROCESSING_FIELDS},
        "card": {"name": card.name, "site": card.site, "digest": card.digest(), "spacing": card.spacing},
        "class_ratio_prior": {"2d": card.prior("2d"), "3d": card.prior("3d")},
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


# --------------------------------------------------------------------------------------------- validation
def dice_validator(runtime: Runtime, cfg: RunConfig, data: Data, val_cases: list[dict]):
    """Mean foreground Dice on preprocessed validation volumes (the checkpoint rule 'val_dice')."""
    dataset = data.dataset(val_cases, inference_chain(data.card, cfg.data, True, data.card_path))
    class_ids = list(range(1, data.card.num_classes))

    def validate(model: nn.Module, iteration: int) -> Validation:
        model.eval()
        predictor = runtime.predictor(model, cfg.data, cfg.inference, cfg.train.channels_last)
        scores = []
        for item in dataset:
            probs = predictor.probabilities(item["image"][None])
            pred = probs.argmax(1)[0].numpy()
            scores.append(metrics.dice_scores(pred, item["label"][0].numpy().round().astype(np.int16), class_ids))
        per_class = np.nanmean(np.array(scores), axis=0)
        logs = {f"val/dice/{data.card.class_names[c]}": float(d) for c, d in zip(class_ids, per_class, strict=True)}
        mean = float(np.nanmean(per_class))
        logs["val/dice/mean"] = mean
        return Validation(mean, logs)

    return validate


# --------------------------------------------------------------------------------------------- train
@dataclass
class TrainResult:
    checkpoint: Path  # the selected checkpoint (best on validation, or last)
    last: Path
    loop: LoopResult
    run_id: str | None
    selection: str


def train(cfg: RunConfig, tracker: Tracker | None = None, tags: dict | None = None) -> TrainResult:
    """Train a segmenter with `cfg.method` (supervised source training, mean teacher, BCP)."""
    runtime = Runtime.setup(cfg)
    data = Data.load(cfg.data)
    cls = get_method(cfg.method.name)
    labeled = data.cases(cfg.data.train, "train")
    streams, lengths = {}, {}
    if "labeled" in cls.streams:
        streams["labeled"], lengths["labeled"] = data.stream(labeled, True, cfg.train.batch_size, cfg.train.seed)
    if "unlabeled" in cls.streams:
        labeled_ids = {c["id"] for c in labeled}
        # Labelled cases are never also drawn as unlabelled ones (one pool per case, as in the SSL literature).
        unlabeled = [c for c in data.cases(cfg.data.unlabeled, "unlabeled") if c["id"] not in labeled_ids]
        if not unlabeled:
            raise MeddaError("config: data.unlabeled has no cases left once the labelled ones are removed")
        unlabeled_batch = cfg.train.unlabeled_batch_size or cfg.train.batch_size
        if cls.paired_batches:  # one unlabelled volume per labelled one, also when few labelled cases exist
            paired = min(cfg.train.batch_size, len(labeled))
            if cfg.train.unlabeled_batch_size not in (None, paired):
                raise MeddaError(
                    f"config: field 'train.unlabeled_batch_size' must equal the labelled batch ({paired} volumes) "
                    f"for method '{cls.name}', which pairs each labelled volume with an unlabelled one; leave it unset"
                )
            unlabeled_batch = paired
        streams["unlabeled"], lengths["unlabeled"] = data.stream(unlabeled, False, unlabeled_batch, cfg.train.seed + 1)
    val_cases = data.cases(cfg.data.val, "val") if cfg.data.val else []
    test_ids = {c["id"] for c in data.cases(cfg.data.test, "test")} if cfg.data.test else set()
    if test_ids & {c["id"] for c in val_cases}:
        raise MeddaError("config: data.val overlaps data.test; model selection on test data is not allowed")
    num_classes = data.card.num_classes
    model = build_model(cfg.model, 2 if cfg.data.mode == "2d" else 3, num_classes)
    context = _method_context(cfg, num_classes, data.card.prior(cfg.data.mode), cfg.train.iterations)
    method = _build_method(cfg, model, context)
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    tracker = tracker or make_tracker(cfg.tracking)
    selection = cfg.train.select_by if val_cases else "last"
    if selection == "label_free":
        raise MeddaError("config: train.select_by=label_free is for adaptation; use val_dice or last")

    with tracker.run(cfg.tracking.run_name or f"train-{cfg.method.name}", tags={
        "medda.command": "train", "method": cfg.method.name, "card.digest": data.card.digest(),
        "card.name": data.card.name, "checkpoint.policy": selection, **(tags or {}),
    }):
        tracker.log_config(cfg.model_dump(mode="json"), cfg.digest())
        roles = {lineage.labeled_context(cls.streams): labeled, **({"val": val_cases} if val_cases else {})}
        if "unlabeled" in streams:
            roles["train-unlabeled"] = unlabeled
        _log_inputs(tracker, data, roles)

        def save(tag: str, iteration: int) -> Path:
            meta = _checkpoint_meta(cfg, data, num_classes, cfg.method.name,
                                    {"iteration": iteration, "tag": tag, "run_id": tracker.run_id})
            return save_checkpoint(out / f"{tag}.pt", method.eval_model(), meta)

        validate = dice_validator(runtime, cfg, data, val_cases) if val_cases and selection == "val_dice" else None
        loop = run_loop(method, streams, cfg.train, cfg.optim, runtime.device, runtime.amp, save, validate,
                        tracker.log_metrics, one_pass_length=max(lengths.values()))
        chosen = loop.best_path if (selection == "val_dice" and loop.best_path) else loop.last_path
        tracker.log_metrics({"best_iteration": loop.best_iteration, "train_seconds": loop.seconds})
        tracker.set_tags({"checkpoint.selected": chosen.name})
        if cfg.tracking.log_checkpoint:
            tracker.log_artifact(chosen, "checkpoints")
            lineage.register(tracker, chosen, data.card, cfg, "train")
        return TrainResult(chosen, loop.last_path, loop, tracker.run_id, selection)


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


def _prior(cfg: RunConfig, meta: dict, data: Data, target_cases: list[dict]) -> tuple[list[float] | None, str]:
    """The class-ratio prior and where it came from (card | constant | oracle)."""
    spec = cfg.method.prior
    k = meta["num_classes"]
    if spec.source == "constant":
        if not spec.values or len(spec.values) != k:
            raise MeddaError(f"config: field 'method.prior.values' needs {k} class ratios for prior.source=constant")
        total = sum(spec.values)
        return [v / total for v in spec.values], "constant"
    if spec.source == "oracle":
        labeled = [c for c in target_cases if "label" in c]
        if not labeled:
            raise MeddaError("config: prior.source=oracle needs labelled target cases (upper-bound experiments only)")
        return measure_class_ratios(data, labeled, cfg.data.mode)[0], "oracle"
    prior = meta["class_ratio_prior"][cfg.data.mode]
    return prior, "card" if prior else "none"


def measure_class_ratios(data: Data, cases: list[dict], mode: str) -> tuple[list[float], dict]:
    """Per-class ratios measured through the card's preprocessing: (prior for `mode`, full stats dict)."""
    chain = inference_chain(data.card, data.config, True, data.card_path)
    k = data.card.num_classes
    volume, slices, presence, n_slices = np.zeros(k), np.zeros(k), np.zeros(k), 0
    for case in cases:
        label = chain(case)["label"][0].numpy().round().astype(np.int64)
        counts = np.bincount(label.ravel(), minlength=k)[:k]
        volume += counts / counts.sum()
        moved = np.moveaxis(label, data.config.slice_axis, 0)
        for sl in moved:
            c = np.bincount(sl.ravel(), minlength=k)[:k]
            slices += c / c.sum()
            presence += c > 0
            n_slices += 1
    names = data.card.class_names
    # Per-slice ratio of a class over the slices that contain it (a mean over all slices would just equal the
    # volume ratio); with presence tags this is the prior of a slice where the structure is visible.
    conditional = slices / np.maximum(presence, 1)
    stats = {
        "cases": len(cases),
        "volume": {n: round(float(v), 6) for n, v in zip(names, volume / len(cases), strict=True)},
        "slice": {n: round(float(v), 6) for n, v in zip(names, conditional, strict=True)},
        "slice_presence": {n: round(float(v), 4) for n, v in zip(names, presence / n_slices, strict=True)},
    }
    table = stats["slice"] if mode == "2d" else stats["volume"]
    return [table[n] for n in names], stats


def adapt(cfg: RunConfig, tracker: Tracker | None = None, tags: dict | None = None) -> AdaptResult:
    """Adapt a source checkpoint to unlabelled target cases; choose and recommend a model without labels."""
    if cfg.source_checkpoint is None:
        raise MeddaError("config: field 'source_checkpoint' is required for adaptation")
    model, meta = load_model(cfg.source_checkpoint)
    # The model dictates preprocessing geometry; the target card dictates its own intensities and labels.
    cfg = cfg.model_copy(deep=True, update={
        "data": cfg.data.model_copy(update={k: meta["data"][k] for k in PREPROCESSING_FIELDS}),
    })
    runtime = Runtime.setup(cfg)
    data = Data.load(cfg.data)
    if data.card.num_classes != meta["num_classes"]:
        raise MeddaError(
            f"{cfg.data.card}: field 'labels' maps to {data.card.num_classes} classes but the source model predicts "
            f"{meta['num_classes']} ({', '.join(meta['class_names'])})"
        )
    cls = get_method(cfg.method.name)
    target = data.cases(cfg.data.target, "target")
    labeled_target = data.cases(cfg.data.train, "train") if cls.reads_target_labels else []
    prior, prior_source = _prior(cfg, meta, data, target)
    context = _method_context(cfg, meta["num_classes"], prior, cfg.train.iterations)
    method = _build_method(cfg, model, context)
    source_bn = snapshot_bn(model)
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    tracker = tracker or make_tracker(cfg.tracking)
    monitor_cfg = MonitorConfig()
    monitor_cases = target[: monitor_cfg.cases]
    monitor_set = data.dataset(
        [{"id": c["id"], "image": c["image"]} for c in monitor_cases],
        inference_chain(data.card, cfg.data, False, data.card_path),
    )
    prior_t = torch.tensor(prior) if prior else None
    state = MonitorState()
    flip_axis = 2 + (1 if cfg.data.slice_axis != 1 else 0)  # an in-plane axis of (1, C, X, Y, Z)

    def label_free(model_: nn.Module, iteration: int) -> Validation:
        model_.eval()
        predictor = runtime.predictor(model_, cfg.data, cfg.inference.model_copy(update={"tta_flips": False}),
                                      cfg.train.channels_last)
        probs, flipped = [], []
        for item in monitor_set:
            image = item["image"][None]
            probs.append(predictor.probabilities(image))
            flipped.append(torch.flip(predictor.probabilities(torch.flip(image, dims=[flip_axis])), dims=[flip_axis]))
        stats = summarise(probs, flipped, prior_t)
        if batchnorm_layers(model_):
            from medda.monitoring import bn_drift

            stats["bn_drift"] = bn_drift(model_, source_bn)
        if state.initial is None:
            state.initial = stats
        reason = collapse_reason(stats, state, prior_t, monitor_cfg)
        value = score(stats, monitor_cfg)
        state.history.append({"iteration": iteration, **stats, "score": value})
        return Validation(value, {f"monitor/{k}": v for k, v in stats.items()}, stop=bool(reason), reason=reason)

    streams, length = {}, 1
    if "unlabeled" in cls.streams:
        streams["unlabeled"], length = data.stream(target, False, cfg.train.batch_size, cfg.train.seed)
    if "labeled" in cls.streams:
        streams["labeled"], length = data.stream(labeled_target, True, cfg.train.batch_size, cfg.train.seed)

    run_tags = {
        "medda.command": "adapt", "method": cfg.method.name, "card.digest": data.card.digest(),
        "card.name": data.card.name, "source.card.digest": meta["card"]["digest"],
        "source.checkpoint": str(cfg.source_checkpoint), "parent.run_id": meta.get("run_id") or "",
        "source_free": str(not cls.reads_target_labels).lower(), "prior.source": prior_source,
        "checkpoint.policy": "label_free", **(tags or {}),
    }
    if prior_source == "oracle":
        run_tags["warning.oracle_prior"] = "prior measured from target labels: an upper bound, not source-free"
    with tracker.run(cfg.tracking.run_name or f"adapt-{cfg.method.name}", tags=run_tags):
        tracker.log_config(cfg.model_dump(mode="json"), cfg.digest())
        roles = {"target-adapt": target}
        if labeled_target:
            roles["target-labeled"] = labeled_target
        _log_inputs(tracker, data, roles)

        def save(tag: str, iteration: int) -> Path:
            extra = {"iteration": iteration, "tag": tag, "run_id": tracker.run_id, "source_run_id": meta.get("run_id"),
                     "source_card": meta["card"], "adapted_to": data.card.name,
                     "class_ratio_prior": meta["class_ratio_prior"]}
            m = _checkpoint_meta(cfg, data, meta["num_classes"], cfg.method.name, extra)
            m["model"], m["class_names"] = meta["model"], meta["class_names"]
            return save_checkpoint(out / f"{tag}.pt", method.eval_model(), m)

        train_cfg = cfg.train.model_copy(update={"select_by": "label_free"})
        loop = run_loop(method, streams, train_cfg, cfg.optim, runtime.device, runtime.amp, save, label_free,
                        tracker.log_metrics, one_pass_length=length)
        source_stats = state.history[0]
        chosen = max(state.history[1:], key=lambda h: h["score"], default=None)
        adapted_path = loop.best_path if loop.best_iteration > 0 else loop.last_path
        collapse = loop.stopped_early
        if chosen is None or loop.best_iteration <= 0:
            recommended = False
            reason = "no adapted checkpoint scored above the source model on the label-free rule"
            if collapse:
                reason = f"adaptation collapsed ({collapse}); " + reason
        else:
            gain = chosen["score"] - source_stats["score"]
            recommended = gain > monitor_cfg.margin
            reason = (
                f"label-free score {chosen['score']:.4f} vs source {source_stats['score']:.4f} "
                f"(flip consistency {chosen['flip_consistency']:.3f} vs {source_stats['flip_consistency']:.3f}"
                + (f", prior KL {chosen['prior_kl']:.3f} vs {source_stats['prior_kl']:.3f}" if prior_t is not None else "")
                + f"); gain {gain:+.4f} {'>' if recommended else '<='} margin {monitor_cfg.margin}"
            )
            if collapse:
                reason += f"; stopped early: {collapse} (kept the last safe checkpoint)"
        recommended_path = adapted_path if recommended else Path(cfg.source_checkpoint)
        tracker.set_tags({"recommended": str(recommended).lower(), "recommendation.reason": reason,
                          "collapse": collapse or "none"})
        tracker.log_json(state.history, "monitoring/label_free.json")
        evidence.log_adaptation_evidence(tracker, state.history, out / "evidence", loop.best_iteration, collapse,
                                         monitor_cfg.margin, data.card.class_names)
        if cfg.tracking.log_checkpoint:
            tracker.log_artifact(adapted_path, "checkpoints")
            lineage.register(tracker, adapted_path, data.card, cfg, "adapt", candidate=recommended,
                             source_run_id=meta.get("run_id") or "",
                             extra={"recommended": str(recommended).lower(), "prior.source": prior_source})
        return AdaptResult(recommended_path, adapted_path, recommended, reason, collapse, source_stats,
                           chosen or source_stats, state.history, tracker.run_id, prior_source)


# --------------------------------------------------------------------------------------------- predict / evaluate
def _predictor_for(checkpoint: Path, cfg: RunConfig, runtime: Runtime) -> tuple[Predictor, DataConfig, dict]:
    model, meta = load_model(checkpoint)
    model.eval()
    data_cfg = cfg.data.model_copy(update={k: meta["data"][k] for k in PREPROCESSING_FIELDS})
    return runtime.predictor(model, data_cfg, cfg.inference, cfg.train.channels_last), data_cfg, meta


def predict(checkpoint: Path, cfg: RunConfig, ref: DatasetRef, out_dir: Path) -> list[Path]:
    """Predict every case of `ref` and write NIfTI label maps (canonical ids) on the original grids."""
    runtime = Runtime.setup(cfg)
    predictor, data_cfg, _ = _predictor_for(checkpoint, cfg, runtime)
    card = load_card(cfg.data.card)
    cases = read_cases(ref, card, str(cfg.data.card))
    chain = inference_chain(card, data_cfg, False, str(cfg.data.card))
    return [write_prediction(p, out_dir) for p in predict_cases(predictor, cases, chain)]


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
    """Predict the labelled cases of `data.test` and compute Dice, HD95, ASSD, NSD per case and class."""
    runtime = Runtime.setup(cfg)
    predictor, data_cfg, meta = _predictor_for(checkpoint, cfg, runtime)
    card = load_card(cfg.data.card)
    cases = read_cases(cfg.data.test, card, str(cfg.data.card)) if cfg.data.test else None
    if not cases:
        raise MeddaError("config: field 'data.test' is required for evaluation")
    missing = [c["id"] for c in cases if "label" not in c]
    if missing:
        raise MeddaError(f"{cfg.data.test.path}: case '{missing[0]}' has no label file; evaluation needs labels")
    chain = inference_chain(card, data_cfg, False, str(cfg.data.card))
    class_ids = list(range(1, card.num_classes))
    rows: list[dict] = []
    units = set()
    out_dir = cfg.output_dir / "predictions"
    tracker = tracker or make_tracker(cfg.tracking)
    with tracker.run(cfg.tracking.run_name or f"evaluate-{meta['method']}", tags={
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
        for pred in predict_cases(predictor, cases, chain):
            label, affine = load_label(by_id[pred.case_id]["label"], card)
            if label.shape != pred.label.shape:
                raise MeddaError(f"{by_id[pred.case_id]['label']}: label grid {label.shape} differs from its image's")
            if not np.allclose(affine, pred.affine, atol=1e-3, rtol=1e-4):
                raise MeddaError(f"{by_id[pred.case_id]['label']}: label affine (orientation/spacing/origin) differs "
                                 "from its image's")
            spacing = spacing_for_metrics(card, affine)
            case_rows = metrics.evaluate_case(pred.label, label, class_ids, card.class_names[1:], spacing)
            rows += [{"case": pred.case_id, **r} for r in case_rows]
            keeper.add(by_id[pred.case_id], pred.label)
            units.add("mm" if spacing else "voxels")
            if write_predictions:
                write_prediction(pred, out_dir)
        summary = metrics.summarise(rows)
        unit = "/".join(sorted(units))
        tracker.log_metrics({f"test/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        tracker.log_table(rows, "evaluation/per_case.csv")
        tracker.set_tags({"metrics.units": unit})
        evidence.log_evaluation_evidence(tracker, keeper, rows, card.class_names, cfg.output_dir / "evidence", meta,
                                         datalist_digest(cases))
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        metrics.write_table_csv(rows, cfg.output_dir / "per_case.csv")
        return EvaluationResult(rows, summary, metrics.format_table(rows), unit, tracker.run_id)
