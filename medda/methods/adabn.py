"""AdaBN: re-estimate the batch-norm statistics on the target domain, optionally mixed with the source.

Li, Wang, Shi, Liu, Hou, "Revisiting Batch Normalization For Practical Domain Adaptation",
arXiv 1603.04779 (ICLR-W 2017). No gradients: every BN running mean/variance is reset and
re-estimated as a cumulative average (BN momentum=None) over one pass of the target set, then the
model is evaluated in eval mode with those statistics. Every parameter stays bit-identical.

Test-time calibration (You, Li, Wang, Yang, "Test-time batch statistics calibration for covariate
shift", arXiv 2110.04065): option `w_test` mixes the frozen source statistics with the target ones,
`stat = (1 - w_test) * source + w_test * target` for both the mean and the variance. `w_test` is the
weight of the *target* (test) statistics: 1.0 is pure AdaBN, 0.0 restores the source statistics,
0.1 is the "BN-0.1" setting of You et al. (whose alpha has the same meaning; other papers flip it,
hence the explicit name). You et al. mix with each test batch's statistics; here the target side is
the whole-target-set AdaBN estimate, the mix is applied once by `finalize()`.

Note: the cumulative average of per-batch statistics averages the per-batch (unbiased) variances;
it does not add the spread of the batch means, so with small, heterogeneous batches (2D slices) the
variance is slightly lower than the pooled variance of the whole set. Batches need several slices
or enough voxels per channel (a batch of one 1x1 feature map cannot be normalised).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from medda.errors import MeddaError
from medda.methods.base import (
    Method,
    MethodConfig,
    StepResult,
    batchnorm_layers,
    freeze_all,
)
from medda.methods.losses import prediction_logs


class Config(MethodConfig):
    w_test: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Weight of the target statistics in the final BN statistics, "
        "(1 - w_test) * source + w_test * target: 1.0 = pure AdaBN, 0.1 = 'BN-0.1' of You et al. 2021, "
        "0.0 = source statistics.",
    )


class AdaBN(Method):
    """Gradient-free BN-statistics re-estimation over one pass of the target set; mixing in `finalize()`."""

    name = "adabn"
    Config = Config
    requires_batchnorm = True
    one_pass = True

    config: Config

    def __init__(self, model: nn.Module, config: MethodConfig, context):
        super().__init__(model, config, context)
        self._source: list[dict[str, torch.Tensor | float | None]] = []

    def configure(self) -> list[nn.Parameter]:
        freeze_all(self.model)
        self.model.eval()
        self._source = []
        for bn in batchnorm_layers(self.model):
            if bn.running_mean is None or bn.running_var is None:
                raise MeddaError(
                    "adabn needs batch-norm layers that track running statistics (track_running_stats=True); "
                    "this model's BN layers have none"
                )
            # Frozen source statistics, a separate copy outside the adapted module.
            self._source.append(
                {
                    "mean": bn.running_mean.detach().clone(),
                    "var": bn.running_var.detach().clone(),
                    "momentum": bn.momentum,
                }
            )
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average over every batch seen
            bn.train()
        return []

    def step(self, batch: dict[str, dict[str, torch.Tensor]], iteration: int) -> StepResult:
        with torch.no_grad():
            logits = self.model(batch["unlabeled"]["image"])
        if not len(logits):  # under torchrun, a process past the end of its share of the pass: nothing to log
            return StepResult(None, {})
        logs = prediction_logs(logits)
        logs["loss"] = logs["entropy"]
        return StepResult(None, logs)

    def finalize(self) -> None:
        """Mix source and target statistics with `w_test`, restore the BN momentum, switch to eval mode."""
        layers = batchnorm_layers(self.model)
        if not self._source:
            raise MeddaError("adabn.finalize() was called before configure()")
        if any(int(bn.num_batches_tracked) == 0 for bn in layers):
            raise MeddaError("adabn saw no target batch: the unlabelled target stream is empty")
        w = self.config.w_test
        with torch.no_grad():
            for bn, src in zip(layers, self._source, strict=True):
                bn.running_mean.copy_((1.0 - w) * src["mean"].to(bn.running_mean) + w * bn.running_mean)
                bn.running_var.copy_((1.0 - w) * src["var"].to(bn.running_var) + w * bn.running_var)
                bn.momentum = src["momentum"]
        self.model.eval()

    def source_statistics(self) -> list[dict[str, torch.Tensor]]:
        """The frozen source running mean/var per BN layer (copies, in module order)."""
        return [{"mean": s["mean"].clone(), "var": s["var"].clone()} for s in self._source]
