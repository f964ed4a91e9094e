"""Entropy minimisation with a class-ratio prior (AdaMI; AdaEnt without the prior term).

Bateson, Kervadec, Dolz, Lombaert, Ben Ayed, "Source-Relaxed Domain Adaptation for Image
Segmentation", MICCAI 2020 (arXiv 2005.03697), and "Source-free domain adaptation for image
segmentation", Medical Image Analysis 2022 (arXiv 2108.03152), which names the method AdaMI.
Implemented from medda's specification (docs/methods.md section 1), not from the reference code.

Loss on a target batch of softmax maps s (B, K, *spatial), class weights nu, prior tau:

    L_ent = -(1 / (B |Omega|)) sum_i sum_p sum_k nu_k s_ipk log(s_ipk + 1e-10)
    L_KL  = (1 / B) sum_i sum_k r_ik (log(r_ik + 1e-10) - log(tau_ik + 1e-10))   # KL(predicted || prior)
    L     = lambda_entropy * L_ent + lambda_kl * L_KL

The predicted class ratio r (`ratio_mode`) is either the paper's mean of the softmax over the image
("mean_softmax", default) or the reference code's ratio of per-pixel max-normalised probabilities
("max_normalised", `norm_soft_size` with power 1). AdaEnt is `lambda_kl=0`.

The prior comes from `MethodContext.class_ratio_prior` (K,), class 0 being the background. The
published experiments multiply a constant per-class size by image-level presence tags taken from
the target ground truth (weak supervision); medda stays label-free with `absent_classes`:
  - "none": the constant prior for every image;
  - "predicted_tags": a foreground class whose predicted proportion in the image (fraction of pixels
    whose argmax is that class, a detached tag) is below `presence_threshold` gets prior 0, and the
    prior is renormalised (`tag_renormalisation`: "background" gives the removed mass to class 0, as
    in the reference size tables where the background is the remainder; "proportional" rescales the
    remaining classes, and may also drop the background). A label-free substitute for the reference's
    ground-truth tags: it cannot recover an organ the model misses entirely;
  - "batch": the KL between the class ratio pooled over the whole batch and the *marginal* prior (the
    expected ratio of any image, empty ones included: presence x conditional ratio, from
    `MethodContext.class_presence`), since a pooled batch contains images without the structure.

The prior is measured in the training geometry (slices padded/cropped to the patch size, as the method sees
them; `medda.data.priors`), so the KL does not reward over-segmentation of padded patches.

What trains (`trainable`, `medda.methods.base.trainable_parameters`): "all" (reference code: Adam over every
parameter, the network in train mode so BN normalises with batch statistics and updates its running
statistics), "bn_affine" (only BN gamma/beta, running statistics updating) or "bn_affine_batch_stats"
(Tent-style, as the authors' later test-time adaptation code: only BN gamma/beta, batch statistics).
Reference optimiser (the default, `default_optim`): Adam lr 1e-6, betas (0.9, 0.999), weight decay 1e-4
(the reference also multiplies the lr by 0.9 every 20 epochs: constant within medda's budgets).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from medda.errors import MeddaError
from medda.methods.base import Method, MethodConfig, MethodContext, StepResult, trainable_parameters
from medda.methods.losses import (
    RatioMode,
    class_ratios,
    entropy,
    kl_divergence,
    marginal_prior,
    prediction_logs,
)

EPS = 1e-10


def presence_tags(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, K) boolean: the fraction of the image's pixels whose argmax is class k is >= threshold."""
    hard = probs.detach().argmax(dim=1).flatten(1)  # (B, P)
    counts = torch.stack([(hard == k).float().mean(dim=1) for k in range(probs.shape[1])], dim=1)
    return counts >= threshold


def tagged_prior(
    prior: torch.Tensor,
    present: torch.Tensor,
    renormalisation: Literal["background", "proportional"] = "background",
) -> torch.Tensor:
    """Per-image prior (B, K): absent classes get 0, then the prior is renormalised to sum to 1.

    "background": class 0 is always kept and receives the mass of the absent foreground classes.
    "proportional": the remaining classes are rescaled; an image with no present class keeps `prior`.
    """
    prior = prior.float().to(present.device)
    present = present.clone()
    if renormalisation == "background":
        present[:, 0] = True
        tagged = prior.expand(present.shape[0], -1) * present
        tagged[:, 0] = tagged[:, 0] + (1.0 - tagged.sum(dim=1))
        return tagged
    tagged = prior.expand(present.shape[0], -1) * present
    total = tagged.sum(dim=1, keepdim=True)
    safe = torch.where(total > 0, tagged / total.clamp_min(EPS), prior.expand_as(tagged))
    return safe


class Config(MethodConfig):
    ratio_mode: RatioMode = Field(
        "mean_softmax",
        description="Predicted class ratio: 'mean_softmax' (the papers' definition) or 'max_normalised' "
        "(the reference code's per-pixel max-normalised probabilities).",
    )
    class_weights: list[float] | None = Field(
        None,
        description="Entropy class weights nu (one per class, background first); None = uniform 1. "
        "Reference: prostate/spine [0.1, 0.9], heart [0.02, 0.27, 0.18, 0.21, 0.32].",
    )
    lambda_entropy: float = Field(
        1.0, ge=0.0, description="Weight of the weighted entropy term (reference 1)."
    )
    lambda_kl: float = Field(
        1.0, ge=0.0, description="Weight of KL(predicted ratio || prior) (reference 1; 0 = AdaEnt)."
    )
    trainable: Literal["all", "bn_affine", "bn_affine_batch_stats"] = Field(
        "all",
        description="'all': every parameter, BN in train mode updating its running statistics (reference code); "
        "'bn_affine': only BN gamma/beta, running statistics updating; 'bn_affine_batch_stats': only BN "
        "gamma/beta on batch statistics (Tent-style, the authors' later TTA code).",
    )
    absent_classes: Literal["none", "predicted_tags", "batch"] = Field(
        "none",
        description="Prior for images where a structure may be absent: 'none' = constant prior, "
        "'predicted_tags' = zero the prior of classes the model does not predict (label-free tags), "
        "'batch' = KL between the batch-pooled class ratio and the marginal prior (empty images included).",
    )
    presence_threshold: float = Field(
        1e-3,
        ge=0.0,
        lt=1.0,
        description="predicted_tags: a foreground class is present in an image if at least this fraction "
        "of its pixels are predicted (argmax) as that class.",
    )
    tag_renormalisation: Literal["background", "proportional"] = Field(
        "background",
        description="predicted_tags: give the prior mass of absent classes to the background (class 0; "
        "reference size tables) or rescale all remaining classes proportionally.",
    )

    @field_validator("class_weights")
    @classmethod
    def _non_negative(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(w < 0 for w in v)):
            raise ValueError("class_weights must be a non-empty list of non-negative numbers")
        return v


class EntropyPrior(Method):
    """AdaMI: weighted entropy + KL(predicted class ratio || class-ratio prior)."""

    name = "entropy_prior"
    Config = Config
    default_optim = {"name": "adam", "lr": 1e-6, "weight_decay": 1e-4, "schedule": "constant"}

    config: Config

    def __init__(self, model: nn.Module, config: MethodConfig, context: MethodContext):
        super().__init__(model, config, context)
        k = context.num_classes
        if context.class_ratio_prior is None:
            raise MeddaError(
                "method 'entropy_prior' needs a class-ratio prior (expected class proportions, one per class), "
                "but none was given"
            )
        prior = torch.as_tensor(context.class_ratio_prior, dtype=torch.float32).flatten()
        if prior.numel() != k:
            raise MeddaError(
                f"the class-ratio prior has {prior.numel()} values but the model predicts {k} classes"
            )
        if not torch.isfinite(prior).all() or (prior < 0).any() or prior.sum() <= 0:
            raise MeddaError(
                "the class-ratio prior must hold finite, non-negative proportions with a positive sum"
            )
        self.prior = prior / prior.sum()  # e.g. pixel counts, or tables summing to ~1.005, become proportions
        self.marginal = marginal_prior(self.prior, context.class_presence)
        self.weights: torch.Tensor | None = None
        if config.class_weights is not None:
            if len(config.class_weights) != k:
                raise MeddaError(
                    f"class_weights has {len(config.class_weights)} values but the model predicts {k} classes"
                )
            self.weights = torch.tensor(config.class_weights, dtype=torch.float32)

    def configure(self) -> list[nn.Parameter]:
        return trainable_parameters(self.model, self.config.trainable, self.name)

    def step(self, batch: dict[str, dict[str, torch.Tensor]], iteration: int) -> StepResult:
        cfg = self.config
        logits = self.model(batch["unlabeled"]["image"]).float()
        probs = torch.softmax(logits, dim=1)
        ent = entropy(probs, self.weights)
        ratios = class_ratios(probs, cfg.ratio_mode)
        prior = self.prior.to(probs.device)
        if cfg.absent_classes == "batch":
            kl = kl_divergence(class_ratios(probs, cfg.ratio_mode, pooled=True), self.marginal.to(probs.device))
        elif cfg.absent_classes == "predicted_tags":
            present = presence_tags(probs, cfg.presence_threshold)
            kl = kl_divergence(ratios, tagged_prior(prior, present, cfg.tag_renormalisation))
        else:
            kl = kl_divergence(ratios, prior)
        loss = cfg.lambda_entropy * ent + cfg.lambda_kl * kl
        logs = prediction_logs(logits)
        logs.update({f"ratio/{k}": float(r) for k, r in enumerate(ratios.detach().mean(dim=0))})
        logs.update(
            {
                "loss": float(loss.detach()),
                "entropy_weighted": float(ent.detach()),
                "prior_kl": float(kl.detach()),
            }
        )
        return StepResult(loss, logs)
