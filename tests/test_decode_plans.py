"""Choosing decode launches (kernels/decode_plans.py) without a GPU: the table keeps what timing
found fastest, falls back to the first candidate, and only CUDA rows in 16 bits take the kernels;
the model walk times nothing for dense or float32 models."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from batchlm.kernels.decode_plans import PlanKey, PlanTable, takes_decode_kernel
from batchlm.layers.linear import RowParallelLinear
from batchlm.layers.quantization.decode_tuning import layers_by_shape, tune_decode_linears
from batchlm.layers.quantization.int4 import INT4

ONE_ROW = PlanKey("fp8", 64, 32, True)
FEW_ROWS = PlanKey("fp8", 64, 32, False)


def candidates(key: PlanKey) -> list[str | None]:
    return ["narrow", "wide", None] if key.one_row else ["dot"]


def fake_timer(costs: dict[str | None, float]) -> Callable[[Sequence[Callable[[], object]]], float]:
    """Times a candidate by the cost of the name its launches return."""

    def timer(launches: Sequence[Callable[[], object]]) -> float:
        names = {launch() for launch in launches}
        assert len(names) == 1
        return costs[names.pop()]  # type: ignore[index]

    return timer


def test_the_fastest_candidate_is_kept_per_key_and_untimed_keys_take_the_first() -> None:
    table: PlanTable[str | None] = PlanTable(candidates)
    assert table.plan_for(ONE_ROW) == "narrow" and table.plan_for(FEW_ROWS) == "dot"

    def launches(plan: str | None) -> list[Callable[[], object]]:
        return [lambda: plan, lambda: plan]  # two layers of the shape

    assert table.tune(ONE_ROW, launches, fake_timer({"narrow": 5.0, "wide": 3.0, None: 4.0})) == "wide"
    assert table.plan_for(ONE_ROW) == "wide" and table.plan_for(FEW_ROWS) == "dot"
    # None is a plan (the GEMM path), not a missing entry; a later timing replaces the earlier one.
    table.tune(ONE_ROW, launches, fake_timer({"narrow": 5.0, "wide": 3.0, None: 1.0}))
    assert table.plan_for(ONE_ROW) is None


def test_only_a_few_rows_of_16_bit_cuda_activations_take_the_decode_kernels() -> None:
    assert not takes_decode_kernel(torch.zeros(1, 8, dtype=torch.bfloat16))  # CPU
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert takes_decode_kernel(torch.zeros(16, 8, dtype=torch.bfloat16, device=cuda))
        assert not takes_decode_kernel(torch.zeros(17, 8, dtype=torch.bfloat16, device=cuda))
        assert not takes_decode_kernel(torch.zeros(1, 8, dtype=torch.float32, device=cuda))
        assert not takes_decode_kernel(torch.zeros(0, 8, dtype=torch.bfloat16, device=cuda))


def test_layers_are_grouped_by_method_and_shape_and_cpu_models_time_nothing() -> None:
    model = torch.nn.ModuleList(
        [
            RowParallelLinear(64, 32),
            RowParallelLinear(64, 32),
            RowParallelLinear(64, 48),
            RowParallelLinear(64, 32),
        ]
    )
    model[3].set_method(INT4)
    sizes = sorted(len(group) for group in layers_by_shape(model).values())
    assert sizes == [1, 1, 2]
    assert tune_decode_linears(model, torch.bfloat16) == 0  # dense layers, and 4-bit ones on the CPU
    assert tune_decode_linears(model, torch.float32) == 0
