"""Resuming an interrupted run: the loop's state on disk, and SIGINT/SIGTERM turned into a clean stop.

`resume.pt` in the run's output folder holds everything the remaining iterations depend on: the model's weights,
the optimiser and LR schedule, the method's own state (EMA teacher, generators, phase flags), the model selection
(best score, best weights, history), the validator's memory, the python/numpy/torch RNG states, the iteration,
the MLflow run id and the resolved config (a resume with another config is refused). The loop writes it
atomically (`write_atomically`) before the first iteration, every `train.resume_every` iterations, at phase ends,
on SIGINT/SIGTERM and after the last iteration; once the run is complete it is replaced by a small record of the
result, so a finished run is never trained again.

Data. Batch streams are not saved: on resume each stream replays (draws and discards) the batches of the iterations
already done, then the RNG states are restored, so iteration i trains on the same batch as in an uninterrupted
run and the final weights are bit-identical on a deterministic device. The price is the data pipeline's time
(loading and augmentation, no network) for the replayed iterations: measured under a tenth of the training time
of those iterations on CPU (README "Resuming an interrupted run"). Saving the streams instead would need the
state of every random transform (inside DataLoader workers too); seeding them per epoch would change the data
order of every existing recipe.

Plain tensors, numbers, strings, lists and dicts only: the state loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medda.config import RunConfig, flatten
from medda.errors import Interrupted, MeddaError
from medda.models.factory import write_atomically

RESUME_FILE = "resume.pt"
FORMAT = "medda-resume/1"


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    """The python, numpy, torch (and CUDA) global RNG states as plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------- the file
@dataclass
class Resume:
    """Where the loop keeps a run's resume state, how often, and the state it continues from.

    Attributes:
        path: the run's `resume.pt`.
        every: iterations between two states (phase ends and the end are always saved).
        loop: the loop state to continue from; None starts at iteration 0.
        header: written with every state: the resolved config, its digest and the MLflow run id.
        saved: a state of this run is on disk (written here, or the one resumed from).
    """

    path: Path
    every: int
    loop: dict | None = None
    header: dict = field(default_factory=dict)
    saved: bool = False

    def save(self, loop: dict) -> None:
        write_atomically({"format": FORMAT, **self.header, "loop": loop}, self.path)
        self.saved = True

    def finish(self, result: dict) -> None:
        """Replace the state by the run's result (plain data): `--resume` on a finished run returns it."""
        write_atomically({"format": FORMAT, **self.header, "finished": result}, self.path)
        self.saved = True


def header(cfg: RunConfig, run_id: str | None) -> dict:
    return {"config": cfg.model_dump(mode="json"), "config_digest": cfg.digest(), "run_id": run_id}


def read_resume(cfg: RunConfig) -> dict:
    """The resume state of `cfg.output_dir`, refused in one line when there is none or its config differs."""
    path = Path(cfg.output_dir) / RESUME_FILE
    if not path.is_file():
        raise MeddaError(f"{path}: no resume state to continue (the run stopped before its first iteration, or "
                         "never ran in this output_dir); run the command without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file is a user error
        raise MeddaError(f"{path}: not a readable medda resume state ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MeddaError(f"{path}: field 'format' missing or not {FORMAT}: not a medda resume state")
    if state["config_digest"] != cfg.digest():
        before, now = flatten(state["config"]), flatten(cfg.model_dump(mode="json"))
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        raise MeddaError(f"{path}: the run was started with another config (changed: {', '.join(changed[:3])}); "
                         "resume with the same recipe and overrides, or start a new run without --resume")
    return state


# ------------------------------------------------------------------------------------------- signals
class StopSignals:
    """SIGINT and SIGTERM as `Interrupted` while at least one `with SIGNALS:` block runs (main thread only).

    Inside `deferred()` (one loop iteration) the first signal only sets `pending`: the loop completes the iteration,
    never leaving a half-done optimiser step, saves the resume state and raises. Anywhere else, or at a second
    signal, `Interrupted` is raised at once. SIGKILL cannot be caught: its run stays RUNNING in MLflow until resumed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.pending: int | None = None
        self._deferring = False
        self._depth = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            if self._depth == 0:
                self.pending = None
                # A signal the process was told to ignore (SIGINT in a script's background job) stays ignored.
                self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                                  if signal.getsignal(s) is not signal.SIG_IGN}
            self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        if threading.current_thread() is threading.main_thread() and self._depth:
            self._depth -= 1
            if self._depth == 0:
                for s, handler in self._previous.items():
                    signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: not set from Python

    def _handle(self, signum: int, frame) -> None:
        if self._deferring and self.pending is None:
            self.pending = signum
            return
        raise Interrupted(signum)

    def take(self) -> int:
        """The pending signal's number; clears it."""
        signum, self.pending = self.pending, None
        return signum

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False


SIGNALS = StopSignals()  # signal handlers belong to the process: one instance


@contextlib.contextmanager
def interruptible(resume: Resume | None = None) -> Iterator[None]:
    """Run a block with SIGINT/SIGTERM turned into `Interrupted`, which names `resume.path` once a state exists."""
    with SIGNALS:
        try:
            yield
        except Interrupted as stop:
            if resume is not None and resume.saved:
                stop.resume = resume.path
            raise
