"""DPL: source-free adaptation by self-training on denoised pseudo-labels.

Chen, Liu, Jiang, Dou, Heng, "Source-Free Domain Adaptive Fundus Image Segmentation with Denoised
Pseudo-Labeling", MICCAI 2021 (arXiv 2109.09735); docs/methods.md section 5. The frozen source model labels the
target images; two denoising steps decide which pseudo-labelled pixels to train on; the adapted model is then
trained with a cross-entropy restricted to the kept pixels.

1. Pseudo-labels: T stochastic forward passes of the source model, its batch normalisation on the statistics of
   the target batch (the reference generates them with the network in train mode: batch statistics and dropout);
   the pseudo-label is the argmax of the mean softmax (the paper's binary tasks threshold a sigmoid at 0.75; `confidence_threshold` drops pixels whose mean
   top probability is lower, 0 keeps all, as the argmax of the binary case does at 0.5).
2. Pixel-level denoising: the uncertainty of a pixel is the standard deviation over the T passes of the
   temperature-scaled probability (softmax(logits / 2) in the reference) of its pseudo-label; pixels with
   uncertainty >= `uncertainty_threshold` (0.05) are dropped. The stochastic passes are Monte-Carlo dropout in the
   reference; `uncertainty="auto"` uses MC dropout when the network has dropout layers and otherwise passes that
   flip the image in-plane and add Gaussian noise (`augmentation_noise`), each un-flipped before averaging.
3. Class-level denoising: class prototypes are the centroids of the penultimate features (the input of the
   convolution that outputs the logits, averaged over the passes) of the confident pixels of each class, weighted by
   their probability, over the batch; a pixel is kept only if its nearest prototype (squared Euclidean distance) is
   the one of its pseudo-label.
4. Self-training: L = sum_p m_p CE(s_p, yhat_p) / sum_p m_p with m the product of both masks; the whole network
   trains (BN in train mode), as in the reference.

Pseudo-labels come from a frozen copy of the source model on each target batch as drawn, which equals the
reference's offline generation on unaugmented target images. Reference optimiser (the default): Adam lr 2e-3
(reference betas (0.9, 0.99); medda's Adam uses (0.9, 0.999)), no weight decay, 2 epochs of batches of 8.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medda.errors import MeddaError
from medda.methods.base import (
    Method,
    MethodConfig,
    MethodContext,
    StepResult,
    batchnorm_layers,
    freeze_all,
    trainable_parameters,
)
from medda.methods.losses import prediction_logs

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class Config(MethodConfig):
    passes: int = Field(10, ge=2, description="Stochastic forward passes for pseudo-labels and uncertainty (reference 10).")
    uncertainty: Literal["auto", "mc_dropout", "augmentation"] = Field(
        "auto",
        description="Source of the passes' randomness: 'mc_dropout' (reference; needs dropout layers), "
        "'augmentation' (in-plane flips + Gaussian noise), 'auto' (MC dropout if the network has dropout).",
    )
    uncertainty_threshold: float = Field(
        0.05, gt=0.0, description="Keep pixels whose pseudo-label probability varies less than this (std; reference 0.05)."
    )
    temperature: float = Field(2.0, gt=0.0, description="Softmax temperature of the uncertainty (reference 2).")
    confidence_threshold: float = Field(
        0.0, ge=0.0, lt=1.0, description="Drop pixels whose mean top probability is below this (0: keep all)."
    )
    prototypes: bool = Field(True, description="Class-level denoising by feature prototypes (the paper's second step).")
    augmentation_noise: float = Field(
        0.1, ge=0.0, description="'augmentation' passes: Gaussian noise std (images are z-scored)."
    )


def classifier_input_hook(model: nn.Module, num_classes: int, store: dict) -> torch.utils.hooks.RemovableHandle:
    """Record in store["features"] the input of the last convolution that outputs `num_classes` channels."""
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    heads = [m for m in model.modules() if isinstance(m, convs) and m.out_channels == num_classes]
    if not heads:
        raise MeddaError(f"method 'dpl' builds class prototypes from the features entering the classifier, but no "
                         f"convolution of the model outputs its {num_classes} classes (set prototypes=false)")
    return heads[-1].register_forward_hook(lambda _m, args, _out: store.__setitem__("features", args[0]))


def prototype_labels(features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, confident: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """The class of each pixel's nearest prototype: (B, F, *S) features -> (B, *S) class ids.

    Prototype k = sum_p f_p q_pk [yhat_p = k, confident_p] / sum_p q_pk [yhat_p = k, confident_p] over the batch,
    q the mean probabilities; classes without a confident pixel have no prototype.
    """
    feats = features.float().flatten(2)  # (B, F, P)
    weights = []
    for k in range(num_classes):
        weights.append((probs[:, k] * ((labels == k) & confident)).flatten(1))  # (B, P)
    w = torch.stack(weights, dim=1)  # (B, K, P)
    mass = w.sum(dim=(0, 2))  # (K,)
    centroids = torch.einsum("bkp,bfp->kf", w, feats) / mass.clamp_min(1e-12)[:, None]  # (K, F)
    dist = ((feats[:, None] - centroids[None, :, :, None]) ** 2).sum(dim=2)  # (B, K, P)
    dist[:, mass <= 0] = float("inf")
    return dist.argmin(dim=1).view(labels.shape)


class DPL(Method):
    """Self-training on source pseudo-labels denoised by pass-to-pass uncertainty and class prototypes."""

    name = "dpl"
    Config = Config
    default_optim = {"name": "adam", "lr": 2e-3, "weight_decay": 0.0, "schedule": "constant"}

    config: Config

    def __init__(self, model: nn.Module, config: MethodConfig, context: MethodContext):
        super().__init__(model, config, context)
        self.source = copy.deepcopy(model)
        freeze_all(self.source)
        for bn in batchnorm_layers(self.source):  # always the target batch's statistics, nothing to update
            bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
        self.mode = config.uncertainty
        has_dropout = any(isinstance(m, DROPOUT_TYPES) and m.p > 0 for m in self.source.modules())
        if self.mode == "auto":
            self.mode = "mc_dropout" if has_dropout else "augmentation"
        if self.mode == "mc_dropout" and not has_dropout:
            raise MeddaError("method 'dpl' with uncertainty=mc_dropout needs dropout layers in the network "
                             "(model.dropout > 0); use uncertainty=augmentation")
        self.generator = torch.Generator().manual_seed(context.seed)
        self.store: dict = {}
        self.hook = classifier_input_hook(self.source, context.num_classes, self.store) if config.prototypes else None

    def configure(self) -> list[nn.Parameter]:
        return trainable_parameters(self.model, "all", self.name)

    def _passes(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(probabilities (T, B, K, *S), tempered probabilities (T, B, K, *S), mean features (B, F, *S) or None)."""
        # Train mode as in the reference (BN on the target batch's statistics); dropout only in MC-dropout mode.
        self.source.to(image.device).train()
        if self.mode != "mc_dropout":
            for m in self.source.modules():
                if isinstance(m, DROPOUT_TYPES):
                    m.eval()
        inplane = [2, 3]
        probs, tempered, features = [], [], []
        for t in range(self.config.passes):
            dims = [inplane[i] for i in range(2) if self.mode == "augmentation" and (t >> i) & 1]
            x = torch.flip(image, dims) if dims else image
            if self.mode == "augmentation" and t > 0 and self.config.augmentation_noise > 0:
                noise = torch.randn(x.shape, generator=self.generator) * self.config.augmentation_noise
                x = x + noise.to(x)
            logits = self.source(x).float()
            logits = torch.flip(logits, dims) if dims else logits
            probs.append(torch.softmax(logits, dim=1))
            tempered.append(torch.softmax(logits / self.config.temperature, dim=1))
            if self.hook is not None:
                f = self.store.pop("features").float()
                features.append(torch.flip(f, dims) if dims else f)
        mean_features = torch.stack(features).mean(dim=0) if features else None
        return torch.stack(probs), torch.stack(tempered), mean_features

    @torch.no_grad()
    def pseudo_labels(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pseudo-labels (B, *S) long, kept-pixel mask (B, *S) bool) for a target batch (B, C, *S)."""
        probs, tempered, features = self._passes(image)
        mean = probs.mean(dim=0)
        top, labels = mean.max(dim=1)
        spread = tempered.std(dim=0).gather(1, labels[:, None])[:, 0]
        keep = (spread < self.config.uncertainty_threshold) & (top >= self.config.confidence_threshold)
        if features is not None:
            if features.shape[2:] != labels.shape[1:]:
                features = F.interpolate(features, size=labels.shape[1:], mode="nearest")
            keep &= prototype_labels(features, mean, labels, keep, self.context.num_classes) == labels
        return labels, keep

    def step(self, batch: dict[str, dict[str, torch.Tensor]], iteration: int) -> StepResult:
        image = batch["unlabeled"]["image"]
        labels, keep = self.pseudo_labels(image)
        logits = self.model(image).float()
        ce = F.cross_entropy(logits, labels, reduction="none")
        mask = keep.float()
        loss = (ce * mask).sum() / mask.sum().clamp_min(1.0)
        logs = prediction_logs(logits)
        logs.update({"loss": float(loss.detach()), "kept_fraction": float(mask.mean())})
        return StepResult(loss, logs)
