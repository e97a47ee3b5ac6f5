"""The OpenMP wait policy of a CPU engine: PASSIVE unless the user chose how OpenMP waits, set only
before torch loads libgomp, and said in the start-up log."""

from __future__ import annotations

import sys

import pytest

from batchlm.cpu_wait_policy import describe_wait_policy, engine_on_cpu, prefer_passive_waiting


@pytest.fixture
def torch_not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)


@pytest.mark.usefixtures("torch_not_loaded")
def test_a_cpu_engine_waits_passively_by_default() -> None:
    env: dict[str, str] = {}
    assert prefer_passive_waiting("cpu", env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert describe_wait_policy(env) == "OMP_WAIT_POLICY=PASSIVE"


@pytest.mark.usefixtures("torch_not_loaded")
@pytest.mark.parametrize("chosen", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}])
def test_a_policy_the_user_chose_is_kept(chosen: dict[str, str]) -> None:
    env = dict(chosen)
    assert not prefer_passive_waiting("cpu", env)
    assert env == chosen


@pytest.mark.usefixtures("torch_not_loaded")
def test_a_gpu_engine_keeps_the_default() -> None:
    env: dict[str, str] = {}
    assert not prefer_passive_waiting("cuda:0", env)
    assert env == {} and describe_wait_policy(env) == "libgomp's default wait policy"


def test_after_torch_is_loaded_nothing_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", sys)  # any module object stands in
    env: dict[str, str] = {}
    assert not prefer_passive_waiting("cpu", env) and env == {}


def test_auto_means_the_cpu_without_an_nvidia_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    import batchlm.cpu_wait_policy as policy

    monkeypatch.setattr(policy.Path, "exists", lambda self: False)
    assert engine_on_cpu("auto") and engine_on_cpu("cpu") and not engine_on_cpu("cuda")
    monkeypatch.setattr(policy.Path, "exists", lambda self: True)
    assert not engine_on_cpu("auto")
