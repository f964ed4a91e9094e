"""The losses and label-free quantities every method (and the label-free monitor) shares: one home each.

All functions take softmax probabilities (or logits where named) shaped (B, K, *spatial), class 0 being the
background, and compute in float32 whatever the autocast dtype. Formulas: docs/methods.md sections 1, 2 and 6.
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.losses import DiceCELoss

from medda.errors import MeddaError

EPS = 1e-10  # AdaMI's epsilon inside every log
RatioMode = Literal["mean_softmax", "max_normalised"]


def entropy(probs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over images and pixels of -sum_k nu_k s_k log(s_k + 1e-10).

    Args:
        probs: (B, K, *spatial) softmax probabilities.
        weights: optional (K,) class weights nu (AdaMI); None means all ones (Tent, OSUDA, SHOT-IM).
    """
    probs = probs.float()
    plogp = probs * torch.log(probs + EPS)
    if weights is not None:
        plogp = plogp * weights.to(plogp).view(1, -1, *([1] * (probs.ndim - 2)))
    return -plogp.sum(dim=1).mean()


def class_ratios(probs: torch.Tensor, mode: RatioMode = "mean_softmax", pooled: bool = False) -> torch.Tensor:
    """Predicted class ratios per image, (B, K), rows summing to 1; (1, K) over the whole batch if `pooled`.

    "mean_softmax": (1/|Omega|) sum_p s_pk (the papers). "max_normalised": sum_p (s_pk / max_j s_pj), normalised
    over k (AdaMI's reference code).
    """
    flat = probs.float().flatten(2)  # (B, K, P)
    if mode == "max_normalised":
        flat = flat / flat.max(dim=1, keepdim=True).values
    elif mode != "mean_softmax":
        raise MeddaError(f"ratio_mode '{mode}' is unknown; expected 'mean_softmax' or 'max_normalised'")
    sums = flat.sum(dim=2)
    if pooled:
        sums = sums.sum(dim=0, keepdim=True)
    return sums / sums.sum(dim=1, keepdim=True)


def kl_divergence(ratios: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(ratios || prior) = sum_k r_k (log(r_k + eps) - log(tau_k + eps)).

    Args:
        ratios: (B, K) or (K,) predicted ratios.
        prior: (K,) or (B, K) expected ratios.
    """
    ratios = ratios.float()
    prior = prior.to(ratios).expand_as(ratios)
    return (ratios * (torch.log(ratios + EPS) - torch.log(prior + EPS))).sum(dim=-1).mean()


def marginal_prior(conditional: torch.Tensor, presence: torch.Tensor | None) -> torch.Tensor:
    """The expected class ratio of any image, empty ones included: presence_k * conditional_k for the foreground,
    the background taking the rest. (K,) -> (K,). With `presence` None every class is always present."""
    if presence is None:
        return conditional.float()
    marginal = conditional.float() * presence.to(conditional).float()
    marginal[0] = 1.0 - marginal[1:].sum()
    return marginal


def diversity(probs: torch.Tensor) -> torch.Tensor:
    """SHOT-IM's diversity loss sum_k pbar_k log pbar_k, pbar = the mean prediction over the batch's pixels.

    It equals KL(pbar || uniform) - log K: minimising it spreads the batch's predictions over the classes.
    """
    mean = probs.float().flatten(2).mean(dim=(0, 2))
    return (mean * torch.log(mean + EPS)).sum()


def as_label(label: torch.Tensor) -> torch.Tensor:
    """Labels arrive as (B, 1, *S) float or int: return them as long class ids."""
    return label.round().long() if label.is_floating_point() else label.long()


def dice_ce_loss() -> DiceCELoss:
    """The supervised loss of every labelled stream: (soft Dice + cross-entropy) / 2, softmax, one-hot targets."""
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5)


@torch.no_grad()
def prediction_logs(logits: torch.Tensor) -> dict[str, float]:
    """Label-free step scalars: mean softmax entropy and mean predicted class ratios "ratio/<k>"."""
    probs = torch.softmax(logits.detach().float(), dim=1)
    logs = {"entropy": float(entropy(probs))}
    logs.update({f"ratio/{k}": float(r) for k, r in enumerate(class_ratios(probs, pooled=True)[0])})
    return logs
