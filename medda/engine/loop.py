"""The single training/adaptation loop: every method (source training, SSL, source-free adaptation) runs here.

Iteration-based: each iteration draws one batch per stream the method needs, runs `method.step` under
autocast, back-propagates, steps the optimiser and LR schedule, and calls `method.after_step`. Every
`val_every` iterations (and at the end) it calls a validator (validation Dice, or the label-free monitor
for adaptation), keeps the best and last checkpoints, and stops early when the validator reports a collapse.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from medda.config import OptimConfig, TrainConfig
from medda.methods.base import Method
from medda.runtime import autocast, memory_format


@dataclass
class Validation:
    """What a validator returns: a score to maximise, metrics to log, and whether training must stop."""

    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    stop: bool = False
    reason: str = ""


@dataclass
class LoopResult:
    iterations: int
    best_path: Path | None
    last_path: Path
    best_iteration: int
    best_score: float
    history: list[dict] = field(default_factory=list)
    stopped_early: str = ""
    seconds: float = 0.0


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(it: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the base LR at iteration `it` (linear warm-up, then the schedule)."""
    if it < cfg.warmup_iterations:
        return (it + 1) / cfg.warmup_iterations
    if cfg.schedule == "poly":
        return (1 - it / max(total, 1)) ** 0.9
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * it / max(total, 1)))
    if cfg.schedule == "step":
        return cfg.step_gamma ** (it // cfg.step_size)
    return 1.0


def _to_device(batch: dict, device: torch.device, fmt: torch.memory_format | None) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if fmt is not None and key == "image" and value.ndim in (4, 5):
                value = value.contiguous(memory_format=fmt)
        out[key] = value
    return out


def _train_modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _restore_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    for name, m in model.named_modules():
        m.training = modes.get(name, m.training)


def run_loop(
    method: Method,
    streams: dict[str, Iterator[dict]],
    train: TrainConfig,
    optim: OptimConfig,
    device: torch.device,
    amp: torch.dtype | None,
    save: Callable[[str, int], Path],
    validate: Callable[[nn.Module, int], Validation] | None = None,
    log: Callable[[dict[str, float], int], None] | None = None,
    one_pass_length: int | None = None,
    log_every: int = 10,
    score_initial: bool = False,
) -> LoopResult:
    """Run `method` for `train.iterations` (or one pass for one-pass methods).

    Args:
        streams: name -> infinite iterator of collated batches, for every name in `method.streams`.
        save: save(tag, iteration) writes the method's eval model as checkpoint `tag` ('best'/'last'/'initial').
        validate: validator(eval_model, iteration); its score is maximised. None: only the last checkpoint.
        log: receives averaged step logs and validation metrics with the iteration as step.
        one_pass_length: number of batches in one pass over the stream (for `method.one_pass`).
        score_initial: validate the untouched starting model as iteration 0 (adaptation: the source model is a
            candidate, and adapting must beat it).
    """
    spatial_dims = method.context.spatial_dims
    fmt = memory_format(spatial_dims) if train.channels_last else None
    model = method.model.to(device)
    if fmt is not None:
        model.to(memory_format=fmt)
    history: list[dict] = []
    best_score, best_iteration, best_path = -math.inf, -1, None
    stopped = ""
    running: dict[str, list[float]] = defaultdict(list)
    start = time.perf_counter()

    def checkpoint(it: int) -> bool:
        nonlocal best_score, best_iteration, best_path, stopped
        if validate is None:
            return False
        modes = _train_modes(model)
        result = validate(method.eval_model(), it)
        _restore_modes(model, modes)
        metrics = {**result.metrics, "val/score": result.score}
        history.append({"iteration": it, **metrics})
        if log:
            log(metrics, it)
        if result.stop:
            stopped = result.reason or "validator asked to stop"
            return True
        if train.keep_checkpoints and it > 0:
            save(f"it{it}", it)
        if result.score > best_score:
            best_score, best_iteration = result.score, it
            best_path = save("best", it)
        return False

    if validate is not None and score_initial:
        # The untouched starting model is scored first (before `configure` resets or re-wires anything):
        # adaptation may only be chosen if it beats the source model.
        checkpoint(0)
    params = method.configure()
    optimizer = build_optimizer(params, optim) if params else None
    total = one_pass_length if method.one_pass else train.iterations
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total, optim)) if optimizer else None
    )


    it = 0
    phase = method.phase(0)
    bar = tqdm(range(total), desc=method.name, leave=False, dynamic_ncols=True)
    for it in bar:
        if method.phase(it) != phase:
            # New phase (BCP pre-training -> self-training): continue from the previous phase's best weights.
            phase = method.phase(it)
            best_state = None
            if best_path is not None:
                from medda.models.factory import read_checkpoint

                best_state = read_checkpoint(best_path)["state_dict"]
            method.start_phase(phase, best_state)
            # Model selection restarts with the phase (BCP reference: self-training tracks its own best from 0),
            # so the selected model is always one of the final phase, never a pre-training checkpoint.
            best_score, best_iteration, best_path = -math.inf, -1, None
        batch = {name: _to_device(next(streams[name]), device, fmt) for name in method.streams}
        with autocast(device, amp):
            result = method.step(batch, it)
        if result.loss is not None and optimizer is not None:
            # A non-finite loss or weight stops the run (marked FAILED) before anything diverged is saved.
            from medda.errors import MeddaError

            hint = "check the images' intensities after the card's normalisation, and optim.lr"
            if not torch.isfinite(result.loss.detach()).all():
                raise MeddaError(f"{method.name}: training diverged at iteration {it + 1}: the loss is "
                                 f"{float(result.loss.detach().float().sum())}; {hint}")
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()
            scheduler.step()
            if not torch.stack([torch.isfinite(p.detach()).all() for p in params]).all():
                raise MeddaError(f"{method.name}: training diverged at iteration {it + 1}: weights became NaN or "
                                 f"infinite after the optimiser step; {hint}")
        method.after_step(it)
        for key, value in result.logs.items():
            running[key].append(float(value))
        if (it + 1) % log_every == 0 or it + 1 == total:
            averaged = {f"train/{k}": sum(v) / len(v) for k, v in running.items()}
            if optimizer is not None:
                averaged["train/lr"] = optimizer.param_groups[0]["lr"]
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in list(averaged.items())[:3]})
            if log:
                log(averaged, it + 1)
            running.clear()
        phase_ends = it + 1 < total and method.phase(it + 1) != method.phase(it)
        # One-pass statistic estimators (AdaBN) are only their final model after `finalize()`: no mid-pass checks.
        due = ((it + 1) % train.val_every == 0 and not method.one_pass) or phase_ends
        if due and it + 1 < total and checkpoint(it + 1):
            break
    bar.close()
    method.finalize()
    done = it + 1
    if not stopped:
        checkpoint(done)
    last_path = save("last", done)
    return LoopResult(
        done, best_path, last_path, best_iteration, best_score, history, stopped, time.perf_counter() - start
    )
