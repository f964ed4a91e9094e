"""The single training/adaptation loop: every method (source training, SSL, source-free adaptation) runs here.

Iteration-based: each iteration draws one batch per stream the method needs, runs `method.step` under
autocast, back-propagates, steps the optimiser and LR schedule, and calls `method.after_step`. Every
`val_every` iterations (and at the end) it calls a validator (validation Dice, or the label-free monitor
for adaptation), keeps the best and last checkpoints, and stops early when the validator reports a collapse.
With a `Resume`, it also writes the run's resume state and continues from one (`medda.engine.resume`); SIGINT and
SIGTERM stop it at the end of the current iteration, after saving that state.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from medda import distributed
from medda.config import OptimConfig, TrainConfig
from medda.engine.resume import SIGNALS, Resume, rng_state, set_rng_state
from medda.errors import Interrupted, MeddaError
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
    # torch's fused kernel: the same update in one pass over every parameter (BENCHMARKS.md, "Training steps")
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


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


ValidationUse = Literal["select", "select_in_phase", "score"]  # run_loop's `validation_use`


class _Selection:
    """Validation, checkpoints and the best model so far (restarted at every new phase)."""

    def __init__(self, method: Method, train: TrainConfig, save, validate, log, use: ValidationUse = "select"):
        self.method, self.train, self.save, self.validate, self.log = method, train, save, validate, log
        self.use = use
        self.history: list[dict] = []
        self.stopped = ""
        self.restart()

    def restart(self) -> None:
        self.best_score, self.best_iteration, self.best_path, self.best_state = -math.inf, -1, None, None

    def check(self, it: int) -> bool:
        """Validate at iteration `it`, keep the best checkpoint; True when the validator asks to stop."""
        if self.validate is None:  # no validation: only the kept checkpoints (an audit of the run's trajectory)
            self.keep(it)
            return False
        model = self.method.model
        modes = {name: m.training for name, m in model.named_modules()}
        result = self.validate(self.method.eval_model(), it)
        for name, m in model.named_modules():  # the validator may switch modes; training resumes as it was
            m.training = modes.get(name, m.training)
        metrics = {**result.metrics, "val/score": result.score}
        self.history.append({"iteration": it, **metrics})
        if self.log:
            self.log(metrics, it)
        if result.stop:
            self.stopped = result.reason or "validator asked to stop"
            return True
        self.keep(it)
        if result.score > self.best_score:
            self.best_score, self.best_iteration = result.score, it
            if self.use == "score":  # a cross-validation fold: its scores are the result, its models are not
                return False
            self.best_path = self.save("best", it)
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.method.eval_model().state_dict().items()}
        return False

    def keep(self, it: int) -> None:
        if self.train.keep_checkpoints and it > 0:
            self.save(f"it{it}", it)

    def state_dict(self) -> dict:
        best_path = str(self.best_path) if self.best_path is not None else None
        return {"best_score": self.best_score, "best_iteration": self.best_iteration, "best_path": best_path,
                "best_state": self.best_state, "history": self.history, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_iteration = state["best_score"], state["best_iteration"]
        self.best_path = Path(state["best_path"]) if state["best_path"] is not None else None
        self.best_state, self.history, self.stopped = state["best_state"], list(state["history"]), state["stopped"]


class _Optimisation:
    """The optimiser and LR schedule over the method's parameters; refuses a diverging step."""

    HINT = "check the images' intensities after the card's normalisation, and optim.lr"

    def __init__(self, method: Method, optim: OptimConfig, total: int):
        self.method, self.params = method, method.configure()
        self.optimizer = build_optimizer(self.params, optim) if self.params else None
        self.scheduler = (torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: lr_factor(it, total, optim))
                          if self.optimizer else None)

    def step(self, loss: torch.Tensor | None, it: int) -> None:
        if loss is None or self.optimizer is None:
            return
        # A non-finite loss or weight stops the run (marked FAILED) before anything diverged is saved; under
        # torchrun every process stops when any process's loss is not finite.
        if not distributed.all_true(bool(torch.isfinite(loss.detach()).all())):
            raise MeddaError(f"{self.method.name}: training diverged at iteration {it + 1}: the loss is "
                             f"{float(loss.detach().float().sum())}; {self.HINT}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if not torch.stack([torch.isfinite(p.detach()).all() for p in self.params]).all():
            raise MeddaError(f"{self.method.name}: training diverged at iteration {it + 1}: weights became NaN or "
                             f"infinite after the optimiser step; {self.HINT}")

    def lr(self) -> dict[str, float]:
        return {"train/lr": self.optimizer.param_groups[0]["lr"]} if self.optimizer is not None else {}

    def state_dict(self) -> dict:
        if self.optimizer is None:
            return {}
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])


def _log_average(running: dict[str, list[float]], extra: dict[str, float], bar, log, step: int) -> None:
    """Average the step logs since the last call (over every process, under torchrun), show a few on the progress
    bar, hand them to tracking."""
    averaged = {f"train/{k}": sum(v) / len(v) for k, v in running.items()}
    if distributed.active():
        parts = distributed.all_gather_object(averaged)  # a process may lack a key (AdaBN's empty last batches)
        keys = dict.fromkeys(k for p in parts for k in p)
        averaged = {k: sum(p[k] for p in parts if k in p) / sum(k in p for p in parts) for k in keys}
    averaged = {**averaged, **extra}
    bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in list(averaged.items())[:3]})
    if log:
        log(averaged, step)
    running.clear()


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
    resume: Resume | None = None,
    validation_use: ValidationUse = "select",
    stop_at: int | None = None,
) -> LoopResult:
    """Run `method` for `train.iterations` (or one pass for one-pass methods).

    Args:
        streams: name -> infinite iterator of collated batches, for every name in `method.streams`.
        save: save(tag, iteration) writes the method's eval model as checkpoint `tag` ('best'/'last'/'it<N>').
        validate: validator(eval_model, iteration); its score is maximised. None: only the last checkpoint. A
            validator with memory (the label-free monitor) has `state_dict()`/`load_state_dict()` for resuming.
        log: receives averaged step logs and validation metrics with the iteration as step.
        one_pass_length: number of batches in one pass over the stream (for `method.one_pass`).
        score_initial: validate the untouched starting model as iteration 0 (adaptation: the source model is a
            candidate, and adapting must beat it).
        resume: where to write the resume state, and the state to continue from (`medda.engine.resume`).
        validation_use: what the validator's scores decide. "select": the best checkpoint of the final phase is
            kept, and a new phase (BCP's self-training) starts from the previous phase's best weights. "select_in_phase":
            the same, but a new phase starts from the previous phase's last weights (label-free selection, whose
            scores rank one phase's own checkpoints only). "score": scores only (a cross-validation fold): no best
            checkpoint is written or kept, and a new phase starts from the last weights.
        stop_at: stop after this many iterations, the LR schedule still that of `train.iterations` (the final run
            of cross-validation stops at the iteration its folds chose).

    Raises:
        Interrupted: SIGINT/SIGTERM (while `medda.engine.resume.SIGNALS` is active), after the current iteration
            and, with `resume`, after saving the resume state.
    """
    fmt = memory_format(method.context.spatial_dims) if train.channels_last else None
    for network in _networks(method):  # the teacher in the layout of the batches too: a contiguous teacher took
        network.to(device)             # slower convolutions and a 10x slower argmax over its classes
        if fmt is not None:
            network.to(memory_format=fmt)
    selection = _Selection(method, train, save, validate, log, validation_use)
    start = time.perf_counter()
    previous = resume.loop if resume is not None else None
    if score_initial and previous is None:
        selection.check(0)  # before `configure` resets or re-wires anything: adapting must beat the source model
    total = one_pass_length if method.one_pass else train.iterations
    optimisation = _Optimisation(method, optim, total)
    end = total if stop_at is None else min(stop_at, total)
    running: dict[str, list[float]] = defaultdict(list)
    first, before = 0, 0.0
    if previous is not None:
        first, before = previous["iteration"], previous["seconds"]
        _restore(previous, method, optimisation, selection, validate, running, streams)
        if previous["complete"]:
            return _result(first, selection, Path(previous["last_path"]), before)
    ddp = _data_parallel(method, optimisation, device)
    step_network = _step_network(method, ddp, train.compile)
    main = distributed.is_main()

    def snapshot(done: int, last_path: Path | None = None) -> None:
        if resume is not None and main:  # under torchrun, rank 0 keeps the run's state
            resume.save(_state(done, method, optimisation, selection, validate, running,
                               before + time.perf_counter() - start, last_path))

    def interrupted() -> Interrupted:
        return Interrupted(SIGNALS.take(), resume.path if resume is not None else None)

    if previous is None:
        snapshot(0)
    it, phase = first - 1, method.phase(max(first - 1, 0))
    quiet = {} if main else {"disable": True}  # one progress bar, rank 0's
    bar = tqdm(range(first, end), desc=method.name, leave=False, dynamic_ncols=True, initial=first, total=end, **quiet)
    for it in bar:
        with SIGNALS.deferred():  # a signal stops the run at the end of this iteration, never inside it
            if method.phase(it) != phase:  # BCP pre-training -> self-training: from the previous phase's best weights
                phase = method.phase(it)
                # under torchrun rank 0 validated: every process starts the phase from its best weights
                best = selection.best_state if validation_use == "select" else None  # None: from the last weights
                best = distributed.broadcast_object(best) if ddp is not None else best
                method.start_phase(phase, best)
                selection.restart()  # the selected model is always one of the final phase (BCP reference)
            batch = {name: _to_device(next(streams[name]), device, fmt) for name in method.streams}
            with autocast(device, amp), _training_view(method, step_network), distributed.synced_batch_statistics():
                result = method.step(batch, it)
            optimisation.step(result.loss, it)
            method.after_step(it)
            for key, value in result.logs.items():
                running[key].append(float(value))
            if (it + 1) % log_every == 0 or it + 1 == end:
                _log_average(running, optimisation.lr(), bar, log, it + 1)
            phase_ends = it + 1 < end and method.phase(it + 1) != method.phase(it)
            # One-pass statistic estimators (AdaBN) are only their final model after `finalize()`: no mid-pass checks.
            due = ((it + 1) % train.val_every == 0 and not method.one_pass) or phase_ends
            stop = due and it + 1 < end and selection.check(it + 1)
            if due and ddp is not None:  # rank 0 validates; every process follows its decision
                stop = distributed.broadcast_object(stop)
            periodic = resume is not None and ((it + 1) % resume.every == 0 or phase_ends)
            if not stop and it + 1 < end and (periodic or SIGNALS.pending is not None):
                snapshot(it + 1)
        if stop:
            break
        if SIGNALS.pending is not None and it + 1 < end:
            raise interrupted()
    bar.close()
    method.finalize()
    if not selection.stopped:
        selection.check(it + 1)
    last_path = save("last", it + 1)
    snapshot(it + 1, last_path)
    distributed.barrier()  # rank 0's checkpoints and state are on disk before any process goes on
    if SIGNALS.pending is not None:  # the loop is complete; what follows it (tracking) is redone on resume
        raise interrupted()
    return _result(it + 1, selection, last_path, before + time.perf_counter() - start)


def _networks(method: Method) -> list[nn.Module]:
    """The method's model and every other network it holds (an EMA teacher, a frozen copy of the source model)."""
    return [value for value in vars(method).values() if isinstance(value, nn.Module)]


def _data_parallel(method: Method, optimisation: _Optimisation, device: torch.device):
    """Under torchrun, the method's model wrapped in DistributedDataParallel (gradients averaged over the processes
    at every backward pass; rank 0's weights broadcast at the start), or None in a single process."""
    if not distributed.active() or distributed.world_size() == 1 or optimisation.optimizer is None:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(method.model, device_ids=[device.index] if device.type == "cuda" else None)


def _step_network(method: Method, ddp, compiled: bool) -> nn.Module | None:
    """What `method.step` calls as its model: the DDP wrapper under torchrun, compiled with `train.compile`; None for
    the plain network."""
    if not compiled:
        return ddp
    # Validation, checkpoints and the teacher keep the plain network: only training steps run compiled.
    return torch.compile(ddp if ddp is not None else method.model)


@contextlib.contextmanager
def _training_view(method: Method, step_network: nn.Module | None) -> Iterator[None]:
    """`method.model` is `step_network` during `step` (the DDP wrapper's forward prepares the gradient all-reduce of
    the backward pass that follows; a compiled one runs the same network) and the plain network everywhere else
    (validation, checkpoints, resume states)."""
    if step_network is None:
        yield
        return
    plain, method.model = method.model, step_network
    try:
        yield
    finally:
        method.model = plain


def _result(iterations: int, selection: _Selection, last_path: Path, seconds: float) -> LoopResult:
    return LoopResult(iterations, selection.best_path, last_path, selection.best_iteration, selection.best_score,
                      selection.history, selection.stopped, seconds)


def _state(done: int, method: Method, optimisation: _Optimisation, selection: _Selection, validate, running: dict,
           seconds: float, last_path: Path | None) -> dict:
    """The loop after `done` iterations (`last_path`: the loop is complete), as plain data for `resume.pt`."""
    return {
        "iteration": done, "complete": last_path is not None, "last_path": str(last_path) if last_path else None,
        "seconds": seconds, "model": method.model.state_dict(), "method": method.state_dict(),
        "optimisation": optimisation.state_dict(), "selection": selection.state_dict(),
        "validator": validate.state_dict() if hasattr(validate, "state_dict") else {},
        "running": dict(running), "rng": rng_state(),
    }


def _restore(state: dict, method: Method, optimisation: _Optimisation, selection: _Selection, validate,
             running: dict, streams: dict[str, Iterator[dict]]) -> None:
    """Put the loop back where `_state` left it; called after `configure()` (which may re-wire the model)."""
    method.model.load_state_dict(state["model"])
    method.load_state_dict(state["method"])
    optimisation.load_state_dict(state["optimisation"])
    selection.load_state_dict(state["selection"])
    if hasattr(validate, "load_state_dict"):
        validate.load_state_dict(state["validator"])
    running.update(state["running"])
    if not state["complete"]:
        # Replay the batches of the iterations done, so iteration i draws the same batch as without the interruption
        # (streams keep their own generators); then the global RNGs as they were after iteration `done`.
        for _ in tqdm(range(state["iteration"]), desc="replaying batches", leave=False, dynamic_ncols=True):
            for name in method.streams:
                next(streams[name])
    set_rng_state(state["rng"])
