"""The method interface: every adaptation or training method is one file with one class behind this base.

A method owns the loss and the parameter choice; it does no I/O and no tracking. The engine
(`medda.engine.loop`) draws batches, runs `step` under autocast, back-propagates, steps the optimiser,
calls `after_step`, and hands `StepResult.logs` to tracking.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from medda.errors import MeddaError


class MethodConfig(BaseModel):
    """Base for a method's typed options; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class MethodContext:
    """What a method may know about the run, never the data itself.

    Attributes:
        num_classes: number of output channels K (background included).
        spatial_dims: 2 or 3.
        patch_size: spatial size of training patches/slices, e.g. (H, W) or (H, W, D).
        total_iterations: the run's iteration budget (for schedules and ramps).
        class_ratio_prior: (K,) expected class proportions summing to 1, or None if no prior is known.
        seed: random seed for the method's own random draws.
    """

    num_classes: int
    spatial_dims: int
    patch_size: tuple[int, ...]
    total_iterations: int
    class_ratio_prior: torch.Tensor | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class StepResult:
    """The outcome of one step: a scalar loss to back-propagate (None for gradient-free methods) and scalar logs."""

    loss: torch.Tensor | None
    logs: dict[str, float] = field(default_factory=dict)


class Method(ABC):
    """Base class of all methods.

    Class attributes:
        name: registry name (`medda.registry`).
        Config: the typed options class.
        streams: which batches `step` needs: "labeled" ({"image", "label"}) and/or "unlabeled" ({"image"}).
            Source-free adaptation reads only "unlabeled" target batches built by the unlabelled chain.
        reads_target_labels: True only for methods that are not source-free w.r.t. target labels.
        requires_batchnorm: refuse models without BatchNorm layers.
        one_pass: the engine runs one epoch over the stream instead of `total_iterations`.
        paired_batches: the "unlabeled" batch must have as many volumes as the "labeled" one.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    streams: ClassVar[tuple[str, ...]] = ("unlabeled",)
    reads_target_labels: ClassVar[bool] = False
    requires_batchnorm: ClassVar[bool] = False
    # Gradient-free statistic estimators (AdaBN) make exactly one pass over the data instead of a budget.
    one_pass: ClassVar[bool] = False
    # Methods that mix each labelled image with one unlabelled image (BCP) need batches of equal size.
    paired_batches: ClassVar[bool] = False

    def __init__(self, model: nn.Module, config: MethodConfig, context: MethodContext):
        if self.requires_batchnorm and not batchnorm_layers(model):
            raise MeddaError(
                f"method '{self.name}' adapts batch-norm layers, but the model has none: "
                "build it with model.norm=batch"
            )
        self.model = model
        self.config = config
        self.context = context

    def configure(self) -> list[nn.Parameter]:
        """Set train/eval modes and requires_grad; return the parameters to optimise (empty: no optimiser)."""
        self.model.train()
        return [p for p in self.model.parameters() if p.requires_grad]

    @abstractmethod
    def step(self, batch: dict[str, dict[str, torch.Tensor]], iteration: int) -> StepResult:
        """Compute the loss for one iteration. `batch[stream]` holds tensors shaped (B, C, *spatial)."""

    def after_step(self, iteration: int) -> None:  # noqa: B027 (optional hook)
        """Called after the optimiser step (EMA updates, statistic schedules)."""

    def phase(self, iteration: int) -> int:
        """Training phase at `iteration` (e.g. BCP: 1 pre-training, 2 self-training); one phase by default."""
        return 1

    def start_phase(self, phase: int, best_state: dict | None) -> None:  # noqa: B027 (optional hook)
        """Called before the first step of a new phase with the best validated weights of the previous one."""

    def finalize(self) -> None:  # noqa: B027 (optional hook)
        """Called once after the last step (e.g. AdaBN's source/target statistic mixing)."""

    def reset(self) -> None:  # noqa: B027 (optional hook)
        """Restore the model state taken at `configure` (episodic methods).

        When `getattr(method.config, "episodic", False)` is True the engine calls `reset()` and
        resets the optimiser state (fresh optimiser or its initial state_dict) before every batch.
        """

    def eval_model(self) -> nn.Module:
        """The network to validate, checkpoint and predict with."""
        return self.model

    def state_dict(self) -> dict:
        """Extra state to checkpoint besides the model (e.g. a teacher)."""
        return {}


BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """All batch-norm layers of `model` (1d/2d/3d/sync), in module order."""
    return [m for m in model.modules() if isinstance(m, BN_TYPES)]


def softmax_entropy(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over batch and pixels of -sum_k w_k p_k log p_k, computed in float32.

    Args:
        logits: (B, K, *spatial).
        weights: optional (K,) class weights (AdaMI's nu); None means all ones.
    """
    logp = torch.log_softmax(logits.float(), dim=1)
    plogp = logp.exp() * logp
    if weights is not None:
        plogp = plogp * weights.to(plogp).view(1, -1, *([1] * (logits.ndim - 2)))
    return -plogp.sum(dim=1).mean()


def freeze_all(model: nn.Module) -> None:
    """Turn off gradients for every parameter of `model`."""
    for p in model.parameters():
        p.requires_grad_(False)


def bn_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The batch-norm weight (gamma) and bias (beta) parameters of `model`, in module order."""
    params: list[nn.Parameter] = []
    for bn in batchnorm_layers(model):
        params += [p for p in (bn.weight, bn.bias) if p is not None]
    return params


@torch.no_grad()
def prediction_logs(logits: torch.Tensor) -> dict[str, float]:
    """Label-free monitoring scalars: mean softmax entropy and mean predicted class ratios "ratio/<k>"."""
    probs = torch.softmax(logits.detach().float(), dim=1)
    logs = {"entropy": float(softmax_entropy(logits.detach()))}
    ratios = probs.flatten(2).mean(dim=(0, 2))
    logs.update({f"ratio/{k}": float(r) for k, r in enumerate(ratios)})
    return logs
