"""Exponential moving average (EMA) teachers, shared by mean teacher and BCP.

Two scopes, because the reference codes differ:

- ``"params"``: only `nn.Parameter`s are averaged; the teacher's buffers (BN running statistics) are left
  to the teacher's own forward passes (SSL4MIS mean teacher, BCP on LA / Pancreas).
- ``"state_dict"``: every floating-point entry of the state dict is averaged, BN running mean/var
  included; integer buffers such as ``num_batches_tracked`` are copied from the student, not averaged
  (BCP on ACDC).

Update: ``teacher <- decay * teacher + (1 - decay) * student``.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

EmaScope = Literal["params", "state_dict"]


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of `student` (same device, same mode) whose parameters do not require gradients."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, scope: EmaScope = "params") -> None:
    """In place: teacher <- decay * teacher + (1 - decay) * student, over `scope` (see module doc)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    if scope == "params":
        t_params = list(teacher.parameters())
        s_params = list(student.parameters())
        if len(t_params) != len(s_params):
            raise ValueError("teacher and student have different parameter lists")
        _average(t_params, [s.detach() for s in s_params], decay)
    elif scope == "state_dict":
        t_state = teacher.state_dict()
        s_state = student.state_dict()
        if t_state.keys() != s_state.keys():
            raise ValueError("teacher and student have different state-dict keys")
        floats = [key for key, t in t_state.items() if t.is_floating_point()]
        _average([t_state[k] for k in floats], [s_state[k].detach() for k in floats], decay)
        for key, t in t_state.items():
            if not t.is_floating_point():
                t.copy_(s_state[key])
    else:
        raise ValueError(f"unknown EMA scope '{scope}'; expected 'params' or 'state_dict'")


def _average(teacher: list[torch.Tensor], student: list[torch.Tensor], decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student, in place, one fused call per operation for the whole
    list (torch's foreach kernels, as its optimisers use) instead of two per tensor; the same arithmetic."""
    student = [s.to(t.dtype) for t, s in zip(teacher, student, strict=True)]
    torch._foreach_mul_(teacher, decay)
    torch._foreach_add_(teacher, student, alpha=1.0 - decay)
