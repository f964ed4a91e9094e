"""Supervised training on labelled scans: source training and the supervised-only twin of SSL runs.

Loss: (Dice + CE) / 2 on the labelled stream (`medda.methods.losses.dice_ce_loss`: MONAI DiceCELoss, per-sample,
per-class soft Dice including background).
"""

from __future__ import annotations

from typing import ClassVar

from medda.methods.base import Method, MethodConfig, StepResult
from medda.methods.losses import as_label, dice_ce_loss


class SupervisedConfig(MethodConfig):
    """Supervised training has no options."""


class Supervised(Method):
    """Supervised (CE + Dice)/2 on labelled patches: source training and the supervised-only twin of SSL runs."""

    name: ClassVar[str] = "supervised"
    task: ClassVar[str] = "training"
    Config: ClassVar[type[MethodConfig]] = SupervisedConfig
    streams: ClassVar[tuple[str, ...]] = ("labeled",)
    reads_target_labels: ClassVar[bool] = True

    def __init__(self, model, config, context):
        super().__init__(model, config, context)
        self.loss_fn = dice_ce_loss()

    def step(self, batch, iteration: int) -> StepResult:
        image = batch["labeled"]["image"]
        label = as_label(batch["labeled"]["label"])
        logits = self.model(image)
        loss = self.loss_fn(logits.float(), label)
        return StepResult(loss=loss, logs={"loss": float(loss.detach())})
