"""Tent: fully test-time adaptation by entropy minimisation of the batch-norm affine parameters.

Wang, Shelhamer, Liu, Olshausen, Darrell, "Tent: Fully Test-Time Adaptation by Entropy
Minimization", ICLR 2021 (arXiv 2006.10726). Setup: the model in train mode with every parameter
frozen except the BatchNorm (1d/2d/3d) weight and bias; every BN layer stops tracking running
statistics (track_running_stats=False, running_mean/var=None), so it normalises with the current
batch statistics in train *and* eval mode. Loss: the softmax entropy averaged over the batch and,
for segmentation, over the pixels. One optimiser step per target batch (online).

`episodic=True` resets the model (and, by the engine, the optimiser) before every batch, as in the
reference `MODEL.EPISODIC`: `configure()` keeps a copy of the configured model state and `reset()`
restores it; the engine must reset the optimiser state whenever `method.config.episodic` is True.
Episodic adaptation only makes sense when predictions are taken batch by batch inside the loop;
in an adapt-then-evaluate run the final model is adapted on the last batch only.

Batch statistics need batches of several slices (or large patches): a batch of one small or empty
slice gives degenerate statistics. The adapted model keeps no running statistics, so its
checkpoint must be loaded into a model configured the same way (or with strict=False).
Recommended optimiser (reference CIFAR config): Adam lr 1e-3, betas (0.9, 0.999), no weight decay;
for medical segmentation start lower (1e-4) and sweep.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import nn

from medda.errors import MeddaError
from medda.methods.base import (
    Method,
    MethodConfig,
    StepResult,
    batchnorm_layers,
    bn_affine_parameters,
    freeze_all,
    prediction_logs,
    softmax_entropy,
)


class Config(MethodConfig):
    episodic: bool = Field(
        False,
        description="Reset model and optimiser to their configured state before every batch "
        "(the engine resets the optimiser; reference default: online, not episodic).",
    )


def configure_tent(model: nn.Module, method: str = "tent") -> list[nn.Parameter]:
    """Tent-style setup: train mode, all frozen, BN affine trainable, BN on batch statistics only.

    Returns the BN weight/bias parameters. Raises MeddaError if no BN layer has affine parameters.
    """
    model.train()
    freeze_all(model)
    for bn in batchnorm_layers(model):
        for p in (bn.weight, bn.bias):
            if p is not None:
                p.requires_grad_(True)
        bn.track_running_stats = False
        bn.running_mean = None
        bn.running_var = None
    params = bn_affine_parameters(model)
    if not params:
        raise MeddaError(
            f"method '{method}' trains the batch-norm affine parameters, but the model's BN layers have "
            "affine=False"
        )
    return params


class Tent(Method):
    """Entropy minimisation of BN gamma/beta with batch statistics; optional episodic resets."""

    name = "tent"
    Config = Config
    requires_batchnorm = True

    config: Config

    def __init__(self, model: nn.Module, config: MethodConfig, context):
        super().__init__(model, config, context)
        self._initial_state: dict[str, torch.Tensor] | None = None

    def configure(self) -> list[nn.Parameter]:
        params = configure_tent(self.model, self.name)
        if self.config.episodic:
            self._initial_state = copy.deepcopy(self.model.state_dict())
        return params

    def reset(self) -> None:
        """Restore the model state taken at `configure()` (episodic mode); a no-op otherwise."""
        if self._initial_state is not None:
            self.model.load_state_dict(self._initial_state, strict=True)

    def step(self, batch: dict[str, dict[str, torch.Tensor]], iteration: int) -> StepResult:
        logits = self.model(batch["unlabeled"]["image"]).float()
        loss = softmax_entropy(logits)
        logs = prediction_logs(logits)
        logs["loss"] = float(loss.detach())
        return StepResult(loss, logs)
