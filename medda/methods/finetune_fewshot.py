"""Few-shot supervised fine-tuning of the source model on k labelled target scans.

The strong, simple reference of Lee, Kim, Choi, Lee, Lee, Kim, "Few-shot Fine-tuning is All You Need
for Source-free Domain Adaptation" (2023, arXiv 2304.00792): fine-tune the source model with a
supervised loss on a handful of labelled target images instead of adapting it without labels. The
loss is (Dice + cross-entropy) / 2 (MONAI DiceCELoss, softmax, one-hot targets).

NOT source-free with respect to target labels: it reads target ground truth (reads_target_labels=True),
so it belongs in a separate row of any source-free comparison (an upper-bound-style baseline for k shots).
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.losses import DiceCELoss
from pydantic import Field
from torch import nn

from medda.errors import MeddaError
from medda.methods.base import (
    Method,
    MethodConfig,
    MethodContext,
    StepResult,
    bn_affine_parameters,
    freeze_all,
    prediction_logs,
)


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
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5)

    def configure(self) -> list[nn.Parameter]:
        self.model.train()
        if self.config.trainable == "bn_affine":
            freeze_all(self.model)
            params = bn_affine_parameters(self.model)
            if not params:
                raise MeddaError(
                    "finetune_fewshot with trainable=bn_affine needs batch-norm layers with affine parameters; "
                    "the model has none (build it with model.norm=batch, or use trainable=all)"
                )
            for p in params:
                p.requires_grad_(True)
            return params
        for p in self.model.parameters():
            p.requires_grad_(True)
        return list(self.model.parameters())

    def step(self, batch: dict[str, dict[str, torch.Tensor]], iteration: int) -> StepResult:
        data = batch["labeled"]
        logits = self.model(data["image"]).float()
        label = data["label"]
        if label.ndim == logits.ndim - 1:
            label = label.unsqueeze(1)
        loss = self.loss_fn(logits, label.long())
        logs = prediction_logs(logits)
        logs["loss"] = float(loss.detach())
        return StepResult(loss, logs)
