"""CPU thread sizing: cgroup quotas, the BATCHLM_CORE_THREADS override, and capping torch's count."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from batchlm.runner import cpu_threads
from batchlm.runner.cpu_threads import cap_cpu_threads, cgroup_cpu_limit, threads_from_env


def test_cgroup_v2_quota_rounds_up_to_whole_cpus(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1


def test_cgroup_v2_without_quota_is_unlimited(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota_files(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert cgroup_cpu_limit(tmp_path) == 4
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path) is None


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("restore_threads")
def test_cap_lowers_torch_threads_to_the_available_cpus(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    torch.set_num_threads(3)
    monkeypatch.setattr(cpu_threads, "available_cpus", lambda: 2)
    with caplog.at_level(logging.INFO, logger=cpu_threads.__name__):
        assert cap_cpu_threads() == 2
    assert torch.get_num_threads() == 2
    assert "CPU compute threads: 2 (2 CPUs available; torch chose 3)" in caplog.text


@pytest.mark.usefixtures("restore_threads")
def test_the_thread_count_is_logged_when_kept(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    torch.set_num_threads(2)
    monkeypatch.setattr(cpu_threads, "available_cpus", lambda: 4)
    with caplog.at_level(logging.INFO, logger=cpu_threads.__name__):
        assert cap_cpu_threads() == 2
    assert "CPU compute threads: 2 (4 CPUs available)" in caplog.text


@pytest.mark.usefixtures("restore_threads")
def test_cap_never_raises_a_count_someone_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tensor-parallel CPU workers split the cores between ranks before the runner starts.
    torch.set_num_threads(1)
    monkeypatch.setattr(cpu_threads, "available_cpus", lambda: 8)
    assert cap_cpu_threads() == 1
    assert torch.get_num_threads() == 1


def test_threads_env_override() -> None:
    assert threads_from_env({}) is None
    assert threads_from_env({"BATCHLM_CORE_THREADS": ""}) is None
    assert threads_from_env({"BATCHLM_CORE_THREADS": " 3 "}) == 3


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_threads_env_is_named(value: str) -> None:
    with pytest.raises(ValueError, match="BATCHLM_CORE_THREADS must be a positive integer"):
        threads_from_env({"BATCHLM_CORE_THREADS": value})
