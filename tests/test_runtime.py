"""Runtime: usable CPUs from the affinity mask and cgroup quotas, the thread policy, and Runtime.setup."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medda import runtime
from medda.config import RunConfig
from medda.runtime import Runtime, apply_threads, cgroup_cpu_limit, intra_op_threads, usable_cpus

FOUR_CPUS = {0, 1, 2, 3}


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: FOUR_CPUS, raising=False)


def _cgroup_v2(tmp_path: Path, cpu_max: dict[str, str], member: str = "/job/step") -> tuple[Path, Path]:
    """A fake cgroup v2 tree: {relative dir: cpu.max content}, and a membership file placing us in `member`."""
    root = tmp_path / "cgroup"
    for relative, content in cpu_max.items():
        (root / relative).mkdir(parents=True, exist_ok=True)
        (root / relative / "cpu.max").write_text(content + "\n")
    membership = tmp_path / "self_cgroup"
    membership.write_text(f"0::{member}\n")
    return root, membership


def _cgroup_v1(tmp_path: Path, quota: int, period: int = 100_000) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    directory = root / "cpu,cpuacct" / "docker" / "abc"
    directory.mkdir(parents=True)
    (directory / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (directory / "cpu.cfs_period_us").write_text(f"{period}\n")
    membership = tmp_path / "self_cgroup"
    membership.write_text("5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    return root, membership


def test_cgroup_v2_quota_of_the_process_cgroup(tmp_path, four_cpus):
    root, membership = _cgroup_v2(tmp_path, {"job/step": "150000 100000", "job": "max 100000", "": "max 100000"})
    assert cgroup_cpu_limit(root, membership) == pytest.approx(1.5)
    assert usable_cpus(root, membership) == 1  # 1.5 CPUs: a second thread would be throttled


def test_cgroup_v2_the_tightest_ancestor_wins(tmp_path, four_cpus):
    root, membership = _cgroup_v2(tmp_path, {"job/step": "max 100000", "job": "200000 100000"})
    assert cgroup_cpu_limit(root, membership) == pytest.approx(2.0)
    assert usable_cpus(root, membership) == 2


def test_cgroup_v1_cfs_quota(tmp_path, four_cpus):
    root, membership = _cgroup_v1(tmp_path, quota=300_000)
    assert cgroup_cpu_limit(root, membership) == pytest.approx(3.0)
    assert usable_cpus(root, membership) == 3


def test_no_quota_leaves_the_affinity_mask(tmp_path, four_cpus):
    root, membership = _cgroup_v1(tmp_path, quota=-1)
    assert cgroup_cpu_limit(root, membership) is None
    assert usable_cpus(root, membership) == 4
    assert usable_cpus(tmp_path / "missing", tmp_path / "missing_membership") == 4


def test_a_quota_above_the_affinity_mask_does_not_add_cpus(tmp_path, four_cpus):
    root, membership = _cgroup_v2(tmp_path, {"job/step": "800000 100000"})
    assert usable_cpus(root, membership) == 4


def test_a_tiny_quota_still_gives_one_cpu(tmp_path, four_cpus):
    root, membership = _cgroup_v2(tmp_path, {"job/step": "20000 100000"})
    assert usable_cpus(root, membership) == 1


def test_automatic_threads_stay_within_the_usable_cpus():
    threads = intra_op_threads(None)
    assert 1 <= threads <= usable_cpus()
    assert apply_threads(None) == threads == torch.get_num_threads()


def test_automatic_threads_follow_the_quota(monkeypatch, four_cpus):
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda *args: 2.0)
    assert intra_op_threads(None) == 2


def test_explicit_threads_are_honoured():
    assert intra_op_threads(3) == 3
    assert apply_threads(1) == 1 and torch.get_num_threads() == 1


def test_runtime_setup_applies_the_config(tmp_path):
    cfg = RunConfig.model_validate(
        {"data": {"card": str(tmp_path / "card.yaml")}, "train": {"threads": 1, "device": "cpu", "amp": "off"}}
    )
    rt = Runtime.setup(cfg)
    assert rt == Runtime(torch.device("cpu"), None, 1)
    assert torch.get_num_threads() == 1


def test_importing_medda_makes_the_openmp_wait_passive_unless_the_user_chose():
    """The variable must be in the environment before torch loads (OpenMP reads it once)."""
    code = "import os, medda, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, encoding="utf-8", check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, encoding="utf-8", check=True)
    assert out.stdout.strip() == "ACTIVE"


def test_runtime_sits_below_every_stage_that_computes():
    """The engine, inference and benchmarks import the runtime, so it imports no medda module but the config and the
    user-error leaf below it (`medda.errors`, which imports no medda module)."""
    tree = ast.parse(Path(runtime.__file__).read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("medda")} == {"medda.config", "medda.errors"}


def test_machine_description_names_the_capabilities_behind_every_figure(monkeypatch):
    """Benchmarks record the CPU's vector capability, bf16 units and AMX tiles: the same code runs several times
    faster with them, so a figure without them cannot be compared."""
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    described = runtime.machine_description()
    assert described["bf16_units"] is True and described["amx"] is False
    assert described["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert described["cpus"] == os.cpu_count() and described["torch"] == torch.__version__
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert runtime.cpu_has_amx() is False  # an older torch without the probe


@pytest.mark.parametrize(
    ("machine", "avx512_bf16", "amx", "onednn_says", "expected"),
    [
        ("x86_64", False, False, True, None),  # AVX-512 without bf16 (Ice Lake): oneDNN emulates bf16, so float32
        ("x86_64", True, False, True, torch.bfloat16),  # AVX512_BF16 (AMD Zen 4, Cooper Lake)
        ("x86_64", False, True, True, torch.bfloat16),  # AMX tiles (Sapphire Rapids and later)
        ("x86_64", False, False, False, None),  # AVX2 only
        ("aarch64", False, False, True, torch.bfloat16),  # Arm: oneDNN reads the CPU's own bf16 flag
        ("aarch64", False, False, False, None),
    ],
)
def test_auto_amp_uses_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, machine, avx512_bf16, amx,
                                                                   onednn_says, expected):
    """`train.amp: auto` autocasts to bf16 on a CPU only with native bf16 arithmetic; an x86 CPU with AVX-512 but no
    bf16 instructions, which oneDNN calls bf16-capable, runs float32 (emulated bf16 measured 2.3x slower there)."""
    monkeypatch.setattr(runtime.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_says)
    assert runtime.autocast_dtype("auto", torch.device("cpu")) == expected
    assert runtime.autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # asked for explicitly: kept
    assert runtime.autocast_dtype("off", torch.device("cpu")) is None


def test_cpu_model_reads_linux_cpuinfo_and_falls_back_to_the_architecture(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor @ 2.80GHz\n"
                       "flags\t\t: fpu avx2\n", encoding="utf-8")
    assert runtime.cpu_model(cpuinfo) == "Intel(R) Xeon(R) Processor @ 2.80GHz"
    assert runtime.cpu_model(tmp_path / "absent") == (runtime.platform.processor() or runtime.platform.machine())
