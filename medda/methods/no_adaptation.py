"""No adaptation: the source model evaluated on the target through the same engine path.

The lower bound of every source-free adaptation table (e.g. "NoAdaptation" in Bateson et al.,
"Source-free domain adaptation for image segmentation", MedIA 2022, arXiv 2108.03152). The model is
put in eval mode (BatchNorm uses the source running statistics) and nothing is optimised; `step`
only runs a gradient-free forward pass to log label-free monitoring scalars (mean entropy and
predicted class ratios), so that the logs are comparable with those of the adapting methods.
"""

from __future__ import annotations

import torch
from torch import nn

from medda.methods.base import Method, MethodConfig, StepResult, freeze_all
from medda.methods.losses import prediction_logs


class Config(MethodConfig):
    """No options: the baseline changes nothing."""


class NoAdaptation(Method):
    """Source model as is; one monitoring pass over the target stream, no loss (StepResult.loss is None).

    The logged "loss" is the monitoring entropy (nothing is optimised).
    """

    name = "none"
    Config = Config
    one_pass = True

    def configure(self) -> list[nn.Parameter]:
        self.model.eval()
        freeze_all(self.model)
        return []

    def step(self, batch: dict[str, dict[str, torch.Tensor]], iteration: int) -> StepResult:
        with torch.no_grad():
            logits = self.model(batch["unlabeled"]["image"])
        logs = prediction_logs(logits)
        logs["loss"] = logs["entropy"]
        return StepResult(None, logs)
