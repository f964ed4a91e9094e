"""OSUDA: off-the-shelf (source-free) adaptation of the batch-norm statistics.

Liu, Xing, Yang, El Fakhri, Woo, "Adapting Off-the-Shelf Source Segmenter for Target Medical Image
Segmentation", MICCAI 2021 (arXiv 2106.12497). No official code exists; this is medda's
reconstruction (docs/methods.md section 2.2), whose exact forms are unverified and therefore options:

1. Low-order statistics: BN running mean/variance start from the source values and follow the
   target batches with a decaying momentum, mu_n = (1 - eta_n) mu_{n-1} + eta_n mu_batch, with
   eta_n = eta0 * exp(-n / tau) (n = the 0-based iteration; tau = 1 is the paper's literal exp(-n)).
2. Channel transferability (TransNorm's form, Wang et al. NeurIPS 2019):
   T_lc = | mu^s_lc / sqrt(var^s_lc + eps) - mu^t_lc / sqrt(var^t_lc + eps) |,
   alpha_lc = N (1 + T_lc)^-1 / sum (1 + T)^-1, the sum and N over all layers and channels
   ("global", N = L.C, default) or within each layer ("layer", N = C, TransNorm). alpha is a
   constant (detached), recomputed every step from the current running statistics.
3. High-order consistency: L_HSC = (1/N) sum_lc alpha_lc (|gamma^t - gamma^s| + |beta^t - beta^s|) ("l1"),
   or with squared differences ("l2"); gamma^s, beta^s are frozen source copies; N = the number of BN channels
   (`hsc_reduction="mean"`, default). Normalising by N makes L_HSC a per-channel average, on the scale of the
   per-pixel mean entropy: with the plain sum ("sum"), every gamma/beta receives a consistency subgradient of
   about alpha ~ 1 against an entropy gradient of about 1e-3, so the affine parameters cannot leave the source
   values and OSUDA reduces to BN-statistics adaptation (measured: gamma/beta moved 1e-5 in 200 Adam steps
   against 1e-2 under Tent). With "mean", a channel moves where the entropy gradient exceeds alpha/N and the
   consistency holds the others at their source values.
4. L = L_HSC + lambda_entropy * L_SE, with L_SE the mean softmax entropy.

The source statistics and affine parameters are kept as a separate frozen copy, outside the
adapted module. The network runs in train mode (BN normalises with batch statistics and updates its
running statistics with eta_n); evaluation uses the adapted running statistics in eval mode.
Default tau = 100 iterations: with eta0 = 0.1 the source share left in the statistics is about
exp(-eta0 * tau) = exp(-10) (fully target, as AdaBN), the decaying momentum averages over more and
more batches, and the statistics are practically frozen after ~5 tau = 500 iterations so the affine
parameters train against stable statistics. The literal tau = 1 freezes them within ~10 iterations
and keeps ~85% of the source statistics.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from medda.errors import MeddaError
from medda.methods.base import (
    Method,
    MethodConfig,
    MethodContext,
    StepResult,
    batchnorm_layers,
    trainable_parameters,
)
from medda.methods.losses import entropy, prediction_logs


def bn_momentum_schedule(n: int, eta0: float, tau: float) -> float:
    """eta_n = eta0 * exp(-n / tau): the BN momentum used at (0-based) iteration n."""
    return float(eta0 * math.exp(-n / tau))


def channel_transferability(
    mean_s: torch.Tensor, var_s: torch.Tensor, mean_t: torch.Tensor, var_t: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """T = |mu_s / sqrt(var_s + eps) - mu_t / sqrt(var_t + eps)|, per channel (TransNorm's distance)."""
    return (mean_s / torch.sqrt(var_s + eps) - mean_t / torch.sqrt(var_t + eps)).abs()


def transferability_weights(
    distances: list[torch.Tensor], normalisation: Literal["global", "layer"] = "global"
) -> list[torch.Tensor]:
    """alpha = N (1+T)^-1 / sum (1+T)^-1 per layer's (C_l,) distances; detached.

    "global": sum and N = sum_l C_l over all layers and channels; "layer": per layer, N = C_l.
    """
    inv = [1.0 / (1.0 + t.detach().float()) for t in distances]
    if normalisation == "layer":
        return [i.numel() * i / i.sum() for i in inv]
    if normalisation != "global":
        raise MeddaError(f"alpha_normalisation '{normalisation}' is unknown; expected 'global' or 'layer'")
    total = sum(i.sum() for i in inv)
    n = sum(i.numel() for i in inv)
    return [n * i / total for i in inv]


def high_order_consistency(
    alphas: list[torch.Tensor],
    gammas: list[torch.Tensor],
    betas: list[torch.Tensor],
    gammas_src: list[torch.Tensor],
    betas_src: list[torch.Tensor],
    consistency: Literal["l1", "l2"] = "l1",
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """sum_lc alpha_lc (d(gamma_t, gamma_s) + d(beta_t, beta_s)), d = |.| ("l1") or (.)^2 ("l2"), divided by the
    number of channels N for reduction="mean"."""
    if consistency not in ("l1", "l2"):
        raise MeddaError(f"consistency '{consistency}' is unknown; expected 'l1' or 'l2'")
    total = torch.zeros((), dtype=torch.float32, device=alphas[0].device if alphas else None)
    for a, g, b, gs, bs in zip(alphas, gammas, betas, gammas_src, betas_src, strict=True):
        dg, db = g.float() - gs.float(), b.float() - bs.float()
        d = dg.abs() + db.abs() if consistency == "l1" else dg.square() + db.square()
        total = total + (a * d).sum()
    if reduction == "mean":
        return total / max(sum(a.numel() for a in alphas), 1)
    if reduction != "sum":
        raise MeddaError(f"hsc_reduction '{reduction}' is unknown; expected 'mean' or 'sum'")
    return total


class Config(MethodConfig):
    eta0: float = Field(
        0.1, gt=0.0, le=1.0, description="Initial BN momentum eta0 (0.1 = PyTorch's BN default)."
    )
    tau: float = Field(
        100.0,
        gt=0.0,
        description="Decay constant of eta_n = eta0 exp(-n/tau), in iterations; 1 = the paper's literal exp(-n).",
    )
    lambda_entropy: float = Field(
        1.0, ge=0.0, description="Weight of the self-entropy term (unknown in the paper; 1)."
    )
    alpha_normalisation: Literal["global", "layer"] = Field(
        "global",
        description="Normalise transferability weights over all layers and channels ('global', N = L.C) "
        "or within each layer ('layer', N = C, TransNorm).",
    )
    consistency: Literal["l1", "l2"] = Field("l1", description="Distance of the high-order consistency term.")
    hsc_reduction: Literal["mean", "sum"] = Field(
        "mean",
        description="'mean': L_HSC averaged over the BN channels (on the entropy's scale, so gamma/beta adapt); "
        "'sum': summed over channels (then gamma/beta stay at their source values: BN statistics only).",
    )
    trainable: Literal["bn_affine", "all"] = Field(
        "bn_affine",
        description="Train only BN gamma/beta ('bn_affine') or the whole network ('all'); the running statistics "
        "follow the decaying momentum in both.",
    )


class OSUDA(Method):
    """Decaying-momentum BN statistics + transferability-weighted gamma/beta consistency + self-entropy."""

    name = "osuda"
    Config = Config
    requires_batchnorm = True
    default_optim = {"name": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant"}

    config: Config

    def __init__(self, model: nn.Module, config: MethodConfig, context: MethodContext):
        super().__init__(model, config, context)
        self._layers: list[nn.modules.batchnorm._BatchNorm] = []
        self._source: list[dict[str, torch.Tensor]] = []
        self.last_momentum: float | None = None

    def configure(self) -> list[nn.Parameter]:
        self._layers = batchnorm_layers(self.model)
        if any(bn.running_mean is None or bn.running_var is None for bn in self._layers):
            raise MeddaError(
                "method 'osuda' adapts the BN running statistics, but the model's BN layers do not track them "
                "(track_running_stats=False)"
            )
        if not any(bn.affine for bn in self._layers):
            raise MeddaError("method 'osuda' needs batch-norm layers with affine parameters (affine=True)")
        self._source = [
            {
                "mean": bn.running_mean.detach().clone(),
                "var": bn.running_var.detach().clone(),
                "weight": bn.weight.detach().clone() if bn.affine else None,
                "bias": bn.bias.detach().clone() if bn.affine else None,
            }
            for bn in self._layers
        ]
        return trainable_parameters(self.model, self.config.trainable, self.name)

    def source_copy(self) -> list[dict[str, torch.Tensor]]:
        """The frozen source running mean/var and gamma/beta per BN layer (module order)."""
        return self._source

    def step(self, batch: dict[str, dict[str, torch.Tensor]], iteration: int) -> StepResult:
        cfg = self.config
        eta = bn_momentum_schedule(iteration, cfg.eta0, cfg.tau)
        for bn in self._layers:
            bn.momentum = eta
        self.last_momentum = eta
        logits = self.model(batch["unlabeled"]["image"]).float()
        ent = entropy(torch.softmax(logits, dim=1))

        affine = [(bn, src) for bn, src in zip(self._layers, self._source, strict=True) if bn.affine]
        with torch.no_grad():
            dist = [
                channel_transferability(src["mean"], src["var"], bn.running_mean, bn.running_var, bn.eps)
                for bn, src in affine
            ]
            alphas = transferability_weights(dist, cfg.alpha_normalisation)
        hsc = high_order_consistency(
            alphas,
            [bn.weight for bn, _ in affine],
            [bn.bias for bn, _ in affine],
            [src["weight"] for _, src in affine],
            [src["bias"] for _, src in affine],
            cfg.consistency,
            cfg.hsc_reduction,
        )
        loss = hsc + cfg.lambda_entropy * ent
        logs = prediction_logs(logits)
        logs.update(
            {
                "loss": float(loss.detach()),
                "hsc": float(hsc.detach()),
                "bn_momentum": eta,
                "transferability": float(torch.cat(dist).mean()),
            }
        )
        return StepResult(loss, logs)
