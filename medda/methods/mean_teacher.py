"""Mean teacher (Tarvainen & Valpola, NeurIPS 2017), in the SSL4MIS recipe.

Per iteration, with a labelled batch (x_l, y_l) and an unlabelled batch x_u:

    L = Sup(f_s(x_l), y_l) + w(t) * mean((softmax f_s(x_u) - softmax f_t(x_u + n))^2)

- Sup is the supervised (Dice + CE)/2 of `medda.methods.supervised` (MONAI DiceCELoss).
- n = clip(N(0, noise_std^2), -noise_clip, noise_clip) is added to the teacher's input only.
- The teacher f_t is an EMA of the student, updated after each optimiser step (`after_step`), under no_grad.
- Consistency weight, sigmoid ramp-up (Laine & Aila 2017):
  w(t) = consistency * exp(-5 (1 - min(t, T)/T)^2), T = ramp_iterations, w = consistency when T = 0.

Defaults follow SSL4MIS `train_mean_teacher_{2D,3D}.py`: consistency 0.1, EMA decay 0.99 over parameters only
with the "true average" warm-up decay_t = min(1 - 1/(t+1), decay), teacher in train mode, noise 0.1 clipped
at 0.2. SSL4MIS ramps over `consistency_rampup = 200` "epochs" of 150 iterations = 30,000 iterations, which
is its whole `max_iterations = 30000` budget; so the default T is the run's `total_iterations` (a continuous
ramp instead of the 150-iteration staircase). SSL4MIS's 2D script also zeroes the consistency term for the
first 1000 iterations (`consistency_start_iteration`, default 0 as in its 3D script).

The student is evaluated and saved (`eval_model`); the teacher is extra state (`state_dict`).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field

from medda.errors import MeddaError
from medda.methods.base import Method, MethodConfig, StepResult
from medda.methods.ema import ema_update, make_teacher
from medda.methods.losses import as_label, dice_ce_loss


class MeanTeacherConfig(MethodConfig):
    consistency: float = Field(0.1, ge=0.0, description="w_max, the ramped-up consistency weight")
    ramp_iterations: int | None = Field(
        None, ge=0, description="T of the sigmoid ramp-up; None = the run's total_iterations (SSL4MIS)"
    )
    consistency_start_iteration: int = Field(0, ge=0, description="consistency is 0 before this iteration")
    ema_decay: float = Field(0.99, ge=0.0, le=1.0, description="teacher = decay * teacher + (1 - decay) * student")
    ema_scope: Literal["params", "state_dict"] = Field(
        "params", description="EMA over parameters only (SSL4MIS; teacher BN keeps its own statistics) or the whole state"
    )
    ema_warmup: bool = Field(True, description="use min(1 - 1/(t+1), decay) as in SSL4MIS")
    noise_std: float = Field(0.1, ge=0.0, description="std of the Gaussian noise added to the teacher input")
    noise_clip: float = Field(0.2, ge=0.0, description="the noise is clipped to +-noise_clip")
    teacher_mode: Literal["train", "eval"] = Field(
        "train", description="'train' as SSL4MIS (batch statistics); 'eval' pairs with ema_scope=state_dict"
    )


def sigmoid_rampup(t: float, length: float) -> float:
    """exp(-5 (1 - t/length)^2) for t in [0, length], 1 beyond; 1 when length is 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(t, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


class MeanTeacher(Method):
    """Mean teacher: supervised (CE + Dice)/2 + ramped MSE consistency to an EMA teacher on noisy inputs."""

    name: ClassVar[str] = "mean_teacher"
    task: ClassVar[str] = "training"
    Config: ClassVar[type[MethodConfig]] = MeanTeacherConfig
    streams: ClassVar[tuple[str, ...]] = ("labeled", "unlabeled")
    reads_target_labels: ClassVar[bool] = True

    config: MeanTeacherConfig

    def __init__(self, model, config, context):
        super().__init__(model, config, context)
        self.teacher = make_teacher(model)
        self.loss_fn = dice_ce_loss()
        self.ramp_iterations = (
            context.total_iterations if config.ramp_iterations is None else config.ramp_iterations
        )
        self._noise_gen: torch.Generator | None = None

    def consistency_weight(self, iteration: int) -> float:
        if iteration < self.config.consistency_start_iteration:
            return 0.0
        return self.config.consistency * sigmoid_rampup(iteration, self.ramp_iterations)

    def _sync_teacher(self, device: torch.device) -> None:
        p = next(self.teacher.parameters(), None)
        if p is not None and p.device != device:
            self.teacher.to(device)
        self.teacher.train(self.config.teacher_mode == "train")

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.noise_std == 0:
            return torch.zeros_like(x)
        if self._noise_gen is None or self._noise_gen.device != x.device:
            self._noise_gen = torch.Generator(device=x.device)
            self._noise_gen.manual_seed(self.context.seed)
        n = torch.randn(x.shape, generator=self._noise_gen, device=x.device, dtype=x.dtype)
        return (n * self.config.noise_std).clamp(-self.config.noise_clip, self.config.noise_clip)

    def step(self, batch, iteration: int) -> StepResult:
        if "unlabeled" not in batch:
            raise MeddaError("mean_teacher needs an 'unlabeled' batch next to the 'labeled' one")
        x_l = batch["labeled"]["image"]
        y_l = as_label(batch["labeled"]["label"])
        x_u = batch["unlabeled"]["image"]
        self._sync_teacher(x_u.device)

        n_l = x_l.shape[0]
        if x_l.shape[1:] == x_u.shape[1:]:
            # one forward, as SSL4MIS: BN statistics over the labelled and unlabelled images together
            logits = self.model(torch.cat([x_l, x_u], dim=0))
            logits_l, logits_u = logits[:n_l], logits[n_l:]
        else:
            logits_l, logits_u = self.model(x_l), self.model(x_u)
        with torch.no_grad():
            teacher_prob = torch.softmax(self.teacher(x_u + self._noise(x_u)).float(), dim=1)

        sup = self.loss_fn(logits_l.float(), y_l)
        cons = torch.mean((torch.softmax(logits_u.float(), dim=1) - teacher_prob) ** 2)
        w = self.consistency_weight(iteration)
        loss = sup + w * cons
        return StepResult(
            loss=loss,
            logs={
                "loss": float(loss.detach()),
                "loss_sup": float(sup.detach()),
                "loss_cons": float(cons.detach()),
                "cons_weight": w,
            },
        )

    def after_step(self, iteration: int) -> None:
        decay = self.config.ema_decay
        if self.config.ema_warmup:
            decay = min(1.0 - 1.0 / (iteration + 1), decay)
        ema_update(self.teacher, self.model, decay, self.config.ema_scope)

    def eval_model(self):
        return self.model

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "teacher": self.teacher.state_dict()}
        if self._noise_gen is not None:  # created at the first step, on the batch's device
            state["noise_device"] = str(self._noise_gen.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the teacher and the noise generator from `state_dict()`'s output (resume)."""
        if "noise_device" in state:
            self._noise_gen = torch.Generator(device=state["noise_device"])
        super().load_state_dict(state)
        self.teacher.load_state_dict(state["teacher"])
