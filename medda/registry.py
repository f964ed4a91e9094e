"""Method registry: name -> class. Adding a method is one new file plus one line in `_METHODS`.

A method says itself what it is for (`Method.task`): "adaptation" methods run under `medda adapt`, "training"
methods under `medda train` / `train-ssl`. Code outside the package (a plugin, a test) adds one with `register`.
"""

from __future__ import annotations

import importlib

from medda.errors import MeddaError
from medda.methods.base import Method

# name -> "module:Class"; imported lazily so one broken method cannot break the CLI.
_METHODS: dict[str, str | type[Method]] = {
    # source training / semi-supervised
    "supervised": "medda.methods.supervised:Supervised",
    "mean_teacher": "medda.methods.mean_teacher:MeanTeacher",
    "bcp": "medda.methods.bcp:BCP",
    # source-free adaptation and baselines
    "none": "medda.methods.no_adaptation:NoAdaptation",
    "adabn": "medda.methods.adabn:AdaBN",
    "tent": "medda.methods.tent:Tent",
    "entropy_prior": "medda.methods.entropy_prior:EntropyPrior",
    "osuda": "medda.methods.osuda:OSUDA",
    "dpl": "medda.methods.dpl:DPL",
    "shot_im": "medda.methods.shot_im:ShotIM",
    "finetune_fewshot": "medda.methods.finetune_fewshot:FinetuneFewshot",
}


def register(name: str, method: str | type[Method]) -> None:
    """Make `method` (a Method subclass, or "module:Class") available under `name`."""
    if name in _METHODS:
        raise MeddaError(f"method '{name}' is already registered")
    _METHODS[name] = method


def list_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        raise MeddaError(f"method '{name}' is unknown; expected one of: {', '.join(list_methods())}")
    target = _METHODS[name]
    if isinstance(target, str):
        module, cls = target.split(":")
        return getattr(importlib.import_module(module), cls)
    return target


def methods_for(task: str) -> list[str]:
    """Registered method names whose `task` is "adaptation" or "training", in registration order."""
    return [name for name in _METHODS if get_method(name).task == task]


def options_markdown() -> str:
    """Every method's typed options as Markdown (README 'Method options'; a test keeps them in sync)."""
    parts = []
    for name in (*methods_for("adaptation"), *methods_for("training")):
        cls = get_method(name)
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        parts.append(f"**`{name}`**: {summary}")
        fields = cls.Config.model_fields
        if not fields:
            parts.append("No options.")
            continue
        rows = ["| option | default | meaning |", "|---|---|---|"]
        rows += [f"| `{k}` | `{f.get_default()!r}` | {(f.description or '').replace('|', chr(92) + '|')} |"
                 for k, f in fields.items()]
        parts.append("\n".join(rows))
    return "\n\n".join(parts)
