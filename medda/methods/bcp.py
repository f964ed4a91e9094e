"""Bidirectional Copy-Paste (BCP; Bai, Chen, Li, Shen, Wang, CVPR 2023), 2D and 3D from one code path.

Specification: docs/methods.md section 3. Summary of what this file does.

Mask. Each iteration draws ONE cuboid of size floor(beta * n) on every spatial axis n of the actual tensor,
with its corner uniform in [0, n - floor(beta * n)) (the reference's range: the last fitting position is
never drawn); M is 1 outside and 0 inside, shared by the whole batch and broadcast over channels. The draw
uses a torch.Generator seeded from `context.seed`.

Stage 1 (iterations [0, pretrain_iterations)): copy-paste among labelled images. The labelled batch is
split into halves a / b: X = X_a*M + X_b*(1-M), and the loss is
  pretrain_loss="mixed" (ACDC): Seg(Q; Y_a | M) + Seg(Q; Y_b | 1-M)
  pretrain_loss="plain" (LA):   Seg(Q; Y_a*M + Y_b*(1-M) | everywhere)
  pretrain_loss="unmixed" (a medda option, not in the reference): no copy-paste in stage 1,
                                Seg(Q; Y | everywhere) on the whole labelled batch, as the supervised baseline
The unlabelled batch is ignored.

Stage 2 (iterations [pretrain_iterations, total_iterations)): self-training with an EMA teacher.
  - pseudo-labels: teacher (no_grad, mode `teacher_mode`) on X_u^a and X_u^b separately, argmax, then
    the largest connected component per sample and per foreground class (`lcc`, `connectivity`); in 2D
    a sample is a slice, in 3D a volume.
  - inward  X_in  = X_l^a*M + X_u^a*(1-M);  L_in  = Seg(Q_in;  Y_l^a | M) + alpha*Seg(Q_in;  Yhat_u^a | 1-M)
  - outward X_out = X_u^b*M + X_l^b*(1-M);  L_out = alpha*Seg(Q_out; Yhat_u^b | M) + Seg(Q_out; Y_l^b | 1-M)
  - L = L_in + L_out, back-propagated into the student only; the teacher follows by EMA in `after_step`.
  - `pseudo_confidence` (a medda option, None = the reference): the pseudo-labelled regions shrink to the voxels
    whose teacher probability of their final pseudo-label reaches the threshold: (1-M)*K_a and M*K_b.
  - `supervised_weight` w (a medda option, 0 = the reference): L += w * Seg(Q(X_l); Y_l | everywhere), the
    supervised baseline's loss on the unmixed labelled batch, so the student keeps seeing whole labelled images
    (one more student forward per step).
  - `distribution_alignment` (a medda option, off = the reference; Berthelot et al., ReMixMatch, ICLR 2020):
    the teacher's probabilities P are replaced by normalise(P * r_l / r_t) before the argmax, r_l the mean
    class ratios of the labelled targets and r_t the mean of the teacher's probabilities over the unlabelled
    voxels, each averaged over the last `alignment_window` stage-2 steps (this step included): the pseudo-labels'
    class ratios are pulled towards the labelled ones (under torchrun each process averages its own batches).
Seg(Q; Y | R) = (CE_R + Dice_R) / 2, CE_R = sum_R CE / |R| (|R| counted over the batch), Dice_R the soft Dice
over all classes (background included) restricted to R, in one of two forms (`dice_variant`):
  "pooled_squared" (ACDC): per class, pooled over the batch, 1 - (2 sum p y r + s) / (sum p^2 r + sum y^2 r + s),
                           s = 1e-10, averaged over classes;
  "per_sample_linear" (LA): per sample and class, 1 - (2 sum p y r + s) / (sum p r + sum y r + s), s = 1e-5,
                           averaged over samples and classes.
`legacy_bg_mask=True` reproduces the ACDC bug fixed upstream in a925e30 (issue #25): the BACKGROUND class's
Dice ignores R and uses the whole image; foreground classes and CE are restricted to R as usual.

Stage switch. As in the reference, the best stage-1 checkpoint (by validation Dice) initialises both student
and teacher: the engine (`medda.engine.loop`) calls `start_phase(2, best_state)` -> `load_pretrain_best` before
the first stage-2 step (the optimiser state carries on, as on ACDC), then restarts model selection, so the
selected checkpoint is always a stage-2 student. Without any stage-1 validation the teacher is initialised from
the current student (weights and buffers) at the first stage-2 step.

Defaults left at None resolve per dimensionality to the reference recipe: 2D = ACDC (ema_scope "state_dict",
dice_variant "pooled_squared", pretrain_loss "mixed"), 3D = LA (ema_scope "params", dice_variant
"per_sample_linear", pretrain_loss "plain"). The teacher runs in train mode by default (a reference quirk:
batch statistics, dropout on, BN running statistics updated by its own forwards); "eval" is the alternative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from medda.components import largest_component
from medda.errors import MeddaError
from medda.methods.base import Method, MethodConfig, StepResult, plain_network
from medda.methods.ema import ema_update, make_teacher
from medda.methods.losses import as_label

DiceVariant = Literal["pooled_squared", "per_sample_linear"]
DICE_SMOOTH = {"pooled_squared": 1e-10, "per_sample_linear": 1e-5}
_CE_EPS = 1e-16


class BCPConfig(MethodConfig):
    pretrain_iterations: int | None = Field(
        None, ge=0, description="stage-1 length; None = a quarter of total_iterations (ACDC: 10k of 40k)"
    )
    beta: float = Field(2.0 / 3.0, gt=0.0, le=1.0, description="cuboid edge ratio per spatial axis")
    u_weight: float = Field(0.5, ge=0.0, description="alpha, the weight of pseudo-labelled regions")
    ema_decay: float = Field(
        0.99, ge=0.0, le=1.0, description="teacher EMA decay (stage 2); 1.0 keeps the stage-1 model as a fixed teacher"
    )
    ema_scope: Literal["params", "state_dict"] | None = Field(
        None, description="None: 2D state_dict, 3D params"
    )
    teacher_mode: Literal["train", "eval"] = Field(
        "train", description="mode of the teacher when pseudo-labelling (reference: train, i.e. batch statistics)"
    )
    dice_variant: DiceVariant | None = Field(
        None, description="None: 2D pooled_squared, 3D per_sample_linear"
    )
    dice_smooth: float | None = Field(None, gt=0.0, description="None: 1e-10 pooled_squared, 1e-5 per_sample")
    legacy_bg_mask: bool = Field(False, description="reproduce the pre-a925e30 background-Dice mask bug")
    pretrain_loss: Literal["mixed", "plain", "unmixed"] | None = Field(
        None, description="None: 2D mixed, 3D plain; 'unmixed' (medda option): stage 1 trains on the unmixed "
        "labelled batch, as the supervised baseline"
    )
    lcc: bool = Field(True, description="keep the largest connected component of each pseudo-label class")
    connectivity: int | None = Field(
        None, ge=1, le=3, description="scipy/skimage connectivity for the LCC; None = full (spatial_dims)"
    )
    pseudo_confidence: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="medda option, not in the reference: leave pseudo-labelled voxels whose teacher probability "
        "of their (post-LCC) pseudo-label is below this out of the loss; None = every voxel (reference)",
    )
    supervised_weight: float = Field(
        0.0,
        ge=0.0,
        description="medda option, not in the reference: stage 2 adds this times the supervised loss on the "
        "unmixed labelled batch; 0 = the reference (labelled images are seen only inside the mixes)",
    )
    distribution_alignment: bool = Field(
        False,
        description="medda option, not in the reference (ReMixMatch's distribution alignment): before the argmax, "
        "the teacher's class probabilities are multiplied by the labelled batches' class ratios over the teacher's "
        "mean predicted ratios on the unlabelled batches (both averaged over the last `alignment_window` stage-2 "
        "steps) and renormalised; False = the reference",
    )
    alignment_window: int = Field(128, ge=1, description="steps averaged by `distribution_alignment`")


# ---------------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------------


def cuboid_mask(
    spatial_shape: Sequence[int], beta: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
    """One zero cuboid in a field of ones.

    Returns:
        mask: float32 CPU tensor of shape `spatial_shape`, 0 inside the cuboid and 1 outside.
        box: per axis (start, stop) of the cuboid, stop - start == floor(beta * n).
    """
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must lie in (0, 1], got {beta}")
    mask = torch.ones(tuple(int(n) for n in spatial_shape), dtype=torch.float32)
    box = []
    for n in mask.shape:
        size = math.floor(beta * n)
        high = max(n - size, 1)  # corner ~ U[0, n - size); the whole axis when size == n
        start = int(torch.randint(0, high, (1,), generator=generator).item())
        box.append((start, start + size))
    mask[tuple(slice(a, b) for a, b in box)] = 0.0
    return mask, tuple(box)


def copy_paste(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a*M + b*(1-M) for a binary M, exact for integer tensors (dtype of `a` kept).

    `mask` has the spatial shape (or any shape broadcastable to `a`); it is aligned to the trailing axes.
    """
    if a.shape != b.shape:
        raise ValueError(f"copy_paste needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.where(mask.to(a.device) > 0.5, a, b.to(a.dtype))


def _target(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B, 1, *S) or (B, *S) labels of any dtype -> (B, *S) long."""
    if target.ndim == logits.ndim:
        target = target[:, 0]
    return as_label(target)


def _region(region: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A region given as (*S), (B, *S) or (B, 1, *S) -> float (B, *S) on the logits' device."""
    spatial = logits.shape[2:]
    if region.ndim == logits.ndim:
        region = region[:, 0]
    region = region.to(device=logits.device, dtype=torch.float32)
    return region.expand(logits.shape[0], *spatial)


def _ce(log_prob: torch.Tensor, target: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """CE_R from log-softmax probabilities: F.cross_entropy is exactly nll_loss(log_softmax(.))."""
    ce = F.nll_loss(log_prob, target, reduction="none")
    return (ce * r).sum() / (r.sum() + _CE_EPS)


def _dice(
    prob: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    variant: DiceVariant,
    legacy_bg_mask: bool,
    smooth: float | None,
) -> torch.Tensor:
    """Dice_R from softmax probabilities (B, K, *S), long targets (B, *S) and the region (B, *S)."""
    # One-hot written straight into a float tensor of prob's layout (F.one_hot builds int64 and moves axes).
    onehot = torch.zeros_like(prob).scatter_(1, target.unsqueeze(1), 1.0)
    r = r.unsqueeze(1).expand_as(prob)
    if legacy_bg_mask:
        r = r.clone()
        r[:, 0] = 1.0
    s = DICE_SMOOTH[variant] if smooth is None else smooth
    # y is 0 or 1, so y * y * r == y * r and p * y * r == (p * r) * y exactly: the same sums with fewer products.
    pr = prob * r
    yr = onehot * r
    inter = pr * onehot
    if variant == "pooled_squared":
        dims = [0, *range(2, prob.ndim)]
        denom = (prob * prob * r).sum(dims) + yr.sum(dims)
        return (1.0 - (2.0 * inter.sum(dims) + s) / (denom + s)).mean()
    if variant == "per_sample_linear":
        dims = list(range(2, prob.ndim))
        denom = pr.sum(dims) + yr.sum(dims)
        return 1.0 - ((2.0 * inter.sum(dims) + s) / (denom + s)).mean()
    raise ValueError(f"unknown dice variant '{variant}'")


def masked_ce(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Voxel-wise CE summed over the region R and divided by |R| (both counted over the whole batch)."""
    return _ce(F.log_softmax(logits.float(), dim=1), _target(target, logits), _region(region, logits))


def masked_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    region: torch.Tensor,
    variant: DiceVariant = "pooled_squared",
    legacy_bg_mask: bool = False,
    smooth: float | None = None,
) -> torch.Tensor:
    """Soft Dice loss of softmax(logits) against `target`, restricted to R, averaged over all classes.

    See the module doc for the two variants. With `legacy_bg_mask` the background class uses the whole image.
    """
    prob = torch.softmax(logits.float(), dim=1)
    return _dice(prob, _target(target, logits), _region(region, logits), variant, legacy_bg_mask, smooth)


class _Probabilities:
    """softmax and log-softmax of one output, computed once for every Seg term on it."""

    def __init__(self, logits: torch.Tensor):
        logits32 = logits.float()
        self.logits = logits
        self.log_prob = F.log_softmax(logits32, dim=1)
        self.prob = torch.softmax(logits32, dim=1)

    def seg(self, target: torch.Tensor, region: torch.Tensor, variant: DiceVariant, legacy_bg_mask: bool,
            smooth: float | None) -> torch.Tensor:
        target = _target(target, self.logits)
        r = _region(region, self.logits)
        return 0.5 * (_ce(self.log_prob, target, r) + _dice(self.prob, target, r, variant, legacy_bg_mask, smooth))


def seg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    region: torch.Tensor,
    variant: DiceVariant = "pooled_squared",
    legacy_bg_mask: bool = False,
    smooth: float | None = None,
) -> torch.Tensor:
    """Seg(Q; Y | R) = (CE_R + Dice_R) / 2."""
    return _Probabilities(logits).seg(target, region, variant, legacy_bg_mask, smooth)


def mixed_seg_loss(
    logits: torch.Tensor,
    target_in_mask: torch.Tensor,
    target_out_mask: torch.Tensor,
    mask: torch.Tensor,
    weight_in_mask: float = 1.0,
    weight_out_mask: float = 1.0,
    variant: DiceVariant = "pooled_squared",
    legacy_bg_mask: bool = False,
    smooth: float | None = None,
    keep_in_mask: torch.Tensor | None = None,
    keep_out_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """w1 * Seg(Q; Y1 | M * K1) + w2 * Seg(Q; Y2 | (1 - M) * K2), with M = `mask` (1 outside the cuboid).

    Y1 supervises where M = 1 (the image that was copied as background), Y2 where M = 0 (the pasted patch).
    K1/K2 (`keep_in_mask`/`keep_out_mask`, (B, *S), default everywhere) narrow a term to the voxels kept, e.g.
    the confident pseudo-labels. Both terms share one softmax and one log-softmax of Q.
    """
    q = _Probabilities(logits)
    opts = dict(variant=variant, legacy_bg_mask=legacy_bg_mask, smooth=smooth)
    region_in = mask if keep_in_mask is None else mask * keep_in_mask
    region_out = 1.0 - mask if keep_out_mask is None else (1.0 - mask) * keep_out_mask
    return weight_in_mask * q.seg(target_in_mask, region_in, **opts) + weight_out_mask * q.seg(
        target_out_mask, region_out, **opts
    )


# ---------------------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------------------


class BCP(Method):
    """BCP: copy-paste pre-training on labelled images, then EMA-teacher self-training with bidirectional mixing."""

    name: ClassVar[str] = "bcp"
    task: ClassVar[str] = "training"
    Config: ClassVar[type[MethodConfig]] = BCPConfig
    paired_batches: ClassVar[bool] = True
    streams: ClassVar[tuple[str, ...]] = ("labeled", "unlabeled")
    reads_target_labels: ClassVar[bool] = True

    config: BCPConfig

    def __init__(self, model, config, context):
        super().__init__(model, config, context)
        three_d = context.spatial_dims == 3
        self.ema_scope = config.ema_scope or ("params" if three_d else "state_dict")
        self.dice_variant: DiceVariant = config.dice_variant or (
            "per_sample_linear" if three_d else "pooled_squared"
        )
        self.pretrain_loss = config.pretrain_loss or ("plain" if three_d else "mixed")
        total = context.total_iterations
        self.pretrain_iterations = (
            round(total / 4) if config.pretrain_iterations is None else config.pretrain_iterations
        )
        if self.pretrain_iterations > total:
            raise MeddaError(
                f"bcp: pretrain_iterations ({self.pretrain_iterations}) exceeds total_iterations ({total})"
            )
        if config.connectivity is not None and config.connectivity > context.spatial_dims:
            raise MeddaError(
                f"bcp: connectivity {config.connectivity} exceeds spatial_dims {context.spatial_dims}"
            )
        self.teacher = make_teacher(model)
        self._teacher_ready = False
        self.generator = torch.Generator()
        self.generator.manual_seed(context.seed)
        self.last_box: tuple[tuple[int, int], ...] | None = None
        # per stage-2 step, the labelled class ratios and the teacher's mean probabilities (distribution_alignment)
        self.labeled_ratios: list[torch.Tensor] = []
        self.teacher_ratios: list[torch.Tensor] = []
        self.alignment_factor: torch.Tensor | None = None

    # -- schedule -----------------------------------------------------------------------------------------

    def stage(self, iteration: int) -> int:
        """1 during copy-paste pre-training, 2 during self-training (iterations are 0-based)."""
        return 1 if iteration < self.pretrain_iterations else 2

    def phase(self, iteration: int) -> int:
        return self.stage(iteration)

    def start_phase(self, phase: int, best_state: dict | None) -> None:
        """Self-training starts from the best pre-training checkpoint (by validation Dice) when there is one."""
        if phase == 2 and best_state is not None:
            self.load_pretrain_best(best_state)

    def load_pretrain_best(self, state_dict: dict) -> None:
        """Load the chosen stage-1 weights into the student AND the teacher (call before the first stage-2 step)."""
        self.model.load_state_dict(state_dict)
        self.teacher.load_state_dict(state_dict)
        self._teacher_ready = True

    def _start_teacher(self) -> None:
        self.teacher.load_state_dict(plain_network(self.model).state_dict())
        self._teacher_ready = True

    # -- helpers ------------------------------------------------------------------------------------------

    def _loss_opts(self) -> dict:
        return dict(
            variant=self.dice_variant,
            legacy_bg_mask=self.config.legacy_bg_mask,
            smooth=self.config.dice_smooth,
        )

    def _draw_mask(self, x: torch.Tensor) -> torch.Tensor:
        mask, self.last_box = cuboid_mask(x.shape[2:], self.config.beta, self.generator)
        return mask.to(x.device)

    @staticmethod
    def _halves(x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        if n < 2 or n % 2:
            raise MeddaError(
                f"bcp splits each batch into halves a/b: the {what} batch size must be even, got {n}"
            )
        return x[: n // 2], x[n // 2 :]

    @torch.no_grad()
    def _pseudo_labels(
        self, halves: tuple[torch.Tensor, ...], y_l: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per unlabelled half, the teacher's pseudo-label (B, *S) and, with `pseudo_confidence`, the float mask of
        the voxels kept. With `distribution_alignment` the probabilities are aligned first (module doc)."""
        self.teacher.train(self.config.teacher_mode == "train")
        logits = [self.teacher(x).float() for x in halves]
        align = self.config.distribution_alignment
        if align or self.config.pseudo_confidence is not None:
            probs = [torch.softmax(z, dim=1) for z in logits]
            probs = self._align(probs, y_l) if align else probs
        else:  # the reference: the argmax of the logits, no probabilities needed
            probs = [None] * len(logits)
        labels = []
        for z, prob in zip(logits, probs, strict=True):
            pred = torch.argmax(prob if align else z, dim=1)
            if self.config.lcc:
                pred = largest_component(pred, self.context.spatial_dims, self.config.connectivity)
            if self.config.pseudo_confidence is None:
                labels.append((pred, None))
                continue
            # the probability of the final label: a voxel that the LCC turned into background keeps only if the
            # teacher itself was confident it is background
            kept = prob.gather(1, pred.unsqueeze(1)).squeeze(1)
            labels.append((pred, (kept >= self.config.pseudo_confidence).float()))
        return labels

    def _align(self, probs: list[torch.Tensor], y_l: torch.Tensor) -> list[torch.Tensor]:
        """normalise(P * r_l / r_t) with both ratios averaged over the last `alignment_window` steps."""
        n_classes = probs[0].shape[1]
        window = self.config.alignment_window
        labeled = torch.bincount(y_l.flatten(), minlength=n_classes)[:n_classes].float().cpu()
        self.labeled_ratios = [*self.labeled_ratios, labeled / labeled.sum()][-window:]
        teacher = torch.cat(probs).mean(dim=[0, *range(2, probs[0].ndim)]).cpu()  # over every unlabelled voxel
        self.teacher_ratios = [*self.teacher_ratios, teacher][-window:]
        r_l = torch.stack(self.labeled_ratios).mean(dim=0)
        r_t = torch.stack(self.teacher_ratios).mean(dim=0)
        # a class the teacher never predicts keeps factor 1 rather than an infinite one
        factor = torch.where(r_t > 0, r_l / r_t.clamp_min(1e-12), torch.ones_like(r_l))
        self.alignment_factor = factor
        shape = (1, n_classes) + (1,) * (probs[0].ndim - 2)
        factor = factor.to(probs[0].device).view(shape)
        return [(p * factor) / (p * factor).sum(dim=1, keepdim=True).clamp_min(1e-12) for p in probs]

    # -- step ---------------------------------------------------------------------------------------------

    def step(self, batch, iteration: int) -> StepResult:
        x_l = batch["labeled"]["image"]
        y_l = _target(batch["labeled"]["label"], x_l)
        xa, xb = self._halves(x_l, "labeled")
        ya, yb = self._halves(y_l, "labeled")
        mask = self._draw_mask(x_l)
        opts = self._loss_opts()

        if self.stage(iteration) == 1:
            if self.pretrain_loss == "unmixed":
                loss = seg_loss(self.model(x_l), y_l, torch.ones_like(mask), **opts)
                return StepResult(loss=loss, logs={"loss": float(loss.detach()), "stage": 1.0})
            q = self.model(copy_paste(xa, xb, mask))
            if self.pretrain_loss == "mixed":
                loss = mixed_seg_loss(q, ya, yb, mask, 1.0, 1.0, **opts)
            else:
                loss = seg_loss(q, copy_paste(ya, yb, mask), torch.ones_like(mask), **opts)
            return StepResult(loss=loss, logs={"loss": float(loss.detach()), "stage": 1.0})

        if "unlabeled" not in batch:
            raise MeddaError(
                "bcp self-training (stage 2) needs an 'unlabeled' batch next to the 'labeled' one"
            )
        x_u = batch["unlabeled"]["image"]
        if x_u.shape != x_l.shape:
            raise MeddaError(
                f"bcp pairs labelled and unlabelled halves: the batches must have the same shape, got "
                f"{tuple(x_l.shape)} (labeled) and {tuple(x_u.shape)} (unlabeled)"
            )
        ua, ub = self._halves(x_u, "unlabeled")

        if not self._teacher_ready:
            self._start_teacher()
        p = next(self.teacher.parameters(), None)
        if p is not None and p.device != x_u.device:
            self.teacher.to(x_u.device)
        (plab_a, keep_a), (plab_b, keep_b) = self._pseudo_labels((ua, ub), y_l)

        alpha = self.config.u_weight
        q_in = self.model(copy_paste(xa, ua, mask))
        q_out = self.model(copy_paste(ub, xb, mask))
        loss_in = mixed_seg_loss(q_in, ya, plab_a, mask, 1.0, alpha, **opts, keep_out_mask=keep_a)
        loss_out = mixed_seg_loss(q_out, plab_b, yb, mask, alpha, 1.0, **opts, keep_in_mask=keep_b)
        loss = loss_in + loss_out
        logs: dict[str, float] = {}
        if self.config.supervised_weight > 0:
            loss_sup = seg_loss(self.model(x_l), y_l, torch.ones_like(mask), **opts)
            loss = loss + self.config.supervised_weight * loss_sup
            logs["loss_sup"] = float(loss_sup.detach())
        fg = 0.5 * ((plab_a > 0).float().mean() + (plab_b > 0).float().mean())
        logs |= {
            "loss": float(loss.detach()),
            "loss_in": float(loss_in.detach()),
            "loss_out": float(loss_out.detach()),
            "stage": 2.0,
            "pseudo_fg_ratio": float(fg),
        }
        if self.alignment_factor is not None:
            logs |= {f"alignment_factor/{c}": float(f) for c, f in enumerate(self.alignment_factor)}
        if keep_a is not None and keep_b is not None:
            logs["pseudo_kept_ratio"] = float(0.5 * (keep_a.mean() + keep_b.mean()))
        return StepResult(loss=loss, logs=logs)

    def after_step(self, iteration: int) -> None:
        if self.stage(iteration) == 2 and self._teacher_ready:
            ema_update(self.teacher, self.model, self.config.ema_decay, self.ema_scope)

    def eval_model(self):
        return self.model

    def state_dict(self) -> dict:
        return {**super().state_dict(), "teacher": self.teacher.state_dict(), "teacher_ready": self._teacher_ready,
                "labeled_ratios": list(self.labeled_ratios), "teacher_ratios": list(self.teacher_ratios)}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output (resume)."""
        super().load_state_dict(state)
        self.teacher.load_state_dict(state["teacher"])
        self._teacher_ready = bool(state["teacher_ready"])
        self.labeled_ratios = list(state.get("labeled_ratios", []))
        self.teacher_ratios = list(state.get("teacher_ratios", []))
