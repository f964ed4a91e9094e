"""Tent: fully test-time adaptation by entropy minimisation of the batch-norm affine parameters.

Wang, Shelhamer, Liu, Olshausen, Darrell, "Tent: Fully Test-Time Adaptation by Entropy
Minimization", ICLR 2021 (arXiv 2006.10726); docs/methods.md section 2.3. Setup (scope
`bn_affine_batch_stats` of `medda.methods.base.trainable_parameters`): the model in train mode with every
parameter frozen except the BatchNorm (1d/2d/3d) weight and bias; every BN layer stops tracking running
statistics, so it normalises with the current batch statistics in train *and* eval mode. Loss: the softmax
entropy averaged over the batch and, for segmentation, over the pixels. One optimiser step per target batch
(online, the reference default).

The reference's episodic mode (reset before every batch) is not offered: medda adapts on the target set and then
predicts with the adapted model, and a model reset before every batch would deliver the model adapted on the last
batch only (docs/methods.md 2.3).

Batch statistics need batches of several slices (or large patches): a batch of one small or empty
slice gives degenerate statistics. The adapted model keeps no running statistics, so its checkpoint must be
loaded into a model configured the same way (`medda.models.factory` does). Reference optimiser (the default,
CIFAR config): Adam lr 1e-3, betas (0.9, 0.999), no weight decay.
"""

from __future__ import annotations

import torch
from torch import nn

from medda.methods.base import Method, MethodConfig, StepResult, trainable_parameters
from medda.methods.losses import entropy, prediction_logs


class Config(MethodConfig):
    """Tent has no options besides the optimiser."""


class Tent(Method):
    """Entropy minimisation of BN gamma/beta with batch statistics, one step per target batch."""

    name = "tent"
    Config = Config
    requires_batchnorm = True
    default_optim = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant"}

    def configure(self) -> list[nn.Parameter]:
        return trainable_parameters(self.model, "bn_affine_batch_stats", self.name)

    def step(self, batch: dict[str, dict[str, torch.Tensor]], iteration: int) -> StepResult:
        logits = self.model(batch["unlabeled"]["image"]).float()
        loss = entropy(torch.softmax(logits, dim=1))
        logs = prediction_logs(logits)
        logs["loss"] = float(loss.detach())
        return StepResult(loss, logs)
