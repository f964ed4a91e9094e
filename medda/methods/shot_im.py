"""SHOT-IM: source hypothesis transfer by information maximisation, in its segmentation form.

Liang, Hu, Feng, "Do We Really Need to Access the Source Data? Source Hypothesis Transfer for Unsupervised
Domain Adaptation", ICML 2020 (arXiv 2002.08546); docs/methods.md section 6. The classifier head (the source
hypothesis: here the convolutions that output the class logits) is frozen; the rest of the network (the feature
extractor) is trained to make target predictions individually certain and globally diverse:

    L_ent = -(1/(B |Omega|)) sum_i sum_p sum_k s_ipk log s_ipk          (per-pixel entropy)
    L_div = sum_k pbar_k log pbar_k,   pbar = mean of s over the batch's pixels   (= KL(pbar || uniform) - log K)
    L     = L_ent + lambda_div * L_div

SHOT-IM is SHOT without its clustering pseudo-labels (lambda_pl = 0 in the paper). The paper's diversity target
is the uniform distribution, which is what `diversity_target="uniform"` (default) implements; segmentation
classes are far from uniform over pixels (the background covers ~95 % of a cardiac slice), so uniform diversity
pushes the foreground up. `diversity_target="prior"` replaces the uniform target by the class prior measured on
the source labels in the training geometry (the marginal prior of the batch-pooled ratio): L_div then becomes
KL(pbar || prior), the segmentation adaptation of the diversity term. Reference optimiser (the default): SGD,
momentum 0.9, Nesterov off, weight decay 1e-3, lr 1e-3 (the paper's feature-extractor rate).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from medda.errors import MeddaError
from medda.methods.base import Method, MethodConfig, MethodContext, StepResult, trainable_parameters
from medda.methods.losses import (
    class_ratios,
    diversity,
    entropy,
    kl_divergence,
    marginal_prior,
    prediction_logs,
)


class Config(MethodConfig):
    lambda_div: float = Field(1.0, ge=0.0, description="Weight of the diversity term (paper: 1).")
    diversity_target: Literal["uniform", "prior"] = Field(
        "uniform",
        description="'uniform': the paper's sum_k pbar_k log pbar_k; 'prior': KL(pbar || class prior) with the "
        "source model's measured (marginal) class prior instead of the uniform target.",
    )


class ShotIM(Method):
    """Information maximisation (entropy + diversity) of the feature extractor; the classifier head stays frozen."""

    name = "shot_im"
    Config = Config
    default_optim = {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-3, "schedule": "constant"}

    config: Config

    def __init__(self, model: nn.Module, config: MethodConfig, context: MethodContext):
        super().__init__(model, config, context)
        self.target: torch.Tensor | None = None
        if config.diversity_target == "prior":
            if context.class_ratio_prior is None:
                raise MeddaError("method 'shot_im' with diversity_target=prior needs a class-ratio prior; none is "
                                 "known (set method.prior or use diversity_target=uniform)")
            self.target = marginal_prior(context.class_ratio_prior, context.class_presence)

    def configure(self) -> list[nn.Parameter]:
        return trainable_parameters(self.model, "all_but_head", self.name, self.context.num_classes)

    def step(self, batch: dict[str, dict[str, torch.Tensor]], iteration: int) -> StepResult:
        logits = self.model(batch["unlabeled"]["image"]).float()
        probs = torch.softmax(logits, dim=1)
        ent = entropy(probs)
        if self.target is None:
            div = diversity(probs)
        else:
            div = kl_divergence(class_ratios(probs, pooled=True), self.target.to(probs.device))
        loss = ent + self.config.lambda_div * div
        logs = prediction_logs(logits)
        logs.update({"loss": float(loss.detach()), "diversity": float(div.detach())})
        return StepResult(loss, logs)
