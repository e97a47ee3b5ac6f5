"""A mixture-of-experts layer's routed experts on packed quantized weights in one call
(batchlm_moe_experts in cpu_decode_experts.c): every active expert's gate/up (and its bias, where the
experts have one), the activation (SiLU * up, or gpt-oss's clamped SwiGLU) and down, the routing
weights and each token's sum over its experts, in a single parallel region. Calling the kernels
expert by expert starts two parallel regions a matmul and, with OpenMP's passive waiting, wakes the
threads each time."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batchlm.kernels.barrier_spin import spin_from_env
from batchlm.kernels.cpu_decode_stack import stack_library
from batchlm.kernels.cpu_quant import quant_isa
from batchlm.kernels.quant_panels import QuantizedWeight

# The kernel's activations (EXPERT_SILU, EXPERT_CLAMPED_SWIGLU in cpu_decode_experts.c).
_SILU, _CLAMPED_SWIGLU = 0, 1


@dataclass(frozen=True)
class ExpertActivation:
    """The activation of [gate | up] the kernel applies: SiLU(gate) * up, or gpt-oss's clamped SwiGLU
    (alpha, limit as layers/activation.py's ClampedSwiGLU takes them)."""

    kind: int = _SILU
    alpha: float = 0.0
    limit: float = 0.0

    @classmethod
    def clamped_swiglu(cls, alpha: float, limit: float) -> ExpertActivation:
        return cls(_CLAMPED_SWIGLU, alpha, limit)


SILU = ExpertActivation()


def experts_kernel_available() -> bool:
    return stack_library() is not None


class ExpertsKernel:
    """Runs the experts of one layer's step; its barrier spin adapts across calls (barrier_spin.py)."""

    def __init__(self, activation: ExpertActivation = SILU) -> None:
        library = stack_library()
        if library is None:
            raise RuntimeError("the fused CPU kernels are not available on this machine")
        self._library = library
        self.activation = activation
        self.spin = spin_from_env()
        self._waits = (ctypes.c_int * 2)()

    def run(
        self,
        x: torch.Tensor,
        starts: Sequence[int],
        slot_tokens: torch.Tensor,
        slot_weights: torch.Tensor,
        weights: Sequence[tuple[QuantizedWeight, QuantizedWeight]],
        gate_up_biases: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: float32 [T, hidden] contiguous. The routed slots come grouped by expert: slots
        [starts[i], starts[i + 1]) go to the expert whose (gate/up, down) weights are weights[i] (and
        whose gate/up bias, float32 [2 * I] contiguous, is gate_up_biases[i] where given), slot s
        carrying token slot_tokens[s] (int64) with routing weight slot_weights[s] (float32). Returns
        each token's routing-weighted sum of its experts' outputs, [T, hidden]."""
        tokens, hidden = x.shape
        active = len(weights)
        inter = weights[0][1].in_features
        out = torch.empty(tokens, hidden, dtype=torch.float32)
        pointers = ctypes.c_void_p * active
        layouts = ctypes.c_int * active
        biases = None if gate_up_biases is None else pointers(*(b.data_ptr() for b in gate_up_biases))
        act = self.activation
        spin_ns = self.spin.budget_ns()
        status = self._library.batchlm_moe_experts(
            x.data_ptr(), tokens, hidden, inter, active, (ctypes.c_long * (active + 1))(*starts),
            slot_tokens.data_ptr(), slot_weights.data_ptr(),
            pointers(*(gate_up.data.data_ptr() for gate_up, _ in weights)),
            layouts(*(gate_up.layout for gate_up, _ in weights)),
            pointers(*(down.data.data_ptr() for _, down in weights)),
            layouts(*(down.layout for _, down in weights)),
            biases, act.kind, act.alpha, act.limit,
            out.data_ptr(), torch.get_num_threads(), quant_isa(), spin_ns, self._waits,
        )  # fmt: skip
        if status != 0:
            raise MemoryError("no memory for the experts' scratch")
        self.spin.record(spin_ns, self._waits[0], self._waits[1])
        return out
