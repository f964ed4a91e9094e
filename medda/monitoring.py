"""Label-free monitoring of adaptation: is the adapted model better than the source model, without labels?

Statistics per monitored target volume (no labels anywhere):
- mean voxel entropy of the softmax;
- predicted class ratios and KL(predicted ratio || class-ratio prior) (the prior is anatomical knowledge);
- flip consistency: soft Dice between the prediction and the un-flipped prediction of the flipped image,
  averaged over foreground classes (a model that understands the anatomy is equivariant to flips);
- BN statistic drift: mean |mu_t - mu_s| / sqrt(var_s + eps) over batch-norm channels vs the source model.

The label-free selection rule (documented in README "Label-free model choice"):
  score = flip_consistency - kl_weight * prior_kl (kl_weight = 0.1; KL only when a prior is known).
The source model is scored first (iteration 0) with the same rule; a checkpoint is chosen only if it is not
collapsed and beats the source's score by `margin`, otherwise the source model is recommended.

Collapse (stops adaptation, keeps the last safe checkpoint, warns): a foreground class vanishes (its predicted
ratio falls below `vanish_fraction` of its prior or of its initial value), the foreground ratio goes to 0 or 1,
or the entropy falls to ~0 while the prior KL rises above its initial value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import Field

from medda.config import Strict
from medda.methods.base import batchnorm_layers

EPS = 1e-10


class MonitorConfig(Strict):
    cases: int = Field(6, ge=1, description="Target volumes scored at every check (a fixed, label-free subset).")
    kl_weight: float = Field(0.1, ge=0, description="Weight of the prior KL in the label-free score.")
    margin: float = Field(0.005, ge=0, description="Score gain over the source model needed to recommend adapting.")
    vanish_fraction: float = Field(0.1, gt=0, lt=1, description="A class below this fraction of its reference ratio vanished.")
    min_entropy: float = Field(1e-3, ge=0, description="Entropy below this with rising KL counts as collapse.")


def class_ratios(probs: torch.Tensor) -> torch.Tensor:
    """(1, K, *S) probabilities -> (K,) mean softmax per class."""
    return probs.float().flatten(2).mean(dim=2)[0]


def prior_kl(ratios: torch.Tensor, prior: torch.Tensor) -> float:
    """KL(ratios || prior) with the AdaMI epsilon."""
    return float((ratios * ((ratios + EPS).log() - (prior.to(ratios) + EPS).log())).sum())


def mean_entropy(probs: torch.Tensor) -> float:
    p = probs.float()
    return float(-(p * (p + EPS).log()).sum(dim=1).mean())


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


def summarise(probs: list[torch.Tensor], flipped: list[torch.Tensor], prior: torch.Tensor | None) -> dict[str, float]:
    """Label-free statistics over the monitored volumes."""
    ratios = torch.stack([class_ratios(p) for p in probs]).mean(0)
    stats = {
        "entropy": sum(mean_entropy(p) for p in probs) / len(probs),
        "flip_consistency": sum(soft_agreement(p, f) for p, f in zip(probs, flipped, strict=True)) / len(probs),
        "foreground_ratio": float(1 - ratios[0]),
    }
    stats.update({f"ratio/{k}": float(r) for k, r in enumerate(ratios)})
    if prior is not None:
        stats["prior_kl"] = sum(prior_kl(class_ratios(p), prior) for p in probs) / len(probs)
    return stats


def score(stats: dict[str, float], cfg: MonitorConfig) -> float:
    return stats["flip_consistency"] - cfg.kl_weight * stats.get("prior_kl", 0.0)


def collapse_reason(stats: dict[str, float], state: MonitorState, prior: torch.Tensor | None, cfg: MonitorConfig) -> str:
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
