"""When kernels are launched with programmatic dependent launch (kernels/pdl.py): only on an NVIDIA
GPU of compute capability 9.0 or later, never under Triton's interpreter, and not when turned off."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from batchlm.kernels import pdl

CUDA = torch.device("cuda", 0)


@pytest.fixture
def hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend device 0 is a Hopper GPU (no GPU is needed to decide)."""
    monkeypatch.setattr(pdl, "_capable", lambda index: index == 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(pdl.ENV_FLAG, raising=False)


def test_a_cpu_tensor_never_takes_pdl() -> None:
    assert not pdl.pdl_enabled(torch.device("cpu"))
    assert pdl.pdl_launch(torch.device("cpu")) == {"PDL": False}


@pytest.mark.usefixtures("hopper")
def test_a_capable_gpu_takes_pdl_in_both_the_kernel_flag_and_the_launch_option() -> None:
    assert pdl.pdl_enabled(CUDA) == pdl.TRITON_HAS_PDL
    if pdl.TRITON_HAS_PDL:
        assert pdl.pdl_launch(CUDA) == {"PDL": True, "launch_pdl": True}
    assert not pdl.pdl_enabled(torch.device("cuda", 1))  # an older GPU beside it


@pytest.mark.usefixtures("hopper")
def test_the_environment_flag_and_the_interpreter_turn_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pdl.ENV_FLAG, "0")
    assert not pdl.pdl_enabled(CUDA)
    monkeypatch.setenv(pdl.ENV_FLAG, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.pdl_enabled(CUDA)
    assert pdl.pdl_launch(CUDA) == {"PDL": False}
