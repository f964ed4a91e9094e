"""Few-shot supervised fine-tuning of the source model on k labelled target scans.

The strong, simple reference of Lee, Kim, Choi, Lee, Lee, Kim, "Few-shot Fine-tuning is All You Need
for Source-free Domain Adaptation" (2023, arXiv 2304.00792): fine-tune the source model with a
supervised loss on a handful of labelled target images instead of adapting it without labels. The
loss is (Dice + cross-entropy) / 2 (MONAI DiceCELoss, softmax, one-hot targets).

NOT source-free with respect to target labels: it reads target ground truth (reads_target_labels=True),
so it belongs in a separate row of any source-free comparison (an upper-bound-style baseline for k shots).

Model selection: it has labels, so its checkpoint is chosen by the few-label rule (`medda.api.few_label_selection`;
best validation Dice with `data.val`, otherwise the last checkpoint of the fixed budget), never by the label-free
rule and never on `data.test`, which must not overlap its labelled cases. `medda train` with `source_checkpoint`
runs it (or `supervised`, the same loss on all parameters) next to mean teacher and BCP from the same source model.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from medda.methods.base import Method, MethodConfig, MethodContext, StepResult, trainable_parameters
from medda.methods.losses import as_label, dice_ce_loss, prediction_logs


class Config(MethodConfig):
    trainable: Literal["all", "bn_affine"] = Field(
        "all",
        description="'all': fine-tune every parameter; 'bn_affine': only BN gamma/beta (BN running "
        "statistics keep updating in train mode in both cases).",
    )


class FinetuneFewshot(Method):
    """Supervised (Dice + CE)/2 fine-tuning on the labelled target stream.

    Note: not source-free w.r.t. target labels (Lee et al. 2023): it trains on target ground truth.
    """

    name = "finetune_fewshot"
    Config = Config
    streams = ("labeled",)
    reads_target_labels = True

    config: Config

    def __init__(self, model: nn.Module, config: MethodConfig, context: MethodContext):
        super().__init__(model, config, context)
        self.loss_fn = dice_ce_loss()

    def configure(self) -> list[nn.Parameter]:
        return trainable_parameters(self.model, self.config.trainable, self.name)

    def step(self, batch: dict[str, dict[str, torch.Tensor]], iteration: int) -> StepResult:
        data = batch["labeled"]
        logits = self.model(data["image"]).float()
        label = data["label"]
        if label.ndim == logits.ndim - 1:
            label = label.unsqueeze(1)
        loss = self.loss_fn(logits, as_label(label))
        logs = prediction_logs(logits)
        logs["loss"] = float(loss.detach())
        return StepResult(loss, logs)
