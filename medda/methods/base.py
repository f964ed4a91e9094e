"""The method interface: every adaptation or training method is one file with one class behind this base.

A method owns the loss and the parameter choice; it does no I/O and no tracking. The engine
(`medda.engine.loop`) draws batches, runs `step` under autocast, back-propagates, steps the optimiser,
calls `after_step`, and hands `StepResult.logs` to tracking.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal, get_args

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
        class_ratio_prior: (K,) expected class proportions in a training image (2D slice or 3D patch, in the
            training geometry) that contains the class, summing to 1; None if no prior is known.
        class_presence: (K,) fraction of training images that contain each class (None: always present).
        seed: random seed for the method's own random draws.
    """

    num_classes: int
    spatial_dims: int
    patch_size: tuple[int, ...]
    total_iterations: int
    class_ratio_prior: torch.Tensor | None = None
    class_presence: torch.Tensor | None = None
    seed: int = 0


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
        default_optim: the method's reference optimiser recipe; it fills every `optim` field the run config does
            not set, so that a user who picks a method gets the method (docs/methods.md).
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
    default_optim: ClassVar[dict] = {}
    # "adaptation": runs under `medda adapt` from a source model; "training": `medda train` / `train-ssl`.
    task: ClassVar[str] = "adaptation"

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

    def eval_model(self) -> nn.Module:
        """The network to validate, checkpoint and predict with."""
        return self.model

    def state_dict(self) -> dict:
        """What the method keeps besides `self.model`'s weights (which the loop saves), to resume a run exactly.

        Plain tensors, numbers, strings, lists and dicts only: resume states load with weights_only=True. By default
        the state of every `torch.Generator` attribute, so that the method's random draws continue where they
        stopped; a method that keeps more (an EMA teacher, a phase flag) extends it.
        """
        return {f"generator.{name}": g.get_state() for name, g in vars(self).items() if isinstance(g, torch.Generator)}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output (resume); called after `configure()` and the model's weights."""
        for name, g in vars(self).items():
            if isinstance(g, torch.Generator) and f"generator.{name}" in state:
                g.set_state(state[f"generator.{name}"])


BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def plain_network(model: nn.Module) -> nn.Module:
    """The network itself, inside the wrappers the training loop may put around it during a step (DDP under
    torchrun, torch.compile with `train.compile`): what to copy weights from."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """All batch-norm layers of `model` (1d/2d/3d/sync), in module order."""
    return [m for m in model.modules() if isinstance(m, BN_TYPES)]


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


TrainableScope = Literal["all", "bn_affine", "bn_affine_batch_stats", "all_but_head"]


def trainable_parameters(model: nn.Module, scope: TrainableScope, method: str, num_classes: int = 0) -> list[nn.Parameter]:
    """Put `model` in train mode, freeze everything outside `scope` and return the parameters to optimise.

    Scopes (docs/methods.md, "What trains"):
        all: every parameter; BN normalises with batch statistics and keeps updating its running statistics
            (AdaMI's reference code, fine-tuning).
        bn_affine: only BN gamma/beta; BN running statistics keep updating (as `all`) and are used in eval mode.
        bn_affine_batch_stats: only BN gamma/beta, and BN drops its running statistics so that it normalises with
            the current batch statistics in train and eval mode (Tent; the AdaMI authors' later test-time code).
        all_but_head: every parameter except the classifier head (the convolutions that output `num_classes`
            channels), which stays the source hypothesis (SHOT).
    """
    model.train()
    freeze_all(model)
    if scope in ("all", "all_but_head"):
        params = [p for p in model.parameters()]
        if scope == "all_but_head":
            head = {id(p) for p in head_parameters(model, num_classes)}
            if not head:
                raise MeddaError(f"method '{method}' freezes the classifier head, but no convolution of the model "
                                 f"outputs its {num_classes} classes")
            params = [p for p in params if id(p) not in head]
    elif scope in ("bn_affine", "bn_affine_batch_stats"):
        params = bn_affine_parameters(model)
        if not params:
            raise MeddaError(f"method '{method}' trains the batch-norm affine parameters, but the model has no "
                             "batch-norm layer with affine parameters (build it with model.norm=batch)")
        if scope == "bn_affine_batch_stats":
            for bn in batchnorm_layers(model):
                bn.track_running_stats = False
                bn.running_mean = None
                bn.running_var = None
    else:
        raise MeddaError(f"trainable scope '{scope}' is unknown; expected one of {', '.join(get_args(TrainableScope))}")
    for p in params:
        p.requires_grad_(True)
    return params


def head_parameters(model: nn.Module, num_classes: int) -> list[nn.Parameter]:
    """Parameters of the convolutions that output the `num_classes` logits (the classifier head)."""
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return [p for m in model.modules() if isinstance(m, convs) and m.out_channels == num_classes
            for p in m.parameters()]
