"""Model selection: which checkpoint to keep, with labels (validation Dice, cross-validation over a few labelled
cases: docs/methods.md section 8) or without (the label-free monitor).

Label-free monitoring of adaptation: is the adapted model better than the source model, without labels?

Statistics over a fixed subset of target volumes (no labels anywhere), docs/methods.md section 7:
- mean voxel entropy of the softmax;
- predicted class ratios in the training geometry (every slice or grid patch of the volume, padded/cropped to the
  patch size: `medda.data.loading.tiles`), averaged over all images, and KL(predicted || prior) against the
  *marginal* prior measured the same way on the source labels (`medda.data.priors`), so neither side counts a
  different area or only the images that contain a structure;
- flip consistency: soft Dice between the prediction and the un-flipped prediction of the flipped image,
  averaged over foreground classes (a model that understands the anatomy is equivariant to flips);
- BN statistic drift: mean |mu_t - mu_s| / sqrt(var_s + eps) over batch-norm channels vs the source model.

The label-free selection rule: score = flip_consistency - kl_weight * prior_kl (kl_weight 1; KL only when a prior is
known). The KL is what vetoes implausible structure sizes: over-segmenting models are often *more* flip-consistent.
The source model is scored first (iteration 0) with the same rule; a checkpoint is chosen only if it is not
collapsed and beats the source's score by `margin`, otherwise the source model is recommended.

Collapse (stops adaptation, keeps the last safe checkpoint, warns): a foreground class vanishes (its predicted
ratio falls below `vanish_fraction` of its prior or of its initial value), the foreground ratio goes to 0 or 1,
or the entropy falls to ~0 while the prior KL rises above its initial value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medda import metrics
from medda.config import DataConfig, SelectionConfig
from medda.data.loading import Data, tiles, unlabeled
from medda.data.transforms import inference_chain
from medda.engine.loop import LoopResult, Validation
from medda.errors import MeddaError
from medda.inference import Predictor, to_label
from medda.methods.base import batchnorm_layers
from medda.methods.losses import entropy, kl_divergence


def tile_ratios(probs: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """(1, K, *S) volume probabilities -> (N, K) class ratios of its N training-geometry images.

    Padding counts as background, exactly as padded label tiles do when the prior is measured.
    """
    foreground = tiles(probs[0, 1:].float(), data)  # (N, K-1, *patch), zero-padded
    fg = foreground.flatten(2).mean(dim=2)
    return torch.cat([1.0 - fg.sum(dim=1, keepdim=True), fg], dim=1)


def soft_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean soft Dice over foreground classes between two (1, K, *S) probability maps."""
    a, b = a.float().flatten(2)[:, 1:], b.float().flatten(2)[:, 1:]
    dice = (2 * (a * b).sum(-1) + 1e-6) / (a.sum(-1) + b.sum(-1) + 1e-6)
    return float(dice.mean())


def bn_drift(model: torch.nn.Module, source_stats: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean normalised shift of BN running means vs the source model (0 when statistics are batch-only)."""
    shifts = []
    for bn, (mu_s, var_s) in zip(batchnorm_layers(model), source_stats, strict=False):
        if bn.running_mean is None:
            continue
        shifts.append(((bn.running_mean.float().cpu() - mu_s).abs() / (var_s + 1e-5).sqrt()).mean())
    return float(torch.stack(shifts).mean()) if shifts else 0.0


def snapshot_bn(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (bn.running_mean.detach().float().cpu().clone(), bn.running_var.detach().float().cpu().clone())
        for bn in batchnorm_layers(model)
        if bn.running_mean is not None
    ]


@dataclass
class MonitorState:
    """What the monitor remembers between checks."""

    initial: dict[str, float] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def summarise(
    probs: list[torch.Tensor], flipped: list[torch.Tensor], prior: torch.Tensor | None, data: DataConfig
) -> dict[str, float]:
    """Label-free statistics over the monitored volumes; `prior` is the (K,) marginal prior per image."""
    ratios = torch.cat([tile_ratios(p, data) for p in probs]).mean(dim=0)
    stats = {
        "entropy": sum(float(entropy(p)) for p in probs) / len(probs),
        "flip_consistency": sum(soft_agreement(p, f) for p, f in zip(probs, flipped, strict=True)) / len(probs),
        "foreground_ratio": float(1 - ratios[0]),
    }
    stats.update({f"ratio/{k}": float(r) for k, r in enumerate(ratios)})
    if prior is not None:
        stats["prior_kl"] = float(kl_divergence(ratios, prior))
    return stats


def score(stats: dict[str, float], cfg: SelectionConfig) -> float:
    return stats["flip_consistency"] - cfg.kl_weight * stats.get("prior_kl", 0.0)


def collapse_reason(stats: dict[str, float], state: MonitorState, prior: torch.Tensor | None, cfg: SelectionConfig) -> str:
    """Why the model collapsed, or '' if it did not."""
    if state.initial is None:
        return ""
    num_classes = sum(1 for k in stats if k.startswith("ratio/"))
    for k in range(1, num_classes):
        now, before = stats[f"ratio/{k}"], state.initial[f"ratio/{k}"]
        reference = float(prior[k]) if prior is not None else before
        if before > 0 and now < cfg.vanish_fraction * min(reference, before):
            return f"class {k} vanished (predicted ratio {now:.2e}, was {before:.2e})"
    if stats["foreground_ratio"] < 1e-4 or stats["foreground_ratio"] > 0.98:
        return f"foreground ratio degenerated to {stats['foreground_ratio']:.4f}"
    if stats["entropy"] < cfg.min_entropy and stats.get("prior_kl", 0.0) > state.initial.get("prior_kl", 0.0):
        return "entropy collapsed to ~0 while the prior KL rose"
    return ""


PredictorFactory = Callable[[nn.Module], Predictor]


def dice_validator(predictor_for: PredictorFactory, data: Data, val_cases: list[dict]):
    """Mean foreground Dice on preprocessed validation volumes (the checkpoint rule 'val_dice')."""
    dataset = data.dataset(val_cases, inference_chain(data.card, data.config, True, data.card_path))
    class_ids = list(range(1, data.card.num_classes))

    def validate(model: nn.Module, iteration: int) -> Validation:
        model.eval()
        predictor = predictor_for(model)
        scores = []
        for item in dataset:
            pred = to_label(predictor.probabilities(item["image"][None]))[0, 0].numpy()
            scores.append(metrics.dice_scores(pred, item["label"][0].numpy().round().astype(np.int16), class_ids))
        per_class = np.nanmean(np.array(scores), axis=0)
        logs = {f"val/dice/{data.card.class_names[c]}": float(d) for c, d in zip(class_ids, per_class, strict=True)}
        mean = float(np.nanmean(per_class))
        logs["val/dice/mean"] = mean
        return Validation(mean, logs)

    return validate


class LabelFreeValidator:
    """Scores a model on a fixed subset of unlabelled target volumes; remembers every score (`state.history`).

    Args:
        predictor_for: builds the (flip-free) predictor of a model.
        data: the target data (its config carries the model's preprocessing geometry).
        cases: target cases; the first `cfg.cases` are monitored, labels never read.
        prior: (K,) marginal class prior per training-geometry image, or None.
        source_bn: the source model's BN running statistics (`snapshot_bn`), for the drift statistic.
    """

    def __init__(self, predictor_for: PredictorFactory, data: Data, cases: list[dict], prior: torch.Tensor | None,
                 source_bn: list, cfg: SelectionConfig):
        self.predictor_for, self.data, self.prior, self.source_bn, self.cfg = predictor_for, data, prior, source_bn, cfg
        chain = inference_chain(data.card, data.config, False, data.card_path)
        self.volumes = data.dataset(unlabeled(cases[: cfg.cases]), chain)
        self.flip_axis = 2 + (1 if data.config.slice_axis != 1 else 0)  # an in-plane axis of (1, C, X, Y, Z)
        self.state = MonitorState()

    def __call__(self, model: nn.Module, iteration: int) -> Validation:
        model.eval()
        predictor = self.predictor_for(model)
        probs, flipped = [], []
        for item in self.volumes:
            image = item["image"][None]
            probs.append(predictor.probabilities(image))
            flip = [self.flip_axis]
            flipped.append(torch.flip(predictor.probabilities(torch.flip(image, dims=flip)), dims=flip))
        stats = summarise(probs, flipped, self.prior, self.data.config)
        if batchnorm_layers(model):
            stats["bn_drift"] = bn_drift(model, self.source_bn)
        if self.state.initial is None:
            self.state.initial = stats
        reason = collapse_reason(stats, self.state, self.prior, self.cfg)
        value = score(stats, self.cfg)
        self.state.history.append({"iteration": iteration, **stats, "score": value})
        return Validation(value, {f"monitor/{k}": v for k, v in stats.items()}, stop=bool(reason), reason=reason)

    def state_dict(self) -> dict:
        """The monitor's memory (the source model's statistics, every score so far), for resuming a run."""
        return {"initial": self.state.initial, "history": self.state.history}

    def load_state_dict(self, state: dict) -> None:
        self.state = MonitorState(state["initial"], list(state["history"]))


@dataclass
class Recommendation:
    adapted: Path  # the adapted checkpoint the label-free rule chose (or the last one)
    recommended: bool  # use it rather than the source model?
    reason: str
    source_stats: dict[str, float]
    chosen_stats: dict[str, float]


def recommend(history: list[dict], loop: LoopResult, cfg: SelectionConfig, has_prior: bool,
              supervised_cases: int = 0) -> Recommendation:
    """The recommendation rule: an adapted checkpoint is used only if it beats the source model's score by `margin`.

    A supervised fine-tune on `supervised_cases` labelled target cases (finetune_fewshot) has labels: it keeps the
    last checkpoint of its fixed budget (README "Model selection with few labels"), never the label-free choice.
    """
    source = history[0]
    if supervised_cases:
        return Recommendation(loop.last_path, True, f"supervised fine-tune on {supervised_cases} labelled target "
                              "case(s): the last checkpoint of the fixed budget (checkpoint.policy=last)", source,
                              history[-1])
    chosen = max(history[1:], key=lambda h: h["score"], default=None)
    adapted = loop.best_path if loop.best_iteration > 0 else loop.last_path
    collapse = loop.stopped_early
    if chosen is None or loop.best_iteration <= 0:
        reason = "no adapted checkpoint scored above the source model on the label-free rule"
        if collapse:
            reason = f"adaptation collapsed ({collapse}); " + reason
        return Recommendation(adapted, False, reason, source, source)
    gain = chosen["score"] - source["score"]
    recommended = gain > cfg.margin
    reason = (
        f"label-free score {chosen['score']:.4f} vs source {source['score']:.4f} "
        f"(flip consistency {chosen['flip_consistency']:.3f} vs {source['flip_consistency']:.3f}"
        + (f", prior KL {chosen['prior_kl']:.3f} vs {source['prior_kl']:.3f}" if has_prior else "")
        + f"); gain {gain:+.4f} {'>' if recommended else '<='} margin {cfg.margin}"
    )
    if collapse:
        reason += f"; stopped early: {collapse} (kept the last safe checkpoint)"
    return Recommendation(adapted, recommended, reason, source, chosen)


def cross_validation_folds(cases: list[dict], folds: int) -> list[list[dict]]:
    """The held-out cases of each fold: case i in fold i mod n, n = min(folds, cases) (leave-one-out when few).

    Raises:
        MeddaError: fewer than 2 labelled cases (nothing would be left to train a fold on).
    """
    if len(cases) < 2:
        raise MeddaError(f"config: field 'train.select_by' is cross_validation, which needs at least 2 labelled cases "
                         f"in data.train (found {len(cases)}); with one, select_by last keeps the fixed budget's "
                         "last checkpoint, and label_free (from a source model) scores the unlabelled cases")
    n = min(folds, len(cases))
    return [cases[i::n] for i in range(n)]


def choose_iteration(curves: list[dict[int, float]]) -> tuple[int, dict[int, float]]:
    """The iteration with the best mean validation score over the folds (the earliest of equal ones), and the mean
    score at every iteration that all folds validated."""
    shared = sorted(set.intersection(*(set(c) for c in curves)))
    mean = {it: sum(c[it] for c in curves) / len(curves) for it in shared}
    return max(shared, key=lambda it: (mean[it], -it)), mean
