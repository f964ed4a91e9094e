"""Where and how tensors are computed: device, autocast dtype, memory layout and CPU threads.

Every stage that runs a network (the engine loop, inference, benchmarks) asks this module, so a later
distributed runtime changes one place.

CPU threads. torch's default is one OpenMP thread per core, and an OpenMP thread that waits at the end of a
parallel region spins on its core. On a shared machine a busy neighbour then stalls every region: measured
30x slower training steps with one CPU-bound process on 2 cores. medda therefore (1) makes the OpenMP wait
policy passive (`OMP_WAIT_POLICY=PASSIVE`, set in `medda/__init__.py` because OpenMP reads it once, when
torch loads) and (2) with `train.threads` unset runs as many intra-op threads as the CPUs this process may use
(affinity mask and cgroup CPU quota), not the CPUs the machine has. `benchmarks/contention.py` measures both.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.utils import set_determinism

from medda.config import RunConfig
from medda.errors import MeddaError

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")


# ------------------------------------------------------------------------------------------------ CPUs
def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _with_ancestors(root: Path, relative: str) -> list[Path]:
    """root/a/b, root/a, root for the cgroup path '/a/b' (a quota on any ancestor limits this process too)."""
    parts = [p for p in relative.strip("/").split("/") if p]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, membership: Path = CGROUP_MEMBERSHIP) -> float | None:
    """CPUs granted by the cgroup CPU quota of this process, or None when there is no quota.

    Reads cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD") and cgroup v1 `cpu.cfs_quota_us` /
    `cpu.cfs_period_us` (quota -1: none) in the process's cgroup and its ancestors; the smallest quota wins.

    Args:
        root: where the cgroup file system is mounted.
        membership: the process's cgroup membership file (lines "ID:CONTROLLERS:PATH").

    Returns:
        Quota / period in CPUs (e.g. 1.5), or None.
    """
    limits: list[float] = []
    for line in (_read(membership) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2, one unified hierarchy
            for directory in _with_ancestors(root, relative):
                quota, _, period = (_read(directory / "cpu.max") or "max").partition(" ")
                if quota != "max" and period:
                    limits.append(int(quota) / int(period))
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's own mount
            for mount in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
                for directory in _with_ancestors(mount, relative):
                    quota = _read(directory / "cpu.cfs_quota_us")
                    period = _read(directory / "cpu.cfs_period_us")
                    if quota and period and int(quota) > 0:
                        limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def usable_cpus(root: Path = CGROUP_ROOT, membership: Path = CGROUP_MEMBERSHIP) -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup CPU quota (at least 1).

    A fractional quota is rounded down: a thread beyond the quota is throttled, and a throttled OpenMP thread
    stalls its parallel region as a busy neighbour does.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, membership)
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


def intra_op_threads(requested: int | None) -> int:
    """torch intra-op threads for `train.threads`: the request, or (None) one per usable CPU."""
    return requested if requested is not None else usable_cpus()


def apply_threads(requested: int | None) -> int:
    """Set torch's intra-op threads from `train.threads` (see `intra_op_threads`) and return the number."""
    threads = intra_op_threads(requested)
    torch.set_num_threads(threads)
    return threads


# --------------------------------------------------------------------------- device, precision, layout
def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU. Under torchrun, 'auto' and 'cuda' mean this process's GPU
    (`gpu_index`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", gpu_index())
    return torch.device(name)


def gpu_index() -> int:
    """This process's GPU under torchrun: LOCAL_RANK, shared round-robin when a machine runs more processes than it
    has GPUs (fine for predict/evaluate; DDP training with NCCL needs one GPU per process). 0 without torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively: on x86, the AVX512_BF16 instructions or AMX tiles.

    oneDNN's own check (`_is_mkldnn_bf16_supported`) is not enough on x86: it also says yes on AVX-512 CPUs without
    bf16 instructions (Skylake-SP, Cascade Lake, Ice Lake servers), where oneDNN emulates bf16, and there bf16
    autocast made the ACDC 2D training step 2.3x and its inference 3.3x slower than float32 (BENCHMARKS.md,
    "bf16 on an AVX-512 CPU without bf16 units"). Other architectures (Arm) keep oneDNN's check, which reads their
    bf16 flag.
    """
    try:
        if platform.machine().lower() in {"x86_64", "amd64", "i386", "i686"}:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (oneDNN runs bf16 convolutions on them: faster than AVX-512 bf16 alone)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Processor @ 2.80GHz") where Linux reports one, else the architecture."""
    for line in (_read(cpuinfo) or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def machine_description() -> dict:
    """What every benchmark result records about the machine: the figures depend on it (BENCHMARKS.md)."""
    return {
        "cpu": cpu_model(), "cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_units": cpu_has_bf16(),
        "amx": cpu_has_amx(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.amp` on `device` (None = float32)."""
    if setting == "off":
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or a no-op context for float32 (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def require_compiler(device: torch.device) -> None:
    """Refuse `train.compile` on a CPU machine without a C++ compiler, before the run writes anything.

    torch.compile's CPU backend builds C++ kernels at the first training step; without g++ (or `$CXX`) it would
    fail there, after the run's outputs exist. (On a GPU it builds Triton kernels, which torch checks itself.)
    """
    if device.type != "cpu":
        return
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise MeddaError("config: field 'train.compile' is true, but torch.compile needs a C++ compiler (g++, or the "
                         "one $CXX names) and this machine has none; expected false, or install g++") from None


def memory_format(spatial_dims: int) -> torch.memory_format:
    """channels_last for 2D networks, channels_last_3d for 3D ones."""
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


@dataclass
class Runtime:
    """Where a run computes: the device, the autocast dtype (None = float32) and the intra-op CPU threads."""

    device: torch.device
    amp: torch.dtype | None
    threads: int

    @classmethod
    def setup(cls, cfg: RunConfig) -> Runtime:
        """Apply the run's thread policy and seed, and resolve its device and autocast dtype."""
        threads = apply_threads(cfg.train.threads)
        set_determinism(cfg.train.seed)
        device = resolve_device(cfg.train.device)
        return cls(device, autocast_dtype(cfg.train.amp, device), threads)
