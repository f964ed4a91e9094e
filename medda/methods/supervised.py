"""Supervised training on labelled scans: source training and the supervised-only twin of SSL runs.

Loss: (Dice + CE) / 2 on the labelled stream, via MONAI `DiceCELoss(to_onehot_y=True, softmax=True,
lambda_dice=0.5, lambda_ce=0.5)` (per-sample, per-class soft Dice including background).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from monai.losses import DiceCELoss

from medda.methods.base import Method, MethodConfig, StepResult


def make_dice_ce() -> DiceCELoss:
    """The (Dice + CE)/2 loss shared by supervised, mean teacher and source training."""
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5)


def as_label(label: torch.Tensor) -> torch.Tensor:
    """Labels arrive as (B, 1, *S) float or int: return them as long."""
    return label.round().long() if label.is_floating_point() else label.long()


class SupervisedConfig(MethodConfig):
    """Supervised training has no options."""


class Supervised(Method):
    """Supervised (CE + Dice)/2 on labelled patches: source training and the supervised-only twin of SSL runs."""

    name: ClassVar[str] = "supervised"
    Config: ClassVar[type[MethodConfig]] = SupervisedConfig
    streams: ClassVar[tuple[str, ...]] = ("labeled",)
    reads_target_labels: ClassVar[bool] = True

    def __init__(self, model, config, context):
        super().__init__(model, config, context)
        self.loss_fn = make_dice_ce()

    def step(self, batch, iteration: int) -> StepResult:
        image = batch["labeled"]["image"]
        label = as_label(batch["labeled"]["label"])
        logits = self.model(image)
        loss = self.loss_fn(logits.float(), label)
        return StepResult(loss=loss, logs={"loss": float(loss.detach())})
